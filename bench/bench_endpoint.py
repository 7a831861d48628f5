"""Endpoint throughput and latency against a bare Litestar echo route, side by side in one run.

    .venv/bin/python bench/bench_endpoint.py [--duration 10] [--connections 16] [--rounds 3]

Needs ``wrk`` (Debian: ``apt-get install wrk``). Every server runs as one uvicorn worker
(httptools + uvloop; `--workers N` for the endpoint servers) on 127.0.0.1; wrk runs one thread with 16 connections. A second baseline,
``reference`` (bench/reference_app.py), does only the work the protocol makes every answer pay (one
ES256 check of Apple's signature, one 8-row ONNX run, one offer signature, both ECDSA operations on the
event loop as the endpoint does them) and nothing else, so the endpoint can also be read against what this machine allows
at all. The full endpoint verifies a fresh signed request each time (each body is used once: replay
protection is on), featurizes and scores 8 candidates (offers enabled), samples, answers, and logs the
decision.
Reports requests/s (median over rounds, alternating the servers), the ratio, p50/p99 latency,
non-2xx answers, the fallbacks counted in the decision log, and where the endpoint's CPU went during
its rounds (its event loop's thread; its other threads: the log writer and the worker thread; its child
processes, if any).

    --no-offers          no In-App Purchase key (no offer candidates, no offer signatures)
    --profiles           every subscriber has a profile in the store (without it every request is a
                         profile miss, and the featurizer serves its matrix from its cache)
    --config NAME=ENV    also run the endpoint with other settings (space-separated RETENTION_*=VALUE pairs),
                         alternating with the default endpoint in every round (repeatable): same-run baselines
                         for a choice of settings; reports each one's per-round ratio to the default endpoint
    --workers N          uvicorn workers of every endpoint server (the echo and the reference keep one)
    --no-echo            only the endpoint servers
    --before-root DIR    also the endpoint of another checkout (with its own .venv), default settings, as 'before'
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APP_ID = 1234567890


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server not ready")



def prepare(prefix: str) -> tuple[Path, Any, Path, Path, Path]:
    """Return (temp folder, test PKI, its root certificate, a trained registry, an In-App Purchase key file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from serving.testpki import TestPKI
    from training.train import train_demo_model

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    pki = TestPKI.mint()
    root = pki.write(tmp / "ca")
    registry = tmp / "registry"
    print("training a model for the benchmark...", flush=True)
    train_demo_model(registry, n_decisions=20000, seed=0)
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return tmp, pki, root, registry, p8


def server_env(root: Path, registry: Path, p8: Path | None, **extra: str) -> dict[str, str]:
    """Return the environment of a benchmarked ``retention serve``: the test CA, the demo catalog, `registry`,
    offers signed with `p8` (None: no offers), quiet logs, then `extra` RETENTION_* variables."""
    from models.catalog import DEMO_CATALOG

    env = dict(os.environ, RETENTION_ROOT_CERTS=str(root), RETENTION_APP_APPLE_ID=str(APP_ID),
               RETENTION_BUNDLE_ID="com.example.app", RETENTION_ENVIRONMENT="Sandbox",
               RETENTION_CATALOG=str(DEMO_CATALOG), RETENTION_MODEL=str(registry), RETENTION_LOG_LEVEL="warning")
    if p8 is not None:
        env.update(RETENTION_OFFER_KEY_FILE=str(p8), RETENTION_OFFER_KEY_ID="BENCH",
                   RETENTION_OFFER_ISSUER_ID="bench-issuer")
    env.update(extra)
    return env

def ms(text: str) -> float:
    m = re.match(r"([0-9.]+)(us|ms|s)", text)
    assert m, text
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


_next_body = 0


def run_wrk(url: str, bodies: list[bytes], url_path: str, duration: int, conns: int, *, fresh: bool = True) -> dict[str, float]:
    """Run wrk once; the endpoint gets bodies it has not seen (each run starts past the last one).

    wrk reads its whole bodies file before it starts, so each run gets a file of only the slice it may
    use (at most 6,000 requests a second): a short start, and CPU shares measured around the run are
    not diluted by wrk reading a large file.
    """
    global _next_body
    start = _next_body if fresh else 0
    chunk = bodies[start : start + 6000 * duration + 100 * conns]
    if len(chunk) < 6000 * duration:
        raise SystemExit("not enough pre-signed bodies: pass a larger --bodies")
    slice_file = Path(tempfile.gettempdir()) / f"bench-endpoint-bodies-{os.getpid()}.txt"
    slice_file.write_bytes(b"\n".join(chunk) + b"\n")
    env = dict(os.environ, BODIES_FILE=str(slice_file), URL_PATH=url_path, START_AT="0")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(ROOT / "bench" / "wrk_bodies.lua"), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    slice_file.unlink()
    if fresh:
        _next_body += total + 10 * conns
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
            "requests": float(total)}


def _ticks(pid: int) -> dict[str, int]:
    """CPU ticks (user + system) of `pid`'s main thread, its other threads, and its child processes."""
    out = {"loop thread": 0, "other threads": 0, "child processes": 0}

    def stat_ticks(path: str) -> tuple[int, int]:
        st = Path(path).read_text()
        f = st[st.rindex(")") + 2 :].split()
        return int(f[11]) + int(f[12]), int(f[1])  # utime + stime, ppid

    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            ticks, _ = stat_ticks(f"/proc/{pid}/task/{t}/stat")
            out["loop thread" if int(t) == pid else "other threads"] += ticks
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    ticks, ppid = stat_ticks(f"/proc/{p}/stat")
                except OSError:
                    continue
                if ppid == pid:
                    out["child processes"] += ticks
    except OSError:
        pass
    return out


def _write_profiles(tmp: Path, n: int, data_dirs: list[Path]) -> None:
    """Import a random profile (the demo model's columns) for each of the `n` benchmark subscribers."""
    import numpy as np
    import pandas as pd

    from serving.profiles import import_profiles, profiles_path

    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "original_transaction_id": [str(10_000_000 + i) for i in range(n)],
        "tenure_days": rng.integers(0, 2000, n), "plan_age_days": rng.integers(0, 900, n),
        "price_paid": rng.choice([4.99, 9.99, 59.88, 119.88], n), "engagement": rng.random(n),
        "sessions_30d": rng.integers(0, 90, n), "offers_redeemed": rng.integers(0, 4, n),
        "acquisition_channel": rng.choice(["organic", "paid_social", "search_ads", "referral"], n),
        "country": rng.choice(["US", "GB", "FR", "DE", "JP", "BR"], n),
    })
    csv = tmp / "profiles.csv"
    df.to_csv(csv, index=False)
    print(f"importing {n:,} subscriber profiles...", flush=True)
    for d in data_dirs:
        import_profiles(csv, profiles_path(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bodies", type=int, default=0, help="pre-signed bodies (default: enough for the run)")
    ap.add_argument("--no-offers", action="store_true",
                    help="no In-App Purchase key: no offer candidates and no offer signatures (6 candidates)")
    ap.add_argument("--profiles", action="store_true",
                    help="import a profile for every benchmark subscriber (each request then reads and featurizes one)")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=ENV",
                    help="also run the endpoint with these settings, alternating with the others in every round: "
                         "NAME=space-separated RETENTION_*=VALUE pairs (repeatable), e.g. "
                         "'loop=RETENTION_LOG_LEVEL=warning'")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of every endpoint server")
    ap.add_argument("--no-echo", action="store_true", help="run only the endpoint servers (no echo, no reference)")
    ap.add_argument("--before-root", default=None, metavar="DIR",
                    help="also run, as 'before', the endpoint of another checkout with its own .venv (e.g. the code "
                         "before a change), with the default settings, alternating with the others")
    args = ap.parse_args()
    configs: dict[str, dict[str, str]] = {}
    for item in args.config:
        name, _, pairs = item.partition("=")
        if not name or name == "endpoint" or name in configs:
            raise SystemExit(f"--config {item!r}: give a new NAME=ENV")
        configs[name] = dict(kv.split("=", 1) for kv in pairs.split())

    tmp, pki, root, registry, p8 = prepare("bench-endpoint-")
    n_bodies = args.bodies or int(6000 * args.duration * (args.rounds + 1) * (1 + len(configs)))
    print(f"signing {n_bodies:,} request bodies...", flush=True)
    bodies = [pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", original_transaction_id=str(10_000_000 + i))
              for i in range(n_bodies)]

    port_echo, port_ref = free_port(), free_port()
    before_root = Path(args.before_root).resolve() if args.before_root else None
    names = ["endpoint", *configs, *(["before"] if before_root else [])]
    data_dirs = {name: tmp / f"data-{name}" for name in names}
    if args.profiles:
        _write_profiles(tmp, n_bodies, list(data_dirs.values()))
    env = server_env(root, registry, None if args.no_offers else p8, RETENTION_MAX_AGE_S="3600",
                     RETENTION_WORKERS=str(args.workers))
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    for name, extra in {"endpoint": {}, **configs}.items():
        port = free_port()
        server_env_ = dict(env, **extra, RETENTION_PORT=str(port), RETENTION_DATA_DIR=str(data_dirs[name]))
        servers[name] = (port, subprocess.Popen([sys.executable, "-m", "retention", "serve"], env=server_env_, cwd=ROOT))
    if before_root is not None:  # its own interpreter and working directory: it imports its own packages
        port = free_port()
        server_env_ = dict(env, RETENTION_PORT=str(port), RETENTION_DATA_DIR=str(data_dirs["before"]))
        servers["before"] = (port, subprocess.Popen([str(before_root / ".venv" / "bin" / "python"), "-m", "retention", "serve"],
                                                    env=server_env_, cwd=before_root))
    uvicorn = [sys.executable, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools", "--no-access-log",
               "--log-level", "warning"]
    others: dict[str, tuple[int, subprocess.Popen[bytes], str]] = {}  # name: (port, process, path)
    if not args.no_echo:
        echo = subprocess.Popen([*uvicorn, "bench.echo_app:app", "--port", str(port_echo)], cwd=ROOT)
        ref_env = dict(os.environ, BENCH_MODEL=str(registry), BENCH_OFFER_KEY=str(p8),
                       BENCH_REFERENCE_OFFERS="0" if args.no_offers else "1")
        reference = subprocess.Popen([*uvicorn, "bench.reference_app:app", "--port", str(port_ref)], cwd=ROOT,
                                     env=ref_env)
        others = {"echo": (port_echo, echo, "/echo"), "echo-json": (port_echo, echo, "/echo-json"),
                  "reference": (port_ref, reference, "/retention/message")}
    res: dict[str, list[dict[str, float]]] = {**{name: [] for name in others}, **{name: [] for name in servers}}
    cpu: dict[str, dict[str, float]] = {name: {} for name in servers}
    hz = os.sysconf("SC_CLK_TCK")
    try:
        for port, proc in servers.values():
            wait(f"http://127.0.0.1:{port}/health", proc)
        for port, proc, _ in others.values():
            wait(f"http://127.0.0.1:{port}/health", proc)
        # warm-up (caches the verified chain, warms ONNX Runtime and the page cache)
        for port, _, path in others.values():
            run_wrk(f"http://127.0.0.1:{port}", bodies, path, 2, args.connections, fresh=False)
        for port, _ in servers.values():
            run_wrk(f"http://127.0.0.1:{port}", bodies, "/retention/message", 2, args.connections)
        for r in range(args.rounds):
            for name, (port, _, path) in others.items():
                res[name].append(run_wrk(f"http://127.0.0.1:{port}", bodies, path, args.duration, args.connections,
                                         fresh=False))
            # alternate the endpoint servers' order from round to round (ABC, CBA, ...)
            order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
            for name, (port, proc) in order:
                # the endpoint reads a fresh slice of bodies each round
                before, t0 = _ticks(proc.pid), time.monotonic()
                res[name].append(run_wrk(f"http://127.0.0.1:{port}", bodies, "/retention/message",
                                         args.duration, args.connections))
                after, dt = _ticks(proc.pid), time.monotonic() - t0
                for k in after:
                    cpu[name].setdefault(k, 0.0)
                    cpu[name][k] += (after[k] - before[k]) / hz / dt / args.rounds
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]['rps']:.0f} rps (p99 {v[-1]['p99_ms']:.1f} ms)"
                                                 for n, v in res.items()), flush=True)
    finally:
        procs = [proc for _, proc in servers.values()] + list({id(p): p for _, p, _ in others.values()}.values())
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    logged: dict[str, tuple[int, int]] = {}
    for name, d in data_dirs.items():
        n = fb = 0
        for db in d.glob("decisions-*.sqlite"):
            con = sqlite3.connect(db)
            n += con.execute("SELECT count(*) FROM decisions").fetchone()[0]
            fb += con.execute("SELECT count(*) FROM decisions WHERE fallback_reason IS NOT NULL").fetchone()[0]
            con.close()
        logged[name] = (n, fb)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in res[name])

    print()
    print(f"| server | req/s (median of {args.rounds}) | p50 ms | p99 ms | non-2xx | decisions logged | fallbacks |")
    print("|---|---|---|---|---|---|---|")
    for name in res:
        n, fb = logged.get(name, (0, 0))
        print(f"| {name} | {med(name, 'rps'):.0f} | {med(name, 'p50_ms'):.2f} | {med(name, 'p99_ms'):.2f} | "
              f"{sum(x['non2xx'] for x in res[name]):.0f} | {n:,} | {fb} |")
    if others:
        print(f"\nendpoint / echo requests per second: {med('endpoint', 'rps') / med('echo', 'rps'):.2f}")
        print(f"endpoint / echo-json requests per second: {med('endpoint', 'rps') / med('echo-json', 'rps'):.2f}")
        print(f"reference (the protocol's mandatory work only) / echo requests per second: "
              f"{med('reference', 'rps') / med('echo', 'rps'):.2f}")
        print(f"endpoint / reference requests per second: {med('endpoint', 'rps') / med('reference', 'rps'):.2f}")
    for name in [*configs, *(["before"] if before_root else [])]:
        per_round = [b["rps"] / a["rps"] for a, b in zip(res["endpoint"], res[name], strict=True)]
        p99_round = [b["p99_ms"] / a["p99_ms"] for a, b in zip(res["endpoint"], res[name], strict=True)]
        print(f"{name} / endpoint: req/s {med(name, 'rps') / med('endpoint', 'rps'):.2f} on the medians "
              f"(per round {' / '.join(f'{x:.2f}' for x in per_round)}; {sum(x > 1 for x in per_round)} of "
              f"{len(per_round)} higher), p99 {med(name, 'p99_ms') / med('endpoint', 'p99_ms'):.2f} "
              f"(per round {' / '.join(f'{x:.2f}' for x in p99_round)})")
    for name, shares in cpu.items():
        print(f"{name} CPU under load (share of one core): " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
