"""Off-policy estimators of a target policy's value from logged bandit feedback, on numpy arrays.

Notation, for n logged requests with at most K candidate actions each (rows padded to K):

    r_i        observed reward of request i: label × (V(product after a_i) − cost(a_i))   (docs/data-formats.md, "The reward")
    a_i        index of the action (message) the logging policy showed
    μ_i        its logged probability (propensity), 0 < μ_i ≤ 1
    π(a|x_i)   the target policy's probability of action a (a row of ``target_probs``; padding 0)
    w_i        = π(a_i|x_i) / μ_i, the importance weight
    r̂(x_i, a)  a reward model's prediction for action a (``reward_hat``; padding anything finite)

Every estimator here is a ratio of per-request sums, V̂ = Σ_i num_i / Σ_i den_i, which makes the
bootstrap, paired differences and per-segment estimates one piece of code. Confidence intervals
are percentile bootstrap intervals over requests (rows resampled with replacement), seedable.

Support. If the target puts probability on an action the logging policy could not show (μ(a|x) = 0),
no importance-weighted estimator can see that action's reward: IPS and SNIPS silently count it as
zero, DM/DR extrapolate with the reward model. Every result carries ``unsupported_mass``, the mean
over requests of Σ_a π(a|x_i)·1{μ(a|x_i) = 0}, so a caller can report it rather than hide it (NaN
when the logging distribution was not given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_LEVEL = 0.9
DEFAULT_RESAMPLES = 1000

SeedLike = int | np.random.Generator | None


@dataclasses.dataclass(frozen=True)
class OPEResult:
    """One estimator's value of one policy: estimate, bootstrap interval and weight diagnostics."""

    estimator: str
    estimate: float
    ci_low: float
    ci_high: float
    level: float
    n_resamples: int
    ess: float
    n: int
    unsupported_mass: float
    max_weight: float
    # per-request terms: estimate == num.sum() / den.sum(); kept for paired and per-segment estimates
    num: np.ndarray = dataclasses.field(repr=False, compare=False)
    den: np.ndarray = dataclasses.field(repr=False, compare=False)
    weights: np.ndarray = dataclasses.field(repr=False, compare=False)
    unsupported: np.ndarray = dataclasses.field(repr=False, compare=False)  # per request
    details: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def ci(self) -> tuple[float, float]:
        """Return the (low, high) bootstrap confidence interval."""
        return (self.ci_low, self.ci_high)

    @property
    def ess_fraction(self) -> float:
        """Return the effective sample size as a share of n."""
        return self.ess / self.n if self.n else float("nan")

    def restrict(self, mask: np.ndarray) -> OPEResult:
        """Return the same estimator on the requests in `mask` (interval left NaN: bootstrap it anew)."""
        m = np.asarray(mask)
        num, den, w, u = self.num[m], self.den[m], self.weights[m], self.unsupported[m]
        total = float(den.sum())
        return dataclasses.replace(
            self,
            estimate=float(num.sum() / total) if total != 0 else float("nan"),
            ci_low=float("nan"),
            ci_high=float("nan"),
            n_resamples=0,
            ess=effective_sample_size(w),
            n=len(num),
            unsupported_mass=float(u.mean()) if len(u) and np.isfinite(u).all() else (0.0 if not len(u) else float("nan")),
            max_weight=float(w.max()) if len(w) else float("nan"),
            num=num,
            den=den,
            weights=w,
            unsupported=u,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready summary (no per-request arrays)."""
        out: dict[str, Any] = {
            "estimator": self.estimator,
            "estimate": self.estimate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "level": self.level,
            "n_resamples": self.n_resamples,
            "ess": self.ess,
            "n": self.n,
            "unsupported_mass": self.unsupported_mass,
            "max_weight": self.max_weight,
        }
        out.update(self.details)
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}


# ---- validation ------------------------------------------------------------------------------
def _as_inputs(
    rewards: np.ndarray | None,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    logging_probs: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    pi = np.asarray(target_probs, dtype=np.float64)
    if pi.ndim != 2:
        raise ValueError(f"target_probs must be a 2-D array (requests × actions), got shape {pi.shape}")
    n, k = pi.shape
    a = np.asarray(actions)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"actions must be {n} integer indices, got shape {a.shape} dtype {a.dtype}")
    if n and (a.min() < 0 or a.max() >= k):
        raise ValueError(f"actions must index the {k} columns of target_probs")
    mu = np.asarray(propensities, dtype=np.float64)
    if mu.shape != (n,):
        raise ValueError(f"propensities must have shape ({n},), got {mu.shape}")
    if n and not (np.all(mu > 0) and np.all(mu <= 1)):
        raise ValueError("every propensity must be within (0, 1]")
    if n and (not np.isfinite(pi).all() or pi.min() < -1e-12 or np.abs(pi.sum(axis=1) - 1).max() > 1e-6):
        raise ValueError("each row of target_probs must be probabilities summing to 1")
    r = None
    if rewards is not None:
        r = np.asarray(rewards, dtype=np.float64)
        if r.shape != (n,) or not np.isfinite(r).all():
            raise ValueError(f"rewards must be {n} finite numbers")
    mu_all = None
    if logging_probs is not None:
        mu_all = np.asarray(logging_probs, dtype=np.float64)
        if mu_all.shape != (n, k):
            raise ValueError(f"logging_probs must have the shape of target_probs {pi.shape}, got {mu_all.shape}")
    return (r if r is not None else np.zeros(n)), a.astype(np.intp), mu, pi, mu_all


def _reward_hat(reward_hat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    q = np.asarray(reward_hat, dtype=np.float64)
    if q.shape != shape:
        raise ValueError(f"reward_hat must have the shape of target_probs {shape}, got {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("reward_hat must be finite")
    return q


def importance_weights(actions: np.ndarray, propensities: np.ndarray, target_probs: np.ndarray) -> np.ndarray:
    """Return w_i = π(a_i|x_i) / μ_i for each logged request."""
    pi = np.asarray(target_probs, dtype=np.float64)
    a = np.asarray(actions, dtype=np.intp)
    return pi[np.arange(pi.shape[0]), a] / np.asarray(propensities, dtype=np.float64)


def effective_sample_size(weights: np.ndarray) -> float:
    """Return Kish's effective sample size (Σ w)² / Σ w² (n when all weights are equal, 0 when all are 0)."""
    w = np.asarray(weights, dtype=np.float64)
    s2 = float(np.dot(w, w))
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


def unsupported_per_request(target_probs: np.ndarray, logging_probs: np.ndarray | None) -> np.ndarray:
    """Return, per request, the target probability on actions the logging policy gave probability 0 (NaN if unknown)."""
    pi = np.asarray(target_probs, dtype=np.float64)
    if logging_probs is None:
        return np.full(pi.shape[0], np.nan)
    return np.where(np.asarray(logging_probs) <= 0, pi, 0.0).sum(axis=1)


def unsupported_mass(target_probs: np.ndarray, logging_probs: np.ndarray | None) -> float:
    """Return the mean target probability on actions the logging policy gave probability 0 (NaN if unknown)."""
    u = unsupported_per_request(target_probs, logging_probs)
    return float(u.mean()) if u.size else 0.0


# ---- bootstrap ---------------------------------------------------------------------------------
def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def cluster_sums(columns: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Return (G, m) sums of the rows of `columns` (n, m) by cluster label (n,), clusters in order of first appearance."""
    import pandas as pd

    c = np.asarray(columns, dtype=np.float64)
    codes, uniques = pd.factorize(pd.Series(np.asarray(clusters)), sort=False)
    if len(codes) != c.shape[0]:
        raise ValueError(f"clusters must label the {c.shape[0]} rows, got {len(codes)} labels")
    if (codes < 0).any():
        raise ValueError("clusters must not be missing")
    g = len(uniques)
    return np.column_stack([np.bincount(codes, weights=c[:, j], minlength=g) for j in range(c.shape[1])]) \
        if c.shape[1] else np.zeros((g, 0))


def bootstrap_sums(
    columns: np.ndarray, n_resamples: int, seed: SeedLike, chunk: int = 64, clusters: np.ndarray | None = None
) -> np.ndarray:
    """Return (n_resamples, m) column sums of `columns` (n, m) over rows resampled with replacement.

    Counts of each row per resample are built with one bincount per chunk, then a matrix product
    gives every sum, so 1,000 resamples of 100,000 rows take well under a second per column.
    With `clusters` (a label per row, e.g. the subscriber's original_transaction_id), whole
    clusters are resampled (Cameron, Gelbach & Miller 2008; Field & Welsh 2007): rows of one
    subscriber share that subscriber's noise, and resampling them apart understates the variance.
    Every row in its own cluster gives the row bootstrap back, draw for draw.
    """
    c = np.asarray(columns, dtype=np.float64)
    if clusters is not None:
        c = cluster_sums(c, clusters)
    n = c.shape[0]
    rng = _rng(seed)
    out = np.empty((n_resamples, c.shape[1]))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        dtype = np.int32 if b * n < 2**31 else np.int64
        idx = rng.integers(0, n, size=(b, n), dtype=dtype) + (np.arange(b, dtype=dtype) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        out[start : start + b] = counts @ c
    return out


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError("level must be within (0, 1)")
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bca_ci(samples: np.ndarray, estimate: float, influence: np.ndarray, level: float) -> tuple[float, float]:
    """Return the bias-corrected and accelerated (BCa) bootstrap interval (Efron 1987; DiCiccio & Efron 1996).

    `samples` are the bootstrap replicates of the estimate, `influence` its empirical influence
    value per resampled unit (request or cluster; any scale). The percentile interval reads the
    quantiles α and 1 − α of the replicates; BCa reads them at

        Φ(z₀ + (z₀ + z)/(1 − a(z₀ + z))),   z = z_α, z_{1−α},
        z₀ = Φ⁻¹(share of replicates below the estimate, ties counted half),
        a = Σ U³ / (6 (Σ U²)^{3/2})

    which corrects for the skew of an estimate built from a few large terms (importance weights
    near 1/ε on rare outcomes), where the percentile interval misses the truth more often than
    its level says. Degenerate cases (no spread) give the percentile interval.
    """
    from statistics import NormalDist

    if not 0 < level < 1:
        raise ValueError("level must be within (0, 1)")
    s = samples[np.isfinite(samples)]
    if s.size == 0 or not np.isfinite(estimate):
        return float("nan"), float("nan")
    nd = NormalDist()
    below = (np.count_nonzero(s < estimate) + 0.5 * np.count_nonzero(s == estimate)) / s.size
    if not 0.0 < below < 1.0:
        return _percentile_ci(s, level)
    z0 = nd.inv_cdf(below)
    u = np.asarray(influence, dtype=np.float64)
    u = u - u.mean()
    ss = float(np.dot(u, u))
    acc = float((u**3).sum() / (6.0 * ss**1.5)) if ss > 0 else 0.0
    alpha = (1.0 - level) / 2.0
    qs = []
    for z in (nd.inv_cdf(alpha), nd.inv_cdf(1.0 - alpha)):
        denom = 1.0 - acc * (z0 + z)
        qs.append(nd.cdf(z0 + (z0 + z) / denom) if denom > 0 else (0.0 if z < 0 else 1.0))
    lo, hi = np.quantile(s, qs)
    return float(lo), float(hi)


INTERVALS = ("percentile", "bca", "studentized", "hull")
# "hull": from the lowest lower bound of the percentile, BCa and bootstrap-t (studentized) intervals to the
# highest upper bound (the bootstrap-t left out of a paired difference whose two results have different
# denominators, SNIPS's). On estimates that rest on a few large terms each interval misses the truth on one
# side more often than its level says (the percentile one on the side the data showed little of, BCa on the
# other, the bootstrap-t where its per-resample SE rests on a handful of terms); their hull covered where
# each alone did not, and promoted no more often than the hull of the first two (bench/bench_gate.py, BENCHMARKS.md)


#: Bootstrap-t intervals computed per pass over the resamples: each takes 5 columns per resampled unit, so 8
#: bound the pass's memory to 40 columns (about 270 MB for 850,000 subscribers), as much as the estimates' own.
STUDENTIZED_PAIRS_PER_PASS = 8


def _t_interval(theta: float, se: float, t_star: np.ndarray, level: float) -> tuple[float, float]:
    t = t_star[np.isfinite(t_star)]
    if t.size == 0 or not (np.isfinite(theta) and np.isfinite(se)):
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    t_lo, t_hi = np.quantile(t, [alpha, 1.0 - alpha])
    return float(theta - t_hi * se), float(theta - t_lo * se)


def _hull(*intervals: tuple[float, float]) -> tuple[float, float]:
    """Return the smallest interval holding every finite one of `intervals` (the first when none is finite)."""
    finite = [iv for iv in intervals if all(np.isfinite(iv))]
    if not finite:
        return intervals[0]
    return min(lo for lo, _ in finite), max(hi for _, hi in finite)


def ratio_ci(
    num: np.ndarray, den: np.ndarray, *, level: float = DEFAULT_LEVEL, n_resamples: int = DEFAULT_RESAMPLES, seed: SeedLike = 0,
    clusters: np.ndarray | None = None,
) -> tuple[float, float]:
    """Return the percentile bootstrap interval of Σ num / Σ den, resampling requests (or `clusters` of them)."""
    if len(num) == 0 or n_resamples <= 0:
        _percentile_ci(np.empty(0), level)  # validates level
        return float("nan"), float("nan")
    sums = bootstrap_sums(np.column_stack([num, den]), n_resamples, seed, clusters=clusters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _percentile_ci(sums[:, 0] / sums[:, 1], level)


def _result(
    name: str,
    num: np.ndarray,
    den: np.ndarray,
    w: np.ndarray,
    pi: np.ndarray,
    mu_all: np.ndarray | None,
    level: float,
    n_resamples: int,
    seed: SeedLike,
    details: dict[str, float] | None = None,
) -> OPEResult:
    n = len(num)
    unsupported = unsupported_per_request(pi, mu_all)
    total_den = float(den.sum())
    estimate = float(num.sum() / total_den) if total_den != 0 else float("nan")
    lo, hi = ratio_ci(num, den, level=level, n_resamples=n_resamples, seed=seed)
    return OPEResult(
        estimator=name,
        estimate=estimate,
        ci_low=lo,
        ci_high=hi,
        level=level,
        n_resamples=n_resamples,
        ess=effective_sample_size(w),
        n=n,
        unsupported_mass=float(unsupported.mean()) if n else 0.0,
        max_weight=float(w.max()) if n else float("nan"),
        num=num,
        den=den,
        weights=w,
        unsupported=unsupported,
        details=details or {},
    )


# ---- the estimators -----------------------------------------------------------------------------
def ips(
    rewards: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    *,
    logging_probs: np.ndarray | None = None,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> OPEResult:
    """Return the inverse propensity scoring estimate.

        V̂_IPS = (1/n) Σ_i w_i r_i,     w_i = π(a_i|x_i) / μ_i

    Unbiased when μ_i is the true logging probability and π(a|x) > 0 ⇒ μ(a|x) > 0; when the target
    equals the logging policy every w_i = 1 and V̂_IPS is the observed mean reward.
    """
    r, a, mu, pi, mu_all = _as_inputs(rewards, actions, propensities, target_probs, logging_probs)
    w = importance_weights(a, mu, pi)
    return _result("ips", w * r, np.ones_like(w), w, pi, mu_all, level, n_resamples, seed)


def snips(
    rewards: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    *,
    logging_probs: np.ndarray | None = None,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> OPEResult:
    """Return the self-normalized IPS estimate.

        V̂_SNIPS = Σ_i w_i r_i / Σ_i (w_i + u_i),    u_i = Σ_a π(a|x_i)·1{μ(a|x_i) = 0}

    A weighted mean of observed rewards: slightly biased (O(1/n)), bounded by the rewards' range,
    and usually of much lower variance than IPS. NaN when every weight is 0. The expected weight
    of a request is 1 − u_i, so plain Σ w_i r_i / Σ w_i would give the target's unsupported mass the
    supported actions' mean reward (and can then exceed the best achievable value); adding u_i to
    the denominator counts it as zero reward, as IPS does and as the evaluation's warning says.
    u_i is known only with `logging_probs` (else taken as 0). Swaminathan & Joachims (2015), "The
    Self-Normalized Estimator for Counterfactual Learning", NeurIPS.
    """
    r, a, mu, pi, mu_all = _as_inputs(rewards, actions, propensities, target_probs, logging_probs)
    w = importance_weights(a, mu, pi)
    u = np.nan_to_num(unsupported_per_request(pi, mu_all), nan=0.0)
    return _result("snips", w * r, w + u, w, pi, mu_all, level, n_resamples, seed)


def dm(
    rewards: np.ndarray | None,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    reward_hat: np.ndarray,
    *,
    logging_probs: np.ndarray | None = None,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> OPEResult:
    """Return the direct method estimate: the reward model's value of the target policy.

        V̂_DM = (1/n) Σ_i Σ_a π(a|x_i) r̂(x_i, a)

    Low variance, but biased by exactly the reward model's error under π; the bootstrap interval
    covers only the sampling of requests, not that error. Rewards are not used (may be None).
    """
    _r, a, mu, pi, mu_all = _as_inputs(rewards, actions, propensities, target_probs, logging_probs)
    q = _reward_hat(reward_hat, pi.shape)
    w = importance_weights(a, mu, pi)
    num = (pi * q).sum(axis=1)
    return _result("dm", num, np.ones_like(num), w, pi, mu_all, level, n_resamples, seed)


def dr(
    rewards: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    reward_hat: np.ndarray,
    *,
    logging_probs: np.ndarray | None = None,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> OPEResult:
    """Return the doubly robust estimate: the direct method plus an importance-weighted correction.

        V̂_DR = (1/n) Σ_i [ Σ_a π(a|x_i) r̂(x_i, a)  +  w_i (r_i − r̂(x_i, a_i)) ]

    Unbiased when either the propensities or the reward model are right; its variance shrinks as r̂
    improves. On actions the logging policy never shows, only the DM term speaks for them.
    """
    r, a, mu, pi, mu_all = _as_inputs(rewards, actions, propensities, target_probs, logging_probs)
    q = _reward_hat(reward_hat, pi.shape)
    w = importance_weights(a, mu, pi)
    rows = np.arange(len(a))
    num = (pi * q).sum(axis=1) + w * (r - q[rows, a])
    return _result("dr", num, np.ones_like(num), w, pi, mu_all, level, n_resamples, seed)


def _switch_terms(r: np.ndarray, a: np.ndarray, mu: np.ndarray, pi: np.ndarray, q: np.ndarray, tau: float) -> np.ndarray:
    rows = np.arange(len(a))
    w = pi[rows, a] / mu
    return (pi * q).sum(axis=1) + np.where(w <= tau, w * (r - q[rows, a]), 0.0)


def switch_dr(
    rewards: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    reward_hat: np.ndarray,
    *,
    logging_probs: np.ndarray | None = None,
    tau: float | None = None,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> OPEResult:
    """Return the switch doubly robust estimate (Wang, Agarwal & Dudík, 2017).

    With w(x, a) = π(a|x) / μ(a|x) (∞ where μ(a|x) = 0), actions whose weight exceeds τ are left to
    the reward model alone; the others get the DR correction:

        V̂_switch = (1/n) Σ_i [ Σ_a π(a|x_i) r̂(x_i, a)  +  1{w(x_i, a_i) ≤ τ} w_i (r_i − r̂(x_i, a_i)) ]

    τ = ∞ gives DR back. When `tau` is None it is chosen from a grid of weight quantiles to minimise
    the estimated mean squared error, Var̂(terms)/n + (R_max · (1/n) Σ_i Σ_a π(a|x_i) 1{w(x_i,a) > τ})²
    with R_max = max |r_i| (the paper's bias bound). τ is chosen once on the full sample and held
    fixed in the bootstrap. Without `logging_probs` only the logged action's weight is known.
    """
    r, a, mu, pi, mu_all = _as_inputs(rewards, actions, propensities, target_probs, logging_probs)
    q = _reward_hat(reward_hat, pi.shape)
    w = importance_weights(a, mu, pi)
    n = len(a)
    if tau is None:
        tau = _choose_tau(r, a, mu, pi, q, mu_all) if n else float("inf")
    num = _switch_terms(r, a, mu, pi, q, tau)
    return _result("switch-dr", num, np.ones_like(num), w, pi, mu_all, level, n_resamples, seed, {"tau": float(tau)})


def _choose_tau(r: np.ndarray, a: np.ndarray, mu: np.ndarray, pi: np.ndarray, q: np.ndarray, mu_all: np.ndarray | None) -> float:
    n = len(a)
    w = pi[np.arange(n), a] / mu
    r_max = float(np.abs(r).max()) if n else 0.0
    if mu_all is None:
        w_all = np.where(np.arange(pi.shape[1])[None, :] == a[:, None], w[:, None], 0.0)
    else:
        # zero-support actions (weight ∞) are the reward model's at every τ: they add no switching bias
        with np.errstate(divide="ignore", invalid="ignore"):
            w_all = np.where(mu_all > 0, pi / np.where(mu_all > 0, mu_all, 1.0), 0.0)
    positive = w[w > 0]
    grid = np.unique(np.quantile(positive, np.linspace(0.5, 1.0, 26))) if positive.size else np.array([])
    best_tau, best_mse = float("inf"), float("inf")
    for tau in [*grid.tolist(), float("inf")]:
        terms = _switch_terms(r, a, mu, pi, q, tau)
        mass_above = float(np.where(w_all > tau, pi, 0.0).sum(axis=1).mean())
        mse = float(terms.var()) / n + (r_max * mass_above) ** 2
        if mse < best_mse - 1e-15:
            best_tau, best_mse = float(tau), mse
    return best_tau


def observed(
    rewards: np.ndarray, *, level: float = DEFAULT_LEVEL, n_resamples: int = DEFAULT_RESAMPLES, seed: SeedLike = 0
) -> OPEResult:
    """Return the logging policy's own value: the observed mean reward (1/n) Σ_i r_i, with its interval."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or not np.isfinite(r).all():
        raise ValueError("rewards must be a 1-D array of finite numbers")
    ones = np.ones_like(r)
    return _result("observed", r, ones, ones, np.ones((len(r), 1)), np.ones((len(r), 1)), level, n_resamples, seed)


ESTIMATORS = ("ips", "snips", "dm", "dr", "switch-dr")


def estimate_all(
    rewards: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    target_probs: np.ndarray,
    reward_hat: np.ndarray | None,
    *,
    logging_probs: np.ndarray | None = None,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
    clusters: np.ndarray | None = None,
) -> dict[str, OPEResult]:
    """Return every estimator's result by name (the model-based ones only when `reward_hat` is given).

    One bootstrap pass serves all of them (see :class:`Bootstrap`), so they resample the same rows
    (whole `clusters` of rows when given: one label per request, e.g. its subscriber).
    """
    kw: dict[str, Any] = {"logging_probs": logging_probs, "level": level, "n_resamples": 0}
    out = {
        "ips": ips(rewards, actions, propensities, target_probs, **kw),
        "snips": snips(rewards, actions, propensities, target_probs, **kw),
    }
    if reward_hat is not None:
        out["dm"] = dm(rewards, actions, propensities, target_probs, reward_hat, **kw)
        out["dr"] = dr(rewards, actions, propensities, target_probs, reward_hat, **kw)
        out["switch-dr"] = switch_dr(rewards, actions, propensities, target_probs, reward_hat, **kw)
    boot = Bootstrap(out, n_resamples=n_resamples, seed=seed, clusters=clusters)
    return {name: boot.with_interval(name, level) for name in out}


# ---- comparisons and segments -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Difference:
    """A paired comparison of two results on the same requests: estimate of A − B and its interval."""

    estimator: str
    estimate: float
    ci_low: float
    ci_high: float
    level: float
    n_resamples: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready summary."""
        return dataclasses.asdict(self)


class Bootstrap:
    """Resampled sums of many results' per-request terms, drawn once for all of them.

    Every interval and paired difference taken from one Bootstrap uses the same resampled
    requests, and the cost (dominated by drawing n × n_resamples indices) is paid once. With
    `clusters` (one label per request) whole clusters are resampled (see :func:`bootstrap_sums`).
    """

    def __init__(
        self, results: dict[str, OPEResult], *, n_resamples: int = DEFAULT_RESAMPLES, seed: SeedLike = 0,
        clusters: np.ndarray | None = None,
    ) -> None:
        sizes = {r.n for r in results.values()}
        if len(sizes) > 1:
            raise ValueError(f"results to bootstrap together must be on the same requests (sizes {sorted(sizes)})")
        self.results = dict(results)
        self.n_resamples = n_resamples
        self._col = {name: 2 * i for i, name in enumerate(self.results)}
        n = sizes.pop() if sizes else 0
        # one integer for every pass over the resamples: a Generator (or None) would draw other resamples for
        # the bootstrap-t than for the other intervals, and other ones again in each call
        self._seed = seed if isinstance(seed, (int, np.integer)) else int(_rng(seed).integers(2**63))
        self._t_cache: dict[tuple[str, str | None, float], tuple[float, float]] = {}
        if n == 0 or n_resamples <= 0 or not self.results:
            self.sums = np.full((0, 2 * len(self.results)), np.nan)
            self.units = np.zeros((0, 2 * len(self.results)))
        else:
            cols = np.column_stack([c for r in self.results.values() for c in (r.num, r.den)])
            # the resampled units: whole clusters when given (the same draws as bootstrap_sums(..., clusters))
            self.units = cluster_sums(cols, clusters) if clusters is not None else cols
            self.sums = bootstrap_sums(self.units, n_resamples, self._seed)

    def samples(self, name: str) -> np.ndarray:
        """Return the bootstrap replicates of result `name`'s estimate."""
        j = self._col[name]
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sums[:, j] / self.sums[:, j + 1]

    def studentized(self, pairs: list[tuple[str, str | None]], level: float = DEFAULT_LEVEL) -> list[tuple[float, float]]:
        """Return the bootstrap-t (studentized) interval of each result `a`, or paired difference `a` − `b`.

        Each resample's estimate is divided by its own standard error (the ratio's linearized,
        delta-method SE on the resampled units), t* = (θ* − θ̂) / se*, and the interval is
        [θ̂ − t*_{1−α} ŝe, θ̂ − t*_α ŝe] (Efron & Tibshirani 1993, ch. 12; Hall 1988). Where the
        estimate rests on a few large terms (rare outcomes under importance weights near 1/ε), its
        SE grows with it: the percentile interval is then too narrow on the side the data happened
        to show little of, and the bootstrap-t is not. The same resamples are drawn again (same seed),
        so the intervals agree with every other one of this Bootstrap. A paired difference needs
        both results on the same denominators (IPS, DM, DR, observed); ValueError otherwise. Intervals
        are kept: asking for many in one call costs one pass over the resamples per
        :data:`STUDENTIZED_PAIRS_PER_PASS` of them (about a second per 1,000 resamples of 100,000
        decisions), asking again costs nothing.
        """
        unpaired = [f"{a} and {b}" for a, b in pairs if not self.paired(a, b)]
        if unpaired:
            raise ValueError(f"{'; '.join(unpaired)} have different denominators: no studentized paired interval")
        if self.sums.shape[0] == 0 or not pairs:
            return [(float("nan"), float("nan"))] * len(pairs)
        missing = list(dict.fromkeys((a, b, level) for a, b in pairs if (a, b, level) not in self._t_cache))
        for s in range(0, len(missing), STUDENTIZED_PAIRS_PER_PASS):  # one pass per 8, whatever was asked before
            part = missing[s : s + STUDENTIZED_PAIRS_PER_PASS]
            self._t_cache.update(zip(part, self._studentized([(a, b) for a, b, _ in part], level), strict=True))
        return [self._t_cache[(a, b, level)] for a, b in pairs]

    def prepare_studentized(self, pairs: Sequence[tuple[str, str | None]], level: float = DEFAULT_LEVEL) -> None:
        """Compute, in one pass over the resamples, the bootstrap-t intervals of `pairs` that exist.

        Paired differences of results on different denominators (SNIPS's) are skipped: they have none.
        """
        if self.sums.shape[0]:
            self.studentized([(a, b) for a, b in pairs if self.paired(a, b)], level)

    def paired(self, a: str, b: str | None) -> bool:
        """Return True when result `a` alone (`b` None), or `a` − `b`, has a bootstrap-t: the same denominators."""
        return b is None or np.array_equal(self.units[:, self._col[a] + 1], self.units[:, self._col[b] + 1])

    def _studentized(self, pairs: list[tuple[str, str | None]], level: float) -> list[tuple[float, float]]:
        cols = np.empty((self.units.shape[0], 5 * len(pairs)))  # one array: the resampled sums' only copy
        thetas, ses = [], []
        for i, (a, b) in enumerate(pairs):
            ja = self._col[a]
            num, den = self.units[:, ja].copy(), self.units[:, ja + 1]
            if b is not None:
                num -= self.units[:, self._col[b]]
            total = float(den.sum())
            theta = float(num.sum()) / total if total != 0 else float("nan")
            e = num - theta * den
            ses.append(float(np.sqrt(np.dot(e, e))) / abs(total) if total != 0 else float("nan"))
            thetas.append(theta)
            cols[:, 5 * i : 5 * i + 5] = np.column_stack([num, den, num * num, num * den, den * den])
        sums = bootstrap_sums(cols, self.n_resamples, self._seed)
        out = []
        for i, (theta, se) in enumerate(zip(thetas, ses, strict=True)):
            s_num, s_den, s_nn, s_nd, s_dd = (sums[:, 5 * i + j] for j in range(5))
            with np.errstate(divide="ignore", invalid="ignore"):
                th = s_num / s_den
                var = np.maximum(s_nn - 2.0 * th * s_nd + th * th * s_dd, 0.0) / (s_den * s_den)
                t_star = (th - theta) / np.sqrt(var)
            out.append(_t_interval(theta, se, t_star, level))
        return out

    def influence(self, name: str) -> np.ndarray:
        """Return the empirical influence of each resampled unit on result `name` (Σ num / Σ den): num − θ·den."""
        j = self._col[name]
        num, den = self.units[:, j], self.units[:, j + 1]
        total = float(den.sum())
        theta = float(num.sum()) / total if total != 0 else float("nan")
        return (num - theta * den) / (total / max(len(den), 1))

    def interval(self, name: str, level: float = DEFAULT_LEVEL, method: str = "percentile") -> tuple[float, float]:
        """Return the interval of result `name`: ``percentile``, ``bca`` (:func:`bca_ci`), ``studentized`` or ``hull``.

        ``hull`` spans the other three (:data:`INTERVALS`).
        """
        if method == "studentized":
            return self.studentized([(name, None)], level)[0]
        if method == "hull":
            return _hull(*(self.interval(name, level, m) for m in ("percentile", "bca", "studentized")))
        if method == "bca":
            return bca_ci(self.samples(name), self.results[name].estimate, self.influence(name), level)
        if method != "percentile":
            raise ValueError(f"unknown interval method {method!r}; one of {', '.join(INTERVALS)}")
        return _percentile_ci(self.samples(name), level)

    def difference_interval(self, a: str, b: str, level: float = DEFAULT_LEVEL, method: str = "percentile") -> tuple[float, float]:
        """Return the paired interval of result `a` minus result `b` (a method of :data:`INTERVALS`).

        ``studentized`` needs both results on the same denominators (ValueError otherwise); ``hull`` spans
        the percentile and BCa intervals and, where it exists, the studentized one.
        """
        if method == "studentized":
            return self.studentized([(a, b)], level)[0]
        if method == "hull":
            parts = [self.difference_interval(a, b, level, m) for m in ("percentile", "bca")]
            if self.paired(a, b):  # SNIPS results have their own denominators: no bootstrap-t
                parts.append(self.studentized([(a, b)], level)[0])
            return _hull(*parts)
        samples = self.difference_samples(a, b)
        if method == "bca":
            estimate = self.results[a].estimate - self.results[b].estimate
            return bca_ci(samples, estimate, self.influence(a) - self.influence(b), level)
        if method != "percentile":
            raise ValueError(f"unknown interval method {method!r}; one of {', '.join(INTERVALS)}")
        return _percentile_ci(samples, level)

    def with_interval(self, name: str, level: float = DEFAULT_LEVEL, method: str = "percentile") -> OPEResult:
        """Return result `name` with its interval (:meth:`interval`'s `method`) filled in from these resamples."""
        lo, hi = self.interval(name, level, method)
        return dataclasses.replace(self.results[name], ci_low=lo, ci_high=hi, level=level, n_resamples=self.n_resamples)

    def difference_samples(self, a: str, b: str) -> np.ndarray:
        """Return the bootstrap replicates of result `a` minus result `b` (paired: the same resamples)."""
        return self.samples(a) - self.samples(b)

    def difference(self, a: str, b: str, level: float = DEFAULT_LEVEL, method: str = "percentile") -> Difference:
        """Return result `a` minus result `b` with its paired interval (:meth:`difference_interval`'s `method`)."""
        ra, rb = self.results[a], self.results[b]
        lo, hi = self.difference_interval(a, b, level, method)
        name = ra.estimator if ra.estimator == rb.estimator else f"{ra.estimator}-{rb.estimator}"
        return Difference(name, ra.estimate - rb.estimate, lo, hi, level, self.n_resamples, ra.n)


def paired_difference(
    a: OPEResult, b: OPEResult, *, level: float = DEFAULT_LEVEL, n_resamples: int = DEFAULT_RESAMPLES, seed: SeedLike = 0
) -> Difference:
    """Return A − B with a paired bootstrap interval: both recomputed on the same resampled requests.

    Pairing cancels the noise the two policies share (the same subscribers, the same outcomes), so
    the interval of the difference is far narrower than the two intervals side by side suggest.
    """
    return Bootstrap({"a": a, "b": b}, n_resamples=n_resamples, seed=seed).difference("a", "b", level)


def segment_estimate(
    result: OPEResult,
    mask: np.ndarray,
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> tuple[float, float, float, int]:
    """Return (estimate, ci_low, ci_high, n) of the same estimator restricted to the requests in `mask`."""
    m = np.asarray(mask, dtype=bool)
    num, den = result.num[m], result.den[m]
    n = int(m.sum())
    if n == 0 or den.sum() == 0:
        return float("nan"), float("nan"), float("nan"), n
    lo, hi = ratio_ci(num, den, level=level, n_resamples=n_resamples, seed=seed)
    return float(num.sum() / den.sum()), lo, hi, n
