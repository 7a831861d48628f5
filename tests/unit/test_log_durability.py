"""Nothing acknowledged is lost, nothing is lost silently: the decision log under a careless operator.

Each test does to a serving endpoint (or to its log) what an operator or the machine might: delete the
log files, overwrite them in place, corrupt them, hang or fail a commit, fill the disk, make the
folder read-only. Every answered decision and every outcome answered 200 must be in a log file that
export reads, and the fault must be visible (a log line, a metric, ``/ready``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

import serving.log_writer as log_writer
from serving.log_reader import log_files, read_decisions, read_outcomes
from serving.log_schema import TABLES_SQL, DecisionRecord, decision_row
from serving.log_writer import DecisionLog
from serving.testpki import TestPKI
from tests.conftest import APP_ID
from tests.unit.test_notifications import notification_body

REALTIME = "/retention/message"
NOTIFICATIONS = "/apple/notifications"
JSON = {"content-type": "application/json"}



@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """pytest's caplog, also attached to the log's logger (the app's logging set-up may stop propagation)."""
    logger = logging.getLogger("retention.decision_log")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def answer(c: TestClient[Any], pki: TestPKI) -> str:
    """Send one signed realtime request; return its requestIdentifier once answered 200."""
    import json
    import uuid

    rid = str(uuid.uuid4())
    r = c.post(REALTIME, content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox",
                                                         request_identifier=rid), headers=JSON)
    assert r.status_code == 200, r.text
    assert json.loads(r.content)
    return rid


_bodies: dict[str, bytes] = {}


def notify(c: TestClient[Any], pki: TestPKI, otid: str) -> int:
    """Send the DID_RENEW notification of `otid` (the same notificationUUID each time, as Apple's retries)."""
    body = _bodies.setdefault(otid, notification_body(pki, "DID_RENEW", otid=otid))
    return int(c.post(NOTIFICATIONS, content=body, headers=JSON).status_code)


def stored(data_dir: Path) -> tuple[list[str], list[str]]:
    """Return (request ids, outcome transaction ids) in every log file of `data_dir`, as export reads them."""
    files = log_files(data_dir)
    return [d["request_id"] for d in read_decisions(files)], [o["original_transaction_id"] for o in read_outcomes(files)]


def metric(c: TestClient[Any], name: str, **labels: str) -> float:
    text = c.get("/metrics").text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def delete_log_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# ---- the file deleted, overwritten or corrupt while serving --------------------------------------------------
def test_deleting_the_log_files_while_serving_loses_no_later_decision_or_outcome(
    client_for: Any, pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    c = client_for()
    svc = c.app.state.service
    data = Path(svc.settings.data_dir)
    answer(c, pki)
    assert notify(c, pki, "2000000001") == 200
    delete_log_files(svc.decision_log.path)  # the operator "cleans up" while the server runs
    with caplog.at_level(logging.ERROR, logger="retention.decision_log"):
        later = [answer(c, pki) for _ in range(3)]
        assert notify(c, pki, "2000000002") == 200  # answered 200 only once in a file that exists
        svc.decision_log.flush()
    ids, otids = stored(data)
    assert set(later) <= set(ids) and "2000000002" in otids
    assert [r.getMessage() for r in caplog.records if "was deleted" in r.getMessage()], caplog.text
    assert metric(c, "retention_decision_log_faults_total", reason="deleted") == 1
    assert c.get("/ready").status_code == 200


def test_a_log_file_overwritten_in_place_is_set_aside_and_a_fresh_one_started(
    client_for: Any, pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    c = client_for()
    svc = c.app.state.service
    path = svc.decision_log.path
    first = answer(c, pki)
    assert svc.decision_log.flush()
    inode = path.stat().st_ino
    with open(path, "r+b") as fh:  # same inode, other bytes (a careless cp or an editor)
        fh.write(b"\0" * 4096)
    assert path.stat().st_ino == inode
    with caplog.at_level(logging.ERROR, logger="retention.decision_log"):
        later = answer(c, pki)
        assert notify(c, pki, "2000000003") == 200
        assert svc.decision_log.flush()
    assert any("was overwritten" in r.getMessage() for r in caplog.records), caplog.text
    assert metric(c, "retention_decision_log_faults_total", reason="replaced") == 1
    # the fresh file holds what came after; the overwritten one was moved aside, not mixed with it
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT request_id FROM decisions")] == [later]
        assert [r[0] for r in conn.execute("SELECT original_transaction_id FROM outcomes")] == ["2000000003"]
    aside = [p for p in path.parent.iterdir() if ".replaced-" in p.name and p.suffix == ".sqlite"]
    assert len(aside) == 1, list(path.parent.iterdir())
    assert first not in [d["request_id"] for d in read_decisions(path)]


def test_a_corruption_error_starts_a_fresh_file_and_loses_none_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    faults: list[str] = []
    dlog = DecisionLog(tmp_path / "decisions-h-1.sqlite", batch_ms=5.0, on_fault=faults.append)
    dlog.start()
    real = log_writer._commit_rows
    calls = {"n": 0}

    def corrupt_once(conn: sqlite3.Connection, *a: Any, **kw: Any) -> tuple[int, int]:
        calls["n"] += 1
        if calls["n"] == 1:  # what SQLite raises on a damaged page
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real(conn, *a, **kw)

    monkeypatch.setattr(log_writer, "_commit_rows", corrupt_once)
    with caplog.at_level(logging.ERROR, logger="retention.decision_log"):
        for i in range(5):
            dlog.log(_record(i))
        assert dlog.flush()
    dlog.close()
    assert sorted(d["request_id"] for d in read_decisions(dlog.path)) == [f"req-{i}" for i in range(5)]
    assert faults == ["corrupt"] and any("is corrupt" in r.getMessage() for r in caplog.records)
    assert [p.name for p in tmp_path.glob("decisions-h-1.corrupt-*.sqlite")]
    assert dlog.stats()["dropped"] == 0


# ---- a commit that hangs ------------------------------------------------------------------------------------
def test_a_hung_commit_makes_ready_503_until_it_ends(
    client_for: Any, pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that does not return (a stalled disk): /ready and notifications say so; nothing is lost."""
    monkeypatch.setattr(log_writer, "STALL_S", 0.5)
    c = client_for()
    dlog = c.app.state.service.decision_log
    answered = [answer(c, pki)]
    assert dlog.flush() and c.get("/ready").status_code == 200
    real, stalled, go_on = log_writer._commit_rows, threading.Event(), threading.Event()

    def stall(*a: Any, **kw: Any) -> tuple[int, int]:
        stalled.set()
        go_on.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(log_writer, "_commit_rows", stall)
    try:
        answered.append(answer(c, pki))
        assert stalled.wait(10)
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = c.get("/ready")
        assert r.status_code == 503 and "a commit to the decision log has taken" in r.text, r.text
        assert notify(c, pki, "2000000077") == 503  # what /ready now says: notifications cannot be stored
    finally:
        go_on.set()
        monkeypatch.setattr(log_writer, "_commit_rows", real)
    assert dlog.flush()
    assert c.get("/ready").status_code == 200
    assert notify(c, pki, "2000000077") == 200
    ids, _ = stored(Path(c.app.state.service.settings.data_dir))
    assert sorted(ids) == sorted(answered)


def test_a_batch_sent_twice_is_stored_once(tmp_path: Path) -> None:
    dlog = DecisionLog(tmp_path / "decisions-h-2.sqlite", batch_ms=5.0)
    dlog.start()
    for _ in range(2):
        for i in range(10):
            dlog.log(_record(i))
        dlog.log_outcome("uuid-1", "otid-1", "renewed", 1_700_000_000_000)
        assert dlog.flush()
    dlog.close()
    assert sorted(d["request_id"] for d in read_decisions(dlog.path)) == [f"req-{i}" for i in range(10)]
    with sqlite3.connect(dlog.path) as conn:
        assert conn.execute("SELECT count(*) FROM outcomes").fetchone()[0] == 1


def test_a_version_1_log_file_is_read_migrated_and_written_without_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "decisions-old-7.sqlite"
    conn = sqlite3.connect(path)  # a file as the previous version wrote it: no unique request_id
    conn.executescript(TABLES_SQL)
    conn.execute("INSERT INTO log_meta VALUES ('schema_version', '1')")
    row = decision_row(_record(1), 1_700_000_000_000)
    conn.execute(log_writer._multi_insert_sql(1).replace(" OR IGNORE", ""), row)
    conn.execute(log_writer._multi_insert_sql(1).replace(" OR IGNORE", ""), row)
    conn.commit()
    conn.close()
    assert [d["request_id"] for d in read_decisions(path)] == ["req-1"]  # readable as it is, each decision once
    dlog = DecisionLog(path, batch_ms=5.0)
    dlog.start()
    dlog.log(_record(1))
    dlog.log(_record(2))
    assert dlog.flush()
    dlog.close()
    with sqlite3.connect(path) as conn:  # migrated: one row per request_id, the re-sent one not added
        assert [r[0] for r in conn.execute("SELECT request_id FROM decisions ORDER BY id")] == ["req-1", "req-2"]
        assert conn.execute("SELECT value FROM log_meta WHERE key = 'schema_version'").fetchone()[0] == "2"


# ---- an outcome is durable before its 200 ----------------------------------------------------------------------
def test_an_outcome_batch_is_committed_with_synchronous_full(tmp_path: Path) -> None:
    dlog = DecisionLog(tmp_path / "decisions-h-3.sqlite", batch_ms=5.0)
    dlog.start()
    assert dlog._file is not None and dlog._file.conn is not None
    statements: list[str] = []
    dlog._file.conn.set_trace_callback(statements.append)
    dlog.log(_record(1))
    assert dlog.flush()
    dlog.log_outcome("uuid-9", "otid-9", "renewed", 1_700_000_000_000)
    assert dlog.flush()
    dlog.close()
    sync = [" ".join(s.split()[:5]) for s in statements
            if s.startswith(("PRAGMA synchronous", "BEGIN", "COMMIT", "INSERT OR IGNORE INTO outcomes"))]
    # decisions alone: WAL + NORMAL (a killed process keeps them); the outcome's commit is fsynced first
    assert sync[:2] == ["BEGIN", "COMMIT"]
    assert sync[2:6] == ["PRAGMA synchronous=FULL", "BEGIN", "INSERT OR IGNORE INTO outcomes", "COMMIT"]


# ---- decisions that cannot be written: /ready says so, nothing is dropped while memory holds -----------------
def test_a_writer_that_cannot_write_makes_ready_503_and_keeps_the_rows(
    client_for: Any, pki: TestPKI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every commit fails as SQLite does on a full disk, then succeeds again: rows kept, /ready says why meanwhile."""
    c = client_for()
    svc = c.app.state.service
    dlog = svc.decision_log
    before = [answer(c, pki) for _ in range(3)]
    assert dlog.flush() and c.get("/ready").status_code == 200
    real = log_writer._commit_rows

    def disk_full(*a: Any, **kw: Any) -> tuple[int, int]:
        raise sqlite3.OperationalError("database or disk is full")

    with caplog.at_level(logging.ERROR, logger="retention.decision_log"):
        monkeypatch.setattr(log_writer, "_commit_rows", disk_full)
        during = [answer(c, pki) for _ in range(30)]
        assert notify(c, pki, "2000000010") == 503  # not stored: Apple sends it again
        ready = c.get("/ready")
        assert ready.status_code == 503 and "decisions cannot be written" in ready.json()["detail"], ready.text
        assert any("retrying" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(log_writer, "_commit_rows", real)
        assert notify(c, pki, "2000000010") == 200  # Apple's retry
        assert dlog.flush()
    assert c.get("/ready").status_code == 200
    ids, otids = stored(Path(svc.settings.data_dir))
    assert sorted(ids) == sorted(before + during) and otids == ["2000000010"]
    assert dlog.stats()["dropped"] == 0
    assert metric(c, "retention_decision_log_faults_total", reason="unavailable") >= 1


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs folder (needs root and mount; skipped otherwise)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full commit test covers the same path")
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_and_a_read_only_folder_make_ready_503_until_they_pass(
    small_disk: Path, client_for: Any, pki: TestPKI
) -> None:
    c = client_for(data_dir=str(small_disk / "data"))
    svc = c.app.state.service
    dlog = svc.decision_log
    answered = [answer(c, pki) for _ in range(3)]
    assert dlog.flush()
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:  # fill the disk
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    answered += [answer(c, pki) for _ in range(200)]
    assert notify(c, pki, "2000000020") == 503
    ready = c.get("/ready")
    assert ready.status_code == 503 and "disk full" in ready.json()["detail"], ready.text
    filler.unlink()
    assert notify(c, pki, "2000000020") == 200 and dlog.flush()
    assert c.get("/ready").status_code == 200

    data = Path(svc.settings.data_dir)
    assert sorted(stored(data)[0]) == sorted(answered) and stored(data)[1] == ["2000000020"]
    # a read-only folder: the file is gone and a fresh one cannot be created
    delete_log_files(dlog.path)
    subprocess.run(["mount", "--bind", "-o", "ro", str(data), str(data)], check=True)
    try:
        answered += [answer(c, pki) for _ in range(3)]
        assert notify(c, pki, "2000000021") == 503
        ready = c.get("/ready")
        assert ready.status_code == 503 and "not writable" in ready.json()["detail"], ready.text
    finally:
        subprocess.run(["umount", str(data)], check=True)
    assert notify(c, pki, "2000000021") == 200 and dlog.flush()
    assert c.get("/ready").status_code == 200
    ids, otids = stored(Path(svc.settings.data_dir))
    assert set(ids) >= set(answered[203:]) and "2000000021" in otids  # what came before went with the deleted file
    assert dlog.stats()["dropped"] == 0


def _record(i: int) -> DecisionRecord:
    return DecisionRecord(
        request_id=f"req-{i}",
        original_transaction_id=f"otid-{i % 7}",
        product_id="com.example.premium.monthly",
        user_locale="en-US",
        environment="Sandbox",
        signed_date=1_700_000_000_000 + i,
        candidates=["m-a", "m-b"],
        probabilities=[0.5, 0.5],
        message_id="m-a",
        kind="message",
        propensity=0.5,
        answered_at=1_700_000_000_000 + i,
    )


# ---- export reads what it can; compaction retires old files without losing a row -----------------------------
def _write_log(path: Path, ids: range, outcomes: tuple[str, ...] = ()) -> None:
    dlog = DecisionLog(path, batch_ms=5.0)
    dlog.start()
    for i in ids:
        dlog.log(_record(i))
    for n in outcomes:
        dlog.log_outcome(n, f"otid-{n}", "renewed", 1_700_000_000_000)
    dlog.close()


def _damage(path: Path) -> None:
    """Overwrite the file past its first page: SQLite reads the header, then finds the pages malformed."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(4096)
        fh.write(os.urandom(size - 4096))


def test_export_reads_the_good_files_names_each_bad_one_and_fails_only_when_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import retention
    from serving.log_reader import read_decisions_file

    data = tmp_path / "data"
    _write_log(data / "decisions-a-1.sqlite", range(0, 50), ("n-1",))
    _write_log(data / "decisions-b-2.sqlite", range(50, 3000))
    _damage(data / "decisions-b-2.sqlite")
    (data / "decisions-c-3.sqlite").write_bytes(b"this is not a database" * 100)
    out = tmp_path / "d.parquet"
    args = ["decisions", "export", "--data-dir", str(data), "--out", str(out), "--outcomes-out", str(tmp_path / "o.csv")]
    assert retention.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "decisions-b-2.sqlite" in line] and len(
        [line for line in err if "decisions-c-3.sqlite" in line]
    ) == 1, err
    assert all(line.startswith("retention decisions: cannot read") for line in err), err
    ids = set(read_decisions_file(out)["request_id"])
    assert {f"req-{i}" for i in range(50)} <= ids
    assert retention.main([*args, "--strict"]) == 1
    assert "cannot read" in capsys.readouterr().err


def _damage_pages(path: Path, pages: tuple[int, ...]) -> None:
    """Overwrite whole 4 KiB pages with random bytes, the header page kept (what a bad sector or a stray write does)."""
    with open(path, "r+b") as fh:
        for page in pages:
            fh.seek(page * 4096)
            fh.write(os.urandom(4096))


def test_export_of_a_file_damaged_below_its_header_keeps_every_readable_row_and_counts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import retention
    from serving.log_reader import read_decisions_file

    data = tmp_path / "data"
    path = data / "decisions-a-1.sqlite"
    _write_log(path, range(2000), ("n-1", "n-2"))
    pages = path.stat().st_size // 4096
    _damage_pages(path, (pages // 3, pages // 2, 2 * pages // 3))
    out = tmp_path / "d.parquet"
    args = ["decisions", "export", "--data-dir", str(data), "--out", str(out), "--outcomes-out", str(tmp_path / "o.csv")]
    assert retention.main(args) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "cannot read" in line]
    assert len(err) == 1 and str(path) in err[0] and "unreadable decision row(s) skipped" in err[0], err
    lost = int(err[0].split(": ", 2)[2].split()[0])
    ids = list(read_decisions_file(out)["request_id"])
    assert len(ids) == len(set(ids)) and len(ids) > 1000 and len(ids) + lost >= 2000, (len(ids), lost)
    # show reads the same file (and the one the server set aside) without failing
    path.rename(data / "decisions-a-1.corrupt-1.sqlite")
    _write_log(path, range(2000, 2003))
    assert retention.main(["decisions", "show", "--data-dir", str(data), "--last", "2"]) == 0
    shown = capsys.readouterr()
    assert "req-2002" in shown.out and "decisions-a-1.corrupt-1.sqlite" in shown.err
    # --strict: exit 1 and no file written
    out.unlink()
    assert retention.main([*args, "--strict"]) == 1
    assert "--strict: nothing written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("d.parquet*"))


def test_damage_below_the_header_is_found_by_the_writer_and_a_fresh_file_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends never read the damaged pages: the writer's periodic quick_check finds them, off the request path."""
    monkeypatch.setattr(log_writer, "QUICK_CHECK_S", 0.0)
    faults: list[str] = []
    path = tmp_path / "decisions-h-1.sqlite"
    dlog = DecisionLog(path, batch_ms=5.0, on_fault=faults.append)
    dlog.start()
    for i in range(2000):
        dlog.log(_record(i))
    assert dlog.flush()
    pages = path.stat().st_size // 4096
    _damage_pages(path, (pages // 3, pages // 2))
    later: list[str] = []
    for i in range(2000, 2500):  # each batch after the damage is one chance for the check to have run
        dlog.log(_record(i))
        later.append(f"req-{i}")
        assert dlog.flush()
        if faults:
            break
        time.sleep(0.02)
    dlog.close()
    assert faults == ["corrupt"], faults
    assert [p.name for p in tmp_path.glob("decisions-h-1.corrupt-*.sqlite")]
    fresh = [d["request_id"] for d in read_decisions(path)]
    kept = [d["request_id"] for d in read_decisions(log_files(tmp_path), on_bad_file=lambda p, w: None)]
    assert set(later) <= set(kept) and fresh and dlog.stats()["dropped"] == 0


def test_compact_merges_retired_files_keeps_the_live_one_and_export_sees_every_row_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.decisions_cli import main as decisions_main

    data = tmp_path / "data"
    _write_log(data / "decisions-h-1.sqlite", range(0, 100), ("n-1", "n-2"))
    _write_log(data / "decisions-h-2.sqlite", range(90, 200), ("n-2", "n-3"))  # a batch written to two files
    live = DecisionLog(data / "decisions-h-3.sqlite", batch_ms=5.0)
    live.start()
    for i in range(200, 220):
        live.log(_record(i))
    assert live.flush()
    before = stored(data)
    assert decisions_main(["compact", "--data-dir", str(data)]) == 0
    assert "compacted 2 log file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in data.glob("decisions-*.sqlite")) == ["decisions-archive.sqlite", "decisions-h-3.sqlite"]
    after = stored(data)
    assert sorted(after[0]) == sorted(before[0]) and len(after[0]) == 220 and sorted(after[1]) == sorted(before[1])
    assert decisions_main(["compact", "--data-dir", str(data)]) == 0  # again: nothing to add, nothing lost
    assert stored(data) == after
    live.log(_record(220))  # the live server goes on writing its own file
    live.close()
    assert decisions_main(["compact", "--data-dir", str(data)]) == 0
    assert [p.name for p in data.glob("decisions-*.sqlite")] == ["decisions-archive.sqlite"]
    assert len(stored(data)[0]) == 221
    with sqlite3.connect(data / "decisions-archive.sqlite") as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT request_id) FROM decisions").fetchone() == (221, 221)
        assert conn.execute("SELECT count(*) FROM outcomes").fetchone()[0] == 3


def test_a_writer_starting_during_a_compaction_of_its_file_waits_and_writes_to_a_fresh_one(tmp_path: Path) -> None:
    import fcntl
    import threading

    path = tmp_path / "decisions-h-9.sqlite"
    _write_log(path, range(0, 5))  # a file of an earlier process with the same name (a reused pid)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what compact holds while it merges the file
    faults: list[str] = []
    dlog = DecisionLog(path, batch_ms=5.0, on_fault=faults.append)
    starting = threading.Thread(target=dlog.start)
    starting.start()
    time.sleep(0.3)
    assert starting.is_alive()  # the writer waits for the compaction
    path.unlink()  # the compaction merged the file and deletes it
    os.close(fd)
    starting.join(10)
    dlog.log(_record(7))
    assert dlog.flush()
    dlog.close()
    assert [d["request_id"] for d in read_decisions(path)] == ["req-7"] and faults == []
