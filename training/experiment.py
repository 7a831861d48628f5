"""Deciding a live experiment with an anytime-valid confidence sequence, and planning one.

A live experiment (``models.experiment``) assigns each subscriber to the current or the challenger
model by a stable hash with probability ``S`` of the challenger. Each decision whose label window
has closed gives a reward ``Y = label × (V(product after m) − cost(m))`` (the label rule and reward
of ``training.labels``); a decision whose window is still open is *pending*, never counted as churn.

**The estimator.** Decisions are taken in time order. With ``Z = 1`` for the challenger arm, the
augmented inverse-propensity term of decision ``i`` is::

    ψ_i = (μ̂₁ − μ̂₀) + Z_i (Y_i − μ̂₁) / S − (1 − Z_i)(Y_i − μ̂₀) / (1 − S)

where ``μ̂₁`` and ``μ̂₀`` are the arms' mean rewards over decisions *before* ``i`` (predictable), so
``E[ψ_i | past] = μ_challenger − μ_current`` exactly, and the variance approaches that of a
difference of means without being blown up by the rewards' scale.

**The confidence sequence.** The running mean ``ψ̄_t`` with the two-sided normal-mixture boundary of
the asymptotic confidence sequences of Waudby-Smith, Arnold, Wu and Ramdas, "Time-uniform central
limit theory and asymptotic confidence sequences", Annals of Statistics 52(6), 2024 (Theorem 2.2)::

    ψ̄_t ± σ̂_t · sqrt( 2 (t ρ² + 1) / (t² ρ²) · log( sqrt(t ρ² + 1) / α ) )

with ``σ̂_t`` the running standard deviation of the ψ's (counted by subscriber, cluster-robust: a
subscriber's decisions share an arm and an outcome; see :func:`confidence_sequence`) and ``ρ² = (−2 log α + log(−2 log α + 1)) / t*``,
which makes the sequence tightest near ``t*`` decisions (any ``t*`` keeps it valid). Unlike a z-test
read every day, the whole sequence covers the true difference with probability ``1 − α``
(asymptotically), however often and whenever it is read; so stopping as soon as it excludes zero
is allowed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retention import VerbParser, time_ms

DAY_MS = 86_400_000
MIN_PER_ARM = 30  # below this the running variance is too rough for the asymptotic boundary


# ---- the confidence sequence -------------------------------------------------------------------
def rho_squared(alpha: float, t_star: float) -> float:
    """Return the mixture parameter ρ² that makes the boundary tightest at ``t_star`` observations."""
    la = -2.0 * math.log(alpha)
    return (la + math.log(la + 1.0)) / max(float(t_star), 1.0)


def boundary(t: np.ndarray | float, alpha: float, t_star: float) -> np.ndarray:
    """Return the half-width of the confidence sequence per unit standard deviation at ``t`` observations.

    ``t``: counts (>= 1); ``alpha``: 1 − confidence level, in (0, 1). Shape follows ``t``.
    """
    r2 = rho_squared(alpha, t_star)
    tt = np.asarray(t, dtype=np.float64)
    a = tt * r2 + 1.0
    return np.sqrt(2.0 * a / (tt * tt * r2) * np.log(np.sqrt(a) / alpha))


def aipw_terms(challenger: np.ndarray, rewards: np.ndarray, share: float | np.ndarray) -> np.ndarray:
    """Return the (n,) predictable AIPW terms ψ_i (see the module docstring), in the order given.

    ``challenger``: (n,) bool, True for the challenger arm; ``rewards``: (n,) float, the realized
    value of each decision; ``share``: the challenger arm's assignment probability S in (0, 1), one
    for all or (n,) per decision (when the share changed during the experiment).
    Before an arm has any decision its predictable mean is 0 (the pooled prior is not needed:
    the term stays unbiased whatever the plug-in).
    """
    z = np.asarray(challenger, dtype=bool)
    y = np.asarray(rewards, dtype=np.float64)
    n = y.shape[0]
    # running means of each arm over the decisions strictly before i
    s1 = np.concatenate([[0.0], np.cumsum(np.where(z, y, 0.0))[:-1]]) if n else np.zeros(0)
    n1 = np.concatenate([[0.0], np.cumsum(z)[:-1]]) if n else np.zeros(0)
    s0 = np.concatenate([[0.0], np.cumsum(np.where(z, 0.0, y))[:-1]]) if n else np.zeros(0)
    n0 = np.concatenate([[0.0], np.cumsum(~z)[:-1]]) if n else np.zeros(0)
    m1 = np.divide(s1, n1, out=np.zeros(n), where=n1 > 0)
    m0 = np.divide(s0, n0, out=np.zeros(n), where=n0 > 0)
    s = np.broadcast_to(np.asarray(share, dtype=np.float64), (n,))
    return (m1 - m0) + np.where(z, (y - m1) / s, -(y - m0) / (1.0 - s))


@dataclass(frozen=True)
class SequenceState:
    """The confidence sequence after ``n`` terms: estimate, interval, running sd (value per request)."""

    n: int
    estimate: float
    lower: float
    upper: float
    sd: float


def confidence_sequence(
    psi: np.ndarray, alpha: float, t_star: float, looks: np.ndarray | None = None, groups: np.ndarray | None = None,
) -> list[SequenceState]:
    """Return the sequence's state after each count in ``looks`` (default: only after all ``psi``).

    ``psi``: (n,) terms in time order; ``alpha``: 1 − level; ``t_star``: where it is tightest.
    ``groups``: (n,) the subscriber of each term, or None when every term is its own. A subscriber's
    decisions share an arm and, within a label window, an outcome, so they are not independent: the
    sd is then the cluster-robust one, ``sqrt(Σ_g (Σ_{i∈g} (ψ_i − ψ̄))² / t · G/(G−1))`` over the G
    subscribers of the first t terms (Liang & Zeger 1986), which equals the plain sd when no
    subscriber repeats and grows with repeat visits that move together.
    """
    x = np.asarray(psi, dtype=np.float64)
    n = x.shape[0]
    if looks is None:
        looks = np.array([n])
    c1 = np.cumsum(x)
    c2 = np.cumsum(x * x)
    codes = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    if codes is not None and codes.shape[0] != n:
        raise ValueError(f"groups has {codes.shape[0]} entries for {n} terms")
    out = []
    for t in np.asarray(looks, dtype=np.int64):
        if t < 2 or t > n:
            raise ValueError(f"a look at {t} terms needs 2 <= t <= {n}")
        mean = c1[t - 1] / t
        if codes is None:
            var = max(c2[t - 1] / t - mean * mean, 0.0) * t / (t - 1)
        else:
            sums = np.bincount(codes[:t], weights=x[:t] - mean)
            g = int(np.count_nonzero(np.bincount(codes[:t])))
            var = float(sums @ sums) / t * (g / (g - 1) if g > 1 else math.inf)
        sd = math.sqrt(var)
        hw = sd * float(boundary(t, alpha, t_star))
        out.append(SequenceState(int(t), float(mean), float(mean - hw), float(mean + hw), sd))
    return out


def terms_needed(sd: float, half_width: float, alpha: float, t_star: float, start: int = 2) -> int | None:
    """Return the smallest count ``t >= start`` whose half-width is at most ``half_width``, or None past 10**10."""
    if half_width <= 0 or not math.isfinite(sd):
        return None
    if sd == 0:
        return start
    lo, hi = max(start, 2), max(start, 2)
    while sd * float(boundary(hi, alpha, t_star)) > half_width:
        lo, hi = hi, hi * 2
        if hi > 10**10:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if sd * float(boundary(mid, alpha, t_star)) <= half_width:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---- status ------------------------------------------------------------------------------------
@dataclass
class ArmSummary:
    """One arm: decisions logged, labelled, pending (window open), censored, Apple's choices (left out),
    the model versions that chose, and the mean value per request over the labelled decisions."""

    arm: str
    decisions: int
    labelled: int
    pending: int
    censored: int
    apple_choice: int
    value_per_request: float | None
    versions: list[str]


@dataclass
class ExperimentStatus:
    """What ``retention experiment status`` prints (values in the catalog's currency per request)."""

    experiment_id: str
    challenger: str
    current: str | None
    share: float
    active: bool
    level: float
    arms: list[ArmSummary]
    difference: float | None
    lower: float | None
    upper: float | None
    probability_challenger_better: float | None
    decision: str  # continue | challenger wins | current wins | no difference worth the wait
    reason: str
    decisions_per_day: float | None
    days_to_decision: float | None
    horizon_days: float

    def as_dict(self) -> dict[str, Any]:
        """Return the status as plain JSON-able values."""
        return asdict(self)


def decide(
    state: SequenceState | None, *, min_difference: float, alpha: float, t_star: float,
    decisions_per_day: float | None, max_days: float,
) -> tuple[str, str, float | None]:
    """Return (decision, reason, days to a decision at this traffic or None) for the sequence's state."""
    if state is None:
        return "continue", f"fewer than {MIN_PER_ARM} labelled decisions in an arm", None
    if state.lower > 0:
        return "challenger wins", "the confidence sequence lies above zero", 0.0
    if state.upper < 0:
        return "current wins", "the confidence sequence lies below zero", 0.0
    if -min_difference < state.lower and state.upper < min_difference:
        return ("no difference worth the wait",
                f"the confidence sequence lies within ±{min_difference:g} (--min-difference)", 0.0)
    d = abs(state.estimate)
    targets = [d] if d > 0 else []
    if d < min_difference:
        targets.append(min_difference - d)
    needed = [terms_needed(state.sd, h, alpha, t_star, state.n) for h in targets]
    finite = [x for x in needed if x is not None]
    days = None
    if finite and decisions_per_day and decisions_per_day > 0:
        days = max(min(finite) - state.n, 0) / decisions_per_day
    if days is not None and days > max_days:
        return ("no difference worth the wait",
                f"at the observed difference a decision needs about {days:.0f} more days (> --max-days {max_days:g})", days)
    return "continue", "the confidence sequence still contains zero", days


def experiment_status(
    decisions: Any,
    outcomes: Any,
    catalog: Any,
    *,
    experiment_id: str,
    challenger: str | None = None,
    share: float | None = None,
    current: str | None = None,
    active: bool = True,
    level: float = 0.95,
    horizon_ms: int = 30 * DAY_MS,
    as_of_ms: int | None = None,
    min_difference: float = 0.0,
    max_days: float = 90.0,
    t_star: float = 10_000.0,
) -> ExperimentStatus:
    """Return the experiment's status from logged decisions and outcome events.

    ``decisions``: a pandas DataFrame with the decision-file columns and either ``experiment_id``, ``arm``
    (and ``challenger_share``) columns or the server's ``policy_params`` (rows of other experiments are
    ignored); ``outcomes``: the outcome events (``original_transaction_id``, ``event``, ``at`` ms, and the
    offer columns when known); ``catalog``: the catalog the decisions were served with (values, costs and
    offer identifiers). The challenger version and share default to what the decisions logged. Labels
    follow ``training.labels`` with ``mature_only``: a decision whose window has not closed is pending.
    Decisions whose message Apple chose (policy ``apple_fallback``, or an Apple-chosen offer redeemed
    after them) are counted per arm and left out of the comparison, as in training and evaluation.
    Raises ValueError when no decision belongs to the experiment.
    """
    import pandas as pd

    from training.labels import apple_choice, label_decisions, reward

    decisions = with_experiment_columns(decisions)
    d = decisions[decisions["experiment_id"].astype("str") == experiment_id]
    if d.empty:
        raise ValueError(f"no decision was logged for experiment {experiment_id!r}")
    d = d.sort_values("signed_date", kind="stable").reset_index(drop=True)
    # what the decisions logged wins over what the caller (the registry's file) says
    if "challenger_version" in d.columns:
        logged = d["challenger_version"].dropna()
        challenger = str(logged.iloc[-1]) if len(logged) else challenger
    logged_shares = (pd.to_numeric(d["challenger_share"], errors="coerce") if "challenger_share" in d.columns
                     else pd.Series(np.nan, index=d.index))
    finite = logged_shares.dropna()
    share = float(finite.iloc[-1]) if len(finite) else share
    if share is None:
        raise ValueError(f"experiment {experiment_id!r}: the decisions carry no challenger share")
    labels, _ = label_decisions(d, outcomes, horizon_ms=horizon_ms, as_of_ms=as_of_ms, mature_only=True)
    if as_of_ms is None:
        as_of_ms = int(outcomes["at"].max()) if len(outcomes) else int(d["signed_date"].max())
    offers = {mid: m.offerIdentifier for mid, m in catalog.messages.items() if getattr(m, "offerIdentifier", None)}
    apple, _ = apple_choice(d, outcomes, offers)
    window_open = d["signed_date"].to_numpy(np.int64) + horizon_ms > as_of_ms
    values_after = np.array([_value_after(catalog, m, p) for m, p in zip(d["message_id"], d["product_id"], strict=True)])
    y = reward(labels.to_numpy(), values_after)
    y[apple] = np.nan
    arm = d["arm"].astype("str").to_numpy()
    z = arm == "challenger"
    ok = np.isfinite(y)
    versions = d["model_version"].astype("str").to_numpy() if "model_version" in d.columns else np.array([""] * len(d))
    policy = d["policy"].astype("str").to_numpy() if "policy" in d.columns else np.array([""] * len(d))
    arms = []
    for name, mask in (("current", ~z), ("challenger", z)):
        lab = mask & ok
        chose = mask & ~apple & ~np.char.startswith(policy.astype(str), "fallback:")
        arms.append(ArmSummary(
            arm=name, decisions=int(mask.sum()), labelled=int(lab.sum()),
            pending=int((mask & ~ok & ~apple & window_open).sum()),
            censored=int((mask & ~ok & ~apple & ~window_open).sum()), apple_choice=int((mask & apple).sum()),
            value_per_request=float(y[lab].mean()) if lab.any() else None,
            versions=sorted(set(versions[chose].tolist()) - {"None", "nan", ""}),
        ))
    alpha = 1.0 - level
    state = None
    if arms[0].labelled >= MIN_PER_ARM and arms[1].labelled >= MIN_PER_ARM:
        shares = logged_shares.fillna(share).to_numpy(np.float64)
        psi = aipw_terms(z[ok], y[ok], shares[ok])
        subscribers = d["original_transaction_id"].astype("str").to_numpy()[ok]
        state = confidence_sequence(psi, alpha, t_star, groups=subscribers)[0]
    t = d["signed_date"].to_numpy(np.int64)
    span_days = max((int(t.max()) - int(t.min())) / DAY_MS, 1.0)
    per_day = len(d) / span_days
    decision, reason, days = decide(state, min_difference=min_difference, alpha=alpha, t_star=t_star,
                                    decisions_per_day=per_day if active else None, max_days=max_days)
    p_better = None
    if state is not None and state.sd > 0:
        p_better = 0.5 * math.erfc(-state.estimate / (state.sd / math.sqrt(state.n)) / math.sqrt(2.0))
    current_versions = arms[0].versions
    return ExperimentStatus(
        experiment_id=experiment_id, challenger=challenger or "?",
        current=current or (", ".join(current_versions) if current_versions else None), share=share, active=active,
        level=level, arms=arms,
        difference=state.estimate if state else None, lower=state.lower if state else None,
        upper=state.upper if state else None, probability_challenger_better=p_better, decision=decision,
        reason=reason, decisions_per_day=per_day, days_to_decision=days, horizon_days=horizon_ms / DAY_MS,
    )


def with_experiment_columns(decisions: Any) -> Any:
    """Return the decisions with ``experiment_id`` and ``arm`` columns (None outside an experiment).

    The server logs both in each decision's ``policy_params`` (a dict, or JSON text in an export); files
    that already carry the columns are returned as they are.
    """
    import json

    if "experiment_id" in decisions.columns and "arm" in decisions.columns:
        return decisions
    if "policy_params" not in decisions.columns:
        raise ValueError("the decisions carry neither experiment columns (experiment_id, arm) nor policy_params")

    def params(v: Any) -> dict[str, Any]:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                return {}
        return v if isinstance(v, dict) else {}

    p = [params(v) for v in decisions["policy_params"]]
    out = decisions.copy()
    out["experiment_id"] = [d.get("experiment_id") for d in p]
    out["arm"] = [d.get("arm") for d in p]
    out["challenger_share"] = [d.get("challenger_share") for d in p]
    out["challenger_version"] = [d.get("challenger_version") for d in p]
    return out


def _value_after(catalog: Any, message_id: Any, product_id: Any) -> float:
    if message_id is None or (isinstance(message_id, float) and math.isnan(message_id)):
        return 0.0
    msg = catalog.messages.get(str(message_id))
    if msg is None:
        return math.nan  # a message the catalog no longer has: its value is unknown, leave the decision out
    return float(catalog.value_after(msg, str(product_id)))


def format_status(s: ExperimentStatus) -> str:
    """Return the status as the lines the CLI prints."""
    lines = [f"experiment {s.experiment_id} ({'running' if s.active else 'stopped'}): challenger {s.challenger} on "
             f"{s.share:.0%} of subscribers" + (f", current {s.current}" if s.current else "")]
    lines.append(f"{'arm':<11} {'decisions':>9} {'labelled':>9} {'pending':>8} {'censored':>8} {'Apple chose':>11} "
                 f"{'value/request':>13}  model versions")
    for a in s.arms:
        v = "-" if a.value_per_request is None else f"{a.value_per_request:.4f}"
        lines.append(f"{a.arm:<11} {a.decisions:>9} {a.labelled:>9} {a.pending:>8} {a.censored:>8} {a.apple_choice:>11} "
                     f"{v:>13}  {', '.join(a.versions) or '-'}")
    if s.difference is not None:
        lines.append(f"difference (challenger - current): {s.difference:+.4f} per request; "
                     f"{s.level:.0%} anytime-valid confidence sequence [{s.lower:+.4f}, {s.upper:+.4f}]")
        lines.append("  (asymptotic confidence sequence, Waudby-Smith et al. 2024: valid however often it is read)")
    if s.probability_challenger_better is not None:
        lines.append(f"probability the challenger is better: {s.probability_challenger_better:.1%} "
                     "(normal approximation, flat prior; informative, not anytime-valid)")
    lines.append(f"decision: {s.decision} ({s.reason})")
    if s.decision == "continue" and s.days_to_decision is not None and s.active:
        lines.append(f"expected time to a decision at {s.decisions_per_day:.0f} decisions/day: about "
                     f"{s.days_to_decision:.0f} days of traffic, plus {s.horizon_days:g} days for their labels to close")
    return "\n".join(lines)


# ---- planning ----------------------------------------------------------------------------------
@dataclass
class Plan:
    """How long an experiment needs to detect a lift in save rate (counts are decisions, all arms)."""

    baseline_rate: float
    lift: float
    share: float
    level: float
    power: float
    sd: float
    decisions_median: int | None
    decisions_power: int | None
    decisions_fixed: int
    traffic_per_day: float
    horizon_days: float


def plan_experiment(
    baseline_rate: float, lift: float, traffic_per_day: float, *, share: float = 0.5, level: float = 0.95,
    power: float = 0.8, horizon_days: float = 30.0, t_star: float | None = None,
) -> Plan:
    """Return the decisions needed to detect a save-rate ``lift`` over ``baseline_rate``.

    Per decision the AIPW term's standard deviation is ``σ = sqrt(p₁(1−p₁)/S + p₀(1−p₀)/(1−S))`` with
    ``p₀`` the baseline rate and ``p₁ = p₀ + lift``. ``decisions_median``: the count at which the
    sequence's half-width equals the lift (a true lift is then detected about half the time, having
    had every earlier chance). ``decisions_power``: the count at which ``lift − half-width ≥ z_power·σ/√n``
    (detected with probability ``power``). ``decisions_fixed``: a fixed-horizon two-sided z-test read once,
    ``(z_{1−α/2} + z_power)² σ² / lift²``, for comparison. Raises ValueError on rates outside (0, 1).
    """
    from statistics import NormalDist

    if not (0.0 < baseline_rate < 1.0):
        raise ValueError(f"--baseline-rate {baseline_rate!r}: a save rate strictly between 0 and 1 (e.g. 0.017)")
    p1 = baseline_rate + lift
    if not abs(lift) >= 1e-5 or not (0.0 < p1 < 1.0):
        raise ValueError(f"--lift {lift!r}: a change of the save rate of at least 0.00001 (0.001 points) that keeps "
                         "it in (0, 1) (e.g. 0.014)")
    if traffic_per_day <= 0:
        raise ValueError(f"--traffic {traffic_per_day!r}: decisions per day must be positive")
    if not (0.0 < share < 1.0):
        raise ValueError(f"--share {share!r}: must be strictly between 0 and 1")
    alpha = 1.0 - level
    sd = math.sqrt(p1 * (1 - p1) / share + baseline_rate * (1 - baseline_rate) / (1 - share))
    d = abs(lift)
    z_p = NormalDist().inv_cdf(power)
    z_a = NormalDist().inv_cdf(1 - alpha / 2)
    fixed = math.ceil((z_a + z_p) ** 2 * sd * sd / (d * d))
    ts = float(t_star) if t_star else float(fixed)
    median = terms_needed(sd, d, alpha, ts)
    n, hi = 2, 2
    while hi < 10**10 and d - sd * float(boundary(hi, alpha, ts)) < z_p * sd / math.sqrt(hi):
        n, hi = hi, hi * 2
    if hi >= 10**10:
        powered = None
    else:
        lo = n
        while lo < hi:
            mid = (lo + hi) // 2
            if d - sd * float(boundary(mid, alpha, ts)) >= z_p * sd / math.sqrt(mid):
                hi = mid
            else:
                lo = mid + 1
        powered = lo
    return Plan(baseline_rate, lift, share, level, power, sd, median, powered, fixed, traffic_per_day, horizon_days)


def format_plan(p: Plan) -> str:
    """Return the plan with its arithmetic, as the CLI prints it."""
    p1 = p.baseline_rate + p.lift

    def days(n: int | None) -> str:
        return "never (over 10^10 decisions)" if n is None else f"{n:,} decisions = {n / p.traffic_per_day:,.1f} days"

    return "\n".join([
        f"baseline save rate p0 = {p.baseline_rate:.4f}, lift {p.lift:+.4f} -> p1 = {p1:.4f}; "
        f"challenger share S = {p.share:g}; level {p.level:.0%}",
        "per-decision sd of the difference estimate: sigma = sqrt(p1(1-p1)/S + p0(1-p0)/(1-S))",
        f"  = sqrt({p1:.4f}*{1 - p1:.4f}/{p.share:g} + {p.baseline_rate:.4f}*{1 - p.baseline_rate:.4f}/{1 - p.share:g})"
        f" = {p.sd:.4f}",
        "anytime-valid confidence sequence (Waudby-Smith et al. 2024), read as often as you like:",
        f"  half-width = lift, a true lift found about half the time by then: {days(p.decisions_median)}",
        f"  a true lift found with probability {p.power:.0%} by then:                {days(p.decisions_power)}",
        "fixed-horizon z-test read exactly once at the end, (z_(1-alpha/2) + z_power)^2 sigma^2 / lift^2:",
        f"  {days(p.decisions_fixed)}",
        f"at {p.traffic_per_day:,.0f} decisions/day; add {p.horizon_days:g} days for the last decisions' labels to close",
    ])


# ---- the command line --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="retention experiment", description="Run a challenger model on live traffic and "
                                "decide it with an anytime-valid confidence sequence.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def registry(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--registry", default=None, help="model registry folder (default: $RETENTION_MODEL, else "
                        "the checkout's models/registry)")

    s = sub.add_parser("start", help="start an experiment: the servers pick it up within their reload interval")
    registry(s)
    s.add_argument("--challenger", required=True, help="model version to serve to the challenger arm ('latest' allowed)")
    s.add_argument("--share", type=float, default=0.5, help="share of subscribers in the challenger arm (default 0.5)")
    s.add_argument("--id", dest="experiment_id", default=None, help="experiment id (default: exp-<UTC time>)")
    s = sub.add_parser("share", help="change the challenger share of the running experiment")
    registry(s)
    s.add_argument("share", type=float)
    s = sub.add_parser("stop", help="stop the experiment: every subscriber gets the current model again")
    registry(s)
    for name in ("status", "promote"):
        s = sub.add_parser(name, help="print the experiment's status" if name == "status" else
                           "promote the challenger once the confidence sequence lies above zero")
        registry(s)
        src = s.add_argument_group("data (the server's log folder, or exported files)")
        src.add_argument("--data-dir", default=None, help="the server's data folder (default: $RETENTION_DATA_DIR or ./data)")
        src.add_argument("--decisions", type=Path, help="exported decisions file instead of --data-dir")
        src.add_argument("--outcomes", type=Path, help="exported outcomes file (with --decisions)")
        s.add_argument("--catalog", default=None, help="catalog JSON (default: $RETENTION_CATALOG, else the demo catalog)")
        s.add_argument("--experiment", default=None, help="experiment id (default: the registry's experiment)")
        s.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
        s.add_argument("--horizon-days", type=float, default=30.0, help="label horizon in days (default 30)")
        s.add_argument("--as-of", type=time_ms, default=None,
                       help="as of this time (ms since 1970 or ISO 8601, e.g. 2026-02-01); default: newest event")
        s.add_argument("--min-difference", type=float, default=0.0, help="smallest difference in value per request "
                       "worth acting on; a sequence inside ± this ends the experiment (default 0)")
        s.add_argument("--max-days", type=float, default=90.0, help="longest wait worth it (default 90 days)")
        s.add_argument("--json", action="store_true", help="print the status as JSON")
    s = sub.add_parser("plan", help="how long to run an experiment, with the arithmetic")
    s.add_argument("--baseline-rate", type=float, required=True, help="save rate now, as a fraction (e.g. 0.017)")
    s.add_argument("--lift", type=float, required=True, help="change of save rate to detect, as a fraction "
                   "(Apple's published averages: 0.014 for messages, 0.055 for promotional offers)")
    s.add_argument("--traffic", required=True, help="decisions per day (N or N/day)")
    s.add_argument("--share", type=float, default=0.5, help="challenger share (default 0.5)")
    s.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    s.add_argument("--power", type=float, default=0.8, help="chance of detecting the lift (default 0.8)")
    s.add_argument("--horizon-days", type=float, default=30.0, help="label horizon in days (default 30)")
    return p


def _registry(args: argparse.Namespace) -> Any:
    from models.registry import Registry, registry_spec

    registry, _ = Registry.parse(registry_spec(args.registry))
    if not Path(registry.root).is_dir():
        raise ValueError(f"model registry {registry.root} does not exist")
    return registry


class UsageError(ValueError):
    """A flag's value is out of range: a usage error (one line, exit status 2)."""


def _fraction(name: str, value: float) -> None:
    if not (0.0 < value < 1.0):
        raise UsageError(f"{name} {value!r}: a fraction strictly between 0 and 1 (e.g. 0.95)")


MIN_SHARE = 0.001  # a challenger share below 0.1% would take years to say anything; above 99.9%, the same for the current


def _share(name: str, value: float) -> None:
    """Refuse a challenger share outside [0.001, 0.999] (UsageError, one line)."""
    if not (MIN_SHARE <= value <= 1 - MIN_SHARE):
        raise UsageError(f"{name} {value!r}: a share from {MIN_SHARE:g} to {1 - MIN_SHARE:g} (e.g. 0.5)")


def _traffic(text: str) -> float:
    raw = str(text).strip()
    number = raw.removesuffix("/day").strip()
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"--traffic {raw!r}: decisions per day, as N or N/day (e.g. 1000/day)") from None
    if not 1 <= value <= 1e9:
        raise UsageError(f"--traffic {raw!r}: decisions per day, from 1 to 1,000,000,000")
    return value


def _load_data(args: argparse.Namespace) -> tuple[Any, Any]:
    import os


    if args.decisions is not None:
        from training.data_io import read_decisions, read_outcomes

        if args.outcomes is None:
            raise ValueError("--decisions needs --outcomes")
        return read_decisions(args.decisions), read_outcomes(args.outcomes)
    from serving.log_reader import decisions_frame, log_files, outcomes_frame

    data_dir = args.data_dir or os.environ.get("RETENTION_DATA_DIR") or "data"
    files = log_files(data_dir)
    if not files:
        raise ValueError(f"no decision log files in {data_dir} (decisions-*.sqlite); give --data-dir or --decisions")
    return decisions_frame(files), outcomes_frame(files)


def _stop(registry: Any, exp: Any) -> None:
    from models.experiment import Experiment, write_experiment

    write_experiment(registry.root, Experiment(exp.experiment_id, exp.challenger, exp.share, False, exp.started_at_ms))


def main(argv: list[str]) -> int:
    """Run ``retention experiment``; bad input is one line on stderr and a non-zero exit."""
    import os

    from models.registry import RegistryError

    args = _parser().parse_args(argv)
    try:
        if args.cmd == "plan":
            _fraction("--level", args.level)
            _fraction("--power", args.power)
            _share("--share", args.share)
            if not 0 < args.horizon_days <= 3650:
                raise UsageError(f"--horizon-days {args.horizon_days!r}: must be above 0 and at most 3650")
            traffic = _traffic(args.traffic)
            try:
                plan = plan_experiment(args.baseline_rate, args.lift, traffic, share=args.share, level=args.level,
                                       power=args.power, horizon_days=args.horizon_days)
            except ValueError as exc:  # its checks name the flags
                raise UsageError(str(exc)) from None
            print(format_plan(plan))
            return 0
        from models.experiment import EXPERIMENT_FILE, Experiment, ExperimentError, read_experiment, write_experiment

        registry = _registry(args)
        if args.cmd == "stop":
            try:
                exp = read_experiment(registry.root)
            except ExperimentError as exc:
                # an unreadable file cannot be stopped in place: set it aside, so every server drops it
                path = Path(registry.root) / EXPERIMENT_FILE
                aside = path.with_name(f"{EXPERIMENT_FILE}.unreadable-{int(time.time() * 1000)}")
                os.replace(path, aside)
                print(f"set the unreadable experiment file aside as {aside} ({exc}); every subscriber gets the "
                      "current model")
                return 0
            if exp is None:
                raise ValueError(f"model registry {registry.root} has no experiment")
            if not exp.active:
                print(f"experiment {exp.experiment_id} was already stopped")
                return 0
            _stop(registry, exp)
            print(f"stopped experiment {exp.experiment_id}: every subscriber gets the current model")
            return 0
        if args.cmd in ("start", "share"):  # a bad value is said first, whatever the registry holds
            _share("--share" if args.cmd == "start" else "share", args.share)
        exp = read_experiment(registry.root)
        if args.cmd == "start":
            if exp is not None and exp.active:
                raise ValueError(f"experiment {exp.experiment_id} is running; stop it first (retention experiment stop)")
            current = registry.current()
            if current is None:
                raise ValueError(f"model registry {registry.root} has no current version: promote one first "
                                 "(retention models promote VERSION)")
            try:
                version = registry.resolve(args.challenger)
                registry.manifest(version)
            except RegistryError as exc:
                raise ValueError(f"--challenger {args.challenger}: {exc}") from None
            if version == current:
                raise ValueError(f"{version} is the current version: a challenger must differ from it")
            eid = args.experiment_id or time.strftime("exp-%Y%m%dT%H%M%SZ", time.gmtime())
            if exp is not None and exp.experiment_id == eid:
                raise ValueError(f"experiment {eid} ran before (now stopped): give a new --id, so that its decisions "
                                 "are not mixed with the old ones")
            new = Experiment(eid, version, args.share, True, int(time.time() * 1000))
            write_experiment(registry.root, new)
            print(f"started experiment {eid}: challenger {version} on {args.share:.0%} of subscribers "
                  f"(servers pick it up within their reload interval)")
            return 0
        if args.cmd == "share":
            if exp is None:
                raise ValueError(f"model registry {registry.root} has no experiment (retention experiment start)")
            if not exp.active:
                raise ValueError(f"experiment {exp.experiment_id} is stopped")
            write_experiment(registry.root, Experiment(exp.experiment_id, exp.challenger, args.share, True,
                                                       exp.started_at_ms))
            print(f"experiment {exp.experiment_id}: challenger share now {args.share:.1%}")
            return 0
        # status and promote
        _fraction("--level", args.level)
        if not args.horizon_days > 0:
            raise UsageError(f"--horizon-days {args.horizon_days!r}: must be positive")
        from models.catalog import Catalog

        catalog_path = args.catalog or os.environ.get("RETENTION_CATALOG")
        if not catalog_path:
            from models.catalog import DEMO_CATALOG

            catalog_path = str(DEMO_CATALOG)
        catalog = Catalog.load(catalog_path)
        eid = args.experiment or (exp.experiment_id if exp is not None else None)
        if eid is None:
            raise ValueError(f"model registry {registry.root} has no experiment: name one with --experiment ID")
        registry_exp = exp if exp is not None and exp.experiment_id == eid else None
        decisions, outcomes = _load_data(args)
        status = experiment_status(
            decisions, outcomes, catalog, experiment_id=eid,
            challenger=registry_exp.challenger if registry_exp else None,
            share=registry_exp.share if registry_exp else None,
            active=registry_exp is not None and registry_exp.active, level=args.level,
            horizon_ms=int(args.horizon_days * DAY_MS), as_of_ms=args.as_of, min_difference=args.min_difference,
            max_days=args.max_days,
        )
        if args.json:
            import json

            print(json.dumps(status.as_dict(), indent=2))
        else:
            print(format_status(status))
        if args.cmd == "status":
            return 0
        if registry_exp is None:
            raise ValueError(f"not promoted: experiment {eid} is not the registry's experiment "
                             f"({exp.experiment_id if exp else 'none'}); promote a version by hand with "
                             "retention models promote VERSION")
        if not registry_exp.active:
            raise ValueError(f"not promoted: experiment {eid} is stopped")
        if status.decision != "challenger wins":
            raise ValueError(f"not promoted: {status.decision} ({status.reason})")
        if status.challenger != registry_exp.challenger:
            raise ValueError(f"not promoted: the decisions name challenger {status.challenger}, the registry's "
                             f"experiment {registry_exp.challenger}")
        registry.promote(registry_exp.challenger)
        _stop(registry, registry_exp)
        print(f"promoted {registry_exp.challenger} to current and stopped experiment {eid}")
        return 0
    except UsageError as exc:
        print(f"retention experiment {args.cmd}: error: {exc} (see retention experiment {args.cmd} --help)",
              file=sys.stderr)
        return 2
    except (ValueError, RegistryError) as exc:  # an OSError reaches the dispatcher: `PATH: reason`, or cannot write
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"retention experiment {args.cmd}: error: {text}", file=sys.stderr)
        return 1
