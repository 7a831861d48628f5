"""A real ``retention serve`` against slow clients, too many connections, and a working directory full of decoys."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
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

from tests.conftest import APP_ID
from tests.integration.test_server import Server, _self_signed, free_port, logged_rows, server_env  # noqa: F401

RETENTION = str(Path(sys.executable).parent / "retention")  # the installed command, as users start it


def _open(port: int, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if first:
        s.sendall(first)
    return s


def _read_to_close(s: socket.socket) -> bytes:
    """Return everything the server sends until it closes the connection (the socket timeout fails the test)."""
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _error_of(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


@pytest.fixture
def slow_server(server_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:  # noqa: F811
    env = {**server_env, "RETENTION_REQUEST_TIMEOUT_S": "2", "RETENTION_MAX_CONNECTIONS": "400"}
    s = Server(env, tmp_path / "data")
    s.wait_ready()
    yield s
    s.stop()


def test_requests_that_never_finish_are_closed_after_the_timeout_and_health_still_answers(
    slow_server: Server, pki: Any
) -> None:
    """300 connections: silent, half a request line, half the headers, headers with half a body."""
    port = slow_server.port
    body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")
    head = (b"POST /retention/message HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
    openings = [b"", b"POST /retention/mes", head[:60], head + body[: len(body) // 2]]
    attack = [_open(port, openings[i % 4]) for i in range(300)]
    try:
        with httpx.Client(base_url=slow_server.base, timeout=10) as http:
            for _ in range(5):  # during the attack, before any timeout
                assert http.get("/health").status_code == 200
            # a slow client that finishes in time is answered as usual
            s = _open(port, head)
            time.sleep(0.5)
            s.sendall(body)
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            s.close()
            for s in attack:  # each is answered 408 (or, silent, closed) and closed by the server
                raw = _read_to_close(s)
                assert _error_of(raw) == (408, "request_timeout"), raw[:300]
            assert http.get("/health").status_code == 200
    finally:
        for s in attack:
            s.close()


def test_a_request_trickling_in_byte_by_byte_is_closed_after_the_timeout(slow_server: Server) -> None:
    """A byte every 0.3 s keeps no connection open past the request timeout (2 s here; 30 s of bytes to send)."""
    s = _open(slow_server.port, b"")
    try:
        for ch in b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 70:
            if select.select([s], [], [], 0.3)[0]:  # the server answered, then closes
                break
            try:
                s.sendall(bytes([ch]))
            except OSError:
                break
        else:
            raise AssertionError("the trickling request was still open after 30 s")
        assert _error_of(_read_to_close(s)) == (408, "request_timeout")
    finally:
        s.close()


def test_a_later_request_on_a_kept_alive_connection_gets_the_same_timeout(slow_server: Server) -> None:
    """After one answered request, half of a second one on the same connection is closed after the timeout."""
    s = _open(slow_server.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    try:
        first = b""
        while b"alive" not in first:
            chunk = s.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        assert _error_of(_read_to_close(s)) == (408, "request_timeout")
    finally:
        s.close()


def test_connections_beyond_the_cap_are_refused_at_once_and_health_answers_again_after(
    server_env: dict[str, str], tmp_path: Path  # noqa: F811
) -> None:
    env = {**server_env, "RETENTION_REQUEST_TIMEOUT_S": "30", "RETENTION_MAX_CONNECTIONS": "20"}
    server = Server(env, tmp_path / "data")
    try:
        server.wait_ready()
        held = [_open(server.port, b"GET /health HTTP/1.1\r\n") for _ in range(20)]
        time.sleep(0.5)
        extra = _open(server.port, b"")
        assert _error_of(_read_to_close(extra)) == (503, "too_many_connections")
        extra.close()
        for s in held:
            s.close()
        for _ in range(50):
            try:
                if httpx.get(server.base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("/health never answered once the held connections were gone")
    finally:
        server.stop()


def _refused_count(base: str, code: str, **kw: Any) -> float:
    text = httpx.get(base + "/metrics", timeout=10, **kw).text
    m = re.search(rf'^retention_connections_refused_total\{{code="{code}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_refused_client_reads_the_whole_answer_even_with_its_request_unread(
    server_env: dict[str, str], tmp_path: Path  # noqa: F811
) -> None:
    """Beyond the cap, a client that already sent a large request still reads the 503 (no reset over it); bytes
    that are not HTTP get a JSON 400; every refusal is counted on /metrics by code, and the log says so in one
    rate-limited line per code, not one per connection."""
    env = {**server_env, "RETENTION_REQUEST_TIMEOUT_S": "30", "RETENTION_MAX_CONNECTIONS": "5"}
    server = Server(env, tmp_path / "data")
    try:
        server.wait_ready()
        held = [_open(server.port, b"GET /health HTTP/1.1\r\n") for _ in range(5)]
        time.sleep(0.5)
        upload = b"POST /retention/message HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\n\r\n" + b"x" * 2_000_000
        for _ in range(20):
            extra = _open(server.port, b"")
            try:
                extra.sendall(upload)  # the server reads and drops it after answering
                assert _error_of(_read_to_close(extra)) == (503, "too_many_connections")
            finally:
                extra.close()
        for s in held:
            s.close()
        for _ in range(50):
            try:
                if httpx.get(server.base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert _refused_count(server.base, "too_many_connections") == 20
        for _ in range(20):  # bytes that are not HTTP: a JSON 400, counted, and no warning line each
            garbage = _open(server.port, b"\x16\x03\x01 not http\r\n\r\n")
            try:
                assert _error_of(_read_to_close(garbage)) == (400, "malformed_request")
            finally:
                garbage.close()
        assert _refused_count(server.base, "malformed_request") == 20
    finally:
        server.stop()
    assert server.proc.stdout is not None
    log = server.proc.stdout.read().decode()
    assert 1 <= log.count("too_many_connections") <= 2, log
    assert 1 <= log.count("malformed_request") <= 2 and "Invalid HTTP request" not in log, log


def test_huge_headers_and_urls_are_refused_before_they_are_read_whole(slow_server: Server) -> None:
    """A 40 MB header is answered 431 after the first 16 KiB or so, a 10 KB URL 414; the server keeps answering."""
    s = _open(slow_server.port, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: ")
    try:
        sent = 0
        try:
            while sent < 40_000_000 and not select.select([s], [], [], 0)[0]:
                s.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        assert sent < 40_000_000  # answered before the header was sent whole
        assert _error_of(_read_to_close(s)) == (431, "request_header_fields_too_large")
    finally:
        s.close()
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 100) for i in range(200))  # 20 KB in 200 ordinary headers
    s = _open(slow_server.port, b"GET /health HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    try:
        assert _error_of(_read_to_close(s)) == (431, "request_header_fields_too_large")
    finally:
        s.close()
    s = _open(slow_server.port, b"GET /health?q=" + b"a" * 10_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    try:
        assert _error_of(_read_to_close(s)) == (414, "uri_too_long")
    finally:
        s.close()
    with httpx.Client(base_url=slow_server.base, timeout=10) as http:
        ok = http.get("/health", headers={"x-fine": "v" * 8000})  # within the limit: answered as usual
        assert ok.status_code == 200
        assert _refused_count(slow_server.base, "request_header_fields_too_large") == 2
        assert _refused_count(slow_server.base, "uri_too_long") == 1


def test_tls_connections_are_timed_and_counted_from_their_accept(
    server_env: dict[str, str], tmp_path: Path  # noqa: F811
) -> None:
    """With TLS, silent connections and half a ClientHello are closed after the request timeout (not the 60 s TLS
    handshake default) and count towards the cap: 30 of them with a cap of 10 leave /health refused until they go."""
    cert, key = _self_signed(tmp_path)
    env = {**server_env, "RETENTION_SSL_CERTFILE": str(cert), "RETENTION_SSL_KEYFILE": str(key),
           "RETENTION_REQUEST_TIMEOUT_S": "2", "RETENTION_MAX_CONNECTIONS": "10"}
    server = Server(env, tmp_path / "data", scheme="https")
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        server.wait_ready(verify=ctx)
        outgoing = ssl.MemoryBIO()
        hello = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            hello.do_handshake()
        client_hello = outgoing.read()
        assert len(client_hello) > 100
        half_open = [_open(server.port, client_hello[: len(client_hello) // 2] if i % 2 else b"") for i in range(30)]
        try:
            time.sleep(0.5)
            with pytest.raises(httpx.HTTPError):  # over the cap: refused before its handshake
                httpx.get(server.base + "/health", verify=ctx, timeout=5)
            for s in half_open:  # closed by the server after the 2 s timeout (the socket timeout is 30 s)
                s.settimeout(15)  # a TimeoutError fails the test
                with contextlib.suppress(ConnectionResetError):  # closed with part of a ClientHello unread
                    _read_to_close(s)
        finally:
            for s in half_open:
                s.close()
        assert httpx.get(server.base + "/health", verify=ctx, timeout=5).status_code == 200
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # a handshake, then nothing: 408
            tls.settimeout(15)
            assert _error_of(_read_to_close(tls)) == (408, "request_timeout")
        assert _refused_count(server.base, "too_many_connections", verify=ctx) >= 1
    finally:
        server.stop()


class InstalledServer(Server):
    """``retention serve`` started as users start it (the installed command), from the folder `cwd`."""

    def __init__(self, env: dict[str, str], data_dir: Path, cwd: Path) -> None:
        self.port = int(env["RETENTION_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.proc = subprocess.Popen([RETENTION, "serve"], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


DECOY = '''\
import pathlib
pathlib.Path({mark!r}).write_text("decoy {what} ran")
raise SystemExit(3)
'''


def test_two_workers_started_from_a_folder_of_decoys_run_only_our_code(
    server_env: dict[str, str], tmp_path: Path, pki: Any  # noqa: F811
) -> None:
    """uvicorn's workers ignore a multiprocessing/ and a serving/ in the working directory (each decoy would
    leave a mark and exit); the workers keep the request limits."""
    cwd = tmp_path / "cwd"
    for package, modules in (("multiprocessing", ("__init__", "spawn")), ("serving", ("__init__", "server", "log_writer"))):
        (cwd / package).mkdir(parents=True)
        for m in modules:
            (cwd / package / f"{m}.py").write_text(DECOY.format(mark=str(tmp_path / f"mark-{package}-{m}"), what=m))
    env = {**server_env, "RETENTION_WORKERS": "2", "RETENTION_DATA_DIR": str(tmp_path / "data"),
           "RETENTION_REQUEST_TIMEOUT_S": "2"}
    env.pop("PYTHONSAFEPATH", None)
    server = InstalledServer(env, tmp_path / "data", cwd)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base) as http:
            for _ in range(8):
                r = http.post("/retention/message", content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
                assert r.status_code == 200, r.text
            head, payload, sig = pki.signed_request(app_apple_id=APP_ID, environment="Sandbox").split(".")
            sig = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
            r = http.post("/retention/message", content=json.dumps({"signedPayload": f"{head}.{payload}.{sig}"}))
            assert r.status_code == 401 and r.json()["error"] == "bad_signature"
        silent = _open(server.port, b"")  # the workers have the request timeout too
        assert _error_of(_read_to_close(silent)) == (408, "request_timeout")
        silent.close()
    finally:
        server.stop()
    assert len(logged_rows(tmp_path / "data")) == 8  # the real writers wrote every answer
    assert sorted(p.name for p in tmp_path.glob("mark-*")) == []
    assert os.path.isdir(cwd / "serving")
