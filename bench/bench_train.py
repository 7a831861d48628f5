"""Benchmark: training + export time and peak memory, and ONNX Runtime vs sklearn scoring of one request.

    .venv/bin/python bench/bench_train.py                    # 100k and 1M decisions, then scoring
    .venv/bin/python bench/bench_train.py --sizes 100000     # one size only
    .venv/bin/python bench/bench_train.py --sizes ''         # scoring only

Training: for each size, a simulated world is written to Parquet by one process, then
``retention train`` runs in a fresh process on those files, exactly as a user runs it
(read, label, featurize, fit, export, parity, write the version). Its wall time and peak
resident memory (``wait4`` rusage of that process alone) are reported, with the step
timings from the new version's manifest. Target: 1M decisions in under 5 minutes.

Scoring: one model, one request with its 8 eligible candidates (the demo catalog's
premium monthly in en-US), scored many times by ONNX Runtime through ``models.scoring.Scorer``
(what serving runs: one thread, sequential) and by the sklearn estimator's
``predict_proba`` on the same float32 matrix, in the same run; medians and the ratio. The
same model exported without its baseline classifier (``training.fit.fit_baseline``: the second
tree ensemble in the graph) is timed in alternating rounds with the full one: what the baseline
costs a request. The featurizer's ``matrix`` for that request is timed too, since it is on the
request path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RETENTION = [sys.executable, "-c", "import sys, retention; sys.exit(retention.main())"]


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Return (wall seconds, peak RSS in MiB, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024.0, out


def bench_training(n: int, work: Path) -> dict[str, float | int | str]:
    """Return the timings and peak memory of simulating and training on `n` decisions."""
    world = work / f"world{n}"
    sim_wall, sim_rss, _ = run_measured([*RETENTION, "simulate", "--n", str(n), "--seed", "0", "--out", str(world)])
    registry = work / f"registry{n}"
    wall, rss, out = run_measured([*RETENTION, "train", "--decisions", str(world / "decisions.parquet"), "--outcomes", str(world / "outcomes.parquet"), "--profiles", str(world / "profiles.parquet"), "--catalog", str(world / "catalog.json"), "--registry", str(registry)])
    version = out.strip().splitlines()[-1]
    manifest = json.loads((registry / version / "manifest.json").read_text())
    t = manifest["timings_s"]
    return {
        "decisions": n,
        "simulate_s": round(sim_wall, 1),
        "simulate_peak_mib": round(sim_rss),
        "train_wall_s": round(wall, 1),
        "train_peak_mib": round(rss),
        "fit_s": t["fit"],
        "export_s": t["export"],
        "featurize_s": t["featurize"],
        "parity_s": t["parity"],
        "rows_fit": manifest["hyperparameters"]["rows_fit"],
        "n_iter": manifest["hyperparameters"]["n_iter"],
        "registry": str(registry),
        "version": version,
    }


def median_us(fn: Callable[[], object], repeat: int) -> float:
    """Return the median wall time of `fn()` in microseconds over `repeat` calls (after a warm-up)."""
    for _ in range(min(50, repeat)):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def bench_scoring(n_train: int, repeat: int) -> dict[str, float]:
    """Return median µs of featurize, ONNX Runtime and sklearn scoring of one 8-candidate request."""
    from dataclasses import replace

    import numpy as np

    from models.features import Featurizer
    from models.registry import Registry
    from models.scoring import Scorer
    from training.fit import MessageCredibility, export_onnx
    from training.simulate import simulate
    from training.train import train_frames, write_result

    w = simulate(n_train, seed=0)
    result = train_frames(w.decisions, w.outcomes, w.profiles, w.catalog)
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(tmp)
        version, _ = write_result(result, reg)
        scorer = Scorer(reg.load(version))
        fz = Featurizer(result.schema, w.catalog.products, w.catalog.messages)
        cands = w.catalog.eligible("com.example.premium.monthly", "en-US")
        profile = w.profiles.iloc[0].to_dict()
        kw = dict(product_id="com.example.premium.monthly", user_locale="en-US", environment="Production",
                  signed_date_ms=1_795_900_500_000, profile=profile, candidates=cands)
        X = fz.matrix(**kw)
        assert X.shape[0] == 8
        est = result.estimator
        np.testing.assert_allclose(scorer.p_stay(X), est.predict_proba(X)[:, 1], atol=1e-5)
        # the same model and factors without the baseline's trees, timed in alternating rounds
        plain = MessageCredibility(est.estimator, est.columns, est.factors)
        v_plain, _ = write_result(replace(result, onnx_bytes=export_onnx(plain, result.schema.n_features)), reg)
        scorer_plain = Scorer(reg.load(v_plain))
        featurize_us = median_us(lambda: fz.matrix(**kw), repeat)
        rounds: dict[str, list[float]] = {"onnx": [], "plain": []}
        for _ in range(3):
            rounds["onnx"].append(median_us(lambda: scorer.p_stay(X), repeat))
            rounds["plain"].append(median_us(lambda: scorer_plain.p_stay(X), repeat))
        sklearn_us = median_us(lambda: est.predict_proba(X), max(200, repeat // 10))
    return {"featurize_us": featurize_us, "onnx_us": statistics.median(rounds["onnx"]),
            "onnx_no_baseline_us": statistics.median(rounds["plain"]), "sklearn_us": sklearn_us,
            "n_iter": result.fit_info.n_iter or 0, "n_features": result.schema.n_features,
            "baseline": bool(est.baseline is not None)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated decision counts ('' for none)")
    p.add_argument("--score-train", type=int, default=100_000, help="decisions behind the scoring model")
    p.add_argument("--repeat", type=int, default=5000, help="timed calls per scoring measurement")
    p.add_argument("--work", type=Path, help="folder for worlds and registries (default: a temporary one)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = []
        for n in sizes:
            r = bench_training(n, work)
            rows.append(r)
            print(
                f"train {n:>9,} decisions: {r['train_wall_s']:7.1f} s wall (fit {r['fit_s']:.1f} s on {r['rows_fit']:,} "
                f"rows, {r['n_iter']} iterations; export {r['export_s']:.1f} s; featurize {r['featurize_s']:.1f} s; "
                f"parity {r['parity_s']:.1f} s), peak RSS {r['train_peak_mib']:,} MiB | simulate "
                f"{r['simulate_s']:.1f} s, {r['simulate_peak_mib']:,} MiB",
                flush=True,
            )
        for r in rows:
            if r["decisions"] == 1_000_000:
                ok = float(r["train_wall_s"]) < 300
                print(f"target 1M decisions under 300 s: {'met' if ok else 'MISSED'} ({r['train_wall_s']} s)")

    s = bench_scoring(args.score_train, args.repeat)
    print(f"scoring one request, 8 candidates ({s['n_features']} features, {s['n_iter']} boosting iterations):")
    print(f"  featurize (Featurizer.matrix)       median {s['featurize_us']:8.1f} us")
    print(f"  ONNX Runtime (Scorer.p_stay)        median {s['onnx_us']:8.1f} us"
          + ("" if s["baseline"] else "  (this model has no baseline)"))
    print(f"  the same without the baseline       median {s['onnx_no_baseline_us']:8.1f} us "
          f"({s['onnx_us'] / s['onnx_no_baseline_us']:.2f}x, 3 alternating rounds)")
    print(f"  sklearn predict_proba               median {s['sklearn_us']:8.1f} us")
    print(f"  sklearn / ONNX Runtime              {s['sklearn_us'] / s['onnx_us']:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
