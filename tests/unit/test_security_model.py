"""The security model (docs/security.md): offers signed by OpenSSL alone, children that import only our package."""

from __future__ import annotations

import base64
import json
import os
import sys
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


# A stand-in for the signature child: it speaks the pipe protocol, leaves every check to the server (code 2)
# and answers anything else with one nonce pair (k⁻¹, r) for a fixed k, over and over. Had the server signed
# offers with such pairs, two answers would give away the In-App Purchase key.
STAND_IN = '''\
#!{python}
import os, select, struct
from cryptography.hazmat.primitives.asymmetric import ec
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
K = 0x1D2C3B4A5968778695A4B3C2D1E0F1E2D3C4B5A69788796A5B4C3D2E1F0E1D2C
R = ec.derive_private_key(K, ec.SECP256R1()).public_key().public_numbers().x % N
PAIR = pow(K, -1, N).to_bytes(32, "big") + R.to_bytes(32, "big")
HEAD, RESULT = struct.Struct(">IIB65s64s"), struct.Struct(">IBI")
os.write(1, b"R")
buf = b""
while True:
    data = os.read(0, 1 << 16)
    if not data:
        break
    buf += data
    while len(buf) >= HEAD.size:
        n, length, kind = HEAD.unpack_from(buf)[:3]
        if len(buf) < HEAD.size + length:
            break
        buf = buf[HEAD.size + length:]
        if kind == 0:
            os.write(1, RESULT.pack(n, 2, 0))
        else:
            os.write(1, RESULT.pack(n, 1, 64 * 256) + PAIR * 256)
'''


def test_a_signature_child_that_sends_bad_signing_material_changes_no_offer_signature(
    client: Any, pki: Any, offer_key: Any, tmp_path: Path
) -> None:
    """Whatever the signature process sends, every offer is signed by OpenSSL: each verifies, no r repeats."""
    p8, key = offer_key
    stand_in = tmp_path / "stand_in_child.py"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)

    def use_stand_in(svc: Any) -> None:
        assert svc.sigproc is not None
        svc.sigproc.python = str(stand_in)  # started in place of the interpreter, whatever its arguments

    c = client(use_stand_in, epsilon=1.0, offer_key_file=str(p8), **OFFER_IDS)
    assert c.app.state.service.sigproc.pid is not None  # the stand-in runs
    _assert_all_verify_and_no_r_repeats(_offers(c, pki), key.public_key())


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


@pytest.mark.parametrize("verify_with", ["process", "thread"])
def test_offers_are_signed_without_taking_the_private_key_out_of_its_key_object(
    client: Any, pki: Any, offer_key: Any, monkeypatch: pytest.MonkeyPatch, verify_with: str
) -> None:
    """With a key object whose private_numbers/private_bytes raise, the endpoint signs offers that verify."""
    p8, key = offer_key
    real_load = offers.load_offer_key
    monkeypatch.setattr(offers, "load_offer_key", lambda path: _KeyThatNeverLeaves(real_load(path)))
    c = client(epsilon=1.0, offer_key_file=str(p8), verify_with=verify_with, **OFFER_IDS)
    assert isinstance(c.app.state.service.offer_signer._key, _KeyThatNeverLeaves)
    _assert_all_verify_and_no_r_repeats(_offers(c, pki), key.public_key())


# ---- children import only our installed package ------------------------------------------------------------
DECOY_SIGPROC = '''\
"""A decoy signature process: says every signature is valid, and leaves a mark."""
import os, pathlib, struct
pathlib.Path({mark!r}).write_text("decoy signature process ran")
HEAD, RESULT = struct.Struct(">IIB65s64s"), struct.Struct(">IBI")
os.write(1, b"R")
buf = b""
while True:
    data = os.read(0, 1 << 16)
    if not data:
        break
    buf += data
    while len(buf) >= HEAD.size:
        n, length = HEAD.unpack_from(buf)[:2]
        if len(buf) < HEAD.size + length:
            break
        buf = buf[HEAD.size + length:]
        os.write(1, RESULT.pack(n, 1, 0))
'''

@pytest.fixture
def decoy_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a working directory holding a decoy ``serving`` package (and make it the current directory)."""
    cwd = tmp_path / "cwd"
    (cwd / "serving").mkdir(parents=True)
    (cwd / "serving" / "__init__.py").write_text("")
    (cwd / "serving" / "sigproc.py").write_text(DECOY_SIGPROC.format(mark=str(tmp_path / "decoy-sigproc")))
    monkeypatch.chdir(cwd)
    return cwd


def test_children_started_from_a_folder_with_decoy_modules_run_our_code(
    client: Any, pki: Any, decoy_cwd: Path, tmp_path: Path
) -> None:
    """A decoy serving/sigproc.py in the working directory is never run.

    The decoy signature process would answer "valid" to any signature.
    """
    c = client(verify_with="process")
    svc = c.app.state.service
    assert svc.sigproc is not None and svc.sigproc.pid is not None and svc.sigproc.running
    head, payload, sig = pki.signed_request(app_apple_id=APP_ID, environment="Sandbox").split(".")
    sig = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    r = c.post(URL, content=json.dumps({"signedPayload": f"{head}.{payload}.{sig}"}).encode())
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"
    r = c.post(URL, content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    assert r.status_code == 200
    svc.decision_log.flush()
    from serving.log_reader import read_decisions

    assert len(list(read_decisions(svc.decision_log.path))) == 1  # the real writer wrote the row
    assert not (tmp_path / "decoy-sigproc").exists()
    assert os.getcwd() == str(decoy_cwd)
