"""``POST /apple/notifications``: App Store Server Notifications V2 recorded as outcome events, in-process."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from serving.log_reader import export_outcomes, log_files, read_outcomes
from serving.testpki import TestPKI
from tests.conftest import APP_ID

URL = "/apple/notifications"
PM = "com.example.premium.monthly"
DAY_MS = 86_400_000


def now_ms() -> int:
    return int(time.time() * 1000)


def notification_payload(
    pki: TestPKI,
    notification_type: str,
    subtype: str | None = None,
    *,
    otid: str = "2000000111",
    notification_uuid: str | None = None,
    signed_ms: int | None = None,
    environment: str = "Sandbox",
    app_apple_id: int | None = APP_ID,
    transaction: bool = True,
    renewal: bool = True,
    nested_pki: TestPKI | None = None,
    transaction_extra: dict[str, Any] | None = None,
    renewal_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a decoded notification V2 payload whose nested JWS are signed by `nested_pki` (default `pki`)."""
    signed = now_ms() if signed_ms is None else signed_ms
    inner = nested_pki or pki
    data: dict[str, Any] = {"environment": environment, "bundleId": "com.example.app", "bundleVersion": "1",
                            "status": 1}
    if app_apple_id is not None:
        data["appAppleId"] = app_apple_id
    if transaction:
        data["signedTransactionInfo"] = inner.sign({
            "originalTransactionId": otid, "transactionId": otid + "9", "productId": PM, "bundleId": "com.example.app",
            "purchaseDate": signed - 30 * DAY_MS, "expiresDate": signed + DAY_MS, "type": "Auto-Renewable Subscription",
            "environment": environment, "signedDate": signed, **(transaction_extra or {}),
        })
    if renewal:
        data["signedRenewalInfo"] = inner.sign({
            "originalTransactionId": otid, "autoRenewProductId": PM, "productId": PM,
            "autoRenewStatus": 0 if subtype == "AUTO_RENEW_DISABLED" else 1, "environment": environment,
            "signedDate": signed, **(renewal_extra or {}),
        })
    payload: dict[str, Any] = {
        "notificationType": notification_type,
        "notificationUUID": notification_uuid or str(uuid.uuid4()),
        "data": data,
        "version": "2.0",
        "signedDate": signed,
    }
    if subtype is not None:
        payload["subtype"] = subtype
    return payload


def body_of(pki: TestPKI, payload: dict[str, Any]) -> bytes:
    return json.dumps({"signedPayload": pki.sign(payload)}).encode()


def notification_body(pki: TestPKI, notification_type: str, subtype: str | None = None, **kw: Any) -> bytes:
    """Return the POST body Apple sends for one notification."""
    return body_of(pki, notification_payload(pki, notification_type, subtype, **kw))



def send(client: TestClient[Any], body: bytes) -> Any:
    return client.post(URL, content=body, headers={"content-type": "application/json"})


def outcomes(client: TestClient[Any]) -> list[dict[str, Any]]:
    """Return the outcomes the service recorded so far (after the background writer's flush)."""
    svc = client.app.state.service
    svc.decision_log.flush()
    return read_outcomes(svc.decision_log.path)


def stored_rows(client: TestClient[Any]) -> int:
    """Return the number of rows in the log file's outcomes table (not deduplicated by the reader)."""
    svc = client.app.state.service
    svc.decision_log.flush()
    with sqlite3.connect(svc.decision_log.path) as conn:
        return int(conn.execute("SELECT count(*) FROM outcomes").fetchone()[0])


# ---- the mapping ---------------------------------------------------------------------------------------
# Every notificationType and subtype Apple documents that tells something about a subscriber, with its event
# (https://developer.apple.com/documentation/appstoreservernotifications/notificationtype and .../subtype).
MAPPING: list[tuple[str, str | None, str]] = [
    ("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", "cancelled"),
    ("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_ENABLED", "reenabled"),
    ("DID_RENEW", None, "renewed"),
    ("DID_RENEW", "BILLING_RECOVERY", "renewed"),
    ("EXPIRED", "VOLUNTARY", "expired"),
    ("EXPIRED", "BILLING_RETRY", "expired_involuntary"),
    ("EXPIRED", "PRICE_INCREASE", "expired_involuntary"),
    ("EXPIRED", "PRODUCT_NOT_FOR_SALE", "expired_involuntary"),
    ("DID_FAIL_TO_RENEW", None, "billing_failed"),
    ("DID_FAIL_TO_RENEW", "GRACE_PERIOD", "billing_failed"),
    ("GRACE_PERIOD_EXPIRED", None, "grace_expired"),
    ("DID_CHANGE_RENEWAL_PREF", "UPGRADE", "upgraded"),
    ("DID_CHANGE_RENEWAL_PREF", "DOWNGRADE", "downgraded"),
    ("DID_CHANGE_RENEWAL_PREF", None, "downgrade_reverted"),  # a pending downgrade undone: not a switch
    ("SUBSCRIBED", "INITIAL_BUY", "subscribed"),
    ("SUBSCRIBED", "RESUBSCRIBE", "resubscribed"),
    ("OFFER_REDEEMED", None, "offer_redeemed"),
    ("OFFER_REDEEMED", "UPGRADE", "offer_redeemed"),
    ("OFFER_REDEEMED", "DOWNGRADE", "offer_redeemed"),
    ("REFUND", None, "refunded"),
    ("REFUND_REVERSED", None, "refund_reversed"),
    # stored raw, read by no label: Family Sharing withdrawn is not churn; the rest tell nothing about staying
    ("REVOKE", None, "other"),
    ("CONSUMPTION_REQUEST", None, "other"),
    ("PRICE_INCREASE", "PENDING", "other"),
    ("DID_CHANGE_RENEWAL_STATUS", None, "other"),
    ("DID_CHANGE_RENEWAL_STATUS", "SOMETHING_NEW", "other"),
    ("EXPIRED", "A_SUBTYPE_APPLE_ADDS_LATER", "other"),
    ("A_TYPE_APPLE_ADDS_NEXT_YEAR", None, "other"),
    # an unknown subtype of a type whose known subtypes all mean one event is still unknown: not counted
    ("DID_RENEW", "NEW_SUBTYPE", "other"),
    ("OFFER_REDEEMED", "NEW_SUBTYPE", "other"),
    ("REFUND", "NEW_SUBTYPE", "other"),
    ("OFFER_REDEEMED", "INITIAL_BUY", "offer_redeemed"),
    ("OFFER_REDEEMED", "RESUBSCRIBE", "offer_redeemed"),
]


@pytest.mark.parametrize(("ntype", "subtype", "event"), MAPPING)
def test_each_outcome_notification_records_its_event(
    client_for: Any, pki: TestPKI, ntype: str, subtype: str | None, event: str
) -> None:
    c = client_for()
    signed = now_ms() - 1234
    nid = str(uuid.uuid4())
    r = send(c, notification_body(pki, ntype, subtype, otid="2000000777", notification_uuid=nid, signed_ms=signed))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "recorded"}
    rows = outcomes(c)
    assert len(rows) == 1
    row = rows[0]
    assert (row["original_transaction_id"], row["event"], row["at"]) == ("2000000777", event, signed)
    assert (row["notification_uuid"], row["raw_type"], row["raw_subtype"]) == (nid, ntype, subtype)


def test_the_renewal_info_alone_names_the_subscription(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    r = send(c, notification_body(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid="2000000555",
                                  transaction=False))
    assert r.status_code == 200 and r.json() == {"status": "recorded"}
    assert [(o["original_transaction_id"], o["event"]) for o in outcomes(c)] == [("2000000555", "cancelled")]


def test_a_test_notification_is_acknowledged_and_recorded_nowhere(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    r = send(c, notification_body(pki, "TEST"))
    assert r.status_code == 200 and r.json() == {"status": "ignored"}
    assert stored_rows(c) == 0


def test_a_mapped_type_without_transaction_info_is_acknowledged_and_ignored(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    r = send(c, notification_body(pki, "DID_RENEW", transaction=False, renewal=False))
    assert r.status_code == 200 and r.json() == {"status": "ignored"}
    assert stored_rows(c) == 0


# ---- idempotency --------------------------------------------------------------------------------------
def test_a_retry_with_the_same_uuid_is_stored_once(client_for: Any, pki: TestPKI, tmp_path: Path) -> None:
    c = client_for()
    nid = str(uuid.uuid4())
    first = notification_body(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid="2000000888",
                              notification_uuid=nid)
    for _ in range(3):  # Apple resends the very same body when it saw no 2xx
        r = send(c, first)
        assert r.status_code == 200 and r.json() == {"status": "recorded"}
    # a re-signed copy (new signature, later signedDate) with the same notificationUUID is the same notification
    again = notification_body(pki, "DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED", otid="2000000888",
                              notification_uuid=nid, signed_ms=now_ms() + 500)
    assert send(c, again).status_code == 200
    other = notification_body(pki, "DID_RENEW", otid="2000000888")
    assert send(c, other).status_code == 200
    assert stored_rows(c) == 2
    assert sorted(o["event"] for o in outcomes(c)) == ["cancelled", "renewed"]
    svc = c.app.state.service
    assert export_outcomes(log_files(Path(svc.settings.data_dir)), tmp_path / "outcomes.parquet") == 2


def test_an_acknowledged_notification_is_already_on_disk(client_for: Any, pki: TestPKI) -> None:
    """A 200 tells Apple to stop retrying, so the outcome must be committed before the answer leaves."""
    c = client_for(log_batch_ms=5000.0)  # a writer that would otherwise wait 5 s before its next batch
    t0 = time.perf_counter()
    r = send(c, notification_body(pki, "DID_RENEW", otid="2000000999"))
    assert r.status_code == 200
    assert time.perf_counter() - t0 < 2.0
    svc = c.app.state.service
    with sqlite3.connect(svc.decision_log.path) as conn:  # read the file directly: no flush
        assert conn.execute("SELECT original_transaction_id, event FROM outcomes").fetchall() == [("2000000999", "renewed")]


# ---- dates: no freshness window, validity at signedDate --------------------------------------------------
@pytest.fixture(scope="module")
def old_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestPKI, Path]:
    """Return a test CA valid from 60 days ago whose leaf expired 10 days ago, and its root.pem."""
    now = datetime.now(UTC)
    pki = TestPKI.mint(not_before=now - timedelta(days=60), leaf_not_after=now - timedelta(days=10))
    folder = tmp_path_factory.mktemp("old-pki")
    return pki, pki.write(folder)


def test_a_notification_days_old_is_still_accepted(client_for: Any, old_pki: tuple[TestPKI, Path]) -> None:
    pki, root = old_pki
    c = client_for(root_certs=(str(root),))
    signed = now_ms() - 20 * DAY_MS  # Apple retries for days; the leaf was valid then
    r = send(c, notification_body(pki, "EXPIRED", "VOLUNTARY", otid="2000000321", signed_ms=signed))
    assert r.status_code == 200, r.text
    assert [(o["event"], o["at"]) for o in outcomes(c)] == [("expired", signed)]


@pytest.mark.parametrize("days_ago", [5, 90], ids=["after-leaf-expiry", "before-ca-validity"])
def test_a_certificate_invalid_at_signed_date_is_refused(
    client_for: Any, old_pki: tuple[TestPKI, Path], days_ago: int
) -> None:
    pki, root = old_pki
    c = client_for(root_certs=(str(root),))
    r = send(c, notification_body(pki, "EXPIRED", "VOLUNTARY", signed_ms=now_ms() - days_ago * DAY_MS))
    assert r.status_code == 401 and r.json()["error"] == "certificate_expired"
    assert stored_rows(c) == 0


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "malformed_body"),
        (b"{}", 400, "malformed_body"),
        (b"[]", 400, "malformed_body"),
        (b'{"signedPayload": 5}', 400, "malformed_body"),
        (b"[" * 5000 + b"]" * 5000, 400, "malformed_body"),
        (b'{"signedPayload": "a.b"}', 400, "malformed_jws"),
        (b'{"signedPayload": "%%%.***.!!!"}', 400, "malformed_jws"),
        (b'{"signedPayload": "\xc3\xa9.a.b"}', 400, "malformed_jws"),
    ],
)
def test_bad_bodies_get_a_stable_4xx(client_for: Any, body: bytes, status: int, code: str) -> None:
    c = client_for()
    r = send(c, body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and set(r.json()) == {"error", "detail"}
    assert stored_rows(c) == 0


def _payload_cases(pki: TestPKI) -> list[tuple[str, bytes, int, str]]:
    """Return (id, body, status, code) for signed notifications that must be refused."""
    stranger = TestPKI.mint()
    ok = notification_payload(pki, "DID_RENEW")
    no_uuid = {k: v for k, v in ok.items() if k != "notificationUUID"}
    no_type = {k: v for k, v in ok.items() if k != "notificationType"}
    no_date = {k: v for k, v in ok.items() if k != "signedDate"}
    return [
        ("untrusted-chain", notification_body(stranger, "DID_RENEW"), 401, "untrusted_chain"),
        ("impostor-chain", notification_body(pki.impostor(), "DID_RENEW"), 401, "untrusted_chain"),
        ("untrusted-nested", notification_body(pki, "DID_RENEW", nested_pki=stranger), 401, "untrusted_chain"),
        ("bad-signature", json.dumps({"signedPayload": pki.sign(ok, key=stranger.leaf_key)}).encode(), 401,
         "bad_signature"),
        ("alg-none", json.dumps({"signedPayload": pki.sign(ok, header={"alg": "none"})}).encode(), 400,
         "unsupported_alg"),
        ("no-x5c", json.dumps({"signedPayload": pki.sign(ok, header={"x5c": None})}).encode(), 400,
         "bad_chain_length"),
        ("wrong-environment", notification_body(pki, "DID_RENEW", environment="Production"), 403,
         "wrong_environment"),
        ("wrong-app", notification_body(pki, "DID_RENEW", app_apple_id=APP_ID + 1), 403, "wrong_app"),
        ("no-uuid", body_of(pki, no_uuid), 400, "invalid_payload"),
        ("no-type", body_of(pki, no_type), 400, "invalid_payload"),
        ("no-signed-date", body_of(pki, no_date), 400, "invalid_payload"),
        ("data-not-an-object", body_of(pki, {**ok, "data": "x"}), 400, "invalid_payload"),
        ("data-a-list", body_of(pki, {**ok, "data": [1, 2]}), 400, "invalid_payload"),
        ("nested-not-a-jws", body_of(pki, {**ok, "data": {**ok["data"], "signedTransactionInfo": "x.y"}}), 400,
         "malformed_jws"),
        ("otid-not-a-string", body_of(pki, {**ok, "data": {**ok["data"], "signedTransactionInfo": pki.sign(
            {"originalTransactionId": {"a": 1}, "signedDate": now_ms()})}}), 400, "invalid_payload"),
        ("a-realtime-request", json.dumps({"signedPayload": pki.signed_request(app_apple_id=APP_ID)}).encode(), 400,
         "invalid_payload"),
    ]


def test_untrusted_or_foreign_notifications_get_their_stable_code_never_a_5xx(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    failures = []
    for name, body, status, code in _payload_cases(pki):
        r = send(c, body)
        got = (r.status_code, r.json().get("error"))
        if got != (status, code):
            failures.append(f"{name}: got {got}, expected {(status, code)}: {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert stored_rows(c) == 0
    metrics = c.get("/metrics").text
    assert "untrusted_chain" in metrics and "wrong_app" in metrics
    assert c.get("/health").status_code == 200


def test_a_notification_too_large_is_413(client_for: Any) -> None:
    c = client_for(max_body_bytes=1024)
    r = send(c, b'{"signedPayload": "' + b"a" * 2000 + b'"}')
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_an_outcome_that_cannot_be_stored_is_503_so_apple_retries(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    c.app.state.service.decision_log.close()  # as during shutdown: nothing queued now would reach the disk
    r = send(c, notification_body(pki, "DID_RENEW"))
    assert r.status_code == 503 and r.json()["error"] == "outcome_not_stored"
    # a notification that records nothing needs no log
    assert send(c, notification_body(pki, "TEST")).status_code == 200


def test_the_async_entry_point_answers_like_the_sync_one(client_for: Any, pki: TestPKI) -> None:
    import anyio

    from serving.notifications import receive_notification

    c = client_for()
    svc = c.app.state.service
    body = notification_body(pki, "REFUND", otid="2000000444")
    r = anyio.run(receive_notification, svc, body)
    assert r.status_code == 200 and r.content == b'{"status":"recorded"}'
    bad = anyio.run(receive_notification, svc, notification_body(TestPKI.mint(), "REFUND"))
    assert bad.status_code == 401
    assert [(o["original_transaction_id"], o["event"]) for o in outcomes(c)] == [("2000000444", "refunded")]


# ---- offers: what the nested transaction and renewal info say ------------------------------------------
@pytest.mark.parametrize(
    ("offer_type", "offer_id", "discount"),
    [(2, "com.example.winback50", "PAY_AS_YOU_GO"), (5, "apple-retention-offer-7", "FREE_TRIAL")],
    ids=["promotional-type-2", "apple-retention-type-5"],
)
def test_an_offer_redemption_keeps_apple_s_offer_fields(
    client_for: Any, pki: TestPKI, offer_type: int, offer_id: str, discount: str
) -> None:
    c = client_for()
    extra = {"offerType": offer_type, "offerIdentifier": offer_id, "offerDiscountType": discount,
             "transactionReason": "RENEWAL"}
    r = send(c, notification_body(pki, "OFFER_REDEEMED", "UPGRADE", otid="2000000611", transaction_extra=extra))
    assert r.status_code == 200 and r.json() == {"status": "recorded"}
    [row] = outcomes(c)
    assert (row["event"], row["raw_type"], row["raw_subtype"]) == ("offer_redeemed", "OFFER_REDEEMED", "UPGRADE")
    # type 5 is kept as Apple's raw integer, although Apple's library 3.1.2 does not know it
    assert (row["offer_type"], row["offer_identifier"], row["offer_discount_type"], row["transaction_reason"]) == (
        offer_type, offer_id, discount, "RENEWAL")


def test_the_renewal_info_names_the_offer_when_the_transaction_does_not(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    r = send(c, notification_body(
        pki, "OFFER_REDEEMED", None, otid="2000000612", transaction_extra={"transactionReason": "PURCHASE"},
        renewal_extra={"offerType": 2, "offerIdentifier": "com.example.loyal", "offerDiscountType": "PAY_UP_FRONT"},
    ))
    assert r.status_code == 200
    [row] = outcomes(c)
    assert (row["offer_type"], row["offer_identifier"], row["offer_discount_type"], row["transaction_reason"]) == (
        2, "com.example.loyal", "PAY_UP_FRONT", "PURCHASE")


def test_an_outcome_without_an_offer_has_none(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    assert send(c, notification_body(pki, "DID_RENEW", otid="2000000613")).status_code == 200
    [row] = outcomes(c)
    assert (row["offer_type"], row["offer_identifier"], row["offer_discount_type"]) == (None, None, None)


def test_an_offer_type_that_is_not_an_integer_is_invalid(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    r = send(c, notification_body(pki, "OFFER_REDEEMED", transaction_extra={"offerType": "2"}))
    assert r.status_code == 400 and r.json()["error"] == "invalid_payload"
    assert stored_rows(c) == 0


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("offerType", {"transaction_extra": {"offerType": 10**30}}),
        ("offerType", {"renewal_extra": {"offerType": -(2**63) - 1}}),
        ("offerIdentifier", {"transaction_extra": {"offerType": 2, "offerIdentifier": "winback\x00"}}),  # PostgreSQL text has no NUL
    ],
)
def test_a_value_the_log_cannot_store_is_refused_not_answered_503_forever(
    client_for: Any, pki: TestPKI, field: str, extra: dict[str, Any]
) -> None:
    c = client_for()
    body = notification_body(pki, "OFFER_REDEEMED", **extra)
    for _ in range(2):  # Apple's retry gets the same final answer: it stops retrying
        r = send(c, body)
        assert r.status_code == 400 and r.json()["error"] == "invalid_payload" and field in r.json()["detail"]
    assert send(c, notification_body(pki, "DID_RENEW", otid="2000000777")).status_code == 200  # the log still works
    assert [o["original_transaction_id"] for o in outcomes(c)] == ["2000000777"]
    assert c.get("/ready").status_code == 200
