"""The decision and outcome log in the fleet's PostgreSQL database, with a local spill file for outages.

:class:`PostgresDecisionLog` has the interface of :class:`serving.log_writer.DecisionLog` (``log``,
``log_outcome``, ``register_feature_names``, ``start``, ``flush``, ``close``, ``health``, ``stats``): the app
calls the same methods, and ``RETENTION_DATABASE_URL`` picks this backend. The request path only appends to an
in-memory queue. A writer thread wakes every ``batch_ms`` and writes everything queued in one transaction:
decisions by ``COPY`` into a temporary table then ``INSERT ... SELECT ... ON CONFLICT (request_id) DO NOTHING``
(or multi-row inserts: ``method``; bench/bench_postgres.py measures both), outcomes ``ON CONFLICT
(notification_uuid) DO NOTHING``. Rows are idempotent, so writing a batch twice stores it once.

When the database does not take a batch (unreachable, restarting, failing), the batch is appended to a spill
file in the data folder (``pg-spill-<host>-<pid>.bin``, fsynced), and every later batch after it, so order is
kept. The writer retries the database every second; when it answers, the spill file is written first, in
order, then the queue. The spill file is bounded by ``spill_max_bytes``: rows beyond it are dropped, counted
(``on_drop``, the dropped metric) and logged. A spill file left by a process that died is found at start by
the next process on the host (its lock is free) and written like its own. A notification's outcome counts
as stored (``flush`` True, answered 200) only once its row is committed in the database: while it is
spilled, the notification is answered 503 and Apple sends it again.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import itertools
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from serving.database import DatabaseError, check_url, connect, error_line, require_schema, safe_url
from serving.log_schema import (
    DECISION_COLUMNS_SQL,
    SCHEMA_VERSION,
    DecisionRecord,
    FeatureSchema,
    OutcomeRecord,
    decision_row,
    decisions_arrow_schema,
    decode_decision,
    decode_json,
    encode_json,
    export_columns,
    export_format,
    feature_names_sha,
    outcome_record,
    prepare_output,
    write_outcomes_file,
)

log = logging.getLogger("retention.pg_log")

#: Ways of writing a batch of decisions: COPY into a temporary table then one INSERT, or multi-row INSERTs.
METHODS: Final = ("copy", "insert")
RETRY_S: Final = 1.0
#: Spilled rows written to the database per writer wake-up at most (the rest on the next ones).
DRAIN_ROWS: Final = 20_000
SPILL_PREFIX: Final = "pg-spill-"
REJECTED_PREFIX: Final = "pg-rejected-"  # rows PostgreSQL refused for their values, set aside for an operator
_LEN = struct.Struct("<I")
_DECISION_COLS: Final = [c.strip() for c in DECISION_COLUMNS_SQL.split(",")]
_OUTCOME_COLS: Final = ", ".join(
    ["notification_uuid", "original_transaction_id", "event", "at", "raw_type", "raw_subtype", "received_at",
     "offer_type", "offer_identifier", "offer_discount_type", "transaction_reason"]
)
_INSERT_OUTCOME: Final = (
    f"INSERT INTO outcomes ({_OUTCOME_COLS}) VALUES ({', '.join(['%s'] * 11)}) "
    "ON CONFLICT (notification_uuid) DO NOTHING"
)
_INSERT_SCHEMA: Final = "INSERT INTO feature_schemas (sha, names) VALUES (%s, %s) ON CONFLICT (sha) DO NOTHING"
_ROWS_PER_INSERT: Final = 500


def spill_file_name() -> str:
    """Return this process's spill file name, ``pg-spill-<host>-<pid>.bin``."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"{SPILL_PREFIX}{host}-{os.getpid()}.bin"


class _Marker:
    """A flush waiter: ``ok`` is True once everything queued before it is committed in the database."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False


_enc = msgspec.msgpack.Encoder().encode
_dec = msgspec.msgpack.Decoder().decode


class SpillFile:
    """An append-only file of length-prefixed msgpack batches ``[decisions, outcomes, schemas]``, locked by its owner."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.rows = 0
        self.offset = 0  # bytes already written to the database (the batches before it)

    @classmethod
    def open_own(cls, path: Path) -> SpillFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: Path) -> SpillFile | None:
        """Return a spill file whose owner is gone (its lock is free), or None while its owner holds it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(path, fd)

    def append(self, batch: list[Any], rows: int) -> None:
        data = _enc(batch)
        os.write(self.fd, _LEN.pack(len(data)) + data)
        os.fsync(self.fd)
        self.size += _LEN.size + len(data)
        self.rows += rows

    def batches(self) -> Iterator[tuple[list[Any], int]]:
        """Yield (batch, offset after it) from :attr:`offset` on, in the order they were appended.

        A torn last batch (a crash while it was written) ends the file: it is skipped, with a log line.
        """
        with open(os.dup(self.fd), "rb", closefd=True) as fh:
            fh.seek(self.offset)
            at = self.offset
            while True:
                head = fh.read(_LEN.size)
                if len(head) < _LEN.size:
                    return
                (n,) = _LEN.unpack(head)
                data = fh.read(n)
                if len(data) < n:
                    log.error("spill file %s ends with a torn batch (a crash while writing it); skipped", self.path)
                    return
                at += _LEN.size + n
                yield _dec(data), at

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.size = 0
        self.rows = 0
        self.offset = 0

    def close(self, *, remove: bool = False) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)


class PostgresDecisionLog:
    """Queue of decisions and outcomes written to PostgreSQL by a background thread, in batches (module doc).

    `url` is the database, `data_dir` the folder of the spill file. `max_queue` bounds what waits in memory,
    `spill_max_bytes` the spill file; past either, records are dropped, counted by `on_drop` and logged.
    `on_fault(reason)` counts ``unavailable`` (the database stopped taking batches); `on_state(up, spilled_rows)`
    is told the database's state after every batch (the server's gauges).
    """

    def __init__(
        self,
        url: str,
        data_dir: str | Path,
        *,
        batch_ms: float = 100.0,
        max_queue: int = 100_000,
        spill_max_bytes: int = 1 << 30,
        method: str = "copy",
        on_drop: Callable[[int], None] | None = None,
        on_fault: Callable[[str], None] | None = None,
        on_state: Callable[[bool, int], None] | None = None,
    ) -> None:
        check_url(url)
        if method not in METHODS:
            raise ValueError(f"the PostgreSQL write method must be one of {', '.join(METHODS)}, not {method!r}")
        if batch_ms <= 0:
            raise ValueError("the decision log batch window must be > 0 ms")
        self.url = url
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / spill_file_name()  # the spill file (the SQLite log's `path` is its file)
        self.batch_s = batch_ms / 1000.0
        self.max_queue = max_queue
        self.spill_max_bytes = spill_max_bytes
        self.method = method
        self._on_drop, self._on_fault, self._on_state = on_drop, on_fault, on_state
        self._q: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._dropped = 0
        self._rejected = 0  # rows PostgreSQL refused for their values, kept in a pg-rejected file (_set_aside)
        self._dropped_reported = 0
        self._last_drop_log = 0.0
        self._written = 0
        self._outcomes_written = 0
        self._batches = 0
        self._write_errors = 0
        self._conn: Any = None
        self._down: str | None = None  # why the database does not take batches now (None: it does)
        self._retry_at = 0.0
        self._spill: SpillFile | None = None
        self._orphans: list[SpillFile] = []
        self._temp_ready = False

    # -- request path ----------------------------------------------------------------------
    def log(self, record: DecisionRecord) -> None:
        """Queue one decision; returns at once, never raises, counts a drop when the queue is full."""
        try:
            if len(self._q) >= self.max_queue or self._closed:
                self._drop(1)
                return
            self._q.append(record)
        except Exception:
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
        """Queue one outcome (idempotent by `notification_uuid`); :meth:`flush` says when it is committed.

        Raises ValueError for an event outside :data:`models.data_files.EVENTS` or a value the log cannot
        store (:func:`models.data_files.unstorable`), as the SQLite log does.
        """
        outcome = outcome_record(
            notification_uuid, original_transaction_id, event, at_ms, raw_type, raw_subtype, offer_type=offer_type,
            offer_identifier=offer_identifier, offer_discount_type=offer_discount_type,
            transaction_reason=transaction_reason,
        )
        if self._closed or len(self._q) >= self.max_queue:
            self._drop(1)
            return
        self._q.append(outcome)

    def register_feature_names(self, names: Sequence[str]) -> str:
        """Return the schema hash of `names` and record the names once in the log (call at model load)."""
        sha = feature_names_sha(names)
        self._q.append(FeatureSchema(sha, list(names)))
        return sha

    def _drop(self, n: int) -> None:
        with self._lock:
            self._dropped += n
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Open the spill file, adopt those of dead processes, and start the writer thread."""
        if self._thread is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._spill = SpillFile.open_own(self.path)
        for p in sorted(self.data_dir.glob(f"{SPILL_PREFIX}*.bin")):
            if p == self.path:
                continue
            orphan = SpillFile.adopt(p)
            if orphan is not None:
                if orphan.size == 0:
                    orphan.close(remove=True)
                    continue
                log.warning("spill file %s of a stopped process found: writing it to the database", p)
                self._orphans.append(orphan)
        self._thread = threading.Thread(target=self._run, name="decision-log-postgres", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def flush(self, timeout: float = 5.0) -> bool:
        """Return True once everything queued before this call is committed in the database.

        False on timeout, when the database did not take it (it is then in the spill file), or with no writer.
        """
        if self._thread is None or not self._thread.is_alive():
            return False
        marker = _Marker()
        self._q.append(marker)
        self._wake.set()
        return marker.event.wait(timeout) and marker.ok

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued (to the database, else the spill file) and stop the writer; idempotent."""
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
        """Return (ready, reason). Ready while decisions reach the database or fit in the spill file."""
        spill = self._spill
        if self._down is None:
            return True, "ok"
        spilled = (spill.rows if spill else 0) + sum(o.rows for o in self._orphans)
        full = spill is not None and spill.size >= self.spill_max_bytes
        reason = (
            f"database unreachable ({self._down}); {spilled} records spilled to {self.path.name}, "
            "written when it returns; notifications answered 503"
        )
        if full:
            return False, reason + f"; the spill file is full ({self.spill_max_bytes} bytes): decisions are dropped"
        return True, reason

    def stats(self) -> dict[str, int]:
        """Return counts: queued, written, outcomes, batches, dropped, rejected, write_errors, writer_alive, spilled, database_up."""
        alive = self._thread is not None and self._thread.is_alive()
        spill = self._spill
        return {
            "queued": len(self._q),
            "written": self._written,
            "outcomes": self._outcomes_written,
            "batches": self._batches,
            "dropped": self._dropped,
            "rejected": self._rejected,
            "write_errors": self._write_errors,
            "writer_alive": int(alive),
            "spilled": (spill.rows if spill else 0) + sum(o.rows for o in self._orphans),
            "database_up": int(self._down is None),
        }

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.is_set()
                if not stopping:
                    self._wake.wait(self.batch_s)
                    self._wake.clear()
                self._step(final=stopping)
                self._report_drops()
                if stopping and not self._q:
                    break
        except Exception:
            log.exception("decision log writer failed")
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            if self._spill is not None:
                spill, self._spill = self._spill, None
                spill.close(remove=spill.size == 0)
            for o in self._orphans:
                o.close()

    def _take(self) -> tuple[list[Any], list[Any], list[Any], list[_Marker], int]:
        q = self._q
        n = len(q)
        items = [q.popleft() for _ in range(n)]
        now_ms = int(time.time() * 1000)
        decisions: list[Any] = []
        outcomes: list[Any] = []
        schemas: list[Any] = []
        markers: list[_Marker] = []
        bad = 0
        for it in items:
            if isinstance(it, DecisionRecord):
                try:
                    decisions.append(list(decision_row(it, now_ms)))
                except Exception:
                    bad += 1
            elif isinstance(it, OutcomeRecord):
                outcomes.append(list(msgspec.structs.astuple(it)))
            elif isinstance(it, FeatureSchema):
                schemas.append([it.sha, encode_json(it.names).decode()])
            elif isinstance(it, _Marker):
                markers.append(it)
        if bad:
            log.error("decision log: %d records could not be encoded and were dropped", bad)
            self._drop(bad)
        return decisions, outcomes, schemas, markers, bad

    def _step(self, *, final: bool = False) -> None:
        decisions, outcomes, schemas, markers, _ = self._take()
        ok = False
        if self._reachable(final):
            ok = self._drain_spills()
            if ok and (decisions or outcomes or schemas):
                ok = self._commit(decisions, outcomes, schemas)
        if not ok and (decisions or outcomes or schemas):
            self._spill_batch(decisions, outcomes, schemas)
        for m in markers:
            m.ok = ok
            m.event.set()
        if self._on_state is not None:
            self._on_state(self._down is None, self.stats()["spilled"])

    def _reachable(self, final: bool) -> bool:
        """Return True when a connection is open (reconnecting at most every RETRY_S while the database is down)."""
        if self._conn is not None and not self._conn.closed:
            return True
        now = time.monotonic()
        if self._down is not None and now < self._retry_at and not final:
            return False
        try:
            self._conn = connect(self.url, timeout_s=2.0, autocommit=False)
            self._temp_ready = False
        except DatabaseError as exc:
            self._went_down(str(exc))
            return False
        return True

    def _went_down(self, why: str) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._down is None:
            self._write_errors += 1
            log.error(
                "decision log: the database %s does not take batches (%s); spilling to %s until it does",
                safe_url(self.url), why, self.path,
            )
            if self._on_fault is not None:
                self._on_fault("unavailable")
        self._down = why

    def _commit(self, decisions: list[Any], outcomes: list[Any], schemas: list[Any]) -> bool:
        """Write one batch in one transaction; return False (and mark the database down) on failure.

        A batch PostgreSQL refuses for its values (a data or integrity error, not a connection one) is
        written row by row instead, and the rows it refuses are set aside (:meth:`_set_aside`): one such
        row must not make every batch behind it wait.
        """
        import psycopg

        try:
            outcomes_in = self._write(decisions, outcomes, schemas)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            return self._commit_rows(decisions, outcomes, schemas, error_line(exc))
        except psycopg.Error as exc:
            self._went_down(error_line(exc))
            return False
        self._committed(len(decisions), outcomes_in)
        return True

    def _write(self, decisions: list[Any], outcomes: list[Any], schemas: list[Any]) -> int:
        """Write rows in one transaction; return the outcomes inserted (a repeat of a stored one is not)."""
        conn = self._conn
        inserted = 0
        temp_ready = self._temp_ready
        try:
            with conn.transaction():
                if decisions:
                    self._insert_decisions(conn, decisions)
                if outcomes:
                    cur = conn.cursor()
                    cur.executemany(_INSERT_OUTCOME, outcomes)
                    inserted = max(cur.rowcount, 0)
                if schemas:
                    conn.cursor().executemany(_INSERT_SCHEMA, schemas)
        except BaseException:
            self._temp_ready = temp_ready  # a temp table created by a transaction that rolled back is gone with it
            raise
        return inserted

    def _committed(self, decisions: int, outcomes: int) -> None:
        self._written += decisions
        self._outcomes_written += outcomes
        self._batches += 1
        if self._down is not None:
            log.warning("decision log: the database %s takes batches again", safe_url(self.url))
            self._down = None

    def _commit_rows(self, decisions: list[Any], outcomes: list[Any], schemas: list[Any], why: str) -> bool:
        """Write a refused batch one row at a time; set aside the rows refused again; False if the database goes."""
        import psycopg

        refused: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        written = [0, 0]
        for kind, rows in enumerate((decisions, outcomes, schemas)):
            for row in rows:
                one: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
                one[kind].append(row)
                try:
                    inserted = self._write(*one)
                except (psycopg.DataError, psycopg.IntegrityError):
                    refused[kind].append(row)
                    continue
                except psycopg.Error as exc:  # the rows written so far are written again later: inserts are idempotent
                    self._went_down(error_line(exc))
                    return False
                if kind == 0:
                    written[0] += 1
                elif kind == 1:
                    written[1] += inserted
        self._committed(*written)
        self._set_aside(refused, why)
        return True

    def _set_aside(self, refused: tuple[list[Any], list[Any], list[Any]], why: str) -> None:
        """Keep rows PostgreSQL refused in ``pg-rejected-<host>-<pid>.bin`` (the spill file's format), counted and logged."""
        n = len(refused[0]) + len(refused[1]) + len(refused[2])
        if not n:
            return
        path = self.data_dir / (REJECTED_PREFIX + spill_file_name()[len(SPILL_PREFIX):])
        try:
            keep = SpillFile.open_own(path)
            try:
                keep.append(list(refused), n)
            finally:
                keep.close()
        except OSError as exc:
            log.error("decision log: cannot write %s (%s); %d refused records dropped", path, exc, n)
            self._drop(n)
            return
        self._rejected += n
        log.error(
            "decision log: the database %s refused %d record(s) (%s); they are kept in %s for an operator "
            "and the log goes on", safe_url(self.url), n, why, path,
        )

    def _insert_decisions(self, conn: Any, rows: list[Any]) -> None:
        cols = ", ".join(_DECISION_COLS)
        if self.method == "copy":
            if not self._temp_ready:
                conn.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS decisions_in ON COMMIT DELETE ROWS AS "
                    f"SELECT {cols} FROM decisions WITH NO DATA"
                )
                self._temp_ready = True
            with conn.cursor().copy(f"COPY decisions_in ({cols}) FROM STDIN") as cp:
                for row in rows:
                    cp.write_row(row)
            conn.execute(
                f"INSERT INTO decisions ({cols}) SELECT {cols} FROM decisions_in ON CONFLICT (request_id) DO NOTHING"
            )
            return
        one = "(" + ", ".join(["%s"] * len(_DECISION_COLS)) + ")"
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            conn.execute(
                f"INSERT INTO decisions ({cols}) VALUES {', '.join([one] * len(chunk))} "
                "ON CONFLICT (request_id) DO NOTHING",
                [v for row in chunk for v in row],
            )

    def _drain_spills(self) -> bool:
        """Write the spill files (adopted ones first, then this process's), in order; True when none is left.

        At most :data:`DRAIN_ROWS` rows a call, so new batches keep flowing (behind them, into the spill file)
        while a long outage's backlog is written: False then, with the database still up.
        """
        budget = DRAIN_ROWS
        for orphan in list(self._orphans):
            finished, budget = self._drain(orphan, budget)
            if not finished:
                return False
            orphan.close(remove=True)
            self._orphans.remove(orphan)
        spill = self._spill
        if spill is not None and spill.size > 0:
            finished, _ = self._drain(spill, budget)
            if not finished:
                return False
            log.warning("decision log: the spill file's records are all written to the database")
            spill.clear()
        return True

    def _drain(self, spill: SpillFile, budget: int) -> tuple[bool, int]:
        """Write `spill`'s batches from its offset on, up to about `budget` rows; return (reached its end, budget left)."""
        try:
            for batch, end in spill.batches():
                if budget <= 0:
                    return False, 0
                if not self._commit(*batch):
                    return False, 0
                spill.offset = end
                rows = len(batch[0]) + len(batch[1])
                spill.rows = max(spill.rows - rows, 0)
                budget -= rows
        except (OSError, msgspec.DecodeError) as exc:
            log.error("spill file %s cannot be read (%s); it is kept for an operator", spill.path, exc)
            return False, 0
        return True, budget

    def _spill_batch(self, decisions: list[Any], outcomes: list[Any], schemas: list[Any]) -> None:
        spill = self._spill
        rows = len(decisions) + len(outcomes)
        if spill is None:
            self._drop(rows)
            return
        if spill.size >= self.spill_max_bytes:
            self._drop(rows)
            return
        try:
            spill.append([decisions, outcomes, schemas], rows)
        except OSError as exc:
            log.error("decision log: cannot write the spill file %s (%s); %d records dropped", spill.path, exc, rows)
            self._drop(rows)

    def _report_drops(self) -> None:
        with self._lock:
            delta = self._dropped - self._dropped_reported
            if delta <= 0:
                return
            self._dropped_reported = self._dropped
        if self._on_drop is not None:
            try:
                self._on_drop(delta)
            except Exception:
                log.exception("decision log: the drop callback failed")
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0 or self._last_drop_log == 0.0:
            self._last_drop_log = now
            log.warning(
                "decision log: %d records dropped so far (queue full at %d, spill file full at %d bytes, or log closed)",
                self._dropped, self.max_queue, self.spill_max_bytes,
            )


# -- reading and export ------------------------------------------------------------------------------------
def read_decisions(url: str, *, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Yield every decision in the database as :func:`serving.log_reader.read_decisions` does, answered_at order.

    A server-side cursor fetches `batch` rows at a time, so memory stays bounded whatever the table's size.
    """
    from psycopg.rows import dict_row

    cols = ", ".join(_DECISION_COLS)
    with connect(url, autocommit=False) as conn, conn.transaction():
        cur = conn.cursor(name="retention_export", row_factory=dict_row)
        cur.itersize = batch
        cur.execute(f"SELECT id, {cols} FROM decisions ORDER BY answered_at, id")
        for row in cur:
            yield decode_decision(row)


def latest_decisions(url: str, n: int) -> list[dict[str, Any]]:
    """Return the `n` most recently answered decisions in the database, oldest first (as the SQLite reader does)."""
    from psycopg.rows import dict_row

    require_schema(url)
    cols = ", ".join(_DECISION_COLS)
    with connect(url) as conn:
        cur = conn.cursor(row_factory=dict_row)
        rows = cur.execute(f"SELECT id, {cols} FROM decisions WHERE answered_at IS NOT NULL "
                           "ORDER BY answered_at DESC, id DESC LIMIT %s", (n,))
        return [decode_decision(r) for r in reversed(list(rows))]


def feature_schemas(url: str) -> dict[str, list[str]]:
    """Return {feature_names_sha: feature names} recorded in the database."""
    with connect(url) as conn:
        return {sha: decode_json(names) for sha, names in conn.execute("SELECT sha, names FROM feature_schemas")}


def read_outcomes(url: str) -> list[dict[str, Any]]:
    """Return the outcomes in the database (one per notification UUID), sorted by ``at``."""
    from psycopg.rows import dict_row

    with connect(url) as conn:
        cur = conn.cursor(row_factory=dict_row)
        cur.execute(f"SELECT {_OUTCOME_COLS} FROM outcomes ORDER BY at, notification_uuid")
        return list(cur.fetchall())


def export_decisions(url: str, out: str | Path, *, chunk: int = 20_000, shown_only: bool = False,
                     progress: bool = False) -> int:
    """Return the number of decisions written from the database at `url` to `out` (Parquet or CSV by suffix).

    Same columns and metadata as :func:`serving.log_reader.export_decisions`; rows are streamed through a
    server-side cursor and written `chunk` at a time, so memory is bounded by `chunk`, not the table.
    Raises DatabaseError (one sentence) when the database cannot be read, ValueError for a bad output name.
    """
    import pandas as pd
    import psycopg
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    fmt = export_format(out)
    require_schema(url)  # a schema this release does not know is not read as if it did
    schema = decisions_arrow_schema()
    names = [f.name for f in schema]
    tmp = prepare_output(out)
    written = 0
    writer: Any = None
    try:
        schemas = feature_schemas(url)
        if fmt == "parquet":
            meta = {
                b"retention.feature_schemas": encode_json(schemas),
                b"retention.schema_version": str(SCHEMA_VERSION).encode(),
            }
            writer = pq.ParquetWriter(tmp, schema.with_metadata(meta))
        rows_iter = read_decisions(url, batch=min(chunk, 5000))
        first = True
        while True:
            raw = list(itertools.islice(rows_iter, chunk))
            rows = [d for d in raw if d["message_id"] is not None] if shown_only else raw
            cols = export_columns(rows, names)
            if fmt == "parquet":
                if rows or first:
                    writer.write_table(pa.table(cols, schema=schema))
            elif rows or first:
                frame = pd.DataFrame(cols, columns=names)
                for n in ("candidates", "scores", "values", "probabilities", "features"):
                    frame[n] = [None if v is None else encode_json(v).decode() for v in frame[n]]
                frame.to_csv(tmp, mode="w" if first else "a", header=first, index=False)
            first = False
            written += len(rows)
            if progress and raw:
                print(f"export: {written} decisions", file=sys.stderr, end="\r")
            if not raw:
                break
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, out)
    except psycopg.Error as exc:
        raise DatabaseError(f"reading decisions from {safe_url(url)} failed: {error_line(exc)}") from None
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return written


def export_outcomes(url: str, out: str | Path) -> int:
    """Return the number of outcomes written from the database to `out` (Parquet or CSV), one per notification."""
    prepare_output(Path(out))  # a bad name or an unwritable place is refused before the database is read
    return write_outcomes_file(read_outcomes(url), out)
