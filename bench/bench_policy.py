"""The learned policy against two references on Apple-sized worlds: the share of the gap each captures.

For each preset, size N and seed, one simulated world of N logged decisions (ε-greedy logging around
the simulator's hand-written rule, ε = 0.05) gives the same logs to three learners, and each
learner's greedy policy (the highest P(stay) × (V(product after) − cost) per request) is scored on
the world's ground truth as the *captured gap* (V_policy − V_best static) / (V_oracle − V_best static):

- ``learned``: ``retention train``'s code (``training.train.train_frames``: the featurizer, the
  model chosen by cross-validated doubly robust policy value, calibration, the per-message factors
  of ``training.fit.credibility_factors`` moved to 1 where the logging policy's own choice for the
  subscriber is the message (``training.fit.fit_baseline``), ONNX export and the parity check); the
  policy is the exported ONNX model's;
- ``s-learner``: the plain reference: scikit-learn's HistGradientBoostingClassifier with its
  default settings on the covariates (profile columns, product and locale one-hot) plus a one-hot
  of the shown message, fitted on the same labelled decisions;
- ``vw``: Vowpal Wabbit ``--cb_explore_adf`` (one online pass, shared × action interactions
  ``-q SA``), cost = −reward / the largest value, with the logged propensities; its policy is
  the action VW's predicted distribution favours.

Rows: mean captured gap of each, the mean and worst per-seed difference learned − s-learner
(the bar: mean >= −0.01, worst >= −0.05) and learned − vw. The S-learner is also refitted with
other random states on the same logs (``--s-refits``): ``s_self_worst`` is the worst per-seed
difference of the reference against itself (its own fitting noise, what a per-seed bar of −0.05
must allow for), and ``*_diff_s_mean`` compare the learned policy with the reference's mean over
its refits.

    .venv/bin/python bench/bench_policy.py --sizes 20000,50000,200000 --seeds 10 --json /tmp/policy.json
    .venv/bin/python bench/bench_policy.py --presets apple-segments --sizes 20000 --seeds 2   # a quick look

A grid can run in pieces (one preset and size per command, in parallel or one after another),
each with its own --json, then be summarized together:

    .venv/bin/python bench/bench_policy.py --presets apple-smooth --sizes 50000 --seeds 10 --json /tmp/p_smooth_50k.json
    .venv/bin/python bench/bench_policy.py --merge /tmp/p_*.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_args import json_out, preset_list, read_runs, size_list

from retention import VerbParser, int_in
from training.labels import label_decisions
from training.simulate import best_static_value, gap_captured, oracle_value, policy_value, simulate

EPSILON = 0.05
PRESETS = ("apple-segments", "apple-smooth", "apple-interactions")


def _candidates(world: Any) -> pd.DataFrame:
    """Return one row per (request, candidate) with the decision's context, the candidate and its value after."""
    gt = world.ground_truth[["request_id", "message_id", "value_after"]]
    ctx = world.decisions[["request_id", "original_transaction_id", "product_id", "user_locale"]]
    return gt.merge(ctx, on="request_id", how="left")


def _plain_matrix(rows: pd.DataFrame, profiles: pd.DataFrame, levels: dict[str, list[str]]) -> np.ndarray:
    """Return covariates (profile numeric as is, categoricals, product and locale one-hot) plus the message one-hot."""
    p = profiles.set_index("original_transaction_id").reindex(rows["original_transaction_id"].to_numpy())
    cols = [p[c].to_numpy(dtype=np.float64) for c in profiles.columns
            if c != "original_transaction_id" and pd.api.types.is_numeric_dtype(profiles[c])]
    cat = {"acquisition_channel": p["acquisition_channel"].astype(str).to_numpy(),
           "country": p["country"].astype(str).to_numpy(),
           "product_id": rows["product_id"].astype(str).to_numpy(),
           "user_locale": rows["user_locale"].astype(str).to_numpy(),
           "message_id": rows["message_id"].astype(str).to_numpy()}
    for name, values in cat.items():
        for level in levels[name]:
            cols.append((values == level).astype(np.float64))
    return np.column_stack(cols).astype(np.float32)


def _greedy_value(world: Any, cand: pd.DataFrame, p: np.ndarray) -> float:
    ev = p * cand["value_after"].to_numpy()
    codes, _ = pd.factorize(cand["request_id"])
    order = np.lexsort((-ev, codes))
    first = np.ones(len(order), dtype=bool)
    first[1:] = codes[order][1:] != codes[order][:-1]
    prob = np.zeros(len(cand))
    prob[order[first]] = 1.0
    return policy_value(world.ground_truth, cand[["request_id", "message_id"]].assign(prob=prob))


def s_learner(world: Any, labels: pd.Series, seed: int, refits: int = 1) -> list[float]:
    """Return the true values of the plain HistGradientBoosting S-learner's greedy policy, one per refit.

    Refit k uses ``random_state = seed + 100·k`` on the same rows: only the 10% that scikit-learn's
    early stopping holds out changes, so the spread of the values is the reference's own fitting noise.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    d = world.decisions
    use = labels.notna().to_numpy()
    cand = _candidates(world)
    levels = {c: sorted(world.profiles[c].astype(str).unique()) for c in ("acquisition_channel", "country")}
    levels |= {"product_id": sorted(d["product_id"].astype(str).unique()),
               "user_locale": sorted(d["user_locale"].astype(str).unique()),
               "message_id": sorted(world.catalog.messages)}
    X = _plain_matrix(d.loc[use], world.profiles, levels)
    Xc = _plain_matrix(cand, world.profiles, levels)
    out = []
    for k in range(refits):
        model = HistGradientBoostingClassifier(random_state=seed + 100 * k).fit(X, labels[use].to_numpy().astype(int))
        out.append(_greedy_value(world, cand, model.predict_proba(Xc)[:, 1]))
    return out


def _vw_text(shared: str, actions: list[str], label: tuple[int, float, float] | None) -> str:
    lines = [f"shared |S {shared}"]
    for i, a in enumerate(actions):
        lab = f"0:{label[1]:.6f}:{label[2]:.6f} " if label is not None and label[0] == i else ""
        lines.append(f"{lab}|A {a}")
    return "\n".join(lines)


def vw_policy(world: Any, labels: pd.Series, seed: int) -> float:
    """Return the true value of Vowpal Wabbit ``--cb_explore_adf``'s greedy policy trained on the same logs."""
    import vowpalwabbit

    d = world.decisions
    prof = world.profiles.set_index("original_transaction_id")
    cand = _candidates(world)
    v_max = float(cand["value_after"].max())
    values = dict(zip(zip(cand["request_id"], cand["message_id"], strict=True), cand["value_after"], strict=True))
    vw = vowpalwabbit.Workspace(f"--cb_explore_adf -q SA --epsilon {EPSILON} --random_seed {seed} --quiet")

    p = prof.reindex(d["original_transaction_id"].to_numpy())
    ctx = ("tenure:" + np.log1p(p["tenure_days"].to_numpy(float)).round(4).astype(str)
           + " plan_age:" + np.log1p(p["plan_age_days"].to_numpy(float)).round(4).astype(str)
           + " price:" + (p["price_paid"].to_numpy(float) / 100).round(4).astype(str)
           + " engagement:" + p["engagement"].to_numpy(float).round(4).astype(str)
           + " sessions:" + np.log1p(p["sessions_30d"].to_numpy(float)).round(4).astype(str)
           + " offers:" + p["offers_redeemed"].to_numpy(int).astype(str)
           + " channel=" + p["acquisition_channel"].astype(str).to_numpy()
           + " country=" + p["country"].astype(str).to_numpy()
           + " product=" + d["product_id"].astype(str).to_numpy()
           + " locale=" + d["user_locale"].astype(str).to_numpy())
    rids = d["request_id"].astype(str).tolist()
    cands = [list(c) for c in d["candidates"]]
    acts = [[f"m={m} value:{values[(r, m)] / v_max:.4f}" for m in c] for r, c in zip(rids, cands, strict=True)]
    y = labels.to_numpy()
    shown = d["message_id"].astype(str).tolist()
    prop = d["propensity"].to_numpy(float)
    for i in range(len(d)):
        if np.isnan(y[i]):
            continue
        a = cands[i].index(shown[i])
        reward = y[i] * values[(rids[i], shown[i])] / v_max
        vw.learn(_vw_text(ctx[i], acts[i], (a, -reward, float(prop[i]))))
    rows = []
    for i in range(len(d)):
        pmf = vw.predict(_vw_text(ctx[i], acts[i], None))
        rows.append((rids[i], cands[i][int(np.argmax(pmf))]))
    vw.finish()
    choice = pd.DataFrame(rows, columns=["request_id", "message_id"])
    return policy_value(world.ground_truth, choice.assign(prob=1.0))


def learned(world: Any, seed: int) -> tuple[float, dict[str, Any]]:
    """Return the true value of ``retention train``'s policy (ONNX, parity checked) and its fit settings."""
    from training.train import train_frames

    res = train_frames(world.decisions, world.outcomes, world.profiles, world.catalog,
                       ground_truth=world.ground_truth, seed=seed)
    assert res.parity.passed
    return float(res.gap["v_model"]), res.fit_info.to_dict()


def one(preset: str, n: int, seed: int, vw: bool, s_refits: int = 3) -> dict[str, Any]:
    world = simulate(n, seed=seed, epsilon=EPSILON, preset=preset)
    labels, _ = label_decisions(world.decisions, world.outcomes)
    gt = world.ground_truth
    v_oracle, (v_static, _) = oracle_value(gt), best_static_value(gt)
    t = time.perf_counter()
    v_learned, fit = learned(world, seed)
    t_learned = time.perf_counter() - t
    t = time.perf_counter()
    v_s = s_learner(world, labels, seed, s_refits)
    t_s = (time.perf_counter() - t) / len(v_s)
    s_gaps = [gap_captured(v, v_static, v_oracle) for v in v_s]
    out = {"preset": preset, "n": n, "seed": seed, "v_oracle": v_oracle, "v_static": v_static,
           "learned": gap_captured(v_learned, v_static, v_oracle), "s_learner": s_gaps[0], "s_refits": s_gaps,
           "fit": {k: fit.get(k) for k in ("model", "params", "n_iter", "selection", "credibility")},
           "seconds": {"learned": round(t_learned, 1), "s_learner": round(t_s, 1)}}
    if vw:
        t = time.perf_counter()
        out["vw"] = gap_captured(vw_policy(world, labels, seed), v_static, v_oracle)
        out["seconds"]["vw"] = round(time.perf_counter() - t, 1)
    return out


def summarize(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["diff_s"] = df["learned"] - df["s_learner"]
    agg: dict[str, Any] = {"seeds": ("seed", "count"), "learned": ("learned", "mean"),
                           "s_learner": ("s_learner", "mean"), "mean_diff_s": ("diff_s", "mean"),
                           "worst_diff_s": ("diff_s", "min")}
    if "s_refits" in df and df["s_refits"].map(len).min() > 1:
        # the reference against itself: another random_state on the same logs (its own fitting noise), and
        # the learned policy against the reference's mean over its refits (its expected value on these logs)
        df["s_self"] = df["s_refits"].map(lambda v: min(v[1:]) - v[0])
        df["diff_s_mean"] = df["learned"] - df["s_refits"].map(np.mean)
        agg |= {"s_self_worst": ("s_self", "min"), "mean_diff_s_mean": ("diff_s_mean", "mean"),
                "worst_diff_s_mean": ("diff_s_mean", "min")}
    if "vw" in df:
        df["diff_vw"] = df["learned"] - df["vw"]
        df["beats_vw"] = (df["diff_vw"] > 0).astype(float)
        agg |= {"vw": ("vw", "mean"), "mean_diff_vw": ("diff_vw", "mean"), "worst_diff_vw": ("diff_vw", "min"),
                "beats_vw": ("beats_vw", "sum")}
    return df.groupby(["preset", "n"]).agg(**agg).reset_index()


def main() -> int:
    ap = VerbParser(prog="bench/bench_policy.py", description=__doc__.split("\n\n")[0])  # a bad value: one line, exit 2
    ap.add_argument("--presets", type=preset_list, default=list(PRESETS),
                    help=f"comma-separated simulator presets (default {','.join(PRESETS)})")
    ap.add_argument("--sizes", type=size_list(2000), default=[20_000, 50_000, 200_000],
                    help="comma-separated numbers of logged decisions per world, each 2,000 or more "
                         "(default 20000,50000,200000)")
    ap.add_argument("--seeds", type=int_in(1), default=10, help="worlds per preset and size (default 10)")
    ap.add_argument("--first-seed", type=int_in(0), default=1,
                    help="seed of the first world, also the learned model's training seed (default 1)")
    ap.add_argument("--no-vw", action="store_true", help="leave Vowpal Wabbit out")
    ap.add_argument("--s-refits", type=int_in(1), default=3,
                    help="fits of the S-learner per seed, random_state seed + 100·k (default 3): the first is the "
                         "reference, the others measure its own fitting noise")
    ap.add_argument("--json", type=json_out, help="write every run's results here (rewritten after each run)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: print the summary of the runs in these --json files (one per piece of a grid)")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    if args.merge:
        try:
            for path in args.merge:
                runs = read_runs(path)
                if not isinstance(runs, list) or not all(isinstance(r, dict) and {"preset", "n", "seed", "learned"} <= r.keys()
                                                         for r in runs):
                    raise ValueError(f"{path} is not a bench_policy result (a list of runs)")
                rows.extend(runs)
        except ValueError as exc:
            print(f"bench_policy: error: {exc}", file=sys.stderr)
            return 1
        seen = {(r["preset"], r["n"], r["seed"]) for r in rows}
        if len(seen) != len(rows):
            print("bench_policy: error: the files repeat a (preset, size, seed) run", file=sys.stderr)
            return 2
        if not rows:
            print("bench_policy: error: the files hold no run", file=sys.stderr)
            return 1
    for preset in args.presets if not args.merge else []:
        for n in args.sizes:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = one(preset, n, seed, not args.no_vw, args.s_refits)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "fit"}), file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    pd.set_option("display.width", 200)
    print(summarize(rows).to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
