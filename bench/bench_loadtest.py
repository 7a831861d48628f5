"""Latency at bounded concurrency, Apple's way: ``retention loadtest`` against the endpoint and a reference.

    .venv/bin/python bench/bench_loadtest.py [--concurrency 50] [--total 2000] [--rounds 3]
                                             [--threshold-ms 700] [--success-rate 99.9]

Starts ``retention serve`` on the demo catalog with a freshly trained model and an In-App Purchase key (offers
on), and, as the baseline measured in the same run, ``bench/reference_app.py`` (only the work every answer must
pay: one ES256 check, one ONNX run, one offer signature). Each round runs Apple's performance-test shape against
both, alternating: ``--total`` freshly signed requests, at most ``--concurrency`` in flight, from this process
(serving/loadtest.py). Prints, per server, the median over rounds of p50/p99 response time, requests/s and the
success rate, the endpoint/reference ratios, and PASS/FAIL by Apple's rule for the endpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_endpoint import APP_ID, free_port, prepare, server_env, wait  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--total", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threshold-ms", type=int, default=700)
    ap.add_argument("--success-rate", type=float, default=99.9)
    args = ap.parse_args()

    from serving.loadtest import LoadTestConfig, LoadTestResult, format_result, run, run_loadtest

    tmp, pki, root, registry, p8 = prepare("bench-loadtest-")
    port_app, port_ref = free_port(), free_port()
    env = server_env(root, registry, p8, RETENTION_DATA_DIR=str(tmp / "data"), RETENTION_PORT=str(port_app))
    endpoint = subprocess.Popen([sys.executable, "-m", "retention", "serve"], env=env, cwd=ROOT)
    uvicorn = [sys.executable, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools", "--no-access-log",
               "--log-level", "warning"]
    ref_env = dict(os.environ, BENCH_MODEL=str(registry), BENCH_OFFER_KEY=str(p8), BENCH_REFERENCE_OFFERS="1")
    reference = subprocess.Popen([*uvicorn, "bench.reference_app:app", "--port", str(port_ref)], cwd=ROOT, env=ref_env)
    targets = {"endpoint": f"http://127.0.0.1:{port_app}/retention/message",
               "reference": f"http://127.0.0.1:{port_ref}/retention/message"}
    config = LoadTestConfig(args.concurrency, args.total, args.threshold_ms, args.success_rate)

    def make_body() -> bytes:
        return bytes(pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))

    results: dict[str, list[LoadTestResult]] = {name: [] for name in targets}
    try:
        wait(f"http://127.0.0.1:{port_app}/health", endpoint)
        wait(f"http://127.0.0.1:{port_ref}/health", reference)
        warm = LoadTestConfig(args.concurrency, min(500, args.total), args.threshold_ms, 0.0)
        for url in targets.values():
            run(run_loadtest(url, make_body, warm))
        for r in range(args.rounds):
            for name, url in targets.items():
                results[name].append(run(run_loadtest(url, make_body, config)))
            print(f"round {r + 1}: " + ", ".join(
                f"{n} p99 {v[-1].percentile(99):.1f} ms, {v[-1].requests_per_s:.0f} req/s" for n, v in results.items()),
                flush=True)
    finally:
        for proc in (endpoint, reference):
            proc.send_signal(signal.SIGTERM)
        for proc in (endpoint, reference):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def med(name: str, fn: str) -> float:
        vals = []
        for res in results[name]:
            vals.append({"p50": res.percentile(50), "p99": res.percentile(99), "rps": res.requests_per_s,
                         "ok": res.success_rate}[fn])
        return statistics.median(vals)

    print(f"\nconcurrency {args.concurrency}, {args.total} requests per round, {args.rounds} rounds (medians):")
    print(f"{'server':<10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'success %':>10}")
    for name in targets:
        ok = f"{med(name, 'ok'):.2f}" if name == "endpoint" else "n/a"  # the reference's body is not Apple's shape
        print(f"{name:<10} {med(name, 'p50'):>8.1f} {med(name, 'p99'):>8.1f} {med(name, 'rps'):>8.0f} {ok:>10}")
    print(f"endpoint / reference: p99 {med('endpoint', 'p99') / med('reference', 'p99'):.2f}, "
          f"req/s {med('endpoint', 'rps') / med('reference', 'rps'):.2f}")
    worst = max(results["endpoint"], key=lambda res: (not res.passed, res.percentile(99)))
    print("\nthe endpoint's worst round, as Apple would print it:")
    print(format_result(worst))


if __name__ == "__main__":
    main()
