"""Decision log: batched background writes, flush on close, bounded loss on SIGKILL, export, outcomes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd
import pytest

import retention
from models.data_files import event_for_notification
from serving.decisions_cli import main as decisions_main
from serving.log_reader import (
    export_decisions,
    export_outcomes,
    log_files,
    read_decisions,
    read_decisions_file,
    read_outcomes,
)
from serving.log_schema import REQUIRED_DECISION_COLUMNS, DecisionRecord
from serving.log_writer import DecisionLog, log_file_name

REPO = Path(__file__).resolve().parents[2]


def _record(i: int, *, answered_at: int = 0, fallback: bool = False) -> DecisionRecord:
    k = 3
    if fallback:
        return DecisionRecord(
            request_id=f"req-{i}",
            original_transaction_id=f"otid-{i % 7}",
            product_id="com.example.premium.monthly",
            user_locale="en-US",
            environment="Sandbox",
            signed_date=1_700_000_000_000 + i,
            app_apple_id=1234,
            candidates=["m-a", "m-b", "m-c"],
            probabilities=[0.0, 1.0, 0.0],
            message_id="m-b",
            kind="message",
            propensity=1.0,
            policy="fallback:deadline",
            fallback_reason="deadline",
            catalog_sha256="c" * 64,
            latency_ms=51.0,
            answered_at=answered_at,
        )
    return DecisionRecord(
        request_id=f"req-{i}",
        original_transaction_id=f"otid-{i % 7}",
        product_id="com.example.premium.monthly",
        user_locale="en-US",
        environment="Sandbox",
        signed_date=1_700_000_000_000 + i,
        app_apple_id=1234,
        candidates=["m-a", "m-b", "m-c"],
        scores=np.array([0.5, 0.6, 0.7]),
        values=np.array([29.94, 35.9, 20.0]),
        probabilities=np.array([1 / 60, 1 - 2 / 60, 1 / 60]),
        message_id="m-b",
        kind="alternateProduct",
        propensity=1 - 2 / 60,
        policy="ml:epsilon-greedy",
        policy_params={"epsilon": 0.05, "holdout": 0.0, "scheme": "epsilon"},
        model_version="v3",
        shadow_model_version="v4",
        shadow_message_id="m-c",
        catalog_sha256="c" * 64,
        features=np.arange(k * 4, dtype=np.float32).reshape(k, 4) + i,
        feature_names_sha="f" * 16,
        latency_ms=1.25,
        answered_at=answered_at,
    )


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM decisions").fetchone()[0])
    finally:
        conn.close()


def test_rows_are_written_in_batches_without_close(tmp_path: Path) -> None:
    path = tmp_path / log_file_name()
    dlog = DecisionLog(path, batch_ms=50)
    dlog.start()
    try:
        for i in range(500):
            dlog.log(_record(i))
        # visible to another reader within a few batch windows, without close() or flush()
        deadline = time.monotonic() + 10
        while _count(path) < 500 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _count(path) == 500
        stats = dlog.stats()
        assert stats["written"] == 500 and stats["dropped"] == 0
        assert 1 <= stats["batches"] < 50  # batches, not one transaction per row
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        dlog.close()


def test_close_flushes_everything_and_the_rows_read_back(tmp_path: Path) -> None:
    path = tmp_path / "decisions-test-1.sqlite"
    dlog = DecisionLog(path, batch_ms=10_000)  # a long window: only close() can write these
    dlog.start()
    for i in range(300):
        dlog.log(_record(i, fallback=i % 10 == 0))
    assert dlog.stats()["queued"] == 300
    dlog.close()
    assert _count(path) == 300 and dlog.stats()["queued"] == 0

    rows = list(read_decisions(path))
    assert len(rows) == 300
    r = next(r for r in rows if r["request_id"] == "req-1")
    assert r["candidates"] == ["m-a", "m-b", "m-c"]
    assert r["probabilities"] == [1 / 60, 1 - 2 / 60, 1 / 60] and r["propensity"] == 1 - 2 / 60  # exact, not rounded
    assert r["scores"] == [0.5, 0.6, 0.7] and r["values"] == [29.94, 35.9, 20.0]
    assert r["policy_params"] == {"epsilon": 0.05, "holdout": 0.0, "scheme": "epsilon"}
    assert r["shadow_message_id"] == "m-c" and r["model_version"] == "v3"
    np.testing.assert_array_equal(r["features"], np.arange(12, dtype=np.float32).reshape(3, 4) + 1)
    fb = next(r for r in rows if r["request_id"] == "req-0")
    assert (
        fb["policy"] == "fallback:deadline"
        and fb["scores"] == []
        and fb["features"] is None
        and fb["propensity"] == 1.0
    )
    assert rows[0]["answered_at"] > 1_700_000_000_000  # 0 means "when logged"


def test_full_queue_drops_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dropped: list[int] = []
    dlog = DecisionLog(tmp_path / "d.sqlite", max_queue=10, on_drop=dropped.append)
    for i in range(15):
        dlog.log(_record(i))  # the writer is not started yet: the queue fills up
    assert dlog.stats()["dropped"] == 5
    with caplog.at_level(logging.WARNING, logger="retention.decision_log"):
        dlog.start()
        dlog.close()
    assert dlog.stats()["written"] == 10
    assert sum(dropped) == 5
    assert any("5 records dropped" in r.getMessage() for r in caplog.records)
    dlog.log(_record(99))  # after close: counted, never raised
    assert dlog.stats()["dropped"] == 6
    assert sum(dropped) == 6


def test_numpy_values_and_odd_records_never_break_the_writer(tmp_path: Path) -> None:
    dlog = DecisionLog(tmp_path / "d.sqlite")
    dlog.start()
    r = _record(1)
    r.policy_params = {"epsilon": np.float32(0.05), "k": np.int64(3), "weights": np.array([1.0, 2.0])}
    r.scores = [float("nan"), 0.5, 0.25]
    dlog.log(r)
    bad = _record(2)
    bad.features = np.zeros((2, 2, 2))  # not a matrix: dropped and counted, the writer goes on
    dlog.log(bad)
    dlog.log(_record(3))
    dlog.close()
    rows = {d["request_id"]: d for d in read_decisions(tmp_path / "d.sqlite")}
    assert set(rows) == {"req-1", "req-3"} and dlog.stats()["dropped"] == 1
    assert rows["req-1"]["policy_params"] == {"epsilon": pytest.approx(0.05), "k": 3, "weights": [1.0, 2.0]}
    assert rows["req-1"]["scores"] == [None, 0.5, 0.25]  # NaN is logged as null


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from serving.log_schema import DecisionRecord
    from serving.log_writer import DecisionLog
    dlog = DecisionLog({path!r}, batch_ms={batch_ms})
    dlog.start()
    i = 0
    while True:
        now = int(time.time() * 1000)
        dlog.log(DecisionRecord(request_id=str(i), original_transaction_id="t", product_id="p", user_locale="en-US",
                                environment="Sandbox", signed_date=now, candidates=["a", "b"], message_id="a",
                                propensity=1.0, policy="rules", answered_at=now))
        # the request is "answered" once it is logged: report it
        sys.stdout.write(f"{{i}} {{now}}\\n"); sys.stdout.flush()
        i += 1
        time.sleep(0.001)
    """
)


def test_sigkill_loses_at_most_the_last_batch_window(tmp_path: Path) -> None:
    batch_ms = 100
    path = tmp_path / "killed.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO), path=str(path), batch_ms=batch_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    answered: dict[int, int] = {}
    assert child.stdout is not None
    try:
        for line in child.stdout:
            i, at = map(int, line.split())
            answered[i] = at
            if len(answered) >= 1500:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        killed_at = int(time.time() * 1000)
        rest, _ = child.communicate(timeout=30)
    for line in rest.splitlines():
        if line.strip():
            i, at = map(int, line.split())
            answered[i] = at
    assert child.returncode == -signal.SIGKILL

    conn = sqlite3.connect(path)
    logged = {int(r[0]) for r in conn.execute("SELECT request_id FROM decisions")}
    conn.close()
    missing = sorted(set(answered) - logged)
    assert logged <= set(answered) | {max(answered) + 1}  # at most the one logged but not yet reported
    assert len(logged) >= 1000, "the writer kept up before the kill"
    # FIFO batches: everything lost comes after everything kept
    assert not missing or min(missing) > max(logged & set(answered))
    # count against a margin: at most the decisions answered within the last batch window (+ generous slack
    # for a loaded 2-core machine) before the kill may be missing
    window_ms = batch_ms + 400
    recent = sum(1 for at in answered.values() if at >= killed_at - window_ms)
    assert len(missing) <= recent, (len(missing), recent)


def test_export_writes_design_columns_readable_by_pandas(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for worker in (1, 2):  # two workers' files, interleaved in time
        dlog = DecisionLog(data / f"decisions-host-{worker}.sqlite")
        dlog.start()
        for i in range(worker, 40, 2):
            dlog.log(_record(i, answered_at=1_800_000_000_000 + i, fallback=i == 5))
        dlog.log_outcome(
            f"uuid-{worker}",
            "otid-1",
            "cancelled",
            1_800_000_000_100,
            "DID_CHANGE_RENEWAL_STATUS",
            "AUTO_RENEW_DISABLED",
        )
        dlog.log_outcome(
            "uuid-shared", "otid-2", "renewed", 1_800_000_000_200, "DID_RENEW", None
        )  # Apple's retry on another worker
        dlog.log_outcome("uuid-shared", "otid-2", "renewed", 1_800_000_000_200, "DID_RENEW", None)
        dlog.close()
    files = log_files(data)
    assert len(files) == 2

    for suffix in ("parquet", "csv"):
        out = tmp_path / f"decisions.{suffix}"
        assert export_decisions(files, out) == 39
        df = pd.read_parquet(out) if suffix == "parquet" else pd.read_csv(out)
        assert list(df.columns[: len(REQUIRED_DECISION_COLUMNS)]) == list(REQUIRED_DECISION_COLUMNS)
        assert {
            "scores",
            "values",
            "probabilities",
            "features",
            "catalog_sha256",
            "policy_params",
            "fallback_reason",
        } <= set(df.columns)
        assert list(df["request_id"]) == [f"req-{i}" for i in range(1, 40)]  # merged in answered_at order
        assert ((df["propensity"] > 0) & (df["propensity"] <= 1)).all()
        assert df["signed_date"].dtype == np.int64

        back = read_decisions_file(out)
        row = back[back["request_id"] == "req-3"].iloc[0]
        assert list(row["candidates"]) == ["m-a", "m-b", "m-c"]
        assert list(row["probabilities"]) == [1 / 60, 1 - 2 / 60, 1 / 60]
        assert np.asarray([list(r) for r in row["features"]], dtype=np.float32).shape == (3, 4)
        assert json.loads(row["policy_params"])["epsilon"] == 0.05
        fb = back[back["request_id"] == "req-5"].iloc[0]
        assert fb["policy"] == "fallback:deadline" and fb["fallback_reason"] == "deadline"

    assert export_outcomes(files, tmp_path / "outcomes.parquet") == 3  # uuid-1, uuid-2, uuid-shared once
    out = pd.read_parquet(tmp_path / "outcomes.parquet")
    assert list(out.columns[:3]) == ["original_transaction_id", "event", "at"]
    assert sorted(out["notification_uuid"]) == ["uuid-1", "uuid-2", "uuid-shared"]


def test_outcome_events_are_checked_and_notifications_map_to_them(tmp_path: Path) -> None:
    dlog = DecisionLog(tmp_path / "d.sqlite")
    with pytest.raises(ValueError, match="unknown outcome event"):
        dlog.log_outcome("u", "t", "churned", 1)
    assert event_for_notification("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED") == "cancelled"
    assert event_for_notification("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_ENABLED") == "reenabled"
    assert event_for_notification("EXPIRED", "VOLUNTARY") == "expired"
    assert event_for_notification("DID_RENEW", None) == "renewed"
    assert event_for_notification("OFFER_REDEEMED", "UPGRADE") == "offer_redeemed"
    assert event_for_notification("TEST", None) is None


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    dlog = DecisionLog(data / log_file_name())
    dlog.start()
    for i in range(5):
        dlog.log(_record(i))
    dlog.log_outcome("u1", "otid-1", "expired", 5, "EXPIRED", "VOLUNTARY")
    dlog.close()
    out, outcomes = tmp_path / "exp" / "d.parquet", tmp_path / "exp" / "o.csv"
    code = decisions_main(["export", "--data-dir", str(data), "--out", str(out), "--outcomes-out", str(outcomes)])
    assert code == 0
    assert len(pd.read_parquet(out)) == 5 and len(pd.read_csv(outcomes)) == 1
    assert "exported 5 decisions" in capsys.readouterr().out
    assert decisions_main(["show", "--data-dir", str(data), "--last", "2"]) == 0
    shown = capsys.readouterr().out
    assert "req-3" in shown and "req-4" in shown and "req-2" not in shown
    assert shown.index("req-3") < shown.index("req-4")  # oldest first
    assert "* m-b  P(stay)=0.600" in shown  # the chosen candidate, with its score
    # bad input: one line, non-zero, no traceback
    assert retention.main(["decisions", "export", "--data-dir", str(tmp_path / "empty"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("retention decisions: error:") and err.count("\n") == 1
    assert retention.main(["decisions", "export", "--data-dir", str(data), "--out", str(tmp_path / "x.json")]) == 1
    assert ".parquet or .csv" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.json")
    # a place that cannot be written is said in one line before anything is written, outcomes' place included
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.csv").mkdir()
    for flags, said in ((["--out", str(tmp_path / "afile" / "d.csv")], "a file is where a folder above it must go"),
                        (["--out", str(tmp_path / "adir.csv")], "it is a folder"),
                        (["--out", str(tmp_path / "new.csv"), "--outcomes-out", str(tmp_path / "afile" / "o.csv")],
                         "a file is where a folder above it must go")):
        assert retention.main(["decisions", "export", "--data-dir", str(data), *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("retention decisions: error: cannot write") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "new.csv").exists()
    # one file named twice (however spelled) would end up holding the outcomes alone
    with pytest.raises(SystemExit) as exit_:
        retention.main(["decisions", "export", "--data-dir", str(data), "--out", str(tmp_path / "same.parquet"),
                        "--outcomes-out", str(tmp_path / "x" / ".." / "same.parquet")])
    assert exit_.value.code == 2 and "name the same file" in capsys.readouterr().err
    assert not (tmp_path / "same.parquet").exists()


def test_cli_export_keeps_404s_as_apple_s_arm_readable_by_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.data_io import read_decisions as read_training_decisions

    data = tmp_path / "data"
    dlog = DecisionLog(data / log_file_name())
    dlog.start()
    dlog.log(_record(0))
    for i, policy in ((1, "apple_fallback"), (2, "rules")):  # a 404 as logged today, and by an older server
        dlog.log(msgspec.structs.replace(_record(i), candidates=[], scores=None, values=None, probabilities=[],
                                         message_id=None, kind=None, propensity=1.0, policy=policy, features=None,
                                         feature_names_sha=None, status=404))
    dlog.close()
    out = tmp_path / "d.parquet"
    assert decisions_main(["export", "--data-dir", str(data), "--out", str(out)]) == 0
    assert "kept 2 request(s) answered with no message" in capsys.readouterr().out
    d = read_training_decisions(out)  # the file retention train and retention evaluate read
    assert d["message_id"].isna().tolist() == [False, True, True]
    assert d["policy"].tolist()[1:] == ["apple_fallback", "apple_fallback"]
    assert d["fallback_reason"].iloc[2] == "no_eligible_message"
    assert decisions_main(["export", "--data-dir", str(data), "--out", str(out), "--answered-only"]) == 0
    assert len(pd.read_parquet(out)) == 1 and "left out 2 request(s)" in capsys.readouterr().out


def test_the_writer_refuses_to_start_on_a_file_it_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "a-folder.sqlite").mkdir()
    dlog = DecisionLog(tmp_path / "a-folder.sqlite")
    with pytest.raises(OSError, match="cannot open the decision log"):
        dlog.start()
    dlog.close()


# ---- columns added by later versions -------------------------------------------------------------
_OLD_DDL = """
CREATE TABLE log_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY,
    request_id TEXT, original_transaction_id TEXT, product_id TEXT, user_locale TEXT, environment TEXT,
    signed_date INTEGER, app_apple_id INTEGER,
    candidates TEXT, scores TEXT, "values" TEXT, probabilities TEXT,
    message_id TEXT, kind TEXT, propensity REAL, policy TEXT, policy_params TEXT,
    model_version TEXT, shadow_model_version TEXT, shadow_message_id TEXT, catalog_sha256 TEXT,
    fallback_reason TEXT, features BLOB, features_rows INTEGER, features_cols INTEGER,
    feature_names_sha TEXT, latency_ms REAL, answered_at INTEGER, status INTEGER
);
CREATE TABLE outcomes (
    notification_uuid TEXT PRIMARY KEY, original_transaction_id TEXT NOT NULL, event TEXT NOT NULL,
    at INTEGER NOT NULL, raw_type TEXT, raw_subtype TEXT, received_at INTEGER
);
CREATE TABLE feature_schemas (sha TEXT PRIMARY KEY, names TEXT NOT NULL);
INSERT INTO outcomes VALUES ('old-1', 'otid-1', 'expired', 5, 'EXPIRED', 'VOLUNTARY', 6);
INSERT INTO decisions (request_id, original_transaction_id, product_id, user_locale, environment, signed_date,
    candidates, message_id, propensity, policy, policy_params, answered_at, status)
    VALUES ('r-old', 'otid-1', 'p', 'en-US', 'Sandbox', 1, '["m-a"]', 'm-a', 1.0, 'rules', '{}', 2, 200);
"""


def test_a_log_made_before_the_offer_and_profile_columns_reads_and_grows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_DDL)
    conn.close()
    # read as it is (read-only): the new columns read as missing
    [old] = read_outcomes(path)
    assert (old["event"], old["offer_type"], old["transaction_reason"]) == ("expired", None, None)
    assert [d["profile"] for d in read_decisions(path)] == [None]
    # a writer opening it adds the columns and writes rows with them
    dlog = DecisionLog(path)
    dlog.start()
    dlog.log_outcome("new-1", "otid-1", "offer_redeemed", 9, "OFFER_REDEEMED", None, offer_type=5,
                     offer_identifier="apple-7", offer_discount_type="FREE_TRIAL", transaction_reason="RENEWAL")
    rec = _record(1)
    rec.profile, rec.profile_read = {"tenure_days": 400, "country": "DE", "churn_score": None}, True
    miss = _record(2)
    miss.profile_read = True  # asked, no profile
    dlog.log(rec)
    dlog.log(miss)
    dlog.close()
    new = {o["notification_uuid"]: o for o in read_outcomes(path)}["new-1"]
    assert (new["offer_type"], new["offer_identifier"], new["offer_discount_type"], new["transaction_reason"]) == (
        5, "apple-7", "FREE_TRIAL", "RENEWAL")
    profiles = {d["request_id"]: d["profile"] for d in read_decisions(path)}
    assert profiles == {"r-old": None, "req-1": '{"tenure_days":400,"country":"DE","churn_score":null}',
                        "req-2": "null"}
    out = tmp_path / "o.parquet"
    assert export_outcomes([path], out) == 2
    assert pd.read_parquet(out).set_index("notification_uuid").loc["new-1", "offer_type"] == 5
    assert export_decisions([path], tmp_path / "d.parquet") == 3
    assert pd.read_parquet(tmp_path / "d.parquet").set_index("request_id").loc["req-2", "profile"] == "null"
