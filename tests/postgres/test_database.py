"""The PostgreSQL backend against a real server: schema versions, the log and its spill file, replay, fleet state,
profiles, export (issue 19). Each test gets its own schema (tests/conftest.py ``pg_url``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest

from serving import database, log_reader, pg_log
from serving.log_schema import DecisionRecord
from serving.profiles import ProfileStore


def record(i: int, **kw: Any) -> DecisionRecord:
    base: dict[str, Any] = {
        "request_id": f"req-{i}", "original_transaction_id": f"otx-{i % 7}", "product_id": "pro.monthly",
        "user_locale": "en_US", "environment": "Sandbox", "signed_date": 1_700_000_000_000 + i,
        "candidates": ["a", "b"], "scores": [0.5, 0.25], "probabilities": [0.9, 0.1], "message_id": "a",
        "propensity": 0.9, "features": [[1.0, 2.0], [3.0, 4.0]], "answered_at": 1_700_000_000_000 + i,
    }
    base.update(kw)
    return DecisionRecord(**base)


def dead_url() -> str:
    """Return a URL of a port where nothing listens (connections refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/test"


def flushed(log: Any, tries: int = 100) -> bool:
    """Return True once a flush reports everything committed (the writer retries the database every second)."""
    for _ in range(tries):
        if log.flush():
            return True
        time.sleep(0.1)
    return False


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())


def retention(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "retention", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def migrated(pg_url: str) -> str:
    database.migrate(pg_url)
    return pg_url


# -- schema versions -----------------------------------------------------------------------------------------
def test_db_migrate_creates_the_schema_once_and_records_its_version(pg_url: str) -> None:
    first = retention("db", "--database-url", pg_url, "migrate")
    assert first.returncode == 0, first.stderr
    assert f"from schema version 0 to {database.SCHEMA_VERSION}" in first.stdout
    again = retention("db", "migrate", "--database-url", pg_url)  # the URL after the action, as the docs write it
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    assert query(pg_url, "SELECT version FROM schema_migrations") == [(database.SCHEMA_VERSION,)]


def test_a_replica_refuses_a_schema_newer_than_it_knows_and_an_unmigrated_one(
    pg_url: str, make_settings: Any, tmp_path: Path
) -> None:
    from serving.server import preflight
    from serving.settings import SettingsError

    with pytest.raises(SettingsError, match="run `retention db migrate`"):
        preflight(make_settings(database_url=pg_url))
    preflight(make_settings(database_url=pg_url, database_migrate=True))  # migrates at start when asked
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (%s, 'from the future')",
                     (database.SCHEMA_VERSION + 1,))
    with pytest.raises(SettingsError, match="newer than this release knows"):
        preflight(make_settings(database_url=pg_url, database_migrate=True))
    out = retention("db", "--database-url", pg_url, "migrate")
    assert out.returncode == 1 and "newer than this release knows" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # the export does not read a schema it does not know as if it did
    export = retention("decisions", "export", "--database-url", pg_url, "--out", str(tmp_path / "d.parquet"))
    assert export.returncode != 0 and "newer than this release knows" in export.stderr, export
    assert not (tmp_path / "d.parquet").exists()


def test_db_cli_without_a_database_or_with_a_bad_url_is_one_line() -> None:
    for args in (["db", "migrate"], ["db", "--database-url", "mysql://x/y", "migrate"],
                 ["db", "--database-url", dead_url(), "migrate"]):
        out = retention(*args, env={"RETENTION_DATABASE_URL": ""})
        assert out.returncode == 1, out
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


# -- the log ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", pg_log.METHODS)
def test_decisions_and_outcomes_are_committed_once_even_when_sent_twice(
    migrated: str, tmp_path: Path, method: str
) -> None:
    log = pg_log.PostgresDecisionLog(migrated, tmp_path, batch_ms=10, method=method)
    log.start()
    try:
        log.register_feature_names(["f1", "f2"])
        for i in range(50):
            log.log(record(i))
        log.log_outcome("n-1", "otx-1", "renewed", 1_700_000_100_000, "DID_RENEW", None, offer_type=2)
        assert log.flush()
        for i in range(50):  # a re-sent batch (a replica retried, a spill file written twice)
            log.log(record(i))
        log.log_outcome("n-1", "otx-1", "renewed", 1_700_000_100_000, "DID_RENEW", None)
        assert log.flush()
    finally:
        log.close()
    assert query(migrated, "SELECT count(*), count(DISTINCT request_id) FROM decisions") == [(50, 50)]
    assert query(migrated, "SELECT notification_uuid, offer_type FROM outcomes") == [("n-1", 2)]
    rows = list(pg_log.read_decisions(migrated))
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in range(50)]
    assert rows[3]["features"].tolist() == [[1.0, 2.0], [3.0, 4.0]] and rows[3]["scores"] == [0.5, 0.25]
    assert pg_log.feature_schemas(migrated) != {}


def test_an_outcome_postgresql_cannot_store_is_refused_at_the_door_and_the_log_goes_on(
    migrated: str, tmp_path: Path
) -> None:
    log = pg_log.PostgresDecisionLog(migrated, tmp_path, batch_ms=10)
    log.start()
    try:
        with pytest.raises(ValueError, match="NUL"):  # one such row would make every batch behind it fail
            log.log_outcome("n-1", "otx\x001", "renewed", 1_700_000_100_000, "DID_RENEW", None)
        with pytest.raises(ValueError, match="64-bit"):
            log.log_outcome("n-2", "otx-2", "renewed", 1_700_000_100_000, "DID_RENEW", None, offer_type=2**63)
        log.log_outcome("n-3", "otx-3", "renewed", 1_700_000_100_000, "DID_RENEW", None)
        assert log.flush()
    finally:
        log.close()
    assert query(migrated, "SELECT notification_uuid FROM outcomes") == [("n-3",)]


def test_an_unreachable_database_spills_in_order_and_writes_it_all_once_when_it_returns(
    migrated: str, tmp_path: Path
) -> None:
    states: list[tuple[bool, int]] = []
    log = pg_log.PostgresDecisionLog(dead_url(), tmp_path, batch_ms=10, on_state=lambda up, n: states.append((up, n)))
    log.start()
    try:
        for i in range(30):
            log.log(record(i))
        log.log_outcome("n-9", "otx-2", "expired", 1_700_000_200_000)
        assert log.flush() is False  # not committed: a notification is answered 503, and Apple retries
        ready, why = log.health()
        assert ready and "31 records spilled" in why and "answered 503" in why
        assert log.path.stat().st_size > 0 and states[-1] == (False, 31)
        log.url = migrated  # the database is back
        for i in range(30, 40):
            log.log(record(i))
        assert flushed(log)  # after the next retry (once a second)
        assert log.health() == (True, "ok")
    finally:
        log.close()
    assert [r["request_id"] for r in pg_log.read_decisions(migrated)] == [f"req-{i}" for i in range(40)]
    assert query(migrated, "SELECT notification_uuid FROM outcomes") == [("n-9",)]
    assert not log.path.exists()  # an empty spill file is removed at close


def _orphan_spill(tmp_path: Path, name: str, fill: Callable[[pg_log.PostgresDecisionLog], None]) -> Path:
    """Return the spill file `name` left by a process that never reached the database; `fill(log)` logs its rows."""
    log = pg_log.PostgresDecisionLog(dead_url(), tmp_path, batch_ms=10)
    log.start()
    fill(log)
    log.close()  # the database never came back: the rows stay in the spill file
    orphan = tmp_path / name
    log.path.rename(orphan)
    return orphan


def _next_process(migrated: str, tmp_path: Path, i: int) -> dict[str, int]:
    """Start a log on the database in `tmp_path`, log record(i), flush it and return its stats."""
    after = pg_log.PostgresDecisionLog(migrated, tmp_path, batch_ms=10)
    after.start()
    try:
        after.log(record(i))
        assert after.flush()
        return after.stats()
    finally:
        after.close()


def test_a_spill_file_left_by_a_dead_process_is_written_by_the_next_one(migrated: str, tmp_path: Path) -> None:
    def fill(log: pg_log.PostgresDecisionLog) -> None:
        for i in range(20):
            log.log(record(i))

    orphan = _orphan_spill(tmp_path, "pg-spill-otherhost-4242.bin", fill)
    _next_process(migrated, tmp_path, 100)
    assert [r["request_id"] for r in pg_log.read_decisions(migrated)] == [f"req-{i}" for i in [*range(20), 100]]
    assert not orphan.exists()


def test_a_row_postgresql_refuses_is_set_aside_and_the_rows_around_it_are_written(
    migrated: str, tmp_path: Path
) -> None:
    # a spill file of an older release may hold a row PostgreSQL cannot store (a NUL in a text field);
    # it must not make every batch behind it wait, nor be lost
    from serving.log_schema import OutcomeRecord

    def fill(log: pg_log.PostgresDecisionLog) -> None:
        log.log(record(1))
        log._q.append(OutcomeRecord("n-bad", "otx\x001", "renewed", 1_700_000_100_000, "DID_RENEW", None, 0))
        log._q.append(OutcomeRecord("n-good", "otx-2", "renewed", 1_700_000_100_000, "DID_RENEW", None, 0))
        log.log(record(2))

    orphan = _orphan_spill(tmp_path, "pg-spill-otherhost-4343.bin", fill)
    stats = _next_process(migrated, tmp_path, 3)
    assert [r["request_id"] for r in pg_log.read_decisions(migrated)] == ["req-1", "req-2", "req-3"]
    assert query(migrated, "SELECT notification_uuid FROM outcomes") == [("n-good",)]
    assert stats["rejected"] == 1 and stats["database_up"] == 1 and stats["dropped"] == 0
    [kept] = tmp_path.glob("pg-rejected-*.bin")
    assert b"n-bad" in kept.read_bytes() and not orphan.exists()


def test_beyond_the_spill_bound_records_are_dropped_counted_and_ready_says_so(tmp_path: Path) -> None:
    dropped: list[int] = []
    log = pg_log.PostgresDecisionLog(dead_url(), tmp_path, batch_ms=10, spill_max_bytes=1, on_drop=dropped.append)
    log.start()
    try:
        log.log(record(1))
        log.flush()
        for i in range(2, 12):
            log.log(record(i))
        log.flush()
        ready, why = log.health()
    finally:
        log.close()
    assert sum(dropped) == 10 and log.stats()["dropped"] == 10
    assert not ready and "spill file is full" in why


# -- replay ------------------------------------------------------------------------------------------------------
def test_replay_is_refused_by_another_replica_and_forgotten_after_its_expiry(migrated: str) -> None:
    a = database.PostgresReplayMemory(migrated, budget_ms=1000)
    b = database.PostgresReplayMemory(migrated, budget_ms=1000)
    try:
        now = time.time()
        assert a.remember("r-1", now + 60, now) is True
        assert b.remember("r-1", now + 60, now) is False  # the other replica: refused
        assert a.remember("r-1", now + 60, now) is False
        assert b.remember("r-1", now + 200, now + 61) is True  # expired: a new request again
        assert len(a) == 1
    finally:
        a.close()
        b.close()


def test_remember_many_is_one_statement_with_the_answer_of_each_id(migrated: str) -> None:
    a = database.PostgresReplayMemory(migrated, budget_ms=1000)
    b = database.PostgresReplayMemory(migrated, budget_ms=1000)
    try:
        now = time.time()
        assert a.remember_many([("x", now + 60, now), ("y", now + 60, now), ("x", now + 60, now)]) == [True, True, False]
        assert b.remember_many([("y", now + 60, now), ("z", now + 60, now)]) == [False, True]
        assert b.remember_many([]) == []
    finally:
        a.close()
        b.close()


def test_a_replica_answers_on_its_own_memory_while_the_database_does_not_answer() -> None:
    from serving.replay import LayeredReplayMemory

    misses: list[BaseException] = []
    mem = LayeredReplayMemory(lambda: database.PostgresReplayMemory(dead_url(), budget_ms=20), on_error=misses.append)
    try:
        now = time.time()
        assert mem.remember("r-2", now + 60, now) is True  # answered, the miss counted
        assert mem.remember("r-2", now + 60, now) is False  # the replica's own memory still refuses a replay
        assert len(misses) == 1 and isinstance(misses[0], TimeoutError)
        assert mem.status()["ok"] is False
    finally:
        mem.close()


def test_an_unreachable_replay_store_fails_as_an_os_error_and_recovers(migrated: str) -> None:
    mem = database.PostgresReplayMemory(dead_url(), budget_ms=20)
    try:
        now = time.time()
        with pytest.raises(OSError, match="did not answer within 20 ms"):  # the layered memory's "store failed"
            mem.remember("r-2", now + 60, now)
    finally:
        mem.close()
    slow = database.PostgresReplayMemory(migrated, budget_ms=20)
    try:
        with psycopg.connect(migrated, autocommit=True) as locker:  # a row lock held past the budget
            locker.execute("BEGIN")
            locker.execute("INSERT INTO replay VALUES ('r-3', %s)", (time.time() + 60,))
            with pytest.raises(TimeoutError):
                slow.remember("r-3", time.time() + 60, time.time())
            locker.execute("ROLLBACK")
        assert slow.remember("r-3", time.time() + 60, time.time()) is True
    finally:
        slow.close()


# -- fleet state and profiles -------------------------------------------------------------------------------------
def test_kill_switch_and_profile_import_reach_a_replica(migrated: str, tmp_path: Path) -> None:
    src = tmp_path / "profiles.csv"
    src.write_text("original_transaction_id,tenure_days,country\n1000,30,FR\n1001,400,US\n")
    out = retention("profiles", "import", str(src), "--database-url", migrated)
    assert out.returncode == 0, out.stderr
    assert "imported 2 profiles" in out.stdout
    local = tmp_path / "replica" / "profiles.sqlite"
    fleet = database.FleetSync(migrated, local)
    fleet.poll()
    store = ProfileStore(local)
    assert store.get("1001") == {"tenure_days": 400.0, "country": "US"}
    assert store.get("9999") is None
    assert fleet.kill_switch is False
    out = retention("db", "--database-url", migrated, "kill-switch", "on")
    assert out.returncode == 0, out.stderr
    fleet.poll()
    assert fleet.kill_switch is True
    # an empty file is refused with one line and the stored profiles are kept
    (tmp_path / "empty.csv").write_text("original_transaction_id,tenure_days\n")
    bad = retention("profiles", "import", str(tmp_path / "empty.csv"), "--database-url", migrated)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert query(migrated, "SELECT count(*) FROM profiles") == [(2,)]


# -- export and training --------------------------------------------------------------------------------------------
def test_decisions_export_from_the_database_and_training_inputs(migrated: str, tmp_path: Path) -> None:
    from training.data_io import read_decisions

    log = pg_log.PostgresDecisionLog(migrated, tmp_path, batch_ms=10)
    log.start()
    try:
        for i in range(25):
            log.log(record(i))
        log.log(record(25, message_id=None, candidates=[], status=404))
        log.log_outcome("n-1", "otx-1", "renewed", 1_700_000_100_000)
        assert log.flush()
    finally:
        log.close()
    out = retention("decisions", "export", "--database-url", migrated, "--out", str(tmp_path / "d.parquet"),
                    "--outcomes-out", str(tmp_path / "o.parquet"))
    assert out.returncode == 0, out.stderr
    # the 404 is kept, as Apple's own arm (policy apple_fallback), and the training readers accept it
    assert "exported 26 decisions" in out.stdout and "exported 1 outcomes" in out.stdout
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.num_rows == 26 and b"retention.feature_schemas" in table.schema.metadata
    assert table.column("policy").to_pylist()[-1] == "apple_fallback"
    read_decisions(tmp_path / "d.parquet")
    with log_reader.training_inputs(log_reader.source(migrated), log_reader.source(migrated)) as (d, o):
        assert pq.read_table(d).num_rows == 26 and pq.read_table(o).num_rows == 1
    bad = retention("decisions", "export", "--database-url", dead_url(), "--out", str(tmp_path / "x.parquet"))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    # the fleet's latest decisions, as `decisions show` prints a data folder's: here from the database
    shown = retention("decisions", "show", "--last", "2", env={"RETENTION_DATABASE_URL": migrated})
    assert shown.returncode == 0, shown.stderr
    heads = [line.split()[0] for line in shown.stdout.splitlines() if not line.startswith(" ")]
    assert heads == ["req-24", "req-25"] and "P(stay)=0.500" in shown.stdout
    bad = retention("decisions", "show", "--database-url", dead_url())
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    both = retention("decisions", "show", "--database-url", migrated, "--data-dir", str(tmp_path))
    assert both.returncode == 2 and "not both" in both.stderr


def test_export_memory_is_bounded_by_its_chunk_not_by_the_table(migrated: str, tmp_path: Path) -> None:
    import tracemalloc

    import numpy as np

    n = 12_000
    features = np.ones((8, 40), dtype=np.float32)  # 1,280 bytes a decision: 15 MB of features in the table
    log = pg_log.PostgresDecisionLog(migrated, tmp_path, batch_ms=50)
    log.start()
    try:
        for i in range(n):
            log.log(record(i, features=features, candidates=[f"m{j}" for j in range(8)]))
        assert flushed(log)
    finally:
        log.close()
    pg_log.export_decisions(migrated, tmp_path / "warm-up.parquet", chunk=500)  # imports pandas, pyarrow once

    def peak_of(work: Any) -> int:
        tracemalloc.start()
        try:
            work()
            return int(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()

    whole = peak_of(lambda: list(pg_log.read_decisions(migrated)))  # the whole table in memory at once
    export = peak_of(lambda: pg_log.export_decisions(migrated, tmp_path / "all.parquet", chunk=500))
    assert pq.read_table(tmp_path / "all.parquet").num_rows == n
    assert export < whole / 3, f"export held {export / 1e6:.1f} MB at its peak; the whole table is {whole / 1e6:.1f} MB"


def test_a_long_backlog_is_written_a_slice_at_a_time_in_order_with_new_records_behind_it(
    migrated: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_log, "DRAIN_ROWS", 5)
    log = pg_log.PostgresDecisionLog(dead_url(), tmp_path, batch_ms=10)
    log.start()
    try:
        for i in range(40):
            log.log(record(i))
            if i % 4 == 3:
                log.flush()  # ten spilled batches of four
        log.url = migrated
        for i in range(40, 45):
            log.log(record(i))  # arrive while the backlog is being written
        assert flushed(log)
    finally:
        log.close()
    assert [r["request_id"] for r in pg_log.read_decisions(migrated)] == [f"req-{i}" for i in range(45)]


def test_train_reads_the_fleets_database_directly(migrated: str, tmp_path: Path) -> None:
    import pandas as pd

    from models.catalog import DEMO_CATALOG

    sim = retention("simulate", "--n", "3000", "--seed", "2", "--out", str(tmp_path / "world"))
    assert sim.returncode == 0, sim.stderr
    decisions = pd.read_parquet(tmp_path / "world" / "decisions.parquet")
    outcomes = pd.read_parquet(tmp_path / "world" / "outcomes.parquet")
    log = pg_log.PostgresDecisionLog(migrated, tmp_path, batch_ms=20)
    log.start()
    try:
        for d in decisions.itertuples(index=False):
            log.log(DecisionRecord(
                request_id=d.request_id, original_transaction_id=d.original_transaction_id, product_id=d.product_id,
                user_locale=d.user_locale, environment=d.environment, signed_date=int(d.signed_date),
                candidates=list(d.candidates), message_id=d.message_id, propensity=float(d.propensity),
                model_version=d.model_version, policy=d.policy, answered_at=int(d.signed_date),
            ))
        for i, o in enumerate(outcomes.itertuples(index=False)):
            log.log_outcome(f"sim-{i}", o.original_transaction_id, o.event, int(o.at))
        assert flushed(log)
    finally:
        log.close()
    out = retention("train", "--decisions", migrated, "--outcomes", migrated, "--profiles",
                    str(tmp_path / "world" / "profiles.parquet"), "--catalog", str(DEMO_CATALOG),
                    "--registry", str(tmp_path / "registry"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "registry" / "current").is_file()
