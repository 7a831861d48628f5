"""The decision log's writer: every answered request and every outcome, written to SQLite off the request path.

The request path only appends a :class:`~serving.log_schema.DecisionRecord` to an in-memory queue (``log``
never blocks, never touches disk, never raises). A thread of the server process wakes every ``batch_ms``
and writes everything queued in one transaction to a SQLite file in WAL mode with ``synchronous=NORMAL``: a
committed batch survives a killed process, so a SIGKILL loses at most the decisions answered within the
last batch window, and ``close()`` (graceful shutdown) writes them all. Rows are built and inserted a
256-row statement at a time, so the thread takes the GIL a few times per batch, not once per row.

Nothing is lost silently (docs/failure-modes.md): every batch is kept until it is committed, and retried
while the file cannot be written (disk full, read-only), with :meth:`DecisionLog.health` (``/ready``) saying
why meanwhile. Decisions are unique by ``request_id`` and outcomes by ``notificationUUID`` (``INSERT OR
IGNORE``), so a batch written twice is stored once. :class:`LogFile` checks the file around every
transaction and starts a fresh one, writing the batch to it, when it was deleted, replaced, overwritten or
found corrupt. A batch holding an outcome is committed with ``synchronous=FULL``. Only what exceeds
``max_queue`` is dropped, counted and logged.

Each server process writes its own file, ``DATA_DIR/decisions-<host>-<pid>.sqlite`` (SQLite has one writer
per file; one file per process needs no locking between workers or replicas), held with a shared ``flock``
while open: :func:`compact_logs` (``retention decisions compact``) merges the files no running writer holds
into one archive. ``serving/log_reader.py`` reads and exports them all; ``serving/log_schema.py`` is the
row layout.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import secrets
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from serving.log_reader import OnBadFile, log_files, report_bad_file
from serving.log_schema import (
    DECISION_COLUMNS_SQL,
    DecisionRecord,
    FeatureSchema,
    OutcomeRecord,
    decision_row,
    encode_json,
    feature_names_sha,
    migrate,
    outcome_record,
)

log = logging.getLogger("retention.decision_log")


def log_file_name(worker_id: str | int | None = None) -> str:
    """Return this process's log file name, ``decisions-<host>-<pid or worker id>.sqlite``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"decisions-{host}-{os.getpid() if worker_id is None else worker_id}.sqlite"


_INSERT_OUTCOME = (
    "INSERT OR IGNORE INTO outcomes (notification_uuid, original_transaction_id, event, at, raw_type, raw_subtype, "
    "received_at, offer_type, offer_identifier, offer_discount_type, transaction_reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SCHEMA = "INSERT OR IGNORE INTO feature_schemas VALUES (?, ?)"


_N_DECISION_COLUMNS = DECISION_COLUMNS_SQL.count(",") + 1
_ROWS_PER_STATEMENT = 256  # 29 parameters a row: well under SQLite's 32,766-variable limit


@functools.lru_cache(maxsize=64)
def _multi_insert_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * _N_DECISION_COLUMNS) + ")"
    # OR IGNORE: a batch written again (to a fresh file after a fault, or a compacted one) adds nothing twice
    return f"INSERT OR IGNORE INTO decisions ({DECISION_COLUMNS_SQL}) VALUES " + ", ".join([one] * rows)


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
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn

# -- the log file: checked around every batch, started afresh when deleted, replaced or corrupt ------------
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: What can happen to a log file under a running writer (the ``reason`` of ``on_fault`` and of the metric).
FILE_FAULTS: tuple[str, ...] = ("deleted", "replaced", "corrupt")
#: Seconds between two attempts to write while the log cannot be written (disk full, read-only).
RETRY_S = 1.0
#: Seconds between two ``PRAGMA quick_check`` runs of the open log file, on a thread of the writer, off the
#: request path: damage below the header (pages an append never reads) is found within this bound.
QUICK_CHECK_S = 60.0
#: Seconds a commit may take before ``/ready`` answers 503 (a hung disk, a stalled file system): the
#: notification path's own wait (serving/notifications.py STORE_TIMEOUT_S).
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
    file: no row that was not yet committed is lost. Rows committed before the fault went with the file.

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


class DecisionLog:
    """Queue of decisions and outcomes written to one SQLite file by a background thread, in batches.

    Nothing is dropped silently: a batch is kept (in memory, counted against `max_queue`) until it is
    committed, written again to a fresh file when its file was deleted, replaced or found corrupt, and
    retried every :data:`RETRY_S` while the file cannot be written; :meth:`health` says why meanwhile
    (``/ready`` answers 503 with it). Only records past `max_queue` are dropped, counted by `on_drop` and
    logged. `on_fault(reason)` counts a file deleted, replaced or corrupt (:data:`FILE_FAULTS`) and
    ``unavailable``. `batch_ms` is the batch window in milliseconds (> 0); raises ValueError otherwise.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_ms: float = 100.0,
        max_queue: int = 100_000,
        on_drop: Callable[[int], None] | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
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
        # rows not yet committed, kept to be written again: counted against max_queue
        self._held_records = 0
        self._unavailable: str | None = None  # why rows cannot be written now (None: they can)
        self._committing_since: float | None = None  # a commit under way since (monotonic)
        self._retry_at = 0.0
        # the file, and the rows that could not be written yet
        self._file: LogFile | None = None
        self._held: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[str, str]]] = ([], [], [])

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
        outcome = outcome_record(
            notification_uuid, original_transaction_id, event, at_ms, raw_type, raw_subtype, offer_type=offer_type,
            offer_identifier=offer_identifier, offer_discount_type=offer_discount_type,
            transaction_reason=transaction_reason,
        )
        if self._closed or len(self._q) + self._held_records >= self.max_queue:
            self._drop(1)
            return
        self._q.append(outcome)

    def register_feature_names(self, names: Sequence[str]) -> str:
        """Return the schema hash of `names` and record the names once in the log (call at model load)."""
        sha = feature_names_sha(names)
        self._q.append(FeatureSchema(sha, list(names)))
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
        waited = self._committing_for()
        if waited > STALL_S:
            return False, (
                f"decisions cannot be written: a commit to the decision log has taken {waited:.0f} s so far "
                f"(a hung or stalled disk?); {self._held_records} rows kept"
            )
        return True, "ok"

    def _committing_for(self) -> float:
        """Seconds the commit under way has taken so far (0 when none is): a hung disk, a stalled file system."""
        since = self._committing_since
        return time.monotonic() - since if since is not None else 0.0

    def stats(self) -> dict[str, int]:
        """Return counts: queued, unconfirmed (kept until written), written (new decisions), outcomes (new ones),
        batches, dropped, write_errors, writer_alive."""
        alive = self._thread is not None and self._thread.is_alive()
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
                elif self._unavailable is not None:
                    self._wake.wait(0.05)  # closing while the file cannot be written: retry without spinning
                    self._wake.clear()
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
            if self._file is not None:
                self._file.close()

    def _give_up(self) -> None:
        """At close, rows that still cannot be written: counted as dropped and logged, never silent."""
        n = self._held_records
        self._held_records = 0
        self._held = ([], [], [])
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
                    decisions.append(decision_row(it, now_ms))
                except Exception:
                    bad += 1
            elif isinstance(it, OutcomeRecord):
                outcomes.append(msgspec.structs.astuple(it))
            elif isinstance(it, FeatureSchema):
                schemas.append((it.sha, encode_json(it.names).decode()))
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
                report_bad_file(src, exc, on_bad_file)
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
                report_bad_file(src, exc, on_bad_file)
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

