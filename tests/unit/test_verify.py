"""Every verification rule of serving.verify, each with a token that passes and one that fails."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from serving.errors import ERROR_STATUS, VerificationError
from serving.replay import InProcessReplayMemory
from serving.schemas import DecodedRealtimeRequestBody
from serving.settings import Settings
from serving.testpki import (
    CorpusCase,
    TestPKI,
    b64url,
    compact_jws,
    es256_raw,
    token_corpus,
    unknown_critical_extension,
)
from serving.verify import RequestVerifier, has_apple_root_g3, load_roots, validate_chain
from tests.conftest import off_loop

APP_ID = 1234567890
# chain_check_busy depends on load, not on the token: test_a_flood_of_forged_chains_... reaches it
VERIFICATION_CODES = set(ERROR_STATUS) - {
    "malformed_body", "payload_too_large", "no_eligible_message", "request_timeout", "too_many_connections",
    "chain_check_busy", "not_found", "method_not_allowed", "http_error", "outcome_not_stored", "internal_error",
    "request_header_fields_too_large", "uri_too_long", "malformed_request",
}


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.mint()


def make(pki: TestPKI, **kw: Any) -> RequestVerifier:
    kw.setdefault("app_apple_id", APP_ID)
    kw.setdefault("environment", "Sandbox")
    return RequestVerifier([pki.root_cert], **kw)


def code_of(verifier: RequestVerifier, token: str | bytes) -> str | None:
    try:
        verifier.verify(token)
    except VerificationError as exc:
        assert exc.status == ERROR_STATUS[exc.code] and 400 <= exc.status < 500
        assert exc.detail and "\n" not in exc.detail
        return exc.code
    return None


def payload(**kw: Any) -> dict[str, Any]:
    return TestPKI.request_payload(**{"app_apple_id": APP_ID, **kw})


# ---------------------------------------------------------------------------------------------------------
# The corpus: every code reached, each case isolated to one rule
# ---------------------------------------------------------------------------------------------------------
_CORPUS: list[CorpusCase] = []


def corpus() -> list[CorpusCase]:
    if not _CORPUS:
        _CORPUS.extend(token_corpus(TestPKI.mint(), app_apple_id=APP_ID))
    return _CORPUS


def test_corpus_gives_each_expected_code_and_reaches_every_code() -> None:
    cases = corpus()
    pki_root = _corpus_root(cases)
    seen = set()
    for case in cases:
        v = RequestVerifier([pki_root], app_apple_id=APP_ID, environment=case.environment)
        got = code_of(v, case.token)
        if case.twice:
            got = code_of(v, case.token)
        assert got == case.code, case.name
        seen.add(got)
    assert seen >= VERIFICATION_CODES, VERIFICATION_CODES - seen
    assert None in seen


def test_verify_async_gives_the_same_answer_for_every_corpus_case() -> None:
    """The server's path (on the loop, a never-seen chain's CA signatures on a thread) agrees with verify()."""
    import asyncio

    cases = corpus()
    pki_root = _corpus_root(cases)

    async def code_async(v: RequestVerifier, token: str | bytes, off: Any) -> str | None:
        try:
            await v.verify_async(token, off)
        except VerificationError as exc:
            return exc.code
        return None

    async def main(off: Any) -> None:
        for case in cases:
            v = RequestVerifier([pki_root], app_apple_id=APP_ID, environment=case.environment)
            got = await code_async(v, case.token, off)
            if case.twice:
                got = await code_async(v, case.token, off)
            assert got == case.code, case.name

    with off_loop() as off:
        asyncio.run(main(off))


def _corpus_root(cases: list[CorpusCase]) -> Any:
    # The corpus' own valid token carries its root as x5c[2].
    header = json.loads(base64.urlsafe_b64decode(cases[0].token.split(".")[0] + "=="))
    from cryptography import x509

    return x509.load_der_x509_certificate(base64.b64decode(header["x5c"][2]))


# ---------------------------------------------------------------------------------------------------------
# Passing tokens
# ---------------------------------------------------------------------------------------------------------
def test_valid_request_returns_the_decoded_body(pki: TestPKI) -> None:
    p = payload(original_transaction_id="2000000123", product_id="com.example.premium.yearly", user_locale="de-DE")
    body = make(pki).verify(pki.sign(p))
    assert isinstance(body, DecodedRealtimeRequestBody)
    assert (body.originalTransactionId, body.productId, body.userLocale) == ("2000000123", "com.example.premium.yearly", "de-DE")
    assert body.appAppleId == APP_ID and body.rawEnvironment == "Sandbox" and body.signedDate == p["signedDate"]
    assert body.requestIdentifier == p["requestIdentifier"]


def test_bytes_and_str_tokens_are_both_accepted(pki: TestPKI) -> None:
    v = make(pki)
    assert v.verify(pki.signed_request().encode()).appAppleId == APP_ID
    assert v.verify(pki.signed_request()).appAppleId == APP_ID


def test_unknown_extra_payload_fields_are_tolerated(pki: TestPKI) -> None:
    assert code_of(make(pki), pki.sign(payload(newField="x", other={"a": 1}))) is None


def test_root_given_as_der_or_pem_file(pki: TestPKI, tmp_path: Path) -> None:
    root_pem = pki.write(tmp_path / "ca")
    for path in (root_pem, root_pem.with_name("root.der")):
        v = RequestVerifier(load_roots([str(path)]), app_apple_id=APP_ID, environment="Sandbox")
        assert code_of(v, pki.signed_request()) is None


# ---------------------------------------------------------------------------------------------------------
# Framing and header
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.rsplit(".", 1)[0],  # two segments
        lambda t: t + ".AAAA",  # four segments
        lambda t: "",  # empty
        lambda t: "é" + t,  # non-ASCII
        lambda t: t.replace("-", "+").replace("_", "/") if ("-" in t or "_" in t) else "+" + t,  # standard base64
        lambda t: "!!!!." + t.split(".", 1)[1],  # header not base64
        lambda t: b64url(b"[1,2]") + "." + t.split(".", 1)[1],  # header not an object
        lambda t: b64url(b"{not json") + "." + t.split(".", 1)[1],  # header not JSON
    ],
)
def test_malformed_jws(pki: TestPKI, mangle: Any) -> None:
    assert code_of(make(pki), mangle(pki.signed_request())) == "malformed_jws"


def test_non_string_token_is_malformed(pki: TestPKI) -> None:
    assert code_of(make(pki), 12345) == "malformed_jws"  # type: ignore[arg-type]


@pytest.mark.parametrize("x5c", [["not base64!", "AAAA", "AAAA"], ["AAAA", "AAAA", "AAAA"], [1, 2, 3], "abc"])
def test_malformed_x5c_entries(pki: TestPKI, x5c: Any) -> None:
    assert code_of(make(pki), pki.sign(payload(), x5c=x5c)) == "malformed_jws"


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS256", "ES256K", "es256", None])
def test_alg_must_be_es256(pki: TestPKI, alg: str | None) -> None:
    header: dict[str, Any] = {"x5c": pki.x5c} if alg is None else {"alg": alg, "x5c": pki.x5c}
    token = compact_jws(header, payload(), lambda si: es256_raw(pki.leaf_key, si))
    assert code_of(make(pki), token) == "unsupported_alg"
    assert code_of(make(pki), compact_jws({"alg": "ES256", "x5c": pki.x5c}, payload(), lambda si: es256_raw(pki.leaf_key, si))) is None


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "x"])
def test_crit_header_is_refused(pki: TestPKI, crit: Any) -> None:
    assert code_of(make(pki), pki.sign(payload(), header={"crit": crit})) == "unknown_critical_header"
    # Other unknown header fields are fine (typ, kid).
    assert code_of(make(pki), pki.sign(payload(), header={"typ": "JWT", "kid": "x"})) is None


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5])
def test_x5c_must_hold_exactly_three(pki: TestPKI, count: int) -> None:
    x5c = (pki.x5c * 2)[:count]
    assert code_of(make(pki), pki.sign(payload(), x5c=x5c)) == "bad_chain_length"


def test_missing_x5c_is_bad_chain_length(pki: TestPKI) -> None:
    assert code_of(make(pki), pki.sign(payload(), header={"x5c": None})) == "bad_chain_length"


# ---------------------------------------------------------------------------------------------------------
# Chain
# ---------------------------------------------------------------------------------------------------------
def test_trust_comes_only_from_configured_roots(pki: TestPKI) -> None:
    other = TestPKI.mint()
    assert code_of(make(pki), other.signed_request()) == "untrusted_chain"
    # The same token passes once its root is configured, like any other root.
    v = RequestVerifier([pki.root_cert, other.root_cert], app_apple_id=APP_ID, environment="Sandbox")
    assert code_of(v, other.signed_request()) is None


def test_x5c_root_entry_is_ignored_never_trusted(pki: TestPKI) -> None:
    impostor = pki.impostor()
    # Our root, impostor's x5c[2]: trust comes from the configured root, so it passes.
    assert code_of(make(pki), pki.sign(payload(), x5c=[*pki.x5c[:2], impostor.x5c[2]])) is None
    # The impostor chain with our real root in x5c[2] still fails: x5c[2] is never trusted.
    assert code_of(make(pki), impostor.sign(payload(), x5c=[*impostor.x5c[:2], pki.x5c[2]])) == "untrusted_chain"


def test_impostor_with_copied_names_and_key_ids_is_untrusted(pki: TestPKI) -> None:
    impostor = pki.impostor()
    assert impostor.intermediate_cert.issuer == pki.root_cert.subject
    assert code_of(make(pki), impostor.signed_request()) == "untrusted_chain"


def test_leaf_and_intermediate_swapped(pki: TestPKI) -> None:
    x5c = pki.x5c
    assert code_of(make(pki), pki.sign(payload(), x5c=[x5c[1], x5c[0], x5c[2]])) == "untrusted_chain"


def test_leaf_must_be_issued_by_the_intermediate(pki: TestPKI) -> None:
    other = TestPKI.mint()
    x5c = [other.x5c[0], pki.x5c[1], pki.x5c[2]]
    assert code_of(make(pki), pki.sign(payload(), x5c=x5c, key=other.leaf_key)) == "untrusted_chain"


@pytest.mark.parametrize(
    "variant",
    [
        lambda p: p.with_leaf(is_ca=True),
        lambda p: p.with_leaf(key_usage="ca"),  # no digitalSignature
        lambda p: p.with_leaf(extra_extensions=[unknown_critical_extension()]),
        lambda p: p.with_leaf(curve=ec.SECP384R1()),  # ES256 needs P-256
        lambda p: p.with_leaf(hash_alg=hashes.SHA512()),  # certificate signature not SHA-256/384
        lambda p: p.with_intermediate(is_ca=False),
        lambda p: p.with_intermediate(is_ca=None),  # no BasicConstraints at all
        lambda p: p.with_intermediate(extra_extensions=[unknown_critical_extension()]),
        lambda p: p.with_intermediate(curve=ec.SECP521R1()),
    ],
    ids=[
        "leaf_is_ca", "leaf_without_digital_signature", "leaf_unknown_critical", "leaf_p384", "leaf_sha512",
        "intermediate_not_ca", "intermediate_no_basic_constraints", "intermediate_unknown_critical", "intermediate_p521",
    ],
)  # fmt: skip
def test_chain_shape_rules(pki: TestPKI, variant: Any) -> None:
    bad = variant(pki)
    assert code_of(make(pki), bad.signed_request()) == "untrusted_chain"


def test_unknown_critical_extension_on_the_root_is_refused() -> None:
    base = TestPKI.mint()
    # A root with an unknown critical extension, same key: requests under it are refused.
    from serving.testpki import _certificate, _ski

    root = _certificate(
        subject=base.root_cert.subject, issuer=base.root_cert.subject, key=base.root_key, issuer_key=base.root_key,
        not_before=base.root_cert.not_valid_before_utc, not_after=base.root_cert.not_valid_after_utc, ca=True,
        ski=_ski(base.root_key), key_usage="ca", extra=[unknown_critical_extension()],
    )  # fmt: skip
    v = RequestVerifier([root], app_apple_id=APP_ID, environment="Sandbox")
    assert code_of(v, base.signed_request()) == "untrusted_chain"
    assert code_of(make(base), base.signed_request()) is None


def test_p256_intermediate_is_allowed(pki: TestPKI) -> None:
    assert code_of(make(pki), pki.with_intermediate(curve=ec.SECP256R1()).signed_request()) is None


def test_apple_oids_are_required(pki: TestPKI) -> None:
    assert code_of(make(pki), pki.with_leaf(leaf_oid=False).signed_request()) == "missing_apple_oid"
    assert code_of(make(pki), pki.with_intermediate(intermediate_oid=False).signed_request()) == "missing_apple_oid"
    assert code_of(make(pki), pki.with_leaf().signed_request()) is None


def test_validity_is_judged_at_signed_date_not_now() -> None:
    now = datetime.now(UTC)
    pki = TestPKI.mint(not_before=now - timedelta(days=60))
    expired = pki.with_leaf(not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    future = pki.with_leaf(not_before=now + timedelta(days=1), not_after=now + timedelta(days=30))
    assert code_of(make(pki), expired.signed_request()) == "certificate_expired"
    assert code_of(make(pki), future.signed_request()) == "certificate_expired"
    # Signed while the leaf was valid (two days ago), checked with a clock at that moment: passes.
    then = (now - timedelta(days=2)).timestamp()
    v = make(pki, clock=lambda: then)
    assert code_of(v, expired.sign(payload(signed_date_ms=int(then * 1000)))) is None


def test_expired_intermediate_is_refused(pki: TestPKI) -> None:
    now = datetime.now(UTC)
    bad = pki.with_intermediate(not_before=now - timedelta(days=30), not_after=now - timedelta(hours=1))
    assert code_of(make(pki), bad.signed_request()) == "certificate_expired"


def test_cached_chain_still_checks_the_date(pki: TestPKI) -> None:
    v = make(pki, max_age_s=10 * 365 * 86400, max_skew_s=10 * 365 * 86400)
    assert code_of(v, pki.signed_request()) is None
    late = int(pki.leaf_cert.not_valid_after_utc.timestamp() * 1000) + 1000
    early = int(pki.leaf_cert.not_valid_before_utc.timestamp() * 1000) - 1000
    assert code_of(v, pki.sign(payload(signed_date_ms=late))) == "certificate_expired"
    assert code_of(v, pki.sign(payload(signed_date_ms=early))) == "certificate_expired"


def test_chain_cache_is_bounded(pki: TestPKI) -> None:
    v = make(pki, cache_size=2)
    for _ in range(5):
        assert code_of(v, pki.with_leaf().signed_request()) is None
    assert len(v._by_header) <= 2 and len(v._by_x5c) <= 2
    v.clear_caches()
    assert code_of(v, pki.signed_request()) is None


def test_a_failed_chain_is_refused_the_same_way_twice(pki: TestPKI) -> None:
    bad = pki.with_leaf(leaf_oid=False)
    v = make(pki)
    assert code_of(v, bad.signed_request()) == "missing_apple_oid"
    assert code_of(v, bad.signed_request()) == "missing_apple_oid"


# ---------------------------------------------------------------------------------------------------------
# Signature
# ---------------------------------------------------------------------------------------------------------
def test_signature_rules(pki: TestPKI) -> None:
    v = make(pki)
    token = pki.signed_request()
    h, p, s = token.split(".")
    sig = base64.urlsafe_b64decode(s + "==")
    other_payload = pki.signed_request().split(".")[1]
    assert code_of(v, pki.sign(payload(), key=ec.generate_private_key(ec.SECP256R1()))) == "bad_signature"
    assert code_of(v, pki.sign(payload(), der_signature=True)) == "bad_signature"
    assert code_of(v, f"{h}.{other_payload}.{s}") == "bad_signature"
    assert code_of(v, f"{h}.{p}.{b64url(sig[:63])}") == "bad_signature"
    longer = b64url(sig + bytes(1))
    assert code_of(v, f"{h}.{p}.{longer}") == "bad_signature"
    assert code_of(v, f"{h}.{p}.{b64url(sig[32:] + sig[:32])}") == "bad_signature"
    assert code_of(v, f"{h}.{p}.") == "bad_signature"
    assert code_of(v, token) is None


def test_high_s_twin_of_a_valid_signature_is_accepted_as_ecdsa_allows(pki: TestPKI) -> None:
    # ES256 (unlike Bitcoin) does not forbid the (r, n - s) twin; replay protection is by requestIdentifier.
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    h, p, s = pki.signed_request().split(".")
    sig = base64.urlsafe_b64decode(s + "==")
    twin = sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    assert code_of(make(pki), f"{h}.{p}.{b64url(twin)}") is None


# ---------------------------------------------------------------------------------------------------------
# Payload
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field", ["originalTransactionId", "appAppleId", "productId", "userLocale", "requestIdentifier", "environment", "signedDate"]
)
def test_each_field_is_required(pki: TestPKI, field: str) -> None:
    p = payload()
    del p[field]
    assert code_of(make(pki), pki.sign(p)) == "invalid_payload"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("appAppleId", str(APP_ID)),
        ("appAppleId", True),
        ("appAppleId", float(APP_ID)),
        ("signedDate", "now"),
        ("signedDate", 1.5),
        ("originalTransactionId", 2000000123),
        ("productId", None),
        ("userLocale", ["en-US"]),
        ("environment", 1),
        ("requestIdentifier", "not-a-uuid"),
        ("requestIdentifier", "{" + str(uuid.UUID(int=1)) + "}"),
        ("requestIdentifier", uuid.uuid4().hex),
        ("requestIdentifier", "urn:uuid:" + str(uuid.uuid4())),
    ],
)
def test_field_types_and_uuid(pki: TestPKI, field: str, value: Any) -> None:
    p = payload()
    p[field] = value
    assert code_of(make(pki), pki.sign(p)) == "invalid_payload"


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"null", b'{"signedDate": 1'])
def test_payload_must_be_a_json_object(pki: TestPKI, raw: bytes) -> None:
    assert code_of(make(pki), pki.sign(raw)) == "invalid_payload"


def test_payload_segment_not_base64_is_malformed(pki: TestPKI) -> None:
    header = pki.signed_request().split(".")[0]
    signing_input = f"{header}.!!bad!!".encode()
    token = f"{header}.!!bad!!.{b64url(es256_raw(pki.leaf_key, signing_input))}"
    assert code_of(make(pki), token) == "malformed_jws"


def test_uppercase_uuid_is_a_uuid(pki: TestPKI) -> None:
    assert code_of(make(pki), pki.sign(payload(request_identifier=str(uuid.uuid4()).upper()))) is None


# ---------------------------------------------------------------------------------------------------------
# App and environment
# ---------------------------------------------------------------------------------------------------------
def test_app_apple_id_is_checked_in_sandbox_and_production(pki: TestPKI) -> None:
    assert code_of(make(pki), pki.sign(payload(app_apple_id=APP_ID + 1))) == "wrong_app"
    prod = make(pki, environment="Production")
    assert code_of(prod, pki.sign(payload(app_apple_id=APP_ID + 1, environment="Production"))) == "wrong_app"
    assert code_of(prod, pki.sign(payload(environment="Production"))) is None


def test_relaxed_app_id_applies_only_in_sandbox(pki: TestPKI) -> None:
    relaxed = make(pki, relax_app_id_in_sandbox=True)
    assert code_of(relaxed, pki.sign(payload(app_apple_id=42))) is None
    prod = make(pki, environment="Production", relax_app_id_in_sandbox=True)
    assert code_of(prod, pki.sign(payload(app_apple_id=42, environment="Production"))) == "wrong_app"


@pytest.mark.parametrize(("verifier_env", "token_env"), [("Sandbox", "Production"), ("Production", "Sandbox"), ("Sandbox", "Staging"), ("Sandbox", "sandbox")])
def test_environment_must_match(pki: TestPKI, verifier_env: str, token_env: str) -> None:
    assert code_of(make(pki, environment=verifier_env), pki.sign(payload(environment=token_env))) == "wrong_environment"


# ---------------------------------------------------------------------------------------------------------
# Freshness and replay
# ---------------------------------------------------------------------------------------------------------
def test_freshness_bounds(pki: TestPKI) -> None:
    now = time.time()
    v = make(pki, clock=lambda: now, max_age_s=300, max_skew_s=60)
    ms = int(now * 1000)
    assert code_of(v, pki.sign(payload(signed_date_ms=ms - 299_000))) is None
    assert code_of(v, pki.sign(payload(signed_date_ms=ms - 301_000))) == "stale_request"
    assert code_of(v, pki.sign(payload(signed_date_ms=ms + 59_000))) is None
    assert code_of(v, pki.sign(payload(signed_date_ms=ms + 61_000))) == "stale_request"


def test_freshness_limits_are_configurable(pki: TestPKI) -> None:
    now = time.time()
    token = pki.sign(payload(signed_date_ms=int(now * 1000) - 20_000))
    assert code_of(make(pki, clock=lambda: now, max_age_s=10), token) == "stale_request"
    assert code_of(make(pki, clock=lambda: now, max_age_s=30), token) is None


def test_a_request_identifier_is_answered_once(pki: TestPKI) -> None:
    v = make(pki)
    rid = str(uuid.uuid4())
    token = pki.sign(payload(request_identifier=rid))
    assert code_of(v, token) is None
    assert code_of(v, token) == "replayed_request"
    # Re-signed with the same identifier (even in upper case): still a replay.
    assert code_of(v, pki.sign(payload(request_identifier=rid.upper()))) == "replayed_request"
    # Another worker process (another verifier) has its own memory.
    assert code_of(make(pki), token) is None
    # A refused request is not remembered: the same identifier passes once it is valid.
    rid2 = str(uuid.uuid4())
    assert code_of(v, pki.sign(payload(request_identifier=rid2, app_apple_id=1))) == "wrong_app"
    assert code_of(v, pki.sign(payload(request_identifier=rid2))) is None


def test_replay_check_can_be_turned_off(pki: TestPKI) -> None:
    v = make(pki, check_replay=False)
    token = pki.signed_request()
    assert code_of(v, token) is None and code_of(v, token) is None


def test_replay_memory_forgets_after_the_freshness_window(pki: TestPKI) -> None:
    clock = [time.time()]
    v = make(pki, clock=lambda: clock[0], max_age_s=300, max_skew_s=60)
    for _ in range(20):
        assert code_of(v, pki.sign(payload(signed_date_ms=int(clock[0] * 1000)))) is None
    assert v.replay_entries == 20
    old_token = pki.sign(payload(signed_date_ms=int(clock[0] * 1000)))
    assert code_of(v, old_token) is None
    clock[0] += 361
    assert code_of(v, pki.sign(payload(signed_date_ms=int(clock[0] * 1000)))) is None
    assert v.replay_entries == 1  # the 21 old entries expired
    assert code_of(v, old_token) == "stale_request"  # and their replays are stale anyway


def test_replay_memory_is_never_walked_by_the_garbage_collector_and_sweeps_in_expiry_order(pki: TestPKI) -> None:
    import gc

    clock = [time.time()]
    v = make(pki, clock=lambda: clock[0], max_age_s=300, max_skew_s=60)
    for i in range(5000):  # ids alone: the memory under test, without the cost of 5,000 signatures
        v._remember(f"{i:08x}-0000-4000-8000-000000000000", clock[0] + i * 0.01)
    assert v.replay_entries == 5000
    # only strings and floats: no container the cyclic GC walks holds the 5,000 entries
    memory = v.replay
    assert isinstance(memory, InProcessReplayMemory)
    walked = [name for name, x in vars(memory).items() if gc.is_tracked(x) and hasattr(x, "__len__") and len(x) >= 5000]
    assert walked == [] and not gc.is_tracked(memory._seen)
    # 370 s on, the ids written in the first 10 s (i = 0 ... 1000) are past their 360 s window, and only those
    clock[0] += 360 + 10.0
    v._remember("ffffffff-0000-4000-8000-000000000000", clock[0])
    assert v.replay_entries == 5000 - 1001 + 1
    # an id answered again after its window is accepted and, written again, expires last
    v._remember("00000000-0000-4000-8000-000000000000", clock[0])
    assert list(memory._seen)[-1] == "00000000-0000-4000-8000-000000000000"
    with pytest.raises(VerificationError) as exc:
        v._remember("00000000-0000-4000-8000-000000000000", clock[0] + 1)
    assert exc.value.code == "replayed_request"


# ---------------------------------------------------------------------------------------------------------
# Nothing but VerificationError escapes
# ---------------------------------------------------------------------------------------------------------
def test_random_mutations_only_raise_verification_errors(pki: TestPKI) -> None:
    rng = random.Random(7)
    v = make(pki, cache_size=8)
    token = pki.signed_request()
    alphabet = "ABCxyz019-_.=+/ \x00é"
    for _ in range(400):
        chars = list(token)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(chars))
            if op < 0.5:
                chars[i] = rng.choice(alphabet)
            elif op < 0.75:
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        mutated = "".join(chars)
        with contextlib.suppress(VerificationError):  # anything else fails the test
            v.verify(mutated)


def test_payload_json_nested_deep_is_a_verification_error(pki: TestPKI) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    assert code_of(make(pki), pki.sign(deep)) == "invalid_payload"
    header_seg = b64url(b'{"alg":"ES256","x5c":' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert code_of(make(pki), f"{header_seg}.{b64url(b'{}')}.AAAA") in {"malformed_jws", "bad_chain_length"}


# ---------------------------------------------------------------------------------------------------------
# Generic signed data (notifications, transactions)
# ---------------------------------------------------------------------------------------------------------
def test_verify_signed_data_returns_the_payload_dict(pki: TestPKI) -> None:
    v = make(pki)
    note = {"notificationType": "DID_RENEW", "notificationUUID": str(uuid.uuid4()), "signedDate": int(time.time() * 1000),
            "data": {"appAppleId": 1, "environment": "Production", "signedTransactionInfo": "x"}}  # fmt: skip
    assert v.verify_signed_data(pki.sign(note)) == note
    # No freshness, app or environment rules here, and no replay: the same token passes twice.
    old = dict(note, signedDate=int((time.time() - 86400) * 1000))
    token = pki.sign(old)
    assert v.verify_signed_data(token) == old and v.verify_signed_data(token) == old
    app_tx = {"receiptCreationDate": int(time.time() * 1000), "bundleId": "b"}
    assert v.verify_signed_data(pki.sign(app_tx)) == app_tx


def test_verify_signed_data_checks_chain_signature_and_date(pki: TestPKI) -> None:
    v = make(pki)
    now_ms = int(time.time() * 1000)
    with pytest.raises(VerificationError) as e:
        v.verify_signed_data(TestPKI.mint().sign({"signedDate": now_ms}))
    assert e.value.code == "untrusted_chain"
    with pytest.raises(VerificationError) as e:
        v.verify_signed_data(pki.sign({"signedDate": now_ms}, key=ec.generate_private_key(ec.SECP256R1())))
    assert e.value.code == "bad_signature"
    with pytest.raises(VerificationError) as e:
        v.verify_signed_data(pki.sign({"signedDate": int(pki.leaf_cert.not_valid_after_utc.timestamp() * 1000) + 1}))
    assert e.value.code == "certificate_expired"
    for bad in ({"x": 1}, {"signedDate": "1"}, [1]):
        with pytest.raises(VerificationError) as e:
            v.verify_signed_data(pki.sign(bad))  # type: ignore[arg-type]
        assert e.value.code == "invalid_payload"
    with pytest.raises(VerificationError) as e:
        v.verify_signed_data("a.b")
    assert e.value.code == "malformed_jws"


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------
def test_load_roots_reads_der_and_multi_certificate_pem(pki: TestPKI, tmp_path: Path) -> None:
    other = TestPKI.mint()
    pki.write(tmp_path / "a")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((tmp_path / "a" / "root.pem").read_bytes() + (tmp_path / "a" / "intermediate.pem").read_bytes())
    roots = load_roots([str(tmp_path / "a" / "root.der"), str(bundle)])
    assert [r.subject for r in roots] == [pki.root_cert.subject, pki.root_cert.subject, pki.intermediate_cert.subject]
    assert not has_apple_root_g3(roots)
    del other


def test_load_roots_errors_are_one_sentence(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    notcert = tmp_path / "x.der"
    notcert.write_bytes(b"\x30\x03\x02\x01\x01")
    for path in (tmp_path / "missing.pem", garbage, notcert, tmp_path):
        with pytest.raises(ValueError) as e:
            load_roots([str(path)])
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_from_settings(pki: TestPKI, tmp_path: Path) -> None:
    root = pki.write(tmp_path / "ca")
    with pytest.raises(ValueError, match="root certificate"):
        RequestVerifier.from_settings(Settings(app_apple_id=APP_ID, environment="Sandbox"))
    with pytest.raises(ValueError, match="app"):
        RequestVerifier.from_settings(Settings(root_certs=(str(root),), environment="Sandbox"))
    v = RequestVerifier.from_settings(
        Settings(root_certs=(str(root),), app_apple_id=APP_ID, environment="Sandbox", max_age_s=10.0)
    )
    assert v.max_age_s == 10.0 and code_of(v, pki.signed_request()) is None


def test_constructor_fails_fast_on_bad_configuration(pki: TestPKI) -> None:
    with pytest.raises(ValueError):
        RequestVerifier([], app_apple_id=APP_ID, environment="Sandbox")
    with pytest.raises(ValueError):
        RequestVerifier([pki.root_cert], app_apple_id=APP_ID, environment="Staging")
    with pytest.raises(ValueError):
        RequestVerifier([pki.root_cert], app_apple_id=APP_ID, environment="Sandbox", max_age_s=0)


def test_validate_chain_takes_der_and_a_date(pki: TestPKI) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = pki.leaf_cert.public_bytes(Encoding.DER)
    inter = pki.intermediate_cert.public_bytes(Encoding.DER)
    chain = validate_chain(leaf, inter, [pki.root_cert], datetime.now(UTC))
    assert chain.root == pki.root_cert
    with pytest.raises(VerificationError) as e:
        validate_chain(leaf, inter, [pki.root_cert], pki.leaf_cert.not_valid_after_utc + timedelta(seconds=1))
    assert e.value.code == "certificate_expired"
    with pytest.raises(VerificationError) as e:
        validate_chain(leaf, inter, [TestPKI.mint().root_cert], datetime.now(UTC))
    assert e.value.code == "untrusted_chain"
    with pytest.raises(VerificationError) as e:
        validate_chain(b"junk", inter, [pki.root_cert])
    assert e.value.code == "malformed_jws"


# ---------------------------------------------------------------------------------------------------------
# Never-seen forged chains: cheap checks first, CA signatures off the event loop and bounded
# ---------------------------------------------------------------------------------------------------------
class _SignatureSpy:
    """Stands in for serving.verify._signed_by: records the threads and the concurrency of the CA signature checks."""

    def __init__(self, real: Any, hold_s: float = 0.0) -> None:
        self.real, self.hold_s = real, hold_s
        self.calls: list[int] = []  # thread ids
        self.running = self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self, child: Any, parent: Any) -> bool:
        with self._lock:
            self.calls.append(threading.get_ident())
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.hold_s:
                time.sleep(self.hold_s)  # keep the check running so that the flood's requests overlap it
            return bool(self.real(child, parent))
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def signature_spy(monkeypatch: pytest.MonkeyPatch) -> _SignatureSpy:
    import serving.verify as verify_module

    spy = _SignatureSpy(verify_module._signed_by)
    monkeypatch.setattr(verify_module, "_signed_by", spy)
    return spy


def test_a_leaf_with_one_byte_changed_is_refused_as_untrusted_on_both_paths(pki: TestPKI) -> None:
    import asyncio

    token = pki.sign(payload(), x5c=pki.x5c_with_forged_leaf(3))
    assert code_of(make(pki), token) == "untrusted_chain"
    with off_loop() as off, pytest.raises(VerificationError) as exc:
        asyncio.run(make(pki).verify_async(token, off))
    assert exc.value.code == "untrusted_chain" and ERROR_STATUS[exc.value.code] == 401


def test_a_flood_of_distinct_forged_chains_checks_at_most_the_bound_at_once_and_never_on_the_loop(
    pki: TestPKI, signature_spy: _SignatureSpy
) -> None:
    import asyncio

    signature_spy.hold_s = 0.005
    v = make(pki, chain_checks=2)
    assert code_of(v, pki.signed_request()) is None  # the good chain is known, its intermediate too
    signature_spy.calls.clear()
    forged = [pki.sign(payload(), x5c=pki.x5c_with_forged_leaf(i)) for i in range(60)]

    async def flood(off: Any) -> tuple[int, list[str]]:
        loop_thread = threading.get_ident()

        async def one(token: str) -> str:
            try:
                await v.verify_async(token, off)
            except VerificationError as exc:
                return exc.code
            return "accepted"

        return loop_thread, list(await asyncio.gather(*(one(t) for t in forged)))

    with off_loop(2) as off:
        loop_thread, codes = asyncio.run(flood(off))
    assert set(codes) <= {"untrusted_chain", "chain_check_busy"} and "untrusted_chain" in codes
    assert "chain_check_busy" in codes  # beyond the bound, refused at once (503), not queued
    assert ERROR_STATUS["chain_check_busy"] == 503
    assert signature_spy.max_running <= 2
    # the intermediate is known good: one CA signature check (the leaf's) per chain checked, none on the loop
    assert len(signature_spy.calls) == codes.count("untrusted_chain")
    assert loop_thread not in signature_spy.calls
    # a refused chain is remembered: the same forged chain again costs no signature check
    before = len(signature_spy.calls)
    checked = forged[codes.index("untrusted_chain")]
    assert code_of(v, checked) == "untrusted_chain" and len(signature_spy.calls) == before
    # a busy refusal is a verdict on the load, not on the chain: sent again, the chain is checked
    assert code_of(v, forged[codes.index("chain_check_busy")]) == "untrusted_chain"


def test_forged_chains_push_no_good_chain_out_of_the_caches(pki: TestPKI, signature_spy: _SignatureSpy) -> None:
    v = make(pki, cache_size=8)
    good = pki.with_leaf()
    assert code_of(v, good.signed_request()) is None and code_of(v, pki.signed_request()) is None
    for i in range(50):  # many more never-seen forged chains than the caches hold
        assert code_of(v, pki.sign(payload(), x5c=pki.x5c_with_forged_leaf(i))) == "untrusted_chain"
    signature_spy.calls.clear()
    assert code_of(v, good.signed_request()) is None and code_of(v, pki.signed_request()) is None
    assert signature_spy.calls == []  # both good chains answered from memory


def test_cheap_checks_refuse_before_any_signature_check(pki: TestPKI, signature_spy: _SignatureSpy) -> None:
    v = make(pki)
    other = TestPKI.mint()  # same names, other keys: refused by the key identifiers alone
    assert code_of(v, other.signed_request()) == "untrusted_chain"
    assert code_of(v, pki.with_leaf(leaf_oid=False).signed_request()) == "missing_apple_oid"
    impostor_leaf = [other.x5c[0], *pki.x5c[1:]]  # a leaf another intermediate issued
    assert code_of(v, pki.sign(payload(), x5c=impostor_leaf)) == "untrusted_chain"
    assert signature_spy.calls == []


def test_concurrent_first_requests_on_one_new_chain_are_all_answered_after_one_check(
    pki: TestPKI, signature_spy: _SignatureSpy
) -> None:
    import asyncio

    signature_spy.hold_s = 0.005
    v = make(pki, chain_checks=1)  # a worker just started: Apple's first requests all carry one unseen chain
    tokens = [pki.signed_request() for _ in range(20)]

    async def burst(off: Any) -> list[str | None]:
        async def send(token: str) -> str | None:
            try:
                await v.verify_async(token, off)
            except VerificationError as exc:
                return exc.code
            return None

        return list(await asyncio.gather(*(send(t) for t in tokens)))

    with off_loop() as off:
        codes = asyncio.run(burst(off))
    assert codes == [None] * 20
    assert len(signature_spy.calls) == 2  # the intermediate's and the leaf's signatures, once


def test_an_app_apple_id_the_log_cannot_store_is_refused_even_when_relaxed(pki: TestPKI) -> None:
    relaxed = make(pki, relax_app_id_in_sandbox=True)  # any appAppleId passes, so it must fit the log's 64 bits
    assert code_of(relaxed, pki.sign(payload(app_apple_id=2**63))) == "invalid_payload"
    assert code_of(relaxed, pki.sign(payload(app_apple_id=2**63 - 1))) is None


@pytest.mark.parametrize("field", ["original_transaction_id", "product_id", "user_locale"])
def test_a_nul_character_the_postgresql_log_cannot_store_is_refused(pki: TestPKI, field: str) -> None:
    # PostgreSQL's text cannot hold U+0000: logged, such a decision would stop every batch behind it
    v = make(pki)
    value = {"original_transaction_id": "2000\x00001", "product_id": "com.example.premium.monthly\x00",
             "user_locale": "en\x00US"}[field]
    assert code_of(v, pki.sign(payload(**{field: value}))) == "invalid_payload"
