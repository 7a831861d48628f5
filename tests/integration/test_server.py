"""A real ``retention serve`` (uvicorn) on 127.0.0.1: HTTP, TLS, workers, shutdown and the decision log."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from models.catalog import DEMO_CATALOG
from tests.conftest import APP_ID, BUNDLE_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, env: dict[str, str], data_dir: Path, scheme: str = "http") -> None:
        self.port = int(env["RETENTION_PORT"])
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.proc = subprocess.Popen([sys.executable, "-m", "retention", "serve"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_ready(self, verify: Any = True, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode() if self.proc.stdout else ""
            try:
                if httpx.get(self.base + "/health", verify=verify, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("server not ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def logged_rows(data_dir: Path) -> list[dict[str, Any]]:
    from serving.log_reader import read_decisions

    rows: list[dict[str, Any]] = []
    for db in sorted(data_dir.glob("decisions-*.sqlite")):
        rows.extend(read_decisions(db))
    return rows


@pytest.fixture
def server_env(pki_dir: Path, trained_registry: Path, tmp_path: Path) -> dict[str, str]:
    root = next(p for p in pki_dir.iterdir() if p.name.startswith("root") and p.suffix == ".pem")
    env = dict(os.environ)
    env.update({
        "RETENTION_ROOT_CERTS": str(root),
        "RETENTION_APP_APPLE_ID": str(APP_ID),
        "RETENTION_BUNDLE_ID": BUNDLE_ID,
        "RETENTION_ENVIRONMENT": "Sandbox",
        "RETENTION_CATALOG": str(DEMO_CATALOG),
        "RETENTION_MODEL": str(trained_registry),
        "RETENTION_DATA_DIR": str(tmp_path / "data"),
        "RETENTION_PORT": str(free_port()),
        "RETENTION_LOG_LEVEL": "warning",
    })
    return env


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    s = Server(server_env, tmp_path / "data")
    s.wait_ready()
    yield s
    s.stop()


def test_signed_requests_over_http_and_sigterm_flushes_every_decision(server: Server, pki: Any) -> None:
    n = 40
    with httpx.Client(base_url=server.base) as http:
        for _ in range(n):
            r = http.post("/retention/message", content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
            assert r.status_code == 200 and len(r.json()) == 1
        forged = http.post("/retention/message", content=type(pki).mint().signed_request_body(app_apple_id=APP_ID))
        assert forged.status_code == 401 and forged.json()["error"] == "untrusted_chain"
        assert http.get("/ready").json()["ready"] is True
        metrics = http.get("/metrics").text
        assert "untrusted_chain" in metrics
    server.stop(signal.SIGTERM)
    # uvicorn re-raises SIGTERM after its graceful shutdown (lifespan ran, the log was flushed)
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert len(logged_rows(server.data_dir)) == n  # the refused request is not a decision


def test_sigkill_loses_at_most_the_last_batch_window(server: Server, pki: Any) -> None:
    answered: list[float] = []
    bodies = [pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox") for _ in range(300)]
    with httpx.Client(base_url=server.base) as http:
        for b in bodies:
            assert http.post("/retention/message", content=b).status_code == 200
            answered.append(time.monotonic())
    server.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    server.proc.wait()
    rows = logged_rows(server.data_dir)
    # at most the rows answered within the last batch window (100 ms) may be missing; margin for scheduling
    recent = sum(1 for t in answered if killed_at - t <= 0.1 + 0.25)
    assert len(rows) >= len(answered) - recent
    assert len(rows) >= len(answered) // 2  # and the log was being written all along


def test_serve_without_root_certificate_refuses_with_one_line(server_env: dict[str, str]) -> None:
    env = {k: v for k, v in server_env.items() if k != "RETENTION_ROOT_CERTS"}
    r = subprocess.run([sys.executable, "-m", "retention", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "root certificate" in lines[0] and "Traceback" not in r.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    c, k = tmp / "tls.pem", tmp / "tls.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def test_tls_refuses_versions_older_than_1_2(server_env: dict[str, str], tmp_path: Path, pki: Any) -> None:
    cert, key = _self_signed(tmp_path)
    env = dict(server_env, RETENTION_SSL_CERTFILE=str(cert), RETENTION_SSL_KEYFILE=str(key))
    s = Server(env, tmp_path / "data", scheme="https")
    try:
        ctx12 = ssl.create_default_context(cafile=str(cert))
        s.wait_ready(verify=ctx12)
        r = httpx.post(s.base + "/retention/message", verify=ctx12,
                       content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
        assert r.status_code == 200
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(cert))
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, OSError)), socket.create_connection(("127.0.0.1", s.port)) as raw, \
                old.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass
    finally:
        s.stop()


def test_two_workers_aggregate_metrics(server_env: dict[str, str], tmp_path: Path, pki: Any) -> None:
    env = dict(server_env, RETENTION_WORKERS="2")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    s = Server(env, tmp_path / "data")
    try:
        s.wait_ready()
        n = 30
        for _ in range(n):
            with httpx.Client(base_url=s.base) as http:  # new connections spread over the workers
                assert http.post("/retention/message",
                                 content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")).status_code == 200
        # each worker publishes its tallies at least once a second; a scrape sums every worker's
        total = 0.0
        for _ in range(50):
            text = httpx.get(s.base + "/metrics").text
            total = sum(float(m) for m in re.findall(
                r"^retention_request_latency_seconds_count(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M))
            if total == n:
                break
            time.sleep(0.1)
        assert total == n
    finally:
        s.stop()
    assert len(logged_rows(tmp_path / "data")) == n


def test_one_body_is_answered_once_across_two_workers_and_a_restart(server_env: dict[str, str], tmp_path: Path,
                                                                    pki: Any) -> None:
    env = dict(server_env, RETENTION_WORKERS="2")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")
    s = Server(env, tmp_path / "data")
    try:
        s.wait_ready()
        statuses, codes = [], []
        for _ in range(20):
            with httpx.Client(base_url=s.base) as http:  # a new connection each time: both workers get some
                r = http.post("/retention/message", content=body)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    codes.append(r.json()["error"])
        assert statuses.count(200) == 1 and codes == ["replayed_request"] * 19
    finally:
        s.stop()
    s = Server(env, tmp_path / "data")  # restarted on the same data folder
    try:
        s.wait_ready()
        for _ in range(4):
            with httpx.Client(base_url=s.base) as http:
                r = http.post("/retention/message", content=body)
                assert r.status_code == 409 and r.json()["error"] == "replayed_request"
    finally:
        s.stop()
    assert len(logged_rows(tmp_path / "data")) == 1
