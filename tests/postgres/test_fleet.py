"""Replicas of ``retention serve`` sharing one PostgreSQL (issue 19): one state for the fleet, nothing lost.

Two real servers on two ports, one database (a schema of the test server per test, or a private cluster made
with initdb and pg_ctl for the restart test, so restarting it touches nothing else).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from serving import database
from serving.errors import ERROR_STATUS
from tests.conftest import APP_ID
from tests.integration.test_server import Server, free_port, server_env  # noqa: F401  (server_env: a fixture)
from tests.unit.test_notifications import notification_body

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Return True as soon as `check()` is, False after `timeout` seconds (polls every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return list(conn.execute(sql).fetchall())


class Fleet:
    """N replicas on their own ports and data folders, one database."""

    def __init__(self, env: dict[str, str], root: Path, n: int = 2) -> None:
        self.replicas: list[Server] = []
        for i in range(n):
            data = root / f"replica{i}"
            e = {**env, "RETENTION_PORT": str(free_port()), "RETENTION_DATA_DIR": str(data)}
            self.replicas.append(Server(e, data))
        for r in self.replicas:
            r.wait_ready()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(sig)
        for r in self.replicas:
            r.stop(sig)


@pytest.fixture
def fleet_env(server_env: dict[str, str], pg_url: str) -> dict[str, str]:  # noqa: F811
    database.migrate(pg_url)
    return {**server_env, "RETENTION_DATABASE_URL": pg_url, "RETENTION_BUNDLE_ID": "com.example.app",
            "RETENTION_RELOAD_INTERVAL_S": "0.5", "RETENTION_LOG_BATCH_MS": "20"}


@pytest.fixture
def fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(fleet_env, tmp_path)
    yield f
    f.stop()


def request_body(pki: Any, rid: str | None = None) -> tuple[str, bytes]:
    rid = rid or str(uuid.uuid4())
    return rid, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", request_identifier=rid)


def test_two_replicas_share_replay_outcomes_and_one_export(fleet: Fleet, pki: Any, pg_url: str, tmp_path: Path) -> None:
    a, b = fleet.replicas
    sent: list[str] = []
    with httpx.Client(timeout=10) as http:
        for i in range(30):
            rid, body = request_body(pki)
            r = http.post((a if i % 2 else b).base + "/retention/message", content=body)
            assert r.status_code == 200, r.text
            sent.append(rid)
        # a replay that reaches the other replica is refused there
        rid, body = request_body(pki)
        assert http.post(a.base + "/retention/message", content=body).status_code == 200
        sent.append(rid)
        replay = http.post(b.base + "/retention/message", content=body)
        assert replay.status_code == ERROR_STATUS["replayed_request"] and replay.json()["error"] == "replayed_request"
        # a notification answered by one replica and retried by Apple to the other is stored once
        note = notification_body(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid="2000000777")
        first = http.post(a.base + "/apple/notifications", content=note)
        again = http.post(b.base + "/apple/notifications", content=note)
        assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
        ready = http.get(a.base + "/ready").json()
        assert ready["ready"] is True and ready["database"]["decisions"] == "written"
    assert query(pg_url, "SELECT count(*) FROM outcomes WHERE original_transaction_id = '2000000777'") == [(1,)]
    fleet.stop()
    out = subprocess.run(
        [sys.executable, "-m", "retention", "decisions", "export", "--database-url", pg_url,
         "--out", str(tmp_path / "fleet.parquet"), "--include-unanswered"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    import pandas as pd

    exported = pd.read_parquet(tmp_path / "fleet.parquet")
    assert sorted(exported["request_id"]) == sorted(sent)  # both replicas' decisions, each once


def test_kill_switch_promote_and_catalog_replace_reach_every_replica(
    fleet_env: dict[str, str], tmp_path: Path, trained_registry: Path, pki: Any,
) -> None:
    from models.catalog import DEMO_CATALOG
    from models.registry import Registry
    from training.train import train_demo_model

    registry = tmp_path / "registry"  # the shared registry folder (a network mount in production)
    shutil.copytree(trained_registry, registry)
    first = Registry(registry).current()
    second = train_demo_model(registry, n_decisions=3000, seed=5)
    Registry(registry).promote(first)
    catalog = tmp_path / "catalog.json"
    shutil.copy(DEMO_CATALOG, catalog)
    env = {**fleet_env, "RETENTION_MODEL": str(registry), "RETENTION_CATALOG": str(catalog)}
    fleet = Fleet(env, tmp_path)
    try:
        def ready(r: Server) -> dict[str, Any]:
            return dict(httpx.get(r.base + "/ready", timeout=5).json())

        before = {ready(r)["catalog_sha256"] for r in fleet.replicas}
        assert {ready(r)["model_version"] for r in fleet.replicas} == {first}
        url = fleet_env["RETENTION_DATABASE_URL"]
        assert subprocess.run([sys.executable, "-m", "retention", "db", "--database-url", url, "kill-switch", "on"],
                              timeout=60).returncode == 0
        Registry(registry).promote(second)
        text = catalog.read_text()
        catalog.write_text(text.replace("}", "} ", 1))  # same entries, new bytes: a replaced catalog
        for r in fleet.replicas:
            assert wait_until(lambda r=r: ready(r)["database"]["kill_switch"] is True), "kill switch not seen"
            assert wait_until(lambda r=r: ready(r)["model_version"] == second), "promotion not seen"
            assert wait_until(lambda r=r: ready(r)["catalog_sha256"] not in before), "catalog not seen"
        with httpx.Client(timeout=10) as http:
            for r in fleet.replicas:
                assert http.post(r.base + "/retention/message", content=request_body(pki)[1]).status_code == 200
    finally:
        fleet.stop()
    reasons = query(url, "SELECT fallback_reason FROM decisions")
    assert len(reasons) == 2 and all("kill_switch" in (x or "") for (x,) in reasons)


class Load:
    """Threads sending signed requests to the replicas until stopped; remembers every request answered 200."""

    def __init__(self, pki: Any, bases: list[str], threads: int = 4) -> None:
        self.answered: list[str] = []
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        bodies = [request_body(pki) for _ in range(4000)]
        self._bodies = iter(bodies)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._futures = [self._pool.submit(self._run, bases[i % len(bases)]) for i in range(threads)]

    def _run(self, base: str) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.is_set():
                with self._lock:
                    item = next(self._bodies, None)
                if item is None:
                    return
                rid, body = item
                try:
                    r = http.post(base + "/retention/message", content=body)
                except httpx.HTTPError:
                    continue  # the replica is stopping: the request was not answered
                with self._lock:
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        self.answered.append(rid)

    def stop(self) -> None:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=60)
        self._pool.shutdown()


def test_sigterm_of_both_replicas_under_load_loses_no_answered_decision(fleet: Fleet, pki: Any, pg_url: str) -> None:
    load = Load(pki, [r.base for r in fleet.replicas])
    assert wait_until(lambda: len(load.answered) >= 200, timeout=60)
    for r in fleet.replicas:
        r.proc.send_signal(signal.SIGTERM)  # both at once, requests still arriving
    for r in fleet.replicas:
        r.proc.wait(timeout=60)
    load.stop()
    rows = query(pg_url, "SELECT request_id FROM decisions")
    stored = [x for (x,) in rows]
    assert len(stored) == len(set(stored))
    assert set(load.answered) <= set(stored), f"{len(set(load.answered) - set(stored))} answered decisions lost"


# -- a private cluster that the test may restart ---------------------------------------------------------------
@pytest.fixture
def private_pg() -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """Yield (URL, stop, start) of a PostgreSQL cluster made for this test with initdb, run by pg_ctl as postgres."""
    ci = os.environ.get("CI", "").lower() == "true"
    runuser = shutil.which("runuser")
    if not (PG_BIN / "initdb").exists() or runuser is None or os.geteuid() != 0:
        why = f"a private cluster needs {PG_BIN}/initdb and root (to run it as the postgres user)"
        if ci:
            pytest.fail(why + "; CI=true requires it", pytrace=False)
        pytest.skip(why)
    folder = Path(tempfile.mkdtemp(prefix="retention-pg-"))
    folder.chmod(0o755)
    data = folder / "data"
    shutil.chown(folder, "postgres", "postgres")
    port = free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run([runuser, "-u", "postgres", "--", *args], check=True, timeout=120, capture_output=True)

    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start() -> None:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "start")

    def stop() -> None:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")

    start()
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, start
    finally:
        with_errors = subprocess.run([runuser, "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data),
                                      "-m", "immediate", "stop"], capture_output=True, timeout=60)
        del with_errors
        shutil.rmtree(folder, ignore_errors=True)


def test_a_postgresql_restart_under_load_loses_nothing_and_notifications_wait_for_it(
    server_env: dict[str, str], private_pg: Any, pki: Any, tmp_path: Path,  # noqa: F811
) -> None:
    url, stop_db, start_db = private_pg
    database.migrate(url)
    env = {**server_env, "RETENTION_DATABASE_URL": url, "RETENTION_BUNDLE_ID": "com.example.app",
           "RETENTION_LOG_BATCH_MS": "20"}
    fleet = Fleet(env, tmp_path)
    load = Load(pki, [r.base for r in fleet.replicas])
    try:
        assert wait_until(lambda: len(load.answered) >= 100, timeout=60)
        stop_db()
        during = len(load.answered)
        notes = [notification_body(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid=f"20000009{i:02d}")
                 for i in range(4)]
        with httpx.Client(timeout=15) as http:
            refused = [http.post(fleet.replicas[i % 2].base + "/apple/notifications", content=n)
                       for i, n in enumerate(notes)]
            assert [r.status_code for r in refused] == [503] * 4, [r.text for r in refused]
            assert refused[0].json()["error"] == "outcome_not_stored"
            assert wait_until(lambda: len(load.answered) >= during + 100, timeout=60)  # still answering
            why = http.get(fleet.replicas[0].base + "/ready").json()
            assert why["database"]["decisions"] == "spilled" and why["database"]["spilled_records"] > 0
            metrics = http.get(fleet.replicas[0].base + "/metrics").text
            assert "retention_database_up 0.0" in metrics
            # the replay check did not reach the database: answered on the replica's own memory, counted
            assert re.search(r'retention_database_misses_total\{what="replay"\} [1-9]', metrics), metrics
            start_db()
            for r in fleet.replicas:
                assert wait_until(lambda r=r: http.get(r.base + "/ready").json()["database"]["decisions"] == "written")
            # Apple retries: now stored, and once
            retried = [http.post(fleet.replicas[(i + 1) % 2].base + "/apple/notifications", content=n)
                       for i, n in enumerate(notes)]
            assert [r.status_code for r in retried] == [200] * 4, [r.text for r in retried]
        load.stop()
    finally:
        load.stop() if not load._stop.is_set() else None
        fleet.stop()
    stored = [x for (x,) in query(url, "SELECT request_id FROM decisions")]
    assert len(stored) == len(set(stored))
    assert set(load.answered) <= set(stored), f"{len(set(load.answered) - set(stored))} answered decisions lost"
    assert query(url, "SELECT count(*) FROM outcomes WHERE original_transaction_id LIKE '20000009%'") == [(4,)]


def test_serve_refuses_a_schema_newer_than_it_knows_with_one_line(fleet_env: dict[str, str], pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (%s, 'a newer release')",
                     (database.SCHEMA_VERSION + 1,))
    out = subprocess.run([sys.executable, "-m", "retention", "serve"], env=fleet_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "newer than this release knows" in lines[0] and "Traceback" not in out.stderr
