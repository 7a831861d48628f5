"""Promotional offer signatures: verify with the public key, carry every claim, match Apple's creator."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from serving.offers import OfferSigner
from serving.settings import Settings

KEY_ID = "ABCDEFGHIJ"
ISSUER_ID = "5c3a0a8e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"
BUNDLE_ID = "com.example.app"
SPEC_CLAIMS = {"iss", "iat", "bid", "aud", "nonce", "productId", "offerIdentifier", "transactionId"}


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def key_file(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "SubscriptionKey_ABCDEFGHIJ.p8"
    path.write_bytes(_pem(key))
    return path


def _settings(key_file: Path | None, **kw: str | None) -> Settings:
    values: dict[str, str | None] = {"offer_key_id": KEY_ID, "offer_issuer_id": ISSUER_ID, "bundle_id": BUNDLE_ID, **kw}
    return Settings(offer_key_file=str(key_file) if key_file else None, **values)  # type: ignore[arg-type]


def _segments(token: str) -> tuple[dict[str, object], dict[str, object]]:
    head, body, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(body)))


def test_signature_verifies_with_public_key_and_carries_every_claim(
    key: ec.EllipticCurvePrivateKey, key_file: Path
) -> None:
    signer = OfferSigner.from_settings(_settings(key_file))
    assert signer is not None
    before = int(time.time())
    token = signer.sign(
        product_id="com.example.premium.monthly", offer_identifier="winback50", transaction_id="2000000123456789"
    )

    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="promotional-offer", issuer=ISSUER_ID)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    assert set(claims) == SPEC_CLAIMS
    assert claims["transactionId"] == "2000000123456789"
    assert claims["productId"] == "com.example.premium.monthly"
    assert claims["offerIdentifier"] == "winback50"
    assert claims["bid"] == BUNDLE_ID
    assert claims["aud"] == "promotional-offer"
    assert before <= claims["iat"] <= int(time.time()) + 1
    nonce = str(claims["nonce"])
    assert nonce == str(uuid.UUID(nonce)) and nonce == nonce.lower()


def test_signature_is_fresh_per_call(key_file: Path) -> None:
    signer = OfferSigner.from_settings(_settings(key_file))
    assert signer is not None
    a = signer.sign(product_id="p", offer_identifier="o", transaction_id="1")
    b = signer.sign(product_id="p", offer_identifier="o", transaction_id="1")
    assert a != b
    assert _segments(a)[1]["nonce"] != _segments(b)[1]["nonce"]


def test_same_shape_as_apples_creator(key: ec.EllipticCurvePrivateKey, key_file: Path) -> None:
    from appstoreserverlibrary.jws_signature_creator import PromotionalOfferV2SignatureCreator

    apple = PromotionalOfferV2SignatureCreator(_pem(key), KEY_ID, ISSUER_ID, BUNDLE_ID).create_signature(
        "p1", "offer1", "42"
    )
    ours = OfferSigner.from_key_file(key_file, key_id=KEY_ID, issuer_id=ISSUER_ID, bundle_id=BUNDLE_ID).sign(
        product_id="p1", offer_identifier="offer1", transaction_id="42"
    )
    apple_head, apple_claims = _segments(apple)
    our_head, our_claims = _segments(ours)
    # the header segment is byte-identical; the claims have the same names, order and values apart from time and nonce
    assert apple_head == our_head and apple.split(".")[0] == ours.split(".")[0]
    assert list(apple_claims) == list(our_claims)
    for name in ("productId", "offerIdentifier", "transactionId", "bid", "iss", "aud"):
        assert apple_claims[name] == our_claims[name]
    assert isinstance(our_claims["iat"], int) and abs(int(our_claims["iat"]) - int(apple_claims["iat"])) <= 2  # type: ignore[call-overload]
    # both verify with the same public key, and the raw r||s signature has Apple's length
    for token in (apple, ours):
        jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="promotional-offer")
        assert len(base64.urlsafe_b64decode(token.split(".")[2] + "==")) == 64


def test_no_key_file_means_no_signer() -> None:
    assert OfferSigner.from_settings(_settings(None)) is None


@pytest.mark.parametrize("missing", ["offer_key_id", "offer_issuer_id", "bundle_id"])
def test_missing_ids_are_refused(key_file: Path, missing: str) -> None:
    with pytest.raises(ValueError, match=missing.replace("offer_", "").replace("_", "-")):
        OfferSigner.from_settings(_settings(key_file, **{missing: None}))


def test_bad_key_files_are_refused_without_showing_the_key(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p384 = ec.generate_private_key(ec.SECP384R1())
    cases = {
        "rsa.p8": _pem(rsa_key),
        "p384.p8": _pem(p384),
        "garbage.p8": b"-----BEGIN PRIVATE KEY-----\nnot base64 at all!!\n-----END PRIVATE KEY-----\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            OfferSigner.from_settings(_settings(path))
        text = str(info.value)
        assert name in text and "\n" not in text
        assert "BEGIN" not in text and "base64" not in text
    with pytest.raises(ValueError, match="cannot read"):
        OfferSigner.from_settings(_settings(tmp_path / "absent.p8"))


def test_repr_never_shows_the_key(key_file: Path) -> None:
    signer = OfferSigner.from_settings(_settings(key_file))
    assert "PRIVATE" not in repr(signer) and KEY_ID in repr(signer)
