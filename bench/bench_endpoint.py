"""Endpoint throughput and latency against a bare Litestar echo route, side by side in one run.

    .venv/bin/python bench/bench_endpoint.py [--duration 10] [--connections 16] [--rounds 3]

Needs ``wrk`` (Debian: ``apt-get install wrk``). Both servers run as one uvicorn worker
(httptools + uvloop) on 127.0.0.1; wrk runs one thread with 16 connections. The full endpoint
verifies a fresh signed request each time (each body is used once: replay protection is on),
featurizes and scores 8 candidates (offers enabled), samples, answers, and logs the decision.
Reports requests/s (median over rounds, alternating the two servers), the ratio, p50/p99 latency,
non-2xx answers and the fallbacks counted in the decision log.
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


def ms(text: str) -> float:
    m = re.match(r"([0-9.]+)(us|ms|s)", text)
    assert m, text
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


_next_body = 0


def run_wrk(url: str, bodies: Path, url_path: str, duration: int, conns: int) -> dict[str, float]:
    """Run wrk once; the endpoint gets bodies it has not seen (each run starts past the last one)."""
    global _next_body
    env = dict(os.environ, BODIES_FILE=str(bodies), URL_PATH=url_path, START_AT=str(_next_body))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(ROOT / "bench" / "wrk_bodies.lua"), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if not url_path.startswith("/echo"):
        _next_body += total + 10 * conns
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
            "requests": float(total)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bodies", type=int, default=0, help="pre-signed bodies (default: enough for the run)")
    args = ap.parse_args()

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from serving.settings import DEMO_CATALOG
    from serving.testpki import TestPKI
    from training.train import train_demo_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-endpoint-"))
    pki = TestPKI.mint()
    root = pki.write(tmp / "ca")
    registry = tmp / "registry"
    print("training a model for the benchmark...", flush=True)
    train_demo_model(registry, n_decisions=20000, seed=0)
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    n_bodies = args.bodies or int(5000 * args.duration * (args.rounds + 1))
    print(f"signing {n_bodies:,} request bodies...", flush=True)
    bodies = tmp / "bodies.txt"
    with bodies.open("wb") as f:
        for i in range(n_bodies):
            f.write(pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox",
                                            original_transaction_id=str(10_000_000 + i)) + b"\n")

    port_app, port_echo = free_port(), free_port()
    data_dir = tmp / "data"
    env = dict(os.environ, RETENTION_ROOT_CERTS=str(root), RETENTION_APP_APPLE_ID=str(APP_ID),
               RETENTION_ENVIRONMENT="Sandbox", RETENTION_CATALOG=str(DEMO_CATALOG), RETENTION_MODEL=str(registry),
               RETENTION_DATA_DIR=str(data_dir), RETENTION_PORT=str(port_app), RETENTION_LOG_LEVEL="warning",
               RETENTION_MAX_AGE_S="3600", RETENTION_OFFER_KEY_FILE=str(p8), RETENTION_OFFER_KEY_ID="BENCH",
               RETENTION_OFFER_ISSUER_ID="bench-issuer", RETENTION_BUNDLE_ID="com.example.app")
    app = subprocess.Popen([sys.executable, "-m", "retention", "serve"], env=env, cwd=ROOT)
    echo = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.echo_app:app", "--port", str(port_echo),
                             "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
                            cwd=ROOT)
    try:
        wait(f"http://127.0.0.1:{port_app}/health", app)
        wait(f"http://127.0.0.1:{port_echo}/health", echo)
        # warm-up (caches the verified chain, JIT-free but warms ORT and the page cache)
        run_wrk(f"http://127.0.0.1:{port_echo}", bodies, "/echo", 2, args.connections)
        run_wrk(f"http://127.0.0.1:{port_app}", bodies, "/retention/message", 2, args.connections)
        res: dict[str, list[dict[str, float]]] = {"echo": [], "echo-json": [], "endpoint": []}
        for r in range(args.rounds):
            res["echo"].append(run_wrk(f"http://127.0.0.1:{port_echo}", bodies, "/echo", args.duration, args.connections))
            res["echo-json"].append(
                run_wrk(f"http://127.0.0.1:{port_echo}", bodies, "/echo-json", args.duration, args.connections))
            # the endpoint reads a fresh slice of bodies each round
            res["endpoint"].append(run_wrk(f"http://127.0.0.1:{port_app}", bodies, "/retention/message",
                                           args.duration, args.connections))
            print(f"round {r + 1}: echo {res['echo'][-1]['rps']:.0f} rps, echo-json {res['echo-json'][-1]['rps']:.0f} rps, "
                  f"endpoint {res['endpoint'][-1]['rps']:.0f} rps", flush=True)
    finally:
        app.send_signal(signal.SIGTERM)
        echo.send_signal(signal.SIGTERM)
        app.wait(timeout=30)
        echo.wait(timeout=30)
    fallbacks = 0
    logged = 0
    for db in data_dir.glob("decisions-*.sqlite"):
        con = sqlite3.connect(db)
        logged += con.execute("SELECT count(*) FROM decisions").fetchone()[0]
        fallbacks += con.execute("SELECT count(*) FROM decisions WHERE fallback_reason IS NOT NULL").fetchone()[0]
        con.close()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in res[name])

    ratio = med("endpoint", "rps") / med("echo", "rps")
    print()
    print(f"| server | req/s (median of {args.rounds}) | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|")
    for name in ("echo", "echo-json", "endpoint"):
        print(f"| {name} | {med(name, 'rps'):.0f} | {med(name, 'p50_ms'):.2f} | {med(name, 'p99_ms'):.2f} | "
              f"{sum(x['non2xx'] for x in res[name]):.0f} |")
    print(f"\nendpoint / echo requests per second: {ratio:.2f} (floor 0.40, goal 0.50)")
    print(f"endpoint / echo-json requests per second: {med('endpoint', 'rps') / med('echo-json', 'rps'):.2f}")
    print(f"decisions logged: {logged:,}; fallbacks: {fallbacks}")


if __name__ == "__main__":
    main()
