"""Never-seen forged certificate chains against valid requests, in one run on one ``retention serve``.

    .venv/bin/python bench/bench_forged.py [--duration 5] [--connections 16] [--rounds 2] [--pace 100]

Needs ``wrk`` (Debian: ``apt-get install wrk``). One server (one uvicorn worker, the default settings, an
In-App Purchase key so offers are signed) on 127.0.0.1. Each round, alternating:

* ``valid``: wrk posts fresh valid signed requests (each body once: replay protection is on);
* ``forged``: wrk posts requests whose leaf certificate has one byte of its signature changed, a different
  byte for each request (never-seen chains: no cache can answer them);
* ``paced alone``: one client on one connection sends fresh valid requests at ``--pace`` per second and
  records each latency;
* ``paced + valid flood``: the same paced client while wrk floods the server with valid requests (the
  baseline: a server saturated by legitimate work);
* ``paced + forged flood``: the same paced client while wrk floods the server with forged chains.

With ``--baseline-root DIR`` a second server runs from another checkout (``git archive main | tar -x -C DIR``)
through the same phases, alternating with this one. Prints requests/s of valid and forged (the goal: forged >= 0.60 of valid, same run), the paced client's
p50/p99 alone and during each flood, and how the forged requests were refused (``untrusted_chain`` after
their signature check, ``chain_check_busy`` when the bound of concurrent first-time chain checks was full).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_endpoint import free_port, ms, prepare, server_env, wait  # noqa: E402

APP_ID = 1234567890


def write_bodies(path: Path, make: object, start: int, n: int) -> None:
    """Write `n` request bodies, one per line, made by ``make(i)`` for i from `start`."""
    with path.open("wb") as f:
        for i in range(start, start + n):
            f.write(make(i))  # type: ignore[operator]
            f.write(b"\n")


def run_wrk(port: int, bodies_file: Path, duration: int, conns: int) -> dict[str, float]:
    """Run wrk once over the bodies in `bodies_file` (each used once while they last)."""
    env = dict(os.environ, BODIES_FILE=str(bodies_file), URL_PATH="/retention/message", START_AT="0")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(ROOT / "bench" / "wrk_bodies.lua"),
         f"http://127.0.0.1:{port}"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lines = sum(1 for _ in bodies_file.open("rb"))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "requests": float(total),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "reused": float(max(0, total - lines)),
    }


def paced(port: int, bodies: list[bytes], rate: float, stop: threading.Event, out: list[float], codes: list[int]) -> None:
    """Send `bodies` at `rate` per second on one connection until `stop` or they run out; latencies in ms."""
    period = 1.0 / rate
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        nxt = time.perf_counter()
        for body in bodies:
            if stop.is_set():
                return
            nxt += period
            t0 = time.perf_counter()
            r = http.post("/retention/message", content=body, headers={"content-type": "application/json"})
            out.append((time.perf_counter() - t0) * 1000)
            codes.append(r.status_code)
            delay = nxt - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


def refusals(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    found = re.findall(r'^retention_verification_failures_total\{code="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M)
    return {code: float(n) for code, n in found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pace", type=float, default=100.0, help="requests per second of the paced valid client")
    ap.add_argument("--max-rps", type=int, default=6000, help="bodies written per second of wrk run (default 6000)")
    ap.add_argument("--env", default="", help="extra server settings: space-separated RETENTION_*=VALUE pairs")
    ap.add_argument("--baseline-root", default=None,
                    help="another checkout (e.g. of main) whose server runs the same phases, alternating, as a baseline")
    args = ap.parse_args()

    tmp, pki, root, registry, p8 = prepare("bench-forged-")
    env = server_env(root, registry, p8, RETENTION_MAX_AGE_S="3600")
    env.update(dict(kv.split("=", 1) for kv in args.env.split()))

    def valid(i: int) -> bytes:
        return pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", original_transaction_id=str(10_000_000 + i))

    def forged(i: int) -> bytes:
        token = pki.sign(pki.request_payload(app_apple_id=APP_ID, environment="Sandbox"), x5c=pki.x5c_with_forged_leaf(i))
        return b'{"signedPayload":"' + token.encode() + b'"}'

    per_run = args.max_rps * args.duration
    print(f"writing {per_run:,} bodies per wrk run...", flush=True)
    roots = {"this": ROOT, **({"baseline": Path(args.baseline_root).resolve()} if args.baseline_root else {})}
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    for name, where in roots.items():
        port = free_port()
        servers[name] = (port, subprocess.Popen(
            [sys.executable, "-m", "retention", "serve"], cwd=where,
            env=dict(env, RETENTION_PORT=str(port), RETENTION_DATA_DIR=str(tmp / f"data-{name}"))))
    res: dict[str, dict[str, list[dict[str, float]]]] = {n: {"valid": [], "forged": []} for n in servers}
    paced_ms = {n: {"alone": [], "valid flood": [], "forged flood": []} for n in servers}
    paced_codes: dict[str, list[int]] = {n: [] for n in servers}
    refused: dict[str, dict[str, float]] = {}
    counter = {"valid": 0, "forged": 0}

    def bodies_file(kind: str, n: int) -> Path:
        path = tmp / f"{kind}.txt"
        write_bodies(path, valid if kind == "valid" else forged, counter[kind], n)
        counter[kind] += n
        return path

    try:
        for port, proc in servers.values():
            wait(f"http://127.0.0.1:{port}/health", proc)
            run_wrk(port, bodies_file("valid", 2 * args.max_rps), 2, args.connections)  # warm-up
        n_paced = int(args.pace * args.duration) + 10
        for r in range(args.rounds):
            for name, (port, _) in servers.items():
                out = res[name]
                out["valid"].append(run_wrk(port, bodies_file("valid", per_run), args.duration, args.connections))
                out["forged"].append(run_wrk(port, bodies_file("forged", per_run), args.duration, args.connections))
                # the paced client alone, then during a flood of valid requests, then of never-seen forged chains
                for phase, sink in paced_ms[name].items():
                    paced_bodies = [valid(counter["valid"] + i) for i in range(n_paced)]
                    counter["valid"] += n_paced
                    flood = None if phase == "alone" else bodies_file(phase.split()[0], per_run)
                    stop = threading.Event()
                    t = threading.Thread(target=paced, args=(port, paced_bodies, args.pace, stop, sink, paced_codes[name]))
                    t.start()
                    if flood is None:
                        time.sleep(args.duration)
                    else:
                        run_wrk(port, flood, args.duration, args.connections)
                    stop.set()
                    t.join()
                print(f"round {r + 1}, {name}: valid {out['valid'][-1]['rps']:.0f} rps, "
                      f"forged {out['forged'][-1]['rps']:.0f} rps", flush=True)
        for name, (port, _) in servers.items():
            refused[name] = refusals(port)
    finally:
        for _, proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc in servers.values():
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name: str, kind: str, key: str) -> float:
        return statistics.median(x[key] for x in res[name][kind])

    def pct(xs: list[float], q: int) -> float:
        return statistics.quantiles(xs, n=100)[q - 1]

    print()
    print(f"| server | load | req/s (median of {args.rounds}) | wrk p99 ms | non-2xx | bodies reused |")
    print("|---|---|---|---|---|---|")
    for name in servers:
        for kind in ("valid", "forged"):
            print(f"| {name} | {kind} | {med(name, kind, 'rps'):.0f} | {med(name, kind, 'p99_ms'):.2f} | "
                  f"{sum(x['non2xx'] for x in res[name][kind]):.0f} | {sum(x['reused'] for x in res[name][kind]):.0f} |")
    print(f"\n| server | paced valid client ({args.pace:g}/s, one connection) | requests | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for name in servers:
        for phase, xs in paced_ms[name].items():
            print(f"| {name} | {phase} | {len(xs)} | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} |")
    for name in servers:
        ratio = med(name, "forged", "rps") / med(name, "valid", "rps")
        p = paced_ms[name]
        print(f"\n{name}: forged / valid requests per second {ratio:.2f} (goal >= 0.60: {'met' if ratio >= 0.6 else 'MISSED'}); "
              f"paced p99 during the forged flood / during the valid flood "
              f"{pct(p['forged flood'], 99) / pct(p['valid flood'], 99):.2f}; "
              f"paced non-200 answers {sum(c != 200 for c in paced_codes[name])}")
        print(f"{name}: refusals by code: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(refused[name].items())))


if __name__ == "__main__":
    main()
