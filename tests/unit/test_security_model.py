"""The security model (docs/security.md): offers signed by OpenSSL alone, with the key never taken out of its object."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from litestar.testing import TestClient

from serving import offers
from serving.app import create_app
from serving.settings import Settings
from tests.conftest import APP_ID

URL = "/retention/message"
OFFER_IDS = {"offer_key_id": "KEY1", "offer_issuer_id": "issuer-1", "bundle_id": "com.example.app"}


@pytest.fixture
def offer_key(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp_path / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return p8, key


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient[Any]]]:
    """Return a factory of started test clients; `prepare(service)` runs before the service starts."""
    opened: list[TestClient[Any]] = []

    def make(prepare: Callable[[Any], None] = lambda svc: None, **overrides: Any) -> TestClient[Any]:
        app = create_app(make_settings(**overrides))
        prepare(app.state.service)
        c = TestClient(app, raise_server_exceptions=False)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def _offers(c: TestClient[Any], pki: Any, n: int = 60) -> list[tuple[str, str]]:
    """Return (originalTransactionId, promotionalOfferSignatureV2) of the offers among `n` answered requests."""
    got = []
    for i in range(n):
        otid = f"72000{i}"
        r = c.post(URL, content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox",
                                                         original_transaction_id=otid))
        assert r.status_code == 200, r.text
        (kind, obj), = r.json().items()
        if kind == "promotionalOffer":
            got.append((otid, obj["promotionalOfferSignatureV2"]))
    return got


def _r(token: str) -> int:
    """Return the r half of a JWS's raw ES256 signature."""
    return int.from_bytes(base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "=="), "big") >> 256


def _assert_all_verify_and_no_r_repeats(tokens: list[tuple[str, str]], public: ec.EllipticCurvePublicKey) -> None:
    assert len(tokens) >= 3
    for otid, token in tokens:
        claims = jwt.decode(token, public, algorithms=["ES256"], audience="promotional-offer")
        assert claims["transactionId"] == otid
    # two ECDSA signatures with the same r share their nonce, and from the two the private key follows
    assert len({_r(t) for _, t in tokens}) == len(tokens)


class _KeyThatNeverLeaves(ec.EllipticCurvePrivateKey):
    """An In-App Purchase key object whose secret cannot be taken out: it only signs (and gives its public key)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:  # type: ignore[override]
        return self._key.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._key.curve

    @property
    def key_size(self) -> int:
        return self._key.key_size

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise AssertionError("the private key was taken out of its key object (private_numbers)")

    def private_bytes(self, *args: Any, **kw: Any) -> bytes:
        raise AssertionError("the private key was taken out of its key object (private_bytes)")

    def exchange(self, *args: Any, **kw: Any) -> bytes:
        raise AssertionError("the In-App Purchase key is for signing only")

    def __copy__(self) -> _KeyThatNeverLeaves:
        return self

    def __deepcopy__(self, memo: Any) -> _KeyThatNeverLeaves:
        return self


def test_offers_are_signed_without_taking_the_private_key_out_of_its_key_object(
    client: Any, pki: Any, offer_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a key object whose private_numbers/private_bytes raise, the endpoint signs offers that verify."""
    p8, key = offer_key
    real_load = offers.load_offer_key
    monkeypatch.setattr(offers, "load_offer_key", lambda path: _KeyThatNeverLeaves(real_load(path)))
    c = client(epsilon=1.0, offer_key_file=str(p8), **OFFER_IDS)
    assert isinstance(c.app.state.service.offer_signer._key, _KeyThatNeverLeaves)
    _assert_all_verify_and_no_r_repeats(_offers(c, pki), key.public_key())
