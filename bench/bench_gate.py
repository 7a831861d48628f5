"""The promotion gate on Apple-sized worlds: false promotions, interval coverage, power at the stated MDD.

For each preset (``training.simulate.PRESETS``), a reward model is trained with ``retention train``'s
code on one world; then R replicate worlds of N logged decisions each (ε-greedy logging around
the simulator's hand-written rule, ε = 0.05: the *current* policy, which served and logged them)
are read exactly as ``retention models promote --if-better`` reads them (``training.evaluate``:
labels, mature decisions only, the reward model's scores), and two candidates are judged against
the current policy with the gate's own code (``training.gate.judge``: paired DR difference, 90%
interval, subscribers resampled together, 1000 resamples):

- *no better*: on a fixed share of requests (by request-id hash) it shows the oracle's message, on
  another share the worst message, elsewhere the current one's; the shares are set on a large
  reference world so that its true advantage is zero. The gate must promote it <= 5% of the time;
- *at the MDD*: the oracle's message on a share of requests chosen so that its true advantage equals
  the minimum detectable difference the gate reports for such data (found in two pilot rounds of
  10 replicates; the figure reported is the mean MDD stated over the R replicates). The gate must
  promote it >= 80% of the time.

Both candidates explore like serving (ε = 0.05). Coverage: each candidate's 90% SNIPS and DR
intervals against its true value on the same requests (must be >= 85%). The reward model is the
trained model's P(stay) × value for every policy (DR is unbiased whatever the reward model).

    .venv/bin/python bench/bench_gate.py --replicates 100 --n 50000 --json /tmp/gate.json   # full study
    .venv/bin/python bench/bench_gate.py --presets apple-segments --replicates 10 --n 20000   # a quick look
"""

from __future__ import annotations

import argparse
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

from models.exploration import Exploration
from training import ope
from training.evaluate import EvaluationConfig, Inputs, evaluate
from training.gate import judge
from training.simulate import simulate

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


def candidate_probs(a: Arrays, share_oracle: float, share_worst: float) -> np.ndarray:
    """Return the candidate's (n, K) probabilities: oracle / worst / current message by the request's coin, ε-greedy."""
    g = np.where(a.u < share_oracle, a.g_oracle,
                 np.where(a.u < share_oracle + share_worst, a.g_worst, a.g_current))
    return _eps_greedy(g, a.valid)


def _advantages(a: Arrays, logging_probs: np.ndarray) -> tuple[float, float, float]:
    """Return (oracle − current, worst − current, current) true values per request, under ε-greedy, on these requests."""
    cur = float((logging_probs * a.true_v).sum(axis=1).mean())
    o = float((_eps_greedy(a.g_oracle, a.valid) * a.true_v).sum(axis=1).mean())
    w = float((_eps_greedy(a.g_worst, a.valid) * a.true_v).sum(axis=1).mean())
    c = float((_eps_greedy(a.g_current, a.valid) * a.true_v).sum(axis=1).mean())
    return o - c, w - c, cur


def _train_reward_model(preset: str, n: int, registry: Path, seed: int) -> tuple[Any, str]:
    from models.registry import Registry
    from models.scoring import Scorer
    from training.train import train_frames, write_result

    w = simulate(n, seed=seed, epsilon=EPSILON, preset=preset, logging_rule=LOGGING)
    res = train_frames(w.decisions, w.outcomes, w.profiles, w.catalog, seed=seed)
    version, _ = write_result(res, Registry(registry), promote=True)
    return Scorer(Registry(registry).load(version), intra_op_threads=1), version


def replicate(preset: str, n: int, seed: int, scorer: Any, version: str, registry: Path,
              shares: dict[str, tuple[float, float]], resamples: int) -> dict[str, Any]:
    """Return one replicate's verdicts and interval coverage for each candidate in `shares`."""
    from models.registry import Registry

    world = simulate(n, seed=seed, epsilon=EPSILON, preset=preset, logging_rule=LOGGING)
    cfg = EvaluationConfig(n_resamples=0, segments=False, exploration=Exploration(epsilon=EPSILON))
    ev = evaluate(Inputs(world.decisions, world.outcomes, world.catalog, world.profiles), Registry(registry),
                  [version], cfg, scorers={version: scorer})
    lg = ev.logged
    a = _truth_arrays(world, lg.frame["request_id"].to_numpy(), lg.candidate_ids, lg.valid)
    q = ev.policies[version].reward_hat(lg)
    clusters = lg.frame["original_transaction_id"].astype(str).to_numpy()
    flat: dict[str, ope.OPEResult] = {}
    current = lg.logging_probs / lg.logging_probs.sum(axis=1, keepdims=True)
    probs = {"current": current} | {name: candidate_probs(a, *sh) for name, sh in shares.items()}
    for name, p in probs.items():
        res = ope.estimate_all(ev.rewards, lg.actions, lg.propensities, p, q, logging_probs=lg.logging_probs,
                               n_resamples=0)
        flat.update({f"{name}/{k}": res[k] for k in ("snips", "dr")})
    boot = ope.Bootstrap(flat, n_resamples=resamples, seed=seed, clusters=clusters)
    n_clusters = int(pd.unique(clusters).size)
    out: dict[str, Any] = {"seed": seed, "n": lg.n, "clusters": n_clusters}
    v_cur = float((current * a.true_v).sum(axis=1).mean())
    adv_o, adv_w, _ = _advantages(a, current)
    out["advantage_oracle"], out["advantage_worst"], out["v_current"] = adv_o, adv_w, v_cur
    for name in shares:
        truth = float((probs[name] * a.true_v).sum(axis=1).mean())
        j = judge(boot, f"{name}/dr", "current/dr", clusters=n_clusters)
        cover = {}
        for est in ("snips", "dr"):
            lo, hi = boot.interval(f"{name}/{est}", 0.9)
            cover[est] = bool(lo <= truth <= hi)
        # the gate's other refusal that can apply here: too few effective decisions to trust any interval
        floor = cfg.min_ess
        out[name] = {"promote": j.promote, "promote_gate": bool(j.promote and j.ess >= floor), "estimate": j.estimate, "true_advantage": truth - v_cur, "mdd": j.mdd,
                     "se": j.se, "ess": j.ess, "covered": cover, "truth": truth}
    return out


def calibrate_null(preset: str, n: int, seed: int, share_oracle: float = 0.3) -> tuple[float, float]:
    """Return (oracle share, worst share) whose true advantage over the current policy is zero on a large world."""
    world = simulate(n, seed=seed, epsilon=EPSILON, preset=preset, logging_rule=LOGGING)
    from training.target_policy import prepare_logged

    lg, _ = prepare_logged(world.decisions, world.catalog)
    a = _truth_arrays(world, lg.frame["request_id"].to_numpy(), lg.candidate_ids, lg.valid)
    cur = lg.logging_probs / lg.logging_probs.sum(axis=1, keepdims=True)
    adv_o, adv_w, _ = _advantages(a, cur)
    # the candidate's value is linear in the shares (up to the coin's sampling on these requests): solve for zero
    base = float((candidate_probs(a, 0.0, 0.0) * a.true_v).sum(axis=1).mean()) - float((cur * a.true_v).sum(axis=1).mean())
    share_worst = (share_oracle * adv_o + base) / -adv_w if adv_w < 0 else 0.0
    if share_oracle + share_worst > 1.0:  # the worst message is too close to the current one: fewer oracle picks
        share_oracle = (-adv_w - base) / (adv_o - adv_w)
        share_worst = 1.0 - share_oracle
    return float(share_oracle), float(np.clip(share_worst, 0.0, 1.0 - share_oracle))


def run_preset(preset: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    registry = tmp / preset
    scorer, version = _train_reward_model(preset, args.train_n, registry, seed=10_000)
    null = calibrate_null(preset, args.reference_n, seed=20_000)
    # pilot: the MDD the gate states at this n, for a candidate showing the oracle's message on a share of requests
    # the MDD grows about as the square root of the share (the variance comes from the requests where the
    # candidate departs from the current policy), the advantage linearly: solve share · A = m · √share
    share = 0.5
    pilots = []
    for _round in range(args.pilot_rounds):
        pilot = [replicate(preset, args.n, 30_000 + 100 * _round + s, scorer, version, registry,
                           {"pilot": (share, 0.0)}, args.resamples) for s in range(args.pilot)]
        mdd = float(np.mean([p["pilot"]["mdd"] for p in pilot]))
        adv_per_share = float(np.mean([p["pilot"]["true_advantage"] for p in pilot])) / share
        pilots.append({"share": share, "mdd": mdd, "advantage": adv_per_share * share})
        share = float(np.clip((mdd / (adv_per_share * np.sqrt(share))) ** 2, 0.01, 1.0))
    shares = {"no_better": null, "at_mdd": (share, 0.0)}
    reps = []
    for s in range(args.replicates):
        reps.append(replicate(preset, args.n, 1 + s, scorer, version, registry, shares, args.resamples))
        if args.progress:
            print(f"{preset} replicate {s + 1}/{args.replicates}", file=sys.stderr, flush=True)
        if args.json:  # as it goes, so that a run cut short still tells what it measured
            partial = args.json.with_suffix(f".{preset}.partial.json")
            partial.write_text(json.dumps({"preset": preset, "shares": shares, "pilots": pilots, "replicates": reps}))
    summary: dict[str, Any] = {"preset": preset, "n": args.n, "replicates": len(reps), "shares": shares,
                               "pilots": pilots,
                               "decisions_evaluated": float(np.mean([r["n"] for r in reps])),
                               "subscribers": float(np.mean([r["clusters"] for r in reps])),
                               "v_current": float(np.mean([r["v_current"] for r in reps]))}
    for name in shares:
        rows = [r[name] for r in reps]
        summary[name] = {
            "promoted": float(np.mean([x["promote"] for x in rows])),
            "promoted_with_ess_floor": float(np.mean([x["promote_gate"] for x in rows])),
            "true_advantage": float(np.mean([x["true_advantage"] for x in rows])),
            "stated_mdd_mean": float(np.mean([x["mdd"] for x in rows])),
            "stated_mdd_sd": float(np.std([x["mdd"] for x in rows])),
            "coverage_snips": float(np.mean([x["covered"]["snips"] for x in rows])),
            "coverage_dr": float(np.mean([x["covered"]["dr"] for x in rows])),
            "ess_median": float(np.median([x["ess"] for x in rows])),
        }
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["per_replicate"] = reps
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(APPLE), help=f"comma-separated presets (default {','.join(APPLE)})")
    ap.add_argument("--n", type=int, default=50_000, help="logged decisions per replicate (default 50000)")
    ap.add_argument("--replicates", type=int, default=100, help="replicates per preset (default 100)")
    ap.add_argument("--pilot", type=int, default=10, help="replicates per pilot round for the MDD candidate (default 10)")
    ap.add_argument("--pilot-rounds", type=int, default=3, help="pilot rounds for the MDD candidate (default 3)")
    ap.add_argument("--train-n", type=int, default=50_000, help="decisions of the reward model's training world")
    ap.add_argument("--reference-n", type=int, default=200_000, help="decisions of the world that sets the null shares")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000, the gate's)")
    ap.add_argument("--json", type=Path, help="write every replicate's results here")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            s = run_preset(preset, args, Path(tmp))
            out.append(s)
            print(f"\n{preset}: {s['replicates']} replicates of {args.n:,} decisions "
                  f"({s['decisions_evaluated']:,.0f} evaluated, {s['subscribers']:,.0f} subscribers), "
                  f"current value {s['v_current']:.4f}/request, {s['seconds']:.0f} s")
            print(f"  {'candidate':<10} {'promoted':>9} {'+ESS floor':>10} {'true adv':>9} {'stated MDD':>11} {'cover SNIPS':>12} "
                  f"{'cover DR':>9} {'ESS':>8}")
            for name in ("no_better", "at_mdd"):
                c = s[name]
                print(f"  {name:<10} {c['promoted']:>9.1%} {c['promoted_with_ess_floor']:>10.1%} {c['true_advantage']:>+9.4f} {c['stated_mdd_mean']:>11.4f} "
                      f"{c['coverage_snips']:>12.1%} {c['coverage_dr']:>9.1%} {c['ess_median']:>8.0f}")
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
