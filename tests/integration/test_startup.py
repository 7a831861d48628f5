"""``retention serve`` as an operator meets it: one log format, a start-up banner, lines for what changed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.catalog import DEMO_CATALOG
from tests.conftest import APP_ID, BUNDLE_ID
from tests.integration.test_server import Server, free_port

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")


@pytest.fixture
def env(pki_dir: Path, trained_registry: Path, tmp_path: Path) -> dict[str, str]:
    catalog = tmp_path / "catalog.json"
    catalog.write_bytes(DEMO_CATALOG.read_bytes())
    out = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    out.update({
        "RETENTION_ROOT_CERTS": str(pki_dir / "root.pem"),
        "RETENTION_APP_APPLE_ID": str(APP_ID),
        "RETENTION_BUNDLE_ID": BUNDLE_ID,
        "RETENTION_ENVIRONMENT": "Sandbox",
        "RETENTION_CATALOG": str(catalog),
        "RETENTION_MODEL": str(trained_registry),
        "RETENTION_DATA_DIR": str(tmp_path / "data"),
        "RETENTION_PORT": str(free_port()),
        "RETENTION_RELOAD_INTERVAL_S": "0.2",
    })
    return out


def run_and_stop(env: dict[str, str], tmp_path: Path, drive: Any) -> list[str]:
    server = Server(env, tmp_path / "data")
    try:
        server.wait_ready()
        drive(server)
    finally:
        server.stop(signal.SIGTERM)
    assert server.proc.stdout is not None
    return [ln for ln in server.proc.stdout.read().decode().splitlines() if ln.strip()]


def test_one_text_format_a_banner_and_lines_for_refusals_kill_switch_and_reloads(
    env: dict[str, str], tmp_path: Path, pki: Any
) -> None:
    def drive(server: Server) -> None:
        with httpx.Client(base_url=server.base) as http:
            assert http.post("/retention/message", content=pki.signed_request_body(app_apple_id=APP_ID,
                                                                                   environment="Sandbox")).is_success
            for _ in range(5):
                assert http.post("/retention/message", content=b"{}").status_code == 400
            kill = tmp_path / "data" / "kill-switch"
            for present in (True, False):
                kill.touch() if present else kill.unlink()
                time.sleep(1.1)  # the file is looked at once a second
                body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")
                assert http.post("/retention/message", content=body).is_success
            Path(env["RETENTION_CATALOG"]).write_text("{not json")
            time.sleep(1.0)  # a few reload intervals

    lines = run_and_stop(env, tmp_path, drive)
    assert lines and all(TEXT_LINE.match(ln) for ln in lines), "\n".join(ln for ln in lines if not TEXT_LINE.match(ln))
    banner = [ln for ln in lines if "retention-endpoint" in ln and "starting" in ln]
    assert len(banner) == 1
    for field in ("environment=Sandbox", f"app_apple_id={APP_ID}", "bundle_id=", f"catalog={env['RETENTION_CATALOG']}",
                  "catalog_sha256=", "model=2", f"data_dir={tmp_path / 'data'}", "root_sha256=", "workers=1",
                  "exploration=epsilon-greedy epsilon=0.05"):
        assert field in banner[0], field
    assert any("uvicorn.error: Application startup complete" in ln for ln in lines)  # uvicorn's lines, our format
    assert sum("refused a request with malformed_body" in ln for ln in lines) == 1  # five refusals, one line
    assert any("kill switch on" in ln for ln in lines) and any("kill switch off" in ln for ln in lines)
    assert any("catalog reload refused" in ln for ln in lines)


def test_json_log_format_and_access_log(env: dict[str, str], tmp_path: Path) -> None:
    # Production with a test root: its warning comes once, as a JSON line like the others
    env = {**env, "RETENTION_LOG_FORMAT": "json", "RETENTION_ACCESS_LOG": "true", "RETENTION_ENVIRONMENT": "Production"}

    def drive(server: Server) -> None:
        assert httpx.post(server.base + "/retention/message", content=b"[]").status_code == 400

    lines = run_and_stop(env, tmp_path, drive)
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "uvicorn.access" and "POST /retention/message" in r["message"] for r in records)
    assert any(r["logger"] == "retention.server" and "starting" in r["message"] for r in records)
    assert [r["level"] for r in records if "Apple Root CA - G3" in r["message"]] == ["WARNING"]


def test_a_port_in_use_is_one_line_before_startup(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["RETENTION_PORT"])))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "retention", "serve"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and f"port {env['RETENTION_PORT']} on 127.0.0.1 is already in use" in lines[0]


def test_production_defaults_and_a_missing_pinned_version_refuse_to_start(env: dict[str, str]) -> None:
    prod = {k: v for k, v in env.items() if k not in ("RETENTION_CATALOG", "RETENTION_MODEL", "RETENTION_DATA_DIR")}
    prod["RETENTION_ENVIRONMENT"] = "Production"
    r = subprocess.run([sys.executable, "-m", "retention", "serve"], env=prod, capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 3 and "Traceback" not in r.stderr
    assert [ln.split(" ", 4)[2:4] for ln in lines] == [["Production", "refuses"]] * 2 + [["Production", "needs"]]
    r = subprocess.run([sys.executable, "-m", "retention", "serve", "--model", f"{env['RETENTION_MODEL']}@nosuchversion"],
                       env=env, capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "nosuchversion" in lines[0]


@pytest.mark.parametrize(
    ("args", "extra_env", "want"),
    [
        (["--data-dir", "{tmp}/request.json"], {}, "data folder {tmp}/request.json (--data-dir, RETENTION_DATA_DIR) is a file"),
        (["--data-dir", "/proc/nope"], {}, "data folder /proc/nope (--data-dir, RETENTION_DATA_DIR) cannot be created"),
        (["--data-dir", "/proc"], {}, "data folder /proc (--data-dir, RETENTION_DATA_DIR) is not writable"),
        (["--log-level", "loud"], {}, "log_level (RETENTION_LOG_LEVEL, --log-level) must be one of"),
        (["--port", "99999"], {}, "port (RETENTION_PORT, --port) must be within 0-65535, not 99999"),
        ([], {"RETENTION_BUNDLE_ID": "  "}, "bundle_id (RETENTION_BUNDLE_ID, --bundle-id) is blank"),
        ([], {"RETENTION_BUNDLE_ID": BUNDLE_ID + " "}, "bundle_id (RETENTION_BUNDLE_ID, --bundle-id) has spaces around it"),
        (["--environment", "Production", "--catalog", str(DEMO_CATALOG)], {},
         f"Production refuses the demo catalog {DEMO_CATALOG}: set RETENTION_CATALOG"),
        (["--offer-key-file", "{tmp}/request.json", "--offer-key-id", "K", "--offer-issuer-id", "I"], {},
         "the In-App Purchase key file '{tmp}/request.json' is not an unencrypted PEM private key (.p8)"),
        (["--offer-key-file", "{tmp}/absent.p8", "--offer-key-id", "K", "--offer-issuer-id", "I"], {},
         "cannot read the In-App Purchase key file '{tmp}/absent.p8': No such file or directory"),
        (["--offer-key-file", "{tmp}/request.json"], {},
         "--offer-key-id and --offer-issuer-id are missing; promotional offers need all four of --offer-key-file, "
         "--offer-key-id, --offer-issuer-id and --bundle-id"),
        (["--verify-with", "thread"], {}, "--verify-with (RETENTION_VERIFY_WITH) was removed: request signatures are "
         "always checked on the event loop"),
        ([], {"RETENTION_SCORE_IN_THREAD": "1"}, "--score-in-thread (RETENTION_SCORE_IN_THREAD) was removed: "),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_before_the_banner(
    env: dict[str, str], tmp_path: Path, args: list[str], extra_env: dict[str, str], want: str
) -> None:
    (tmp_path / "request.json").write_text("{}")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "retention", "serve", *args], env={**env, **extra_env},
                       capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("retention serve: ") and want.replace("{tmp}", str(tmp_path)) in lines[0], lines


def test_a_killed_worker_is_logged_as_an_error(env: dict[str, str], tmp_path: Path) -> None:
    def drive(server: Server) -> None:
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        workers = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert workers, children
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(2.0)  # uvicorn's supervisor looks at its workers about every half second

    lines = run_and_stop({**env, "RETENTION_WORKERS": "2"}, tmp_path, drive)
    died = [ln for ln in lines if "Child process [" in ln and "died" in ln]
    assert died and all(TEXT_LINE.match(ln) and " ERROR uvicorn.error: " in ln for ln in died), "\n".join(lines)
