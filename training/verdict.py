"""The verdict on one paired off-policy difference: promote or not, its interval, and what the data can detect.

:func:`judge` reads a :class:`training.ope.Bootstrap` (candidate and reference resampled with the same
subscribers) and returns a :class:`Judgement`: the doubly robust difference per request, its paired interval
at ``level`` (by default the hull of the percentile, BCa and bootstrap-t intervals), and the *minimum detectable
difference* (MDD), the true advantage this data reveals with probability ``power`` (80%):

    MDD = (z_{1−α} + z_{power}) · SE,    α = (1 − level) / 2,    SE = the bootstrap sd of the difference

and, since SE shrinks as 1/√n, the decisions a difference Δ needs: n · (MDD / Δ)². Used by the promotion
gate (:mod:`training.gate`) and by ``retention evaluate``'s report (:mod:`training.evaluate`).
"""

from __future__ import annotations

import dataclasses
from statistics import NormalDist
from typing import Any

import numpy as np

from training import ope

POWER = 0.8


def z_sum(level: float = 0.9, power: float = POWER) -> float:
    """Return z_{1−α} + z_{power} with α = (1 − level)/2: standard errors between zero and the MDD (2.49 at 0.9, 0.8)."""
    alpha = (1.0 - level) / 2.0
    return NormalDist().inv_cdf(1.0 - alpha) + NormalDist().inv_cdf(power)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The gate's verdict on one paired difference (candidate − reference), per request, in value units."""

    promote: bool
    estimate: float
    ci_low: float
    ci_high: float
    level: float
    se: float  # bootstrap standard deviation of the difference
    mdd: float  # minimum detectable difference at `power`
    power: float
    n: int  # decisions
    clusters: int  # subscribers resampled
    ess: float  # Kish effective sample size of the candidate's importance weights

    def decisions_needed(self, difference: float) -> int:
        """Return about how many decisions (like these) reveal a true advantage of `difference` with this power."""
        if not difference > 0 or not np.isfinite(self.mdd):
            raise ValueError("the difference must be a positive number")
        return int(np.ceil(self.n * (self.mdd / difference) ** 2))

    def to_dict(self) -> dict[str, Any]:
        """Return the verdict as JSON-able data."""
        return dataclasses.asdict(self)


def judge(
    boot: ope.Bootstrap, candidate: str, reference: str, *, level: float = 0.9, power: float = POWER,
    clusters: int | None = None, method: str = "hull",
) -> Judgement:
    """Return the verdict on results `candidate` minus `reference` of one :class:`training.ope.Bootstrap`.

    Promote when the lower bound of the paired interval at `level` is above zero. The interval
    (`method`, one of :data:`training.ope.INTERVALS`) is by default the hull of the percentile, BCa
    and bootstrap-t intervals: its lower bound is the lowest of theirs. Where the difference rests on
    a few rare outcomes under large weights, the percentile bound alone promoted a candidate exactly
    as good as the current one 15% of the time (visitors who were not leaving, the rare outcome a
    leaver), BCa's or the bootstrap-t's alone 5-7% (cancel intents, the rare outcome a stay); the
    lowest of the three at most 4% in every preset, and a candidate whose true advantage is the
    stated MDD 86-93% of the time (bench/bench_gate.py, BENCHMARKS.md).
    """
    a = boot.results[candidate]
    samples = boot.difference_samples(candidate, reference)
    finite = samples[np.isfinite(samples)]
    lo, hi = boot.difference_interval(candidate, reference, level, method)
    se = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    estimate = a.estimate - boot.results[reference].estimate
    return Judgement(
        promote=bool(lo > 0),
        estimate=float(estimate),
        ci_low=lo,
        ci_high=hi,
        level=level,
        se=se,
        mdd=z_sum(level, power) * se,
        power=power,
        n=a.n,
        clusters=a.n if clusters is None else int(clusters),
        ess=a.ess,
    )


def differ_clause(share: float) -> str:
    """Return the qualifier of a "decisions needed" figure: how far the candidate departs from its reference.

    The paired standard error, and with it the MDD, shrinks with the share of requests whose choice
    differs: a candidate that changes 0.5% of the choices needs few decisions to show what little it
    changes, one that changes half of them many more.
    """
    if not np.isfinite(share):
        return ""
    if share == 0:
        return "(this holds for a candidate that makes the same choices on every request, as this one does)"
    pct = f"{share:.1%}" if share >= 0.01 else f"{share:.2%}" if share >= 0.0001 else "under 0.01%"
    return f"(this holds for a candidate whose choices differ on {pct} of the requests, as this one's do)"


def describe(j: Judgement, candidate: str, against: str, reference_value: float | None = None,
             choices_differ: float | None = None) -> str:
    """Return the gate's report: the verdict, its interval, the MDD and the decisions a difference needs.

    `choices_differ`: the share of requests where the candidate's choice differs from `against`'s
    (:func:`training.evaluate.choices_differ`); the figures hold for a candidate that departs as much.
    """
    text = (
        f"DR estimate of {candidate} minus {against}: {j.estimate:+.4f} per request, {j.level:.0%} paired interval "
        f"[{j.ci_low:.4f}, {j.ci_high:.4f}] on {j.n:,} decisions of {j.clusters:,} subscribers"
    )
    mdd = (
        f"with these decisions (effective sample size {j.ess:,.0f} of the candidate's weights) the smallest true "
        f"advantage detected {j.power:.0%} of the time is {j.mdd:.4f} per request"
    )
    if reference_value is not None and reference_value > 0:
        mdd += f" ({j.mdd / reference_value:.1%} of {against}'s value)"
        one_pct = 0.01 * reference_value
        mdd += f"; an advantage of 1% ({one_pct:.4f}) needs about {j.decisions_needed(one_pct):,} decisions"
        if choices_differ is not None:
            mdd += f" {differ_clause(choices_differ)}".rstrip()
    if j.promote:
        return f"promoted: {text}; the lower bound is above zero; {mdd}"
    return f"not promoted: {text}; the lower bound is not above zero, so it is not shown to be better; {mdd}"


def decisions_for_ess(n: int, ess: float, floor: float) -> int:
    """Return about how many decisions like these `n` give an effective sample size of `floor` (it grows as n)."""
    if not ess > 0:
        raise ValueError("the effective sample size must be positive")
    return int(np.ceil(n * floor / ess))
