"""The off-policy estimators against values worked out by hand on tiny arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from training import ope

# Four logged requests, two candidate actions each.
#   target π          logged a  μ(a)   r    weight w = π(a)/μ   r̂(x, ·)
#   [1.0, 0.0]        0         0.50   10   2                   [8, 2]
#   [0.0, 1.0]        1         0.25    4   4                   [5, 3]
#   [0.5, 0.5]        0         0.50    6   1                   [6, 6]
#   [1.0, 0.0]        1         0.75    8   0                   [7, 1]
PI = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
A = np.array([0, 1, 0, 1])
MU = np.array([0.5, 0.25, 0.5, 0.75])
R = np.array([10.0, 4.0, 6.0, 8.0])
Q = np.array([[8.0, 2.0], [5.0, 3.0], [6.0, 6.0], [7.0, 1.0]])
# the logging policy's whole distribution, consistent with MU for the logged actions
MU_ALL = np.array([[0.5, 0.5], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75]])


def test_importance_weights_and_ess_by_hand() -> None:
    w = ope.importance_weights(A, MU, PI)
    assert w.tolist() == [2.0, 4.0, 1.0, 0.0]
    # (2 + 4 + 1 + 0)² / (4 + 16 + 1 + 0) = 49 / 21
    assert ope.effective_sample_size(w) == pytest.approx(49 / 21)
    assert ope.effective_sample_size(np.ones(5)) == pytest.approx(5.0)
    assert ope.effective_sample_size(np.zeros(3)) == 0.0


def test_ips_by_hand() -> None:
    res = ope.ips(R, A, MU, PI, n_resamples=0)
    assert res.estimate == pytest.approx((2 * 10 + 4 * 4 + 1 * 6 + 0 * 8) / 4)  # 10.5
    assert res.ess == pytest.approx(49 / 21)
    assert res.max_weight == pytest.approx(4.0)
    assert res.n == 4


def test_snips_by_hand() -> None:
    assert ope.snips(R, A, MU, PI, n_resamples=0).estimate == pytest.approx(42 / 7)  # 6.0


def test_dm_by_hand() -> None:
    # Σ_a π(a|x) r̂(x, a) per request: 8, 3, 6, 7
    assert ope.dm(None, A, MU, PI, Q, n_resamples=0).estimate == pytest.approx((8 + 3 + 6 + 7) / 4)


def test_dr_by_hand() -> None:
    # DM term + w (r − r̂(x, a)): 8 + 2·2, 3 + 4·1, 6 + 1·0, 7 + 0 → 12, 7, 6, 7
    assert ope.dr(R, A, MU, PI, Q, n_resamples=0).estimate == pytest.approx(32 / 4)


def test_switch_dr_by_hand() -> None:
    # τ = 3 switches request 1 (w = 4) to the reward model alone: 12, 3, 6, 7
    assert ope.switch_dr(R, A, MU, PI, Q, tau=3.0, n_resamples=0).estimate == pytest.approx(28 / 4)
    # τ = ∞ is plain DR
    assert ope.switch_dr(R, A, MU, PI, Q, tau=float("inf"), n_resamples=0).estimate == pytest.approx(8.0)
    # the automatic τ is reported and gives a finite estimate between the two
    auto = ope.switch_dr(R, A, MU, PI, Q, logging_probs=MU_ALL, n_resamples=0)
    assert auto.details["tau"] > 0
    assert np.isfinite(auto.estimate)


def test_target_equal_to_logging_gives_the_observed_mean() -> None:
    res = ope.estimate_all(R, A, MU, MU_ALL, Q, logging_probs=MU_ALL, n_resamples=200, seed=1)
    observed = R.mean()  # 7.0
    assert res["ips"].estimate == pytest.approx(observed)
    assert res["snips"].estimate == pytest.approx(observed)
    assert res["ips"].ess == pytest.approx(4.0)
    assert res["ips"].unsupported_mass == 0.0
    # DR with every weight 1 is the observed mean too, whatever the reward model: Σπ r̂ − r̂(a) + r averages to it
    assert res["dr"].estimate == pytest.approx(observed + ((MU_ALL * Q).sum(axis=1) - Q[np.arange(4), A]).mean())
    assert ope.observed(R, n_resamples=0).estimate == pytest.approx(observed)


def test_mass_where_the_logging_policy_has_none_is_reported() -> None:
    # request 0 was a fallback: the logging policy showed action 0 with probability 1, action 1 was impossible
    mu_all = np.array([[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75]])
    mu = np.array([1.0, 0.25, 0.5, 0.75])
    pi = np.array([[0.2, 0.8], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    for name, res in ope.estimate_all(R, A, mu, pi, Q, logging_probs=mu_all, n_resamples=0).items():
        # 0.8 of request 0's target mass is unsupported: 0.8 / 4 requests
        assert res.unsupported_mass == pytest.approx(0.2), name
        assert res.to_dict()["unsupported_mass"] == pytest.approx(0.2)
    # without the logging distribution the estimators cannot tell, and say so (NaN, None in JSON)
    blind = ope.ips(R, A, mu, pi, n_resamples=0)
    assert np.isnan(blind.unsupported_mass)
    assert blind.to_dict()["unsupported_mass"] is None


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    n, k = 2000, 3
    mu_all = np.full((n, k), 1 / 3)
    a = rng.integers(0, k, n)
    r = rng.normal(1.0, 1.0, n)
    pi = np.tile([0.6, 0.3, 0.1], (n, 1))
    one = ope.snips(r, a, mu_all[:, 0], pi, level=0.9, n_resamples=400, seed=7)
    two = ope.snips(r, a, mu_all[:, 0], pi, level=0.9, n_resamples=400, seed=7)
    other = ope.snips(r, a, mu_all[:, 0], pi, level=0.9, n_resamples=400, seed=8)
    assert one.ci_low < one.estimate < one.ci_high
    assert one.ci == two.ci
    assert one.ci != other.ci
    wide = ope.snips(r, a, mu_all[:, 0], pi, level=0.99, n_resamples=400, seed=7)
    assert wide.ci_low < one.ci_low and wide.ci_high > one.ci_high
    assert (one.level, one.n_resamples) == (0.9, 400)


def test_bootstrap_of_a_mean_matches_the_normal_approximation() -> None:
    r = np.random.default_rng(3).normal(0.0, 1.0, 20_000)
    res = ope.observed(r, level=0.9, n_resamples=1000, seed=0)
    half = 1.645 * r.std() / np.sqrt(len(r))
    assert (res.ci_high - res.ci_low) / 2 == pytest.approx(half, rel=0.1)


def test_paired_difference_cancels_shared_noise() -> None:
    rng = np.random.default_rng(5)
    r = rng.normal(10.0, 5.0, 5000)
    a = ope.observed(r, n_resamples=0)
    b = ope.observed(r - 1.0, n_resamples=0)
    d = ope.paired_difference(a, b, n_resamples=300, seed=0)
    # every resample sees the same requests on both sides: the difference is exactly 1
    assert d.estimate == pytest.approx(1.0)
    assert d.ci_low == pytest.approx(1.0) and d.ci_high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same requests"):
        ope.paired_difference(a, ope.observed(r[:10], n_resamples=0))


def test_joint_bootstrap_gives_every_result_an_interval() -> None:
    res = ope.estimate_all(R, A, MU, PI, Q, logging_probs=MU_ALL, n_resamples=300, seed=2)
    assert set(res) == set(ope.ESTIMATORS)
    for name, r in res.items():
        assert r.n_resamples == 300, name
        assert r.ci_low <= r.estimate <= r.ci_high, name
    boot = ope.Bootstrap(res, n_resamples=300, seed=2)
    d = boot.difference("dr", "dm")
    assert d.estimate == pytest.approx(8.0 - 6.0)


def test_restrict_recomputes_on_a_segment() -> None:
    res = ope.dr(R, A, MU, PI, Q, n_resamples=0)
    seg = res.restrict(np.array([True, True, False, False]))
    assert seg.estimate == pytest.approx((12 + 7) / 2)
    assert seg.n == 2
    assert seg.ess == pytest.approx(36 / 20)  # weights 2 and 4
    est, lo, hi, n = ope.segment_estimate(res, np.array([False, False, True, True]), n_resamples=100)
    assert (est, n) == (pytest.approx(6.5), 2)
    assert lo <= est <= hi


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"propensities": np.array([0.5, 0.0, 0.5, 0.75])}, "propensity"),
        ({"propensities": np.array([0.5, 1.5, 0.5, 0.75])}, "propensity"),
        ({"target_probs": np.array([[1.0, 0.0], [0.5, 0.0], [0.5, 0.5], [1.0, 0.0]])}, "summing to 1"),
        ({"actions": np.array([0, 2, 0, 1])}, "index"),
        ({"actions": np.array([0.0, 1.0, 0.0, 1.0])}, "integer"),
        ({"rewards": np.array([1.0, np.nan, 0.0, 1.0])}, "finite"),
    ],
)
def test_bad_inputs_are_refused_with_a_sentence(kwargs: dict[str, np.ndarray], message: str) -> None:
    args = {"rewards": R, "actions": A, "propensities": MU, "target_probs": PI, **kwargs}
    with pytest.raises(ValueError, match=message):
        ope.ips(args["rewards"], args["actions"], args["propensities"], args["target_probs"], n_resamples=0)


def test_level_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="level"):
        ope.ips(R, A, MU, PI, level=1.5, n_resamples=10)


def test_snips_counts_unsupported_target_mass_as_zero_like_its_warning_says() -> None:
    """74% of the target's mass on a message the logging rule never showed: SNIPS must not renormalise it away."""
    n = 1000
    rng = np.random.default_rng(0)
    mu_all = np.tile([1.0, 0.0], (n, 1))  # a rule: always message 0, message 1 impossible
    a, mu = np.zeros(n, dtype=np.int64), np.ones(n)
    r = rng.uniform(5.0, 15.0, n)  # observed rewards of message 0, mean ~10
    pi = np.tile([0.0, 1.0], (n, 1))
    pi[: int(0.26 * n)] = [1.0, 0.0]  # the target agrees with the rule on 26% of the requests
    res = ope.snips(r, a, mu, pi, logging_probs=mu_all, n_resamples=0)
    assert res.unsupported_mass == pytest.approx(0.74)
    # zero for the unsupported 74%: the same as IPS, far below the supported mean the old ratio returned (~10)
    assert res.estimate == pytest.approx(ope.ips(r, a, mu, pi, n_resamples=0).estimate)
    assert res.estimate == pytest.approx(r[: int(0.26 * n)].sum() / n)
    # with full support nothing changes: a weighted mean of observed rewards
    full = ope.snips(R, A, MU, PI, logging_probs=MU_ALL, n_resamples=0)
    assert full.estimate == pytest.approx(ope.snips(R, A, MU, PI, n_resamples=0).estimate)


# ---- interval methods: percentile (the default), BCa, studentized ------------------------------------
def _rare(seed: int, n: int = 4000, mu0: float = 0.01, p: float = 0.1) -> dict[str, ope.OPEResult]:
    """A target that always shows an action logged 1% of the time, whose reward is rare: a few big IPS terms."""
    rng = np.random.default_rng(seed)
    a = (rng.random(n) >= mu0).astype(np.intp)  # action 0 with probability mu0
    mu = np.where(a == 0, mu0, 1.0 - mu0)
    r = np.where(a == 0, rng.random(n) < p, rng.random(n) < 0.5).astype(np.float64)
    pi = np.zeros((n, 2))
    pi[:, 0] = 1.0
    return {"ips": ope.ips(r, a, mu, pi, n_resamples=0), "obs": ope.observed(r, n_resamples=0)}


def test_every_interval_method_agrees_with_the_normal_one_on_plentiful_data() -> None:
    rng = np.random.default_rng(3)
    r = rng.normal(1.0, 2.0, 20_000)
    boot = ope.Bootstrap({"m": ope.observed(r, n_resamples=0)}, n_resamples=2000, seed=1)
    half = 1.645 * 2.0 / np.sqrt(len(r))
    for method in ope.INTERVALS:
        lo, hi = boot.interval("m", 0.9, method)
        assert lo == pytest.approx(r.mean() - half, abs=0.1 * half), method
        assert hi == pytest.approx(r.mean() + half, abs=0.1 * half), method
    with pytest.raises(ValueError, match="unknown interval method"):
        boot.interval("m", 0.9, "wald")


def test_on_a_few_large_terms_bca_and_the_bootstrap_t_reach_further_up_than_the_percentile_interval() -> None:
    boot = ope.Bootstrap(_rare(5), n_resamples=2000, seed=2)
    est = boot.results["ips"].estimate
    pct, bca, t, hull = (boot.interval("ips", 0.9, m) for m in ("percentile", "bca", "studentized", "hull"))
    assert pct[0] < est < pct[1]
    # the estimate's own spread grows with it: the side the data happened to show little of is the wider one
    assert t[1] > pct[1] and t[1] - est > est - t[0]
    assert bca[1] > pct[1]
    assert hull == (min(pct[0], bca[0], t[0]), max(pct[1], bca[1], t[1]))
    assert boot.with_interval("ips", 0.9, "hull").ci == hull


def test_studentized_paired_intervals_are_computed_in_one_pass_and_agree_with_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    res = _rare(6)
    boot = ope.Bootstrap(res, n_resamples=500, seed=3, clusters=np.arange(4000) // 3)
    passes: list[int] = []
    real = ope.bootstrap_sums

    def counted(*args: Any, **kw: Any) -> np.ndarray:
        passes.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(ope, "bootstrap_sums", counted)
    both = boot.studentized([("ips", "obs"), ("ips", None)], 0.9)
    assert len(passes) == 1  # both intervals from one pass over the resamples (up to 8 a pass)

    def fresh() -> ope.Bootstrap:  # the same resamples, nothing computed yet
        return ope.Bootstrap(res, n_resamples=500, seed=3, clusters=np.arange(4000) // 3)

    assert both[0] == fresh().difference_interval("ips", "obs", 0.9, "studentized")
    assert both[1] == fresh().interval("ips", 0.9, "studentized")
    passes.clear()
    assert boot.studentized([("ips", None)], 0.9) == [both[1]] and passes == []  # kept, not drawn again
    # a Generator seed: the same resamples whatever was asked before (one integer seed for every pass)
    grouped = ope.Bootstrap(res, n_resamples=200, seed=np.random.default_rng(3))
    grouped.studentized([("ips", "obs")], 0.9)
    alone = ope.Bootstrap(res, n_resamples=200, seed=np.random.default_rng(3))
    assert grouped.studentized([("ips", None)], 0.9) == alone.studentized([("ips", None)], 0.9)
    snips = ope.snips(np.ones(4), np.zeros(4, dtype=np.intp), np.full(4, 0.5), np.tile([1.0, 0.0], (4, 1)), n_resamples=0)
    mixed = ope.Bootstrap({"a": snips, "b": ope.observed(np.ones(4), n_resamples=0)}, n_resamples=50, seed=0)
    with pytest.raises(ValueError, match="different denominators"):
        mixed.difference_interval("a", "b", 0.9, "studentized")
    # the hull of such a difference is that of the two intervals that exist
    parts = [mixed.difference_interval("a", "b", 0.9, m) for m in ("percentile", "bca")]
    assert mixed.difference_interval("a", "b", 0.9, "hull") == (min(p[0] for p in parts), max(p[1] for p in parts))
