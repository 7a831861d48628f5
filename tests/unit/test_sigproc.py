"""The signature process: its checks agree with OpenSSL in the server, its nonces make offers that verify, no job is lost."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from serving import sigproc
from serving.offers import P256_N, OfferSigner
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


def test_nonces_made_ahead_give_offer_signatures_that_verify_and_are_never_reused(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """2,000 offers signed with the child's nonce pairs: each verifies with the public key, and no r repeats."""
    signer = OfferSigner(key, key_id="KEY123", issuer_id="issuer-1", bundle_id="com.example.app")
    proc = SignatureProcess(Fallback(), nonces=True)
    proc.start()

    async def main() -> list[tuple[int, int] | None]:
        got = []
        for i in range(2000):
            got.append(proc.take_nonce())
            if i % 100 == 0:
                await asyncio.sleep(0.02)  # the loop turns: asked-for pairs arrive
        return got

    try:
        pairs = asyncio.run(main())
    finally:
        proc.stop()
    used = [p for p in pairs if p is not None]
    assert len(used) > 1500  # the child keeps up; a None is signed by OpenSSL instead
    assert len({r for _, r in used}) == len(used)  # a nonce is never used twice
    before = int(time.time())
    for i, pair in enumerate(used):
        token = signer.sign(product_id="com.example.monthly", offer_identifier="offer-50", transaction_id=f"{i}", nonce=pair)
        claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="promotional-offer")
        assert claims["transactionId"] == f"{i}" and before <= claims["iat"] <= time.time() + 1
        assert token.split(".")[2] != ""
        r = int.from_bytes(base64.urlsafe_b64decode(token.split(".")[2] + "=="), "big") >> 256
        assert r == pair[1]  # the signature is the one made with that pair


def test_a_signature_with_a_nonce_equals_the_ecdsa_definition(key: ec.EllipticCurvePrivateKey) -> None:
    """s = k⁻¹ (e + r·d) mod n, checked against an independent computation from k itself."""
    n = P256_N
    d = key.private_numbers().private_value
    k = 0x1D2C3B4A5968778695A4B3C2D1E0F1E2D3C4B5A69788796A5B4C3D2E1F0E1D2C % n
    r = ec.derive_private_key(k, ec.SECP256R1()).public_key().public_numbers().x % n
    signer = OfferSigner(key, key_id="K", issuer_id="I", bundle_id="B")
    token = signer.sign(product_id="p", offer_identifier="o", transaction_id="1", nonce=(pow(k, -1, n), r))
    signing_input, _, sig = token.rpartition(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    e = int.from_bytes(hashlib.sha256(signing_input.encode()).digest(), "big")
    assert raw == r.to_bytes(32, "big") + (pow(k, -1, n) * (e + r * d) % n).to_bytes(32, "big")
    pub = key.public_key()
    pub.verify(encode_dss_signature(r, int.from_bytes(raw[32:], "big")), signing_input.encode(), ec.ECDSA(hashes.SHA256()))


def test_without_the_child_no_nonce_is_handed_out(key: ec.EllipticCurvePrivateKey) -> None:
    """Not started, started without nonces, or stopped: take_nonce returns None (OpenSSL then signs)."""
    not_started = SignatureProcess(Fallback(), nonces=True)
    without = SignatureProcess(Fallback(), nonces=False)
    without.start()

    async def take(proc: SignatureProcess) -> list[tuple[int, int] | None]:
        out = []
        for _ in range(5):
            out.append(proc.take_nonce())
            await asyncio.sleep(0.02)
        return out

    try:
        assert asyncio.run(take(not_started)) == [None] * 5
        assert asyncio.run(take(without)) == [None] * 5
    finally:
        without.stop()


def test_nonces_keep_coming_after_the_first_loop_closed_with_a_request_pending(key: ec.EllipticCurvePrivateKey) -> None:
    """A request for nonces left pending by a closed loop does not stop the next loop from getting them."""
    proc = SignatureProcess(Fallback(), nonces=True)
    proc.start()

    async def ask_and_leave() -> None:
        assert proc.take_nonce() is None  # asks; the loop closes before the answer is read

    async def take_until_one() -> tuple[int, int] | None:
        for _ in range(200):
            pair = proc.take_nonce()
            if pair is not None:
                return pair
            await asyncio.sleep(0.01)
        return None

    try:
        asyncio.run(ask_and_leave())
        pair = asyncio.run(take_until_one())
    finally:
        proc.stop()
    assert pair is not None


def test_a_signing_input_larger_than_the_pipe_is_written_in_parts_and_checked_in_the_child(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """300 kB signing inputs (the pipe holds 64 kB): written in parts as the pipe drains, checked whole."""
    fallback = Fallback()
    proc = SignatureProcess(fallback)
    proc.start()
    chain = _chain(key)
    big = [b"h." + bytes([65 + i]) * 300_000 for i in range(3)]
    sigs = [_jws_sig(key, d) for d in big]

    async def main() -> list[bool]:
        return await asyncio.gather(
            *(proc(chain, d, s) for d, s in zip(big, sigs, strict=True)),
            proc(chain, big[0] + b"x", sigs[0]),
        )

    try:
        assert asyncio.run(main()) == [True, True, True, False]
    finally:
        proc.stop()
    assert fallback.calls == 0


def test_a_forked_copy_never_hands_out_the_parents_nonces(key: ec.EllipticCurvePrivateKey) -> None:
    """The pool remembers the process that filled it; in any other process it is emptied before use."""
    proc = SignatureProcess(Fallback(), nonces=False)  # no child: the pool is filled by hand
    parents = [(1234567 + i, 7654321 + i) for i in range(5)]
    proc._pool.extend(parents)
    assert proc.take_nonce() == parents[0]
    proc._pool_pid = -1  # what a forked child sees: the pool was filled by another process
    assert proc.take_nonce() is None
    assert not proc._pool
