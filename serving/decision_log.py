"""The decision and outcome log: every answered request, written to SQLite by a background writer.

The request path only appends a :class:`DecisionRecord` to an in-memory queue (``log`` never
blocks, never touches disk, never raises). A background thread wakes every ``batch_ms`` and writes
everything queued in one transaction to a SQLite file in WAL mode with ``synchronous=NORMAL``, either
itself (``writer="thread"``) or by shipping it, msgpack-encoded, to a child process that does
(``writer="process"``, the server's default: ``serving/log_writer.py``, off this process's GIL):
a committed batch survives a killed process, so a SIGKILL loses at most the decisions answered
within the last batch window, and ``close()`` (graceful shutdown) writes them all.

Nothing is lost silently (docs/failure-modes.md): every batch is kept until its writer confirms
it, and sent again to a restarted writer or retried while the file cannot be written (disk full,
read-only), with :meth:`DecisionLog.health` (``/ready``) saying why meanwhile. Decisions are unique
by ``request_id`` and outcomes by ``notificationUUID`` (``INSERT OR IGNORE``), so a batch written
twice is stored once. :class:`LogFile` checks the file around every transaction and starts a fresh
one when it was deleted, replaced, overwritten or found corrupt. A batch holding an outcome is
committed with ``synchronous=FULL``. Only what exceeds ``max_queue`` is dropped, counted and logged.

Each server process writes its own file, ``DATA_DIR/decisions-<host>-<pid>.sqlite`` (SQLite has
one writer per file; one file per process needs no locking between workers or replicas). The
export reads them all (what it can of a damaged one) and writes the DESIGN.md decisions file that
``retention train`` reads; :func:`compact_logs` merges the files no running writer holds into one archive.

Arrays are stored compactly: candidates, scores, values, probabilities and policy parameters as
JSON text; the feature matrix as float32 bytes with its shape (what the ONNX model was fed).
Outcomes from App Store Server Notifications go to an ``outcomes`` table in the same file,
keyed by ``notificationUUID`` so a notification Apple sends twice is recorded once.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import heapq
import itertools
import logging
import os
import re
import secrets
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from models.data_files import APPLE_FALLBACK_POLICY, DECISION_COLUMNS, EVENTS, unstorable
from models.data_files import event_for_notification as event_for_notification  # re-exported: its old home
from serving import children, log_writer

log = logging.getLogger("retention.decision_log")

SCHEMA_VERSION = 2  # 2: request_id unique (a batch written twice adds nothing)
#: Where rows are written: a thread of this process, or a child process (``serving/log_writer.py``).
WRITERS: tuple[str, ...] = ("thread", "process")
#: The DESIGN.md decisions columns, in order; the export adds the server's extra columns after them.
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
_ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
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


class _Outcome(msgspec.Struct):
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


class _Schema(msgspec.Struct):
    sha: str
    names: list[str]


_DDL = """
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
_DECISION_COLUMNS_SQL = (
    "request_id, original_transaction_id, product_id, user_locale, environment, signed_date, app_apple_id, "
    'candidates, scores, "values", probabilities, message_id, kind, propensity, policy, policy_params, '
    "model_version, shadow_model_version, shadow_message_id, catalog_sha256, fallback_reason, "
    "features, features_rows, features_cols, feature_names_sha, latency_ms, answered_at, status, profile"
)
_INSERT_OUTCOME = (
    "INSERT OR IGNORE INTO outcomes (notification_uuid, original_transaction_id, event, at, raw_type, raw_subtype, "
    "received_at, offer_type, offer_identifier, offer_discount_type, transaction_reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UNIQUE_REQUEST_ID = "CREATE UNIQUE INDEX IF NOT EXISTS decisions_request_id ON decisions (request_id)"
_INSERT_SCHEMA = "INSERT OR IGNORE INTO feature_schemas VALUES (?, ?)"


def _enc_hook(obj: Any) -> Any:
    # numpy scalars and arrays in policy parameters or vectors (np.float32 is not a float subclass)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise NotImplementedError(f"cannot log a {type(obj).__name__}")


_json = msgspec.json.Encoder(enc_hook=_enc_hook).encode
_unjson = msgspec.json.decode


def feature_names_sha(names: Sequence[str]) -> str:
    """Return the schema hash of an ordered list of feature names (what ``feature_names_sha`` holds)."""
    return hashlib.sha256("\x1f".join(names).encode()).hexdigest()[:16]


def log_file_name(worker_id: str | int | None = None) -> str:
    """Return this process's log file name, ``decisions-<host>-<pid or worker id>.sqlite``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"decisions-{host}-{os.getpid() if worker_id is None else worker_id}.sqlite"


def log_files(data_dir: str | Path) -> list[Path]:
    """Return every process's decision log file in `data_dir`, sorted by name."""
    return sorted(Path(data_dir).glob("decisions-*.sqlite"))


def _profile_json(profile: dict[str, Any] | None) -> str:
    """Return a profile as JSON text; a value JSON cannot hold (bytes...) is written as its text, never dropped."""
    try:
        return _json(profile).decode()
    except Exception:
        return _json({str(k): v if isinstance(v, int | float | str | None) else str(v) for k, v in (profile or {}).items()}).decode()


def _vector(x: Any) -> bytes:
    if x is None:
        return b"[]"
    if isinstance(x, np.ndarray):
        x = x.tolist()
    return _json(x)


def _decision_row(r: DecisionRecord, now_ms: int) -> tuple[Any, ...]:
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
        _json(list(r.candidates)).decode(),
        _vector(r.scores).decode(),
        _vector(r.values).decode(),
        _vector(r.probabilities).decode(),
        r.message_id,
        r.kind,
        float(r.propensity),
        r.policy,
        _json(r.policy_params).decode(),
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


_N_DECISION_COLUMNS = _DECISION_COLUMNS_SQL.count(",") + 1
_ROWS_PER_STATEMENT = 256  # 29 parameters a row: well under SQLite's 32,766-variable limit


@functools.lru_cache(maxsize=64)
def _multi_insert_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * _N_DECISION_COLUMNS) + ")"
    # OR IGNORE: a batch sent again (the writer restarted before confirming it) adds nothing twice
    return f"INSERT OR IGNORE INTO decisions ({_DECISION_COLUMNS_SQL}) VALUES " + ", ".join([one] * rows)


_INSERT_DECISION = _multi_insert_sql(1)  # one row (the benchmark's per-decision baseline)


def _insert_decisions(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    """Insert rows with one multi-row statement per 256 rows; return how many were new (by request_id).

    Python's sqlite3 releases and re-takes the GIL around every step: executemany would do that once per
    row, and each re-take waits for the event loop thread to yield the GIL (measured: the endpoint served
    ~1/3 fewer requests per second with per-row inserts). One statement per chunk takes the GIL a few times
    per batch instead.
    """
    new = 0
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        new += max(conn.execute(_multi_insert_sql(len(chunk)), [v for row in chunk for v in row]).rowcount, 0)
    return new


def _commit_rows(
    conn: sqlite3.Connection,
    decisions: list[tuple[Any, ...]],
    outcomes: list[tuple[Any, ...]],
    schemas: list[tuple[str, str]],
    *,
    durable: bool = False,
) -> tuple[int, int]:
    """Write one batch in one transaction; return how many decisions and outcomes were new (repeats are ignored).

    `durable` (a batch with outcomes, which are answered 200 only once stored) commits with
    ``synchronous=FULL``: the WAL is fsynced, so the row survives a power loss, not only a killed process.
    Raises on failure after rolling back.
    """
    if durable:
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN")
    try:
        new_decisions = _insert_decisions(conn, decisions) if decisions else 0
        new_outcomes = max(conn.executemany(_INSERT_OUTCOME, outcomes).rowcount, 0) if outcomes else 0
        if schemas:
            conn.executemany(_INSERT_SCHEMA, schemas)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    finally:
        if durable:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA synchronous=NORMAL")
    return new_decisions, new_outcomes


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a log file to :data:`SCHEMA_VERSION`: tables, then ``request_id`` unique (version 1 had no index).

    A version-1 file that holds one request_id twice keeps its first row. Columns added later are in
    :data:`_ADDED_COLUMNS` (``ALTER TABLE ... ADD COLUMN``); readers take the columns a file has.
    """
    conn.executescript(_DDL)
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
    for table, cols in _ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for name, sql_type in cols:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


def _connect_writer(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if not conn.execute("PRAGMA application_id").fetchone()[0]:
            # a random mark in the file's header: a file overwritten in place no longer has it (LogFile.check)
            conn.execute(f"PRAGMA application_id={secrets.randbelow(2**31 - 1) + 1}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
        conn.execute("PRAGMA busy_timeout=5000")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# -- the log file: checked around every batch, started afresh when deleted, replaced or corrupt ------------
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: What can happen to a log file under a running writer (the ``reason`` of ``on_fault`` and of the metric).
FILE_FAULTS: tuple[str, ...] = ("deleted", "replaced", "corrupt")
#: Seconds between two attempts to write while the log cannot be written (disk full, read-only, writer down).
RETRY_S = 1.0
#: Seconds between two ``PRAGMA quick_check`` runs of the open log file, on a thread of the writer, off the
#: request path: damage below the header (pages an append never reads) is found within this bound.
QUICK_CHECK_S = 60.0
#: Seconds a batch may wait for its writer's confirmation before ``/ready`` answers 503 (a hung writer,
#: a stalled disk): the notification path's own wait (serving/notifications.py STORE_TIMEOUT_S).
STALL_S = 2.0


class LogUnavailableError(Exception):
    """Rows cannot be written now (disk full, read-only folder, I/O error); the message says why, in one line."""


def _why(exc: BaseException) -> str:
    """Return what an error from SQLite or the file system means for the operator, in a few words and the error."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    code = getattr(exc, "errno", None)
    if name.startswith("SQLITE_FULL") or code == errno.ENOSPC:
        return f"disk full ({exc})"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")) or code in (
        errno.EROFS, errno.EACCES, errno.EPERM,
    ):  # fmt: skip
        return f"not writable ({exc})"
    return f"write failed ({exc})"


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """True for damage in the file: SQLite's corruption codes, and any bare DatabaseError from our own statements."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    return (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or "malformed" in text
        or "not a database" in text
        or type(exc) is sqlite3.DatabaseError
    )


def _quick_check(path: Path) -> str | None:
    """Run ``PRAGMA quick_check`` on the file at `path` (its own read-only connection); return what is wrong, or None."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error:
        return None  # cannot tell (the file is being replaced): the next check or commit will say
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
    except sqlite3.Error as exc:
        return str(exc) if _is_corrupt(exc) else None
    finally:
        conn.close()
    return None if rows == ["ok"] else "; ".join(map(str, rows))


def _is_unavailable(exc: sqlite3.Error) -> bool:
    """True for errors that pass (the disk, the folder, a lock), as opposed to a row SQLite cannot bind."""
    return isinstance(exc, sqlite3.OperationalError) or not isinstance(
        exc, sqlite3.InterfaceError | sqlite3.ProgrammingError | sqlite3.IntegrityError | sqlite3.DataError
    )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _lock_shared(fd: int, wait_s: float = 10.0) -> bool:
    """Take a shared flock on `fd` (a writer's mark on its file), waiting out a compaction; False if it never ends."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError:
            return True  # a file system without flock: nothing to coordinate with


class LogFile:
    """One writer's SQLite log file at a fixed path, checked before and after every batch it commits.

    A file that was deleted, replaced by another file, overwritten in place (its header's mark is
    gone) or that SQLite finds corrupt is closed and a fresh file is started at the same path; a
    replaced or corrupt file is first moved aside as ``<name>.<reason>-<ms>.sqlite`` (export still
    reads what it can of it). ``on_fault(reason, line)`` says so, and the batch is written to the fresh
    file: no row that was not yet confirmed is lost. Rows confirmed before the fault went with the file.

    While open, the file is held with a shared ``flock``: ``retention decisions compact`` merges only
    files that no live writer holds. Raises :class:`LogUnavailableError` when rows cannot be written now.
    """

    def __init__(self, path: str | Path, *, on_fault: Callable[[str, str], None] | None = None) -> None:
        self.path = Path(path)
        self.conn: sqlite3.Connection | None = None
        self._on_fault = on_fault
        self._fd = -1
        self._ident: tuple[int, int] | None = None
        self._mark: bytes | None = None
        self._checked_at = time.monotonic()
        self._checker: threading.Thread | None = None
        self._damage: tuple[tuple[int, int] | None, str] | None = None  # (the file checked, what quick_check found)

    def _start_quick_check(self) -> None:
        """Every QUICK_CHECK_S, check the open file on a thread; its finding is acted on by the next commit."""
        if self._checker is not None and self._checker.is_alive():
            return
        if time.monotonic() - self._checked_at < QUICK_CHECK_S:
            return
        self._checked_at = time.monotonic()
        ident, path = self._ident, self.path

        def run() -> None:
            found = _quick_check(path)
            if found is not None:
                self._damage = (ident, found)

        self._checker = threading.Thread(target=run, name="decision-log-quick-check", daemon=True)
        self._checker.start()

    def open(self, *, _retry: bool = False) -> None:
        """Open (or create) the file; raises LogUnavailableError (one line) when it cannot be."""
        path = self.path
        try:
            created = not path.exists()
            conn = _connect_writer(path)
        except (sqlite3.Error, OSError) as exc:
            raise LogUnavailableError(f"cannot open the decision log {path}: {_why(exc)}") from None
        try:
            with contextlib.suppress(sqlite3.Error):  # the header on disk now holds the mark (a v1 file gets one)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            conn.close()
            raise LogUnavailableError(f"cannot open the decision log {path}: {_why(exc)}") from None
        locked = _lock_shared(fd)
        st = os.fstat(fd)
        if not locked or st.st_nlink == 0:  # a compaction held it, and merged and deleted it meanwhile
            conn.close()
            os.close(fd)  # after the connection: closing another descriptor of the file drops SQLite's locks
            if locked and not _retry:
                return self.open(_retry=True)  # a fresh file at the path
            raise LogUnavailableError(f"the decision log {path} is held by a compaction (retention decisions compact)")
        head = os.pread(fd, 100, 0)
        app_id = struct.pack(">i", conn.execute("PRAGMA application_id").fetchone()[0])
        self._mark = app_id if head[:16] == _SQLITE_MAGIC and head[68:72] == app_id else None
        self.conn, self._fd, self._ident = conn, fd, (st.st_dev, st.st_ino)
        if created:
            _fsync_dir(path.parent)

    def check(self) -> tuple[str, str] | None:
        """Return (reason, what happened) when the file at the path is no longer the one open, else None."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "deleted", f"{self.path} was deleted"
        except OSError:
            return None  # cannot tell; the commit will say
        if (st.st_dev, st.st_ino) != self._ident:
            return "replaced", f"{self.path} was replaced by another file"
        head = os.pread(self._fd, 100, 0)
        if head[:16] != _SQLITE_MAGIC or (self._mark is not None and head[68:72] != self._mark):
            return "replaced", f"{self.path} was overwritten"
        return None

    def commit(
        self, decisions: list[tuple[Any, ...]], outcomes: list[tuple[Any, ...]], schemas: list[tuple[str, str]]
    ) -> tuple[int, int]:
        """Commit one batch to a file that still exists (fresh when needed); return (new decisions, new outcomes).

        Raises LogUnavailableError (rows kept by the caller), or the SQLite error of a batch that cannot be bound.
        """
        for _ in range(3):
            if self.conn is None:
                self.open()
            fault = self.check()
            if fault is None and self._damage is not None:
                ident, found = self._damage
                self._damage = None
                if ident == self._ident:  # (not a finding about a file already set aside)
                    fault = ("corrupt", f"{self.path} is corrupt (quick_check: {found})")
            if fault is not None:
                self._restart(*fault)
                continue
            self._start_quick_check()
            assert self.conn is not None
            try:
                result = _commit_rows(self.conn, decisions, outcomes, schemas, durable=bool(outcomes))
            except sqlite3.Error as exc:
                if _is_corrupt(exc):
                    self._restart("corrupt", f"{self.path} is corrupt ({exc})")
                    continue
                if _is_unavailable(exc):
                    raise LogUnavailableError(f"cannot write the decision log {self.path}: {_why(exc)}") from None
                raise
            fault = self.check()  # committed to a file deleted meanwhile: write the batch again, to a fresh one
            if fault is not None:
                self._restart(*fault)
                continue
            return result
        raise LogUnavailableError(f"the decision log {self.path} keeps being deleted or replaced")

    def close(self) -> None:
        """Checkpoint and close (idempotent)."""
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._close()

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if self._fd >= 0:  # after the connection: closing another descriptor of the file drops SQLite's locks
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def _restart(self, reason: str, what: str) -> None:
        self._close()
        path = self.path
        aside: Path | None = None
        try:
            if reason != "deleted" and path.exists():
                aside = path.with_name(f"{path.stem}.{reason}-{int(time.time() * 1000)}.sqlite")
                os.rename(path, aside)
            for suffix in ("-wal", "-shm"):  # ours, or the corrupt file's: never pair them with the fresh file
                side = Path(f"{path}{suffix}")
                if reason == "corrupt" and aside is not None and side.exists():
                    os.rename(side, f"{aside}{suffix}")
                else:
                    side.unlink(missing_ok=True)
        except OSError as exc:
            self._report(reason, f"decision log: {what}, and it cannot be set aside: {_why(exc)}")
            raise LogUnavailableError(f"cannot start a fresh decision log at {path}: {_why(exc)}") from None
        kept = f" (the old one kept as {aside.name})" if aside is not None else ""
        self._report(reason, f"decision log: {what}; writing to a fresh file {path}{kept}")
        self.open()

    def _report(self, reason: str, line: str) -> None:
        if self._on_fault is not None:
            with contextlib.suppress(Exception):
                self._on_fault(reason, line)


class _Waiter:
    """A :meth:`DecisionLog.flush` point in the queue: done(True) once everything before it is committed."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False

    def done(self, ok: bool) -> None:
        if not self.event.is_set():
            self.ok = ok
            self.event.set()


class _Shipped:
    """A batch sent to the writer process, kept until it confirms the batch's marker (sent again otherwise)."""

    __slots__ = ("data", "failed", "records", "sent_at", "waiters")

    def __init__(self, data: bytes, records: int, waiters: list[_Waiter]) -> None:
        self.data = data
        self.records = records
        self.waiters = waiters
        self.failed = False
        self.sent_at = time.monotonic()  # (again at each resend)


class DecisionLog:
    """Queue of decisions and outcomes written to one SQLite file by a background writer, in batches.

    Nothing is dropped silently: a batch is kept (in memory, counted against `max_queue`) until its
    writer confirms it, re-sent to a restarted writer, and retried every :data:`RETRY_S` while the file
    cannot be written; :meth:`health` says why meanwhile (``/ready`` answers 503 with it). Only records
    past `max_queue` are dropped, counted by `on_drop` and logged. `on_fault(reason)` counts a file
    deleted, replaced or corrupt (:data:`FILE_FAULTS`), ``unavailable`` and ``writer_died``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_ms: float = 100.0,
        max_queue: int = 100_000,
        on_drop: Callable[[int], None] | None = None,
        writer: str = "thread",
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        if writer not in WRITERS:
            raise ValueError(f"the decision log writer must be one of {', '.join(WRITERS)}, not {writer!r}")
        if batch_ms <= 0:
            raise ValueError("the decision log batch window must be > 0 ms")
        if max_queue < 1:
            raise ValueError("the decision log queue must hold at least one record")
        self.path = Path(path)
        self.batch_s = batch_ms / 1000.0
        self.max_queue = max_queue
        self._on_drop = on_drop
        self._on_fault = on_fault
        self._q: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._drop_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._dropped = 0
        self._dropped_reported = 0
        self._last_drop_log = 0.0
        self._written = 0
        self._outcomes_written = 0
        self._batches = 0
        self._write_errors = 0
        self.writer = writer
        # rows not yet confirmed by the writer, kept to be written again: counted against max_queue
        self._held_records = 0
        self._unavailable: str | None = None  # why rows cannot be written now (None: they can)
        self._committing_since: float | None = None  # thread writer: a commit under way since (monotonic)
        self._retry_at = 0.0
        # thread writer: its file and the rows it could not write yet
        self._file: LogFile | None = None
        self._held: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[str, str]]] = ([], [], [])
        # process writer: the child, the batches it has not confirmed, and the running totals of children before it
        self._proc: subprocess.Popen[bytes] | None = None
        self._ack_thread: threading.Thread | None = None
        self._ack_lock = threading.Lock()
        self._unacked: dict[int, _Shipped] = {}
        self._marker_ids = itertools.count(1)
        self._spawn_at = 0.0
        self._writer_deaths = 0
        self._child_totals = (0, 0, 0, 0, 0)
        self._base_totals = (0, 0, 0, 0, 0)

    # -- request path ----------------------------------------------------------------------
    def log(self, record: DecisionRecord) -> None:
        """Queue one decision; returns at once, never raises, counts a drop when the queue is full."""
        try:
            if len(self._q) + self._held_records >= self.max_queue or self._closed:
                self._drop(1)
                if self._closed:  # no writer left to report it: say so here (shutdown, not the hot path)
                    self._report_drops()
                return
            if not record.answered_at:  # fixed now, so a batch written twice holds the same row twice
                record.answered_at = int(time.time() * 1000)
            self._q.append(record)
        except Exception:  # never into the request path
            self._drop(1)

    def log_outcome(
        self,
        notification_uuid: str,
        original_transaction_id: str,
        event: str,
        at_ms: int,
        raw_type: str | None = None,
        raw_subtype: str | None = None,
        *,
        offer_type: int | None = None,
        offer_identifier: str | None = None,
        offer_discount_type: str | None = None,
        transaction_reason: str | None = None,
    ) -> None:
        """Queue one outcome (idempotent by `notification_uuid`); call :meth:`flush` to wait until it is on disk.

        The offer fields are Apple's ``offerType`` (raw integer, 5 included), ``offerIdentifier``,
        ``offerDiscountType`` and ``transactionReason`` from the notification's signed transaction
        (else renewal) info.

        Raises ValueError for an event outside :data:`EVENTS` or a value the log cannot store
        (:func:`models.data_files.unstorable`): callers check what they receive before this.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown outcome event {event!r}; one of {', '.join(EVENTS)}")
        problem = unstorable({"notification_uuid": notification_uuid, "original_transaction_id": original_transaction_id,
                              "at": at_ms, "raw_type": raw_type, "raw_subtype": raw_subtype, "offer_type": offer_type,
                              "offer_identifier": offer_identifier, "offer_discount_type": offer_discount_type,
                              "transaction_reason": transaction_reason})
        if problem is not None:
            raise ValueError(f"the outcome cannot be stored: {problem}")
        outcome = _Outcome(
            notification_uuid,
            original_transaction_id,
            event,
            int(at_ms),
            raw_type,
            raw_subtype,
            int(time.time() * 1000),
            offer_type,
            offer_identifier,
            offer_discount_type,
            transaction_reason,
        )
        if self._closed or len(self._q) + self._held_records >= self.max_queue:
            self._drop(1)
            return
        self._q.append(outcome)

    def register_feature_names(self, names: Sequence[str]) -> str:
        """Return the schema hash of `names` and record the names once in the log (call at model load)."""
        sha = feature_names_sha(names)
        self._q.append(_Schema(sha, list(names)))
        return sha

    def _drop(self, n: int) -> None:
        with self._drop_lock:
            self._dropped += n
        self._wake.set()  # the writer reports it (log line, metric) off the request path

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Open the file (WAL) and start the writer; raises OSError (one line) if the file cannot be opened."""
        if self._thread is not None:
            return
        if self.writer == "process":
            self._spawn()  # fails here, at start-up, when the file cannot be opened
        else:
            self._file = LogFile(self.path, on_fault=self._file_fault)
            try:
                self._file.open()  # fail here, at start-up, not silently in the thread
            except LogUnavailableError as exc:
                raise OSError(str(exc)) from None
        self._thread = threading.Thread(target=self._run, name="decision-log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def flush(self, timeout: float = 5.0) -> bool:
        """Return True once everything queued before this call is committed to a file that still exists.

        False on timeout, with no writer, or when the batch could not be written (it stays queued and
        is retried, but the caller should not confirm it: a notification answers 503 so Apple resends).
        """
        if self._thread is None or not self._thread.is_alive():
            return not self._q and not self._held_records
        waiter = _Waiter()
        self._q.append(waiter)
        self._wake.set()
        return waiter.event.wait(timeout) and waiter.ok

    def close(self, timeout: float = 10.0) -> None:
        """Write everything still queued and stop the writer (graceful shutdown); idempotent.

        Rows that still cannot be written when `timeout` runs out are counted as dropped and logged.
        """
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            log.error("decision log writer did not finish within %.1f s; %d records may be lost", timeout, len(self._q))
        self._thread = None
        self._report_drops()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def health(self) -> tuple[bool, str]:
        """Return (True, "ok") while decisions can be written, else (False, why) in one line (for ``/ready``)."""
        if self._closed:
            return False, "decision log closed"
        if self._thread is None or not self._thread.is_alive():
            return False, "decision log writer not running"
        why = self._unavailable
        if why is not None:
            return False, f"decisions cannot be written: {why}; {self._held_records} rows kept, retrying"
        waited = self._unconfirmed_for()
        if waited > STALL_S:
            return False, (
                f"decisions cannot be written: the decision log writer has not confirmed a batch for {waited:.0f} s "
                f"(hung or stopped?); {self._held_records} rows kept"
            )
        return True, "ok"

    def _unconfirmed_for(self) -> float:
        """Seconds the oldest batch sent to the writer has waited for its confirmation (0 when none waits)."""
        now = time.monotonic()
        if self.writer == "process":
            with self._ack_lock:
                sent = [b.sent_at for b in self._unacked.values() if not b.failed]
            return now - min(sent) if sent else 0.0
        since = self._committing_since
        return now - since if since is not None else 0.0

    def stats(self) -> dict[str, int]:
        """Return counts: queued, unconfirmed (kept until written), written (new decisions), outcomes (new ones),
        batches, dropped, write_errors, writer_alive."""
        alive = self._thread is not None and self._thread.is_alive()
        if self.writer == "process":
            alive = alive and self._proc is not None and self._proc.poll() is None
        return {
            "queued": len(self._q),
            "unconfirmed": self._held_records,
            "written": self._written,
            "outcomes": self._outcomes_written,
            "batches": self._batches,
            "dropped": self._dropped,
            "write_errors": self._write_errors,
            "writer_alive": int(alive),
        }

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        give_up_at: float | None = None
        try:
            while True:
                stopping = self._stop.is_set()
                if not stopping:
                    self._wake.wait(self.batch_s)
                    self._wake.clear()
                elif self._unavailable is not None or (self.writer == "process" and not self._q):
                    self._wake.wait(0.05)  # closing: wait for the writer's confirmations, or retry, without spinning
                    self._wake.clear()
                if self.writer == "process":
                    self._ship_batch()
                else:
                    self._write_batch()
                self._report_drops()
                if stopping:
                    if not self._q and not self._held_records:
                        break
                    if self._unavailable is None:
                        give_up_at = None
                    else:  # closing while nothing can be written: a few retries, then count what is left
                        give_up_at = give_up_at or time.monotonic() + 5.0
                        if time.monotonic() > give_up_at:
                            self._give_up()
                            break
        finally:
            if self.writer == "process":
                self._end_child()
            elif self._file is not None:
                self._file.close()

    def _give_up(self) -> None:
        """At close, rows that still cannot be written: counted as dropped and logged, never silent."""
        with self._ack_lock:
            n = self._held_records
            self._held_records = 0
            self._held = ([], [], [])
            for b in self._unacked.values():
                for w in b.waiters:
                    w.done(False)
            self._unacked.clear()
        if n:
            log.error("decision log: closing with %d rows that could not be written (%s)", n, self._unavailable)
            self._drop(n)

    def _file_fault(self, reason: str, line: str) -> None:
        log.error("%s", line)
        self._fault(reason)

    def _fault(self, reason: str) -> None:
        if self._on_fault is not None:
            with contextlib.suppress(Exception):
                self._on_fault(reason)

    def _set_unavailable(self, why: str | None) -> None:
        """Record whether rows can be written; log the change (one line each way) and count a new outage."""
        before, self._unavailable = self._unavailable, why
        if why is not None and before is None:
            log.error(
                "decision log: %s; keeping the rows in memory (up to %d) and retrying every %.0f s; /ready answers 503",
                why, self.max_queue, RETRY_S,
            )  # fmt: skip
            self._fault("unavailable")
        elif why is None and before is not None:
            log.warning("decision log: writing again to %s", self.path)

    def _write_batch(self) -> None:
        q = self._q
        n = len(q)
        items = [q.popleft() for _ in range(n)]
        now_ms = int(time.time() * 1000)
        decisions, outcomes, schemas = self._held
        waiters: list[_Waiter] = []
        bad = 0
        for it in items:
            if isinstance(it, DecisionRecord):
                try:
                    decisions.append(_decision_row(it, now_ms))
                except Exception:
                    bad += 1
            elif isinstance(it, _Outcome):
                outcomes.append(msgspec.structs.astuple(it))
            elif isinstance(it, _Schema):
                schemas.append((it.sha, _json(it.names).decode()))
            elif isinstance(it, _Waiter):
                waiters.append(it)
        if bad:
            log.error("decision log: %d records could not be encoded and were dropped", bad)
            self._drop(bad)
        self._held = (decisions, outcomes, schemas)
        self._held_records = len(decisions) + len(outcomes)
        if not (decisions or outcomes or schemas):
            for w in waiters:
                w.done(True)
            return
        if self._unavailable is not None and time.monotonic() < self._retry_at and not waiters:
            return  # retried every RETRY_S, or at once for a caller waiting (a notification)
        assert self._file is not None
        self._committing_since = time.monotonic()
        try:
            new_decisions, new_outcomes = self._file.commit(decisions, outcomes, schemas)
        except LogUnavailableError as exc:
            self._write_errors += 1
            self._retry_at = time.monotonic() + RETRY_S
            self._set_unavailable(str(exc))
            for w in waiters:
                w.done(False)
            return
        except Exception as exc:  # rows SQLite cannot take (a bug, not the disk): counted and logged
            self._write_errors += 1
            log.error("decision log: a batch of %d rows cannot be written (%s) and is dropped", self._held_records, exc)
            self._drop(self._held_records)
            new_decisions = new_outcomes = 0
        else:
            self._batches += 1
            self._set_unavailable(None)
        finally:
            self._committing_since = None
        self._written += new_decisions
        self._outcomes_written += new_outcomes
        self._held = ([], [], [])
        self._held_records = 0
        for w in waiters:
            w.done(True)

    # -- process writer (serving/log_writer.py) ---------------------------------------------
    def _spawn(self) -> None:
        """Start the writer process and wait for it to open the file; raises OSError when it cannot."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(  # -P: never a serving/log_writer.py of the working directory (serving/children.py)
            children.command("serving.log_writer", str(self.path)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=children.environment(), close_fds=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        buf = bytearray()
        msgs: list[Any] = []
        while not msgs:  # the writer's first frame: "ready", or "error" and why
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                proc.kill()
                proc.wait()
                raise OSError(f"the decision log writer process did not start for {self.path}")
            buf += chunk
            msgs = log_writer.read_frames(buf)
        if msgs[0][0] != "ready":
            proc.wait(timeout=10)
            raise OSError(str(msgs[0][1]))
        with contextlib.suppress(OSError):  # a bigger pipe: one batch rarely waits for the writer
            fcntl.fcntl(proc.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        self._base_totals = tuple(a + b for a, b in zip(self._base_totals, self._child_totals, strict=True))  # type: ignore[assignment]
        self._child_totals = (0, 0, 0, 0, 0)
        self._proc = proc
        self._ack_thread = threading.Thread(
            target=self._read_acks, args=(proc, buf), name="decision-log-acks", daemon=True
        )
        self._ack_thread.start()

    def _read_acks(self, proc: subprocess.Popen[bytes], buf: bytearray) -> None:
        assert proc.stdout is not None
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            try:
                for msg in log_writer.read_frames(buf):
                    if msg[0] == "fault":
                        self._file_fault(str(msg[1][0]), str(msg[1][1]))
                    elif msg[0] == "ack":
                        self._take_ack(msg[1])
            except Exception as exc:  # not our protocol (another version's writer?): replace it
                log.error("decision log: the writer process sent what this server cannot read (%r); stopping it", exc)
                with contextlib.suppress(OSError):
                    proc.kill()
                return

    def _take_ack(self, payload: list[Any]) -> None:
        ok, failed, unavailable, *totals = payload
        with self._ack_lock:
            for mid in ok:
                b = self._unacked.pop(mid, None)
                if b is not None:
                    self._held_records -= b.records
                    for w in b.waiters:
                        w.done(True)
            if not self._unacked:
                self._wake.set()  # a closing log waits for this
            for mid in failed:
                b = self._unacked.get(mid)
                if b is not None:
                    b.failed = True
                    for w in b.waiters:
                        w.done(False)
        if failed:
            self._retry_at = time.monotonic() + RETRY_S
        bad_before = self._child_totals[4]
        self._child_totals = tuple(totals)
        base = self._base_totals
        self._written = base[0] + totals[0]
        self._outcomes_written = base[1] + totals[1]
        self._batches = base[2] + totals[2]
        self._write_errors = base[3] + totals[3] + self._writer_deaths
        if totals[4] > bad_before:
            log.error("decision log: %d records could not be written and were dropped", totals[4] - bad_before)
            self._drop(totals[4] - bad_before)
        self._set_unavailable(unavailable)

    def _ship_batch(self) -> None:
        """Send everything queued to the writer process as one batch ending in its marker; keep it until confirmed."""
        q = self._q
        n = len(q)
        items = [q.popleft() for _ in range(n)]
        frames: list[bytes] = []
        waiters: list[_Waiter] = []
        records = bad = 0
        for it in items:
            try:
                if isinstance(it, DecisionRecord):
                    frames.append(log_writer.frame("d", msgspec.structs.astuple(it)))
                    records += 1
                elif isinstance(it, _Outcome):
                    frames.append(log_writer.frame("o", msgspec.structs.astuple(it)))
                    records += 1
                elif isinstance(it, _Schema):
                    frames.append(log_writer.frame("s", [it.sha, it.names]))
                elif isinstance(it, _Waiter):
                    waiters.append(it)
            except Exception:
                bad += 1
        if bad:
            log.error("decision log: %d records could not be encoded and were dropped", bad)
            self._drop(bad)
        batch: _Shipped | None = None
        if frames or waiters:
            mid = next(self._marker_ids)
            frames.append(log_writer.frame("m", mid))
            batch = _Shipped(b"".join(frames), records, waiters)
            with self._ack_lock:
                self._unacked[mid] = batch
                self._held_records += records
        self._send(batch)

    def _send(self, batch: _Shipped | None) -> None:
        """Send `batch` (and failed batches when due); start a new writer, sending it every unconfirmed batch, when needed."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._restart_child()
            return
        with self._ack_lock:
            # while the file cannot be written, what is held is tried again every RETRY_S (all of it), and a
            # new batch goes at once only when a caller waits for it (a notification): no resend every window
            out: list[_Shipped] = []
            if self._unavailable is None or time.monotonic() >= self._retry_at:
                out = [b for b in self._unacked.values() if b.failed]
                if self._unavailable is not None:
                    self._retry_at = time.monotonic() + RETRY_S
            if batch is not None:
                if self._unavailable is None or batch.waiters:
                    out.append(batch)
                else:
                    batch.failed = True  # held for the next retry
            now = time.monotonic()
            for b in out:
                b.failed = False
                b.sent_at = now
        if not out:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"".join(b.data for b in out))
            proc.stdin.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            self._restart_child()

    def _restart_child(self) -> None:
        """The writer process is gone: start another and send it every batch not yet confirmed, in order."""
        proc = self._proc
        if proc is not None:
            code = proc.poll()
            self._writer_deaths += 1
            self._write_errors += 1
            log.error(
                "decision log: the writer process exited (status %s); starting a new one and sending it the %d "
                "rows it had not confirmed",
                code, self._held_records,
            )  # fmt: skip
            self._fault("writer_died")
            self._end_child(timeout=5.0)
        now = time.monotonic()
        if now < self._spawn_at:
            return
        try:
            self._spawn()
        except Exception as exc:
            self._spawn_at = now + RETRY_S
            self._set_unavailable(f"the writer process cannot start ({str(exc).strip().splitlines()[0]})")
            with self._ack_lock:
                for b in self._unacked.values():
                    for w in b.waiters:
                        w.done(False)
            return
        self._set_unavailable(None)
        new = self._proc
        assert new is not None and new.stdin is not None
        with self._ack_lock:
            out = list(self._unacked.values())
            now = time.monotonic()
            for b in out:
                b.failed = False
                b.sent_at = now
        try:
            if out:
                new.stdin.write(b"".join(b.data for b in out))
                new.stdin.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                new.kill()  # the next batch window starts another

    def _end_child(self, timeout: float = 30.0) -> None:
        """Close the writer's stdin (it writes what it has, then exits) and wait for it and its acks."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("decision log: the writer process did not finish within %.0f s; stopping it", timeout)
            proc.kill()
            proc.wait()
        if self._ack_thread is not None:
            self._ack_thread.join(5.0)
            self._ack_thread = None

    def _report_drops(self) -> None:
        with self._report_lock:
            self._report_drops_locked()

    def _report_drops_locked(self) -> None:
        dropped = self._dropped
        delta = dropped - self._dropped_reported
        if delta <= 0:
            return
        self._dropped_reported = dropped
        if self._on_drop is not None:
            try:
                self._on_drop(delta)
            except Exception:
                log.exception("decision log: the drop callback failed")
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0 or self._last_drop_log == 0.0:
            self._last_drop_log = now
            log.warning(
                "decision log: %d records dropped so far (queue full at %d, or log closed)", dropped, self.max_queue
            )


# -- reading and export --------------------------------------------------------------------------
def _open_ro(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ValueError(f"decision log {str(path)!r} does not exist")
    try:
        return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ValueError(f"cannot open the decision log {str(path)!r}: {exc}") from None


def _columns_sql(conn: sqlite3.Connection, table: str, columns: str) -> str:
    """Return `columns` (SQL list) with ``NULL AS c`` for each added column a file made earlier lacks."""
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    missing = [c for c, _ in _ADDED_COLUMNS[table] if c not in have]
    for c in missing:
        columns = re.sub(rf"(?<![\w\"]){c}(?![\w\"])", f"NULL AS {c}", columns)
    return columns


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _decode_decision(row: sqlite3.Row) -> dict[str, Any]:
    d = {k: row[k] for k in REQUIRED_DECISION_COLUMNS + EXTRA_DECISION_COLUMNS if k != "features"}
    for k in ("candidates", "scores", "values", "probabilities", "policy_params"):
        d[k] = _unjson(d[k]) if d[k] is not None else None
    blob = row["features"]
    if blob is None:
        d["features"] = None
    else:
        d["features"] = np.frombuffer(blob, dtype=np.float32).reshape(row["features_rows"], row["features_cols"])
    return d


#: Told (path, why) about a log file that cannot be read (fully); without one, such a file raises ValueError.
OnBadFile = Callable[[Path, str], None]


def _bad(path: Path, exc: BaseException, on_bad_file: OnBadFile | None) -> None:
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if on_bad_file is None:
        raise ValueError(f"cannot read the decision log {str(path)!r}: {why}") from None
    on_bad_file(path, why)


#: Rows read at a time when salvaging a damaged file (the rowid range probed row by row when it fails).
_SALVAGE_CHUNK = 500
#: Failed ranges in a row after which the rest of a table counts as unreadable (bounds a garbage max(rowid)).
_SALVAGE_MAX_FAILED_RANGES = 2000


def _salvage(
    conn: sqlite3.Connection, table: str, cols: str, decode: Callable[[sqlite3.Row], Any]
) -> tuple[list[Any], int, str]:
    """Read what SQLite can of `table` in a damaged file, a rowid range at a time, row by row where a range fails.

    Returns (decoded rows in rowid order, rows or ranges that could not be read, the last error or "").
    A page SQLite finds malformed, or text that is not UTF-8, costs only the rows stored on it.
    """
    try:
        lo, hi = conn.execute(f"SELECT min(rowid), max(rowid) FROM {table}").fetchone()
    except sqlite3.DatabaseError as exc:
        return [], 1, f"table {table}: {exc}"
    if lo is None:
        return [], 0, ""
    out: list[Any] = []
    lost = 0
    why = ""
    failed_in_a_row = 0
    start = int(lo)
    sql_range = f"SELECT {cols} FROM {table} WHERE rowid >= ? AND rowid < ? ORDER BY rowid"
    sql_one = f"SELECT {cols} FROM {table} WHERE rowid = ?"
    while start <= hi:
        end = start + _SALVAGE_CHUNK
        try:
            out += [decode(r) for r in conn.execute(sql_range, (start, end)).fetchall()]
            failed_in_a_row = 0
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failed_in_a_row += 1
            for rowid in range(start, end):
                try:
                    row = conn.execute(sql_one, (rowid,)).fetchone()
                    if row is not None:
                        out.append(decode(row))
                except Exception:
                    lost += 1
            if failed_in_a_row >= _SALVAGE_MAX_FAILED_RANGES:
                lost += 1
                break
        start = end
    return out, lost, why


def _salvaged(path: Path, table: str, n: int, why: str, on_bad_file: OnBadFile) -> None:
    if n:
        on_bad_file(path, f"{n} unreadable {table} row(s) skipped, the rest read ({why})")


def _order(answered_at: Any, rowid: Any) -> tuple[int, int]:
    return (answered_at if answered_at is not None else -1, rowid)


def _salvage_decisions(
    conn: sqlite3.Connection, path: Path, last: tuple[Any, Any] | None, exc: BaseException, on_bad_file: OnBadFile
) -> Iterator[dict[str, Any]]:
    """Yield, in answered_at order, the decisions of a damaged file read row by row that come after `last`."""
    try:
        cols = _columns_sql(conn, "decisions", _DECISION_COLUMNS_SQL)
    except sqlite3.DatabaseError as exc2:
        _bad(path, exc2, on_bad_file)
        return
    got, lost, why = _salvage(
        conn, "decisions", f"id, {cols}", lambda r: (_order(r["answered_at"], r["id"]), _decode_decision(r))
    )
    if not got and not lost:  # nothing to salvage: the error was elsewhere (say so as it was)
        _bad(path, exc, on_bad_file)
        return
    _salvaged(path, "decision", lost, why or str(exc), on_bad_file)
    got.sort(key=lambda kd: kd[0])
    after = _order(*last) if last is not None else None
    for key, d in got:
        if after is None or key > after:
            yield d


def read_decisions(
    paths: str | Path | Iterable[str | Path], *, batch: int = 5000, on_bad_file: OnBadFile | None = None
) -> Iterator[dict[str, Any]]:
    """Yield every logged decision of the given log files as a dict, in answered_at order across files.

    Vectors are lists, ``policy_params`` a dict, ``features`` a float32 K x F numpy array (or None).
    A decision held by several files (an archive and the file it came from, a batch written again
    after a fault) is yielded once. With `on_bad_file`, a damaged file is read row by row: only the
    rows SQLite cannot read are skipped, and their count is reported; without, ValueError names the file.
    """

    def one(path: Path) -> Iterator[dict[str, Any]]:
        try:
            conn = _open_ro(path)
        except ValueError as exc:
            _bad(path, exc, on_bad_file)
            return
        conn.row_factory = sqlite3.Row
        last: tuple[Any, Any] | None = None  # (answered_at, id) of the last row yielded
        try:
            cols = _columns_sql(conn, "decisions", _DECISION_COLUMNS_SQL)
            cur = conn.execute(f"SELECT id, {cols} FROM decisions ORDER BY answered_at, id")
            while rows := cur.fetchmany(batch):
                for row in rows:
                    d = _decode_decision(row)
                    last = (row["answered_at"], row["id"])
                    yield d
        except (sqlite3.DatabaseError, ValueError) as exc:
            if on_bad_file is None:
                _bad(path, exc, on_bad_file)  # raises
            assert on_bad_file is not None
            yield from _salvage_decisions(conn, path, last, exc, on_bad_file)
        finally:
            conn.close()

    last_at: Any = None
    seen: set[str] = set()
    for d in heapq.merge(*(one(p) for p in _as_paths(paths)), key=lambda d: d["answered_at"]):
        rid = d["request_id"]
        if d["answered_at"] != last_at:  # copies of one decision share its answered_at: a bounded set
            last_at = d["answered_at"]
            seen.clear()
        if rid is not None:
            if rid in seen:
                continue
            seen.add(rid)
        yield d


def latest_decisions(
    paths: str | Path | Iterable[str | Path], n: int, *, on_bad_file: OnBadFile | None = None
) -> list[dict[str, Any]]:
    """Return the `n` most recently answered decisions of the given log files, oldest first.

    With `on_bad_file`, a file that cannot be opened is reported and skipped, and a damaged one read
    row by row (its unreadable rows counted and reported); without, ValueError names the file.
    """
    rows: list[dict[str, Any]] = []
    for path in _as_paths(paths):
        try:
            conn = _open_ro(path)
        except ValueError as exc:
            _bad(path, exc, on_bad_file)
            continue
        conn.row_factory = sqlite3.Row
        try:
            cols = _columns_sql(conn, "decisions", _DECISION_COLUMNS_SQL)
            sql = f"SELECT id, {cols} FROM decisions ORDER BY answered_at DESC, id DESC LIMIT ?"
            rows += reversed(
                [_decode_decision(r) for r in conn.execute(sql, (n,))]
            )  # oldest first, so ties keep log order
        except (sqlite3.DatabaseError, ValueError) as exc:
            if on_bad_file is None:
                _bad(path, exc, on_bad_file)  # raises
            assert on_bad_file is not None
            rows += list(_salvage_decisions(conn, path, None, exc, on_bad_file))[-n:]
        finally:
            conn.close()
    rows.sort(key=lambda d: d["answered_at"] if d["answered_at"] is not None else -1)
    return rows[-n:] if n > 0 else []


def _query_each(
    paths: str | Path | Iterable[str | Path],
    sql: str | Callable[[sqlite3.Connection], str],
    on_bad_file: OnBadFile | None,
    salvage: tuple[str, Callable[[sqlite3.Connection], str]] | None = None,
) -> Iterator[sqlite3.Row]:
    """Yield the rows of `sql` (or of ``sql(conn)``) in each file; a file that fails is reported (rows read before kept).

    With `salvage` (table, its columns) and `on_bad_file`, a damaged file's table is then read row by
    row: every readable row is yielded (again: callers keep one per key) and the unreadable ones counted.
    """
    for path in _as_paths(paths):
        try:
            conn = _open_ro(path)
        except ValueError as exc:
            _bad(path, exc, on_bad_file)
            continue
        conn.row_factory = sqlite3.Row
        try:
            yield from conn.execute(sql if isinstance(sql, str) else sql(conn))
        except sqlite3.DatabaseError as exc:
            if salvage is None or on_bad_file is None:
                _bad(path, exc, on_bad_file)
                continue
            table, cols = salvage
            try:
                got, lost, why = _salvage(conn, table, cols(conn), lambda r: r)
            except sqlite3.DatabaseError as exc2:
                _bad(path, exc2, on_bad_file)
                continue
            if not got and not lost:
                _bad(path, exc, on_bad_file)
            _salvaged(path, table.rstrip("s").replace("_schema", " schema"), lost, why or str(exc), on_bad_file)
            yield from got
        finally:
            conn.close()


def _outcome_columns(conn: sqlite3.Connection) -> str:  # a file made earlier lacks the added columns
    return _columns_sql(conn, "outcomes", ", ".join(OUTCOME_COLUMNS))


def read_outcomes(
    paths: str | Path | Iterable[str | Path], *, on_bad_file: OnBadFile | None = None
) -> list[dict[str, Any]]:
    """Return the outcomes of the given log files, one per notification UUID (first received), sorted by ``at``.

    With `on_bad_file`, a damaged file is read row by row (unreadable rows counted and reported).
    """
    seen: dict[str, dict[str, Any]] = {}

    def sql(conn: sqlite3.Connection) -> str:
        return f"SELECT {_outcome_columns(conn)} FROM outcomes"

    for row in _query_each(paths, sql, on_bad_file, salvage=("outcomes", _outcome_columns)):
        d = dict(row)
        prev = seen.get(d["notification_uuid"])
        if prev is None or (d["received_at"] or 0) < (prev["received_at"] or 0):
            seen[d["notification_uuid"]] = d
    return sorted(seen.values(), key=lambda d: (d["at"], d["notification_uuid"]))


def feature_schemas(
    paths: str | Path | Iterable[str | Path], *, on_bad_file: OnBadFile | None = None
) -> dict[str, list[str]]:
    """Return {feature_names_sha: feature names} recorded in the given log files (damaged ones read row by row)."""
    rows = _query_each(
        paths, "SELECT sha, names FROM feature_schemas", on_bad_file, salvage=("feature_schemas", lambda c: "sha, names")
    )
    return {row["sha"]: _unjson(row["names"]) for row in rows}


def decisions_frame(paths: str | Path | Iterable[str | Path]) -> Any:
    """Return the logged decisions of the given files as a pandas DataFrame (export columns, answered_at order)."""
    import pandas as pd

    rows = list(read_decisions(paths))
    return pd.DataFrame(rows, columns=list(REQUIRED_DECISION_COLUMNS + EXTRA_DECISION_COLUMNS))


def _ignore(path: Path, why: str) -> None:
    """An on_bad_file that says nothing: for figures whose file is reported by the read that follows."""


def _count(paths: list[Path], table: str, on_bad_file: OnBadFile | None = None) -> int:
    return sum(int(r[0]) for r in _query_each(paths, f"SELECT count(*) FROM {table}", on_bad_file))


def count_unanswered(paths: str | Path | Iterable[str | Path], *, on_bad_file: OnBadFile | None = None) -> int:
    """Return how many logged requests of the given log files were answered with no message (404).

    With `on_bad_file`, a damaged file is read row by row and its readable rows counted.
    """
    sql = "SELECT message_id FROM decisions WHERE message_id IS NULL"
    return sum(
        1
        for r in _query_each(paths, sql, on_bad_file, salvage=("decisions", lambda c: "message_id"))
        if r["message_id"] is None
    )


def _out_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise ValueError(f"output {str(out)!r} must end in .parquet or .csv")


def _decisions_arrow_schema() -> Any:
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


def export_decisions(
    db_paths: Sequence[str | Path],
    out: str | Path,
    *,
    progress: bool = False,
    chunk: int = 20_000,
    shown_only: bool = False,
    on_bad_file: OnBadFile | None = None,
) -> int:
    """Return the number of decisions written from the log files `db_paths` to `out` (Parquet or CSV by suffix).

    Columns: the DESIGN.md decisions columns, then the server's own (scores, values, probabilities,
    features, policy parameters, catalog hash...). In CSV, list and dict columns are JSON text. The
    Parquet file's metadata holds the feature names of every ``feature_names_sha`` seen.
    `shown_only` leaves out the requests answered with no message (404 no_eligible_message); by
    default they are written with policy ``apple_fallback`` (Apple showed its own message), which
    ``retention evaluate`` reports as its own arm and ``retention train`` leaves out.
    With `on_bad_file`, a log file that cannot be read (corrupt, not a log) is reported and the rest
    exported (with what could be read of it); without, ValueError names it and nothing is written.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    fmt = _out_format(out)
    paths = _as_paths(db_paths)
    if not paths:
        raise ValueError("no decision log files to export (looked for decisions-*.sqlite)")
    total = _count(paths, "decisions", _ignore if on_bad_file else None)
    schema = _decisions_arrow_schema()
    names = [f.name for f in schema]
    schemas = feature_schemas(paths, on_bad_file=on_bad_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="decision", desc="export", file=sys.stderr, disable=True if total < 50_000 else None)
    written = 0
    writer: Any = None
    try:
        if fmt == "parquet":
            meta = {
                b"retention.feature_schemas": _json(schemas),
                b"retention.schema_version": str(SCHEMA_VERSION).encode(),
            }
            writer = pq.ParquetWriter(tmp, schema.with_metadata(meta))
        rows_iter = read_decisions(paths, on_bad_file=on_bad_file)
        first = True
        while True:
            raw = list(itertools.islice(rows_iter, chunk))
            if not raw and not first:
                break
            rows = [d for d in raw if d["message_id"] is not None] if shown_only else raw
            cols: dict[str, list[Any]] = {n: [] for n in names}
            for d in rows:
                d = as_apple_fallback(d)
                for n in names:
                    v = d[n]
                    if n == "policy_params":
                        v = _json(v).decode() if v is not None else None
                    elif n == "features" and v is not None:
                        v = v.tolist()
                    cols[n].append(v)
            if fmt == "parquet":
                writer.write_table(pa.table(cols, schema=schema))
            else:
                frame = pd.DataFrame(cols, columns=names)
                for n in ("candidates", "scores", "values", "probabilities", "features"):
                    frame[n] = [None if v is None else _json(v).decode() for v in frame[n]]
                frame.to_csv(tmp, mode="w" if first else "a", header=first, index=False)
            first = False
            written += len(rows)
            if bar is not None:
                bar.update(len(raw))
            if not raw:
                break
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return written


def export_outcomes(
    db_paths: Sequence[str | Path], out: str | Path, *, on_bad_file: OnBadFile | None = None
) -> int:
    """Return the number of outcomes written from the log files `db_paths` to `out` (Parquet or CSV), one per notification."""
    import pandas as pd

    out = Path(out)
    fmt = _out_format(out)
    rows = read_outcomes(db_paths, on_bad_file=on_bad_file)
    frame = pd.DataFrame(rows, columns=list(OUTCOME_COLUMNS))
    frame["at"] = frame["at"].astype("int64")
    frame["offer_type"] = frame["offer_type"].astype("Int64")  # Apple's raw integer; missing stays missing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
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


def read_decisions_file(path: str | Path) -> Any:
    """Return an exported decisions file (Parquet or CSV) as a DataFrame, list columns decoded from CSV's JSON."""
    import pandas as pd

    path = Path(path)
    if _out_format(path) == "parquet":
        return pd.read_parquet(path)
    frame = pd.read_csv(
        path,
        dtype={"request_id": str, "original_transaction_id": str, "message_id": str, "model_version": str},
        keep_default_na=False,
        na_values=[""],
    )
    for n in ("candidates", "scores", "values", "probabilities", "features"):
        if n in frame.columns:
            frame[n] = [None if not isinstance(v, str) else _unjson(v) for v in frame[n]]
    return frame


# -- compaction ---------------------------------------------------------------------------------
#: The file that ``retention decisions compact`` merges retired log files into (export reads it like any log file).
ARCHIVE_NAME = "decisions-archive.sqlite"


class Compaction(msgspec.Struct, frozen=True):
    """What :func:`compact_logs` did: files merged (and deleted), files left to live writers, rows added."""

    archive: Path
    merged: list[Path]
    live: list[Path]
    decisions: int
    outcomes: int


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def compact_logs(data_dir: str | Path, *, on_bad_file: OnBadFile | None = None) -> Compaction:
    """Merge every log file of `data_dir` that no live writer holds into ``decisions-archive.sqlite``; delete them.

    Idempotent: decisions are unique by ``request_id``, outcomes by ``notificationUUID`` and feature
    schemas by their hash, so a file merged twice (a compaction stopped before its deletes) adds
    nothing. A file is deleted only after its rows are committed (``synchronous=FULL``) in the archive.
    A live writer holds its file with a shared ``flock``, and such a file is left alone. A file that
    cannot be read is reported to `on_bad_file` and left in place (without one, ValueError names it).
    Raises ValueError when another compaction of the folder is running.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"data folder {str(folder)!r} does not exist")
    archive = folder / ARCHIVE_NAME
    conn = _connect_writer(archive)
    lock_fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
    merged: list[tuple[Path, int]] = []
    live: list[Path] = []
    added_decisions = added_outcomes = 0
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another compaction of {str(folder)!r} is running") from None
        for src in log_files(folder):
            if src.name == ARCHIVE_NAME:
                continue
            try:
                fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                _bad(src, exc, on_bad_file)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live.append(src)  # a running server's file
                os.close(fd)
                continue
            try:
                d, o = _merge_into(conn, src)
            except (sqlite3.DatabaseError, ValueError) as exc:
                os.close(fd)
                _bad(src, exc, on_bad_file)
                continue
            added_decisions += d
            added_outcomes += o
            merged.append((src, fd))
        for src, _fd in merged:  # every merged row is committed and fsynced: the sources can go
            for suffix in ("", "-wal", "-shm"):
                Path(f"{src}{suffix}").unlink(missing_ok=True)
        _fsync_dir(folder)
    finally:
        for _src, fd in merged:
            os.close(fd)
        conn.close()
        os.close(lock_fd)
    return Compaction(archive, [p for p, _ in merged], live, added_decisions, added_outcomes)


def _merge_into(conn: sqlite3.Connection, src: Path) -> tuple[int, int]:
    """Copy one log file's rows into the archive connection in one fsynced transaction; return rows added."""
    conn.execute("ATTACH DATABASE ? AS src", (str(src),))
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM src.sqlite_master WHERE type = 'table'")}
        if "decisions" not in tables:
            raise ValueError("not a decision log (no decisions table)")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN")
        try:
            added = []
            for table in ("decisions", "outcomes", "feature_schemas"):
                if table not in tables:
                    added.append(0)
                    continue
                theirs = set(_columns(conn, "src", table))
                cols = ", ".join(f'"{c}"' for c in _columns(conn, "main", table) if c in theirs and c != "id")
                order = " ORDER BY id" if table == "decisions" else ""
                cur = conn.execute(f"INSERT OR IGNORE INTO main.{table} ({cols}) SELECT {cols} FROM src.{table}{order}")
                added.append(max(cur.rowcount, 0))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA synchronous=NORMAL")
    finally:
        conn.execute("DETACH DATABASE src")
    return added[0], added[1]
