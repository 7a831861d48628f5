"""The decision log's writer process: reads framed records on stdin, writes them to SQLite, acks on stdout.

``DecisionLog(writer="process")`` (the server's default) starts one per server process::

    python -m serving.log_writer PATH

Why a process: in the server's process a writer thread holds the GIL while it builds rows and binds
them, and every time the event loop's thread wants the GIL back it waits for the writer. Measured
on the endpoint: about a fifth fewer requests per second with the thread (BENCHMARKS.md). Here the
server's side only encodes each record with msgspec (a few µs, on its shipping thread) and writes
bytes to a pipe; rows are built and inserted in this process, on its own GIL.

Protocol (both directions): frames of a 4-byte little-endian length and a msgpack body.
- in:  ``["d", record fields in order]`` a decision, ``["o", outcome fields]``, ``["s", [sha, names]]``,
  ``["m", marker id]`` (ack me once everything before me is committed).
- out: ``["ready"]`` or ``["error", message]`` once at start; then after each transaction
  ``["ack", [marker ids committed], [marker ids not committed], why not or None, written, new outcomes,
  batches, write errors, bad records]`` (running totals), and ``["fault", reason, line]`` when the file
  was deleted, replaced or corrupt and a fresh one started (the server logs the line and counts it).

The server keeps every batch until its marker is confirmed, and sends it again (to this process
after a failed transaction, or to a new one after this one died): rows are unique by ``request_id``
and ``notificationUUID`` and inserted with ``OR IGNORE``, so a batch written twice is stored once.

The process ignores SIGINT and SIGTERM: it ends when its stdin closes (the server closed it, or the
server died, SIGKILL included), after writing everything it has read. So a killed server loses only
what it had not yet shipped, at most one batch window; a killed writer loses nothing (the server sends
its unconfirmed batches to the next one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

_LEN = struct.Struct("<I")
_ND_EXT = 1


def enc_hook(obj: Any) -> Any:
    """Encode NumPy values for the pipe: arrays as an extension (dtype, shape, raw bytes), scalars as Python numbers."""
    if isinstance(obj, np.ndarray):
        header = msgspec.msgpack.encode([obj.dtype.str, list(obj.shape)])
        return msgspec.msgpack.Ext(_ND_EXT, _LEN.pack(len(header)) + header + np.ascontiguousarray(obj).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def ext_hook(code: int, data: memoryview) -> Any:
    """Decode the NumPy array extension of :func:`enc_hook`."""
    if code != _ND_EXT:
        raise ValueError(f"unknown extension {code}")
    (n,) = _LEN.unpack_from(data)
    dtype, shape = msgspec.msgpack.decode(data[4 : 4 + n])
    return np.frombuffer(bytes(data[4 + n :]), dtype=np.dtype(dtype)).reshape(shape)


_encode = msgspec.msgpack.Encoder(enc_hook=enc_hook).encode
_decode = msgspec.msgpack.Decoder(ext_hook=ext_hook).decode


def frame(kind: str, payload: Any) -> bytes:
    """Return one length-prefixed frame."""
    body = _encode((kind, payload))
    return _LEN.pack(len(body)) + body


def read_frames(buf: bytearray) -> list[Any]:
    """Remove and return every complete frame at the start of `buf` (decoded)."""
    out = []
    pos = 0
    n = len(buf)
    while n - pos >= 4:
        (size,) = _LEN.unpack_from(buf, pos)
        if n - pos - 4 < size:
            break
        out.append(_decode(memoryview(buf)[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    del buf[:pos]
    return out


def _send(fd: int, kind: str, *payload: Any) -> None:
    data = frame(kind, list(payload))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str] | None = None) -> int:
    """Run the writer for the SQLite file named by the one argument; returns the exit status."""
    from serving.decision_log import DecisionRecord, LogFile, LogUnavailableError, _decision_row, _json

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # background work: the server's request path goes first for a core
        os.nice(5)
    args = sys.argv[1:] if argv is None else argv
    out_fd = sys.stdout.fileno()
    in_fd = sys.stdin.fileno()

    def on_fault(reason: str, line: str) -> None:
        with contextlib.suppress(OSError):
            _send(out_fd, "fault", reason, line)

    log_file = LogFile(Path(args[0]), on_fault=on_fault)
    try:
        log_file.open()
    except Exception as exc:
        _send(out_fd, "error", str(exc))
        return 1
    _send(out_fd, "ready")
    written = outcomes_new = batches = write_errors = bad = 0
    unavailable: str | None = None
    # True when the batch still open (its marker not read yet) had rows in a transaction that failed:
    # its marker is then answered as failed, and the server sends the whole batch again
    tainted = False
    buf = bytearray()
    eof = False
    fields = DecisionRecord.__struct_fields__
    while not eof:
        chunk = os.read(in_fd, 1 << 20)
        if not chunk:
            eof = True
        buf += chunk
        # take what else is already there, so one transaction covers the whole batch the server shipped
        msgs = read_frames(buf)
        if not msgs:
            continue
        now_ms = int(time.time() * 1000)
        decisions: list[tuple[Any, ...]] = []
        outcomes: list[tuple[Any, ...]] = []
        schemas: list[tuple[str, str]] = []
        markers: list[tuple[int, bool]] = []  # (marker id, its batch had rows in this transaction)
        rows = False  # rows read since the last marker
        for kind, payload in msgs:
            try:
                if kind in ("d", "o"):
                    rows = True
                if kind == "d":
                    decisions.append(_decision_row(DecisionRecord(**dict(zip(fields, payload, strict=True))), now_ms))
                elif kind == "o":
                    outcomes.append(tuple(payload))
                elif kind == "s":
                    schemas.append((payload[0], _json(payload[1]).decode()))
                elif kind == "m":
                    markers.append((int(payload), rows))
                    rows = False
            except Exception:
                bad += 1
        committed = True
        try:
            if decisions or outcomes or schemas:
                new_decisions, new = log_file.commit(decisions, outcomes, schemas)
                written += new_decisions
                outcomes_new += new
                batches += 1
                unavailable = None  # (a transaction without rows tells nothing about the file)
        except LogUnavailableError as exc:  # the server keeps the batch and sends it again
            committed = False
            write_errors += 1
            unavailable = str(exc)
        except Exception as exc:  # rows SQLite cannot take (a bug, not the disk): counted as dropped
            write_errors += 1
            bad += len(decisions) + len(outcomes)
            print(f"decision log writer: a batch of {len(decisions) + len(outcomes)} rows failed: {exc}", file=sys.stderr)
        ok: list[int] = []
        failed: list[int] = []
        for i, (mid, had_rows) in enumerate(markers):
            (failed if (i == 0 and tainted) or (had_rows and not committed) else ok).append(mid)
        tainted = (tainted and not markers) or (rows and not committed)
        with contextlib.suppress(OSError):  # the server is gone: keep writing what is left to read
            _send(out_fd, "ack", ok, failed, unavailable, written, outcomes_new, batches, write_errors, bad)
    log_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
