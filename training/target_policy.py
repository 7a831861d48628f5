"""Logged decisions as padded arrays, and the policy a model version would actually run on them.

For every logged request, a model version's *target policy* is the probability it would have
shown each of that request's logged candidates, computed exactly as serving computes it:
the same candidates (the logged list, default included), the same featurizer (the version's
schema), P(stay) from the same ONNX graph, the same value formula

    value(m) = P(stay | x, m) × (V(product after m) − cost(m))

and the same exploration math (``models.exploration.action_probabilities``) with serving's
settings (ε, scheme, temperature, holdout, the default's index). A request whose scores are
not all finite gets serving's fallback: the default message, else the first plain or
switch-plan message, with probability 1.

The logging policy's distribution over candidates comes, per request, from the first of:

1. a ``probabilities`` column (the server's own log records each candidate's probability), when
   it sums to 1 and agrees with the logged propensity;
2. the rule for fallbacks: a policy starting with ``fallback:`` showed its message with
   probability 1 and could show nothing else;
3. a propensity of 1: the logging policy was deterministic on that request;
4. otherwise the exact split is unknown, but an exploring policy (ε-greedy, softmax) gives
   every eligible candidate some probability: the shown one has its logged propensity and the
   rest share 1 − propensity equally. Only the *support* (which candidates had probability > 0)
   matters for the estimates, through the unsupported-mass report and switch-DR's τ.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import numpy as np
import pandas as pd

from models.catalog import Catalog
from models.exploration import Exploration

FALLBACK_PREFIX = "fallback:"
_CHUNK_CELLS = 250_000  # feature rows scored per ONNX call: bounds memory at 100k+ requests


@dataclasses.dataclass
class LoggedRequests:
    """Logged decisions laid out as (n, K) arrays, candidates in logged order, padded to the widest request."""

    frame: pd.DataFrame  # the decision rows, index 0..n-1
    candidate_ids: np.ndarray  # (n, K) message ids, "" as padding
    valid: np.ndarray  # (n, K) bool
    k: np.ndarray  # (n,) number of candidates
    actions: np.ndarray  # (n,) column of the shown message
    propensities: np.ndarray  # (n,)
    logging_probs: np.ndarray  # (n, K) logged distribution (see the module docstring)
    logging_source: np.ndarray  # (n,) "logged", "fallback", "deterministic" or "inferred"
    value_after: np.ndarray  # (n, K) V(product after m) − cost(m), 0 on padding
    default_index: np.ndarray  # (n,) column of the catalog default among the candidates, -1 if absent
    is_fallback: np.ndarray  # (n,) bool

    @property
    def n(self) -> int:
        """Return the number of requests."""
        return int(self.k.shape[0])

    def subset(self, rows: np.ndarray) -> LoggedRequests:
        """Return the requests selected by a boolean mask or index array, re-indexed from 0."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return LoggedRequests(
            frame=self.frame.iloc[idx].reset_index(drop=True),
            **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self) if f.name != "frame"},
        )


def _as_float_list(value: Any) -> list[float] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list | tuple | np.ndarray):
        try:
            return [float(x) for x in value]
        except (TypeError, ValueError):
            return None
    return None


def prepare_logged(decisions: pd.DataFrame, catalog: Catalog) -> tuple[LoggedRequests, dict[str, int]]:
    """Return the decisions as :class:`LoggedRequests` and the count of requests left out, by reason.

    A request is left out when one of its candidates is no longer in the catalog (its value
    cannot be computed); the caller reports how many.
    """
    frame = decisions.reset_index(drop=True)
    cands: list[list[str]] = [list(c) for c in frame["candidates"].tolist()]
    known = np.fromiter((all(m in catalog.messages for m in c) for c in cands), dtype=bool, count=len(cands))
    dropped = {"candidate not in catalog": int((~known).sum())}
    if not known.all():
        frame = frame[known].reset_index(drop=True)
        cands = [c for c, ok in zip(cands, known, strict=True) if ok]
    n = len(cands)
    k = np.fromiter((len(c) for c in cands), dtype=np.int64, count=n)
    width = int(k.max()) if n else 1
    ids = np.full((n, width), "", dtype=object)
    valid = np.arange(width)[None, :] < k[:, None]
    value_after = np.zeros((n, width))
    default_index = np.full(n, -1, dtype=np.int64)
    products = frame["product_id"].astype(str).tolist()
    locales = frame["user_locale"].astype(str).tolist()
    shown = frame["message_id"].astype(str).tolist()
    actions = np.empty(n, dtype=np.int64)
    va_cache: dict[tuple[str, str], float] = {}
    def_cache: dict[tuple[str, str], str | None] = {}
    for i, c in enumerate(cands):
        ids[i, : len(c)] = c
        pid = products[i]
        for j, mid in enumerate(c):
            key = (mid, pid)
            v = va_cache.get(key)
            if v is None:
                v = va_cache[key] = catalog.value_after(catalog.messages[mid], pid)
            value_after[i, j] = v
        dkey = (pid, locales[i])
        if dkey not in def_cache:
            d = catalog.default_for(pid, locales[i])
            def_cache[dkey] = d.messageIdentifier if d is not None else None
        dmid = def_cache[dkey]
        if dmid is not None and dmid in c:
            default_index[i] = c.index(dmid)
        try:
            actions[i] = c.index(shown[i])
        except ValueError:
            raise ValueError(
                f"decision {frame['request_id'].iloc[i]}: message_id {shown[i]} is not in its own candidates"
            ) from None
    propensities = frame["propensity"].to_numpy(dtype=np.float64)
    policy = frame["policy"].astype(str).to_numpy() if "policy" in frame.columns else np.full(n, "", dtype=object)
    is_fallback = np.fromiter((str(p).startswith(FALLBACK_PREFIX) for p in policy), dtype=bool, count=n)

    logging_probs = np.zeros((n, width))
    source = np.empty(n, dtype=object)
    logged_col = frame["probabilities"].tolist() if "probabilities" in frame.columns else [None] * n
    rows = np.arange(n)
    for i in range(n):
        ki = int(k[i])
        probs = _as_float_list(logged_col[i])
        if is_fallback[i]:
            logging_probs[i, actions[i]] = 1.0
            source[i] = "fallback"
        elif (
            probs is not None
            and len(probs) == ki
            and abs(sum(probs) - 1.0) < 1e-6
            and abs(probs[actions[i]] - propensities[i]) < 1e-6  # a vector that disagrees is not trusted
        ):
            logging_probs[i, :ki] = probs
            source[i] = "logged"
        elif propensities[i] >= 1.0 - 1e-12:
            logging_probs[i, actions[i]] = 1.0
            source[i] = "deterministic"
        else:
            rest = (1.0 - propensities[i]) / (ki - 1) if ki > 1 else 0.0
            logging_probs[i, :ki] = rest
            logging_probs[i, actions[i]] = propensities[i]
            source[i] = "inferred"
    # the logged propensity is the truth for the shown message whatever the source
    logging_probs[rows, actions] = np.where(is_fallback, 1.0, propensities)
    logged = LoggedRequests(
        frame=frame,
        candidate_ids=ids,
        valid=valid,
        k=k,
        actions=actions,
        propensities=np.where(is_fallback, 1.0, propensities),
        logging_probs=logging_probs,
        logging_source=source,
        value_after=value_after,
        default_index=default_index,
        is_fallback=is_fallback,
    )
    return logged, dropped


@dataclasses.dataclass
class TargetPolicy:
    """A model version's policy on logged requests: scores, values, probabilities, greedy choice."""

    name: str
    p_stay: np.ndarray  # (n, K) P(stay) per candidate (NaN on padding or where scoring failed)
    values: np.ndarray  # (n, K) expected value per candidate (0 on padding)
    probs: np.ndarray  # (n, K) probability of showing each candidate
    greedy: np.ndarray  # (n,) column of the highest-value candidate (the rule's pick where scores failed)
    rule_rows: np.ndarray  # (n,) bool: the scores were unusable and serving's fallback rule applies

    def reward_hat(self, logged: LoggedRequests) -> np.ndarray:
        """Return the (n, K) predicted reward P(stay) × value_after, for the direct and doubly robust methods."""
        return np.where(logged.valid & np.isfinite(self.p_stay), np.nan_to_num(self.p_stay) * logged.value_after, 0.0)

    def long_table(self, logged: LoggedRequests) -> pd.DataFrame:
        """Return rows (request_id, message_id, prob) over every logged candidate (the simulator's format)."""
        r, c = np.nonzero(logged.valid)
        return pd.DataFrame(
            {
                "request_id": logged.frame["request_id"].to_numpy()[r],
                "message_id": logged.candidate_ids[r, c],
                "prob": self.probs[r, c],
            }
        )


def logging_policy(logged: LoggedRequests) -> TargetPolicy:
    """Return the logging policy itself as a target (its logged or inferred distribution)."""
    probs = logged.logging_probs / logged.logging_probs.sum(axis=1, keepdims=True)
    nan = np.full(probs.shape, np.nan)
    return TargetPolicy("logging", nan, np.zeros(probs.shape), probs, probs.argmax(axis=1), np.zeros(logged.n, bool))


def _rule_index(candidates: list[str], default_index: int, catalog: Catalog) -> int:
    # serving's rule policy: the default, else the first plain or switch-plan message (else the first)
    if default_index >= 0:
        return default_index
    for j, mid in enumerate(candidates):
        if catalog.messages[mid].kind in ("message", "alternateProduct"):
            return j
    return 0


class MissingProfilesError(ValueError):
    """A model that reads profile columns, and neither a profiles file nor logged profile values to give them."""


def require_profiles(schema: Any, version: str, decisions: pd.DataFrame, profiles: Any, *, allow: bool = False) -> None:
    """Raise :class:`MissingProfilesError` (one sentence) when `version` would be scored without its profile columns.

    A model trained with profile columns (`schema`, a :class:`models.features.FeatureSchema`) scored with
    none treats every subscriber as one without a profile: its choices, and so any estimate of its
    value, change silently. The values come from `profiles` (a file, given) or from the decisions'
    ``profile`` column: the server logs, for every decision that showed a message, the values it used
    (JSON ``null`` where the subscriber had none or no profile store was configured: what serving did).
    A decision that showed a message and logged nothing there (no such column: a simulated world or
    files built by hand; an empty cell: logged before the column existed) needs the file.
    `allow` (``--allow-missing-profiles``) scores such requests without one instead.
    """
    columns = list(schema.profile_numeric) + list(schema.profile_categorical)
    if not columns or allow or profiles is not None:
        return
    shown = (decisions["message_id"].notna().to_numpy() if "message_id" in decisions.columns
             else np.ones(len(decisions), dtype=bool))  # a request answered with no message is never scored
    logged = decisions["profile"].notna().to_numpy() if "profile" in decisions.columns else np.zeros(len(decisions), bool)
    unlogged = int((shown & ~logged).sum())
    if unlogged == 0:
        return
    raise MissingProfilesError(
        f"model {version} was trained with profile columns ({', '.join(columns[:5])}"
        f"{', ...' if len(columns) > 5 else ''}) and {unlogged:,} of the {int(shown.sum()):,} decisions carry no "
        "profile values (no logged profile): give --profiles, or --allow-missing-profiles to score them without one"
    )


def score_candidates(
    scorer: Any,
    logged: LoggedRequests,
    catalog: Catalog,
    profiles: pd.DataFrame | None = None,
    *,
    progress: bool = False,
    desc: str = "score",
) -> np.ndarray:
    """Return the (n, K) P(stay) of every logged candidate under `scorer`'s model (NaN on padding).

    `scorer` is a :class:`models.scoring.Scorer`; features come from its version's schema via
    :class:`models.features.Featurizer`, so they are built exactly as serving builds them, by
    :func:`training.train.featurize`, as training builds them: a decision that logged the profile
    values serving used (a ``profile`` column) is featurized with those, the others joined to
    `profiles` by ``original_transaction_id`` (the last row of a subscriber winning).
    """
    from tqdm import tqdm

    from models.features import Featurizer
    from training.train import featurize, profile_index

    schema = scorer.model.schema
    featurizer = Featurizer(schema, catalog.products, catalog.messages)
    r_idx, c_idx = np.nonzero(logged.valid)
    f = logged.frame
    wanted = list(schema.profile_numeric) + list(schema.profile_categorical)
    src = pd.DataFrame({
        "product_id": f["product_id"].astype(str).to_numpy(dtype=object),
        "user_locale": f["user_locale"].astype(str).to_numpy(dtype=object),
        "environment": f["environment"].astype(str).to_numpy(dtype=object) if "environment" in f.columns else "Production",
        "signed_date": f["signed_date"].to_numpy(dtype=np.int64),
        "original_transaction_id": f["original_transaction_id"].astype(str).to_numpy(dtype=object),
    })
    if wanted and "profile" in f.columns:  # the values serving used, as it logged them (point in time)
        src["profile"] = f["profile"].to_numpy(dtype=object)
    prof = profile_index(profiles) if wanted else None
    out = np.full(logged.valid.shape, np.nan)
    cells = len(r_idx)
    with tqdm(total=cells, desc=desc, unit="row", file=sys.stderr, disable=None if progress else True) as bar:
        for s in range(0, cells, _CHUNK_CELLS):
            e = min(cells, s + _CHUNK_CELLS)
            rows = src.iloc[r_idx[s:e]].reset_index(drop=True)
            rows["message_id"] = pd.Series(logged.candidate_ids[r_idx[s:e], c_idx[s:e]], dtype=object)
            X = featurize(featurizer, rows, prof)
            out[r_idx[s:e], c_idx[s:e]] = scorer.p_stay(X)
            bar.update(e - s)
    return out


def policy_from_scores(
    name: str, p_stay: np.ndarray, logged: LoggedRequests, catalog: Catalog, exploration: Exploration
) -> TargetPolicy:
    """Return the target policy serving would run given P(stay) for every logged candidate."""
    n, width = logged.valid.shape
    values = np.where(logged.valid, np.nan_to_num(p_stay, nan=0.0) * logged.value_after, 0.0)
    probs = np.zeros((n, width))
    rule_rows = np.zeros(n, dtype=bool)
    # models.exploration.greedy_index row by row: the first highest value (padding never wins)
    greedy = np.where(logged.valid, values, -np.inf).argmax(axis=1)
    finite = np.isfinite(p_stay) | ~logged.valid
    if exploration.scheme == "epsilon" and finite.all():
        # models.exploration.action_probabilities for every row at once, the same operations in the
        # same order (so the same bits): ε/K everywhere, 1 − ε added to the greedy, then the holdout
        k_rows = logged.k.astype(np.float64)[:, None]
        probs = np.where(np.arange(width)[None, :] < logged.k[:, None], exploration.epsilon / k_rows, 0.0)
        probs[np.arange(n), greedy] += 1.0 - exploration.epsilon
        if exploration.holdout > 0.0:
            held = logged.default_index >= 0
            probs[held] *= 1.0 - exploration.holdout
            probs[np.flatnonzero(held), logged.default_index[held]] += exploration.holdout
        return TargetPolicy(name, p_stay, values, probs, greedy, rule_rows)
    cand_lists = None
    for i in range(n):
        ki = int(logged.k[i])
        d = int(logged.default_index[i])
        if finite[i].all():
            probs[i, :ki] = exploration.probabilities(values[i, :ki], d if d >= 0 else None)
        else:  # serving answers a NaN score with its rule policy, logged as a fallback
            if cand_lists is None:
                cand_lists = logged.frame["candidates"].tolist()
            greedy[i] = _rule_index(list(cand_lists[i]), d, catalog)
            probs[i, greedy[i]] = 1.0
            rule_rows[i] = True
    return TargetPolicy(name, p_stay, values, probs, greedy, rule_rows)


def target_policy(
    scorer: Any,
    logged: LoggedRequests,
    catalog: Catalog,
    exploration: Exploration,
    profiles: pd.DataFrame | None = None,
    *,
    progress: bool = False,
) -> TargetPolicy:
    """Return model version `scorer.version`'s target policy on the logged requests (see the module docstring)."""
    p_stay = score_candidates(scorer, logged, catalog, profiles, progress=progress, desc=f"score {scorer.version}")
    return policy_from_scores(str(scorer.version), p_stay, logged, catalog, exploration)
