"""``retention notifications backfill`` against a loopback server shaped like Apple's Get Notification History."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import retention
from serving.log_reader import log_files, read_outcomes
from serving.log_writer import DecisionLog, log_file_name
from serving.testpki import TestPKI
from tests.conftest import APP_ID
from tests.unit.test_notifications import notification_payload

KEY_ID, ISSUER_ID, BUNDLE_ID = "KEY1234567", "57246542-96fe-1a63-e053-0824d011072a", "com.example.app"


class HistoryServer:
    """Apple's ``POST /inApps/v1/notifications/history``: bearer token checked, pages of signed payloads.

    Pages follow Apple's shape: ``notificationHistory`` (``signedPayload``, ``sendAttempts``),
    ``hasMore``, ``paginationToken``; a token that does not verify with the key is a 401.
    https://developer.apple.com/documentation/appstoreserverapi/get-notification-history
    """

    def __init__(self, public_key: ec.EllipticCurvePublicKey, pages: list[list[str]]) -> None:
        self.public_key, self.pages, self.log = public_key, pages, []  # type: list[tuple[str, str, int]]
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                status, answer = owner.answer(self.path, self.headers.get("Authorization", ""), body)
                owner.log.append(("POST", self.path, status))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            claims = jwt.decode(auth.removeprefix("Bearer "), self.public_key, algorithms=["ES256"],
                                audience="appstoreconnect-v1", issuer=ISSUER_ID)
        except jwt.PyJWTError:
            return 401, {"errorCode": 4010000, "errorMessage": "Unauthenticated"}
        if claims.get("bid") != BUNDLE_ID:
            return 401, {"errorCode": 4010000, "errorMessage": "Unauthenticated"}
        if not path.startswith("/inApps/v1/notifications/history"):
            return 404, {"errorCode": 4040000, "errorMessage": "Not found"}
        if not isinstance(body.get("startDate"), int) or not isinstance(body.get("endDate"), int):
            return 400, {"errorCode": 4000000, "errorMessage": "startDate and endDate are required"}
        page = int(path.split("paginationToken=")[1]) if "paginationToken=" in path else 0
        more = page + 1 < len(self.pages)
        out: dict[str, Any] = {
            "notificationHistory": [{"signedPayload": p, "sendAttempts": [
                {"attemptDate": 1, "sendAttemptResult": "UNSUCCESSFUL_HTTP_RESPONSE_CODE"}]} for p in self.pages[page]],
            "hasMore": more,
        }
        if more:
            out["paginationToken"] = str(page + 1)
        return 200, out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key_file(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())  # a test In-App Purchase key, made now, never committed
    path = tmp_path / "SubscriptionKey_TEST.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key


def _signed(pki: TestPKI, ntype: str, subtype: str | None = None, **kw: Any) -> tuple[str, str]:
    nid = str(uuid.uuid4())
    return nid, pki.sign(notification_payload(pki, ntype, subtype, notification_uuid=nid, **kw))


@pytest.fixture
def history(pki: TestPKI, key_file: tuple[Path, ec.EllipticCurvePrivateKey]) -> Iterator[tuple[HistoryServer, dict[str, str]]]:
    ids: dict[str, str] = {}
    ids["cancel"], cancel = _signed(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid="2000000701")
    ids["stored"], stored = _signed(pki, "DID_RENEW", otid="2000000702")
    ids["test"], test = _signed(pki, "TEST")
    ids["stranger"], stranger = _signed(TestPKI.mint(), "DID_RENEW", otid="2000000703")
    ids["apple_offer"], apple_offer = _signed(
        pki, "OFFER_REDEEMED", otid="2000000704",
        transaction_extra={"offerType": 5, "offerIdentifier": "apple-retention-1", "offerDiscountType": "FREE_TRIAL"})
    ids["expired"], expired = _signed(pki, "EXPIRED", "BILLING_RETRY", otid="2000000705")
    server = HistoryServer(key_file[1].public_key(), [[cancel, stored, test], [stranger, apple_offer], [expired]])
    yield server, ids
    server.close()


def _args(settings: Any, key: Path, *extra: str) -> list[str]:
    return ["notifications", "backfill", "--since", "2026-01-01T00:00:00Z", "--key-file", str(key), "--key-id", KEY_ID,
            "--issuer-id", ISSUER_ID, "--bundle-id", BUNDLE_ID, "--environment", "Sandbox",
            "--data-dir", settings.data_dir, "--root-certs", ",".join(settings.root_certs),
            "--app-apple-id", str(APP_ID), *extra]


def test_backfill_records_what_is_missing_once(
    history: tuple[HistoryServer, dict[str, str]], key_file: tuple[Path, Any], make_settings: Any,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    server, ids = history
    monkeypatch.setenv("RETENTION_APPLE_API_URL", server.url)  # Apple's base URL replaced by the loopback server
    settings = make_settings()
    data = Path(settings.data_dir)
    # the server already stored one of them before its outage
    dlog = DecisionLog(data / log_file_name("server-1"))
    dlog.start()
    dlog.log_outcome(ids["stored"], "2000000702", "renewed", 5, "DID_RENEW", None)
    dlog.close()

    assert retention.main(_args(settings, key_file[0])) == 0
    out = capsys.readouterr()
    assert "read 6 notifications: 3 recorded, 1 already recorded, 1 without an outcome, 1 refused, 1 untrusted_chain" in out.out
    assert "backfill" not in out.err  # no progress bar when stderr is not a terminal
    assert [p for _, p, _ in server.log] == ["/inApps/v1/notifications/history",
                                             "/inApps/v1/notifications/history?paginationToken=1",
                                             "/inApps/v1/notifications/history?paginationToken=2"]
    rows = {o["notification_uuid"]: o for o in read_outcomes(log_files(data))}
    assert set(rows) == {ids["stored"], ids["cancel"], ids["apple_offer"], ids["expired"]}
    assert rows[ids["cancel"]]["event"] == "cancelled"
    assert (rows[ids["apple_offer"]]["event"], rows[ids["apple_offer"]]["offer_type"]) == ("offer_redeemed", 5)
    assert (rows[ids["expired"]]["event"], rows[ids["expired"]]["raw_subtype"]) == ("expired_involuntary", "BILLING_RETRY")

    # again: nothing new, nothing written twice
    assert retention.main(_args(settings, key_file[0])) == 0
    assert "0 recorded, 4 already recorded" in capsys.readouterr().out
    total = 0
    import sqlite3

    for path in log_files(data):
        with sqlite3.connect(path) as conn:
            total += conn.execute("SELECT count(*) FROM outcomes").fetchone()[0]
        conn.close()
    assert total == 4


def test_apple_refusing_the_token_is_one_line(
    history: tuple[HistoryServer, dict[str, str]], make_settings: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = history
    monkeypatch.setenv("RETENTION_APPLE_API_URL", server.url)
    other = ec.generate_private_key(ec.SECP256R1())
    wrong = tmp_path / "wrong.p8"
    wrong.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    assert retention.main(_args(make_settings(), wrong, "--create-data-dir")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--until", "2025-01-01"], "--since must be before --until"),
    (["--until", "yesterday"], "neither milliseconds since 1970 nor an ISO 8601 date"),
])
def test_bad_times_are_one_line(
    key_file: tuple[Path, Any], make_settings: Any, capsys: pytest.CaptureFixture[str], extra: list[str], message: str,
) -> None:
    assert retention.main(_args(make_settings(), key_file[0], *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_data_folder_that_does_not_exist_or_holds_no_log_is_refused(
    key_file: tuple[Path, Any], make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    for folder, why in ((tmp_path / "mistyped" / "dir", "does not exist"), (tmp_path, "holds no decision log")):
        args = _args(settings, key_file[0])
        args[args.index("--data-dir") + 1] = str(folder)
        assert retention.main(args) == 2  # refused before Apple is asked anything
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and "--create-data-dir" in err[0]
    assert not (tmp_path / "mistyped").exists() and not log_files(tmp_path)


def test_create_data_dir_records_into_a_new_folder(
    history: tuple[HistoryServer, dict[str, str]], key_file: tuple[Path, Any], make_settings: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = history
    monkeypatch.setenv("RETENTION_APPLE_API_URL", server.url)
    args = _args(make_settings(), key_file[0], "--create-data-dir")
    args[args.index("--data-dir") + 1] = str(tmp_path / "new")
    assert retention.main(args) == 0
    assert "4 recorded" in capsys.readouterr().out and len(read_outcomes(log_files(tmp_path / "new"))) == 4


def test_the_progress_bar_shows_when_asked_for_a_terminal(
    history: tuple[HistoryServer, dict[str, str]], key_file: tuple[Path, Any], make_settings: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from retention import parse_time
    from serving.apple_api import make_client
    from serving.notifications_cli import backfill

    server, _ = history
    client = make_client(key_file[0], KEY_ID, ISSUER_ID, BUNDLE_ID, "Sandbox", base_url=server.url)
    result = backfill(client, make_settings(), parse_time("2026-01-01"), parse_time("2026-12-31"), progress=True)
    assert (result.read, result.recorded) == (6, 4)
    assert "backfill" in capsys.readouterr().err
