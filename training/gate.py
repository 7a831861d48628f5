"""The promotion gate: a model version replaces the current one only if it wins off-policy on fresh data.

``retention models promote VERSION --if-better`` calls :func:`promotion_gate`. The rule: the
doubly robust estimate of (candidate − current), bootstrapped with the same resampled subscribers
for both (paired; a subscriber's decisions are resampled together), must have its lower confidence
bound above zero: the lowest of the percentile, BCa and bootstrap-t bounds (see
:func:`training.verdict.judge`). With the default 90% two-sided interval that bound is a 95% one-sided one, so a
candidate no better than the current version is promoted at most about 5% of the time. With no
current version the candidate must beat the logging policy's observed value the same way.

What the verdict also states (:class:`training.verdict.Judgement`): the *minimum detectable difference* (MDD), the
true advantage this data would reveal with probability ``power`` (80%),

    MDD = (z_{1−α} + z_{power}) · SE,    α = (1 − level) / 2,    SE = the bootstrap sd of the difference

(1.645 + 0.842 = 2.49 standard errors at the defaults), and, since SE shrinks as 1/√n, the number
of decisions a given difference Δ needs: n · (MDD / Δ)².

Refusals before any estimate:

- the evaluation data overlaps the candidate's training data (matched by ``request_id`` against
  the hashes ``retention train`` records in the version, or by date range for a version trained
  before those were recorded): a model judged on the decisions it learned from looks better than
  it is. ``allow_overlap=True`` (``--allow-overlap``) judges anyway and says so;
- an effective sample size of the candidate's importance weights below 100 (``min_ess``);
- more than ``MAX_UNSUPPORTED_MASS`` of the candidate's choices on candidates the logging policy
  could not show (its value there would rest on its own reward model alone).
"""

from __future__ import annotations

from pathlib import Path

from models.exploration import Exploration
from training.evaluate import LOGGING, EvaluationConfig, Inputs, evaluate, training_overlap
from training.verdict import decisions_for_ess, describe, judge

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
    allow_overlap: bool = False,
    allow_missing_profiles: bool = False,
) -> tuple[bool, str]:
    """Return (promote?, the report saying why) for `candidate` against the registry's current version.

    Target policies use serving's exploration settings (``RETENTION_*`` variables) unless given.
    Raises ValueError (or the data readers' errors) with one sentence on bad input, and
    :class:`training.target_policy.MissingProfilesError` when a version reads profile columns that neither
    `profiles` nor the decisions' logged values give, unless `allow_missing_profiles`.
    """
    from models.registry import Registry

    registry = Registry(registry_root)
    available = registry.versions()
    if candidate not in available:
        raise ValueError(f"model version {candidate!r} is not in registry {registry_root}")
    current = registry.current()
    if current == candidate:
        return False, f"{candidate} is already the current version"
    inputs = Inputs.load(decisions, outcomes, catalog, profiles)
    overlap = training_overlap(registry, candidate, inputs.decisions)
    note = ""
    if overlap is not None and overlap[0] > 0:
        count, how = overlap
        if not allow_overlap:
            return False, (
                f"not promoted: {count:,} of {len(inputs.decisions):,} evaluation decisions are in {candidate}'s "
                f"training data (matched {how}); a model judged on the decisions it learned from looks better than "
                "it is: evaluate on decisions logged after its training, or pass --allow-overlap to judge anyway"
            )
        note = f" (note: {count:,} evaluation decisions are in its training data, matched {how}; allowed by --allow-overlap)"
    versions = [candidate] + ([current] if current is not None else [])
    config = EvaluationConfig(
        level=level,
        n_resamples=max(1, n_resamples),
        seed=seed,
        exploration=exploration or Exploration.from_env(),
        segments=False,
        allow_missing_profiles=allow_missing_profiles,
    )
    evaluated = evaluate(inputs, registry, versions, config)
    boot = evaluated.bootstrap
    assert boot is not None  # n_resamples >= 1
    dr = evaluated.results[candidate]["dr"]
    n = evaluated.logged.n
    # an absolute floor, not evaluate's warning level (1% of the decisions): at Apple's effect sizes and
    # ε = 0.05 a candidate that departs from the current policy has an ESS of 1-2% of the decisions, and
    # the subscriber bootstrap still covers the truth there (bench/bench_gate.py, BENCHMARKS.md)
    floor = config.min_ess
    # the difference the gate judges, as evaluate reported it: evaluate's rule marks it too_few when either
    # side's weights (the paired difference weighs both) have an effective sample size below config.min_ess
    row = next(p for p in evaluated.summary["policies"] if p["name"] == candidate)
    difference = row["vs_current" if current is not None else "vs_logging"]["dr"]
    if difference.get("too_few"):
        who, ess = difference["too_few"]["version"], difference["too_few"]["ess"]
        return False, (
            f"not promoted: the effective sample size of {who}'s importance weights is {ess:.0f} of {n:,} "
            f"decisions (below {floor:.0f}), too few to trust any interval; log more decisions with exploration "
            f"(the effective sample size grows with the decisions: about {decisions_for_ess(n, ess, floor):,} "
            "decisions like these reach it)"
        ) + note
    if dr.unsupported_mass > MAX_UNSUPPORTED_MASS:
        return False, (
            f"not promoted: {dr.unsupported_mass:.1%} of {candidate}'s choices go to candidates the logging policy "
            f"could not show (over {MAX_UNSUPPORTED_MASS:.0%}), so its value there rests on its own model alone"
        ) + note
    if current is not None:
        ref_key, against = f"{current}/dr", f"current version {current}"
    else:
        ref_key, against = f"{LOGGING}/observed", "the logging policy (no current version)"
    j = judge(boot, f"{candidate}/dr", ref_key, level=level,
              clusters=int(evaluated.summary["settings"]["bootstrap_clusters"]), method=config.interval)
    differ = difference["choices_differ"]
    return j.promote, describe(j, candidate, against, boot.results[ref_key].estimate, differ) + note
