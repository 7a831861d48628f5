"""The label of a logged decision (DESIGN.md, "The label of a decision"), implemented once.

A decision at time t for subscription s, with horizon H, looks only at the events of s
in the window [t, t + H), cut short by the next decision for s (the window then ends
where that decision starts, so an event belongs to at most one decision time):

- *churned* (0.0) if the last of ``cancelled``/``reenabled`` in the window is
  ``cancelled``, or an ``expired`` event falls in it;
- else *retained* (1.0) if a ``renewed`` event falls in it, or the window has fully
  passed as of the newest event in the data (or ``as_of_ms`` when given);
- else *censored* (NaN): left out of training and counted.

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

import numpy as np
import pandas as pd

DAY_MS = 86_400_000
DEFAULT_HORIZON_MS = 30 * DAY_MS


@dataclass
class LabelStats:
    """How many decisions were labelled retained, churned, or censored (left out)."""

    total: int
    retained: int
    churned: int
    censored: int


def label_decisions(
    decisions: pd.DataFrame,
    outcomes: pd.DataFrame,
    *,
    horizon_ms: int = DEFAULT_HORIZON_MS,
    as_of_ms: int | None = None,
    mature_only: bool = False,
) -> tuple[pd.Series, LabelStats]:
    """Return one label per decision row (1.0 retained, 0.0 churned, NaN censored, aligned with
    ``decisions.index``) and the counts; see the module docstring for the rule.

    With `mature_only`, a decision whose window has not fully passed is censored even when a churn
    or a renewal already labels it: those early labels exist only for subscribers who acted early,
    so keeping them makes the recent sample lean toward churn.
    """
    if horizon_ms <= 0:
        raise ValueError(f"the label horizon must be positive, got {horizon_ms} ms")
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
    if len(outcomes):
        e_code = pd.Index(subs).get_indexer(outcomes["original_transaction_id"].astype("str").to_numpy())
        e_code = e_code.astype(np.int64)
        e_at = outcomes["at"].to_numpy(dtype=np.int64)
        e_event = outcomes["event"].astype("str").to_numpy()
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

    passed = u_end <= np.int64(as_of_ms)
    if mature_only:
        point_label = np.where(passed, np.where(churn, 0.0, 1.0), np.nan)
    else:
        point_label = np.where(churn, 0.0, np.where(renewed | passed, 1.0, np.nan))
    labels = point_label[point_of_row]
    retained = int(np.sum(labels == 1.0))
    churned = int(np.sum(labels == 0.0))
    stats = LabelStats(total=n, retained=retained, churned=churned, censored=n - retained - churned)
    return pd.Series(labels, index=decisions.index, name="label"), stats


def reward(labels: np.ndarray | pd.Series, values_after: np.ndarray | pd.Series) -> np.ndarray:
    """Return the observed reward label × (V(product after m) − cost(m)) per decision (NaN where censored)."""
    return np.asarray(labels, dtype=np.float64) * np.asarray(values_after, dtype=np.float64)
