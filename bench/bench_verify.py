"""Per-request cost of verifying Apple's signed request: ours (cached and uncached chain) against Apple's library.

Run: .venv/bin/python bench/bench_verify.py [--tokens N] [--check]

All three verifiers see the same tokens (an Apple-shaped test chain: P-384 root and intermediate, P-256
leaf), timed one call at a time and interleaved token by token, so a noisy neighbour slows all of them
alike. Apple's is ``SignedDataVerifier.verify_and_decode_realtime_request`` with online checks off (the
fastest it can be; on, it adds OCSP round trips). Ours runs with the replay check off so a token can be
timed more than once. Prints medians, 90th percentiles and the ratios; ``--check`` exits 1 when ours on
a cached chain is not at least 10 times faster than Apple's.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jwt
from appstoreserverlibrary.models.Environment import Environment
from appstoreserverlibrary.signed_data_verifier import SignedDataVerifier
from cryptography.hazmat.primitives.serialization import Encoding

from serving.testpki import TestPKI
from serving.verify import RequestVerifier

APP_ID = 1234567890
TARGET = 10.0


def _time_one(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1000.0  # microseconds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and return 0 (1 with --check when the target is missed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=400, help="distinct signed tokens to verify (default 400)")
    ap.add_argument("--check", action="store_true", help="exit 1 if ours-cached is not >= 10x faster than Apple's")
    args = ap.parse_args(argv)

    pki = TestPKI.mint()
    tokens = [pki.signed_request(app_apple_id=APP_ID, environment="Sandbox") for _ in range(args.tokens)]
    ours = RequestVerifier([pki.root_cert], app_apple_id=APP_ID, environment="Sandbox", check_replay=False)
    ours_cold = RequestVerifier([pki.root_cert], app_apple_id=APP_ID, environment="Sandbox", check_replay=False)
    apple = SignedDataVerifier(
        [pki.root_cert.public_bytes(Encoding.DER)], enable_online_checks=False, environment=Environment.SANDBOX,
        bundle_id="com.example.app", app_apple_id=APP_ID,
    )  # fmt: skip
    leaf_key = pki.leaf_cert.public_key()

    # Warm up every path (imports, OpenSSL tables, our chain cache) and check they agree on a valid token.
    for t in tokens[:20]:
        assert ours.verify(t).requestIdentifier == str(apple.verify_and_decode_realtime_request(t).requestIdentifier)
        jwt.decode(t, leaf_key, algorithms=["ES256"])  # type: ignore[arg-type]

    series: dict[str, list[float]] = {"ours_cached": [], "ours_uncached": [], "apple": [], "pyjwt_decode_only": []}
    gc.disable()  # collections would land on whichever call happens to trigger them
    try:
        for t in tokens:
            series["ours_cached"].append(_time_one(lambda t=t: ours.verify(t)))  # type: ignore[misc]
            ours_cold.clear_caches()
            series["ours_uncached"].append(_time_one(lambda t=t: ours_cold.verify(t)))  # type: ignore[misc]
            series["apple"].append(_time_one(lambda t=t: apple.verify_and_decode_realtime_request(t)))  # type: ignore[misc]
            series["pyjwt_decode_only"].append(
                _time_one(lambda t=t: jwt.decode(t, leaf_key, algorithms=["ES256"]))  # type: ignore[misc, arg-type]
            )
    finally:
        gc.enable()

    med = {k: statistics.median(v) for k, v in series.items()}
    p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in series.items()}
    print(f"verification cost per request, {args.tokens} distinct tokens, Python {platform.python_version()}, {platform.machine()}")
    print(f"{'verifier':<34}{'median µs':>12}{'p90 µs':>12}{'Apple / this':>14}")
    rows = [
        ("ours, cached chain", "ours_cached"),
        ("ours, uncached chain", "ours_uncached"),
        ("Apple SignedDataVerifier (offline)", "apple"),
        ("PyJWT decode only (no chain)", "pyjwt_decode_only"),
    ]
    for label, key in rows:
        print(f"{label:<34}{med[key]:>12.1f}{p90[key]:>12.1f}{med['apple'] / med[key]:>13.1f}x")
    ratio = med["apple"] / med["ours_cached"]
    met = ratio >= TARGET
    print(f"target: ours cached >= {TARGET:g}x faster than Apple's -> {ratio:.1f}x, {'met' if met else 'MISSED'}")
    return 0 if met or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
