"""Replicas on PostgreSQL against one replica on SQLite, in the same run (issue 19).

    .venv/bin/python bench/bench_postgres.py [--database-url URL] [--duration 5] [--rounds 2] [--connections 16]

Three parts, each against a baseline measured in the same run:

1. Writing decisions: the cost per decision of a PostgreSQL batch written by COPY (into a temporary table,
   then one INSERT ... ON CONFLICT DO NOTHING) against multi-row INSERT ... ON CONFLICT DO NOTHING, and the
   SQLite log's own batch write (thread writer) as the baseline.
2. The replay check per request: PostgreSQL's INSERT ... ON CONFLICT (``PostgresReplayMemory.remember``,
   through the connection pool) against the in-process memory (a dict).
3. The endpoint: one ``retention serve`` on SQLite (wrk, N connections) against two replicas sharing
   PostgreSQL (two wrk at once, N/2 connections each, as a load balancer would split them): requests per
   second (summed) and p99 (the worse replica), alternating rounds. Every body is signed once and used once.

Needs ``wrk`` and a PostgreSQL server (default postgresql://postgres@127.0.0.1:5432/test); the run uses a
fresh schema and drops it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_endpoint import free_port, ms, wait  # noqa: E402

APP_ID = 1234567890


def record(i: int) -> Any:
    import numpy as np

    from serving.log_schema import DecisionRecord

    return DecisionRecord(
        request_id=f"bench-{uuid.uuid4()}", original_transaction_id=str(10_000_000 + i), product_id="pro.monthly",
        user_locale="en_US", environment="Sandbox", signed_date=1_700_000_000_000 + i,
        candidates=[f"m{j}" for j in range(8)], scores=np.full(8, 0.5), values=np.full(8, 3.0),
        probabilities=np.full(8, 0.125), message_id="m0", propensity=0.125,
        features=np.ones((8, 40), dtype=np.float32), answered_at=1_700_000_000_000 + i,
    )


def write_cost(log: Any, n: int, batch: int) -> float:
    """Return µs per decision to log and commit `n` decisions in batches of `batch` (each batch flushed)."""
    records = [record(i) for i in range(n)]
    log.start()
    try:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            for r in records[start : start + batch]:
                log.log(r)
            assert log.flush(30.0)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        log.close()


def part_writes(url: str, tmp: Path, n: int, batch: int, rounds: int) -> dict[str, float]:
    from serving.log_writer import DecisionLog
    from serving.pg_log import PostgresDecisionLog

    res: dict[str, list[float]] = {"sqlite": [], "copy": [], "insert": []}
    for _ in range(rounds):
        res["sqlite"].append(write_cost(DecisionLog(tmp / f"w-{uuid.uuid4()}.sqlite", batch_ms=5), n, batch))
        for method in ("copy", "insert"):
            res[method].append(write_cost(PostgresDecisionLog(url, tmp, batch_ms=5, method=method), n, batch))
    return {k: statistics.median(v) for k, v in res.items()}


def part_replay(url: str, n: int) -> dict[str, float]:
    from serving.database import PostgresReplayMemory

    seen: dict[str, float] = {}
    ids = [str(uuid.uuid4()) for _ in range(n)]
    now = time.time()
    t0 = time.perf_counter()
    for rid in ids:
        if seen.get(rid, 0.0) <= now:
            seen[rid] = now + 360
    dict_us = (time.perf_counter() - t0) / n * 1e6
    mem = PostgresReplayMemory(url, budget_ms=1000)
    try:
        mem.remember("warm-up", now + 360, now)
        lat: list[float] = []
        for rid in ids:
            t = time.perf_counter()
            mem.remember(rid, now + 360, now)
            lat.append(time.perf_counter() - t)
    finally:
        mem.close()
    lat.sort()
    return {"dict_us": dict_us, "pg_us": statistics.mean(lat) * 1e6, "pg_p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def part_profiles(url: str, tmp: Path, n: int) -> dict[str, float]:
    """Return µs per profile read on the request path: the replica's local copy of the database's profiles
    (what the server does) against one keyed query to PostgreSQL per request (what it avoids)."""
    import pandas as pd

    from serving.database import FleetSync, import_profiles, pool
    from serving.profiles import ProfileStore

    src = tmp / "profiles.parquet"
    pd.DataFrame({"original_transaction_id": [str(10_000_000 + i) for i in range(n)],
                  "tenure_days": [float(i % 900) for i in range(n)],
                  "country": [("FR", "US", "JP")[i % 3] for i in range(n)]}).to_parquet(src)
    import_profiles(src, url)
    local = tmp / "replica-profiles" / "profiles.sqlite"
    t0 = time.perf_counter()
    FleetSync(url, local).poll()
    copy_s = time.perf_counter() - t0
    store = ProfileStore(local)
    keys = [str(10_000_000 + (i * 7919) % n) for i in range(5000)]
    t0 = time.perf_counter()
    for k in keys:
        assert store.get(k) is not None
    local_us = (time.perf_counter() - t0) / len(keys) * 1e6
    p = pool(url, budget_ms=1000)
    try:
        with p.connection() as conn:
            conn.execute("SELECT 1")
        t0 = time.perf_counter()
        for k in keys:
            with p.connection() as conn:
                conn.execute("SELECT profile FROM profiles WHERE original_transaction_id = %s", (k,)).fetchone()
        remote_us = (time.perf_counter() - t0) / len(keys) * 1e6
    finally:
        p.close()
    return {"local_us": local_us, "remote_us": remote_us, "copy_s": copy_s, "n": float(n)}


def wrk(url: str, bodies: list[bytes], duration: int, conns: int) -> dict[str, float]:
    """Run wrk once against `url` with its own body file (each body once); return rps and p99 (ms)."""
    f = Path(tempfile.gettempdir()) / f"bench-pg-bodies-{uuid.uuid4()}.txt"
    f.write_bytes(b"\n".join(bodies) + b"\n")
    env = dict(os.environ, BODIES_FILE=str(f), URL_PATH="/retention/message", START_AT="0")
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s",
                              str(ROOT / "bench" / "wrk_bodies.lua"), url],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        f.unlink()
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),  # type: ignore[union-attr]
            "p99_ms": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
            "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "non2xx": float(non2xx.group(1)) if non2xx else 0.0}


def part_endpoint(url: str, tmp: Path, duration: int, rounds: int, conns: int) -> dict[str, Any]:
    from models.catalog import DEMO_CATALOG
    from serving.testpki import TestPKI
    from training.train import train_demo_model

    pki = TestPKI.mint()
    root = pki.write(tmp / "ca")
    registry = tmp / "registry"
    train_demo_model(registry, n_decisions=6000, seed=0)
    per_run = 6000 * duration + 50 * conns  # above what one wrk run sends here: each body is answered once
    bodies = [pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox") for _ in range(per_run * (rounds + 1) * 3)]
    base = dict(os.environ, RETENTION_ROOT_CERTS=str(root), RETENTION_APP_APPLE_ID=str(APP_ID),
                RETENTION_ENVIRONMENT="Sandbox", RETENTION_CATALOG=str(DEMO_CATALOG), RETENTION_MODEL=str(registry),
                RETENTION_LOG_LEVEL="warning", RETENTION_MAX_AGE_S="3600")
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    for name, extra in (("sqlite", {}), ("pg-a", {"RETENTION_DATABASE_URL": url}),
                        ("pg-b", {"RETENTION_DATABASE_URL": url})):
        port = free_port()
        env = dict(base, RETENTION_PORT=str(port), RETENTION_DATA_DIR=str(tmp / f"data-{name}"), **extra)
        servers[name] = (port, subprocess.Popen([sys.executable, "-m", "retention", "serve"], env=env, cwd=ROOT))
    res: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgres x2": []}
    nxt = 0

    def take() -> list[bytes]:
        nonlocal nxt
        chunk = bodies[nxt : nxt + per_run]
        nxt += per_run
        return chunk

    try:
        for port, proc in servers.values():
            wait(f"http://127.0.0.1:{port}/health", proc)
        for name in servers:  # warm-up
            wrk(f"http://127.0.0.1:{servers[name][0]}", take(), 1, conns // 2)
        for r in range(rounds):
            res["sqlite"].append(wrk(f"http://127.0.0.1:{servers['sqlite'][0]}", take(), duration, conns))
            two: dict[str, dict[str, float]] = {}
            slices = {n: take() for n in ("pg-a", "pg-b")}
            def one(n: str, chunk: list[bytes], out: dict[str, dict[str, float]]) -> None:
                out[n] = wrk(f"http://127.0.0.1:{servers[n][0]}", chunk, duration, conns // 2)

            threads = [threading.Thread(target=one, args=(n, chunk, two)) for n, chunk in slices.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            res["postgres x2"].append({"rps": sum(v["rps"] for v in two.values()),
                                       "requests": sum(v["requests"] for v in two.values()),
                                       "p99_ms": max(v["p99_ms"] for v in two.values()),
                                       "non2xx": sum(v["non2xx"] for v in two.values())})
            print(f"round {r + 1}: sqlite {res['sqlite'][-1]['rps']:.0f} rps, "
                  f"postgres x2 {res['postgres x2'][-1]['rps']:.0f} rps", flush=True)
    finally:
        for _, proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc in servers.values():
            proc.wait(60)
    return {k: {"rps": statistics.median(x["rps"] for x in v), "p99_ms": statistics.median(x["p99_ms"] for x in v),
                "non2xx": sum(x["non2xx"] for x in v)} for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default=os.environ.get("RETENTION_TEST_DATABASE_URL")
                    or "postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--decisions", type=int, default=20_000, help="decisions written per write measurement")
    ap.add_argument("--batch", type=int, default=500, help="decisions per batch in the write measurement")
    ap.add_argument("--skip-endpoint", action="store_true")
    args = ap.parse_args()

    from serving.database import migrate

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in args.database_url else "?"
    url = f"{args.database_url}{sep}options={quote(f'-csearch_path={schema}')}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    try:
        migrate(url)
        w = part_writes(url, tmp, args.decisions, args.batch, args.rounds)
        print(f"\nwriting decisions (batches of {args.batch}, {args.decisions} decisions, median of {args.rounds}):")
        for k in ("sqlite", "copy", "insert"):
            print(f"  {k:<8} {w[k]:8.1f} µs/decision  ({w[k] / w['sqlite']:.2f}x SQLite)")
        rp = part_replay(url, 5000)
        print(f"\nreplay check per request: in-process dict {rp['dict_us']:.2f} µs; PostgreSQL "
              f"{rp['pg_us']:.0f} µs mean, {rp['pg_p99_us']:.0f} µs p99")
        pr = part_profiles(url, tmp, 100_000)
        print(f"\nprofile read per request: local copy {pr['local_us']:.1f} µs; one keyed PostgreSQL query "
              f"{pr['remote_us']:.0f} µs (copying {pr['n']:.0f} profiles to the replica took {pr['copy_s']:.1f} s)")
        if not args.skip_endpoint:
            e = part_endpoint(url, tmp, args.duration, args.rounds, args.connections)
            print(f"\nendpoint ({args.connections} connections, {args.duration} s x {args.rounds} rounds, medians):")
            for k, v in e.items():
                print(f"  {k:<12} {v['rps']:8.0f} req/s  p99 {v['p99_ms']:6.1f} ms  non-2xx {v['non2xx']:.0f}")
            print(f"  ratio postgres x2 / sqlite: {e['postgres x2']['rps'] / e['sqlite']['rps']:.2f}")
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
