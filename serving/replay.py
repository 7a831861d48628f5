"""The replay memory: a ``requestIdentifier`` is answered once, on any worker of the host, across restarts.

Apple signs each Get Retention Message request with a fresh ``requestIdentifier`` (a UUID), and a signed
request stays acceptable for the freshness window (``max_age_s + max_skew_s`` after it is first seen, see
``serving.verify``). Within that window a second copy must be refused (``replayed_request``); after it, the
copy is refused as ``stale_request`` anyway, so nothing older than the window needs to be remembered.

One small interface, :class:`ReplayMemory` (``remember(id, expires_at, now) -> bool``, and
``remember_many`` for several ids in one transaction or round trip), with three stores:

* :class:`InProcessReplayMemory`: a dict in the worker's memory; fast, but each worker has its own and a
  restart forgets it (``--replay-store memory``).
* :class:`SQLiteReplayMemory`: one SQLite file in the data folder (``replay.sqlite``), WAL mode, shared by
  every worker of the host and kept across restarts: a primary key on the id, and one
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` per request, whose change count says first time
  or replay. Expired ids are deleted at most once a second (an index on the expiry).
* :class:`LayeredReplayMemory`: the in-process memory in front of a shared store (the default). A replay to
  the same worker is refused without touching the file; a new id is written to both (on the event loop,
  :meth:`LayeredReplayMemory.remember_async` writes the ids of one loop turn to the store in one go, on
  the server's worker thread, off the loop). When the shared store
  fails (a full or read-only disk, a lock held too long), the request is answered on the in-process
  memory's word alone: counted (``retention_replay_store_errors``), logged (at most once a minute), and shown
  on ``/ready`` (``replay_store``). This is the documented policy (docs/security.md, "Replay protection and
  certificate chains"): the endpoint stays available, and replays to the same worker are still refused.

The PostgreSQL store of a fleet (issue 19) implements the same :class:`ReplayMemory`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = [
    "REPLAY_FILE",
    "InProcessReplayMemory",
    "LayeredReplayMemory",
    "ReplayMemory",
    "SQLiteReplayMemory",
]

log = logging.getLogger("retention.replay")

#: ``await offload(fn, *args)`` runs ``fn(*args)`` off the event loop and returns its result (the server's
#: ``loop.run_in_executor`` on its one worker thread).
Offload = Callable[..., Awaitable[Any]]

#: The shared store's file name inside the data folder.
REPLAY_FILE: Final = "replay.sqlite"
_SWEEP_EVERY_S: Final = 1.0
_LOG_EVERY_S: Final = 60.0


class ReplayMemory(Protocol):
    """Remembers request identifiers until their expiry and says when one comes a second time."""

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        """Record `request_id` until `expires_at` (epoch seconds); return False when it is already held at `now`.

        An id whose earlier entry expired at or before `now` counts as new (and is held again until
        `expires_at`). Raises on a store failure (``sqlite3.Error``, ``OSError``): the caller decides.
        """
        ...

    def remember_many(self, items: Sequence[tuple[str, float, float]]) -> list[bool]:
        """:meth:`remember` for each ``(request_id, expires_at, now)`` of `items`, in order, in one go (one
        transaction, one round trip); all or nothing on a store failure."""
        ...

    def __len__(self) -> int:
        """Return how many ids are held now (expired ones not yet swept included)."""
        ...

    def close(self) -> None:
        """Release the store (files, connections); remembering after close is an error."""
        ...


class InProcessReplayMemory:
    """:class:`ReplayMemory` in one dict of id -> expiry, private to the process.

    The dict is kept in expiry order by insertion (every caller gives the same window, and a rewritten id
    moves to the end). It holds only strings and floats, so the cyclic GC never tracks it: a few minutes of
    traffic (hundreds of thousands of ids) cost a full collection nothing, where a deque of (expiry, id)
    tuples was walked by every one of them (16-17 ms at 720,000 ids: bench/building_blocks.py). Expired ids
    are swept from the front at most once a second.
    """

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        with self._lock:
            seen = self._seen
            if now >= self._next_sweep:
                self._next_sweep = now + _SWEEP_EVERY_S
                expired = []
                for old, expiry in seen.items():
                    if expiry > now:
                        break  # the rest expire later (a clock stepped back only keeps a few a little longer)
                    expired.append(old)
                for old in expired:
                    del seen[old]
            if seen.get(request_id, 0.0) > now:
                return False
            seen.pop(request_id, None)  # an expired id seen again goes to the end, in expiry order
            seen[request_id] = expires_at
            return True

    def remember_many(self, items: Sequence[tuple[str, float, float]]) -> list[bool]:
        return [self.remember(*item) for item in items]

    def __len__(self) -> int:
        return len(self._seen)

    def close(self) -> None:
        self._seen.clear()


_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS replay (request_id TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS replay_expiry ON replay (expires_at)",
)
# A new id inserts; an expired one is overwritten; a held one is left as it is (no change: a replay).
_REMEMBER: Final = (
    "INSERT INTO replay (request_id, expires_at) VALUES (?, ?) "
    "ON CONFLICT (request_id) DO UPDATE SET expires_at = excluded.expires_at WHERE replay.expires_at <= ?"
)
_SWEEP: Final = "DELETE FROM replay WHERE expires_at <= ?"


class SQLiteReplayMemory:
    """:class:`ReplayMemory` in a SQLite file that every worker of the host opens: shared, and kept on disk.

    Each :meth:`remember` is one autocommit statement (WAL, ``synchronous=NORMAL``: a commit survives the
    process being killed; only a power loss can take the last few). SQLite's write lock makes the insert
    atomic across processes, so of two workers remembering one id at the same moment exactly one gets True.
    A writer waits for the lock at most `busy_timeout_ms`, then the call raises ``sqlite3.OperationalError``
    (opening, which creates the file and its table, waits up to `open_timeout_s`).
    Cost per call: bench/building_blocks.py ("replay memory").
    """

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 100, open_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=open_timeout_s)
        try:
            # workers start together: creating the file and switching it to WAL may wait for another's lock
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise sqlite3.ProgrammingError("the replay store is closed")
            if now >= self._next_sweep:
                self._next_sweep = now + _SWEEP_EVERY_S
                conn.execute(_SWEEP, (now,))
            return conn.execute(_REMEMBER, (request_id, expires_at, now)).rowcount == 1

    def remember_many(self, items: Sequence[tuple[str, float, float]]) -> list[bool]:
        """One transaction for all `items` (the commit is most of a write's cost: bench/building_blocks.py)."""
        if len(items) == 1:
            return [self.remember(*items[0])]
        with self._lock:
            conn = self._conn
            if conn is None:
                raise sqlite3.ProgrammingError("the replay store is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = max(item[2] for item in items)
                if now >= self._next_sweep:
                    self._next_sweep = now + _SWEEP_EVERY_S
                    conn.execute(_SWEEP, (min(item[2] for item in items),))
                first = [conn.execute(_REMEMBER, (rid, exp, at)).rowcount == 1 for rid, exp, at in items]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return first

    def __len__(self) -> int:
        with self._lock:
            if self._conn is None:
                return 0
            return int(self._conn.execute("SELECT count(*) FROM replay").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_UNSYNCED_MAX = 200_000  # ids kept for write-back after a store failure (a 6-minute window at ~550 requests/s)


class LayeredReplayMemory:
    """The in-process memory in front of a shared store (:class:`ReplayMemory`); fails open, counted.

    `open_store` opens the shared store (called once, here; when it raises ``sqlite3.Error`` or
    ``OSError``, the layer runs on the in-process memory alone, as after any store failure). `on_error(exc)`
    is called for each failure (the server counts them in a metric). ``healthy`` is False from a failure
    until the next call the store answers.
    """

    def __init__(
        self, open_store: Callable[[], ReplayMemory], *, on_error: Callable[[BaseException], None] | None = None
    ) -> None:
        self.front = InProcessReplayMemory()
        self.on_error = on_error
        self.errors = 0
        self.healthy = True
        self.last_error: str | None = None
        self._last_logged = -_LOG_EVERY_S
        self._batch: list[tuple[str, float, float, asyncio.Future[bool]]] = []  # writes waiting for this loop turn
        self._writing: set[asyncio.Task[None]] = set()
        # ids answered on the front's word while the store failed: written to the store once it answers
        # again, so another worker or replica refuses them for the rest of their window
        self._unsynced: dict[str, tuple[float, float]] = {}
        self._unsynced_lock = threading.Lock()
        self.store: ReplayMemory | None
        try:
            self.store = open_store()
        except (sqlite3.Error, OSError) as exc:
            self.store = None
            self._failed(exc)

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        if not self.front.remember(request_id, expires_at, now):
            return False  # replayed to this worker: no need to ask the shared store
        return self.remember_shared(request_id, expires_at, now)

    async def remember_async(self, request_id: str, expires_at: float, now: float, offload: Offload) -> bool:
        """:meth:`remember` for the event loop: the front answers now; the store's write goes through `offload`
        (off the loop, on the server's worker thread: SQLite and the PostgreSQL driver release the GIL while they
        wait), together with the writes of every other request that reached this point in the same turn of the
        loop (one transaction for all).
        """
        if not self.front.remember(request_id, expires_at, now):
            return False
        if self.store is None:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch.append((request_id, expires_at, now, fut))
        if len(self._batch) == 1:  # the task starts once the loop's current turn is over
            task = loop.create_task(self._write_batch(offload))
            self._writing.add(task)  # a reference, so the task is not collected mid-write
            task.add_done_callback(self._writing.discard)
        return await fut

    async def _write_batch(self, offload: Offload) -> None:
        batch, self._batch = self._batch, []
        items = [(rid, exp, at) for rid, exp, at, _ in batch]
        try:
            first = await offload(self.remember_shared_many, items)
        except BaseException as exc:  # cancelled at shutdown: every waiting request hears of it
            for *_, fut in batch:
                if not fut.done():
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()
                    else:
                        fut.set_exception(exc)
            return
        for (*_, fut), ok in zip(batch, first, strict=True):
            if not fut.done():
                fut.set_result(ok)

    def remember_shared_many(self, items: Sequence[tuple[str, float, float]]) -> list[bool]:
        """The shared store's half of :meth:`remember` for several ids at once (thread-safe); fails open."""
        store = self.store
        if store is None:
            return [True] * len(items)
        try:
            first = store.remember_many(items)
        except (sqlite3.Error, OSError) as exc:
            for _ in items:
                self._failed(exc)
            self._keep_unsynced(items)
            return [True] * len(items)  # the documented policy: answer on the in-process memory's word
        self.healthy = True
        self._write_back(store, items[0][2] if items else time.time())
        return first

    def remember_many(self, items: Sequence[tuple[str, float, float]]) -> list[bool]:
        return [self.remember(*item) for item in items]

    def remember_shared(self, request_id: str, expires_at: float, now: float) -> bool:
        """The shared store's half of :meth:`remember` (thread-safe: it may run on any thread)."""
        store = self.store
        if store is None:
            return True
        try:
            first = store.remember(request_id, expires_at, now)
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            self._keep_unsynced([(request_id, expires_at, now)])
            return True  # the documented policy: answer on the in-process memory's word
        self.healthy = True
        self._write_back(store, now)
        return first

    def _keep_unsynced(self, items: Sequence[tuple[str, float, float]]) -> None:
        """Remember ids answered without the store, up to ``_UNSYNCED_MAX`` (the oldest go first)."""
        with self._unsynced_lock:
            for rid, exp, at in items:
                self._unsynced[rid] = (exp, at)
            while len(self._unsynced) > _UNSYNCED_MAX:
                self._unsynced.pop(next(iter(self._unsynced)))

    def _write_back(self, store: ReplayMemory, now: float) -> None:
        """Write the ids answered while the store failed, now that it answers (their answers are ignored)."""
        if not self._unsynced:
            return
        with self._unsynced_lock:
            items = [(rid, exp, at) for rid, (exp, at) in self._unsynced.items() if exp > now]
            self._unsynced.clear()
        if not items:
            return
        try:
            for start in range(0, len(items), 1000):
                store.remember_many(items[start : start + 1000])
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            self._keep_unsynced(items)
            return
        log.info("wrote %d replay id(s) answered while the shared replay store failed", len(items))

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.on_error is not None:
            self.on_error(exc)
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY_S:
            self._last_logged = now
            log.error(
                "the shared replay store failed (%s); answering on this worker's own replay memory "
                "(%d failures so far)", self.last_error, self.errors,
            )

    def status(self) -> dict[str, object]:
        """Return the store's state for ``/ready``: ``shared`` and ``ok`` (bools), ``errors`` (count since start)
        and ``last_error`` (str or None)."""
        return {"shared": self.store is not None, "ok": self.store is not None and self.healthy,
                "errors": self.errors, "last_error": self.last_error}

    def __len__(self) -> int:
        return len(self.front)

    def close(self) -> None:
        self.front.close()
        if self.store is not None:
            self.store.close()
