"""What the decision log's durability costs: the fsynced outcome commit, and the unique request_id.

    .venv/bin/python bench/log_durability.py [--rounds 3] [--outcomes 300] [--rows 20000]

1. The commit wait of one outcome (``log_outcome`` + ``flush``, what a notification waits before its
   200): committed with ``synchronous=FULL`` (the WAL fsynced: survives a power loss) against the
   same log with ``synchronous=NORMAL`` (survives a killed process only).
2. The writer's throughput (rows/s, 8 candidates and 8x40 features a row) with the unique index on
   ``request_id`` (what makes a re-sent batch harmless) against the same writer without it.

Files go to a temporary folder in the current directory (the disk the server would use, not a tmpfs).
Each figure is printed with its baseline from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serving.log_schema as log_schema
import serving.log_writer as log_writer
from serving.log_schema import DecisionRecord


@contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _record(i: int, feats: np.ndarray) -> DecisionRecord:
    return DecisionRecord(
        request_id=f"{i:08x}-6f1c-4f0e-9b1a-{i * 7919 % 10**12:012d}", original_transaction_id=str(i % 997),
        product_id="com.example.premium.monthly", user_locale="en-US", environment="Production", signed_date=1,
        candidates=[f"m{j}" for j in range(8)], scores=np.full(8, 0.5), values=np.full(8, 10.0),
        probabilities=np.full(8, 0.125), message_id="m1", kind="message", propensity=0.125, policy="ml",
        features=feats, feature_names_sha="f" * 16, latency_ms=1.0, answered_at=1_700_000_000_000 + i,
    )  # fmt: skip


def commit_wait_ms(n: int) -> tuple[float, float]:
    """Return (median, p99) ms of log_outcome + flush over `n` outcomes."""
    with tempfile.TemporaryDirectory(dir=".") as d:
        log = log_writer.DecisionLog(Path(d) / "decisions-bench-1.sqlite", batch_ms=100)
        log.start()
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            log.log_outcome(f"uuid-{i}", "otid", "renewed", 1_700_000_000_000)
            if not log.flush():
                raise SystemExit("an outcome was not committed")
            times.append((time.perf_counter() - t0) * 1000)
        log.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


def writer_rows_per_s(rows: int) -> float:
    feats = np.random.default_rng(0).random((8, 40), dtype=np.float32)
    records = [_record(i, feats) for i in range(rows)]
    with tempfile.TemporaryDirectory(dir=".") as d:
        log = log_writer.DecisionLog(Path(d) / "decisions-bench-2.sqlite", batch_ms=100, max_queue=rows + 1)
        for r in records:
            log.log(r)
        t0 = time.perf_counter()
        log.start()
        log.close(timeout=300)
        dt = time.perf_counter() - t0
        if log.stats()["written"] != rows:
            raise SystemExit(f"written {log.stats()['written']} of {rows}")
    return rows / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--outcomes", type=int, default=300)
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    real_commit = log_writer._commit_rows

    def not_durable(*a: Any, **kw: Any) -> Any:
        kw["durable"] = False
        return real_commit(*a, **kw)

    print("outcome commit wait (log_outcome + flush), median / p99 ms, median of rounds")
    full, normal = [], []
    for _ in range(args.rounds):
        full.append(commit_wait_ms(args.outcomes))
        with _patched(log_writer, "_commit_rows", not_durable):
            normal.append(commit_wait_ms(args.outcomes))
    f = (statistics.median(x[0] for x in full), statistics.median(x[1] for x in full))
    n = (statistics.median(x[0] for x in normal), statistics.median(x[1] for x in normal))
    print(f"  synchronous=FULL {f[0]:.3f} / {f[1]:.2f} ms; synchronous=NORMAL {n[0]:.3f} / {n[1]:.2f} ms "
          f"(x{f[0] / n[0]:.1f} median)")
    print(f"writer throughput, {args.rows} rows, rows/s, median of rounds")
    with_index, without = [], []
    for _ in range(args.rounds):
        with_index.append(writer_rows_per_s(args.rows))
        with _patched(log_schema, "_UNIQUE_REQUEST_ID", "SELECT 1"):
            without.append(writer_rows_per_s(args.rows))
    a, b = statistics.median(with_index), statistics.median(without)
    print(f"  unique request_id {a:.0f}; without the index {b:.0f} (ratio {a / b:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
