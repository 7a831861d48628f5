"""``retention train``: fit P(stay) on logged decisions joined with outcomes, export ONNX, write a version.

Steps (docs/training-and-evaluation.md): read and validate the files; label each decision with the
one rule in :mod:`training.labels` (censored decisions are counted and left out); featurize
the shown message of each labelled decision with :mod:`models.features` (the same code
serving runs); fit and calibrate (:mod:`training.fit`); export to ONNX; check parity between
sklearn and ONNX Runtime on held-out requests, with every candidate of each; with
``--ground-truth``, compute the true value of the learned greedy policy and the share of
the static-to-oracle gap it captures; write a new registry version. The new version's id is
the last line of stdout, so scripts can ``version=$(retention train ... | tail -n1)``.

Expected value (docs/choosing-a-message.md): value(m) = P(stay | x, m) × (V(product after m) − cost(m)).
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models import data_files
from models.data_files import APPLE_FALLBACK_POLICY
from models.features import FEATURIZER_VERSION, OTHER, FeatureSchema, Featurizer, build_schema, category_key
from models.registry import Registry, registry_spec
from retention import VerbParser, time_ms
from serving.log_reader import source, training_inputs
from training.fit import (
    BASELINE_MAX_DECISIONS,
    CREDIBILITY_C,
    MODEL_CHOICES,
    MODELS,
    SELECTION_MARGIN_SE,
    Baseline,
    FitInfo,
    MessageCredibility,
    ParityResult,
    check_parity,
    credibility_factors,
    export_onnx,
    fit_baseline,
    fit_model,
    greedy_choices,
    onnx_p_stay,
    onnx_session,
    select_model,
    split_heldout,
)

DAY_MS = 86_400_000
MAX_CATEGORIES = 50  # per categorical profile column; rarer values share the <other> slot
MIN_CATEGORY_COUNT = 5
PARITY_MAX_REQUESTS = 20_000
SELECT_MIN_ROWS = 5_000  # below this many labelled decisions, no cross-validated choice: the boosted trees
# the decisions file's columns (docs/data-formats.md) training needs (model_version and policy are not used to fit)
DECISION_COLUMNS = tuple(c for c in data_files.DECISION_COLUMNS if c not in ("model_version", "policy"))


TRAINING_REQUESTS_FILE = "training_requests.u64"


def request_hashes(request_ids: Any) -> np.ndarray:
    """Return the sorted unique 64-bit hashes (BLAKE2b, 8 bytes, little-endian) of request ids (strings).

    A model version records these for the decisions it was fitted on, so the promotion gate can
    tell whether evaluation data overlaps its training data (two distinct ids share a hash with
    probability about n·m / 2^64: never, in practice).
    """
    import hashlib

    ids = [str(r).encode() for r in request_ids]
    buf = b"".join(hashlib.blake2b(r, digest_size=8).digest() for r in ids)
    return np.unique(np.frombuffer(buf, dtype="<u8"))


def read_request_hashes(path: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Return the training request hashes of a version, checked against the manifest's sha256 (ValueError if not)."""
    import hashlib

    data = path.read_bytes()
    want = (manifest.get("training_requests") or {}).get("sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{path}: sha256 mismatch with the manifest (the file was changed or corrupted)")
    if len(data) % 8:
        raise ValueError(f"{path}: not a file of 64-bit hashes ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<u8")


REFEATURIZE_NEEDS_PROFILES = (
    "--refeaturize joins every decision to --profiles, and no --profiles was given (without --refeaturize, "
    "the profile values the server logged are used)"
)


class TrainError(ValueError):
    """Training cannot go on; the message is one sentence saying why."""


@dataclass
class TrainResult:
    """Everything a training run produced, before it is written to the registry."""

    estimator: Any
    onnx_bytes: bytes
    schema: FeatureSchema
    fit_info: FitInfo
    parity: ParityResult
    metrics: dict[str, Any]
    data_summary: dict[str, Any]
    gap: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    card: str = ""
    # sorted 64-bit hashes of the request ids of the decisions fitted (see request_hashes)
    training_requests: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<u8"), repr=False)


# ---------------------------------------------------------------------------------------------
# data preparation
# ---------------------------------------------------------------------------------------------
#: The fewest decisions of each outcome (retained, churned) that training accepts.
MIN_EACH_OUTCOME = 10


def profile_spec(profiles: pd.DataFrame | None) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Return (numeric columns, categorical columns, vocabularies) of a profiles table.

    Numeric and boolean columns are numeric; everything else is categorical, with the
    values seen at least 5 times (at most the 50 most frequent) as its vocabulary.
    """
    if profiles is None:
        return [], [], {}
    numeric: list[str] = []
    categorical: list[str] = []
    vocab: dict[str, list[str]] = {}
    for col in profiles.columns:
        if col == "original_transaction_id":
            continue
        s = profiles[col]
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            numeric.append(str(col))
        else:
            categorical.append(str(col))
            counts = s.dropna().map(category_key).value_counts()
            counts = counts[counts >= MIN_CATEGORY_COUNT].head(MAX_CATEGORIES)
            vocab[str(col)] = sorted(str(v) for v in counts.index)
    return numeric, categorical, vocab


def profile_index(profiles: pd.DataFrame | None) -> pd.DataFrame | None:
    """Return the profiles indexed by original_transaction_id (as text), the last row winning on duplicates."""
    if profiles is None:
        return None
    key = profiles["original_transaction_id"].astype(str)
    last = ~key.duplicated(keep="last")
    return profiles.loc[last.to_numpy()].set_index(key[last])


def logged_profiles(rows: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Return the raw profile values each row's decision used, as logged by the server.

    Returns (values: one column per profile column seen, aligned with `rows`; read: the row's
    decision asked the profile store; found: it had a profile). ``profile`` holds JSON text:
    an object, ``null`` (asked, no profile) or missing (not logged: a simulated world, an old log).
    """
    n = len(rows)
    if "profile" not in rows.columns or n == 0:
        return pd.DataFrame(index=range(n)), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    import json

    raw = rows["profile"].to_numpy(dtype=object)
    codes, uniques = pd.factorize(pd.Series(raw, dtype=object))
    parsed: list[dict[str, Any] | None] = []
    for u in uniques:
        try:
            v = json.loads(u) if isinstance(u, str) else None
        except ValueError:
            v = None
        parsed.append(v if isinstance(v, dict) else None)
    codes = np.asarray(codes, dtype=np.int64)
    read = codes >= 0
    per_unique_found = np.array([p is not None for p in parsed] + [False], dtype=bool)
    found = per_unique_found[np.where(read, codes, len(parsed))]
    table = pd.DataFrame([p or {} for p in parsed] + [{}])
    values = table.iloc[np.where(read, codes, len(parsed))].reset_index(drop=True)
    return values, read, found


def featurize(
    fz: Featurizer,
    rows: pd.DataFrame,
    profiles: pd.DataFrame | None,
    message_col: str = "message_id",
    *,
    point_in_time: bool = True,
) -> np.ndarray:
    """Return the float32 feature matrix of (request, candidate) rows joined to their profiles.

    `rows` has product_id, user_locale, environment, signed_date, original_transaction_id
    and `message_col`; `profiles` is indexed by original_transaction_id (or None). With
    `point_in_time` (the default), a row whose decision logged the profile values it used (a
    ``profile`` column, :func:`logged_profiles`) is featurized with those, as serving saw them;
    the others (and every row without it) are joined to `profiles`.
    """
    prof_cols: dict[str, Any] | None = None
    has_profile: Any = None
    if point_in_time:
        values, read, found = logged_profiles(rows)
    else:
        values, read, found = pd.DataFrame(index=range(len(rows))), np.zeros(len(rows), bool), np.zeros(len(rows), bool)
    if profiles is not None or read.any():
        prof_cols, has_profile = _file_profiles(fz, rows, profiles)
        if read.any():
            for c in fz.schema.profile_numeric + fz.schema.profile_categorical:
                base = prof_cols.get(c)
                col = base.to_numpy(dtype=object).copy() if base is not None else np.full(len(rows), None, object)
                logged = values[c].to_numpy(dtype=object) if c in values.columns else np.full(len(rows), None, object)
                col[read] = logged[read]
                prof_cols[c] = pd.Series(col, dtype=object)
            has_profile = np.where(read, found, has_profile)
    return fz.matrix_batch(
        product_id=rows["product_id"].reset_index(drop=True),
        user_locale=rows["user_locale"].reset_index(drop=True),
        environment=rows["environment"].reset_index(drop=True),
        signed_date_ms=rows["signed_date"].to_numpy(dtype=np.int64),
        message_id=rows[message_col].reset_index(drop=True),
        profile=prof_cols,
        has_profile=has_profile,
    )


def _file_profiles(fz: Featurizer, rows: pd.DataFrame, profiles: pd.DataFrame | None) -> tuple[dict[str, Any], np.ndarray]:
    """Return the schema's profile columns joined to `rows` from the profiles file (none without one)."""
    if profiles is None:
        return {}, np.zeros(len(rows), dtype=bool)
    otid = rows["original_transaction_id"].astype(str)
    pos = profiles.index.get_indexer(otid)
    has_profile = pos >= 0
    take = np.where(has_profile, pos, 0)
    prof_cols: dict[str, Any] = {}
    for c in fz.schema.profile_numeric + fz.schema.profile_categorical:
        if c in profiles.columns:
            col = profiles[c]
            if len(profiles) == 0:
                prof_cols[c] = pd.Series([None] * len(rows), dtype=object)
            else:
                prof_cols[c] = col.iloc[take].reset_index(drop=True)
    return prof_cols, has_profile


def values_after(catalog: Any, product_id: pd.Series, message_id: pd.Series) -> np.ndarray:
    """Return V(product after m) − cost(m) per row (NaN for a message or product the catalog lacks)."""
    key = product_id.astype(str) + "\x00" + message_id.astype(str)
    codes, uniques = pd.factorize(key)
    vals = np.empty(len(uniques))
    for i, u in enumerate(uniques):
        pid, mid = str(u).split("\x00", 1)
        m = catalog.messages.get(mid)
        try:
            vals[i] = catalog.value_after(m, pid) if m is not None else np.nan
        except KeyError:
            vals[i] = np.nan
    return vals[codes]


def no_exploration(decisions: pd.DataFrame) -> bool:
    """Return True when every decision was shown with probability 1 (a deterministic rule: no exploration).

    Such logs say nothing about the messages the rule never showed in a context, so a model fitted
    on them cannot be compared off-policy with the rule, and may be worse than the best single message.
    """
    prop = pd.to_numeric(decisions["propensity"], errors="coerce").to_numpy(dtype=np.float64)
    return bool(len(prop)) and bool(np.all(prop >= 1.0 - 1e-12))


NO_EXPLORATION_WARNING = (
    "every decision was shown with probability 1 (no exploration): the model cannot be checked off-policy "
    "and may be worse than the best single message; it is not made current without --promote"
)


def offer_identifiers(catalog: Any) -> dict[str, str]:
    """Return {messageIdentifier: offerIdentifier} of the catalog's promotional-offer messages."""
    return {
        mid: m.offerIdentifier
        for mid, m in catalog.messages.items()
        if getattr(m, "kind", None) == "promotionalOffer" and getattr(m, "offerIdentifier", None)
    }


def in_catalog(message_id: pd.Series, catalog: Any) -> np.ndarray:
    """Return a bool per row: is the message in the catalog (factorized: fast on millions of rows)."""
    codes, uniques = pd.factorize(message_id)
    known = np.array([str(u) in catalog.messages for u in uniques] + [False], dtype=bool)
    return known[np.where(codes < 0, len(uniques), codes)]


def explode_candidates(decisions: pd.DataFrame) -> pd.DataFrame:
    """Return one row per (decision, candidate) with the decision's context and ``candidate``."""
    cols = ["request_id", "original_transaction_id", "product_id", "user_locale", "environment", "signed_date"]
    cols += ["profile"] if "profile" in decisions.columns else []
    lens = decisions["candidates"].map(len).to_numpy()
    out = decisions[cols].loc[decisions.index.repeat(lens)].reset_index(drop=True)
    out["candidate"] = pd.array(
        [m for c in decisions["candidates"].tolist() for m in c], dtype="str"
    ) if lens.sum() else pd.array([], dtype="str")
    return out


def _check_frames(decisions: pd.DataFrame, outcomes: pd.DataFrame, profiles: pd.DataFrame | None) -> None:
    missing = [c for c in DECISION_COLUMNS if c not in decisions.columns]
    if missing:
        raise TrainError(f"the decisions lack column(s) {', '.join(missing)}")
    missing = [c for c in ("original_transaction_id", "event", "at") if c not in outcomes.columns]
    if missing:
        raise TrainError(f"the outcomes lack column(s) {', '.join(missing)}")
    if profiles is not None and "original_transaction_id" not in profiles.columns:
        raise TrainError("the profiles lack column original_transaction_id")
    prop = pd.to_numeric(decisions["propensity"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~((prop > 0.0) & (prop <= 1.0)))
    if bad.size:
        rid = decisions["request_id"].iloc[bad[0]]
        value = decisions["propensity"].iloc[bad[0]]
        value = value.item() if isinstance(value, np.generic) else value  # 1.5, not np.float64(1.5)
        raise TrainError(f"decision {rid}: propensity {value!r} is outside (0, 1]")
    policy = decisions["policy"].astype("str").tolist() if "policy" in decisions.columns else [""] * len(decisions)
    for rid, m, c, pol in zip(decisions["request_id"], decisions["message_id"], decisions["candidates"], policy,
                              strict=True):
        if pd.isna(m) and pol == APPLE_FALLBACK_POLICY:
            continue  # answered with no message (404): Apple's choice, left out of training below
        if c is None or m not in c:
            raise TrainError(f"decision {rid}: message_id {m} is not in its own candidates")


def _date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train_frames(
    decisions: pd.DataFrame,
    outcomes: pd.DataFrame,
    profiles: pd.DataFrame | None,
    catalog: Any,
    *,
    ground_truth: pd.DataFrame | None = None,
    model: str = "auto",
    horizon_days: float = 30.0,
    as_of_ms: int | None = None,
    seed: int = 0,
    context: bool = True,
    params: dict[str, Any] | None = None,
    progress: bool = False,
    mature_only: bool = False,
    refeaturize: bool = False,
    involuntary: str = "censor",
    offer_window_days: float = 7.0,
) -> TrainResult:
    """Return a trained, exported and parity-checked model from in-memory tables (see the module docstring).

    `context=False` trains a model that sees only the message columns (a baseline that
    ignores who the subscriber is). Each decision is featurized with the raw profile values the
    server logged for it (point in time); `refeaturize` joins every decision to `profiles`
    instead, as do decisions that logged none (simulated worlds, older logs). `involuntary`
    is the label rule's choice for involuntary ends (``censor`` or ``churn``). Decisions whose
    message Apple chose (policy ``apple_fallback``, or an Apple retention offer, ``offerType``
    5, redeemed within `offer_window_days`) are left out and counted. `model="auto"` (the
    default) chooses among :data:`training.fit.MODEL_CHOICES` by cross-validated doubly robust
    policy value (:func:`training.fit.select_model`; the evidence is in the manifest's
    hyperparameters). Raises TrainError with one sentence on bad input.
    """
    from tqdm import tqdm

    from training.labels import apple_choice, label_decisions

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    if refeaturize and profiles is None:
        raise TrainError(REFEATURIZE_NEEDS_PROFILES)
    _check_frames(decisions, outcomes, profiles)
    if len(decisions) == 0:
        raise TrainError("no rows after the join: the decisions file is empty")
    decisions = decisions.reset_index(drop=True)

    first_ms = int(decisions["signed_date"].min())
    if as_of_ms is not None and as_of_ms < first_ms:
        raise TrainError(f"--as-of {_date(as_of_ms)} is before every decision (the first is {_date(first_ms)}): no "
                         "label window had passed by then (a time in seconds? give milliseconds or a date)")

    # ---- labels (before any progress output, so that bad input is one line) ----
    t = time.perf_counter()
    try:
        labels, stats = label_decisions(
            decisions, outcomes, horizon_ms=int(horizon_days * DAY_MS), as_of_ms=as_of_ms, mature_only=mature_only,
            involuntary=involuntary,
        )
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    apple, credited = apple_choice(decisions, outcomes, offer_identifiers(catalog), window_ms=int(offer_window_days * DAY_MS))
    known = in_catalog(decisions["message_id"], catalog)
    labelled = labels.notna().to_numpy()
    use = labelled & known & ~apple
    n_unknown = int((labelled & ~known & ~apple).sum())
    if not use.any():
        why = (
            "every decision is censored (no outcome window has passed; try --as-of or newer outcomes)"
            if not labelled.any()
            else "no labelled decision shows a message of this catalog"
        )
        raise TrainError(f"no rows after the join: {why}")
    y_all = labels.to_numpy()[use].astype(np.int64)
    retained, churned = int(y_all.sum()), int(len(y_all) - y_all.sum())
    if min(retained, churned) < MIN_EACH_OUTCOME:
        waiting = (f"; {stats.censored:,} more are censored (no outcome yet and their {horizon_days:g}-day window "
                   "has not passed: outcomes arrive with Apple's notifications)" if stats.censored else "")
        raise TrainError(f"{len(y_all):,} labelled decisions hold {retained:,} retained and {churned:,} churned: "
                         f"training needs at least {MIN_EACH_OUTCOME} of each, and hundreds for a useful model{waiting}")
    timings["label"] = time.perf_counter() - t
    steps = ["featurize", "fit", "export", "parity"] + (["ground truth"] if ground_truth is not None else [])
    bar = tqdm(total=len(steps), desc="train", unit="step", file=sys.stderr, disable=None if progress else True, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    try:
        return _fit_and_check(
            bar, step, timings, t_all, decisions, profiles, catalog, rows_mask=use, y_all=y_all, stats=stats,
            n_unknown=n_unknown, ground_truth=ground_truth, model=model, horizon_days=horizon_days,
            as_of_ms=as_of_ms, seed=seed, context=context, params=params, point_in_time=not refeaturize,
            extra_summary={"apple_choice": int(apple.sum()), "offers_credited": int(credited.sum()),
                           "involuntary_rule": involuntary, "offer_window_days": offer_window_days},
        )
    finally:
        bar.close()


def _candidate_rows(
    fz: Featurizer, rows: pd.DataFrame, prof: pd.DataFrame | None, catalog: Any, idx: np.ndarray,
    point_in_time: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (X_c, owner, shown, value_after, message_id) for every catalog candidate of the decisions `rows.iloc[idx]`.

    `owner` indexes into `idx`; `shown` says whether the decision showed that candidate.
    """
    part = rows.iloc[idx]
    lens = part["candidates"].map(len).to_numpy()
    cand = explode_candidates(part)
    owner = np.repeat(np.arange(len(idx)), lens)
    keep = in_catalog(cand["candidate"], catalog)
    cand, owner = cand[keep].reset_index(drop=True), owner[keep]
    message = cand["candidate"].astype(str).to_numpy()
    shown = message == part["message_id"].astype(str).to_numpy()[owner]
    Xc = featurize(fz, cand, prof, message_col="candidate", point_in_time=point_in_time)
    return Xc, owner, shown, values_after(catalog, cand["product_id"], cand["candidate"]), message


def _message_codes(schema: FeatureSchema, message: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Return the schema's message ids plus ``<other>``, and each message's position in that list."""
    ids = [*schema.vocabularies["message"], OTHER]
    code_of = {m: i for i, m in enumerate(ids)}
    return ids, np.array([code_of.get(m, len(ids) - 1) for m in message], dtype=np.int64)


def _baseline(
    fz: Featurizer, rows: pd.DataFrame, prof: pd.DataFrame | None, catalog: Any, seed: int, point_in_time: bool = True,
) -> tuple[Baseline | None, dict[str, Any]]:
    """Return :func:`training.fit.fit_baseline` on the BASELINE_MAX_DECISIONS labelled decisions of latest ``signed_date`` (the logging policy as it acted most recently)."""
    newest = np.sort(np.argsort(rows["signed_date"].to_numpy(), kind="stable")[-BASELINE_MAX_DECISIONS:])
    Xb, owner_b, shown_b, _, message = _candidate_rows(fz, rows, prof, catalog, newest, point_in_time)
    prop = rows["propensity"].to_numpy(dtype=np.float64)[newest]
    n_messages = len(fz.schema.vocabularies["message"]) + 1
    return fit_baseline(Xb, owner_b, shown_b, prop, _message_codes(fz.schema, message)[1], n_messages, seed=seed)


def _select(
    fz: Featurizer, rows: pd.DataFrame, prof: pd.DataFrame | None, catalog: Any, X: np.ndarray, y: np.ndarray,
    seed: int, point_in_time: bool = True, baseline: Baseline | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Return training.fit.select_model's choice and evidence on the labelled decisions `rows` (shown rows `X`)."""
    va_shown = values_after(catalog, rows["product_id"], rows["message_id"])
    rewards = y * np.nan_to_num(va_shown)
    prop = rows["propensity"].to_numpy(dtype=np.float64)
    groups = pd.factorize(rows["original_transaction_id"].astype(str))[0]

    def candidate_rows(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        Xc, owner, shown, va, message = _candidate_rows(fz, rows, prof, catalog, idx, point_in_time)
        return Xc, owner, shown, va, _message_codes(fz.schema, message)[1]

    n_messages = len(fz.schema.vocabularies["message"]) + 1
    return select_model(X, y, rewards=rewards, propensities=prop, groups=groups, candidate_rows=candidate_rows,
                        n_messages=n_messages, seed=seed, baseline=baseline)


def _with_credibility(
    estimator: Any, fz: Featurizer, rows: pd.DataFrame, prof: pd.DataFrame | None, catalog: Any, y: np.ndarray,
    point_in_time: bool = True, baseline: Baseline | None = None, baseline_evidence: dict[str, Any] | None = None,
) -> tuple[MessageCredibility, dict[str, Any]]:
    """Return the fitted model scaled by :func:`training.fit.credibility_factors` on every labelled decision, and the evidence.

    The factors are pessimistic (c = CREDIBILITY_C); with a `baseline` (from :func:`_baseline`) a
    row's factor moves towards 1 in proportion to b(x, m), the probability that the logging policy's
    own choice for the subscriber is the message (:class:`training.fit.MessageCredibility`).
    """
    schema = fz.schema
    ids = [*schema.vocabularies["message"], OTHER]
    columns = np.array([schema.names.index(f"message={m}") for m in ids], dtype=np.int64)
    rewards = y * np.nan_to_num(values_after(catalog, rows["product_id"], rows["message_id"]))
    prop = rows["propensity"].to_numpy(dtype=np.float64)
    owner_all, shown_all, va_all, code_all, p_all = [], [], [], [], []
    chunk = 50_000  # decisions per featurized batch: bounds memory at 1M decisions
    for s in range(0, len(rows), chunk):
        idx = np.arange(s, min(s + chunk, len(rows)))
        Xc, owner, shown, va, message = _candidate_rows(fz, rows, prof, catalog, idx, point_in_time)
        p_all.append(estimator.predict_proba(Xc)[:, 1])
        owner_all.append(owner + s)
        shown_all.append(shown)
        va_all.append(va)
        code_all.append(_message_codes(schema, message)[1])
    factors, stats = credibility_factors(
        np.concatenate(p_all), np.concatenate(va_all), np.concatenate(code_all), np.concatenate(owner_all),
        np.concatenate(shown_all), rewards, prop, c=CREDIBILITY_C, n_messages=len(ids),
    )
    evidence = {
        "rule": f"P(stay) of each message scaled by min(1, max(DR mean − {CREDIBILITY_C:g} SE² / |DR mean|, DR mean / 1000) / "
                "model mean of its value), over the labelled decisions where it was a candidate; where the "
                "logging policy's own choice for the subscriber is the message (probability b), the factor "
                "moves to 1 in proportion to b",
        "c": CREDIBILITY_C,
        "factors": {m: float(f) for m, f in zip(ids, factors, strict=True)},
        "baseline": baseline_evidence or {"fitted": False},
        "dr_mean": {m: float(v) for m, v in zip(ids, stats["dr_mean"], strict=True) if np.isfinite(v)},
        "se": {m: float(v) for m, v in zip(ids, stats["se"], strict=True) if np.isfinite(v)},
        "model_mean": {m: float(v) for m, v in zip(ids, stats["model_mean"], strict=True) if np.isfinite(v)},
    }
    return MessageCredibility(estimator, columns, factors, baseline), evidence


def _fit_and_check(
    bar: Any, step: Any, timings: dict[str, float], t_all: float, decisions: pd.DataFrame,
    profiles: pd.DataFrame | None, catalog: Any, *, rows_mask: np.ndarray, y_all: np.ndarray, stats: Any,
    n_unknown: int, ground_truth: pd.DataFrame | None, model: str, horizon_days: float, as_of_ms: int | None,
    seed: int, context: bool, params: dict[str, Any] | None, point_in_time: bool = True,
    extra_summary: dict[str, Any] | None = None,
) -> TrainResult:
    use = rows_mask

    # ---- features ----
    step("featurize")
    t = time.perf_counter()
    logged_rows = int(logged_profiles(decisions)[1].sum()) if point_in_time else 0
    if profiles is None and logged_rows:
        values, read, _ = logged_profiles(decisions)
        num, cat, vocab = profile_spec(values.loc[read].assign(original_transaction_id=""))
    else:
        num, cat, vocab = profile_spec(profiles)
    prof = profile_index(profiles)
    schema = build_schema(
        catalog.products,
        catalog.messages,
        profile_numeric=num,
        profile_categorical=cat,
        profile_vocab=vocab,
        locales=decisions["user_locale"].astype(str).unique().tolist(),
        environments=["Production", "Sandbox", *decisions["environment"].astype(str).unique().tolist()],
    )
    fz = Featurizer(schema, catalog.products, catalog.messages)
    rows = decisions.loc[use]
    X_all = featurize(fz, rows, prof, point_in_time=point_in_time)
    timings["featurize"] = time.perf_counter() - t
    bar.update()

    # ---- the held-out share (by request: one labelled row per decision): never fitted by the trees;
    # it stops the boosting, fits the sigmoid, and gives the metrics and the parity rows ----
    n = len(rows)
    held = split_heldout(n, seed)
    n_hold = len(held)
    is_hold = np.zeros(n, dtype=bool)
    is_hold[held] = True
    X_fit = X_all
    if model == "auto" and not context:
        model = "hgb"
    if not context:
        X_fit = X_all.copy()
        X_fit[:, : schema.n_context] = 0.0  # constant columns: the model cannot split on them

    step("fit")
    t = time.perf_counter()
    selection = None
    try:
        # the logging policy's own choice; a model that must ignore who the subscriber is gets none (it reads them)
        baseline, baseline_evidence = (_baseline(fz, rows, prof, catalog, seed, point_in_time=point_in_time)
                                       if context else (None, {"fitted": False, "why": "a model without context"}))
        if model == "auto":
            if n >= SELECT_MIN_ROWS and context:
                choice, selection = _select(fz, rows, prof, catalog, X_all, y_all, seed, point_in_time=point_in_time,
                                            baseline=baseline)
            else:
                choice = MODEL_CHOICES[[c.name for c in MODEL_CHOICES].index("hgb")]
            model, params = choice.model, (params or choice.params or None)
        estimator, info = fit_model(X_fit, y_all, model=model, seed=seed, params=params, heldout_index=held)
        info.selection = selection
        model_only = estimator
        estimator, info.credibility = _with_credibility(estimator, fz, rows, prof, catalog, y_all,
                                                        point_in_time=point_in_time, baseline=baseline,
                                                        baseline_evidence=baseline_evidence)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    timings["fit"] = time.perf_counter() - t
    bar.update()

    step("export")
    t = time.perf_counter()
    onnx_bytes = export_onnx(estimator, schema.n_features)
    session = onnx_session(onnx_bytes)
    timings["export"] = time.perf_counter() - t
    bar.update()

    # ---- metrics on held-out shown rows ----
    metrics: dict[str, Any] = {"holdout_rows": int(n_hold), "train_rows": int(n - n_hold)}
    if n_hold:
        from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

        p_h = model_only.predict_proba(X_all[is_hold])[:, 1]  # the model's P(stay), before the message factors
        y_h = y_all[is_hold]
        metrics["holdout_base_rate"] = float(y_h.mean())
        metrics["holdout_log_loss"] = float(log_loss(y_h, p_h, labels=[0, 1]))
        metrics["holdout_brier"] = float(brier_score_loss(y_h, p_h))
        metrics["holdout_auc"] = float(roc_auc_score(y_h, p_h)) if len(np.unique(y_h)) == 2 else None
        metrics["holdout_mean_p"] = float(p_h.mean())

    # ---- parity: every candidate of held-out requests (or of a sample when nothing is held out) ----
    step("parity")
    t = time.perf_counter()
    pool = rows.loc[is_hold] if n_hold else rows
    if len(pool) > PARITY_MAX_REQUESTS:
        pool = pool.sample(PARITY_MAX_REQUESTS, random_state=seed)
    cand = explode_candidates(pool)
    cand = cand[in_catalog(cand["candidate"], catalog)].reset_index(drop=True)
    Xc = featurize(fz, cand, prof, message_col="candidate", point_in_time=point_in_time)
    p_sk = estimator.predict_proba(Xc)[:, 1]
    p_ox = onnx_p_stay(session, Xc)
    parity = check_parity(p_sk, p_ox, cand["request_id"].to_numpy(), values_after(catalog, cand["product_id"], cand["candidate"]))
    timings["parity"] = time.perf_counter() - t
    bar.update()
    if not parity.passed:
        raise TrainError(
            f"parity check failed: sklearn and ONNX Runtime differ by up to {parity.max_abs_diff:.2e} "
            f"and choose differently for {parity.choice_mismatches} request(s); no version written"
        )

    # ---- the true value of the greedy policy, when the data come with ground truth ----
    gap = None
    if ground_truth is not None:
        step("ground truth")
        t = time.perf_counter()
        gap = evaluate_gap(session, fz, decisions, prof, ground_truth, catalog)
        timings["ground_truth"] = time.perf_counter() - t
        bar.update()
        metrics.update({k: v for k, v in gap.items() if k != "static_message"})
    timings["total"] = time.perf_counter() - t_all

    signed = decisions["signed_date"].to_numpy(dtype=np.int64)
    summary = {
        "decisions": len(decisions),
        "retained": int(stats.retained),
        "churned": int(stats.churned),
        "censored": int(stats.censored),
        "unknown_message": n_unknown,
        "rows_used": int(n),
        "train_rows": int(n - n_hold),
        "holdout_rows": int(n_hold),
        "profiles": len(profiles) if profiles is not None else 0,
        "decisions_with_profile": int(rows["original_transaction_id"].astype(str).isin(prof.index).sum())
        if prof is not None
        else 0,
        "date_range": [_date(int(signed.min())), _date(int(signed.max()))],
        "horizon_days": horizon_days,
        "as_of_ms": as_of_ms,
        "label_stats": asdict(stats) if is_dataclass(stats) else dict(vars(stats)),  # type: ignore[arg-type]
        "features_from": "logged profiles (point in time)" if logged_rows else "profiles file",
        "no_exploration": no_exploration(rows),
        "decisions_with_logged_profile": logged_rows,
        **(extra_summary or {}),
    }
    result = TrainResult(
        estimator=estimator,
        onnx_bytes=onnx_bytes,
        schema=schema,
        fit_info=info,
        parity=parity,
        metrics=metrics,
        data_summary=summary,
        gap=gap,
        timings={k: round(v, 3) for k, v in timings.items()},
        training_requests=request_hashes(rows["request_id"].astype(str)),
    )
    result.manifest = build_manifest(result, context=context, catalog_sha256=getattr(catalog, "sha256", None))
    result.card = model_card(result)
    return result


def greedy_table(
    session: Any, fz: Featurizer, decisions: pd.DataFrame, prof: pd.DataFrame | None, catalog: Any,
    pairs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Return per (request, candidate) row: request_id, message_id, p_stay, value_after, expected_value, greedy (bool).

    Candidates are each decision's own list, or the (request_id, message_id) rows of
    `pairs` (e.g. a ground-truth table); ones the catalog lacks get NaN and are never greedy.
    """
    ctx_cols = ["request_id", "original_transaction_id", "product_id", "user_locale", "environment", "signed_date"]
    ctx_cols += ["profile"] if "profile" in decisions.columns else []
    if pairs is None:
        cand = explode_candidates(decisions)
    else:
        ctx = decisions[ctx_cols].drop_duplicates("request_id")
        cand = pairs[["request_id", "message_id"]].rename(columns={"message_id": "candidate"}).merge(
            ctx, on="request_id", how="inner"
        )
    ok = in_catalog(cand["candidate"], catalog)
    p = np.full(len(cand), np.nan)
    chunk = 500_000
    known = cand.loc[ok]
    out_pos = np.flatnonzero(ok)
    for s in range(0, len(known), chunk):
        part = known.iloc[s : s + chunk]
        p[out_pos[s : s + chunk]] = onnx_p_stay(session, featurize(fz, part, prof, message_col="candidate"))
    va = values_after(catalog, cand["product_id"], cand["candidate"])
    ev = p * va
    codes, _ = pd.factorize(cand["request_id"])
    best, _, _ = greedy_choices(codes, ev)
    greedy = np.zeros(len(cand), dtype=bool)
    greedy[best[best >= 0]] = True
    greedy &= np.isfinite(ev)
    return pd.DataFrame(
        {
            "request_id": cand["request_id"].to_numpy(),
            "message_id": cand["candidate"].to_numpy(),
            "p_stay": p,
            "value_after": va,
            "expected_value": ev,
            "greedy": greedy,
        }
    )


def _baseline_line(b: dict[str, Any]) -> str:
    """Return one line on the baseline classifier (training.fit.fit_baseline) from its evidence."""
    if not b.get("fitted"):
        return f"none: {b.get('why', 'not fitted')}"
    return (f"the logging policy's own choice, learned from {b['decisions']:,} decisions that showed it "
            f"(b {b['mean_b_shown']:.3f} on the shown message, {b['mean_b_not_shown']:.3f} on the others); "
            "where it is the message, the factor moves to 1")


def evaluate_gap(
    session: Any, fz: Featurizer, decisions: pd.DataFrame, prof: pd.DataFrame | None,
    ground_truth: pd.DataFrame, catalog: Any,
) -> dict[str, Any]:
    """Return the true values of the learned greedy policy, the best static message and the oracle, and the gap captured."""
    from training.simulate import best_static_value, gap_captured, oracle_value, policy_value

    missing = [c for c in ("request_id", "message_id", "p_stay", "value_after") if c not in ground_truth.columns]
    if missing:
        raise TrainError(f"the ground truth lacks column(s) {', '.join(missing)}")
    table = greedy_table(session, fz, decisions, prof, catalog, pairs=ground_truth)
    if table["greedy"].groupby(table["request_id"]).sum().min() < 1 or len(table) == 0:
        raise TrainError("the ground truth has requests the decisions do not (or candidates the catalog lacks)")
    probs = table.loc[:, ["request_id", "message_id"]].assign(prob=table["greedy"].astype(np.float64))
    gt = ground_truth[ground_truth["request_id"].isin(table["request_id"].unique())]
    v_model = policy_value(gt, probs)
    v_oracle = oracle_value(gt)
    v_static, static_id = best_static_value(gt)
    return {
        "v_model": float(v_model),
        "v_static": float(v_static),
        "v_oracle": float(v_oracle),
        "gap_captured": float(gap_captured(v_model, v_static, v_oracle)),
        "static_message": static_id,
        "ground_truth_requests": int(gt["request_id"].nunique()),
    }


# ---------------------------------------------------------------------------------------------
# manifest, model card, summary
# ---------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def build_manifest(result: TrainResult, *, context: bool = True, catalog_sha256: str | None = None) -> dict[str, Any]:
    """Return the manifest of a training result (the registry adds version, created and onnx_sha256)."""
    return {
        "featurizer_version": FEATURIZER_VERSION,
        "feature_schema": result.schema.to_dict(),
        "feature_schema_sha256": result.schema.sha256(),
        "model": result.fit_info.model,
        "context_features": context,
        "hyperparameters": result.fit_info.to_dict(),
        "training_data": result.data_summary,
        "metrics": result.metrics,
        "parity": result.parity.to_dict(),
        "catalog_sha256": catalog_sha256,
        "training_requests": {
            "file": TRAINING_REQUESTS_FILE,
            "count": int(result.training_requests.size),
            "hash": "BLAKE2b-64 of the UTF-8 request_id, sorted, little-endian",
            "sha256": hashlib.sha256(result.training_requests.astype("<u8").tobytes()).hexdigest(),
        },
        "timings_s": result.timings,
        "library_versions": _versions(),
    }


def model_card(result: TrainResult) -> str:
    """Return a short Markdown model card (``{version}`` is filled in by the registry)."""
    d, m, p = result.data_summary, result.metrics, result.parity
    lines = [
        "# Model {version}",
        "",
        "Scores P(subscriber keeps the subscription | context, message) for each eligible retention "
        "message; serving picks the highest P × (V(product after m) − cost(m)).",
        "",
        "## Training data",
        f"- {d['decisions']:,} logged decisions from {d['date_range'][0]} to {d['date_range'][1]}; "
        f"{d['retained']:,} retained, {d['churned']:,} churned, {d['censored']:,} censored (left out), "
        f"{d['unknown_message']:,} with a message not in the catalog (left out).",
        f"- label horizon {d['horizon_days']:g} days; {d['train_rows']:,} rows fit the model, {d['holdout_rows']:,} "
        "held out from them (early stopping, the sigmoid calibration, the metrics below, parity).",
        f"- profiles: {d['profiles']:,} subscribers; columns "
        f"{', '.join(result.schema.profile_numeric + result.schema.profile_categorical) or 'none'}.",
        "",
        "## Model",
        f"- {result.fit_info.model} ({result.fit_info.n_iter} iterations), calibrated with a "
        f"{result.fit_info.calibration} on {result.fit_info.rows_calibration:,} rows; {result.schema.n_features} float32 features, "
        f"featurizer version {FEATURIZER_VERSION}."
        + (f" Chosen: {result.fit_info.selection['chosen']} ({result.fit_info.selection['rule']})."
           if result.fit_info.selection else ""),
        *([f"- P(stay) of each message multiplied by its factor ({result.fit_info.credibility['rule']}): "
           + ", ".join(f"{m} {f:.3g}" for m, f in result.fit_info.credibility["factors"].items())
           + "; serving ranks candidates by factor × P(stay) × value."] if result.fit_info.credibility else []),
        *([f"- Baseline: {_baseline_line(result.fit_info.credibility.get('baseline') or {})}."]
          if result.fit_info.credibility else []),
        "",
        "## Metrics of P(stay) before the message factors (held-out decisions; the 2-parameter sigmoid was fitted on them)",
    ]
    for key in ("holdout_log_loss", "holdout_brier", "holdout_auc", "holdout_base_rate", "holdout_mean_p"):
        if m.get(key) is not None:
            lines.append(f"- {key.removeprefix('holdout_')}: {m[key]:.4f}")
    if result.gap is not None:
        g = result.gap
        lines.append(
            f"- true value per request (ground truth): model {g['v_model']:.3f}, best static {g['v_static']:.3f}, "
            f"oracle {g['v_oracle']:.3f}; gap captured {g['gap_captured']:.3f}"
        )
    if d.get("no_exploration"):
        lines += ["", f"**Warning:** {NO_EXPLORATION_WARNING}."]
    lines += [
        "",
        "## Parity (sklearn vs ONNX Runtime)",
        f"- {p.rows:,} candidate rows of {p.requests:,} held-out requests: max |ΔP| {p.max_abs_diff:.2e} "
        f"(limit {p.tolerance:g}); greedy choice differs in {p.choice_mismatches} of {p.requests_compared:,} "
        f"requests whose two best values differ by more than {p.tie_margin:g} of their size (closer ones are float32 ties).",
        "",
        "## Caveats",
        f"- features from {d.get('features_from', 'profiles file')}: "
        + ("each decision's profile values as the server logged them when it answered." if d.get("decisions_with_logged_profile")
           else "profiles joined by original_transaction_id are a snapshot; if it was taken after the decisions, "
                "features leak the future (the server's own log, which records each decision's profile values, does not)."),
        f"- {d.get('apple_choice', 0):,} decisions left out because Apple chose the message (404, an answer later than "
        f"Apple waits, or an Apple retention offer redeemed); {d.get('offers_credited', 0):,} promotional offer "
        "redemptions credited to our answer.",
        "",
    ]
    return "\n".join(lines)


def _selection_line(selection: dict[str, Any]) -> str:
    """Return the summary's "chosen" line: each choice's cross-validated DR value and its paired difference to the first.

    e.g. ``hgb-smooth (cross-validated DR value per decision: hgb 2.630, hgb-plain 3.482 (+0.852 ± 0.610),
    hgb-smooth 3.249 (+0.619 ± 0.250); the first stays unless another is ahead by more than 1 standard error)``.
    """
    values, se = selection["values"], selection.get("se_vs_first") or {}
    first = next(iter(values))

    def part(k: str) -> str:
        if k == first or not np.isfinite(se.get(k, np.nan)):
            return f"{k} {values[k]:.3f}"
        return f"{k} {values[k]:.3f} ({values[k] - values[first]:+.3f} ± {se[k]:.3f})"

    text = f"{selection['chosen']} (cross-validated DR value per decision: {', '.join(part(k) for k in values)}"
    if len(values) > 1:
        text += f"; the first stays unless another is ahead by more than {SELECTION_MARGIN_SE:g} standard error" \
                + ("s" if SELECTION_MARGIN_SE != 1 else "")
    return text + ")"


def summary_table(result: TrainResult, registry: str | None = None) -> str:
    """Return the human summary printed by ``retention train`` (before the version id), `registry` its last line."""
    d, m, p, f = result.data_summary, result.metrics, result.parity, result.fit_info
    rows: list[tuple[str, str]] = [
        ("decisions", f"{d['decisions']:,}  ({d['date_range'][0]} .. {d['date_range'][1]})"),
        ("labels", f"{d['retained']:,} retained, {d['churned']:,} churned, {d['censored']:,} censored (left out)"),
        ("rows", f"{d['train_rows']:,} fit the model, {d['holdout_rows']:,} held out (early stopping, sigmoid, metrics, parity)"),
        ("features", f"{result.schema.n_features} ({result.schema.n_context} context), featurizer {FEATURIZER_VERSION}"),
        ("model", f"{f.model}"
                  + (f" ({f.selection['chosen']} settings)" if f.selection and f.selection["chosen"] != f.model else "")
                  + f", {f.n_iter} iterations, calibration {f.calibration}"),
    ]
    if f.selection:
        rows.append(("chosen", _selection_line(f.selection)))
    if f.credibility:
        low = sorted(f.credibility["factors"].items(), key=lambda kv: kv[1])
        rows.append(("factors", f"per message {min(v for _, v in low):.3g} to {max(v for _, v in low):.3g} "
                     f"(pessimistic doubly robust value over the model's mean; lowest: {low[0][0]})"))
        rows.append(("baseline", _baseline_line(f.credibility.get("baseline") or {})))
    if m.get("holdout_log_loss") is not None:
        auc = m.get("holdout_auc")
        rows.append(
            ("held-out", f"log loss {m['holdout_log_loss']:.4f}, brier {m['holdout_brier']:.4f}"
             + (f", AUC {auc:.4f}" if auc is not None else ""))
        )
    rows.append(
        ("parity", f"max |dP| {p.max_abs_diff:.1e}, choice mismatches {p.choice_mismatches}/{p.requests_compared:,}"
         f" -> {'ok' if p.passed else 'FAILED'}")
    )
    if result.gap is not None:
        g = result.gap
        rows.append(("true value", f"model {g['v_model']:.3f}, best static {g['v_static']:.3f}, oracle {g['v_oracle']:.3f}"))
        rows.append(("gap captured", f"{g['gap_captured']:.3f}  (V_model - V_static) / (V_oracle - V_static)"))
    t = result.timings
    rows.append(("time", f"{t.get('total', 0):.1f} s (fit {t.get('fit', 0):.1f} s, export {t.get('export', 0):.1f} s)"))
    if registry is not None:
        rows.append(("registry", registry))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# writing, CLI, demo
# ---------------------------------------------------------------------------------------------
def write_result(result: TrainResult, registry: Registry, *, promote: bool = False) -> tuple[str, bool]:
    """Return (new version id, whether it became current): promoted when asked, or when the registry had none
    and the logs explored (a model fitted on logs without exploration is never made current unasked)."""
    version = registry.write_version(
        result.onnx_bytes, result.manifest, result.card,
        extra_files={TRAINING_REQUESTS_FILE: result.training_requests.astype("<u8").tobytes()},
    )
    promoted = promote or (registry.current() is None and not result.data_summary.get("no_exploration"))
    if promoted:
        registry.promote(version)
    return version, promoted


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention train",
        description="Fit P(stay) on logged decisions joined with outcomes, export ONNX, check parity and write a "
        "new model version into the registry. The version id is the last line of stdout.",
    )
    p.add_argument("--decisions", required=True, type=source,
                   help="decisions file (.parquet or .csv), or the fleet's database (postgresql:// URL)")
    p.add_argument("--outcomes", required=True, type=source,
                   help="outcome events file (.parquet or .csv), or the fleet's database (postgresql:// URL)")
    p.add_argument("--profiles", type=Path, help="subscriber profiles file, keyed by original_transaction_id")
    p.add_argument("--catalog", required=True, type=Path, help="catalog JSON")
    p.add_argument("--registry", help="model registry folder, created if absent [env RETENTION_MODEL; default "
                   "models/registry in the checkout]")
    p.add_argument("--ground-truth", type=Path, help="simulator ground truth: also print the share of the gap captured")
    p.add_argument("--model", choices=("auto", *MODELS), default="auto",
                   help="auto (default: chosen by cross-validated doubly robust policy value), hgb or logreg")
    p.add_argument("--horizon-days", type=float, default=30.0, help="label horizon in days (default 30)")
    p.add_argument("--as-of", type=time_ms, dest="as_of",
                   help="treat the data as seen at this time (ms since 1970 or ISO 8601, e.g. 2026-02-01); "
                        "default: newest event")
    p.add_argument("--matured-only", action="store_true",
                   help="train only on decisions whose label window has fully passed (early churn/renewal labels of "
                        "recent decisions lean toward churn)")
    p.add_argument("--refeaturize", action="store_true",
                   help="join every decision to --profiles as it is now, instead of the profile values the server "
                        "logged at decision time (the default; files that logged none always use --profiles)")
    p.add_argument("--involuntary-expiry", choices=("censor", "churn"), default="censor", dest="involuntary",
                   help="what an involuntary end (billing retry, price increase, product not for sale, grace period "
                        "expired) with no cancellation before it makes of a decision: censor (default) or churn")
    p.add_argument("--offer-window-days", type=float, default=7.0,
                   help="a redemption of our promotional offer within this many days of the decision is credited "
                        "to it (default 7)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split and the fit (default 0)")
    p.add_argument("--promote", action="store_true", help="make the new version current (without it, only a registry's first version is, and not when its logs show no exploration)")
    p.add_argument("--no-context", action="store_true", help=argparse.SUPPRESS)  # baseline: message columns only
    return p


def main(argv: list[str]) -> int:
    """Run ``retention train``; return the exit status (bad input raises one clear error)."""
    args = _parser().parse_args(argv)
    if args.horizon_days <= 0:
        print("retention train: error: --horizon-days must be positive", file=sys.stderr)
        return 2
    if not args.offer_window_days > 0:
        print("retention train: error: --offer-window-days must be positive", file=sys.stderr)
        return 2
    if args.refeaturize and args.profiles is None:
        print(f"retention train: error: {REFEATURIZE_NEEDS_PROFILES}", file=sys.stderr)
        return 2
    from models.catalog import Catalog
    from training.data_io import read_decisions, read_outcomes, read_profiles, read_table

    target = Registry.parse(registry_spec(args.registry))[0]
    target.require_creatable()  # say so now, not after the fit
    catalog = Catalog.load(args.catalog)
    with training_inputs(args.decisions, args.outcomes) as (decisions_file, outcomes_file):
        decisions = read_decisions(decisions_file)
        outcomes = read_outcomes(outcomes_file)
    profiles = read_profiles(args.profiles) if args.profiles else None
    gt = read_table(args.ground_truth) if args.ground_truth else None
    result = train_frames(
        decisions,
        outcomes,
        profiles,
        catalog,
        ground_truth=gt,
        model=args.model,
        horizon_days=args.horizon_days,
        as_of_ms=args.as_of,
        seed=args.seed,
        context=not args.no_context,
        progress=True,
        mature_only=args.matured_only,
        refeaturize=args.refeaturize,
        involuntary=args.involuntary,
        offer_window_days=args.offer_window_days,
    )
    if result.data_summary.get("no_exploration"):
        print(f"retention train: warning: {NO_EXPLORATION_WARNING}", file=sys.stderr)
    args.registry = target.root
    version, promoted = write_result(result, Registry(args.registry), promote=args.promote)
    print(summary_table(result, f"{args.registry} ({'now current' if promoted else 'not promoted'})"))
    print(version)
    return 0


def train_demo_model(registry: Path, n_decisions: int = 20000, seed: int = 0) -> str:
    """Return the id of a model trained on a simulated world and promoted in `registry` (the demo's default model)."""
    from training.simulate import simulate

    world = simulate(n_decisions, seed=seed)
    result = train_frames(
        world.decisions, world.outcomes, world.profiles, world.catalog, ground_truth=world.ground_truth, seed=seed
    )
    version, _ = write_result(result, Registry(registry), promote=True)
    return version


if __name__ == "__main__":
    import retention

    sys.exit(retention.main(["train", *sys.argv[1:]]))
