"""The policy: expected value, exact exploration probabilities, their empirical frequencies, rules."""

from __future__ import annotations

import numpy as np
import pytest

from models.catalog import DEMO_CATALOG, Catalog
from models.exploration import action_probabilities
from serving.policy import ExplorationParams, candidates_for, ml_choice, rule_choice
from serving.schemas import DecodedRealtimeRequestBody

PM = "com.example.premium.monthly"


def req(locale: str = "en-US", product: str = PM) -> DecodedRealtimeRequestBody:
    return DecodedRealtimeRequestBody(
        originalTransactionId="1000", appAppleId=1, productId=product, userLocale=locale,
        requestIdentifier="5f0e9a1c-1a7b-4c55-9d51-6f6e0e1a2b3c", rawEnvironment="Sandbox", signedDate=0,
    )


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(DEMO_CATALOG)


def test_candidates_include_default_and_drop_offers_without_a_key(catalog: Catalog) -> None:
    cands, d = candidates_for(catalog, req(), offers_enabled=True)
    assert d is not None and cands[d] is catalog.default_for(PM, "en-US") and len(cands) == 8
    no_offers, _ = candidates_for(catalog, req(), offers_enabled=False)
    assert [m.kind for m in no_offers].count("promotionalOffer") == 0 and len(no_offers) == 6


def test_greedy_is_argmax_of_value_not_of_p_stay(catalog: Catalog) -> None:
    cands, d = candidates_for(catalog, req(), offers_enabled=True)
    # the offer has the highest P(stay) but its cost makes it worth less than the plain message
    p = np.full(len(cands), 0.5)
    i_offer = next(i for i, m in enumerate(cands) if m.kind == "promotionalOffer" and m.cost == 15.0)
    i_plain = next(i for i, m in enumerate(cands) if m.kind == "message" and i != d)
    p[i_offer] = 0.60  # 0.60 * (119.88 - 15) = 62.9
    p[i_plain] = 0.56  # 0.56 * 119.88 = 67.1
    c = ml_choice(catalog, cands, d, PM, p, ExplorationParams(epsilon=0.0), 0.37, "v1")
    assert c.message is cands[i_plain]
    assert c.propensity == 1.0
    assert c.values[i_offer] == pytest.approx(0.60 * (119.88 - 15.0))


def test_logged_probabilities_equal_the_exact_mixture(catalog: Catalog) -> None:
    cands, d = candidates_for(catalog, req(), offers_enabled=True)
    k = len(cands)
    p = np.linspace(0.3, 0.7, k)
    eps, hold = 0.1, 0.2
    c = ml_choice(catalog, cands, d, PM, p, ExplorationParams(epsilon=eps, holdout=hold), 0.5, "v1")
    g = int(np.argmax(c.values))
    expected = np.full(k, (1 - hold) * eps / k)
    expected[g] += (1 - hold) * (1 - eps)
    expected[d] += hold
    assert np.allclose(c.probabilities, expected)
    assert c.propensity == pytest.approx(expected[cands.index(c.message)])


def test_empirical_frequencies_match_logged_probabilities_over_200k_seeded_decisions(catalog: Catalog) -> None:
    cands, d = candidates_for(catalog, req(), offers_enabled=True)
    p = np.linspace(0.3, 0.7, len(cands))
    params = ExplorationParams(epsilon=0.05, holdout=0.1)
    rng = np.random.default_rng(42)
    counts = np.zeros(len(cands))
    n = 200_000
    probs = None
    index = {m.messageIdentifier: i for i, m in enumerate(cands)}
    for u in rng.random(n):
        c = ml_choice(catalog, cands, d, PM, p, params, float(u), "v1")
        counts[index[c.message.messageIdentifier]] += 1
        probs = c.probabilities
    assert np.max(np.abs(counts / n - np.asarray(probs))) < 0.003


def test_softmax_probabilities_follow_values(catalog: Catalog) -> None:
    cands, d = candidates_for(catalog, req(), offers_enabled=True)
    p = np.linspace(0.3, 0.7, len(cands))
    c = ml_choice(catalog, cands, d, PM, p, ExplorationParams(scheme="softmax", temperature=5.0), 0.1, "v1")
    v = np.asarray(c.values)
    assert np.allclose(c.probabilities, np.exp((v - v.max()) / 5) / np.exp((v - v.max()) / 5).sum())
    assert c.policy == "ml:softmax"


def test_nan_scores_fall_back_to_the_default(catalog: Catalog) -> None:
    cands, d = candidates_for(catalog, req(), offers_enabled=True)
    p = np.full(len(cands), np.nan)
    c = ml_choice(catalog, cands, d, PM, p, ExplorationParams(), 0.3, "v1")
    assert c.policy == "fallback:model_nan" and c.message is cands[d] and c.propensity == 1.0


def test_rules_without_default_pick_first_plain_or_switch(catalog: Catalog) -> None:
    cands, _ = candidates_for(catalog, req(), offers_enabled=True)
    offers_first = tuple(sorted(cands, key=lambda m: m.kind != "promotionalOffer"))
    c = rule_choice(offers_first, None, policy="rules")
    assert c.message is not None and c.message.kind in ("message", "alternateProduct")
    assert rule_choice((), None, policy="rules").message is None


def test_exploration_edge_cases() -> None:
    assert np.allclose(action_probabilities(np.array([1.0, np.nan, 3.0]), epsilon=0.0), [0, 0, 1])
    assert np.allclose(action_probabilities(np.array([np.nan, np.nan]), epsilon=0.0, default_index=1), [0, 1])
    with pytest.raises(ValueError):
        action_probabilities(np.array([]))


@pytest.mark.parametrize("seed", range(5))
def test_list_fast_path_gives_the_same_bits_as_numpy(seed: int) -> None:
    """The request path's plain-float epsilon-greedy equals the shared NumPy implementation exactly."""
    from models.exploration import epsilon_probabilities_list, sample, sample_list

    rng = np.random.default_rng(seed)
    for _ in range(2000):
        k = int(rng.integers(1, 12))
        v = rng.normal(size=k) * 10 ** float(rng.uniform(-3, 3))
        if rng.random() < 0.2:
            v[rng.integers(0, k)] = rng.choice([np.nan, np.inf, -np.inf])
        if rng.random() < 0.05:
            v[:] = np.nan
        if rng.random() < 0.1 and k > 1:
            v[1] = v[0]  # ties go to the first index in both
        eps = float(rng.choice([0.0, 0.05, 0.3, 1.0]))
        hold = float(rng.choice([0.0, 0.0, 0.1]))
        d = None if rng.random() < 0.3 else int(rng.integers(0, k))
        ref = action_probabilities(v, epsilon=eps, holdout=hold, default_index=d)
        fast = epsilon_probabilities_list(v.tolist(), eps, hold, d)
        assert fast == ref.tolist()
        u = float(rng.random())
        assert sample_list(fast, u) == sample(ref, u)
