"""Per-call cost of the request path's building blocks, each beside its baseline in the same run.

- offer signature: serving.offers.OfferSigner vs Apple's PromotionalOfferV2SignatureCreator
- profile lookup: ProfileStore.get (lock, reopen check, dict) vs the bare query on a ``mode=ro`` connection
- decision log: DecisionLog.log (queue; the writer thread batches) vs one synchronous INSERT+COMMIT per
  decision (WAL, synchronous=NORMAL), and the writer's sustained rows/s with an 8 x 40 feature matrix
- metrics: Metrics.observe_request (batched tallies) vs prometheus_client's Histogram.observe + Counter.inc,
  single-process and multiprocess mode
- replay store: remembering a new id in the SQLite store the workers share (alone, and behind the
  in-process memory) vs the in-process memory alone, each with 720,000 ids held; two writer processes at once
- replay memory: a full GC collection and the cost of remembering one id with 720,000 ids held (a 6-minute
  window at 2,000 req/s), ours (one dict, which the GC never tracks) vs a dict plus a deque of (expiry, id)

Run: .venv/bin/python bench/building_blocks.py   (medians of 5 rounds; a few seconds on 2 cores)
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROUNDS = 5


def per_call_us(fn: Callable[[], object], n: int) -> float:
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


def row(name: str, ours: float, base: float, base_name: str) -> None:
    print(f"{name:<34} {ours:9.2f} us   baseline {base_name:<44} {base:9.2f} us   ratio {base / ours:6.1f}x")


def bench_offers() -> None:
    from appstoreserverlibrary.jws_signature_creator import PromotionalOfferV2SignatureCreator
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from serving.offers import OfferSigner

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    apple = PromotionalOfferV2SignatureCreator(pem, "KEYID12345", "issuer", "com.example.app")
    ours = OfferSigner(key, key_id="KEYID12345", issuer_id="issuer", bundle_id="com.example.app")
    a = per_call_us(
        lambda: apple.create_signature("com.example.premium.monthly", "winback50", "2000000123456789"), 1000
    )
    b = per_call_us(
        lambda: ours.sign(
            product_id="com.example.premium.monthly", offer_identifier="winback50", transaction_id="2000000123456789"
        ),
        1000,
    )
    row("offer signature (sign)", b, a, "Apple PromotionalOfferV2SignatureCreator")


def bench_profiles(tmp: Path) -> None:
    import pandas as pd

    from serving.profiles import ProfileStore, import_profiles

    n = 100_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"original_transaction_id": [str(2_000_000_000_000_000 + i) for i in range(n)]})
    for j in range(12):
        df[f"num{j}"] = rng.random(n)
    for j in range(4):
        df[f"cat{j}"] = rng.choice(["a", "b", "c"], n)
    src = tmp / "profiles.parquet"
    df.to_parquet(src)
    db = tmp / "profiles.sqlite"
    t0 = time.perf_counter()
    import_profiles(src, db)
    print(f"{'profile import (100k x 16 columns)':<34} {time.perf_counter() - t0:9.2f} s")
    store = ProfileStore(db)
    keys = [str(2_000_000_000_000_000 + int(i)) for i in rng.integers(0, n, 5000)]
    it = iter(keys * 100)
    ours = per_call_us(lambda: store.get(next(it)), 5000)
    # baseline: the bare query (an immutable=1 connection measured the same as mode=ro, so it was not kept)
    plain = sqlite3.connect(db.resolve().as_uri() + "?mode=ro&immutable=1", uri=True, check_same_thread=False)
    names = [c for c in df.columns if c != "original_transaction_id"]
    sql = f"SELECT {', '.join(names)} FROM profiles WHERE original_transaction_id = ?"
    it2 = iter(keys * 100)
    base = per_call_us(lambda: dict(zip(names, plain.execute(sql, (next(it2),)).fetchone(), strict=True)), 5000)
    row("profile get (hit)", ours, base, "bare query, immutable=1 connection")


def _record(i: int, feats: np.ndarray) -> object:
    from serving.log_schema import DecisionRecord

    return DecisionRecord(
        request_id=f"req-{i}",
        original_transaction_id="2000000123456789",
        product_id="com.example.premium.monthly",
        user_locale="en-US",
        environment="Production",
        signed_date=1_800_000_000_000,
        app_apple_id=1234,
        candidates=[f"m{j}" for j in range(8)],
        scores=np.full(8, 0.5),
        values=np.full(8, 29.9),
        probabilities=np.full(8, 1 / 8),
        message_id="m0",
        kind="message",
        propensity=0.95625,
        policy="ml:epsilon-greedy",
        policy_params={"epsilon": 0.05, "holdout": 0.0},
        model_version="v1",
        catalog_sha256="c" * 64,
        features=feats,
        feature_names_sha="f" * 16,
        latency_ms=1.0,
    )


def bench_decision_log(tmp: Path) -> None:
    from serving.log_schema import decision_row
    from serving.log_writer import _INSERT_DECISION, DecisionLog, _connect_writer

    feats = np.random.default_rng(0).random((8, 40), dtype=np.float32)
    records = [_record(i, feats) for i in range(20_000)]
    dlog = DecisionLog(tmp / "decisions-bench.sqlite", batch_ms=100, max_queue=1_000_000)
    dlog.start()
    it = iter(records * ROUNDS)
    ours = per_call_us(lambda: dlog.log(next(it)), 4000)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    dlog.close()
    written = dlog.stats()["written"]
    drain_s = time.perf_counter() - t0
    conn = _connect_writer(tmp / "decisions-sync.sqlite")
    it2 = iter(records)

    def sync_one() -> None:
        conn.execute("BEGIN")
        conn.execute(_INSERT_DECISION, decision_row(next(it2), 0))  # type: ignore[arg-type]
        conn.execute("COMMIT")

    base = per_call_us(sync_one, 500)
    row("decision log log()", ours, base, "synchronous INSERT+COMMIT per decision")
    # sustained writer throughput: time to write a full queue in batches
    dlog2 = DecisionLog(tmp / "decisions-bench2.sqlite", batch_ms=100, max_queue=1_000_000)
    for r in records:
        dlog2.log(r)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    dlog2.start()
    dlog2.close()
    dt = time.perf_counter() - t0
    size = (tmp / "decisions-bench2.sqlite").stat().st_size + sum(
        p.stat().st_size for p in tmp.glob("decisions-bench2.sqlite-*")
    )
    print(
        f"{'decision log writer':<34} {len(records) / dt:9.0f} rows/s (8 candidates, 8x40 features), "
        f"{size / len(records):.0f} bytes/row; close() drained {written} rows in {drain_s:.2f} s"
    )


_METRICS = """
import sys, time, statistics
sys.path.insert(0, {repo!r})
from prometheus_client import CollectorRegistry, Counter, Histogram
from serving.metrics import LATENCY_BUCKETS, Metrics
m = Metrics()
reg = CollectorRegistry()
h = Histogram("plain_latency", "x", buckets=LATENCY_BUCKETS, registry=reg)
c = Counter("plain_answers", "x", ["kind", "message_id"], registry=reg).labels("message", "m1")
def run(fn, n=20000):
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)
ours = run(lambda: m.observe_request(0.0021, "message", "m1"))
def base_fn():
    h.observe(0.0021)
    c.inc()
base = run(base_fn)
print(ours, base)
"""


def bench_metrics(tmp: Path) -> None:
    repo = str(Path(__file__).resolve().parent.parent)
    for mode in ("single-process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if mode == "multiprocess":
            d = tmp / "prom"
            d.mkdir(exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(d)
        out = subprocess.run(
            [sys.executable, "-c", _METRICS.format(repo=repo)], env=env, capture_output=True, text=True, check=True
        )
        ours, base = map(float, out.stdout.split())
        row(f"metrics observe_request ({mode})", ours, base, "Histogram.observe + Counter.inc")


def bench_replay_memory() -> None:
    """A full GC collection with a 6-minute replay window at 2,000 req/s (720,000 ids), ours against a deque."""
    import collections
    import gc
    import threading

    from serving.replay import InProcessReplayMemory

    n = 720_000
    gc.collect()
    gc.freeze()  # as the server does after start-up: what was loaded before stays out of the collections
    memory = InProcessReplayMemory()
    t0 = time.perf_counter()
    for i in range(n):
        now = 1.0 + i / 2000
        memory.remember(f"{i:08x}-0000-4000-8000-{i:012x}", now + 360.0, now)
    ours_us = (time.perf_counter() - t0) / n * 1e6
    gc.collect()
    ours = statistics.median(_timed(gc.collect) for _ in range(ROUNDS))
    del memory
    # the previous structure: the same dict plus a deque of (expiry, id) tuples for the expiry order
    seen: dict[str, float] = {}
    order: collections.deque[tuple[float, str]] = collections.deque()
    lock = threading.Lock()
    t0 = time.perf_counter()
    for i in range(n):
        rid, now = f"{i:08x}-0000-4000-8000-{i:012x}", 1.0 + i / 2000
        with lock:
            while order and order[0][0] <= now:
                expiry, old = order.popleft()
                if seen.get(old) == expiry:
                    del seen[old]
            if seen.get(rid, 0.0) > now:
                raise AssertionError
            seen[rid] = now + 360.0
            order.append((now + 360.0, rid))
    base_us = (time.perf_counter() - t0) / n * 1e6
    gc.collect()
    base = statistics.median(_timed(gc.collect) for _ in range(ROUNDS))
    gc.unfreeze()
    print(f"{'replay memory, 720k ids: full GC':<34} {ours * 1e3:9.2f} ms   baseline {'dict + deque of (expiry, id)':<44} "
          f"{base * 1e3:9.2f} ms")
    row("replay memory, remember one id", ours_us, base_us, "dict + deque of (expiry, id)")


_REPLAY_WRITER = """
import sqlite3, sys, time, uuid
sys.path.insert(0, {repo!r})
from serving.replay import SQLiteReplayMemory
store = SQLiteReplayMemory({path!r})
n, tag = {n}, {tag!r}
locked = 0
t0 = time.perf_counter()
for i in range(n):
    now = 1_800_000_000.0 + i / 2000
    try:
        assert store.remember(str(uuid.uuid4()), now + 360.0, now)
    except sqlite3.OperationalError:
        locked += 1
print((time.perf_counter() - t0) / n * 1e6, locked)
"""


def bench_replay_store(tmp: Path) -> None:
    """The shared replay store (SQLite, WAL) against the in-process memory, per new id; then two writers at once.

    Both hold a 6-minute window's worth of ids first (720,000 at 2,000 req/s), so the B-tree and the
    expiry index have their working size; each id is new (the cost every answered request pays).
    """
    from serving.replay import REPLAY_FILE, InProcessReplayMemory, LayeredReplayMemory, SQLiteReplayMemory

    held, n = 720_000, 20_000
    path = tmp / REPLAY_FILE
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE replay (request_id TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID")
    con.execute("CREATE INDEX replay_expiry ON replay (expires_at)")
    start = 1_800_000_000.0
    con.executemany("INSERT INTO replay VALUES (?, ?)",
                    ((str(uuid.uuid4()), start + 360.0 + i / 2000) for i in range(held)))
    con.commit()
    con.close()
    t_end = start + held / 2000

    def ids(tag: str, k: int) -> list[tuple[str, float]]:  # random UUIDs, as Apple's requestIdentifiers are
        return [(str(uuid.uuid4()), t_end + i / 2000) for i in range(k)]

    def timed(memory: object, batch: list[tuple[str, float]]) -> float:
        rem = memory.remember  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        for rid, now in batch:
            rem(rid, now + 360.0, now)
        return (time.perf_counter() - t0) / len(batch) * 1e6

    def timed_batches(store: SQLiteReplayMemory, batch: list[tuple[str, float]], size: int) -> float:
        items = [(rid, now + 360.0, now) for rid, now in batch]
        t0 = time.perf_counter()
        for i in range(0, len(items), size):
            store.remember_many(items[i : i + size])
        return (time.perf_counter() - t0) / len(items) * 1e6

    results: dict[str, list[float]] = {"memory": [], "sqlite": [], "layered": [], "batch4": [], "batch16": []}
    sqlite_store = SQLiteReplayMemory(path)
    layered = LayeredReplayMemory(lambda: SQLiteReplayMemory(path))
    in_process = InProcessReplayMemory()
    last_layered: list[tuple[str, float]] = []
    for r in range(ROUNDS):  # alternating, each round on new ids
        results["memory"].append(timed(in_process, ids(f"m{r}", n)))
        results["sqlite"].append(timed(sqlite_store, ids(f"s{r}", n)))
        last_layered = ids(f"l{r}", n)
        results["layered"].append(timed(layered, last_layered))
        results["batch4"].append(timed_batches(sqlite_store, ids(f"b{r}", n), 4))
        results["batch16"].append(timed_batches(sqlite_store, ids(f"c{r}", n), 16))
    base = statistics.median(results["memory"])
    replay_again = [(rid, now + 1) for rid, now in last_layered]
    for name, us in (("replay store (SQLite), new id", statistics.median(results["sqlite"])),
                     ("replay front + store, new id", statistics.median(results["layered"])),
                     ("replay store, batches of 4", statistics.median(results["batch4"])),
                     ("replay store, batches of 16", statistics.median(results["batch16"])),
                     ("replay front + store, a replay", timed(layered, replay_again))):
        print(f"{name:<34} {us:9.2f} us   baseline {'in-process memory (dict), new id':<44} {base:9.2f} us   "
              f"+{us - base:.2f} us")
    sqlite_store.close()
    layered.close()
    # two worker processes writing new ids to the one file at the same time
    repo = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", _REPLAY_WRITER.format(repo=repo, path=str(path), n=n, tag=f"w{k}")],
                              stdout=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate()[0].split() for p in procs]
    print(f"{'replay store, 2 writers at once':<34} {statistics.mean(float(o[0]) for o in outs):9.2f} us per new id in "
          f"each process, as fast as each can (one writer alone: {statistics.median(results['sqlite']):.2f} us); "
          f"lock waits past the 100 ms timeout: {sum(int(o[1]) for o in outs)} of {2 * n}")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; medians of {ROUNDS} rounds")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_offers()
        bench_profiles(tmp)
        bench_decision_log(tmp)
        bench_metrics(tmp)
        bench_replay_store(tmp)
    bench_replay_memory()


if __name__ == "__main__":
    main()
