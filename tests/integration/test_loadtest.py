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


def test_a_wrong_ca_fails_with_apples_reason(server: Server, tmp_path: Path, capsys) -> None:  # noqa: F811
    argv = [server.base + "/retention/message", "--ca", str(tmp_path / "other-ca"), "--concurrency", "4",
            "--total", "20", "--threshold-ms", "30000"]
    assert loadtest.main(argv) == 1
    captured = capsys.readouterr()
    assert "minted a new test CA" in captured.err
    assert "failures: UNSUCCESSFUL_HTTP_RESPONSE_CODE 20" in captured.out and captured.out.rstrip().endswith("FAIL")


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
    ((200, json.dumps({"message": {"messageIdentifier": "x"}, "promotionalOffer": {}}).encode()), "INVALID_RESPONSE"),
    ((200, b"not json"), "INVALID_RESPONSE"),
    ((503, b"{}"), "UNSUCCESSFUL_HTTP_RESPONSE_CODE"),
    ((0, b""), "TIMED_OUT"),
])
def test_failure_reasons_are_apples(canned: Any, pki_dir: Path, answer: tuple[int, bytes], reason: str, capsys,
                                    monkeypatch) -> None:
    monkeypatch.setattr(Canned, "answer", answer)
    url = f"http://127.0.0.1:{canned.server_address[1]}/retention/message"
    threshold = "200" if answer[0] == 0 else "30000"
    assert loadtest.main([url, "--ca", str(pki_dir), "--concurrency", "3", "--total", "6", "--threshold-ms", threshold]) == 1
    out = capsys.readouterr().out
    assert f"failures: {reason} 6" in out and "successRate: 0.00% (0 of 6)" in out


def test_a_valid_answer_is_a_success(canned: Any, pki_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Canned, "answer", (200, b'{"message":{"messageIdentifier":"9eebaa90-da9b-5666-9499-ef0f5eb99be0"}}'))
    url = f"http://127.0.0.1:{canned.server_address[1]}/m"
    assert loadtest.main([url, "--ca", str(pki_dir), "--concurrency", "2", "--total", "5", "--threshold-ms", "30000",
                          "--success-rate", "100"]) == 0


def test_bad_usage_is_one_line(pki_dir: Path, capsys) -> None:
    assert loadtest.main(["ftp://x", "--ca", str(pki_dir)]) == 2
    assert loadtest.main(["http://x", "--ca", str(pki_dir), "--success-rate", "101"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("retention loadtest: ") for line in err)


def test_nearest_rank_percentiles() -> None:
    r = loadtest.LoadTestResult(loadtest.LoadTestConfig(), "t", latencies_ms=[float(i) for i in range(1, 101)])
    assert (r.percentile(50), r.percentile(99), r.percentile(100)) == (50.0, 99.0, 100.0)
