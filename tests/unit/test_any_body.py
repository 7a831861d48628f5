"""No body gets a 5xx: generated bodies on both POST routes get a 200 or a 4xx with a documented stable code.

Property-based (hypothesis): raw bytes, JSON strings holding invalid UTF-8, truncated and deeply nested JSON,
wrong types, duplicate keys, huge strings and numbers, and tokens signed by the trusted test CA with mutated
headers, payloads and nested tokens. More than 10,000 bodies in all, each posted to ``/retention/message``
and ``/apple/notifications`` of one in-process app (Litestar's TestClient); the server is alive after, and
its 5xx counter is zero. An unforeseen fault inside the app is a 503 with a stable code, counted.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar.testing import TestClient

from models.catalog import DEMO_CATALOG
from serving.app import create_app
from serving.errors import ERROR_STATUS
from serving.settings import Settings
from serving.testpki import TestPKI
from tests.conftest import APP_ID, BUNDLE_ID

ROUTES = ("/retention/message", "/apple/notifications")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
PM = "com.example.premium.monthly"

# ---------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------
_odd_strings = st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028", "é", "\uffff", "𝕏" * 3, "a" * 70_000, "", " "])
_huge_numbers = st.sampled_from([10**400, -(10**400), 2**63, 2**64, -(2**63) - 1, 1e308, -0.0, 1.5, 10**4000])
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    _odd_strings, _huge_numbers,
)
#: any JSON value (nested a few levels)
json_values = st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)


def _dumps(value: Any) -> bytes:
    """Return JSON text for any value, numbers of any size included (Python's own int limit lifted per call)."""
    return json.dumps(value, separators=(",", ":")).encode()


@st.composite
def raw_json_bodies(draw: st.DrawFn) -> bytes:
    """Bodies built as text: invalid UTF-8 in the string, truncation, nesting, duplicate keys, huge literals."""
    kind = draw(st.sampled_from(["bad_utf8", "truncated", "nested", "duplicate", "huge", "wrong_type", "escapes"]))
    if kind == "bad_utf8":  # the body of issue 11: bytes that are not UTF-8 inside the JSON string
        junk = draw(st.binary(min_size=1, max_size=40))
        prefix = draw(st.sampled_from([b"", b"a.b.", b"eyJhbGciOiJFUzI1NiJ9."]))
        return b'{"signedPayload":"' + prefix + junk + b'"}'
    if kind == "truncated":
        full = _dumps({"signedPayload": draw(json_values), "x": draw(json_values)})
        return full[: draw(st.integers(0, max(0, len(full) - 1)))]
    if kind == "nested":
        depth = draw(st.integers(1, 20_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"signedPayload":', b"}"), (b'{"a":', b"}")]))
        inner = draw(st.sampled_from([b"1", b'"x"', b"", b"[]"]))
        return opener * depth + inner + closer * draw(st.integers(0, depth))
    if kind == "duplicate":
        first, second = draw(json_values), draw(json_values)
        return b'{"signedPayload":' + _dumps(first) + b',"signedPayload":' + _dumps(second) + b"}"
    if kind == "huge":
        digits = draw(st.integers(1, 60_000))
        literal = draw(st.sampled_from([b"9" * digits, b"-" + b"9" * digits, b"1e" + b"9" * min(digits, 400),
                                        b'"' + b"A" * digits + b'"', b"0." + b"1" * digits]))
        return b'{"signedPayload":' + literal + b"}"
    if kind == "wrong_type":
        return _dumps(draw(st.one_of(json_values, st.fixed_dictionaries({"signedPayload": json_values}))))
    # JSON escapes that decode to something odd: lone surrogates, NUL, invalid escapes
    esc = draw(st.sampled_from([b"\\ud800", b"\\udfff\\ud800", b"\\u0000", b"\\x41", b"\\", b"\\u12", b"\\uZZZZ"]))
    return b'{"signedPayload":"a' + esc + b'.b.c"}'


def _notification_payload(pki: TestPKI, now: int) -> dict[str, Any]:
    txn = {"originalTransactionId": "2000000321", "transactionId": "20000003219", "productId": PM,
           "bundleId": BUNDLE_ID, "environment": "Sandbox", "signedDate": now, "purchaseDate": now - 1000}
    ren = {"originalTransactionId": "2000000321", "autoRenewProductId": PM, "environment": "Sandbox",
           "signedDate": now}
    return {"notificationType": "DID_CHANGE_RENEWAL_STATUS", "subtype": "AUTO_RENEW_DISABLED",
            "notificationUUID": str(uuid.uuid4()), "version": "2.0", "signedDate": now,
            "data": {"bundleId": BUNDLE_ID, "appAppleId": APP_ID, "environment": "Sandbox", "status": 1,
                     "signedTransactionInfo": txn, "signedRenewalInfo": ren}}


def _mutate_dict(draw: st.DrawFn, d: dict[str, Any]) -> None:
    """Set, delete or add a few top-level fields of `d` with generated values."""
    for _ in range(draw(st.integers(0, 3))):
        keys = list(d)
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "add" or not keys:
            d[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "delete":
            del d[draw(st.sampled_from(keys))]
        else:
            d[draw(st.sampled_from(keys))] = draw(json_values)


def _mutate_token(draw: st.DrawFn, token: str) -> str:
    """Return `token` unchanged, or with one generated edit of its compact serialization."""
    edit = draw(st.sampled_from(["none", "none", "flip", "truncate", "insert", "segments", "non_ascii"]))
    if edit == "none" or not token:
        return token
    i = draw(st.integers(0, len(token) - 1))
    if edit == "flip":
        return token[:i] + draw(st.sampled_from("AZaz09-_.=+/")) + token[i + 1 :]
    if edit == "truncate":
        return token[:i]
    if edit == "insert":
        return token[:i] + draw(st.text(max_size=5)) + token[i:]
    if edit == "segments":
        parts = token.split(".")
        return ".".join(draw(st.lists(st.sampled_from(parts), max_size=5)))
    return token[:i] + draw(st.sampled_from(["é", "\u2028", "\ud800", "\x00"])) + token[i:]


@st.composite
def signed_bodies(draw: st.DrawFn, pki: TestPKI, stranger: TestPKI) -> bytes:
    """A body whose token is signed by the trusted test CA, with mutated header, payload and nested tokens."""
    now = int(time.time() * 1000)
    if draw(st.booleans()):
        payload: dict[str, Any] = TestPKI.request_payload(app_apple_id=APP_ID, environment="Sandbox")
    else:
        payload = _notification_payload(pki, now)
        data = payload["data"]
        for key in ("signedTransactionInfo", "signedRenewalInfo"):
            nested = dict(data[key])
            if draw(st.booleans()):
                _mutate_dict(draw, nested)
            data[key] = _mutate_token(draw, pki.sign(nested))
        if draw(st.booleans()):
            _mutate_dict(draw, data)
    if draw(st.booleans()):
        _mutate_dict(draw, payload)
    header: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        field = draw(st.sampled_from(["alg", "x5c", "crit", "kid", "typ", "zip"]))
        value = draw(st.one_of(
            json_values, st.sampled_from(["ES256", "none", "HS256", "ES384", "RS256", "es256"]),
            st.just(pki.x5c[::-1]), st.just(pki.x5c[:2]), st.just([*pki.x5c, pki.x5c[0]]),
            st.lists(st.sampled_from([*pki.x5c, "", "AAAA", "!!"]), max_size=4),
        ))
        header[field] = value
    raw_payload = _dumps(payload) if draw(st.integers(0, 9)) else draw(st.sampled_from([b"[]", b"1", b"\xff", b"{"]))
    key = None if draw(st.integers(0, 4)) else stranger.leaf_key  # a signature the chain does not vouch for
    token = _mutate_token(draw, pki.sign(raw_payload, header=header, key=key))
    outer = draw(st.sampled_from(["plain", "plain", "plain", "extra", "bytes"]))
    if outer == "extra":
        return _dumps({"signedPayload": token, draw(st.text(max_size=5)): draw(json_values)})
    if outer == "bytes":  # a base64 body instead of the JSON one, as a confused client might send
        return base64.b64encode(token.encode("utf-8", "surrogatepass"))
    return _dumps({"signedPayload": token})


# ---------------------------------------------------------------------------------------------------------
# The app and the check of one answer
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(pki_dir: Path, trained_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    settings = Settings(
        root_certs=(str(pki_dir / "root.pem"),), app_apple_id=APP_ID, bundle_id=BUNDLE_ID, environment="Sandbox",
        catalog=str(DEMO_CATALOG), model=str(trained_registry), data_dir=str(tmp_path_factory.mktemp("data")),
        seed=5, reload_interval_s=0.0, log_batch_ms=20.0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def check_answer(route: str, status: int, content: bytes) -> str:
    """Assert the answer is a 200 or a 4xx with a stable documented code; return the code (or "ok")."""
    assert status < 500, f"{route} answered {status}: {content[:300]!r}"
    body = json.loads(content)
    if status == 200:
        if route == ROUTES[1]:
            assert body in ({"status": "recorded"}, {"status": "ignored"}), body
        else:
            assert len(body) == 1 and next(iter(body)) in ("message", "alternateProduct", "promotionalOffer"), body
        return "ok"
    assert set(body) == {"error", "detail"}, body
    code = body["error"]
    assert code in ERROR_STATUS and ERROR_STATUS[code] == status, (route, status, body)
    return str(code)


def post_everywhere(client: TestClient[Any], body: bytes, seen: dict[str, int]) -> None:
    for route in ROUTES:
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        code = check_answer(route, r.status_code, r.content)
        seen[code] = seen.get(code, 0) + 1


_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


def variants(body: bytes, cut: int, at: int, byte: int) -> list[bytes]:
    """Return `body`, a prefix of it, and a copy with one byte replaced: three bodies from one generated one."""
    if not body:
        return [body, b"{", bytes([byte])]
    i = at % len(body)
    return [body, body[: cut % len(body)], body[:i] + bytes([byte]) + body[i + 1 :]]


def _run(client: TestClient[Any], strategy: st.SearchStrategy[bytes], n: int) -> dict[str, int]:
    """Post `n` generated bodies (n // 3 examples, three variants each) to both routes; return the codes' counts."""
    seen: dict[str, int] = {}
    sent: list[int] = []

    @hsettings(max_examples=-(-n // 3), deadline=None, database=None, print_blob=True,
               suppress_health_check=_SUPPRESSED)
    @given(body=strategy, cut=st.integers(0, 2**20), at=st.integers(0, 2**20), byte=st.integers(0, 255))
    def each(body: bytes, cut: int, at: int, byte: int) -> None:
        for b in variants(body, cut, at, byte):
            sent.append(1)
            post_everywhere(client, b, seen)

    each()
    assert len(sent) >= n  # hypothesis ran every example it was asked for
    assert client.get("/health").status_code == 200
    return seen


# The counts add up to 10,500 bodies (21,000 requests); each test checks the server is alive after.
def test_any_bytes(client: TestClient[Any]) -> None:
    seen = _run(client, st.binary(max_size=512), 2400)
    assert seen.get("malformed_body", 0) > 0


def test_any_json_value(client: TestClient[Any]) -> None:
    seen = _run(client, json_values.map(_dumps) | st.fixed_dictionaries({"signedPayload": json_values}).map(_dumps),
                2400)
    assert seen.get("malformed_body", 0) > 0


def test_bad_utf8_truncated_nested_duplicate_huge(client: TestClient[Any]) -> None:
    seen = _run(client, raw_json_bodies(), 2700)
    assert seen.get("malformed_body", 0) > 0 and seen.get("malformed_jws", 0) > 0


def test_signed_tokens_with_mutated_headers_and_payloads(client: TestClient[Any], pki: TestPKI) -> None:
    seen = _run(client, signed_bodies(pki, TestPKI.mint()), 3000)
    # the generator reaches deep into both routes, not only the first refusals
    assert seen.get("ok", 0) > 0 and seen.get("bad_signature", 0) > 0 and seen.get("invalid_payload", 0) > 0
    assert seen.get("unsupported_alg", 0) + seen.get("bad_chain_length", 0) > 0


def test_no_5xx_was_sent_and_the_server_is_alive(client: TestClient[Any]) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    metrics = client.get("/metrics").text
    assert not re.search(r'^retention_http_5xx_total\{.*\} [1-9]', metrics, re.M), metrics


# ---------------------------------------------------------------------------------------------------------
# The examples of issue 11, and the catch-all
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", [b'{"signedPayload":"\xff"}', b'{"signedPayload":"a.b.\xc3"}',
                                  b'{"signedPayload":"\xed\xa0\x80"}'], ids=["0xff", "cut-sequence", "utf8-surrogate"])
def test_invalid_utf8_inside_the_json_string_is_malformed_body(client: TestClient[Any], route: str, body: bytes) -> None:
    r = client.post(route, content=body)
    assert r.status_code == 400 and r.json()["error"] == "malformed_body", r.text


@pytest.fixture
def fresh_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as c:
        yield c


def test_an_unforeseen_fault_is_a_counted_503_with_a_stable_code(
    fresh_client: TestClient[Any], pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = fresh_client.app.state.service

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug nobody foresaw")

    monkeypatch.setattr(svc, "_choose", broken)  # fails after verification, inside the request path
    monkeypatch.setattr(svc.decision_log, "log_outcome", broken)
    r1 = fresh_client.post(ROUTES[0], content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    now = int(time.time() * 1000)
    r2 = fresh_client.post(ROUTES[1], content=json.dumps({"signedPayload": pki.sign(_notification_payload_signed(pki, now))}))
    for r in (r1, r2):
        assert r.status_code == 503 and r.json()["error"] == "internal_error", r.text
    metrics = fresh_client.get("/metrics").text
    assert 'retention_http_5xx_total{path="/retention/message",status="503"} 1.0' in metrics
    assert 'retention_http_5xx_total{path="/apple/notifications",status="503"} 1.0' in metrics
    assert fresh_client.get("/health").status_code == 200


def _notification_payload_signed(pki: TestPKI, now: int) -> dict[str, Any]:
    payload = _notification_payload(pki, now)
    for key in ("signedTransactionInfo", "signedRenewalInfo"):
        payload["data"][key] = pki.sign(payload["data"][key])
    return payload


def test_every_code_is_documented_with_its_status() -> None:
    text = DOCS.read_text()
    for code, status in ERROR_STATUS.items():
        assert re.search(rf"\|\s*`{code}`\s*\|\s*{status}\s*\|", text), f"{code} ({status}) is not in {DOCS.name}"
