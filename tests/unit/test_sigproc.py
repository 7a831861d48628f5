"""The signature process: its checks agree with OpenSSL in the server, its offers verify, and it never loses a job."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from serving import sigproc
from serving.sigproc import SignatureProcess
from serving.verify import verify_es256


@dataclass(frozen=True)
class Chain:
    """What a check needs of a verified chain: the leaf key and its X9.62 point."""

    leaf_key: ec.EllipticCurvePublicKey
    leaf_point: bytes


def _chain(key: ec.EllipticCurvePrivateKey, point: bytes | None = None) -> Chain:
    pub = key.public_key()
    return Chain(pub, point or pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))


def _jws_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


class Fallback:
    """The server-side check, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, chain: Any, signing_input: bytes, signature: bytes) -> bool:
        self.calls += 1
        return verify_es256(chain.leaf_key, signing_input, signature)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cases(key: ec.EllipticCurvePrivateKey, n: int) -> list[tuple[Chain, bytes, bytes, bool]]:
    """n checks, mixed: valid, tampered input, tampered signature, another key's signature."""
    other = ec.generate_private_key(ec.SECP256R1())
    chain = _chain(key)
    out = []
    for i in range(n):
        data = b"header." + f"payload-{i}".encode() * (1 + i % 300)  # up to ~3 kB, like a real signing input
        sig = _jws_sig(key, data)
        kind = i % 4
        if kind == 0:
            out.append((chain, data, sig, True))
        elif kind == 1:
            out.append((chain, data + b"x", sig, False))
        elif kind == 2:
            out.append((chain, data, sig[:40] + bytes([sig[40] ^ 1]) + sig[41:], False))
        else:
            out.append((chain, data, _jws_sig(other, data), False))
    return out


def test_checks_in_the_child_agree_with_the_server_and_come_back_together(key: ec.EllipticCurvePrivateKey) -> None:
    """200 concurrent checks, a quarter valid: each answer is OpenSSL's, none went to the fallback."""
    fallback = Fallback()
    proc = SignatureProcess(fallback)
    proc.start()
    cases = _cases(key, 200)

    async def main() -> list[bool]:
        return await asyncio.gather(*(proc(c, d, s) for c, d, s, _ in cases))

    try:
        got = asyncio.run(main())
    finally:
        proc.stop()
    assert got == [want for *_, want in cases]
    assert sum(got) == 50
    assert fallback.calls == 0
    assert not proc.running


def test_a_check_the_child_cannot_make_is_made_by_the_fallback(key: ec.EllipticCurvePrivateKey) -> None:
    """A point the child cannot load (here: not on the curve) is not guessed at: the server checks it."""
    fallback = Fallback()
    proc = SignatureProcess(fallback)
    proc.start()
    data = b"header.payload"
    chain = _chain(key, point=b"\x04" + bytes(64))

    async def main() -> tuple[bool, bool]:
        return await proc(chain, data, _jws_sig(key, data)), await proc(chain, data + b"!", _jws_sig(key, data))

    try:
        assert asyncio.run(main()) == (True, False)
    finally:
        proc.stop()
    assert fallback.calls == 2


def test_a_killed_child_loses_no_check_and_is_started_again(
    key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks pending when the child dies, and those made while it is down, get the right answer in the server."""
    monkeypatch.setattr(sigproc, "RESTART_AFTER_S", 0.2)
    fallback = Fallback()
    proc = SignatureProcess(fallback)
    proc.start()
    cases = _cases(key, 40)

    async def main() -> tuple[list[bool], list[bool], int | None]:
        first_pid = proc.pid
        assert first_pid is not None
        await proc(*cases[0][:3])  # attached and running
        pending = [asyncio.ensure_future(proc(c, d, s)) for c, d, s, _ in cases]
        await asyncio.sleep(0)  # queued and written
        os.kill(first_pid, signal.SIGKILL)
        during = await asyncio.gather(*pending)
        await asyncio.sleep(0.3)  # past the pause: the next check starts a new child
        after = await asyncio.gather(*(proc(c, d, s) for c, d, s, _ in cases))
        assert proc.pid is not None and proc.pid != first_pid
        for _ in range(100):  # the new child reports ready on its own; checks then go to it again
            calls = fallback.calls
            assert await proc(*cases[0][:3]) is True
            if fallback.calls == calls:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the restarted child never took checks again")
        return during, after, proc.pid

    try:
        during, after, _ = asyncio.run(main())
    finally:
        proc.stop()
    want = [w for *_, w in cases]
    assert during == want
    assert after == want
    assert fallback.calls > 0  # the checks pending at the kill were made in the server
    assert proc.restarts == 1


def test_after_stop_and_on_another_loop_the_fallback_checks(key: ec.EllipticCurvePrivateKey) -> None:
    fallback = Fallback()
    proc = SignatureProcess(fallback)
    chain, data, sig, _ = _cases(key, 1)[0]
    assert asyncio.run(proc(chain, data, sig)) is True  # never started: the fallback
    assert fallback.calls == 1
    proc.start()
    try:
        assert asyncio.run(proc(chain, data, sig)) is True  # the child, attached to this loop
        assert fallback.calls == 1

        async def other_loop_while_attached() -> bool:
            return await proc(chain, data, sig)

        # the first loop is closed now: the child attaches to the next one
        assert asyncio.run(other_loop_while_attached()) is True
        assert fallback.calls == 1
        pid = proc.pid
    finally:
        proc.stop()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child has ended
    assert asyncio.run(proc(chain, data, sig)) is True
    assert fallback.calls == 2


def _claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def test_offer_signatures_from_the_child_verify_and_carry_the_transaction(
    key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    p8 = tmp_path / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    proc = SignatureProcess(Fallback(), offer_key=(str(p8), "KEY123", "issuer-1", "com.example.app"))
    proc.start()

    async def main() -> list[str | None]:
        return await asyncio.gather(*(proc.sign_offer("com.example.monthly", "offer-50", f"{1000 + i}") for i in range(20)))

    before = int(time.time())
    try:
        tokens = asyncio.run(main())
    finally:
        proc.stop()
    nonces = set()
    for i, token in enumerate(tokens):
        assert token is not None
        claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="promotional-offer")
        assert claims == _claims(token)
        assert claims["transactionId"] == f"{1000 + i}"
        assert claims["productId"] == "com.example.monthly" and claims["offerIdentifier"] == "offer-50"
        assert claims["bid"] == "com.example.app" and claims["iss"] == "issuer-1"
        assert before <= claims["iat"] <= time.time() + 1
        assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "KEY123", "typ": "JWT"}
        nonces.add(claims["nonce"])
    assert len(nonces) == 20  # minted per request, cached nowhere


def test_without_a_key_or_a_child_the_server_signs_offers(key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    """sign_offer returns None (the server's own signer then signs) when the child has no key or cannot load it."""
    no_key = SignatureProcess(Fallback())
    no_key.start()
    bad = tmp_path / "not-a-key.p8"
    bad.write_text("not a key")
    bad_key = SignatureProcess(Fallback(), offer_key=(str(bad), "K", "I", "B"))
    bad_key.start()
    try:
        assert asyncio.run(no_key.sign_offer("p", "o", "1")) is None
        assert asyncio.run(bad_key.sign_offer("p", "o", "1")) is None
        assert bad_key.running  # the child still checks signatures
    finally:
        no_key.stop()
        bad_key.stop()
