"""The whole loop on a small scale, through real processes: serve, notify, export, train, evaluate.

``retention serve`` answers signed requests and records signed notifications; SIGTERM flushes
its log; ``retention decisions export`` writes the training files; ``retention train`` fits a new
version on them (its id the last line of stdout); ``retention evaluate`` compares it with the
serving version off-policy and writes its summary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from models.catalog import DEMO_CATALOG
from models.registry import Registry
from tests.conftest import APP_ID, BUNDLE_ID
from tests.integration.test_server import Server, free_port
from tests.unit.test_notifications import notification_body

N_REQUESTS = 150
N_UNANSWERED = 5
DAY_MS = 86_400_000


def retention(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Return the finished ``retention ARGS`` process (stdout and stderr as text)."""
    return subprocess.run([sys.executable, "-m", "retention", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.timeout(180)
def test_serve_notify_export_train_evaluate(pki: Any, pki_dir: Path, trained_registry: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(trained_registry, registry)  # the session's registry stays as other tests expect it
    serving_version = Registry(registry).current()
    data = tmp_path / "data"
    root = next(p for p in pki_dir.iterdir() if p.name.startswith("root") and p.suffix == ".pem")
    env = {
        **os.environ,
        "RETENTION_ROOT_CERTS": str(root),
        "RETENTION_APP_APPLE_ID": str(APP_ID),
        "RETENTION_BUNDLE_ID": BUNDLE_ID,
        "RETENTION_ENVIRONMENT": "Sandbox",
        "RETENTION_CATALOG": str(DEMO_CATALOG),
        "RETENTION_MODEL": str(registry),
        "RETENTION_DATA_DIR": str(data),
        "RETENTION_PORT": str(free_port()),
        "RETENTION_LOG_LEVEL": "warning",
        "RETENTION_EPSILON": "0.3",  # explore enough that 150 decisions cover several messages
    }

    # ---- 1. serve: signed requests answered, signed notifications recorded ----
    otids = [f"3000000{i:04d}" for i in range(N_REQUESTS)]
    cancelled, renewed = otids[0:80:2], otids[1:60:2]
    server = Server(env, data)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base, timeout=10) as http:
            shown: dict[str, str] = {}
            for otid in otids:
                r = http.post("/retention/message", content=pki.signed_request_body(
                    app_apple_id=APP_ID, environment="Sandbox", original_transaction_id=otid))
                assert r.status_code == 200, r.text
                (answer,) = r.json().values()
                shown[otid] = answer["messageIdentifier"]
            for i in range(N_UNANSWERED):  # a locale without messages: 404, logged, no message shown
                r = http.post("/retention/message", content=pki.signed_request_body(
                    app_apple_id=APP_ID, environment="Sandbox", original_transaction_id=f"3100000{i:04d}",
                    user_locale="pt-BR"))
                assert r.status_code == 404 and r.json()["error"] == "no_eligible_message"
            time.sleep(0.01)  # the outcomes come after the decisions they follow
            for otid in cancelled:
                body = notification_body(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid=otid)
                r = http.post("/apple/notifications", content=body)
                assert r.status_code == 200 and r.json() == {"status": "recorded"}, r.text
                assert http.post("/apple/notifications", content=body).status_code == 200  # Apple's retry
            for otid in renewed:
                r = http.post("/apple/notifications", content=notification_body(pki, "DID_RENEW", otid=otid))
                assert r.status_code == 200 and r.json() == {"status": "recorded"}, r.text
            assert http.post("/apple/notifications", content=notification_body(pki, "TEST")).json() == {
                "status": "ignored"}
            forged = http.post("/apple/notifications", content=notification_body(type(pki).mint(), "DID_RENEW"))
            assert forged.status_code == 401 and forged.json()["error"] == "untrusted_chain"
    finally:
        server.stop(signal.SIGTERM)
    assert server.proc.returncode in (0, -signal.SIGTERM)

    # ---- 2. export the log to the training files ----
    decisions, outcomes = tmp_path / "decisions.parquet", tmp_path / "outcomes.parquet"
    proc = retention("decisions", "export", "--data-dir", str(data), "--out", str(decisions),
                  "--outcomes-out", str(outcomes))
    assert proc.returncode == 0, proc.stderr
    d = pd.read_parquet(decisions)
    o = pd.read_parquet(outcomes)
    # the 404s are kept, with no shown message and policy apple_fallback: Apple showed its own message
    assert len(d) == N_REQUESTS + N_UNANSWERED and f"kept {N_UNANSWERED} request(s)" in proc.stdout
    unanswered = d[d["message_id"].isna()]
    assert len(unanswered) == N_UNANSWERED and (unanswered["policy"] == "apple_fallback").all()
    answered = d[d["message_id"].notna()]
    assert dict(zip(answered["original_transaction_id"], answered["message_id"], strict=True)) == shown
    assert ((d["propensity"] > 0) & (d["propensity"] <= 1)).all()
    assert len(o) == len(cancelled) + len(renewed)  # each retry stored once, the TEST and the forgery nowhere
    events = dict(zip(o["original_transaction_id"], o["event"], strict=True))
    assert {k for k, v in events.items() if v == "cancelled"} == set(cancelled)
    assert {k for k, v in events.items() if v == "renewed"} == set(renewed)

    # ---- 3. train a new version on them ----
    as_of = str(int(time.time() * 1000) + 60 * DAY_MS)  # every 30-day window has passed
    proc = retention("train", "--decisions", str(decisions), "--outcomes", str(outcomes), "--catalog", str(DEMO_CATALOG),
                  "--registry", str(registry), "--as-of", as_of)
    assert proc.returncode == 0, proc.stderr[-2000:]
    new_version = proc.stdout.strip().splitlines()[-1]
    assert (registry / new_version / "model.onnx").is_file()
    assert new_version != serving_version

    # ---- 4. evaluate it against the serving version, off-policy ----
    out = tmp_path / "evaluation"
    proc = retention("evaluate", "--decisions", str(decisions), "--outcomes", str(outcomes), "--catalog",
                  str(DEMO_CATALOG), "--registry", str(registry), "--as-of", as_of, "--resamples", "100",
                  "--min-ess", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    # the labels came from the notifications: each cancellation a churn, every other window passed as retained
    assert summary["data"]["churned"] == len(cancelled)
    assert summary["data"]["retained"] == N_REQUESTS + N_UNANSWERED - len(cancelled)
    assert summary["data"]["censored"] == 0
    # the 404s are Apple's own arm, apart from every estimate (a slow answer may join them, never leave)
    arm = summary["data"]["apple_fallback"]
    assert arm["unanswered"] == N_UNANSWERED and arm["decisions"] >= N_UNANSWERED
    assert arm["labelled"] == arm["decisions"] and arm["retention_rate"] == 1.0
    assert summary["data"]["evaluated"] == N_REQUESTS + N_UNANSWERED - arm["decisions"]
    assert [p["name"] for p in summary["policies"]] == ["logging", serving_version, new_version]
    assert (out / "report.html").stat().st_size > 1000
