"""PostgreSQL for a fleet of replicas: the schema and its migrations, the shared replay store, fleet state, profiles.

With ``RETENTION_DATABASE_URL`` set (a ``postgresql://`` URL), every replica of the endpoint keeps its shared
state in one PostgreSQL database instead of its own SQLite files (docs/deployment-postgresql.md):

* decisions and outcomes (written in batches off the request path by ``serving/pg_log.py``);
* the replay memory (:class:`PostgresReplayMemory`, the :class:`serving.replay.ReplayMemory` interface): one
  ``INSERT ... ON CONFLICT`` per request, bounded by the time budget ``database_budget_ms``;
* fleet state (:class:`FleetSync`): the kill switch, read by every replica once a second, off the request path;
* subscriber profiles: ``retention profiles import FILE --database-url URL`` stores them in the database; each
  replica keeps a local copy (its ``profiles.sqlite``, rebuilt when a new import appears), so a profile read on
  the request path stays one local keyed read and never waits for the network.

The schema is versioned: :data:`MIGRATIONS` are applied in order by ``retention db migrate`` (or at start with
``--database-migrate``), each in one transaction under an advisory lock, and recorded in ``schema_migrations``.
A replica refuses to start on a schema newer than :data:`SCHEMA_VERSION` (written by a newer release) or older
(not migrated yet).

Every function that reaches the database raises :class:`DatabaseError` with one sentence on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from retention import VerbParser

log = logging.getLogger("retention.database")

#: The schema version this release knows (the last of :data:`MIGRATIONS`).
SCHEMA_VERSION: Final = 1
_LOCK_KEY: Final = 0x7265_7465  # pg_advisory_xact_lock key of migrations ("rete")

_V1: Final = """
CREATE TABLE decisions (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE, original_transaction_id TEXT, product_id TEXT, user_locale TEXT,
    environment TEXT, signed_date BIGINT, app_apple_id BIGINT,
    candidates TEXT, scores TEXT, "values" TEXT, probabilities TEXT,
    message_id TEXT, kind TEXT, propensity DOUBLE PRECISION, policy TEXT, policy_params TEXT,
    model_version TEXT, shadow_model_version TEXT, shadow_message_id TEXT, catalog_sha256 TEXT,
    fallback_reason TEXT, features BYTEA, features_rows INTEGER, features_cols INTEGER,
    feature_names_sha TEXT, latency_ms DOUBLE PRECISION, answered_at BIGINT, status INTEGER, profile TEXT
);
CREATE INDEX decisions_answered_at ON decisions (answered_at, id);
CREATE TABLE outcomes (
    notification_uuid TEXT PRIMARY KEY, original_transaction_id TEXT NOT NULL, event TEXT NOT NULL,
    at BIGINT NOT NULL, raw_type TEXT, raw_subtype TEXT, received_at BIGINT,
    offer_type INTEGER, offer_identifier TEXT, offer_discount_type TEXT, transaction_reason TEXT
);
CREATE TABLE feature_schemas (sha TEXT PRIMARY KEY, names TEXT NOT NULL);
CREATE TABLE replay (request_id TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL);
CREATE INDEX replay_expiry ON replay (expires_at);
CREATE TABLE fleet_state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE profiles (original_transaction_id TEXT PRIMARY KEY, profile TEXT NOT NULL);
CREATE TABLE profile_columns (position INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL);
CREATE TABLE profile_imports (
    version BIGSERIAL PRIMARY KEY, source TEXT, rows BIGINT NOT NULL, imported_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""
#: (version, what it does, SQL), applied in order; a release only ever appends to this list.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (1, "decisions, outcomes, feature schemas, replay, fleet state, profiles", _V1),
)


class DatabaseError(Exception):
    """The database cannot be used for what was asked (unreachable, wrong schema...); the message is one sentence."""


def check_url(url: str) -> str:
    """Return `url` when it is a PostgreSQL URL (``postgresql://`` or ``postgres://``), else raise ValueError."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("the database URL must start with postgresql:// (e.g. postgresql://user@host:5432/dbname)")
    return url


def error_line(exc: BaseException) -> str:
    """Return the first line of an error's text (psycopg's can span several), or its type's name when empty."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def safe_url(url: str) -> str:
    """Return `url` without its password, for log lines and error messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(url)
    except Exception:
        return "postgresql://..."
    host, port, db, user = (str(d.get(k, "")) for k in ("host", "port", "dbname", "user"))
    return f"postgresql://{user + '@' if user else ''}{host}{':' + port if port else ''}/{db}"


def connect(url: str, *, timeout_s: float = 5.0, autocommit: bool = True, **kw: Any) -> Any:
    """Return a psycopg connection to `url`; raises DatabaseError (one sentence) when it cannot be opened."""
    import psycopg

    check_url(url)
    try:
        # keepalives and a TCP user timeout: a database host that vanishes mid-statement fails the call in
        # seconds instead of the kernel's minutes of retransmissions
        kw = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
              "tcp_user_timeout": 15_000, **kw}
        return psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=autocommit, **kw)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to the database {safe_url(url)}: {error_line(exc)}") from None


def schema_version(conn: Any) -> int:
    """Return the schema version recorded in the database (0: never migrated)."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])


def migrate(url: str) -> tuple[int, int]:
    """Apply the migrations the database lacks; return (version before, version after).

    Each migration runs in its own transaction under an advisory lock, so replicas started together with
    ``--database-migrate`` apply it once. Raises DatabaseError for a schema newer than this release knows.
    """
    import psycopg

    with connect(url) as conn:
        before = schema_version(conn)
        try:
            for version, what, sql in MIGRATIONS:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                        "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                    )
                    current = schema_version(conn)
                    if current > SCHEMA_VERSION:
                        raise DatabaseError(_too_new(url, current))
                    if current >= version:
                        continue
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)", (version, what)
                    )
                    log.info("database %s: migrated to schema version %d (%s)", safe_url(url), version, what)
            after = schema_version(conn)
        except psycopg.Error as exc:
            raise DatabaseError(f"migrating the database {safe_url(url)} failed: {error_line(exc)}") from None
    if after > SCHEMA_VERSION:
        raise DatabaseError(_too_new(url, after))
    return before, after


def _too_new(url: str, version: int) -> str:
    return (
        f"the database {safe_url(url)} has schema version {version}, newer than this release knows "
        f"({SCHEMA_VERSION}); run a release that knows it"
    )


def require_schema(url: str, *, run_migrations: bool = False) -> int:
    """Return the schema version after checking the database can serve this release (start-up check).

    With `run_migrations`, a missing or older schema is migrated first. Raises DatabaseError (one sentence)
    when the database cannot be reached, is newer than :data:`SCHEMA_VERSION`, or older and not migrated.
    """
    import psycopg

    if run_migrations:
        migrate(url)
    try:
        with connect(url) as conn:
            version = schema_version(conn)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot read the schema version of {safe_url(url)}: {error_line(exc)}") from None
    if version > SCHEMA_VERSION:
        raise DatabaseError(_too_new(url, version))
    if version < SCHEMA_VERSION:
        raise DatabaseError(
            f"the database {safe_url(url)} has schema version {version}, this release needs {SCHEMA_VERSION}: "
            "run `retention db migrate` (or start with --database-migrate)"
        )
    return version


def pool(url: str, *, budget_ms: float, max_size: int = 4, name: str = "retention", extra_options: str = "") -> Any:
    """Return an opened psycopg_pool.ConnectionPool whose statements stop after `budget_ms` on the server.

    The pool connects in the background (a server that is down now does not stop the caller) and replaces
    broken connections; ``pool.connection(timeout=...)`` waits at most that long for one.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool

    check_url(url)
    # the pool logs every failed reconnection (one per request during an outage); our callers log it once a minute
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    options = str(conninfo_to_dict(url).get("options") or "")  # keep the URL's own (a search_path...)
    options = f"{options} -c statement_timeout={max(1, int(budget_ms))} {extra_options}".strip()
    p = ConnectionPool(
        make_conninfo(url),
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "options": options, "connect_timeout": 2},
        open=False,
        name=name,
        reconnect_timeout=0,  # never give up: the database may be restarting
    )
    p.open(wait=False)
    # a first connection before the first request, if the database answers (not p.wait(): it closes the pool
    # when the database is down, and the pool must keep trying)
    with contextlib.suppress(Exception), p.connection(timeout=2.0):
        pass
    return p


# -- the replay store ------------------------------------------------------------------------------------
_REMEMBER: Final = (
    "INSERT INTO replay (request_id, expires_at) VALUES (%s, %s) "
    "ON CONFLICT (request_id) DO UPDATE SET expires_at = excluded.expires_at WHERE replay.expires_at <= %s"
)
_REMEMBER_MANY: Final = (
    "INSERT INTO replay (request_id, expires_at) SELECT * FROM unnest(%s::text[], %s::float8[]) "
    "ON CONFLICT (request_id) DO UPDATE SET expires_at = excluded.expires_at WHERE replay.expires_at <= %s "
    "RETURNING request_id"
)
_SWEEP_EVERY_S: Final = 10.0


class PostgresReplayMemory:
    """:class:`serving.replay.ReplayMemory` in the fleet's database: a replay to any replica is refused.

    One autocommit ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` per request (the primary key makes it
    atomic across replicas: of two remembering one id at once, exactly one gets True). Each call waits at most
    `budget_ms` for a connection and the statement stops after `budget_ms` on the server; past it, or when the
    database is unreachable, :meth:`remember` raises ``TimeoutError`` or ``ConnectionError`` (both ``OSError``),
    which the layered memory counts as a miss and answers on the replica's own memory (``serving/replay.py``).
    Expired ids are deleted by each replica at most every 10 s (an index on the expiry).
    Cost per call: bench/bench_postgres.py.
    """

    def __init__(self, url: str, *, budget_ms: float = 20.0, max_size: int = 4) -> None:
        self.url = url
        self.budget_s = budget_ms / 1000.0
        # synchronous_commit off: a commit does not wait for the WAL flush (several ms on a busy disk); a crash
        # of the database server can forget the last fraction of a second of ids, never a restart or a failover
        # that waits for the flush. The freshness window still refuses anything older.
        self._pool: Any = pool(url, budget_ms=budget_ms, max_size=max_size, name="retention-replay",
                               extra_options="-c synchronous_commit=off")
        self._next_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def remember(self, request_id: str, expires_at: float, now: float) -> bool:
        return self.remember_many([(request_id, expires_at, now)])[0]

    def remember_many(self, items: Sequence[tuple[str, float, float]]) -> list[bool]:
        """:meth:`remember` for each ``(request_id, expires_at, now)``, in order, in one statement (one round trip).

        An id twice in `items` is first only at its first place. Raises TimeoutError or ConnectionError for the
        whole batch (nothing is known about any of its ids then).
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        if not items:
            return []
        p = self._pool
        if p is None:
            raise ConnectionError("the replay store is closed")
        ids: dict[str, float] = {}
        for rid, exp, _ in items:
            ids.setdefault(rid, exp)
        now = max(at for _, _, at in items)
        try:
            with p.connection(timeout=self.budget_s) as conn:
                if now >= self._next_sweep and self._sweep_lock.acquire(blocking=False):
                    try:
                        self._next_sweep = now + _SWEEP_EVERY_S
                        conn.execute("DELETE FROM replay WHERE expires_at <= %s", (now,))
                    finally:
                        self._sweep_lock.release()
                if len(ids) == 1:
                    ((rid, exp),) = ids.items()
                    new = {rid} if conn.execute(_REMEMBER, (rid, exp, now)).rowcount == 1 else set()
                else:
                    rows = conn.execute(_REMEMBER_MANY, (list(ids), list(ids.values()), now)).fetchall()
                    new = {r[0] for r in rows}
        except PoolTimeout:
            raise TimeoutError(f"the database did not answer within {self.budget_s * 1000:.0f} ms") from None
        except psycopg.errors.QueryCanceled:
            raise TimeoutError(f"the database did not answer within {self.budget_s * 1000:.0f} ms") from None
        except psycopg.Error as exc:
            raise ConnectionError(f"the database failed: {error_line(exc)}") from None
        out: list[bool] = []
        for rid, _, _ in items:
            out.append(rid in new)
            new.discard(rid)  # the same id later in the batch is a replay of the first
        return out

    def __len__(self) -> int:
        p = self._pool
        if p is None:
            return 0
        with p.connection(timeout=5.0) as conn:
            return int(conn.execute("SELECT count(*) FROM replay").fetchone()[0])

    def close(self) -> None:
        p, self._pool = self._pool, None
        if p is not None:
            p.close(timeout=2.0)


# -- fleet state: the kill switch, and the profile copy ----------------------------------------------------
KILL_SWITCH: Final = "kill_switch"


def set_kill_switch(url: str, on: bool) -> None:
    """Turn the fleet's kill switch on or off (every replica follows within about a second)."""
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO fleet_state (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()",
            (KILL_SWITCH, "on" if on else "off"),
        )


def kill_switch(url: str) -> bool:
    """Return whether the fleet's kill switch is on."""
    with connect(url) as conn:
        row = conn.execute("SELECT value FROM fleet_state WHERE key = %s", (KILL_SWITCH,)).fetchone()
    return row is not None and row[0] == "on"


class FleetSync:
    """A background thread that reads the fleet's state every `interval_s` (never on the request path).

    ``kill_switch`` is the fleet's kill switch as last read (kept as it was while the database is down).
    When a new profile import appears, the replica's local profile copy (`profiles_path`, the file the
    :class:`serving.profiles.ProfileStore` reads) is rebuilt from the database and swapped in atomically.
    """

    def __init__(
        self, url: str, profiles_path: str | Path, *, interval_s: float = 1.0,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = url
        self.profiles_path = Path(profiles_path)
        self.interval_s = interval_s
        self.kill_switch = False
        self.profiles_version: int | None = None
        self.ok = False
        self.last_error: str | None = None
        self._on_state = on_state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._last_logged = 0.0

    def start(self) -> None:
        """Read the state once (best effort) and start the thread."""
        self.poll()
        self._thread = threading.Thread(target=self._run, name="retention-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Read the kill switch and the latest profile import; rebuild the local profile copy when it changed."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.url, timeout_s=2.0)
            row = self._conn.execute(
                "SELECT (SELECT value FROM fleet_state WHERE key = %s), (SELECT max(version) FROM profile_imports)",
                (KILL_SWITCH,),
            ).fetchone()
            killed = row[0] == "on"
            if killed != self.kill_switch:
                log.warning("fleet kill switch turned %s (database)", "on" if killed else "off")
            self.kill_switch = killed
            version = row[1]
            if version is not None and version != self.profiles_version:
                self._copy_profiles(int(version))
                self.profiles_version = version
            self.ok, self.last_error = True, None
        except (psycopg.Error, DatabaseError, OSError, sqlite3.Error) as exc:
            self.ok, self.last_error = False, error_line(exc)
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            now = time.monotonic()
            if now - self._last_logged >= 60.0:
                self._last_logged = now
                log.error("cannot read the fleet state from the database (%s); keeping the last one", self.last_error)
        if self._on_state is not None:
            self._on_state(self.ok)


    def _copy_profiles(self, version: int) -> None:
        """Rebuild the local profile copy for import `version`, once per host (the workers share the file)."""
        import fcntl

        self.profiles_path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.profiles_path.with_name(self.profiles_path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if local_profiles_version(self.profiles_path) == version:
                return  # another worker of this host copied it
            n = copy_profiles(self._conn, self.profiles_path, version=version)
            log.info("profile import %d copied from the database to %s: %d profiles", version, self.profiles_path, n)
        finally:
            os.close(lock)


def local_profiles_version(path: str | Path) -> int | None:
    """Return the database import version a local profile copy was made from (None: not a copy, or no file)."""
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM profile_meta WHERE key = 'database_version'").fetchone()
        return int(row[0]) if row else None
    except (sqlite3.Error, ValueError):
        return None
    finally:
        conn.close()


# -- profiles ----------------------------------------------------------------------------------------------
def import_profiles(src: str | Path, url: str) -> int:
    """Return the number of profiles imported from `src` (Parquet or CSV) into the database, replacing them.

    The file is checked exactly as for the local store (``serving.profiles.import_profiles``: ValueError, one
    sentence, and the stored profiles are kept). The rows replace the database's in one transaction; every
    replica then copies them within a few seconds (:class:`FleetSync`).
    """
    import psycopg

    from serving import profiles

    with tempfile.TemporaryDirectory(prefix="retention-profiles-") as tmp:
        local = Path(tmp) / profiles.DB_NAME
        n = profiles.import_profiles(src, local)
        if n == 0:  # never replace the fleet's profiles with none
            raise ValueError(f"profile file {str(src)!r} has no rows; the stored profiles were kept")
        lite = sqlite3.connect(local)
        try:
            cols = lite.execute("SELECT position, name, kind FROM profile_columns ORDER BY position").fetchall()
            names = [c[1] for c in cols]
            select = ", ".join(profiles._q(x) for x in [profiles.KEY, *names])
            import msgspec

            enc = msgspec.json.encode
            try:
                with connect(url, autocommit=False) as conn, conn.transaction():
                    conn.execute("LOCK TABLE profiles IN ACCESS EXCLUSIVE MODE")
                    conn.execute("TRUNCATE profiles, profile_columns")
                    conn.cursor().executemany("INSERT INTO profile_columns VALUES (%s, %s, %s)", cols)
                    with conn.cursor().copy("COPY profiles (original_transaction_id, profile) FROM STDIN") as cp:
                        for row in lite.execute(f"SELECT {select} FROM profiles"):
                            cp.write_row((row[0], enc(dict(zip(names, row[1:], strict=True))).decode()))
                    conn.execute("INSERT INTO profile_imports (source, rows) VALUES (%s, %s)", (str(src), n))
            except psycopg.Error as exc:
                raise DatabaseError(f"importing profiles into {safe_url(url)} failed: {error_line(exc)}") from None
        finally:
            lite.close()
    return n


def copy_profiles(conn: Any, dest: str | Path, *, version: int | None = None) -> int:
    """Return the number of profiles copied from the database (connection `conn`) into the local store `dest`.

    The local file is written beside `dest` and moved over it (``os.replace``), so the replica's
    :class:`serving.profiles.ProfileStore` sees the old copy or the new one, whole. Rows are streamed with
    ``COPY``, so memory stays bounded whatever the number of profiles.
    """
    import msgspec

    from serving import profiles

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".profiles-", suffix=".sqlite.tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    dec = msgspec.json.decode
    n = 0
    try:
        cols = conn.execute("SELECT position, name, kind FROM profile_columns ORDER BY position").fetchall()
        names = [str(c[1]) for c in cols]
        lite = sqlite3.connect(tmp)
        try:
            lite.execute("PRAGMA journal_mode=OFF")
            lite.execute("PRAGMA synchronous=OFF")
            cols_sql = ", ".join(f"{profiles._q(c[1])} {'REAL' if c[2] == 'numeric' else 'TEXT'}" for c in cols)
            lite.execute(
                f"CREATE TABLE profiles ({profiles._q(profiles.KEY)} TEXT PRIMARY KEY{', ' if cols else ''}{cols_sql}) "
                "WITHOUT ROWID"
            )
            lite.execute(
                "CREATE TABLE profile_columns (position INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL)"
            )
            lite.executemany("INSERT INTO profile_columns VALUES (?, ?, ?)", cols)
            lite.execute("CREATE TABLE profile_meta (key TEXT PRIMARY KEY, value TEXT)")
            lite.execute("INSERT INTO profile_meta VALUES ('database_version', ?)", (str(version),))
            insert = f"INSERT INTO profiles VALUES ({', '.join('?' * (len(names) + 1))})"
            batch: list[tuple[Any, ...]] = []
            with conn.cursor().copy("COPY profiles (original_transaction_id, profile) TO STDOUT") as cp:
                for key, text in cp.rows():
                    values = dec(text)
                    batch.append((key, *(values.get(c) for c in names)))
                    if len(batch) >= 20_000:
                        lite.executemany(insert, batch)
                        n += len(batch)
                        batch.clear()
            lite.executemany(insert, batch)
            n += len(batch)
            lite.commit()
        finally:
            lite.close()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


# -- the CLI: retention db ----------------------------------------------------------------------------------
def _url_arg(value: str | None) -> str:
    url = value or os.environ.get("RETENTION_DATABASE_URL")
    if not url:
        raise ValueError("no database: pass --database-url or set RETENTION_DATABASE_URL")
    return check_url(url)


def main(argv: Sequence[str]) -> int:
    """Run ``retention db migrate|version|kill-switch``; return the exit status (1 with one line on error)."""
    parser = VerbParser(prog="retention db", description="The fleet's PostgreSQL database.")
    parser.add_argument("--database-url", default=None, help="postgresql:// URL [env RETENTION_DATABASE_URL]")
    # the URL may also follow the action (retention db migrate --database-url URL), as the docs write it
    url_after = VerbParser(add_help=False)
    url_after.add_argument("--database-url", default=argparse.SUPPRESS, help="postgresql:// URL [env RETENTION_DATABASE_URL]")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", parents=[url_after], help=f"create or migrate the schema to version {SCHEMA_VERSION}")
    sub.add_parser("version", parents=[url_after], help="print the database's schema version and this release's")
    ks = sub.add_parser("kill-switch", parents=[url_after], help="turn the whole fleet's kill switch on or off, or show it")
    ks.add_argument("state", choices=["on", "off", "show"])
    args = parser.parse_args(list(argv))
    try:
        url = _url_arg(args.database_url)
        if args.command == "migrate":
            before, after = migrate(url)
            if before == after:
                print(f"database {safe_url(url)} is at schema version {after}: nothing to do")
            else:
                print(f"database {safe_url(url)} migrated from schema version {before} to {after}")
        elif args.command == "version":
            with connect(url) as conn:
                print(f"database schema version {schema_version(conn)}; this release knows {SCHEMA_VERSION}")
        elif args.state == "show":
            print("on" if kill_switch(url) else "off")
        else:
            set_kill_switch(url, args.state == "on")
            print(f"fleet kill switch {args.state}: every replica follows within about a second")
    except (ValueError, DatabaseError) as exc:
        print(f"retention db: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a psycopg error we did not wrap: still one line
        print(f"retention db: {error_line(exc)}", file=sys.stderr)
        return 1
    return 0
