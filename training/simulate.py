"""A synthetic world with ground truth: subscribers, logged decisions, outcome events.

``retention simulate`` writes the data files of docs/data-formats.md (decisions, outcomes, profiles)
plus ``ground_truth`` (every eligible candidate of every decision with its true
P(stay) and value) and the catalog used, so an evaluator can compute any policy's
true value and compare it with the oracle and the best single static message.

The world, deterministic by seed (one ``numpy.random.Generator``):

- Subscribers with a profile: ``tenure_days``, ``plan_age_days``, ``price_paid``,
  ``engagement`` (0..1), ``sessions_30d``, ``offers_redeemed`` (past promotional
  offers), ``acquisition_channel`` and ``country`` (categorical). Each has a product
  (weighted) and a device locale drawn from a mix that includes locales with no
  exact catalog match (``en-AU``, ``fr-CA``, ``de-AT``: they fall back to the language).
- Candidates are ``catalog.eligible(product, locale)``, plus the catalog default for
  that product and locale when it is not already among them.
- A true P(stay | subscriber, message) = sigmoid(base + effect). The base depends on
  engagement, tenure, country, deal hunting and a small unobserved term (sd 0.2); the
  effect depends on the message's *role*, derived from the catalog so any catalog works
  (the first three plain messages after the default take the themes below, a message
  with an image being the "feature" one), and on observed features only:

  ====================  ===============================================================
  role                  effect on the logit (who it works for)
  ====================  ===============================================================
  default message       0 (the reference)
  feature highlights    about +1.4 when engagement > 0.7, -0.8 below (a sharp ramp)
  what's new            +2.0 for a non-English device language, else -0.6
  loyalty               +2.0 after 540 days of tenure, else -0.6
  annual switch         +3.5 for deal hunters (2+ past offers, 180+ days), else -1.0;
                        +0.5 in DE/AT/JP (loses a third of the value: only they gain)
  cheaper plan          about +2.6 when engagement < 0.25, -1.0 above
  dearer plan           about +0.3 when engagement > 0.75, -2.2 below
  promotional offer     (1.8·new − 0.4 + 0.8·promo) × simplicity, new = 1 under 90
                        days, 0.5 under 180; a cheap simple offer (a free month) pulls
                        more than a deep discount, which also costs more
  ====================  ===============================================================

  The best message therefore differs between subscribers (eight different messages are
  somebody's best in the demo catalog); the best single static message is about 20%
  below the oracle, and the effects are strong, sharp and observable so that a model
  trained on 100k logged decisions can find them.
- The logging policy is ε-greedy (``models.exploration.action_probabilities``, the
  shared code) around a plausible hand-written rule: the cheapest offer for new
  subscribers (the deepest one when they came from a promo campaign), the annual plan
  for deal hunters, the cheaper plan for inactive ones, the loyalty message after a
  year, the "what's new" message for non-English speakers, else the default. It is
  context-dependent but far from optimal. The exact propensity of the shown message is
  logged, and every candidate's probability is in the ground truth (``logging_prob``).
- Decisions span about 60 days; some subscriptions get a second decision later (some
  inside the first one's horizon, which cuts its label window short; a subscriber who
  accepted a switch is on the new product by then).
- Outcome events are drawn so that the label rule (docs/data-formats.md) recovers the sampled
  stay/churn for every uncensored decision: a churn is a ``cancelled`` (sometimes a
  cancel, re-enable, cancel sequence, sometimes followed by ``expired`` or
  ``refunded``); a stay is a ``renewed`` when the renewal date falls in the window
  (else nothing, which the rule counts as retained once the window has passed),
  sometimes preceded by a ``cancelled`` then ``reenabled``; an accepted switch adds
  ``switched``, an accepted offer ``offer_redeemed``. The latest decisions are
  censored naturally.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.catalog import DEMO_CATALOG, Catalog, CatalogMessage, language
from models.data_files import EVENTS
from models.exploration import action_probabilities
from retention import VerbParser, int_in, time_ms

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DEFAULT_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: fixed so a seed always gives the same files
DEFAULT_HORIZON_MS = 30 * DAY_MS
SPAN_DAYS = 60
SECOND_DECISION_SHARE = 0.12
POLICY_NAME = "simulated:epsilon-greedy"
EVENT_CODES: tuple[str, ...] = EVENTS
MODEL_VERSION = "rules-v0"
LOGGING_RULES: tuple[str, ...] = ("rules", "default")

# (locale, weight, country); en-AU, en-CA, fr-CA and de-AT have no exact match in the demo catalog.
LOCALE_MIX: tuple[tuple[str, float, str], ...] = (
    ("en-US", 0.32, "US"),
    ("en-GB", 0.10, "GB"),
    ("en-AU", 0.07, "AU"),
    ("en-CA", 0.04, "CA"),
    ("fr-FR", 0.10, "FR"),
    ("fr-CA", 0.03, "CA"),
    ("de-DE", 0.12, "DE"),
    ("de-AT", 0.03, "AT"),
    ("ja-JP", 0.14, "JP"),
    ("es-ES", 0.05, "ES"),  # no Spanish message in the demo catalog: dropped unless the catalog has one
)
COUNTRIES: tuple[str, ...] = ("US", "GB", "AU", "CA", "FR", "DE", "AT", "JP", "ES")
# Base-rate shift by country, and where annual plans are culturally popular.
COUNTRY_BASE: dict[str, float] = {"US": 0.0, "GB": 0.1, "AU": -0.1, "CA": 0.0, "FR": -0.15, "DE": 0.2, "AT": 0.1,
                                  "JP": 0.25, "ES": -0.1}
ANNUAL_FRIENDLY: frozenset[str] = frozenset({"DE", "AT", "JP"})
PRICE_FACTOR: dict[str, float] = {"US": 1.0, "GB": 1.05, "AU": 1.1, "CA": 1.02, "FR": 1.08, "DE": 1.08, "AT": 1.08,
                                  "JP": 0.92, "ES": 1.0}
CHANNELS: tuple[str, ...] = ("organic", "paid_social", "referral", "promo")
CHANNEL_WEIGHTS: tuple[float, ...] = (0.45, 0.25, 0.15, 0.15)

# Message roles (see the module docstring).
NEUTRAL, FEATURE, WHATS_NEW, LOYALTY, PLAIN_OTHER, ANNUAL, CHEAPER, DEARER, OFFER = range(9)
ROLE_NAMES: tuple[str, ...] = ("neutral", "feature", "whats_new", "loyalty", "plain", "annual_switch",
                               "cheaper_plan", "dearer_plan", "offer")


@dataclass
class World:
    """A simulated world: the three data tables (docs/data-formats.md), the ground truth, and the catalog used."""

    decisions: pd.DataFrame
    outcomes: pd.DataFrame
    profiles: pd.DataFrame
    ground_truth: pd.DataFrame
    catalog: Catalog
    # the sampled outcome of each decision (row-aligned with `decisions`: request_id, stayed); kept in
    # memory for checks, not written: the label rule must recover it from the outcome events
    sampled: pd.DataFrame | None = None


# ---------------------------------------------------------------------------------------------
# the catalog side: candidate sets and message roles per (product, locale)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Combos:
    """Candidate tables per (product, locale) combination, padded to the largest candidate set."""

    product: np.ndarray  # (C,) product index
    locale: np.ndarray  # (C,) locale index
    k: np.ndarray  # (C,) number of candidates
    msg: np.ndarray  # (C, K) message index, -1 padding
    role: np.ndarray  # (C, K) role code
    discount: np.ndarray  # (C, K) an offer's cost / the mean product value
    value_after: np.ndarray  # (C, K) V(product after m) - cost(m)
    default_slot: np.ndarray  # (C,)
    offer_slot: np.ndarray  # (C,) the cheapest offer, -1 if none (the logging rule's pick for new users)
    deep_offer_slot: np.ndarray  # (C,) the most generous offer, -1 if none (the rule's pick for promo users)
    cheaper_slot: np.ndarray  # (C,) a switch to a cheaper plan, -1 if none
    alt_product: np.ndarray  # (C, K) product index after the message (current one unless a switch)
    foreign: np.ndarray  # (C,) the locale's language is not English
    loyalty_slot: np.ndarray  # (C,) the loyalty-themed plain message, -1 if none
    annual_slot: np.ndarray  # (C,) a switch to an annual plan, -1 if none
    whats_new_slot: np.ndarray  # (C,) the "what's new" plain message, -1 if none


def _plain_themes(catalog: Catalog, default_ids: set[str]) -> dict[str, int]:
    """Return the theme of each plain message: defaults neutral, then feature / what's new / loyalty."""
    themes: dict[str, int] = {}
    rest: list[CatalogMessage] = []
    for m in catalog.messages.values():
        if m.kind != "message":
            continue
        if m.messageIdentifier in default_ids:
            themes[m.messageIdentifier] = NEUTRAL
        else:
            rest.append(m)
    # an image makes a message the "feature highlights" one (first such message only)
    with_image = [m for m in rest if m.imageIdentifier is not None]
    order = with_image[:1] + [m for m in rest if m not in with_image[:1]]
    cycle = (FEATURE, WHATS_NEW, LOYALTY) if with_image else (WHATS_NEW, LOYALTY, FEATURE)
    for i, m in enumerate(order):
        themes[m.messageIdentifier] = cycle[i] if i < len(cycle) else PLAIN_OTHER
    return themes


def _is_annual(catalog: Catalog, m: CatalogMessage) -> bool:
    alt = m.alternateProductId or ""
    return m.billingPlanType == "BILLED_UPFRONT" or "annual" in alt.lower() or "year" in alt.lower()


def _build_combos(catalog: Catalog, locales: list[str]) -> _Combos:
    products = list(catalog.products)
    msg_ids = list(catalog.messages)
    msg_index = {mid: i for i, mid in enumerate(msg_ids)}
    default_ids = {d.messageIdentifier for d in catalog.defaults.values()}
    themes = _plain_themes(catalog, default_ids)
    rows: list[tuple[int, int, list[CatalogMessage], int]] = []
    for pi, pid in enumerate(products):
        for li, loc in enumerate(locales):
            cands = list(catalog.eligible(pid, loc))
            default = catalog.default_for(pid, loc)
            if default is not None and all(c.messageIdentifier != default.messageIdentifier for c in cands):
                cands.append(default)
            if not cands:
                continue  # Apple would show its own default: no decision to log
            d = 0 if default is None else next(i for i, c in enumerate(cands) if c is default)
            rows.append((pi, li, cands, d))
    if not rows:
        raise ValueError("the catalog has no eligible message for any simulated product and locale")
    c_n, k_max = len(rows), max(len(r[2]) for r in rows)
    out = _Combos(
        product=np.array([r[0] for r in rows]),
        locale=np.array([r[1] for r in rows]),
        k=np.array([len(r[2]) for r in rows]),
        msg=np.full((c_n, k_max), -1),
        role=np.zeros((c_n, k_max), dtype=np.int64),
        discount=np.zeros((c_n, k_max)),
        value_after=np.zeros((c_n, k_max)),
        default_slot=np.array([r[3] for r in rows]),
        offer_slot=np.full(c_n, -1),
        deep_offer_slot=np.full(c_n, -1),
        cheaper_slot=np.full(c_n, -1),
        alt_product=np.zeros((c_n, k_max), dtype=np.int64),
        foreign=np.array([language(locales[r[1]]) != "en" for r in rows]),
        loyalty_slot=np.full(c_n, -1),
        annual_slot=np.full(c_n, -1),
        whats_new_slot=np.full(c_n, -1),
    )
    # an offer's pull is its cost against the catalog's typical product value, so one message has the
    # same appeal on every product it applies to (its value trade-off still differs by product)
    mean_value = float(np.mean([p.value for p in catalog.products.values()]))
    for c, (pi, _li, cands, d) in enumerate(rows):
        pid = products[pi]
        v_cur = catalog.products[pid].value
        best_offer_cost, deep_offer_cost = np.inf, -np.inf
        for s, m in enumerate(cands):
            out.msg[c, s] = msg_index[m.messageIdentifier]
            out.value_after[c, s] = catalog.value_after(m, pid)
            after = catalog.product_after(m, pid)
            out.alt_product[c, s] = products.index(after)
            if s == d:
                role = NEUTRAL
            elif m.kind == "message":
                role = themes.get(m.messageIdentifier, PLAIN_OTHER)
                if role == LOYALTY and out.loyalty_slot[c] < 0:
                    out.loyalty_slot[c] = s
                if role == WHATS_NEW and out.whats_new_slot[c] < 0:
                    out.whats_new_slot[c] = s
            elif m.kind == "alternateProduct":
                v_alt = catalog.products[after].value
                if _is_annual(catalog, m) and v_alt < v_cur:
                    role = ANNUAL
                elif v_alt < v_cur:
                    role = CHEAPER
                else:
                    role = DEARER
                if role == CHEAPER and out.cheaper_slot[c] < 0:
                    out.cheaper_slot[c] = s
                if role == ANNUAL and out.annual_slot[c] < 0:
                    out.annual_slot[c] = s
            else:
                role = OFFER
                out.discount[c, s] = m.cost / mean_value if mean_value > 0 else 0.0
                if m.cost < best_offer_cost:
                    best_offer_cost, out.offer_slot[c] = m.cost, s
                if m.cost > deep_offer_cost:
                    deep_offer_cost, out.deep_offer_slot[c] = m.cost, s
            out.role[c, s] = role
        if k_max > len(cands):
            out.alt_product[c, len(cands):] = pi
    return out


# ---------------------------------------------------------------------------------------------
# the subscriber side
# ---------------------------------------------------------------------------------------------
@dataclass
class _Subscribers:
    tenure: np.ndarray
    plan_age: np.ndarray
    engagement: np.ndarray
    sessions: np.ndarray
    offers_redeemed: np.ndarray
    channel: np.ndarray  # index into CHANNELS
    country: np.ndarray  # index into COUNTRIES
    latent: np.ndarray  # unobserved: not in the profile


def _draw_subscribers(rng: np.random.Generator, locale_country: np.ndarray) -> _Subscribers:
    n = locale_country.shape[0]
    tenure = np.clip(np.rint(rng.lognormal(np.log(150.0), 1.1, n)), 1, 3650).astype(np.int64)
    plan_age = np.maximum(1, np.rint(tenure * rng.uniform(0.2, 1.0, n))).astype(np.int64)
    engagement = np.round(rng.beta(2.0, 2.0, n), 3)
    sessions = rng.poisson(0.5 + 35.0 * engagement**1.5).astype(np.int64)
    channel = np.asarray(rng.choice(len(CHANNELS), size=n, p=np.array(CHANNEL_WEIGHTS)), dtype=np.int64)
    offers_redeemed = np.asarray(rng.poisson(0.3 + 1.0 * (channel == CHANNELS.index("promo"))), dtype=np.int64)
    # most subscribers live where their device locale says; a few do not
    moved = rng.random(n) < 0.05
    country = np.where(moved, rng.integers(0, len(COUNTRIES), n), locale_country)
    latent = np.asarray(rng.normal(0.0, 0.2, n), dtype=np.float64)
    return _Subscribers(tenure, plan_age, engagement, sessions, offers_redeemed, channel, country, latent)


def _price_sensitivity(s: _Subscribers, idx: np.ndarray) -> np.ndarray:
    """Return how strongly a subscriber responds to an offer: 1 under 90 days of tenure, 0.5 under 180, else 0."""
    t = s.tenure[idx]
    return 1.0 * (t < 90) + 0.5 * ((t >= 90) & (t < 180))


def _saver_score(s: _Subscribers, idx: np.ndarray) -> np.ndarray:
    """Return 0 or 1: settled subscribers who hunt deals (two or more past offers), drawn to annual savings."""
    return ((s.offers_redeemed[idx] >= 2) & (s.tenure[idx] >= 180)).astype(np.float64)


def _ramp(x: np.ndarray, at: float, width: float) -> np.ndarray:
    """Return a smooth step from 0 to 1 around `at` (logistic, `width` wide)."""
    return 1.0 / (1.0 + np.exp(-(x - at) / width))


def _true_p_stay(
    s: _Subscribers, idx: np.ndarray, role: np.ndarray, discount: np.ndarray, foreign: np.ndarray
) -> np.ndarray:
    """Return the true P(stay) for subscribers `idx` (n,) and candidate roles (n, K).

    `foreign` (n,) says the device language is not English (the "what's new" message is
    localised content news, which lands with those subscribers).
    """
    foreign = foreign[:, None]
    eng = s.engagement[idx][:, None]
    tenure = s.tenure[idx][:, None].astype(np.float64)
    country = s.country[idx]
    c_base = np.array([COUNTRY_BASE[c] for c in COUNTRIES])[country][:, None]
    annual_friendly = np.isin(country, [COUNTRIES.index(c) for c in ANNUAL_FRIENDLY])[:, None]
    ps = _price_sensitivity(s, idx)[:, None]
    saver = _saver_score(s, idx)[:, None]
    promo = (s.channel[idx] == CHANNELS.index("promo"))[:, None]
    base = (
        0.6
        + 1.6 * (eng - 0.5)
        + 0.3 * np.clip(np.log(tenure / 150.0), -2.0, 2.0)
        - 0.25 * ps
        - 0.2 * promo
        - 1.0 * saver
        + c_base
        + s.latent[idx][:, None]
    )
    eff = np.zeros(role.shape)
    # sharp ramps rather than gentle slopes: each message has a clear audience, so the best message
    # is rarely a near tie that no amount of data would settle
    eff = np.where(role == FEATURE, 2.2 * _ramp(eng, 0.7, 0.04) - 0.8, eff)
    eff = np.where(role == WHATS_NEW, np.where(foreign, 2.0, -0.6), eff)
    eff = np.where(role == LOYALTY, np.where(tenure > 540, 2.0, -0.6), eff)
    eff = np.where(role == PLAIN_OTHER, -0.1, eff)
    eff = np.where(role == ANNUAL, -1.0 + 4.5 * saver + 0.5 * annual_friendly, eff)
    eff = np.where(role == CHEAPER, 3.6 * _ramp(-eng, -0.25, 0.04) - 1.0, eff)
    eff = np.where(role == DEARER, 2.5 * _ramp(eng, 0.75, 0.04) - 2.2, eff)
    # offers pull new and promo-acquired subscribers; a small, simple offer (a free month) pulls
    # better than a deep, long discount, which also costs more
    pull = np.clip(discount / 0.1, 0.0, 2.5)
    simple = np.clip(1.6 - 0.6 * pull, 0.4, 1.2)
    eff = np.where(role == OFFER, (1.8 * ps - 0.4 + 0.8 * promo) * simple, eff)
    return 1.0 / (1.0 + np.exp(-(base + eff)))


# ---------------------------------------------------------------------------------------------
# Apple-sized presets (effects in probability points, as Apple reports them)
# ---------------------------------------------------------------------------------------------
# Apple, WWDC 2026 session 309 ("Explore Retention Messaging in App Store Connect"): among subscribers
# who reach the cancel confirmation, retention messages raised the save rate by 1.4 points on average
# (an 82% relative increase, so a base near 1.7%) and promotional offers by 5.5 points (223%, a base
# near 2.5%). The presets below put the base save rate of cancel-intent visitors near 2% and give
# every non-default message an effect of +1 to +6 points that depends on who the subscriber is.
PLAIN_MIN_PTS, PLAIN_MAX_PTS = 1.0, 6.0


@dataclass(frozen=True)
class Preset:
    """A world's effect structure: how P(stay) depends on the subscriber and the message."""

    name: str
    summary: str
    cancel_intent: bool  # the visitor reached the cancel confirmation (Apple's save-rate population)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("demo", "the project's teaching world: logit effects of 0.3 to 4.5, a best static message about "
               "20% below the oracle (see the module docstring)", cancel_intent=True),
        Preset("apple-segments", "cancel intent, base save rate about 1.8%; each message lifts everyone by about "
               "+1 point and its own segment (about one subscriber in ten) by +6 (sharp steps); offers +6 points "
               "for subscribers under 90 days, +1 after 180", cancel_intent=True),
        Preset("apple-smooth", "cancel intent, base about 1.8%; effects vary smoothly between +1 and +6 points with "
               "engagement, tenure and past offers (no step anywhere)", cancel_intent=True),
        Preset("apple-interactions", "cancel intent, base about 1.8%; a message reaches +6 points only where two "
               "traits meet (an offer for new AND promo-acquired subscribers, the loyalty message for long-tenure "
               "AND engaged ones), +1 elsewhere", cancel_intent=True),
        Preset("apple-browse", "page views that are not cancel intents: about 97% keep the subscription anyway; "
               "messages move that by -0.5 to +0.5 points, so an offer mostly gives its discount away",
               cancel_intent=False),
    )
}
APPLE_BASE_LOGIT = -4.05  # with the spread below, a mean base save rate near 2% among cancel-intent visitors
BROWSE_BASE_LOGIT = 3.6  # about 97% stay among visitors who were not about to cancel


def _step(x: np.ndarray, at: float) -> np.ndarray:
    return (x > at).astype(np.float64)


def _apple_p_stay(
    preset: str, s: _Subscribers, idx: np.ndarray, role: np.ndarray, discount: np.ndarray, foreign: np.ndarray
) -> np.ndarray:
    """Return the true P(stay) (n, K) under an Apple-sized preset: base rate plus effects in probability points."""
    foreign = foreign[:, None]
    eng = s.engagement[idx][:, None]
    tenure = s.tenure[idx][:, None].astype(np.float64)
    sessions = s.sessions[idx][:, None].astype(np.float64)
    offers = s.offers_redeemed[idx][:, None].astype(np.float64)
    promo = (s.channel[idx] == CHANNELS.index("promo"))[:, None].astype(np.float64)
    country = s.country[idx]
    c_base = np.array([COUNTRY_BASE[c] for c in COUNTRIES])[country][:, None]
    annual_friendly = np.isin(country, [COUNTRIES.index(c) for c in ANNUAL_FRIENDLY])[:, None].astype(np.float64)
    spread = 0.8 * (eng - 0.5) + 0.15 * np.clip(np.log(tenure / 150.0), -2.0, 2.0) + 0.5 * c_base + s.latent[idx][:, None]
    if preset == "apple-browse":
        base = 1.0 / (1.0 + np.exp(-(BROWSE_BASE_LOGIT + spread)))
        # effects in points, small either way: a message rarely changes the mind of someone not leaving
        a = np.zeros(role.shape)
        a = np.where(role == FEATURE, 0.5 * eng - 0.2, a)
        a = np.where(role == WHATS_NEW, np.where(foreign, 0.3, -0.2), a)
        a = np.where(role == LOYALTY, np.where(tenure > 540, 0.4, -0.1), a)
        a = np.where(role == PLAIN_OTHER, 0.0, a)
        a = np.where(np.isin(role, [ANNUAL, CHEAPER]), -0.5, a)
        a = np.where(role == OFFER, 0.5, a)
        p = base + a / 100.0
        # an unasked-for upgrade: most would rather stay where they are (counted as leaving the offer's plan)
        p = np.where(role == DEARER, 0.4 * base, p)
        return np.clip(p, 0.0, 1.0)

    base = 1.0 / (1.0 + np.exp(-(APPLE_BASE_LOGIT + spread)))
    new = np.clip((180.0 - tenure) / 90.0, 0.0, 1.0)  # 1 under 90 days, 0 after 180, linear between
    saver = _saver_score(s, idx)[:, None]
    if preset == "apple-segments":
        aud = {
            FEATURE: _step(eng, 0.85),
            WHATS_NEW: foreign * _step(-eng, -0.3),
            LOYALTY: _step(tenure, 900.0),
            ANNUAL: saver,
            CHEAPER: _step(-eng, -0.12),
            OFFER: new,
        }
    elif preset == "apple-smooth":
        aud = {
            FEATURE: np.clip((eng - 0.6) / 0.4, 0.0, 1.0) ** 2,
            WHATS_NEW: foreign * np.clip((0.5 - eng) / 0.5, 0.0, 1.0) ** 2,
            LOYALTY: np.clip(np.log(tenure / 365.0) / np.log(6.0), 0.0, 1.0) ** 2,
            ANNUAL: np.clip(offers / 4.0, 0.0, 1.0) ** 2,
            CHEAPER: np.clip((0.3 - eng) / 0.3, 0.0, 1.0),
            OFFER: np.exp(-tenure / 90.0),
        }
    elif preset == "apple-interactions":
        aud = {
            FEATURE: _step(eng, 0.7) * _step(sessions, 20.0),
            WHATS_NEW: foreign * _step(-sessions, -8.0),
            LOYALTY: _step(tenure, 540.0) * _step(eng, 0.6),
            ANNUAL: _step(offers, 1.5) * annual_friendly,
            CHEAPER: _step(-eng, -0.3) * _step(tenure, 365.0),
            OFFER: _step(-tenure, -150.0) * promo,
        }
    else:
        raise ValueError(f"unknown preset {preset!r}")
    span = PLAIN_MAX_PTS - PLAIN_MIN_PTS
    pts = np.zeros(role.shape)
    for r, a in aud.items():
        pts = np.where(role == r, PLAIN_MIN_PTS + span * a, pts)
    pts = np.where(role == PLAIN_OTHER, PLAIN_MIN_PTS, pts)
    # a simple offer (a free month) pulls a little more than a deep discount, which also costs more
    pts = np.where(role == OFFER, pts * np.clip(1.15 - 0.5 * np.clip(discount, 0.0, 1.0), 0.5, 1.0), pts)
    # an upgrade is a hard sell to someone leaving: most of them go; engaged ones stay at most +1 point more
    p = base + pts / 100.0
    p = np.where(role == DEARER, 0.4 * base + np.clip(eng - 0.5, 0.0, 0.5) * 2.0 / 100.0, p)
    return np.clip(p, 0.0, 1.0)


def p_stay_function(preset: str) -> Any:
    """Return the true-P(stay) function of a preset (see :data:`PRESETS`); ValueError naming the presets if unknown."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    if preset == "demo":
        return _true_p_stay

    def fn(s: _Subscribers, idx: np.ndarray, role: np.ndarray, discount: np.ndarray, foreign: np.ndarray) -> np.ndarray:
        return _apple_p_stay(preset, s, idx, role, discount, foreign)

    return fn


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
@dataclass
class _Decided:
    combo: np.ndarray  # (n,)
    probs: np.ndarray  # (n, K) logging probabilities
    p_stay: np.ndarray  # (n, K)
    chosen: np.ndarray  # (n,) slot
    stayed: np.ndarray  # (n,) bool


def _decide(
    rng: np.random.Generator,
    combos: _Combos,
    subs: _Subscribers,
    idx: np.ndarray,
    combo: np.ndarray,
    epsilon: float,
    p_stay_fn: Any = None,
    logging_rule: str = "rules",
) -> _Decided:
    """Return the logging policy's probabilities, its sampled choices and the sampled outcomes."""
    n = idx.shape[0]
    k_max = combos.msg.shape[1]
    # the hand-written rule: an offer for new subscribers (the most generous one when they came from a
    # promo campaign, else the cheapest), the annual plan for deal hunters, the cheaper plan for
    # inactive subscribers, a thank-you (loyalty) message after a year, localised news for non-English
    # speakers, else the default
    greedy = combos.default_slot[combo].copy()
    new_sub = subs.tenure[idx] < 120
    deal_hunter = subs.offers_redeemed[idx] >= 2
    inactive = subs.sessions[idx] < 6
    veteran = subs.tenure[idx] >= 365
    from_promo = subs.channel[idx] == CHANNELS.index("promo")
    offer = np.where(from_promo, combos.deep_offer_slot[combo], combos.offer_slot[combo])
    annual = combos.annual_slot[combo]
    cheaper = combos.cheaper_slot[combo]
    loyalty = combos.loyalty_slot[combo]
    whats_new = combos.whats_new_slot[combo]
    greedy = np.where(combos.foreign[combo] & (whats_new >= 0), whats_new, greedy)
    greedy = np.where(veteran & (loyalty >= 0), loyalty, greedy)
    greedy = np.where(inactive & (cheaper >= 0), cheaper, greedy)
    greedy = np.where(deal_hunter & (annual >= 0), annual, greedy)
    greedy = np.where(new_sub & (offer >= 0), offer, greedy)
    if logging_rule == "default":  # an app that has shown its default message so far, exploring around it
        greedy = combos.default_slot[combo].copy()

    # exact probabilities from the shared exploration code, once per distinct (combination, greedy slot)
    probs = np.zeros((n, k_max))
    keys = combo * k_max + greedy
    uniq, inverse = np.unique(keys, return_inverse=True)
    table = np.zeros((uniq.shape[0], k_max))
    for u, key in enumerate(uniq):
        c, g = divmod(int(key), k_max)
        scores = np.zeros(int(combos.k[c]))
        scores[combos.default_slot[c]] = 0.5
        scores[g] = 1.0
        table[u, : combos.k[c]] = action_probabilities(
            scores, epsilon=epsilon, default_index=int(combos.default_slot[c])
        )
    probs = table[inverse]

    cum = np.cumsum(probs, axis=1)
    draw = rng.random(n)
    chosen = np.minimum((cum <= (draw * cum[:, -1])[:, None]).sum(axis=1), combos.k[combo] - 1)
    p_stay = (p_stay_fn or _true_p_stay)(subs, idx, combos.role[combo], combos.discount[combo], combos.foreign[combo])
    p_stay = np.where(combos.msg[combo] >= 0, p_stay, 0.0)
    stayed = rng.random(n) < p_stay[np.arange(n), chosen]
    return _Decided(combo=combo, probs=probs, p_stay=p_stay, chosen=chosen, stayed=stayed)


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_DASHES = (8, 13, 18, 23)


def _uuid4_array(rng: np.random.Generator, n: int) -> pa.Array:
    """Return n random version-4 UUID strings drawn from `rng` (deterministic by seed), as an Arrow array."""
    b = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    b[:, 6] = (b[:, 6] & 0x0F) | 0x40
    b[:, 8] = (b[:, 8] & 0x3F) | 0x80
    nibbles = np.empty((n, 32), dtype=np.uint8)
    nibbles[:, 0::2] = b >> 4
    nibbles[:, 1::2] = b & 0x0F
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    keep = np.ones(36, dtype=bool)
    keep[list(_DASHES)] = False
    text[:, keep] = _HEX[nibbles]
    offsets = pa.array(np.arange(0, 36 * n + 1, 36, dtype=np.int32))
    return pa.StringArray.from_buffers(n, offsets.buffers()[1], pa.py_buffer(text.tobytes()))


def _str_series(values: pa.Array | list[str] | tuple[str, ...], idx: np.ndarray | None = None) -> pd.Series:
    """Return a pandas string column of `values` (taken at `idx`), built in Arrow without Python objects."""
    arr = values if isinstance(values, pa.Array) else pa.array(list(values), type=pa.string())
    if idx is not None:
        arr = arr.take(pa.array(np.asarray(idx, dtype=np.int64)))
    return pd.Series(arr, dtype=pd.StringDtype("pyarrow", na_value=np.nan))


# ---------------------------------------------------------------------------------------------
# outcome events
# ---------------------------------------------------------------------------------------------
def _events(
    rng: np.random.Generator,
    sub_ids: pa.Array,
    sub_idx: np.ndarray,
    t: np.ndarray,
    end: np.ndarray,
    stayed: np.ndarray,
    accepted: np.ndarray,
    period_ms: np.ndarray,
    observed_until: int,
) -> pd.DataFrame:
    """Return outcome events that the label rule (docs/data-formats.md) reads back as each decision's sampled outcome.

    Every event is placed strictly inside its decision's window [t, end), so a later
    decision of the same subscription never sees it. Events after `observed_until`
    (the snapshot time) are not in the data yet, which censors the latest decisions.
    `accepted` is 0 for a switch-plan message, 1 for an offer, -1 otherwise.
    """
    n = t.shape[0]
    span = (end - t).astype(np.float64)  # > 0
    parts_sub: list[np.ndarray] = []
    parts_event: list[np.ndarray] = []
    parts_at: list[np.ndarray] = []

    def emit(mask: np.ndarray, event: str, frac: np.ndarray) -> None:
        at = t[mask] + np.floor(frac[mask] * span[mask]).astype(np.int64)
        at = np.minimum(at, end[mask] - 1)
        parts_sub.append(sub_idx[mask])
        parts_event.append(np.full(int(mask.sum()), EVENT_CODES.index(event), dtype=np.int64))
        parts_at.append(at)

    churn = ~stayed
    # a churner turns auto-renew off, usually right away in the cancellation flow
    f_cancel = np.minimum(rng.random(n) ** 3 * 0.3, 0.3)
    flip = churn & (rng.random(n) < 0.12)  # cancel, re-enable, cancel again: the last one counts
    f1 = f_cancel * 0.3
    f2 = f_cancel * 0.3 + rng.random(n) * 0.2
    emit(churn & ~flip, "cancelled", f_cancel)
    emit(flip, "cancelled", f1)
    emit(flip, "reenabled", f1 + (f2 - f1) * 0.5)
    emit(flip, "cancelled", f2)
    f_last = np.where(flip, f2, f_cancel)
    expires = churn & (rng.random(n) < 0.45)
    f_exp = f_last + (1.0 - f_last) * rng.uniform(0.05, 0.95, n)
    emit(expires, "expired", f_exp)
    refund = churn & (rng.random(n) < 0.04)
    emit(refund, "refunded", f_last + (1.0 - f_last) * rng.uniform(0.01, 0.5, n))

    # a stayer: the accepted message, a renewal if its date falls in the window
    quick = np.minimum(HOUR_MS / span, 0.01) * rng.random(n)
    emit(stayed & (accepted == 0), "switched", quick)
    emit(stayed & (accepted == 1), "offer_redeemed", quick)
    # turned auto-renew off, then back on; only when both are observed, else a stayer would read as a churn
    a = np.asarray(rng.uniform(0.02, 0.3, n), dtype=np.float64)
    b = a + np.asarray(rng.uniform(0.01, 0.3, n), dtype=np.float64)
    wobble = stayed & (rng.random(n) < 0.1) & (t + b * span < observed_until)
    emit(wobble, "cancelled", a)
    emit(wobble, "reenabled", b)
    renew_in = rng.random(n) * period_ms
    renews = stayed & (renew_in < span)
    emit(renews, "renewed", renew_in / span)

    at = np.concatenate(parts_at).astype(np.int64)
    sub = np.concatenate(parts_sub)
    event = np.concatenate(parts_event)
    seen = at <= observed_until
    at, sub, event = at[seen], sub[seen], event[seen]
    order = np.lexsort((sub, at))
    out = pd.DataFrame(
        {
            "original_transaction_id": _str_series(sub_ids, sub[order]),
            "event": _str_series(EVENT_CODES, event[order]),
            "at": at[order],
        }
    )
    return out


# ---------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------
def simulate(
    n_decisions: int,
    *,
    seed: int = 0,
    epsilon: float = 0.1,
    catalog: Catalog | None = None,
    start_ms: int = DEFAULT_START_MS,
    horizon_ms: int = DEFAULT_HORIZON_MS,
    observe_days_after: float = 14.0,
    progress: bool = False,
    preset: str = "demo",
    logging_rule: str = "rules",
) -> World:
    """Return a simulated world with `n_decisions` logged decisions (deterministic by `seed`).

    Outcome events are observed until `observe_days_after` days after the last decision.
    `preset` names the effect structure (:data:`PRESETS`: ``demo``, or an Apple-sized world);
    ValueError for an unknown one. `logging_rule` is ``rules`` (the hand-written rule above) or
    ``default`` (the catalog default, as an app logs before it has any model), explored with `epsilon`.
    """
    p_stay_fn = p_stay_function(preset)
    if logging_rule not in LOGGING_RULES:
        raise ValueError(f"unknown logging rule {logging_rule!r}; one of {', '.join(LOGGING_RULES)}")
    if n_decisions < 1:
        raise ValueError(f"the number of decisions must be at least 1, got {n_decisions}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    from tqdm import tqdm

    bar = tqdm(total=5, desc="simulate", unit="step", file=sys.stderr, disable=None if progress else True)
    catalog = catalog if catalog is not None else Catalog.load(DEMO_CATALOG)
    rng = np.random.default_rng(seed)
    products = list(catalog.products)
    msg_ids = list(catalog.messages)

    # locales the catalog can answer (a language with no message at all gets no logged decision)
    locales = [loc for loc, _, _ in LOCALE_MIX]
    combos = _build_combos(catalog, locales)
    combo_at = np.full((len(products), len(locales)), -1, dtype=np.int64)
    combo_at[combos.product, combos.locale] = np.arange(combos.product.shape[0])
    loc_w = np.array([w for _, w, _ in LOCALE_MIX])
    prod_w = 1.0 / (np.arange(len(products)) + 1.0)  # the first products are the popular ones
    joint = np.where(combo_at >= 0, prod_w[:, None] * loc_w[None, :], 0.0)
    joint /= joint.sum()

    # subscribers: some get a second decision later; their first one comes early enough to leave room
    n2 = min(round(SECOND_DECISION_SHARE * n_decisions), n_decisions // 2)
    n_subs = n_decisions - n2
    cell = rng.choice(joint.size, size=n_subs, p=joint.ravel())
    product0, locale_i = np.divmod(cell, len(locales))
    locale_country = np.array([COUNTRIES.index(c) for _, _, c in LOCALE_MIX])[locale_i]
    subs = _draw_subscribers(rng, locale_country)
    sandbox = rng.random(n_subs) < 0.02
    # Apple-like numeric transaction ids, unique, in no particular order
    sub_numbers = 2_000_000_000_000_000 + rng.permutation(n_subs).astype(np.int64) * 7 + 13
    sub_ids = pa.array(sub_numbers).cast(pa.string())
    has_second = np.zeros(n_subs, dtype=bool)
    has_second[rng.choice(n_subs, size=n2, replace=False)] = True
    t1_days = np.where(has_second, rng.uniform(0.0, 25.0, n_subs), rng.uniform(0.0, SPAN_DAYS, n_subs))
    t1 = start_ms + np.rint(t1_days * DAY_MS).astype(np.int64)
    gap_ms = np.rint(rng.uniform(2.0, 35.0, n_subs) * DAY_MS).astype(np.int64)
    bar.update()

    all_subs = np.arange(n_subs)
    combo1 = combo_at[product0, locale_i]
    d1 = _decide(rng, combos, subs, all_subs, combo1, epsilon, p_stay_fn, logging_rule)
    # a subscriber who accepted a switch is on the new product at the second decision
    second = np.flatnonzero(has_second)
    prod2 = np.where(d1.stayed[second], combos.alt_product[combo1[second], d1.chosen[second]], product0[second])
    combo2 = combo_at[prod2, locale_i[second]]
    combo2 = np.where(combo2 >= 0, combo2, combo1[second])  # a product with no candidates here: keep the old one
    d2 = _decide(rng, combos, subs, second, combo2, epsilon, p_stay_fn, logging_rule)
    bar.update()

    # stack both rounds, in time order (the order of a decision log)
    sub_idx = np.concatenate([all_subs, second])
    t = np.concatenate([t1, t1[second] + gap_ms[second]])
    order = np.lexsort((sub_idx, t))
    sub_idx, t = sub_idx[order], t[order]
    combo = np.concatenate([combo1, combo2])[order]
    probs = np.concatenate([d1.probs, d2.probs])[order]
    p_stay = np.concatenate([d1.p_stay, d2.p_stay])[order]
    chosen = np.concatenate([d1.chosen, d2.chosen])[order]
    stayed = np.concatenate([d1.stayed, d2.stayed])[order]
    n = t.shape[0]
    rows = np.arange(n)
    request_ids = _uuid4_array(rng, n)
    cand_msg = combos.msg[combo]
    combo_lists = [[msg_ids[j] for j in combos.msg[c, : combos.k[c]]] for c in range(combos.msg.shape[0])]
    decisions = pd.DataFrame(
        {
            "request_id": _str_series(request_ids),
            "original_transaction_id": _str_series(sub_ids, sub_idx),
            "product_id": _str_series(products, combos.product[combo]),
            "user_locale": _str_series(locales, combos.locale[combo]),
            "environment": _str_series(["Production", "Sandbox"], sandbox[sub_idx].astype(np.int64)),
            "signed_date": t,
            "candidates": [list(combo_lists[c]) for c in combo.tolist()],
            "message_id": _str_series(msg_ids, cand_msg[rows, chosen]),
            "propensity": probs[rows, chosen],
            "model_version": _str_series([MODEL_VERSION], np.zeros(n, dtype=np.int64)),
            "policy": _str_series([POLICY_NAME], np.zeros(n, dtype=np.int64)),
        }
    )
    bar.update()

    # outcome windows: [t, min(t + H, next decision of the same subscription))
    by_sub = np.lexsort((t, sub_idx))
    s_sorted, t_sorted = sub_idx[by_sub], t[by_sub]
    nxt = np.full(n, np.iinfo(np.int64).max)
    nxt[by_sub[:-1]] = np.where(s_sorted[1:] == s_sorted[:-1], t_sorted[1:], np.iinfo(np.int64).max)
    end = np.minimum(t + np.int64(horizon_ms), nxt)
    role_shown = combos.role[combo, chosen]
    accepted = np.full(n, -1)
    accepted[np.isin(role_shown, [ANNUAL, CHEAPER, DEARER])] = 0
    accepted[role_shown == OFFER] = 1
    annual_now = np.array(["annual" in p.lower() or "year" in p.lower() for p in products])
    period = np.where(annual_now[combos.alt_product[combo, chosen]], 365 * DAY_MS, 30 * DAY_MS).astype(np.float64)
    observed_until = int(t.max()) + int(observe_days_after * DAY_MS)
    outcomes = _events(rng, sub_ids, sub_idx, t, end, stayed, accepted, period, observed_until)
    bar.update()

    profiles = pd.DataFrame(
        {
            "original_transaction_id": _str_series(sub_ids),
            "tenure_days": subs.tenure,
            "plan_age_days": subs.plan_age,
            "price_paid": np.round(
                np.array([catalog.products[p].value for p in products])[product0]
                * np.array([PRICE_FACTOR[c] for c in COUNTRIES])[subs.country]
                * rng.uniform(0.85, 1.0, n_subs),
                2,
            ),
            "engagement": subs.engagement,
            "sessions_30d": subs.sessions,
            "offers_redeemed": subs.offers_redeemed,
            "acquisition_channel": _str_series(CHANNELS, subs.channel),
            "country": _str_series(COUNTRIES, subs.country),
        }
    )

    r_idx, s_idx = np.nonzero(cand_msg >= 0)
    gt_combo = combo[r_idx]
    ground_truth = pd.DataFrame(
        {
            "request_id": _str_series(request_ids, r_idx),
            "message_id": _str_series(msg_ids, cand_msg[r_idx, s_idx]),
            "p_stay": p_stay[r_idx, s_idx],
            "value_after": combos.value_after[gt_combo, s_idx],
            "is_default": s_idx == combos.default_slot[gt_combo],
            "logging_prob": probs[r_idx, s_idx],
            "role": _str_series(ROLE_NAMES, combos.role[gt_combo, s_idx]),
        }
    )
    bar.update()
    bar.close()
    sampled = pd.DataFrame({"request_id": decisions["request_id"], "stayed": stayed})
    return World(decisions=decisions, outcomes=outcomes, profiles=profiles, ground_truth=ground_truth,
                 catalog=catalog, sampled=sampled)


def write_world(world: World, out_dir: Path, fmt: str = "parquet", *, progress: bool = False) -> dict[str, Path]:
    """Write the world's files into `out_dir` and return their paths by table name.

    A world already there is replaced: its files in the other format are removed too.
    """
    from tqdm import tqdm

    from training.data_io import write_table

    if fmt not in ("parquet", "csv"):
        raise ValueError(f"unknown format {fmt!r} (expected parquet or csv)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    names = ("decisions", "outcomes", "profiles", "ground_truth")
    for name in tqdm(names, desc="write", unit="file", file=sys.stderr, disable=None if progress else True):
        p = out / f"{name}.{fmt}"
        write_table(getattr(world, name), p)
        paths[name] = p
        other = out / f"{name}.{'csv' if fmt == 'parquet' else 'parquet'}"
        other.unlink(missing_ok=True)  # a world replaced in the other format: no file of the old one stays
    cat = out / "catalog.json"
    cat.write_bytes(world.catalog.to_json())
    paths["catalog"] = cat
    return paths


# ---------------------------------------------------------------------------------------------
# true values of policies
# ---------------------------------------------------------------------------------------------
def _value_matrix(ground_truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.Index]:
    """Return (values (R, M) with NaN where ineligible, default value per request, request codes, message ids)."""
    r_codes, _ = pd.factorize(ground_truth["request_id"])
    m_codes, m_ids = pd.factorize(ground_truth["message_id"])
    r_n = int(r_codes.max()) + 1 if r_codes.size else 0
    vals = np.full((r_n, len(m_ids)), np.nan)
    v = ground_truth["p_stay"].to_numpy(np.float64) * ground_truth["value_after"].to_numpy(np.float64)
    vals[r_codes, m_codes] = v
    default = np.full(r_n, np.nan)
    is_def = ground_truth["is_default"].to_numpy(bool)
    default[r_codes[is_def]] = v[is_def]
    # a request whose combination had no catalog default: its first candidate stands in
    missing = np.isnan(default)
    if missing.any():
        first = pd.Series(v).groupby(r_codes).first().to_numpy()
        default[missing] = first[missing]
    return vals, default, r_codes, pd.Index(m_ids)


def _mean_over_requests(ground_truth: pd.DataFrame, prob: np.ndarray) -> float:
    """Return mean over requests of Σ prob · p_stay · value_after, checking each request's probabilities sum to 1."""
    r_codes, r_ids = pd.factorize(ground_truth["request_id"])
    total = np.bincount(r_codes, weights=prob, minlength=len(r_ids))
    bad = np.flatnonzero(np.abs(total - 1.0) > 1e-6)
    if bad.size:
        raise ValueError(
            f"the policy's probabilities over eligible candidates do not sum to 1 for {bad.size} request(s), "
            f"e.g. request {r_ids[bad[0]]} (sum {total[bad[0]]:.6g})"
        )
    v = prob * ground_truth["p_stay"].to_numpy(np.float64) * ground_truth["value_after"].to_numpy(np.float64)
    return float(np.bincount(r_codes, weights=v, minlength=len(r_ids)).mean())


def policy_value(ground_truth: pd.DataFrame, probabilities: pd.DataFrame) -> float:
    """Return the true expected value per request of a policy given as rows (request_id, message_id, prob).

    Candidates the policy gives no row have probability 0; each request's probabilities over
    its eligible candidates must sum to 1 (else ValueError naming a request).
    """
    keys = ["request_id", "message_id"]
    aligned = len(probabilities) == len(ground_truth) and all(
        probabilities[k].reset_index(drop=True).equals(ground_truth[k].reset_index(drop=True)) for k in keys
    )
    if aligned:  # rows already in ground-truth order (the common case): skip the join
        prob = probabilities["prob"].to_numpy(np.float64)
    else:
        merged = ground_truth[keys].merge(probabilities[[*keys, "prob"]], on=keys, how="left")
        prob = merged["prob"].fillna(0.0).to_numpy(np.float64)
    return _mean_over_requests(ground_truth, prob)


def choice_value(ground_truth: pd.DataFrame, choices: pd.DataFrame) -> float:
    """Return the true expected value per request of a deterministic policy given as rows (request_id, message_id)."""
    probs = choices[["request_id", "message_id"]].assign(prob=1.0)
    return policy_value(ground_truth, probs)


def oracle_value(ground_truth: pd.DataFrame) -> float:
    """Return the true value per request of the oracle: each request's best candidate by P(stay) × value."""
    vals, _, _, _ = _value_matrix(ground_truth)
    return float(np.nanmax(vals, axis=1).mean())


def static_values(ground_truth: pd.DataFrame) -> pd.Series:
    """Return the true value per request of each static policy "m where eligible, else the default", by message id."""
    vals, default, _, m_ids = _value_matrix(ground_truth)
    per = np.where(np.isnan(vals), default[:, None], vals).mean(axis=0)
    return pd.Series(per, index=m_ids, name="value").sort_values(ascending=False)


def best_static_value(ground_truth: pd.DataFrame) -> tuple[float, str]:
    """Return the best single static message's true value per request and that message's id."""
    s = static_values(ground_truth)
    return float(s.iloc[0]), str(s.index[0])


def logging_value(ground_truth: pd.DataFrame, decisions: pd.DataFrame) -> float:
    """Return the logging policy's true value per request.

    Exact (Σ π_log · p · value) when the ground truth carries ``logging_prob``; otherwise
    the true value of the messages actually shown in `decisions`.
    """
    if "logging_prob" in ground_truth.columns:
        return _mean_over_requests(ground_truth, ground_truth["logging_prob"].to_numpy(np.float64))
    return choice_value(ground_truth, decisions[["request_id", "message_id"]])


def gap_captured(v_model: float, v_static: float, v_oracle: float) -> float:
    """Return (V_model − V_static) / (V_oracle − V_static), NaN when the oracle does not beat the static policy."""
    gap = v_oracle - v_static
    return (v_model - v_static) / gap if gap > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention simulate",
        description="Write a synthetic world's decisions, outcomes and profiles (the data files of docs/data-formats.md), "
        "its ground truth and the catalog used, deterministic by seed.",
    )
    p.add_argument("--n", type=int_in(1, 100_000_000), default=100_000,
                   help="number of logged decisions, 1 to 100,000,000 (default 100000)")
    p.add_argument("--seed", type=int_in(0), default=0, help="random seed, 0 or more (default 0)")
    p.add_argument("--epsilon", type=float, default=0.1, help="exploration of the logging policy (default 0.1)")
    p.add_argument("--out", required=True, type=Path, help="output folder (a world already there is replaced)")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="file format (default parquet)")
    p.add_argument("--catalog", type=Path, default=None, help="catalog JSON (default: the demo catalog)")
    p.add_argument("--start-ms", type=time_ms, default=DEFAULT_START_MS,
                   help=f"time of the first possible decision, ms since the epoch or ISO 8601 (default {DEFAULT_START_MS})")
    p.add_argument("--horizon-days", type=float, default=30.0, help="label horizon the outcomes follow (default 30)")
    p.add_argument("--preset", default="demo", help="effect structure: " + "; ".join(
        f"{name}: {pr.summary}" for name, pr in PRESETS.items()).replace("%", "%%") + " (default demo)")
    p.add_argument("--logging-rule", choices=LOGGING_RULES, default="rules",
                   help="what the logging policy explores around: the hand-written rules (default) or the default "
                        "message (an app before its first model)")
    return p


def main(argv: list[str]) -> int:
    """Run ``retention simulate``: write the world's files and print a summary; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.001 <= args.horizon_days <= 3650:
        parser.error("--horizon-days must be from 0.001 to 3650")
    if args.start_ms > 253_402_300_799_999 - 400 * 86_400_000:  # the world's decisions and outcomes follow it
        parser.error("--start-ms must leave the world (its decisions and their outcomes) before the year 9999 ends")
    if not 0.0 <= args.epsilon <= 1.0:
        parser.error("--epsilon must be in [0, 1]")
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; one of {', '.join(PRESETS)}")
    catalog = Catalog.load(args.catalog) if args.catalog is not None else None
    horizon_ms = int(args.horizon_days * DAY_MS)
    started = time.perf_counter()
    world = simulate(args.n, seed=args.seed, epsilon=args.epsilon, catalog=catalog, start_ms=args.start_ms,
                     horizon_ms=horizon_ms, progress=True, preset=args.preset, logging_rule=args.logging_rule)
    replaced = any((args.out / f"{name}.{args.format}").exists() for name in ("decisions", "outcomes"))
    paths = write_world(world, args.out, args.format, progress=True)
    elapsed = time.perf_counter() - started

    from training.labels import label_decisions

    _, stats = label_decisions(world.decisions, world.outcomes, horizon_ms=horizon_ms)
    gt = world.ground_truth
    v_oracle = oracle_value(gt)
    v_static, static_id = best_static_value(gt)
    v_log = logging_value(gt, world.decisions)
    first, last = world.decisions["signed_date"].min(), world.decisions["signed_date"].max()
    lines = [
        f"decisions        {len(world.decisions):>12,}  ({world.decisions['original_transaction_id'].nunique():,} "
        f"subscriptions, {(last - first) / DAY_MS:.1f} days)",
        f"outcome events   {len(world.outcomes):>12,}",
        f"profiles         {len(world.profiles):>12,}",
        f"labels           {stats.retained:>12,} retained, {stats.churned:,} churned, {stats.censored:,} censored",
        f"oracle value     {v_oracle:>12.3f}  per request",
        f"best static      {v_static:>12.3f}  ({static_id}; {100 * (1 - v_static / v_oracle):.1f}% below oracle)",
        f"logging policy   {v_log:>12.3f}  (gap captured {gap_captured(v_log, v_static, v_oracle):+.3f})",
        f"written to       {args.out!s:>12}  ({args.format}, {elapsed:.1f} s"
        + ("; the world that was there is replaced)" if replaced else ")"),
    ]
    for name, p in paths.items():
        lines.append(f"  {name:<14} {p}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
