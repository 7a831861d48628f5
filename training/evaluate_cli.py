"""``retention evaluate``: compare model versions off-policy on logged decisions.

Prints a table of estimates, writes ``summary.json`` and a self-contained ``report.html`` into
``--out``. See training.evaluate for what is estimated and training.report for the page.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.exploration import Exploration
from retention import VerbParser, int_in, time_ms
from serving.log_reader import source, training_inputs
from training.evaluate import DAY_MS, EvaluationConfig, Inputs, evaluate, format_table, resolve_versions
from training.target_policy import MissingProfilesError


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention evaluate",
        description="Compare model versions (and the logging policy, whose value is the observed mean) off-policy "
        "on logged decisions and outcomes: IPS, SNIPS, direct method, doubly robust and switch-DR estimates with "
        "bootstrap intervals. Prints a table; writes summary.json and report.html into --out.",
    )
    p.add_argument("--decisions", required=True, type=source, help="decisions file (.parquet or .csv), the fleet's "
                   "database (postgresql:// URL), or an export of "
                   "the server's log")
    p.add_argument("--outcomes", required=True, type=source,
                   help="outcome events file (.parquet or .csv), or the fleet's database (postgresql:// URL)")
    p.add_argument("--profiles", type=Path, help="subscriber profiles file (as used in training; not needed for the "
                   "server's own export, which logs the profile values each decision used)")
    p.add_argument("--allow-missing-profiles", action="store_true",
                   help="score a version trained with profile columns even when neither --profiles nor the "
                        "decisions give them (refused by default: its choices would change)")
    p.add_argument("--catalog", required=True, type=Path, help="catalog JSON (values and costs of the messages)")
    p.add_argument("--registry", help="model registry folder [env RETENTION_MODEL; default models/registry in the "
                   "checkout]")
    p.add_argument("--versions", default=None, help="comma-separated version ids (also 'current', 'latest'), or "
                   "'all'; default: the current and the latest version")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default ./evaluation)")
    p.add_argument("--ground-truth", type=Path, help="simulator ground truth: adds every policy's true value")
    g = p.add_argument_group("target policy (default: what serving uses, from RETENTION_* variables)")
    g.add_argument("--epsilon", type=float, default=None, help="exploration ε of the target policies (serving's: 0.05)")
    g.add_argument("--exploration", choices=("epsilon", "softmax"), default=None, help="exploration scheme")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature (value units)")
    g.add_argument("--holdout", type=float, default=None, help="share of requests held out on the default message")
    e = p.add_argument_group("estimation")
    e.add_argument("--level", type=float, default=0.9, help="confidence level of the intervals (default 0.9)")
    e.add_argument("--resamples", type=_resamples, default=1000,
                   help="bootstrap resamples: 0 (no intervals) or 100 to 100,000 (default 1000)")
    e.add_argument("--seed", type=int_in(0), default=0, help="bootstrap seed, 0 or more (default 0)")
    e.add_argument("--horizon-days", type=float, default=30.0, help="label horizon in days (default 30)")
    e.add_argument("--as-of", type=time_ms, dest="as_of",
                   help="treat the data as seen at this time (ms since 1970 or ISO 8601, e.g. 2026-02-01); "
                        "default: newest event")
    e.add_argument("--all-labelled", action="store_true", help="also use decisions whose label window has not passed "
                   "(labelled early only by a churn or a renewal: biased toward churn)")
    e.add_argument("--involuntary-expiry", choices=("censor", "churn"), default="censor", dest="involuntary",
                   help="label of an involuntary end (billing, price increase) with no cancellation: censor (default) "
                   "or churn")
    e.add_argument("--offer-window-days", type=float, default=7.0, help="a redemption of our promotional offer this "
                   "many days after a decision is credited to it; an Apple retention offer (type 5) never is (default 7)")
    e.add_argument("--reward-model", default="own", help="reward model of DM/DR: 'own' (each version its own "
                   "predictions, default) or one version for all (an id, 'current' or 'latest')")
    e.add_argument("--holdout-fraction", type=float, default=0.2, help="latest share of decisions for the predictive "
                   "metrics (default 0.2)")
    e.add_argument("--min-ess", type=float, default=100.0, help="warn below this effective sample size (default 100, "
                   "and never below 1%% of the requests)")
    return p


def _resamples(text: str) -> int:
    """argparse type of ``--resamples``: 0, or 100 or more (an interval from a few resamples is noise)."""
    n = int_in(0, 100_000)(text)
    if 0 < n < 100:
        raise argparse.ArgumentTypeError(f"must be 0 (no intervals) or 100 or more, not {n}: an interval from "
                                         f"{n} resample{'s' if n > 1 else ''} is noise")
    return n


def main(argv: list[str]) -> int:
    """Run ``retention evaluate``; return the exit status (bad input raises one clear error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.horizon_days > 0:
        parser.error("--horizon-days must be positive")
    if not args.offer_window_days > 0:
        parser.error("--offer-window-days must be positive")
    if not 0.5 <= args.level <= 0.999:
        parser.error("--level must be from 0.5 to 0.999, e.g. 0.9")
    if not 0 <= args.min_ess < float("inf"):
        parser.error("--min-ess must be a number, 0 or more")
    if args.epsilon is not None and not 0 <= args.epsilon <= 1:
        parser.error("--epsilon must be within [0, 1]")
    if args.holdout is not None and not 0 <= args.holdout <= 1:
        parser.error("--holdout must be within [0, 1]")
    if args.temperature is not None and not args.temperature > 0:
        parser.error("--temperature must be > 0")
    if not 0 < args.holdout_fraction < 1:
        parser.error("--holdout-fraction must be within (0, 1)")
    from models.registry import Registry, registry_spec

    registry = Registry.parse(registry_spec(args.registry))[0]
    registry.require_folder()  # a missing folder is one line and exit 1, as for `retention models`
    args.registry = registry.root

    from training.data_io import read_table

    reward_model = args.reward_model
    if reward_model != "own":
        if reward_model in ("current", "latest"):
            reward_model = resolve_versions(registry, reward_model)[0]
        if reward_model not in registry.versions():
            raise ValueError(f"--reward-model {args.reward_model!r} is neither 'own' nor a version in {registry.root}")
    base = Exploration.from_env()
    exploration = Exploration(
        epsilon=base.epsilon if args.epsilon is None else args.epsilon,
        scheme=base.scheme if args.exploration is None else args.exploration,
        temperature=base.temperature if args.temperature is None else args.temperature,
        holdout=base.holdout if args.holdout is None else args.holdout,
    )
    config = EvaluationConfig(
        level=args.level,
        n_resamples=args.resamples,
        seed=args.seed,
        exploration=exploration,
        horizon_ms=int(args.horizon_days * DAY_MS),
        as_of_ms=args.as_of,
        holdout_fraction=args.holdout_fraction,
        min_ess=args.min_ess,
        reward_model=reward_model,
        mature_only=not args.all_labelled,
        progress=True,
        involuntary=args.involuntary,
        offer_window_ms=int(args.offer_window_days * DAY_MS),
        allow_missing_profiles=args.allow_missing_profiles,
    )
    versions = resolve_versions(registry, args.versions)
    with training_inputs(args.decisions, args.outcomes) as (decisions_file, outcomes_file):
        inputs = Inputs.load(decisions_file, outcomes_file, args.catalog, args.profiles)
    ground_truth = read_table(args.ground_truth) if args.ground_truth else None
    try:
        evaluated = evaluate(inputs, registry, versions, config, ground_truth=ground_truth)
    except MissingProfilesError as exc:
        print(f"retention evaluate: error: {exc}", file=sys.stderr)
        return 2

    from training.report import render

    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    report_path = args.out / "report.html"
    summary_path.write_text(json.dumps(evaluated.summary, indent=1, allow_nan=False) + "\n")
    report_path.write_text(render(evaluated.summary), encoding="utf-8")
    print(format_table(evaluated.summary))
    print()
    print(f"summary: {summary_path}")
    print(f"report:  {report_path}")
    return 0


if __name__ == "__main__":
    import retention

    sys.exit(retention.main(["evaluate", *sys.argv[1:]]))
