"""The promotion gate: a model version replaces the current one only if it wins off-policy.

``retention models promote VERSION --if-better`` calls :func:`promotion_gate`. The rule: the
doubly robust estimate of (candidate − current), bootstrapped with the same resampled requests
for both (paired), must have its lower confidence bound above zero. With the default 90%
two-sided interval that bound is a 95% one-sided one. With no current version the candidate must
beat the logging policy's observed value the same way.

Two more refusals, because an interval cannot be trusted there: an effective sample size of the
candidate's importance weights below the evaluation's floor, and more than
``MAX_UNSUPPORTED_MASS`` of the candidate's choices on candidates the logging policy could not
show (its value there would rest on its own reward model alone).
"""

from __future__ import annotations

from pathlib import Path

from training.evaluate import LOGGING, EvaluationConfig, Inputs, evaluate
from training.target_policy import Exploration

MAX_UNSUPPORTED_MASS = 0.10


def promotion_gate(
    registry_root: Path,
    candidate: str,
    decisions: Path,
    outcomes: Path,
    profiles: Path | None,
    catalog: Path,
    *,
    level: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
    exploration: Exploration | None = None,
) -> tuple[bool, str]:
    """Return (promote?, one sentence saying why) for `candidate` against the registry's current version.

    Target policies use serving's exploration settings (``RETENTION_*`` variables) unless given.
    Raises ValueError (or the data readers' errors) with one sentence on bad input.
    """
    from models.registry import Registry

    registry = Registry(registry_root)
    available = registry.versions()
    if candidate not in available:
        raise ValueError(f"model version {candidate!r} is not in registry {registry_root}")
    current = registry.current()
    if current == candidate:
        return False, f"{candidate} is already the current version"
    versions = [candidate] + ([current] if current is not None else [])
    config = EvaluationConfig(
        level=level,
        n_resamples=max(1, n_resamples),
        seed=seed,
        exploration=exploration or Exploration.from_serving_settings(),
        segments=False,
    )
    evaluated = evaluate(Inputs.load(decisions, outcomes, catalog, profiles), registry, versions, config)
    boot = evaluated.bootstrap
    assert boot is not None  # n_resamples >= 1
    dr = evaluated.results[candidate]["dr"]
    n = evaluated.logged.n
    floor = evaluated.summary["settings"]["min_ess"]
    if dr.ess < floor:
        return False, (
            f"not promoted: the effective sample size of {candidate}'s importance weights is {dr.ess:.0f} of {n} "
            f"decisions (below {floor:.0f}), too few to trust any interval; log more decisions with exploration"
        )
    if dr.unsupported_mass > MAX_UNSUPPORTED_MASS:
        return False, (
            f"not promoted: {dr.unsupported_mass:.1%} of {candidate}'s choices go to candidates the logging policy "
            f"could not show (over {MAX_UNSUPPORTED_MASS:.0%}), so its value there rests on its own model alone"
        )
    if current is not None:
        diff = boot.difference(f"{candidate}/dr", f"{current}/dr", level)
        against = f"current version {current}"
    else:
        diff = boot.difference(f"{candidate}/dr", f"{LOGGING}/observed", level)
        against = "the logging policy (no current version)"
    text = (
        f"DR estimate of {candidate} minus {against}: {diff.estimate:+.4f} per request, {level:.0%} paired "
        f"interval [{diff.ci_low:.4f}, {diff.ci_high:.4f}] on {n} decisions"
    )
    if diff.ci_low > 0:
        return True, f"promoted: {text}; the lower bound is above zero"
    return False, f"not promoted: {text}; the lower bound is not above zero, so it is not shown to be better"
