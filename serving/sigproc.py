"""Apple's P-256 signature checks in a child process, so that OpenSSL and the event loop never share the GIL.

The check is the one costly step of verifying a request (~90 µs of OpenSSL). On a thread beside the event
loop (:mod:`serving.offload`) OpenSSL runs without the GIL, but the thread needs the GIL back before and
after every check, and the event loop, which takes the GIL back between every two callbacks, wins that race
nearly every time: under load the thread waited a median 3.8 ms for checks of 0.24 ms (BENCHMARKS.md,
"Endpoint"), and requests waited on it. A child process has its own interpreter: it checks while the loop
runs Python, and the loop pays one pipe write per loop turn and one pipe read per group of results.

The child also makes the one-time nonces of the promotional offer signatures, in its idle moments, so that
an offer's whole ``OfferSigner.sign`` costs the loop ~7 µs instead of ~40 µs alone and 70-90 µs under load
(``bench/offer_signature.py``; see :mod:`serving.offers`). An ECDSA nonce pair is ``(k⁻¹ mod n, r = x(k·G)
mod n)`` for a uniform secret ``k``: it depends on neither the message nor the key, so it can be made ahead;
the costly part, the scalar multiplication ``k·G``, is OpenSSL's. Each pair is used for one signature, then
forgotten.

Protocol (this module is both ends; the child is ``python -m serving.sigproc GROUP NONCES``, NONCES 1 when
it is to keep nonces ready, 0 when the server signs no offers):

* parent → child, one record a job: a header ``>IIB65s64s`` (job number, length of the data, kind, the leaf
  key as an uncompressed X9.62 point, the raw r||s signature) then the data. Kind 0 checks a signature (the
  data is the signing input); kind 1 asks for nonce pairs (point and signature are zeros, the data is the
  count, ``>I``);
* child → parent, one record a job: ``>IBI`` (job number, code, length) then the data: code 1 valid / 0
  invalid / 2 could not do it; the data is empty for a check, 64 bytes a pair (``k⁻¹``, ``r``, big-endian)
  for nonces.

The child gets public keys and signed bytes; the In-App Purchase key never leaves the server's process (the
nonces alone reveal nothing of it; a nonce together with its signature would, which is why each is used once
and neither is ever logged). The child answers up to ``group`` checks in one write when more are queued (the
loop then resumes those requests in one turn, and they share one ONNX Runtime run), and at once when nothing
else is queued; it makes nonces only when no check is waiting, and hands them out from a stash. A check the
child could not make (code 2), or any check pending when the child dies, is made in the server instead (the
signature thread); an offer with no nonce at hand is signed in the server the usual way. A request is never
failed or lost because of the child. A child that dies is started again after a pause.
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from serving.offers import P256_N

if TYPE_CHECKING:
    from serving.verify import SignatureCheck, VerifiedChain

log = logging.getLogger("retention.sigproc")

HEAD: Final = struct.Struct(">IIB65s64s")
RESULT: Final = struct.Struct(">IBI")
VALID, INVALID, UNCHECKED = 1, 0, 2
CHECK, NONCES = 0, 1
NONCE_LOW: Final = 256  # fewer pairs at hand than this: ask the child for more
NONCE_BATCH: Final = 256  # pairs asked for at a time
STASH: Final = 1024  # pairs the child keeps ready
NONCE_CHUNK: Final = 8  # pairs made at a time (one modular inversion for all of them)
_COUNT: Final = struct.Struct(">I")
_NO_POINT: Final = bytes(65)
_NO_SIG: Final = bytes(64)
GROUP: Final = 4  # results written together at most (see the module's docstring)
RESTART_AFTER_S: Final = 1.0
READY_TIMEOUT_S: Final = 10.0
READY: Final = b"R"  # the child's first byte: imported, reading jobs
_READ_SIZE: Final = 1 << 16



class ChildGoneError(Exception):
    """The child exited (or was stopped) with this check pending."""


class SignatureProcess:
    """``await checker(chain, signing_input, signature)``: True when the ES256 signature holds for the chain's leaf.

    The checks run in one child process, started by :meth:`start` and stopped by :meth:`stop`. Before start,
    after stop, on a loop other than the first one used, and for checks the child could not make, the
    `fallback` runs them. With `nonces`, :meth:`take_nonce` hands out one-time ECDSA nonce pairs the child
    made ahead (None when none is at hand).
    """

    def __init__(
        self,
        fallback: SignatureCheck,
        *,
        nonces: bool = False,
        on_restart: Callable[[], None] | None = None,
        group: int = GROUP,
        python: str = sys.executable,
    ) -> None:
        if group < 1:
            raise ValueError("group must be >= 1")
        self.fallback = fallback
        self.nonces = nonces
        self._pool: deque[tuple[int, int]] = deque()  # (k⁻¹ mod n, r): each popped once, for one signature
        self._pool_pid = os.getpid()
        self._asking = False
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

        With `wait` (at server start) this returns once the child is ready (its imports take ~0.15-0.25 s),
        so the first request never waits for them; without it (a restart from the request path) jobs are
        done in the server until the child says it is ready.
        """
        self._stopped = False
        if self._proc is not None:
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [self.python, "-m", "serving.sigproc", str(self.group), "1" if self.nonces else "0"],
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
            if not fut.done() and not fut.get_loop().is_closed():  # nobody waits on a closed loop's jobs
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
    async def __call__(self, chain: VerifiedChain, signing_input: bytes, signature: bytes) -> bool:
        loop = asyncio.get_running_loop()
        code = UNCHECKED
        if self._attached(loop):
            try:
                code, _ = await self._submit(loop, CHECK, chain.leaf_point, signature, signing_input)
            except ChildGoneError:
                code = UNCHECKED
        if code == UNCHECKED:
            return await self.fallback(chain, signing_input, signature)
        return code == VALID

    def take_nonce(self) -> tuple[int, int] | None:
        """Return a fresh nonce pair ``(k⁻¹ mod n, r)`` for one offer signature, or None when none is at hand.

        Called on the event loop. A pair is returned once and then forgotten. Running low asks the child for
        more (the answer comes within a loop turn or two); this never waits.
        """
        pool = self._pool
        if self._pool_pid != os.getpid():  # a forked copy of this object must never reuse the parent's pairs
            pool.clear()
            self._pool_pid = os.getpid()
        if len(pool) < NONCE_LOW and self.nonces and (not self._asking or self._loop is None or self._loop.is_closed()):
            self._ask_nonces()  # (a request left pending by a closed loop is forgotten when the next one attaches)
        return pool.popleft() if pool else None

    def _ask_nonces(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if not self._attached(loop):
            return
        fut = self._submit(loop, NONCES, _NO_POINT, _NO_SIG, _COUNT.pack(NONCE_BATCH))
        self._asking = True
        fut.add_done_callback(self._got_nonces)

    def _got_nonces(self, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        self._asking = False
        if fut.cancelled() or fut.exception() is not None:
            return
        code, data = fut.result()
        if code != VALID or len(data) % 64:
            return
        pool, n = self._pool, P256_N
        for i in range(0, len(data), 64):
            k_inv = int.from_bytes(data[i : i + 32], "big")
            r = int.from_bytes(data[i + 32 : i + 64], "big")
            if 0 < k_inv < n and 0 < r < n:
                pool.append((k_inv, r))

    def _attached(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Return True when a job submitted from `loop` goes to the child (the usual case costs no call)."""
        return (self._proc is not None and loop is self._loop and self._ready) or self._usable(loop)

    def _submit(
        self, loop: asyncio.AbstractEventLoop, kind: int, point: bytes, signature: bytes, data: bytes
    ) -> asyncio.Future[tuple[int, bytes]]:
        n = self._next
        self._next = (n + 1) & 0xFFFFFFFF
        fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._pending[n] = fut
        self._out.append(HEAD.pack(n, len(data), kind, point, signature))
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

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
            # jobs of a closed loop can never be awaited again: forget them (their answers are ignored)
            self._pending.clear()
            self._asking = False
            self._flush_scheduled = False  # a flush scheduled on the closed loop never ran: the next job's sends all
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


# ---- the child ------------------------------------------------------------------------------------------
class _Child:
    """The child's side: read jobs, check signatures (answered in groups), make nonces when nothing waits."""

    def __init__(self, group: int, *, keep_nonces: bool = True) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from serving.verify import verify_es256  # the server's own check, the same bytes accepted

        self.verify_es256 = verify_es256
        self.load_point = ec.EllipticCurvePublicKey.from_encoded_point
        self.generate = ec.generate_private_key
        self.x962, self.uncompressed = Encoding.X962, PublicFormat.UncompressedPoint
        self.group = group
        self.curve = ec.SECP256R1()
        self.keys: dict[bytes, Any] = {}
        self.buf = b""
        self.checks: deque[tuple[int, bytes, bytes, bytes]] = deque()
        self.asks: deque[tuple[int, int]] = deque()  # (job number, pairs asked for)
        self.stash: list[bytes] = []
        self.stash_size = STASH if keep_nonces else 0  # pairs made ahead in idle moments (asked-for ones: always)
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
            if kind == NONCES:
                self.asks.append((n, _COUNT.unpack(buf[start:pos])[0] if length == _COUNT.size else 0))
            elif kind == CHECK:
                self.checks.append((n, buf[start:pos], point, sig))
            else:  # never guess: the server does what it asked for itself
                self.out.append(RESULT.pack(n, UNCHECKED, 0))
        self.buf = buf[pos:]

    def check(self, payload: bytes, point: bytes, sig: bytes) -> int:
        key = self.keys.get(point)
        if key is None:
            if len(self.keys) >= 64:
                self.keys.clear()
            key = self.keys[point] = self.load_point(self.curve, point)
        return VALID if self.verify_es256(key, payload, sig) else INVALID

    def make_nonces(self, count: int) -> list[bytes]:
        """Return `count` nonce pairs, 64 bytes each: k⁻¹ mod n and r = x(k·G) mod n.

        ``k`` and ``k·G`` come from OpenSSL's key generation (``k`` uniform in [1, n-1] from its CSPRNG, the
        point from its fixed-base multiplication: ~17 µs, against ~47 µs for ``derive_private_key`` of a ``k`` of
        our own); the inverses of the whole batch cost one modular inversion and three multiplications a pair
        (Montgomery's trick) instead of one ~30 µs inversion each.
        """
        n = P256_N
        ks: list[int] = []
        rs: list[int] = []
        while len(ks) < count:
            key = self.generate(self.curve)
            r = int.from_bytes(key.public_key().public_bytes(self.x962, self.uncompressed)[1:33], "big") % n
            if r:
                ks.append(key.private_numbers().private_value)
                rs.append(r)
        prefix: list[int] = []
        acc = 1
        for k in ks:
            acc = acc * k % n
            prefix.append(acc)
        inv = pow(acc, -1, n)  # (k_1 ... k_m)⁻¹
        out = [b""] * count
        for i in range(count - 1, -1, -1):
            k_inv = inv * prefix[i - 1] % n if i else inv  # (k_1 ... k_i)⁻¹ · (k_1 ... k_(i-1)) = k_i⁻¹
            inv = inv * ks[i] % n
            out[i] = k_inv.to_bytes(32, "big") + rs[i].to_bytes(32, "big")
        return out

    def do_check(self) -> None:
        n, payload, point, sig = self.checks.popleft()
        try:
            code = self.check(payload, point, sig)
        except Exception:  # never guess: the server checks this one itself
            code = UNCHECKED
        self.out.append(RESULT.pack(n, code, 0))
        self.answered += 1
        if self.answered >= self.group:
            self.answer()

    def do_ask(self) -> None:
        n, count = self.asks.popleft()
        count = min(count, STASH)
        if len(self.stash) < min(count, NONCE_CHUNK):  # an empty stash: make a few now, the rest come later
            self.stash.extend(self.make_nonces(NONCE_CHUNK))
        give, self.stash = self.stash[:count], self.stash[count:]
        self.out.append(RESULT.pack(n, VALID, 64 * len(give)))
        self.out.extend(give)
        self.answer()

    def answer(self) -> None:
        if self.out:
            os.write(1, b"".join(self.out))
            self.out.clear()
        self.answered = 0

    def readable(self) -> bool:
        return bool(select.select([0], [], [], 0)[0])

    def run(self) -> int:
        while True:
            if not self.checks and not self.asks:
                if self.out and not self.readable():
                    self.answer()  # nothing else queued: answer what is done at once
                if len(self.stash) < self.stash_size and not self.readable():
                    self.stash.extend(self.make_nonces(NONCE_CHUNK))  # idle: make a few (~0.3 ms), look again
                    continue
                data = os.read(0, _READ_SIZE)
                if not data:
                    self.answer()
                    return 0
                self.take(data)
                continue
            if self.checks:
                self.do_check()  # checks first: a request waits on each
            else:
                self.do_ask()


def _child(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server stops, then closes our input: we end then
        signal.signal(sig, signal.SIG_IGN)
    child = _Child(int(argv[0]) if argv else GROUP, keep_nonces=len(argv) < 2 or argv[1] == "1")
    os.write(1, READY)
    return child.run()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
