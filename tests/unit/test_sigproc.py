"""The signature process: its checks agree with OpenSSL in the server, no job is lost."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Any

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
