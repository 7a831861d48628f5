"""Apple's real App Store signing chain passes our chain validation inside its validity and fails outside.

The certificates are public data read from ../shared/vectors/apple; the test skips, with a reason, where
that folder is absent. No private key exists for them, so the chain check is tested on its own.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from serving.errors import VerificationError
from serving.testpki import TestPKI
from serving.verify import RequestVerifier, has_apple_root_g3, load_roots, validate_chain

APPLE = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "apple"
INSIDE = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def apple() -> dict[str, bytes]:
    if not (APPLE / "apple-root-ca-g3.der").is_file():
        pytest.skip(f"Apple's chain not found at {APPLE} (../shared/vectors is absent)")
    return {n: (APPLE / f"{n}.der").read_bytes() for n in ("apple-root-ca-g3", "apple-wwdr-g6", "apple-app-store-signing-leaf")}


@pytest.fixture(scope="module")
def roots(apple: dict[str, bytes]) -> list[x509.Certificate]:
    return load_roots([str(APPLE / "apple-root-ca-g3.der")])


def test_real_root_is_recognised_as_apple_root_g3(roots: list[x509.Certificate]) -> None:
    assert has_apple_root_g3(roots)
    assert load_roots([str(APPLE / "apple-root-ca-g3.pem")])[0] == roots[0]
    assert not has_apple_root_g3([TestPKI.mint().root_cert])


def test_real_chain_passes_inside_its_validity(apple: dict[str, bytes], roots: list[x509.Certificate]) -> None:
    chain = validate_chain(apple["apple-app-store-signing-leaf"], apple["apple-wwdr-g6"], roots, INSIDE)
    assert chain.root == roots[0]
    assert chain.not_after == datetime(2027, 10, 13, 17, 47, 23, tzinfo=UTC).timestamp()  # the leaf's notAfter


@pytest.mark.parametrize(
    ("when", "code"),
    [
        (datetime(2027, 10, 13, 17, 47, 24, tzinfo=UTC), "certificate_expired"),  # one second after notAfter
        (datetime(2030, 1, 1, tzinfo=UTC), "certificate_expired"),
        (datetime(2025, 9, 19, 19, 44, 50, tzinfo=UTC), "certificate_expired"),  # one second before notBefore
    ],
)
def test_real_chain_is_refused_outside_its_validity(
    apple: dict[str, bytes], roots: list[x509.Certificate], when: datetime, code: str
) -> None:
    with pytest.raises(VerificationError) as exc:
        validate_chain(apple["apple-app-store-signing-leaf"], apple["apple-wwdr-g6"], roots, when)
    assert exc.value.code == code


def test_real_chain_at_its_last_valid_second(apple: dict[str, bytes], roots: list[x509.Certificate]) -> None:
    last = datetime(2027, 10, 13, 17, 47, 23, tzinfo=UTC)
    validate_chain(apple["apple-app-store-signing-leaf"], apple["apple-wwdr-g6"], roots, last)


def test_real_chain_needs_the_real_root_configured(apple: dict[str, bytes]) -> None:
    impostor_roots = [TestPKI.mint().root_cert]
    with pytest.raises(VerificationError) as exc:
        validate_chain(apple["apple-app-store-signing-leaf"], apple["apple-wwdr-g6"], impostor_roots, INSIDE)
    assert exc.value.code == "untrusted_chain"


def test_real_chain_swapped_is_refused(apple: dict[str, bytes], roots: list[x509.Certificate]) -> None:
    with pytest.raises(VerificationError) as exc:
        validate_chain(apple["apple-wwdr-g6"], apple["apple-app-store-signing-leaf"], roots, INSIDE)
    assert exc.value.code == "untrusted_chain"


def test_a_token_on_the_real_chain_reaches_the_signature_check(apple: dict[str, bytes], roots: list[x509.Certificate]) -> None:
    # Without Apple's key we cannot sign, but a token carrying the real chain gets past every chain rule
    # and fails only at the signature: proof the request path accepts Apple's real certificates.
    pki = TestPKI.mint()
    x5c = [base64.b64encode(apple[n]).decode() for n in ("apple-app-store-signing-leaf", "apple-wwdr-g6", "apple-root-ca-g3")]
    payload = TestPKI.request_payload(signed_date_ms=int(INSIDE.timestamp() * 1000))
    verifier = RequestVerifier(roots, app_apple_id=1234567890, environment="Sandbox", clock=INSIDE.timestamp)
    with pytest.raises(VerificationError) as exc:
        verifier.verify(pki.sign(payload, x5c=x5c))
    assert exc.value.code == "bad_signature"
