"""Apple's P-256 signature checks in a child process, so that OpenSSL and the event loop never share the GIL.

The check is the one costly step of verifying a request (~90 µs of OpenSSL). On a thread beside the event
loop (:mod:`serving.offload`) OpenSSL runs without the GIL, but the thread needs the GIL back before and
after every check, and the event loop, which takes the GIL back between every two callbacks, wins that race
nearly every time: under load the thread waited a median 3.8 ms for checks of 0.24 ms (BENCHMARKS.md,
"Endpoint"), and requests waited on it. A child process has its own interpreter: it checks while the loop
runs Python, and the loop pays one pipe write per loop turn and one pipe read per group of results.

The child only ever says whether a public key's signature holds: it is never asked for anything that goes
into an answer, and the promotional offer signatures are made in the server by OpenSSL alone
(:mod:`serving.offers`; docs/security.md).

Protocol (this module is both ends; the child is started by :func:`serving.children.command`, so that it
imports only our package, never a module of the working directory):

* parent → child, one record a job: a header ``>IIB65s64s`` (job number, length of the data, kind 0, the
  leaf key as an uncompressed X9.62 point, the raw r||s signature) then the signing input;
* child → parent, one record a job: ``>IBI`` (job number, code, length 0): code 1 valid / 0 invalid / 2
  could not do it (any other kind of job is answered 2).

The child gets public keys and signed bytes, nothing secret. It answers up to ``group`` checks in one write
when more are queued (the loop then resumes those requests in one turn, and they share one ONNX Runtime run),
and at once when nothing else is queued. A check the child could not make (code 2), or any check pending
when the child dies, is made in the server instead (the signature thread): the child's answer is a shortcut,
and a request is never failed or lost because of the child. A child that dies is started again after a pause.
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

from serving import children

if TYPE_CHECKING:
    from serving.verify import SignatureCheck, VerifiedChain

log = logging.getLogger("retention.sigproc")

HEAD: Final = struct.Struct(">IIB65s64s")
RESULT: Final = struct.Struct(">IBI")
VALID, INVALID, UNCHECKED = 1, 0, 2
CHECK: Final = 0
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
    `fallback` runs them.
    """

    def __init__(
        self,
        fallback: SignatureCheck,
        *,
        on_restart: Callable[[], None] | None = None,
        group: int = GROUP,
        python: str = sys.executable,
    ) -> None:
        if group < 1:
            raise ValueError("group must be >= 1")
        self.fallback = fallback
        self.group = group
        self.python = python
        self.restarts = 0
        self.on_restart = on_restart
        self._proc: subprocess.Popen[bytes] | None = None
        self._w = -1
        self._r = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
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
        self._proc = subprocess.Popen(
            children.command("serving.sigproc", str(self.group), python=self.python),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True, env=children.environment(),
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
                code = await self._submit(loop, CHECK, chain.leaf_point, signature, signing_input)
            except ChildGoneError:
                code = UNCHECKED
        if code == UNCHECKED:
            return await self.fallback(chain, signing_input, signature)
        return code == VALID

    def _attached(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Return True when a job submitted from `loop` goes to the child (the usual case costs no call)."""
        return (self._proc is not None and loop is self._loop and self._ready) or self._usable(loop)

    def _submit(
        self, loop: asyncio.AbstractEventLoop, kind: int, point: bytes, signature: bytes, data: bytes
    ) -> asyncio.Future[int]:
        n = self._next
        self._next = (n + 1) & 0xFFFFFFFF
        fut: asyncio.Future[int] = loop.create_future()
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
                fut.set_result(code)  # (a record's data, empty for a check, is skipped)
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


# ---- the child ------------------------------------------------------------------------------------------
class _Child:
    """The child's side: read jobs, check signatures, answer in groups (at once when nothing else is queued)."""

    def __init__(self, group: int) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        from serving.verify import verify_es256  # the server's own check, the same bytes accepted

        self.verify_es256 = verify_es256
        self.load_point = ec.EllipticCurvePublicKey.from_encoded_point
        self.group = group
        self.curve = ec.SECP256R1()
        self.keys: dict[bytes, Any] = {}
        self.buf = b""
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
            if kind == CHECK:
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

    def answer(self) -> None:
        if self.out:
            os.write(1, b"".join(self.out))
            self.out.clear()
        self.answered = 0

    def readable(self) -> bool:
        return bool(select.select([0], [], [], 0)[0])

    def run(self) -> int:
        while True:
            if not self.checks:
                if self.out and not self.readable():
                    self.answer()  # nothing else queued: answer what is done at once
                data = os.read(0, _READ_SIZE)
                if not data:
                    self.answer()
                    return 0
                self.take(data)
                continue
            self.do_check()


def _child(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server stops, then closes our input: we end then
        signal.signal(sig, signal.SIG_IGN)
    child = _Child(int(argv[0]) if argv else GROUP)
    os.write(1, READY)
    return child.run()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
