"""The decision log's row layout: record types, columns, SQLite tables, row encoding and decoding, export format.

One module for what a logged decision, outcome or feature schema is, shared by every backend: the SQLite log
(``serving/log_writer.py`` writes it, ``serving/log_reader.py`` reads and exports it) and the PostgreSQL log
(``serving/pg_log.py``). A row is encoded once here (:func:`decision_row`) and decoded once
(:func:`decode_decision`), so the two backends store and export the same values.

Arrays are stored compactly: candidates, scores, values, probabilities and policy parameters as JSON text;
the feature matrix as float32 bytes with its shape (what the ONNX model was fed). The exported decisions
file (Parquet or CSV) has the columns of :func:`decisions_arrow_schema`; docs/data-formats.md describes them.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from models.data_files import APPLE_FALLBACK_POLICY, DECISION_COLUMNS, EVENTS, unstorable

SCHEMA_VERSION = 2  # 2: request_id unique (a batch written twice adds nothing)

#: The decisions file's required columns (docs/data-formats.md), in order; the export adds the server's extra
#: columns after them.
REQUIRED_DECISION_COLUMNS: tuple[str, ...] = DECISION_COLUMNS
EXTRA_DECISION_COLUMNS: tuple[str, ...] = (
    "app_apple_id",
    "kind",
    "scores",
    "values",
    "probabilities",
    "policy_params",
    "shadow_model_version",
    "shadow_message_id",
    "catalog_sha256",
    "fallback_reason",
    "features",
    "feature_names_sha",
    "latency_ms",
    "answered_at",
    "status",
    "profile",
)
#: The outcomes table's columns, in the order the outcomes export writes them.
OUTCOME_COLUMNS: tuple[str, ...] = (
    "original_transaction_id",
    "event",
    "at",
    "notification_uuid",
    "raw_type",
    "raw_subtype",
    "received_at",
    "offer_type",
    "offer_identifier",
    "offer_discount_type",
    "transaction_reason",
)
#: Columns added after the first release, with their SQL types: a file made before gets them on open.
ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "decisions": (("profile", "TEXT"),),
    "outcomes": (
        ("offer_type", "INTEGER"),
        ("offer_identifier", "TEXT"),
        ("offer_discount_type", "TEXT"),
        ("transaction_reason", "TEXT"),
    ),
}

FloatVector = list[float] | np.ndarray


class DecisionRecord(msgspec.Struct, kw_only=True):
    """One answered request, as the policy decided it (vectors may be lists or numpy arrays).

    ``scores`` is P(stay) per candidate (empty for a fallback), ``values`` the expected values,
    ``probabilities`` the exact probability of showing each candidate, ``propensity`` the shown
    one's. ``features`` is the K x F matrix the model was fed (kept by reference: do not mutate
    it after logging). ``answered_at`` 0 means "when logged". ``profile`` is the subscriber's raw
    profile values the decision used (column -> value), with ``profile_read`` True once the profile
    store was asked (a miss then logs JSON ``null``; a decision that never asked logs SQL NULL).
    """

    request_id: str
    original_transaction_id: str
    product_id: str
    user_locale: str
    environment: str
    signed_date: int
    app_apple_id: int | None = None
    candidates: list[str] = msgspec.field(default_factory=list)
    scores: FloatVector = msgspec.field(default_factory=list)
    values: FloatVector = msgspec.field(default_factory=list)
    probabilities: FloatVector = msgspec.field(default_factory=list)
    message_id: str | None = None
    kind: str | None = None
    propensity: float = 1.0
    policy: str = "rules"
    policy_params: dict[str, Any] = msgspec.field(default_factory=dict)
    model_version: str | None = None
    shadow_model_version: str | None = None
    shadow_message_id: str | None = None
    catalog_sha256: str | None = None
    fallback_reason: str | None = None
    features: list[list[float]] | np.ndarray | None = None
    feature_names_sha: str | None = None
    latency_ms: float = 0.0
    answered_at: int = 0
    status: int = 200
    profile: dict[str, Any] | None = None
    profile_read: bool = False


class OutcomeRecord(msgspec.Struct):
    """One App Store Server Notification's outcome, as queued for the log (the outcomes table's row, in order).

    ``at`` is Apple's ``signedDate`` and ``received_at`` when the server took it, both in ms since the epoch;
    ``event`` is one of :data:`models.data_files.EVENTS`; the offer fields are Apple's ``offerType`` (raw
    integer), ``offerIdentifier``, ``offerDiscountType`` and ``transactionReason``.
    """

    notification_uuid: str
    original_transaction_id: str
    event: str
    at: int
    raw_type: str | None
    raw_subtype: str | None
    received_at: int
    offer_type: int | None = None
    offer_identifier: str | None = None
    offer_discount_type: str | None = None
    transaction_reason: str | None = None


def outcome_record(
    notification_uuid: str, original_transaction_id: str, event: str, at_ms: int, raw_type: str | None = None,
    raw_subtype: str | None = None, *, offer_type: int | None = None, offer_identifier: str | None = None,
    offer_discount_type: str | None = None, transaction_reason: str | None = None,
) -> OutcomeRecord:
    """Return the outcome row both decision logs (SQLite and PostgreSQL) queue, received now.

    Raises ValueError for an event outside :data:`models.data_files.EVENTS` or a value the log cannot
    store (:func:`models.data_files.unstorable`): callers check what they receive before this.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown outcome event {event!r}; one of {', '.join(EVENTS)}")
    problem = unstorable({"notification_uuid": notification_uuid, "original_transaction_id": original_transaction_id,
                          "at": at_ms, "raw_type": raw_type, "raw_subtype": raw_subtype, "offer_type": offer_type,
                          "offer_identifier": offer_identifier, "offer_discount_type": offer_discount_type,
                          "transaction_reason": transaction_reason})
    if problem is not None:
        raise ValueError(f"the outcome cannot be stored: {problem}")
    return OutcomeRecord(notification_uuid, original_transaction_id, event, int(at_ms), raw_type, raw_subtype,
                         int(time.time() * 1000), offer_type, offer_identifier, offer_discount_type, transaction_reason)


class FeatureSchema(msgspec.Struct):
    """A model's ordered feature names and their hash (:func:`feature_names_sha`), recorded once per log."""

    sha: str
    names: list[str]


#: The SQLite log file's tables (version :data:`SCHEMA_VERSION`; see :func:`migrate`).
TABLES_SQL = """
CREATE TABLE IF NOT EXISTS log_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    request_id TEXT, original_transaction_id TEXT, product_id TEXT, user_locale TEXT, environment TEXT,
    signed_date INTEGER, app_apple_id INTEGER,
    candidates TEXT, scores TEXT, "values" TEXT, probabilities TEXT,
    message_id TEXT, kind TEXT, propensity REAL, policy TEXT, policy_params TEXT,
    model_version TEXT, shadow_model_version TEXT, shadow_message_id TEXT, catalog_sha256 TEXT,
    fallback_reason TEXT, features BLOB, features_rows INTEGER, features_cols INTEGER,
    feature_names_sha TEXT, latency_ms REAL, answered_at INTEGER, status INTEGER, profile TEXT
);
CREATE TABLE IF NOT EXISTS outcomes (
    notification_uuid TEXT PRIMARY KEY, original_transaction_id TEXT NOT NULL, event TEXT NOT NULL,
    at INTEGER NOT NULL, raw_type TEXT, raw_subtype TEXT, received_at INTEGER,
    offer_type INTEGER, offer_identifier TEXT, offer_discount_type TEXT, transaction_reason TEXT
);
CREATE TABLE IF NOT EXISTS feature_schemas (sha TEXT PRIMARY KEY, names TEXT NOT NULL);
"""
#: The decisions table's columns in the order of :func:`decision_row` (an SQL column list).
DECISION_COLUMNS_SQL = (
    "request_id, original_transaction_id, product_id, user_locale, environment, signed_date, app_apple_id, "
    'candidates, scores, "values", probabilities, message_id, kind, propensity, policy, policy_params, '
    "model_version, shadow_model_version, shadow_message_id, catalog_sha256, fallback_reason, "
    "features, features_rows, features_cols, feature_names_sha, latency_ms, answered_at, status, profile"
)
_UNIQUE_REQUEST_ID = "CREATE UNIQUE INDEX IF NOT EXISTS decisions_request_id ON decisions (request_id)"


def _enc_hook(obj: Any) -> Any:
    # numpy scalars and arrays in policy parameters or vectors (np.float32 is not a float subclass)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise NotImplementedError(f"cannot log a {type(obj).__name__}")


#: JSON bytes of a value; NumPy scalars and arrays become numbers and lists (how vectors are stored).
encode_json = msgspec.json.Encoder(enc_hook=_enc_hook).encode
#: The value of JSON text or bytes (raises msgspec.DecodeError on bad JSON).
decode_json = msgspec.json.decode


def feature_names_sha(names: Sequence[str]) -> str:
    """Return the schema hash of an ordered list of feature names (what ``feature_names_sha`` holds)."""
    return hashlib.sha256("\x1f".join(names).encode()).hexdigest()[:16]


def _profile_json(profile: dict[str, Any] | None) -> str:
    """Return a profile as JSON text; a value JSON cannot hold (bytes...) is written as its text, never dropped."""
    try:
        return encode_json(profile).decode()
    except Exception:
        return encode_json({str(k): v if isinstance(v, int | float | str | None) else str(v) for k, v in (profile or {}).items()}).decode()


def _vector(x: Any) -> bytes:
    if x is None:
        return b"[]"
    if isinstance(x, np.ndarray):
        x = x.tolist()
    return encode_json(x)


def decision_row(r: DecisionRecord, now_ms: int) -> tuple[Any, ...]:
    """Return the decisions table's row of `r`, its values in the order of :data:`DECISION_COLUMNS_SQL` (29).

    Vectors and policy parameters become JSON text, ``features`` float32 bytes with its rows and columns,
    ``answered_at`` 0 becomes `now_ms` (ms since the epoch). Raises ValueError for features that are not a
    K x F matrix, or another error for a value JSON cannot hold: the caller drops and counts such a record.
    """
    feats = r.features
    blob, rows, cols = None, None, None
    if feats is not None:
        m = np.asarray(feats, dtype=np.float32)
        if m.ndim == 1:
            m = m.reshape(1, -1)
        if m.ndim != 2:
            raise ValueError("features must be a K x F matrix")
        rows, cols = int(m.shape[0]), int(m.shape[1])
        blob = np.ascontiguousarray(m).tobytes()
    return (
        r.request_id,
        r.original_transaction_id,
        r.product_id,
        r.user_locale,
        r.environment,
        int(r.signed_date),
        r.app_apple_id,
        encode_json(list(r.candidates)).decode(),
        _vector(r.scores).decode(),
        _vector(r.values).decode(),
        _vector(r.probabilities).decode(),
        r.message_id,
        r.kind,
        float(r.propensity),
        r.policy,
        encode_json(r.policy_params).decode(),
        r.model_version,
        r.shadow_model_version,
        r.shadow_message_id,
        r.catalog_sha256,
        r.fallback_reason,
        blob,
        rows,
        cols,
        r.feature_names_sha,
        float(r.latency_ms),
        int(r.answered_at) or now_ms,
        int(r.status),
        _profile_json(r.profile) if r.profile_read else None,
    )


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a log file to :data:`SCHEMA_VERSION`: tables, then ``request_id`` unique (version 1 had no index).

    A version-1 file that holds one request_id twice keeps its first row. Columns added later are in
    :data:`ADDED_COLUMNS` (``ALTER TABLE ... ADD COLUMN``); readers take the columns a file has.
    """
    conn.executescript(TABLES_SQL)
    _add_columns(conn)
    try:
        conn.execute(_UNIQUE_REQUEST_ID)
    except sqlite3.IntegrityError:
        conn.execute(
            "DELETE FROM decisions WHERE request_id IS NOT NULL AND id NOT IN "
            "(SELECT min(id) FROM decisions WHERE request_id IS NOT NULL GROUP BY request_id)"
        )
        conn.execute(_UNIQUE_REQUEST_ID)
    conn.execute("INSERT OR REPLACE INTO log_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    conn.execute("INSERT OR IGNORE INTO log_meta VALUES ('created_at_ms', ?)", (str(int(time.time() * 1000)),))


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the columns a log file made by an earlier version lacks (NULL in its old rows)."""
    for table, cols in ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for name, sql_type in cols:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


def columns_sql(conn: sqlite3.Connection, table: str, columns: str) -> str:
    """Return `columns` (SQL list) with ``NULL AS c`` for each added column a file made earlier lacks."""
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    missing = [c for c, _ in ADDED_COLUMNS[table] if c not in have]
    for c in missing:
        columns = re.sub(rf"(?<![\w\"]){c}(?![\w\"])", f"NULL AS {c}", columns)
    return columns


def decode_decision(row: sqlite3.Row | Mapping[str, Any]) -> dict[str, Any]:
    """Return a decisions table row (SQLite or PostgreSQL, by column name) as the export's dict.

    Keys: :data:`REQUIRED_DECISION_COLUMNS` then :data:`EXTRA_DECISION_COLUMNS`; vectors are lists,
    ``policy_params`` a dict, ``features`` a float32 K x F NumPy array (or None).
    """
    d = {k: row[k] for k in REQUIRED_DECISION_COLUMNS + EXTRA_DECISION_COLUMNS if k != "features"}
    for k in ("candidates", "scores", "values", "probabilities", "policy_params"):
        d[k] = decode_json(d[k]) if d[k] is not None else None
    blob = row["features"]
    if blob is None:
        d["features"] = None
    else:
        d["features"] = np.frombuffer(blob, dtype=np.float32).reshape(row["features_rows"], row["features_cols"])
    return d


def export_format(out: Path) -> str:
    """Return "parquet" or "csv" for an export file name by its suffix; raises ValueError (one line) for another."""
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise ValueError(f"output {str(out)!r} must end in .parquet or .csv")


def prepare_output(out: Path) -> Path:
    """Check that the export file `out` can be written; return the name it is written under first (``out`` + ``.tmp``).

    Makes the folders above it. Raises ValueError, one line, for a name that is not .parquet or .csv,
    a folder at `out`, a file where a folder must go, or a place this process cannot write
    (read-only, no permission): said before any log is read, so nothing is half written.
    """
    export_format(out)
    if out.is_dir():
        raise ValueError(f"cannot write {str(out)!r}: it is a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {str(out)!r}: a file is where a folder above it must go") from None
    except OSError as exc:
        raise ValueError(f"cannot write {str(out)!r}: {(exc.strerror or str(exc)).lower()}") from None
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb"):
            pass
        tmp.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write {str(out)!r}: {(exc.strerror or str(exc)).lower()}") from None
    return tmp



def write_outcomes_file(rows: Sequence[Mapping[str, Any]], out: str | Path) -> int:
    """Write outcome rows (:data:`OUTCOME_COLUMNS`) to `out` (Parquet or CSV by suffix) atomically; return how many.

    ``at`` is int64 and ``offer_type`` a nullable integer (Apple's raw value; missing stays missing). The
    file appears whole or not at all (written beside it, then renamed). ValueError for a bad output name.
    """
    import os

    import pandas as pd

    out = Path(out)
    fmt = export_format(out)
    tmp = prepare_output(out)
    frame = pd.DataFrame(list(rows), columns=list(OUTCOME_COLUMNS))
    frame["at"] = frame["at"].astype("int64")
    frame["offer_type"] = frame["offer_type"].astype("Int64")
    try:
        if fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(frame)

def decisions_arrow_schema() -> Any:
    """Return the exported decisions file's ``pyarrow.Schema``: the columns of :func:`decode_decision`, in order."""
    import pyarrow as pa

    return pa.schema(
        [
            ("request_id", pa.string()),
            ("original_transaction_id", pa.string()),
            ("product_id", pa.string()),
            ("user_locale", pa.string()),
            ("environment", pa.string()),
            ("signed_date", pa.int64()),
            ("candidates", pa.list_(pa.string())),
            ("message_id", pa.string()),
            ("propensity", pa.float64()),
            ("model_version", pa.string()),
            ("policy", pa.string()),
            ("app_apple_id", pa.int64()),
            ("kind", pa.string()),
            ("scores", pa.list_(pa.float64())),
            ("values", pa.list_(pa.float64())),
            ("probabilities", pa.list_(pa.float64())),
            ("policy_params", pa.string()),
            ("shadow_model_version", pa.string()),
            ("shadow_message_id", pa.string()),
            ("catalog_sha256", pa.string()),
            ("fallback_reason", pa.string()),
            ("features", pa.list_(pa.list_(pa.float32()))),
            ("feature_names_sha", pa.string()),
            ("latency_ms", pa.float64()),
            ("answered_at", pa.int64()),
            ("status", pa.int64()),
            ("profile", pa.string()),
        ]
    )


def as_apple_fallback(d: dict[str, Any]) -> dict[str, Any]:
    """Return a logged decision row, a 404 logged before 404s were marked given policy ``apple_fallback``.

    A request answered with no message is Apple's choice (it showed its own message): the export
    writes it with today's meaning, which the training files require of a row without ``message_id``.
    """
    if d["message_id"] is not None or d["policy"] == APPLE_FALLBACK_POLICY:
        return d
    reason = d["fallback_reason"]
    return {**d, "policy": APPLE_FALLBACK_POLICY,
            "fallback_reason": f"{reason}; no_eligible_message" if reason else "no_eligible_message"}


def export_columns(rows: list[dict[str, Any]], names: list[str]) -> dict[str, list[Any]]:
    """Return the export's columns `names` (each a list, one value per row) of decision dicts `rows`.

    Each row is read as :func:`as_apple_fallback` gives it; ``policy_params`` becomes its JSON text and
    ``features`` a plain list, as the export's Arrow schema (:func:`decisions_arrow_schema`) expects.
    Shared by the SQLite and the PostgreSQL exports.
    """
    cols: dict[str, list[Any]] = {n: [] for n in names}
    for d in rows:
        d = as_apple_fallback(d)
        for n in names:
            v = d[n]
            if n == "policy_params":
                v = encode_json(v).decode() if v is not None else None
            elif n == "features" and v is not None:
                v = v.tolist()
            cols[n].append(v)
    return cols
