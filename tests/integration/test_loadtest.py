"""``retention loadtest``: Apple's test shape against a real ``retention serve``, and each failure reason."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serving import loadtest
from tests.conftest import APP_ID
from tests.integration.test_server import Server, logged_rows, server, server_env  # noqa: F401  (fixtures)


def test_loadtest_passes_against_the_endpoint_and_every_request_was_fresh(server: Server, pki_dir: Path, capsys) -> None:  # noqa: F811
    argv = [server.base + "/retention/message", "--ca", str(pki_dir), "--concurrency", "8", "--total", "120",
            "--threshold-ms", "30000", "--success-rate", "100", "--app-apple-id", str(APP_ID)]
    assert loadtest.main(argv) == 0
    out = capsys.readouterr().out
    assert "successRate: 100.00% (120 of 120)" in out and "failures: none" in out and out.rstrip().endswith("PASS")
    for key in ("maxConcurrentRequests 8", "totalRequests 120", "responseTimeThreshold 30000 ms", "p50", "p99"):
        assert key in out
    server.stop()
    rows = logged_rows(server.data_dir)
    assert len(rows) == 120  # each request was signed afresh: none refused as a replay


def test_a_new_ca_sends_nothing_and_an_untrusted_one_fails_saying_what_to_configure(
        server: Server, tmp_path: Path, capsys) -> None:  # noqa: F811
    argv = [server.base + "/retention/message", "--ca", str(tmp_path / "other-ca"), "--concurrency", "4",
            "--total", "20", "--threshold-ms", "30000", "--app-apple-id", str(APP_ID)]
    assert loadtest.main(argv) == 2  # minted: the endpoint cannot trust it yet, so no request is sent
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "minted a new test CA" in err[0] and "RETENTION_ROOT_CERTS" in err[0]
    assert captured.out == ""
    assert loadtest.main(argv) == 1  # the CA exists now; the endpoint still does not trust it
    out = capsys.readouterr().out
    assert "failures: UNSUCCESSFUL_HTTP_RESPONSE_CODE 20 (HTTP 401 untrusted_chain 20)" in out
    assert "hint: the endpoint does not trust the test CA" in out and out.rstrip().endswith("FAIL")


def test_a_wrong_environment_is_named_in_the_failure_summary(server: Server, pki_dir: Path, capsys) -> None:  # noqa: F811
    argv = [server.base + "/retention/message", "--ca", str(pki_dir), "--concurrency", "2", "--total", "4",
            "--threshold-ms", "30000", "--app-apple-id", str(APP_ID), "--environment", "Production"]
    assert loadtest.main(argv) == 1  # the test server serves Sandbox
    out = capsys.readouterr().out
    assert "(HTTP 403 wrong_environment 4)" in out and "hint: the endpoint serves the other environment" in out


class Canned(BaseHTTPRequestHandler):
    answer: tuple[int, bytes] = (200, b"{}")
    hang = threading.Event()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.answer[0] == 0:
            self.hang.wait(5)  # never answers within the threshold
            return
        status, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def canned() -> Iterator[Any]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    Canned.hang.set()
    srv.shutdown()
    srv.server_close()
    Canned.hang.clear()


@pytest.mark.parametrize(("answer", "reason"), [
    ((200, json.dumps({"message": {"messageIdentifier": "x"}, "promotionalOffer": {}}).encode()), "INVALID_RESPONSE 6"),
    ((200, b"not json"), "INVALID_RESPONSE 6"),
    ((503, b"{}"), "UNSUCCESSFUL_HTTP_RESPONSE_CODE 6 (HTTP 503 6)"),
    ((0, b""), "TIMED_OUT 6"),
])
def test_failure_reasons_are_apples(canned: Any, pki_dir: Path, answer: tuple[int, bytes], reason: str, capsys,
                                    monkeypatch) -> None:
    monkeypatch.setattr(Canned, "answer", answer)
    url = f"http://127.0.0.1:{canned.server_address[1]}/retention/message"
    threshold = "200" if answer[0] == 0 else "30000"
    assert loadtest.main([url, "--ca", str(pki_dir), "--concurrency", "3", "--total", "6", "--threshold-ms", threshold]) == 1
    out = capsys.readouterr().out
    assert f"failures: {reason}\n" in out and "successRate: 0.00% (0 of 6)" in out


def test_a_valid_answer_is_a_success(canned: Any, pki_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Canned, "answer", (200, b'{"message":{"messageIdentifier":"9eebaa90-da9b-5666-9499-ef0f5eb99be0"}}'))
    url = f"http://127.0.0.1:{canned.server_address[1]}/m"
    assert loadtest.main([url, "--ca", str(pki_dir), "--concurrency", "2", "--total", "5", "--threshold-ms", "30000",
                          "--success-rate", "100"]) == 0


def test_bad_usage_is_one_line(pki_dir: Path, tmp_path: Path, capsys) -> None:
    assert loadtest.main(["ftp://x", "--ca", str(pki_dir)]) == 2
    assert loadtest.main(["http://x", "--ca", str(pki_dir), "--success-rate", "101"]) == 2
    assert loadtest.main(["http://x", "--ca", str(pki_dir), "--success-rate", "0.999"]) == 2  # a fraction, not 99.9%
    a_file = tmp_path / "root.pem"
    a_file.write_text("x")
    assert loadtest.main(["http://x", "--ca", str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("retention loadtest: ") for line in err)
    assert "for 99.9% give 99.9" in err[2] and "is a file" in err[3] and "Errno" not in err[3]


def test_timed_out_requests_are_in_the_response_times(canned: Any, pki_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Canned, "answer", (0, b""))
    url = f"http://127.0.0.1:{canned.server_address[1]}/m"
    assert loadtest.main([url, "--ca", str(pki_dir), "--concurrency", "2", "--total", "4", "--threshold-ms", "100"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("responseTimes"))
    p50 = float(line.split("p50 ", 1)[1].split(",", 1)[0])
    assert p50 >= 100 and "timed-out requests counted at the threshold" in line


def test_nothing_answering_prints_no_nan_and_no_throughput(pki_dir: Path, capsys) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    assert loadtest.main([f"http://127.0.0.1:{port}/m", "--ca", str(pki_dir), "--concurrency", "2", "--total", "4"]) == 1
    out = capsys.readouterr().out
    assert "nan" not in out and "responseTimes (ms): none" in out and "throughput: none" in out
    assert "requests/s" not in out and "failures: SOCKET_ISSUE 4" in out


def test_the_tls_context_is_built_once_per_run(canned: Any, pki_dir: Path, capsys, monkeypatch) -> None:
    import ssl

    made: list[int] = []
    real = ssl.create_default_context

    def counting(*a: Any, **kw: Any) -> ssl.SSLContext:
        made.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(loadtest.ssl, "create_default_context", counting)
    url = f"https://127.0.0.1:{canned.server_address[1]}/m"  # a plain-HTTP server: every handshake fails
    assert loadtest.main([url, "--ca", str(pki_dir), "--concurrency", "5", "--total", "10", "--insecure",
                          "--threshold-ms", "5000"]) == 1
    assert len(made) == 1  # not one per connection (each costs tens of ms on the event loop)
    assert "TIMED_OUT" not in capsys.readouterr().out


def test_nearest_rank_percentiles() -> None:
    r = loadtest.LoadTestResult(loadtest.LoadTestConfig(), "t", latencies_ms=[float(i) for i in range(1, 101)])
    assert (r.percentile(50), r.percentile(99), r.percentile(100)) == (50.0, 99.0, 100.0)
