"""Our verifier and Apple's SignedDataVerifier give the same verdict on a corpus of tokens.

Except where ours is deliberately stricter, case by case (STRICTER below). Apple's library raises its
VerificationException for most refusals but lets cattrs and other errors escape for malformed payloads;
any exception counts as "rejected" here.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from serving.errors import VerificationError
from serving.testpki import CorpusCase, TestPKI, token_corpus
from serving.verify import RequestVerifier

appstore = pytest.importorskip("appstoreserverlibrary.signed_data_verifier")
from appstoreserverlibrary.models.Environment import Environment  # noqa: E402

APP_ID = 1234567890

# name -> why ours refuses a token Apple's library accepts
STRICTER: dict[str, str] = {
    "wrong_app_sandbox": "Apple's library checks appAppleId only in Production; we check it in Sandbox too",
    "stale_signed_date": "Apple's library does not check signedDate freshness; we refuse older than max_age_s",
    "future_signed_date": "Apple's library does not check signedDate freshness; we refuse beyond max_skew_s ahead",
    "replayed_request": "Apple's library has no replay memory; we answer a requestIdentifier once",
    "leaf_is_ca": "OpenSSL accepts a CA certificate as the signing leaf; an App Store leaf never is one",
    "app_apple_id_as_string": "cattrs turns the string '1234567890' into an int; we want the JSON type Apple documents",
}


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.mint()


@pytest.fixture(scope="module")
def corpus(pki: TestPKI) -> list[CorpusCase]:
    return token_corpus(pki, app_apple_id=APP_ID)


def _ours(pki: TestPKI, case: CorpusCase) -> str | None:
    v = RequestVerifier([pki.root_cert], app_apple_id=APP_ID, environment=case.environment)
    verdict: str | None = None
    for _ in range(2 if case.twice else 1):
        try:
            v.verify(case.token)
            verdict = None
        except VerificationError as exc:
            verdict = exc.code
    return verdict


def _apple(pki: TestPKI, case: CorpusCase) -> bool:
    """Return True when Apple's verifier accepts the token (the second time, for a replay case)."""
    verifier: Any = appstore.SignedDataVerifier(
        [pki.root_cert.public_bytes(Encoding.DER)],
        enable_online_checks=False,
        environment=Environment(case.environment),
        bundle_id="com.example.app",
        app_apple_id=APP_ID,
    )
    accepted = False
    for _ in range(2 if case.twice else 1):
        try:
            verifier.verify_and_decode_realtime_request(case.token)
            accepted = True
        except Exception:  # VerificationException, cattrs' ClassValidationError, ValueError...
            accepted = False
    return accepted


def test_corpus_is_large_and_covers_the_issue_list(corpus: list[CorpusCase]) -> None:
    names = {c.name for c in corpus}
    assert len(corpus) >= 30
    required = {
        "alg_none", "alg_es384", "alg_hs256_with_leaf_public_key", "signed_by_other_key", "x5c_two_certs",
        "x5c_four_certs", "untrusted_root_apple_names", "leaf_intermediate_swapped", "leaf_missing_oid",
        "intermediate_missing_oid", "leaf_expired", "leaf_not_yet_valid", "leaf_unknown_critical_extension",
        "crit_header", "payload_changed_after_signing", "der_signature", "request_identifier_not_uuid",
        "wrong_environment", "unknown_environment",
        *(f"missing_{f}" for f in ("originalTransactionId", "appAppleId", "productId", "userLocale",
                                   "requestIdentifier", "environment", "signedDate")),
    }  # fmt: skip
    assert required <= names, required - names
    assert set(STRICTER) <= names


def test_same_verdict_as_apples_library_except_where_named(pki: TestPKI, corpus: list[CorpusCase]) -> None:
    mismatches = []
    for case in corpus:
        ours = _ours(pki, case)
        apple_accepts = _apple(pki, case)
        assert ours == case.code, f"{case.name}: ours gave {ours}, expected {case.code}"
        if case.name in STRICTER:
            # Deliberately stricter: Apple accepts, we refuse.
            if not (apple_accepts and ours is not None):
                mismatches.append(f"{case.name}: expected Apple to accept and us to refuse ({STRICTER[case.name]})")
        elif apple_accepts != (ours is None):
            mismatches.append(f"{case.name}: Apple {'accepts' if apple_accepts else 'rejects'}, ours gives {ours}")
    assert not mismatches, "\n".join(mismatches)
