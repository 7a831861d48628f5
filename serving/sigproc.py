"""Apple's P-256 signature checks in a child process, so that OpenSSL and the event loop never share the GIL.

The check is the one costly step of verifying a request (~90 µs of OpenSSL). On a thread beside the event
loop (:mod:`serving.offload`) OpenSSL runs without the GIL, but the thread needs the GIL back before and
after every check, and the event loop, which takes the GIL back between every two callbacks, wins that race
nearly every time: under load the thread waited a median 3.8 ms for checks of 0.24 ms (BENCHMARKS.md,
"Endpoint"), and requests waited on it. A child process has its own interpreter: it checks while the loop
runs Python, and the loop pays one pipe write per loop turn and one pipe read per group of results.

The child also mints the promotional offer signatures when an In-App Purchase key is configured: the same
``OfferSigner`` code (fresh nonce and time, cached nowhere), with the key read from its file by the child. An
ECDSA signature cost the loop 70-90 µs under load; the hop costs it a few µs.

Protocol (this module is both ends; the child is ``python -m serving.sigproc GROUP [KEY_FILE KEY_ID ISSUER_ID
BUNDLE_ID]``):

* parent → child, one record a job: a header ``>IIB65s64s`` (job number, length of the data, kind, the leaf
  key as an uncompressed X9.62 point, the raw r||s signature) then the data. Kind 0 checks a signature (the
  data is the signing input); kind 1 signs an offer (point and signature are zeros, the data is the msgpack
  of ``[productId, offerIdentifier, transactionId]``);
* child → parent, one record a job: ``>IBI`` (job number, code, length) then the data: code 1 valid / 0
  invalid / 2 could not do it; the data is the offer JWS for kind 1, empty for kind 0.

The child gets public keys, signed bytes and offer ids; the only secret it holds is the In-App Purchase key,
read from its file as the server reads it, and no secret crosses the pipe. It answers up to ``group``
jobs in one write when more are queued (the loop then resumes those requests in one turn, and they share
one ONNX Runtime run), and at once when nothing else is queued. A job the child could not do (code 2), or
any job pending when the child dies, is done in the server instead (the signature thread checks, the server's
own ``OfferSigner`` signs): a request is never failed or lost because of the child. A child that dies is
started again after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

log = logging.getLogger("retention.sigproc")

HEAD: Final = struct.Struct(">IIB65s64s")
RESULT: Final = struct.Struct(">IBI")
VALID, INVALID, UNCHECKED = 1, 0, 2
CHECK, SIGN = 0, 1
_NO_POINT: Final = bytes(65)
_NO_SIG: Final = bytes(64)
GROUP: Final = 4  # results written together at most (see the module's docstring)
RESTART_AFTER_S: Final = 1.0
READY_TIMEOUT_S: Final = 10.0
READY: Final = b"R"  # the child's first byte: imported, key loaded, reading jobs
_READ_SIZE: Final = 1 << 16

#: The check that runs when the child cannot: ``await fallback(chain, signing_input, signature) -> bool``.
Fallback = Callable[[Any, bytes, bytes], Awaitable[bool]]


class ChildGoneError(Exception):
    """The child exited (or was stopped) with this check pending."""


class SignatureProcess:
    """``await checker(chain, signing_input, signature)``: True when the ES256 signature holds for the chain's leaf.

    The checks (and, with an `offer_key`, the offer signatures: :meth:`sign_offer`) run in one child process,
    started by :meth:`start` and stopped by :meth:`stop`. Before start, after stop, on a loop other than the
    first one used, and for checks the child could not make, the `fallback` runs them.
    """

    def __init__(
        self,
        fallback: Fallback,
        *,
        offer_key: tuple[str, str, str, str] | None = None,
        on_restart: Callable[[], None] | None = None,
        group: int = GROUP,
        python: str = sys.executable,
    ) -> None:
        if group < 1:
            raise ValueError("group must be >= 1")
        self.fallback = fallback
        self.offer_key = offer_key  # (key file, key id, issuer id, bundle id): the child reads the file
        self.group = group
        self.python = python
        self.restarts = 0
        self.on_restart = on_restart
        self._proc: subprocess.Popen[bytes] | None = None
        self._w = -1
        self._r = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._out: list[bytes] = []
        self._unsent = b""
        self._inbuf = b""
        self._next = 0
        self._flush_scheduled = False
        self._stopped = True
        self._ready = False
        self._restart_at = 0.0

    # ---- lifecycle --------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Return True while jobs go to the child."""
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        """Return the child's process id, or None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def start(self, *, wait: bool = True) -> None:
        """Start the child (idempotent); it is attached to the event loop of the first job.

        With `wait` (at server start) this returns once the child is ready (its imports take ~0.1-0.2 s),
        so the first request never waits for them; without it (a restart from the request path) jobs are
        done in the server until the child says it is ready.
        """
        self._stopped = False
        if self._proc is not None:
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [self.python, "-m", "serving.sigproc", str(self.group), *(self.offer_key or ())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True, env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._w, self._r = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        os.set_blocking(self._w, False)
        os.set_blocking(self._r, False)
        self._loop = None
        self._ready = False
        if wait:
            if select.select([self._r], [], [], READY_TIMEOUT_S)[0] and os.read(self._r, 1) == READY:
                self._ready = True
            else:
                self._died(f"it was not ready within {READY_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """Stop the child (it ends on the end of its input); pending jobs are done in the server instead."""
        self._stopped = True
        self._close(ChildGoneError("stopped"))

    def _close(self, why: Exception) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._r)
            loop.remove_writer(self._w)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(why)
        self._out, self._unsent, self._inbuf, self._flush_scheduled = [], b"", b"", False
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ---- request path -----------------------------------------------------------------------------------
    async def __call__(self, chain: Any, signing_input: bytes, signature: bytes) -> bool:
        code, _ = await self._job(CHECK, chain.leaf_point, signature, signing_input)
        if code == UNCHECKED:
            return await self.fallback(chain, signing_input, signature)
        return code == VALID

    async def sign_offer(self, product_id: str, offer_identifier: str, transaction_id: str) -> str | None:
        """Return a fresh offer JWS minted by the child, or None (no key there, or it could not): sign it here."""
        if self.offer_key is None:
            return None
        code, jws = await self._job(SIGN, _NO_POINT, _NO_SIG, _encode_offer((product_id, offer_identifier, transaction_id)))
        return jws.decode("ascii") if code == VALID else None

    async def _job(self, kind: int, point: bytes, signature: bytes, data: bytes) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if (self._proc is None or loop is not self._loop or not self._ready) and not self._usable(loop):
            return UNCHECKED, b""
        n = self._next
        self._next = (n + 1) & 0xFFFFFFFF
        fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._pending[n] = fut
        self._out.append(HEAD.pack(n, len(data), kind, point, signature))
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await fut
        except ChildGoneError:
            return UNCHECKED, b""

    def _usable(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Attach to `loop` on first use; start the child again after it died; False: do the job here."""
        if self._stopped:
            return False
        if self._proc is None:
            if time.monotonic() < self._restart_at:
                return False
            try:
                self.start(wait=False)
            except OSError as exc:
                log.error("the signature process cannot start (%s); the server does its jobs itself", exc)
                self._restart_at = time.monotonic() + RESTART_AFTER_S
                return False
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
            loop.add_reader(self._r, self._on_readable)
        return self._loop is loop and self._ready

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._proc is None:
            return
        data = self._unsent + b"".join(self._out)
        self._out.clear()
        try:
            sent = os.write(self._w, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # the child is gone (EPIPE)
            self._died(f"writing to it failed ({exc})")
            return
        self._unsent = data[sent:]
        if self._unsent and self._loop is not None:
            self._loop.add_writer(self._w, self._write_rest)

    def _write_rest(self) -> None:
        if self._loop is not None:
            self._loop.remove_writer(self._w)
        self._flush()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._r, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._died(f"reading from it failed ({exc})")
            return
        if not data:
            self._died("it closed its output")
            return
        if not self._ready:  # a child started from the request path says it is ready
            if data[:1] != READY:
                self._died("it did not start properly")
                return
            self._ready = True
            data = data[1:]
            if not data:
                return
        buf = self._inbuf + data if self._inbuf else data
        pos, end, size = 0, len(buf), RESULT.size
        pending = self._pending
        while end - pos >= size:
            n, code, length = RESULT.unpack_from(buf, pos)
            if end - pos - size < length:
                break
            start = pos + size
            pos = start + length
            fut = pending.pop(n, None)
            if fut is not None and not fut.done():
                fut.set_result((code, buf[start:pos] if length else b""))
        self._inbuf = buf[pos:]

    def _died(self, why: str) -> None:
        proc = self._proc
        code = proc.poll() if proc is not None else None
        log.error("the signature process stopped (%s, exit code %s); the server does its jobs itself, "
                  "and it starts again in %.0f s", why, code, RESTART_AFTER_S)
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        self._restart_at = time.monotonic() + RESTART_AFTER_S
        self._close(ChildGoneError(why))


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_encode_offer = msgspec.msgpack.Encoder().encode


# ---- the child ------------------------------------------------------------------------------------------
class _Child:
    """The child's side: read jobs, do them (offer signatures first), answer in groups."""

    def __init__(self, group: int, signer: Any) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        self.invalid_signature = InvalidSignature
        self.load_point = ec.EllipticCurvePublicKey.from_encoded_point
        self.encode_dss = encode_dss_signature
        self.group = group
        self.signer = signer
        self.decode_offer = msgspec.msgpack.Decoder(tuple[str, str, str]).decode
        self.es256 = ec.ECDSA(hashes.SHA256())
        self.curve = ec.SECP256R1()
        self.keys: dict[bytes, Any] = {}
        self.buf = b""
        # An offer signature finishes its request (the answer goes out next); a check starts one. Doing the
        # signatures first frees connections sooner: the median wait for a signature fell from 1.9 ms to
        # <0.5 ms under load (BENCHMARKS.md), the checks' wait hardly moved.
        self.signs: deque[tuple[int, bytes]] = deque()
        self.checks: deque[tuple[int, bytes, bytes, bytes]] = deque()
        self.out: list[bytes] = []
        self.answered = 0

    def take(self, data: bytes) -> None:
        """Queue every whole job of `data` (after what is left of earlier reads)."""
        buf = self.buf + data if self.buf else data
        pos, end, head = 0, len(buf), HEAD.size
        while end - pos >= head:
            n, length, kind, point, sig = HEAD.unpack_from(buf, pos)
            if end - pos - head < length:
                break
            start = pos + head
            pos = start + length
            if kind == SIGN:
                self.signs.append((n, buf[start:pos]))
            else:
                self.checks.append((n, buf[start:pos], point, sig))
        self.buf = buf[pos:]

    def check(self, payload: bytes, point: bytes, sig: bytes) -> int:
        key = self.keys.get(point)
        if key is None:
            if len(self.keys) >= 64:
                self.keys.clear()
            key = self.keys[point] = self.load_point(self.curve, point)
        der = self.encode_dss(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            key.verify(der, payload, self.es256)
        except self.invalid_signature:
            return INVALID
        return VALID

    def do_next(self) -> None:
        """Do one queued job (an offer signature if any is queued); answer a signature at once, checks in groups."""
        result = b""
        if self.signs:
            n, payload = self.signs.popleft()
            try:
                if self.signer is None:
                    code = UNCHECKED
                else:
                    product_id, offer_identifier, transaction_id = self.decode_offer(payload)
                    result = self.signer.sign(
                        product_id=product_id, offer_identifier=offer_identifier, transaction_id=transaction_id
                    ).encode("ascii")
                    code = VALID
            except Exception:  # never guess: the server signs this one itself
                code, result = UNCHECKED, b""
        else:
            n, payload, point, sig = self.checks.popleft()
            try:
                code = self.check(payload, point, sig)
            except Exception:  # never guess: the server checks this one itself
                code = UNCHECKED
        self.out.append(RESULT.pack(n, code, len(result)))
        if result:
            self.out.append(result)
        self.answered += 1
        if result or self.answered >= self.group:  # a signature's request is done: it is not held for a group
            self.answer()

    def answer(self) -> None:
        if self.out:
            os.write(1, b"".join(self.out))
            self.out.clear()
        self.answered = 0

    def run(self) -> int:
        rfd = 0
        while True:
            if not self.signs and not self.checks:
                if self.out and not select.select([rfd], [], [], 0)[0]:
                    self.answer()  # nothing else queued: answer what is done at once
                data = os.read(rfd, _READ_SIZE)
                if not data:
                    self.answer()
                    return 0
                self.take(data)
                continue
            if select.select([rfd], [], [], 0)[0]:  # a signature that arrived meanwhile goes first
                data = os.read(rfd, _READ_SIZE)
                if not data:
                    while self.signs or self.checks:
                        self.do_next()
                    self.answer()
                    return 0
                self.take(data)
            self.do_next()


def _child(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server stops, then closes our input: we end then
        signal.signal(sig, signal.SIG_IGN)
    group = int(argv[0]) if argv else GROUP
    signer = None
    if len(argv) >= 5:
        from serving.offers import OfferSigner

        try:
            signer = OfferSigner.from_key_file(argv[1], key_id=argv[2], issuer_id=argv[3], bundle_id=argv[4])
        except ValueError as exc:  # one sentence, never the key: the server signs offers itself
            print(f"retention signature process: {exc}; offers are signed by the server", file=sys.stderr)
    child = _Child(group, signer)
    os.write(1, READY)
    return child.run()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
