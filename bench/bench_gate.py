"""The promotion gate on Apple-sized worlds: false promotions, interval coverage, power at the stated MDD.

For each preset (``training.simulate.PRESETS``), a reward model is trained with ``retention train``'s
code on one world; then R replicate worlds of N logged decisions each, logged by an app that shows
its default message with ε = 0.05 exploration (the *current* policy), are read exactly as
``retention models promote --if-better`` reads them (``training.evaluate``: labels, mature
decisions only, the reward model's scores). Candidates, explored like serving (ε = 0.05), are
judged against the current policy by the gate's own code (``training.verdict.judge``: paired DR
difference, 90% interval, subscribers resampled together, 1000 resamples):

- ``no_better``: on each request the oracle's message with probability q, the worst one's
  otherwise, q chosen so that its true value equals the current policy's on that request: exactly
  no better anywhere, yet unlike it nearly everywhere. The gate must promote it <= 5% of the time;
- ``no_better_swap``: the current message swapped for another of exactly equal true value where
  one exists (rare in these worlds: the share is printed);
- ``oracle_S``: the oracle's message on a share S of requests (by request-id hash), the current
  one's elsewhere, for each S of ``--grid``. The candidate *at the stated MDD* is where the mean
  true advantage crosses the mean MDD the gate states; its promotion rate (interpolated between
  the two grid shares around it) must be >= 80%.

Coverage: each candidate's 90% SNIPS and DR intervals against its true value on the same requests
(must be >= 85%). Every verdict and interval is computed with each method of
``training.ope.INTERVALS`` from the same resamples (``hull``, the gate's and ``retention
evaluate``'s, is the hull of ``percentile``, ``bca`` and ``studentized``; ``--merge`` recomputes it from
them, so files written when it was the hull of the first two give the gate's verdicts now). The reward model is the trained model's
P(stay) × value for every policy (DR is unbiased whatever the reward model).

    .venv/bin/python bench/bench_gate.py --presets apple-smooth --n 100000 --replicates 100 --json /tmp/gate_smooth.json
    .venv/bin/python bench/bench_gate.py --merge /tmp/gate_smooth.json /tmp/gate_browse.apple-browse.partial.json
    .venv/bin/python bench/bench_gate.py --presets apple-segments --replicates 5 --n 20000   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_args import json_out, preset_list, read_runs, share_list

from models.exploration import Exploration
from retention import VerbParser, int_in
from training import ope
from training.evaluate import EvaluationConfig, Inputs, evaluate
from training.simulate import simulate
from training.verdict import judge

EPSILON = 0.05
LOGGING = "default"  # the current policy: the catalog default, explored (an app before its first model)
APPLE = ("apple-segments", "apple-smooth", "apple-interactions", "apple-browse")


@dataclass
class Arrays:
    """Per evaluated request: true values (n, K), greedy columns of the three reference policies, a uniform u."""

    true_v: np.ndarray
    g_oracle: np.ndarray
    g_worst: np.ndarray
    g_current: np.ndarray
    u: np.ndarray
    valid: np.ndarray


def _uniform(request_ids: pd.Series) -> np.ndarray:
    """Return a number in [0, 1) per request id, a fixed function of the id (the candidate's coin)."""
    import hashlib

    h = np.array([int.from_bytes(hashlib.blake2b(str(r).encode(), digest_size=8, person=b"gate-bench").digest(), "little")
                  for r in request_ids], dtype=np.float64)
    return h / 2.0**64


def _truth_arrays(world: Any, request_ids: np.ndarray, candidate_ids: np.ndarray, valid: np.ndarray) -> Arrays:
    """Return the truth for the evaluated requests (the ground truth lists each decision's candidates in order)."""
    gt = world.ground_truth
    r_codes, r_ids = pd.factorize(gt["request_id"])
    slot = gt.groupby(r_codes, sort=False).cumcount().to_numpy()
    k = candidate_ids.shape[1]
    full_v = np.full((len(r_ids), k), np.nan)
    full_p = np.full((len(r_ids), k), np.nan)
    full_v[r_codes, slot] = (gt["p_stay"] * gt["value_after"]).to_numpy()
    full_p[r_codes, slot] = gt["logging_prob"].to_numpy()
    pos = pd.Index(r_ids).get_indexer(pd.Series(request_ids).astype(str))
    if (pos < 0).any():
        raise ValueError("evaluated requests missing from the ground truth")
    true_v, logp = full_v[pos], full_p[pos]
    g_oracle = np.argmax(np.where(valid, true_v, -np.inf), axis=1)
    g_worst = np.argmin(np.where(valid, true_v, np.inf), axis=1)
    g_current = np.argmax(np.where(valid, logp, -np.inf), axis=1)
    return Arrays(np.where(valid, np.nan_to_num(true_v), 0.0), g_oracle, g_worst, g_current,
                  _uniform(pd.Series(request_ids)), valid)


def _eps_greedy(g: np.ndarray, valid: np.ndarray) -> np.ndarray:
    k = valid.sum(axis=1, keepdims=True)
    p = np.where(valid, EPSILON / k, 0.0)
    p[np.arange(len(g)), g] += 1.0 - EPSILON
    return p


def _mixed(a: Arrays, share: np.ndarray | float, g_first: np.ndarray, g_second: np.ndarray) -> np.ndarray:
    """Return ε-greedy probabilities whose greedy mass goes to `g_first` with probability `share`, else `g_second`."""
    share = np.broadcast_to(np.asarray(share, dtype=np.float64), (len(g_first),))
    rows = np.arange(len(g_first))
    p = _eps_greedy(g_first, a.valid)
    p[rows, g_first] -= (1.0 - EPSILON) * (1.0 - share)
    p[rows, g_second] += (1.0 - EPSILON) * (1.0 - share)
    return p


def null_mixture(a: Arrays, current: np.ndarray) -> np.ndarray:
    """Return a candidate exactly as good as the current policy on every request, yet unlike it.

    On each request it shows the oracle's message with probability q and the worst one's otherwise,
    q = (v_current − v_worst) / (v_oracle − v_worst) of that request's true values, explored like
    serving (ε = 0.05): its true value equals the current policy's request by request.
    """
    rows = np.arange(len(a.g_oracle))
    v_o, v_w = a.true_v[rows, a.g_oracle], a.true_v[rows, a.g_worst]
    v_c = a.true_v[rows, a.g_current]
    span = v_o - v_w
    q = np.divide(v_c - v_w, span, out=np.zeros_like(span), where=span > 0)
    return _mixed(a, np.clip(q, 0.0, 1.0), a.g_oracle, a.g_worst)


def null_swap(a: Arrays) -> tuple[np.ndarray, float]:
    """Return (a deterministic candidate, share of requests where it differs from the current policy).

    Where another candidate has exactly the current message's true value (same P(stay), same value),
    it shows that one (the first such), elsewhere the current message: no better anywhere.
    """
    rows = np.arange(len(a.g_current))
    v_c = a.true_v[rows, a.g_current][:, None]
    cols = np.arange(a.true_v.shape[1])[None, :]
    same = a.valid & (a.true_v == v_c) & (cols != a.g_current[:, None])
    has = same.any(axis=1)
    g = np.where(has, same.argmax(axis=1), a.g_current)
    return _eps_greedy(g, a.valid), float(has.mean())


def oracle_share(a: Arrays, share: float) -> np.ndarray:
    """Return the candidate that shows the oracle's message on a fixed share of requests (by request-id hash)."""
    return _eps_greedy(np.where(a.u < share, a.g_oracle, a.g_current), a.valid)


def _train_reward_model(preset: str, n: int, registry: Path, seed: int) -> tuple[Any, str]:
    from models.registry import Registry
    from models.scoring import Scorer
    from training.train import train_frames, write_result

    w = simulate(n, seed=seed, epsilon=EPSILON, preset=preset, logging_rule=LOGGING)
    res = train_frames(w.decisions, w.outcomes, w.profiles, w.catalog, seed=seed)
    version, _ = write_result(res, Registry(registry), promote=True)
    return Scorer(Registry(registry).load(version), intra_op_threads=1), version


def replicate(preset: str, n: int, seed: int, scorer: Any, version: str, registry: Path,
              grid: list[float], resamples: int) -> dict[str, Any]:
    """Return one replicate's verdicts and interval coverage for every candidate (both interval methods)."""
    from models.registry import Registry

    world = simulate(n, seed=seed, epsilon=EPSILON, preset=preset, logging_rule=LOGGING)
    cfg = EvaluationConfig(n_resamples=0, segments=False, exploration=Exploration(epsilon=EPSILON))
    ev = evaluate(Inputs(world.decisions, world.outcomes, world.catalog, world.profiles), Registry(registry),
                  [version], cfg, scorers={version: scorer})
    lg = ev.logged
    a = _truth_arrays(world, lg.frame["request_id"].to_numpy(), lg.candidate_ids, lg.valid)
    q = ev.policies[version].reward_hat(lg)
    clusters = lg.frame["original_transaction_id"].astype(str).to_numpy()
    # the current policy: the default message, ε-greedy, as the simulator logged it (the evaluator *infers*
    # the logging distribution from the propensity alone, which on an explored row cannot tell the default)
    current = _eps_greedy(a.g_current, a.valid)
    swap, swap_share = null_swap(a)
    probs = {"current": current, "no_better": null_mixture(a, current), "no_better_swap": swap}
    probs |= {f"oracle_{s:.2f}": oracle_share(a, s) for s in grid}
    flat: dict[str, ope.OPEResult] = {}
    kw: dict[str, Any] = {"logging_probs": lg.logging_probs, "n_resamples": 0}
    for name, p in probs.items():  # the estimators the gate and `retention evaluate` use, nothing else
        flat[f"{name}/snips"] = ope.snips(ev.rewards, lg.actions, lg.propensities, p, **kw)
        flat[f"{name}/dr"] = ope.dr(ev.rewards, lg.actions, lg.propensities, p, q, **kw)
    boot = ope.Bootstrap(flat, n_resamples=resamples, seed=seed, clusters=clusters)
    n_clusters = int(pd.unique(clusters).size)
    v_cur = float((current * a.true_v).sum(axis=1).mean())
    out: dict[str, Any] = {"seed": seed, "n": lg.n, "clusters": n_clusters, "v_current": v_cur,
                           "swap_share": swap_share}
    truth_cur = v_cur
    cover_cur = {}
    for est in ("snips", "dr"):
        for m in ope.INTERVALS:
            lo, hi = boot.interval(f"current/{est}", 0.9, m)
            cover_cur[f"{est}_{m}"] = [lo, hi, bool(lo <= truth_cur <= hi)]
    out["current"] = {"truth": truth_cur, "intervals": cover_cur}
    # the studentized intervals in one pass over the resamples (Bootstrap.interval would draw them again each time)
    names = [k for k in probs if k != "current"]
    specs: list[tuple[str, str | None]] = [(f"{k}/dr", "current/dr") for k in names]
    specs += [(f"{k}/{est}", None) for k in names for est in ("snips", "dr")]
    t_iv = dict(zip(specs, boot.studentized(specs, 0.9), strict=True))
    for name in names:
        truth = float((probs[name] * a.true_v).sum(axis=1).mean())
        row: dict[str, Any] = {"truth": truth, "true_advantage": truth - v_cur, "intervals": {}}
        for m in ("percentile", "bca", "hull"):  # "hull" is the gate's own (judge's default)
            j = judge(boot, f"{name}/dr", "current/dr", clusters=n_clusters, method=m)
            row[f"promote_{m}"] = j.promote
            row[f"diff_{m}"] = [j.ci_low, j.ci_high]
        lo, hi = t_iv[(f"{name}/dr", "current/dr")]  # what judge(..., method="studentized") returns
        row["promote_studentized"], row["diff_studentized"] = bool(lo > 0), [lo, hi]
        row.update(estimate=j.estimate, mdd=j.mdd, se=j.se, ess=j.ess, decisions=j.n,
                   dr=flat[f"{name}/dr"].estimate, snips=flat[f"{name}/snips"].estimate)
        for est in ("snips", "dr"):
            for m in ope.INTERVALS:
                lo, hi = t_iv[(f"{name}/{est}", None)] if m == "studentized" else boot.interval(f"{name}/{est}", 0.9, m)
                row["intervals"][f"{est}_{m}"] = [lo, hi, bool(lo <= truth <= hi)]
        out[name] = row
    return out


def _add_hull(reps: list[dict[str, Any]]) -> None:
    """(Re)compute the hull verdicts and intervals from the methods a replicate holds (``training.ope._hull``'s rule).

    Replicates written before the gate's hull took in the bootstrap-t hold the hull of the percentile and
    BCa intervals alone; their stored components give the gate's verdict now (same resamples, same numbers).
    The current policy's own interval has no bootstrap-t in files written before commit 67bd8a2: its hull
    there is of the other two.
    """
    for r in reps:
        for row in r.values():
            if not isinstance(row, dict) or "intervals" not in row:
                continue
            parts = [row[f"diff_{m}"] for m in ("percentile", "bca", "studentized") if f"diff_{m}" in row]
            parts = [x for x in parts if np.isfinite(x[0]) and np.isfinite(x[1])]  # as training.ope._hull
            if parts:
                lo = min(x[0] for x in parts)
                row["diff_hull"] = [lo, max(x[1] for x in parts)]
                row["promote_hull"] = bool(lo > 0)
            for est in ("snips", "dr"):
                iv = row["intervals"]
                have = [iv[f"{est}_{m}"] for m in ("percentile", "bca", "studentized") if f"{est}_{m}" in iv]
                finite = [x for x in have if np.isfinite(x[0]) and np.isfinite(x[1])]
                if finite:
                    lo, hi = min(x[0] for x in finite), max(x[1] for x in finite)
                    iv[f"{est}_hull"] = [lo, hi, bool(lo <= row["truth"] <= hi)]


def summarize(preset: str, n: int, reps: list[dict[str, Any]], grid: list[float]) -> dict[str, Any]:
    """Return the per-preset table: each candidate's promotion rates, coverage, MDD; the at-MDD candidate."""
    _add_hull(reps)
    names = ["no_better", "no_better_swap"] + [f"oracle_{s:.2f}" for s in grid]
    summary: dict[str, Any] = {"preset": preset, "n": n, "replicates": len(reps),
                               "decisions_evaluated": float(np.mean([r["n"] for r in reps])),
                               "subscribers": float(np.mean([r["clusters"] for r in reps])),
                               "v_current": float(np.mean([r["v_current"] for r in reps])),
                               "swap_share": float(np.mean([r["swap_share"] for r in reps])), "candidates": {}}
    for name in ["current", *names]:
        rows = [r[name] for r in reps]
        c: dict[str, Any] = {f"coverage_{k}": float(np.mean([x["intervals"][k][2] for x in rows]))
                             for k in rows[0]["intervals"]}
        if name != "current":
            est = np.array([x["estimate"] for x in rows])
            c |= {f"promoted_{m}": float(np.mean([x[f"promote_{m}"] for x in rows])) for m in ope.INTERVALS
                  if f"promote_{m}" in rows[0]}
            c |= {"true_advantage": float(np.mean([x["true_advantage"] for x in rows])),
                  "estimate_mean": float(est.mean()), "estimate_sd": float(est.std(ddof=1)) if len(est) > 1 else None,
                  "se_mean": float(np.mean([x["se"] for x in rows])),
                  "stated_mdd_mean": float(np.mean([x["mdd"] for x in rows])),
                  "ess_median": float(np.median([x["ess"] for x in rows]))}
        summary["candidates"][name] = c
    # the candidate at the stated MDD: the grid share where mean true advantage / mean stated MDD crosses 1
    ratio = [(s, summary["candidates"][f"oracle_{s:.2f}"]) for s in grid]
    at = None
    for (s0, c0), (s1, c1) in itertools.pairwise(ratio):
        r0 = c0["true_advantage"] / c0["stated_mdd_mean"]
        r1 = c1["true_advantage"] / c1["stated_mdd_mean"]
        if r0 < 1.0 <= r1:
            t = (1.0 - r0) / (r1 - r0)
            at = {"between": [s0, s1], "ratios": [r0, r1], "share": s0 + t * (s1 - s0)}
            at |= {f"promoted_{m}": c0[f"promoted_{m}"] + t * (c1[f"promoted_{m}"] - c0[f"promoted_{m}"])
                   for m in ope.INTERVALS if f"promoted_{m}" in c0}
            break
    summary["at_mdd"] = at
    return summary


def run_preset(preset: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    registry = tmp / preset
    scorer, version = _train_reward_model(preset, args.train_n, registry, seed=10_000)
    grid = list(args.grid)
    reps = []
    for s in range(args.replicates):
        reps.append(replicate(preset, args.n, args.first_seed + s, scorer, version, registry, grid, args.resamples))
        if args.progress:
            print(f"{preset} replicate {s + 1}/{args.replicates} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.json:  # as it goes, so that a run cut short still tells what it measured
            partial = args.json.with_suffix(f".{preset}.partial.json")
            partial.write_text(json.dumps({"preset": preset, "n": args.n, "grid": grid, "replicates": reps}))
    summary = summarize(preset, args.n, reps, grid)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["per_replicate"] = reps
    return summary


def print_summary(s: dict[str, Any]) -> None:
    cands = s["candidates"]
    methods = [m for m in ("hull", "percentile", "bca", "studentized") if f"promoted_{m}" in cands["no_better"]]
    short = {"percentile": "pct", "bca": "BCa", "studentized": "t", "hull": "gate"}
    print(f"\n{s['preset']}: {s['replicates']} replicates of {s['n']:,} decisions "
          f"({s['decisions_evaluated']:,.0f} evaluated, {s['subscribers']:,.0f} subscribers), "
          f"current value {s['v_current']:.4f}/request; equal-value swap possible on {s['swap_share']:.1%}")
    head = f"  {'candidate':<15} " + " ".join(f"{'promo ' + short[m]:>9}" for m in methods)
    head += f" {'true adv':>9} {'MDD':>7} {'est sd':>7} {'SE':>6} {'ESS':>6} "
    head += " ".join(f"{est + ' ' + short[m]:>9}" for est in ("SNIPS", "DR") for m in methods)
    print(head)
    for name, c in cands.items():
        if name == "current":
            line = f"  {name:<15} " + " ".join(f"{'':>9}" for _ in methods) + f" {'':>9} {'':>7} {'':>7} {'':>6} {'':>6} "
        else:
            sd = c["estimate_sd"] if c["estimate_sd"] is not None else float("nan")
            line = f"  {name:<15} " + " ".join(f"{c[f'promoted_{m}']:>9.0%}" for m in methods)
            line += f" {c['true_advantage']:>+9.3f} {c['stated_mdd_mean']:>7.3f} {sd:>7.3f} {c['se_mean']:>6.3f} {c['ess_median']:>6.0f} "
        line += " ".join(f"{c[f'coverage_{est}_{m}']:>9.0%}" if f"coverage_{est}_{m}" in c else f"{'':>9}"
                         for est in ("snips", "dr") for m in methods)
        print(line)
    at = s["at_mdd"]
    if at:
        print(f"  at the stated MDD: oracle on {at['share']:.0%} of requests (between grid shares {at['between']}, "
              f"advantage/MDD {at['ratios'][0]:.2f} to {at['ratios'][1]:.2f}): promoted "
              + ", ".join(f"{at[f'promoted_{m}']:.0%} ({m})" for m in methods))
    else:
        print("  no grid candidate has a true advantage that crosses the stated MDD at this n")


def main() -> int:
    ap = VerbParser(prog="bench/bench_gate.py", description=__doc__.split("\n\n")[0])  # a bad value: one line, exit 2
    ap.add_argument("--presets", type=preset_list, default=list(APPLE),
                    help=f"comma-separated presets (default {','.join(APPLE)})")
    ap.add_argument("--n", type=int_in(1000), default=50_000, help="logged decisions per replicate, 1,000 or more "
                    "(default 50000)")
    ap.add_argument("--replicates", type=int_in(1), default=100, help="replicates per preset (default 100)")
    ap.add_argument("--first-seed", type=int_in(0), default=1, help="seed of the first replicate world (default 1)")
    ap.add_argument("--grid", type=share_list, default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                    help="shares of requests on which the power candidates show the oracle's message "
                         "(default 0.4,0.5,...,1.0)")
    ap.add_argument("--train-n", type=int_in(1000), default=50_000,
                    help="decisions of the reward model's training world (default 50000)")
    ap.add_argument("--resamples", type=int_in(100), default=1000,
                    help="bootstrap resamples, 100 or more (default 1000, the gate's)")
    ap.add_argument("--json", type=json_out, help="write every replicate's results here (checked before running)")
    ap.add_argument("--merge", type=Path, nargs="+", help="summarize these --json files (or .partial.json) instead of running")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.merge:
        out = []
        try:
            for path in args.merge:
                data = read_runs(path)
                for d in data if isinstance(data, list) else [data]:
                    reps = d.get("per_replicate", d.get("replicates"))
                    grid = d.get("grid") or [float(k.split("_")[1]) for k in reps[0] if k.startswith("oracle_")]
                    s = summarize(d["preset"], d["n"], reps, grid)
                    print_summary(s)
                    out.append(s)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            print(f"bench_gate: error: {exc if isinstance(exc, ValueError) else f'{path} is not a bench_gate result'}",
                  file=sys.stderr)
            return 1
        if not out:
            print("bench_gate: error: the files hold no preset's results", file=sys.stderr)
            return 1
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            s = run_preset(preset, args, Path(tmp))
            s["grid"] = list(args.grid)
            out.append(s)
            print_summary(s)
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
