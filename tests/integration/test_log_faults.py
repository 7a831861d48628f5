"""A real ``retention serve`` under load while its decision log writer process is killed: no answered decision lost."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import APP_ID
from tests.integration.test_server import Server, logged_rows, server_env  # noqa: F401  (server_env: a fixture)


def _writer_pids(server_pid: int) -> list[int]:
    """Return the pids of the decision log writer processes under `server_pid` (its workers' children too)."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                parents[int(entry)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdlines[int(entry)] = fh.read()
        except (OSError, ValueError, IndexError):
            continue

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == server_pid:
                return True
        return False

    return [p for p, cmd in cmdlines.items() if b"serving.log_writer" in cmd and under(p)]


def test_killing_the_writer_under_load_loses_no_answered_decision(
    request: pytest.FixtureRequest, tmp_path: Path, pki: Any
) -> None:
    server = Server(request.getfixturevalue("server_env"), tmp_path / "data")
    server.wait_ready()
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.base, timeout=10) as http:
            while not stop.is_set():
                rid = str(uuid.uuid4())
                body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", request_identifier=rid)
                r = http.post("/retention/message", content=body, headers={"content-type": "application/json"})
                if r.status_code == 200:
                    with lock:
                        answered.append(rid)

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        kills = 0
        deadline = time.monotonic() + 60
        while kills < 3 and time.monotonic() < deadline:
            time.sleep(1.0)
            pids = _writer_pids(server.proc.pid)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                kills += 1
        time.sleep(1.0)
        assert kills == 3
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()  # SIGTERM: the log is written before exit
    ids = [r["request_id"] for r in logged_rows(server.data_dir)]
    assert len(answered) > 50
    assert set(answered) <= set(ids), f"{len(set(answered) - set(ids))} answered decisions missing"
    assert len(ids) == len(set(ids))  # re-sent batches stored once
