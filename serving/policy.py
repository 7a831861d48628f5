"""Choosing the message: the ML policy (score, expected value, explore) and the rule policy behind it.

    value(m) = P(stay | x, m) × (V(product after m) − cost(m))        (docs/choosing-a-message.md)

The ML policy scores every eligible candidate with the current model, turns values into
exact probabilities (models.exploration), samples one, and returns a :class:`Choice`
with everything the decision log needs. Anything that goes wrong with the model
(no model, an exception, NaN, a deadline overrun, an open circuit) yields the rule
policy's answer with ``policy = "fallback:<reason>"`` and probability 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from models.catalog import Catalog, CatalogMessage
from models.experiment import mixture_probabilities
from models.exploration import action_probabilities, epsilon_probabilities_list, greedy_index, sample, sample_list
from serving.schemas import DecodedRealtimeRequestBody


@dataclasses.dataclass(slots=True)
class Choice:
    """One decision: the candidates, their scores/values/probabilities and the message shown."""

    message: CatalogMessage | None
    candidates: tuple[CatalogMessage, ...]
    policy: str
    propensity: float
    probabilities: list[float]
    scores: list[float] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)
    model_version: str | None = None
    fallback_reason: str | None = None
    features: np.ndarray | None = None
    shadow_model_version: str | None = None
    shadow_message_id: str | None = None
    profile: dict[str, object] | None = None  # the raw profile values the features were made from
    profile_read: bool = False  # the profile store was asked (profile None then means: no profile)
    policy_params: dict[str, object] | None = None  # None: the server's exploration parameters


def candidates_for(
    catalog: Catalog, request: DecodedRealtimeRequestBody, *, offers_enabled: bool
) -> tuple[tuple[CatalogMessage, ...], int | None]:
    """Return the candidates for a request (the default included) and the default's index, or None.

    Offers are dropped when no In-App Purchase key is configured: an offer answer without
    a valid signature would make Apple fall back anyway. Memoized per catalog.
    """
    key = ("candidates", request.productId, request.userLocale, offers_enabled)
    hit = catalog.memo.get(key)
    if hit is None:
        hit = _candidates(catalog, request.productId, request.userLocale, offers_enabled)
        if len(catalog.memo) < 100_000:
            catalog.memo[key] = hit
    return hit  # type: ignore[return-value]


def _candidates(
    catalog: Catalog, product_id: str, user_locale: str, offers_enabled: bool
) -> tuple[tuple[CatalogMessage, ...], int | None]:
    eligible = catalog.eligible(product_id, user_locale)
    if not offers_enabled:
        eligible = tuple(m for m in eligible if m.kind != "promotionalOffer")
    default = catalog.default_for(product_id, user_locale)
    if default is None:
        return eligible, None
    for i, m in enumerate(eligible):
        if m is default:
            return eligible, i
    return (*eligible, default), len(eligible)


def rule_choice(
    candidates: Sequence[CatalogMessage], default_index: int | None, *, policy: str, reason: str | None = None
) -> Choice:
    """Return the rule policy's choice: the default message, else the first plain or switch-plan message.

    With no such message the choice has no message (the endpoint answers 404 no_eligible_message).
    """
    cands = tuple(candidates)
    idx: int | None = default_index
    if idx is None:
        idx = next((i for i, m in enumerate(cands) if m.kind in ("message", "alternateProduct")), None)
    probs = [0.0] * len(cands)
    if idx is None:
        return Choice(None, cands, policy, 1.0, probs, fallback_reason=reason)
    probs[idx] = 1.0
    return Choice(cands[idx], cands, policy, 1.0, probs, fallback_reason=reason)


def fallback_choice(candidates: Sequence[CatalogMessage], default_index: int | None, reason: str) -> Choice:
    """Return the rule policy's choice logged as ``fallback:<reason>``."""
    return rule_choice(candidates, default_index, policy=f"fallback:{reason}", reason=reason)


@dataclasses.dataclass(frozen=True, slots=True)
class ExplorationParams:
    """How the ML policy explores; logged with every decision."""

    epsilon: float = 0.05
    scheme: str = "epsilon"
    temperature: float = 1.0
    holdout: float = 0.0

    def as_dict(self) -> dict[str, float | str]:
        """Return the parameters for the decision log."""
        return {"epsilon": self.epsilon, "scheme": self.scheme, "temperature": self.temperature, "holdout": self.holdout}


def values_of(catalog: Catalog, candidates: Sequence[CatalogMessage], product_id: str, p_stay: np.ndarray) -> np.ndarray:
    """Return expected values P(stay) × (V(product after m) − cost(m)) for each candidate."""
    return p_stay * np.array(_after_values(catalog, candidates, product_id), dtype=np.float64)


def ml_choice(
    catalog: Catalog,
    candidates: tuple[CatalogMessage, ...],
    default_index: int | None,
    product_id: str,
    p_stay: np.ndarray,
    params: ExplorationParams,
    u: float,
    model_version: str,
) -> Choice:
    """Return the sampled choice for model scores `p_stay`, or a NaN fallback when a score is not finite."""
    if p_stay.shape != (len(candidates),) or not all(map(math.isfinite, scores := p_stay.tolist())):
        c = fallback_choice(candidates, default_index, "model_nan")
        c.model_version = model_version
        return c
    policy = f"ml:{'epsilon-greedy' if params.scheme == 'epsilon' else 'softmax'}"
    if params.scheme == "epsilon":
        # K is small: plain floats, the same bits as the NumPy path (models/exploration.py)
        after = _after_values(catalog, candidates, product_id)
        values = [p * a for p, a in zip(scores, after, strict=True)]
        probs = epsilon_probabilities_list(values, params.epsilon, params.holdout, default_index)
        idx = sample_list(probs, u)
        return Choice(candidates[idx], candidates, policy, probs[idx], probs, scores=scores, values=values,
                      model_version=model_version)
    v = values_of(catalog, candidates, product_id, p_stay)
    pr = action_probabilities(
        v,
        epsilon=params.epsilon,
        scheme=params.scheme,
        temperature=params.temperature,
        holdout=params.holdout,
        default_index=default_index,
    )
    idx = sample(pr, u)
    return Choice(
        candidates[idx],
        candidates,
        policy,
        float(pr[idx]),
        pr.tolist(),
        scores=scores,
        values=v.tolist(),
        model_version=model_version,
    )


def _after_values(catalog: Catalog, candidates: Sequence[CatalogMessage], product_id: str) -> list[float]:
    """Return V(product after m) − cost(m) per candidate as floats (memoized per catalog)."""
    key = ("after", product_id, tuple(m.messageIdentifier for m in candidates))
    after = catalog.memo.get(key)
    if after is None:
        after = [float(catalog.value_after(m, product_id)) for m in candidates]
        if len(catalog.memo) < 100_000:
            catalog.memo[key] = after
    return after  # type: ignore[return-value]


def shadow_pick(catalog: Catalog, candidates: Sequence[CatalogMessage], product_id: str, p_stay: np.ndarray) -> str | None:
    """Return the shadow model's greedy message id, or None when its scores are unusable."""
    if p_stay.shape != (len(candidates),) or not np.isfinite(p_stay).all():
        return None
    return candidates[greedy_index(values_of(catalog, candidates, product_id, p_stay))].messageIdentifier



def experiment_choice(
    current: Choice,
    challenger: Choice,
    arm: str,
    share: float,
) -> Choice:
    """Return the arm's choice logged with the exact mixture probabilities of a live experiment.

    ``current`` and ``challenger`` are each arm's choice for the same candidates and the same uniform
    draw (a challenger that could not score is its rule fallback, probability 1). The message shown is
    the subscriber's arm's; its logged probabilities are ``(1 − share)·π_current + share·π_challenger``
    (models.experiment), so the experiment's decisions stay valid for off-policy evaluation.
    """
    mixed = mixture_probabilities(current.probabilities, challenger.probabilities, share)
    chosen = challenger if arm == "challenger" else current
    idx = next((i for i, m in enumerate(chosen.candidates) if m is chosen.message), None)
    chosen.probabilities = mixed
    chosen.propensity = mixed[idx] if idx is not None else 1.0
    return chosen
