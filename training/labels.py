"""The label of a logged decision (docs/data-formats.md, "The label rule"), implemented once.

A decision at time t for subscription s, with horizon H, looks only at the events of s
in the window [t, t + H), cut short by the next decision for s (the window then ends
where that decision starts, so an event belongs to at most one decision time):

- *churned* (0.0) if the last of ``cancelled``/``reenabled`` in the window is
  ``cancelled``, or an ``expired`` event (Apple's ``EXPIRED`` with subtype ``VOLUNTARY``)
  falls in it;
- else, when an involuntary end (``expired_involuntary``: ``EXPIRED`` with subtype
  ``BILLING_RETRY``, ``PRICE_INCREASE`` or ``PRODUCT_NOT_FOR_SALE``; ``grace_expired``:
  ``GRACE_PERIOD_EXPIRED``) falls in it, *censored* by default (a retention message does not
  cause a failed payment or a declined price increase), or churned with
  ``involuntary="churn"``;
- else *retained* (1.0) if a ``renewed`` event falls in it, or the window has fully
  passed as of the newest event in the data (or ``as_of_ms`` when given);
- else *censored* (NaN): left out of training and counted.

Every other event (``billing_failed``, ``upgraded``, ``downgraded``, ``downgrade_reverted``,
``resubscribed``, ``other``...) is kept in the data and read by no label. When the outcomes
carry Apple's raw ``raw_type``/``raw_subtype`` (the server's export), the event is derived from
them again, so that logs written before an event was told apart are read with today's meaning.

Details the rule leaves open, decided here:
- the window includes t and excludes its end (an event at exactly the next decision's
  time belongs to that next decision);
- the "next decision" is the next one at a strictly later time: several decisions of
  one subscription at the same millisecond share one window and one label;
- events that tie on ``at`` keep their order in the outcomes table when picking the
  last of ``cancelled``/``reenabled``;
- ``as_of_ms`` only decides whether a window has fully passed; it does not hide events
  (filter the outcomes first to replay an earlier snapshot). Without it, and without
  any outcome event, the newest decision time stands in for the newest event.

The implementation is vectorised: each event is assigned to the one decision window it
can fall in with a binary search, so labelling is O((decisions + events) log n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from models.data_files import (
    APPLE_FALLBACK_POLICY,
    INVOLUNTARY_ENDS,
    OFFER_TYPE_PROMOTIONAL,
    OFFER_TYPE_RETENTION,
    event_for_notification,
)

DAY_MS = 86_400_000
DEFAULT_HORIZON_MS = 30 * DAY_MS
#: What an involuntary end (billing, price increase, product withdrawn) makes of a decision.
INVOLUNTARY_RULES: tuple[str, ...] = ("censor", "churn")
#: How long after a decision a redemption of its promotional offer is credited to it.
DEFAULT_OFFER_WINDOW_MS = 7 * DAY_MS


@dataclass
class LabelStats:
    """How many decisions were labelled retained, churned, or censored (left out)."""

    total: int
    retained: int
    churned: int
    censored: int
    involuntary: int = 0  # censored because the subscription ended for a billing or price reason


def label_decisions(
    decisions: pd.DataFrame,
    outcomes: pd.DataFrame,
    *,
    horizon_ms: int = DEFAULT_HORIZON_MS,
    as_of_ms: int | None = None,
    mature_only: bool = False,
    involuntary: str = "censor",
) -> tuple[pd.Series, LabelStats]:
    """Return one label per decision row (1.0 retained, 0.0 churned, NaN censored, aligned with
    ``decisions.index``) and the counts; see the module docstring for the rule.

    With `mature_only`, a decision whose window has not fully passed is censored even when a churn
    or a renewal already labels it: those early labels exist only for subscribers who acted early,
    so keeping them makes the recent sample lean toward churn. `involuntary` is ``"censor"`` (the
    default) or ``"churn"``: what an involuntary end with no cancellation makes of a decision.
    """
    if horizon_ms <= 0:
        raise ValueError(f"the label horizon must be positive, got {horizon_ms} ms")
    if involuntary not in INVOLUNTARY_RULES:
        raise ValueError(f"the involuntary-expiry rule must be one of {', '.join(INVOLUNTARY_RULES)}, not {involuntary!r}")
    n = len(decisions)
    if n == 0:
        return pd.Series(np.array([], dtype=np.float64), index=decisions.index, name="label"), LabelStats(0, 0, 0, 0)

    d_sub = decisions["original_transaction_id"].astype("str").to_numpy()
    d_t = decisions["signed_date"].to_numpy(dtype=np.int64)
    codes, subs = pd.factorize(d_sub)
    codes = codes.astype(np.int64)

    # Unique (subscription, time) decision points, sorted; each owns one window.
    order = np.lexsort((d_t, codes))
    cs, ts = codes[order], d_t[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (cs[1:] != cs[:-1]) | (ts[1:] != ts[:-1])
    point_of_row = np.empty(n, dtype=np.int64)
    point_of_row[order] = np.cumsum(new) - 1
    u_code, u_t = cs[new], ts[new]
    m = u_code.shape[0]
    u_end = u_t + np.int64(horizon_ms)
    same_next = np.zeros(m, dtype=bool)
    same_next[:-1] = u_code[1:] == u_code[:-1]
    u_end[:-1] = np.where(same_next[:-1], np.minimum(u_end[:-1], u_t[1:]), u_end[:-1])

    if as_of_ms is None:
        as_of_ms = int(np.max(outcomes["at"].to_numpy(dtype=np.int64))) if len(outcomes) else int(d_t.max())

    churn = np.zeros(m, dtype=bool)
    renewed = np.zeros(m, dtype=bool)
    ended = np.zeros(m, dtype=bool)
    if len(outcomes):
        e_code = pd.Index(subs).get_indexer(outcomes["original_transaction_id"].astype("str").to_numpy())
        e_code = e_code.astype(np.int64)
        e_at = outcomes["at"].to_numpy(dtype=np.int64)
        e_event = outcome_events(outcomes)
        known = e_code >= 0
        e_code, e_at, e_event = e_code[known], e_at[known], e_event[known]
        e_pos = np.flatnonzero(known)
        if e_code.size:
            # Map each event to the last decision point of its subscription at or before it:
            # rank all times together so (code, time) packs into one sortable int64 key.
            times, inv = np.unique(np.concatenate([u_t, e_at]), return_inverse=True)
            r = np.int64(times.shape[0])
            u_key = u_code * r + inv[:m]
            e_key = e_code * r + inv[m:]
            j = np.searchsorted(u_key, e_key, side="right") - 1
            jc = np.clip(j, 0, m - 1)
            inside = (j >= 0) & (u_code[jc] == e_code) & (e_at < u_end[jc])
            j, e_at, e_event, e_pos = jc[inside], e_at[inside], e_event[inside], e_pos[inside]

            expired = np.bincount(j[e_event == "expired"], minlength=m) > 0
            renewed = np.bincount(j[e_event == "renewed"], minlength=m) > 0
            ended = np.bincount(j[np.isin(e_event, list(INVOLUNTARY_ENDS))], minlength=m) > 0
            cr = (e_event == "cancelled") | (e_event == "reenabled")
            last_cancelled = np.zeros(m, dtype=bool)
            if cr.any():
                jj, aa, pp, ev = j[cr], e_at[cr], e_pos[cr], e_event[cr]
                o = np.lexsort((pp, aa, jj))
                jj, ev = jj[o], ev[o]
                last = np.ones(jj.shape[0], dtype=bool)
                last[:-1] = jj[1:] != jj[:-1]
                last_cancelled[jj[last]] = ev[last] == "cancelled"
            churn = last_cancelled | expired
    if involuntary == "churn":
        churn = churn | ended
    censor_involuntary = ended & ~churn

    passed = u_end <= np.int64(as_of_ms)
    if mature_only:
        point_label = np.where(passed, np.where(churn, 0.0, 1.0), np.nan)
    else:
        point_label = np.where(churn, 0.0, np.where(renewed | passed, 1.0, np.nan))
    point_label[censor_involuntary] = np.nan
    labels = point_label[point_of_row]
    retained = int(np.sum(labels == 1.0))
    churned = int(np.sum(labels == 0.0))
    stats = LabelStats(
        total=n, retained=retained, churned=churned, censored=n - retained - churned,
        involuntary=int(censor_involuntary[point_of_row].sum()),
    )
    return pd.Series(labels, index=decisions.index, name="label"), stats


def reward(labels: np.ndarray | pd.Series, values_after: np.ndarray | pd.Series) -> np.ndarray:
    """Return the observed reward label × (V(product after m) − cost(m)) per decision (NaN where censored)."""
    return np.asarray(labels, dtype=np.float64) * np.asarray(values_after, dtype=np.float64)


def outcome_events(outcomes: pd.DataFrame) -> np.ndarray:
    """Return each outcome's event as a string array, derived again from Apple's raw type and subtype where present.

    https://developer.apple.com/documentation/appstoreservernotifications/notificationtype
    """
    events = outcomes["event"].astype("str").to_numpy().copy()
    if "raw_type" not in outcomes.columns:
        return events
    raw_type = outcomes["raw_type"].to_numpy(dtype=object)
    raw_sub = outcomes["raw_subtype"].to_numpy(dtype=object) if "raw_subtype" in outcomes.columns else None
    for i in np.flatnonzero(pd.notna(raw_type)):
        sub = raw_sub[i] if raw_sub is not None and isinstance(raw_sub[i], str) else None
        derived = event_for_notification(str(raw_type[i]), sub)
        if derived is not None:
            events[i] = derived
    return events


def credited_offers(
    decisions: pd.DataFrame,
    outcomes: pd.DataFrame,
    offer_of_message: dict[str, str],
    *,
    window_ms: int = DEFAULT_OFFER_WINDOW_MS,
) -> np.ndarray:
    """Return, per decision row, who an offer redemption after it belongs to: ``"ours"``, ``"apple"`` or ``""``.

    A redemption is an outcome with an ``offer_type`` (Apple's ``offerType``) whose event is
    ``offer_redeemed``, ``subscribed`` or ``resubscribed``, for the decision's
    ``original_transaction_id``, at or after the decision and before ``window_ms`` has passed
    (cut short by the subscription's next decision). It is ``"ours"`` only when it is a
    promotional offer (type 2) whose ``offerIdentifier`` is the one of the message the decision
    showed (`offer_of_message`: message id -> offerIdentifier); a retention offer Apple chose
    itself (type 5) is ``"apple"``: the subscriber saw Apple's App Store Connect message, not
    ours. Anything else credits nothing. Offer types:
    https://developer.apple.com/documentation/appstoreservernotifications/offertype
    """
    n = len(decisions)
    out = np.full(n, "", dtype=object)
    if n == 0 or not len(outcomes) or "offer_type" not in outcomes.columns:
        return out
    events = outcome_events(outcomes)
    offer_type = pd.to_numeric(outcomes["offer_type"], errors="coerce").to_numpy(dtype=np.float64)
    is_redemption = np.isin(events, ["offer_redeemed", "subscribed", "resubscribed"]) & np.isfinite(offer_type)
    if not is_redemption.any():
        return out
    ident = outcomes["offer_identifier"] if "offer_identifier" in outcomes.columns else pd.Series([None] * len(outcomes))
    red = pd.DataFrame({
        "otid": outcomes["original_transaction_id"].astype("str").to_numpy()[is_redemption],
        "at": outcomes["at"].to_numpy(dtype=np.int64)[is_redemption],
        "offer_type": offer_type[is_redemption].astype(np.int64),
        "offer_identifier": ident.to_numpy(dtype=object)[is_redemption],
    })
    d = pd.DataFrame({
        "row": np.arange(n),
        "otid": decisions["original_transaction_id"].astype("str").to_numpy(),
        "t": decisions["signed_date"].to_numpy(dtype=np.int64),
        "offer": decisions["message_id"].map(lambda mid: offer_of_message.get(str(mid))).to_numpy(dtype=object),
    })
    d = d.sort_values(["otid", "t"], kind="stable")
    nxt = d.groupby("otid")["t"].shift(-1)
    d["end"] = np.minimum(d["t"].to_numpy() + np.int64(window_ms),
                          np.where(nxt.isna() | (nxt.to_numpy() == d["t"].to_numpy()), np.iinfo(np.int64).max,
                                   nxt.fillna(0).to_numpy(dtype=np.int64)))
    j = d.merge(red, on="otid")
    j = j[(j["at"] >= j["t"]) & (j["at"] < j["end"])]
    apple = j.loc[j["offer_type"] == OFFER_TYPE_RETENTION, "row"].to_numpy(dtype=np.int64)
    ours = j.loc[(j["offer_type"] == OFFER_TYPE_PROMOTIONAL) & j["offer"].notna()
                 & (j["offer_identifier"] == j["offer"]), "row"].to_numpy(dtype=np.int64)
    out[ours] = "ours"
    out[apple] = "apple"  # Apple's own offer wins: whatever we answered, the subscriber saw Apple's message
    return out


def apple_choice(
    decisions: pd.DataFrame,
    outcomes: pd.DataFrame,
    offer_of_message: dict[str, str],
    *,
    window_ms: int = DEFAULT_OFFER_WINDOW_MS,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (Apple chose the message, offers credited to our answer) as bool arrays per decision row.

    Apple chose when the decision's policy is ``apple_fallback`` (our answer was a 404 or later than
    Apple waits) or a retention offer Apple picked itself (type 5) was redeemed after it: such a
    decision's outcome belongs to Apple's choice, a separate arm of the evaluation, never to the
    message we logged. See :func:`credited_offers`.
    """
    credit = credited_offers(decisions, outcomes, offer_of_message, window_ms=window_ms)
    policy: Any = decisions["policy"] if "policy" in decisions.columns else pd.Series([""] * len(decisions))
    apple = (policy.astype("str").to_numpy() == APPLE_FALLBACK_POLICY) | (credit == "apple")
    return apple, credit == "ours"
