"""Off-policy evaluation of model versions on logged decisions: the logic behind ``retention evaluate``.

For each model version, its target policy (training.target_policy: what serving would do with
that version, exploration included) is evaluated on the labelled logged decisions with every
estimator of training.ope; the logging policy's own value is the observed mean reward. All
estimates of all policies come from one bootstrap (the same resampled requests), so a paired
difference between two versions is as tight as the data allows.

Rewards follow docs/data-formats.md ("The reward"): label × (V(product after m) − cost(m)), the label from
training.labels (censored decisions are left out and counted). The reward model of the direct
and doubly robust methods is, by default, each version's own P(stay) × value; ``reward_model``
can name one version to judge all of them.

The summary (a JSON-ready dict) carries everything the table, the JSON file and the HTML report
show: estimates with intervals, differences to the current version and to the logging policy,
effective sample sizes, the target mass on candidates the logging policy could not show,
message shares, values by segment, calibration and predictive metrics on a time-based
held-out split, and warnings.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.catalog import Catalog
from models.exploration import Exploration
from training import ope
from training.target_policy import (
    LoggedRequests,
    TargetPolicy,
    policy_from_scores,
    prepare_logged,
    require_profiles,
    score_candidates,
)
from training.verdict import differ_clause, judge

LOGGING = "logging"
DAY_MS = 86_400_000
_ROW = "_decision_row"  # position of a decision in the decisions file, carried through prepare_logged


EVALUATION_INTERVALS = ("hull", "percentile", "bca")  # training.ope.INTERVALS less the bootstrap-t alone


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Knobs of an evaluation; the defaults are what ``retention evaluate`` uses."""

    level: float = 0.9
    n_resamples: int = 1000
    seed: int = 0
    exploration: Exploration = dataclasses.field(default_factory=Exploration)
    horizon_ms: int = 30 * DAY_MS
    as_of_ms: int | None = None
    holdout_fraction: float = 0.2
    min_ess: float = 100.0
    min_ess_fraction: float = 0.01
    # the policies' intervals and paired differences (training.ope.INTERVALS): the hull of the percentile,
    # BCa and bootstrap-t intervals (of the first two for a SNIPS difference), which covered the truth on
    # Apple-sized worlds where each alone did not
    interval: str = "hull"
    reward_model: str = "own"
    # only decisions whose whole label window has passed: recent ones get a label early only when
    # the subscriber churned or renewed, and keeping those would bias every estimate toward churn
    mature_only: bool = True
    segments: bool = True
    segment_resamples: int = 200
    calibration_bins: int = 10
    progress: bool = False
    involuntary: str = "censor"  # the label rule's choice for involuntary ends (training.labels)
    offer_window_ms: int = 7 * DAY_MS  # a redemption of our offer this long after a decision is credited to it
    # score a version that reads profile columns without them (no file, none logged) instead of refusing
    allow_missing_profiles: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ValueError(f"the confidence level must be within (0, 1), not {self.level}")
        if self.n_resamples < 0:
            raise ValueError("the number of bootstrap resamples must be >= 0")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"the held-out fraction must be within (0, 1), not {self.holdout_fraction}")
        if self.interval not in EVALUATION_INTERVALS:
            # a SNIPS difference has no bootstrap-t (its two results have their own denominators), so an
            # evaluation cannot be made of bootstrap-t intervals alone
            raise ValueError(f"unknown interval {self.interval!r} for an evaluation; one of "
                             f"{', '.join(EVALUATION_INTERVALS)}")


@dataclasses.dataclass
class Inputs:
    """The data an evaluation reads: decisions, outcome events, optional profiles, the catalog."""

    decisions: pd.DataFrame
    outcomes: pd.DataFrame
    catalog: Catalog
    profiles: pd.DataFrame | None = None

    @classmethod
    def load(cls, decisions: Path, outcomes: Path, catalog: Path, profiles: Path | None = None) -> Inputs:
        """Return the validated files; raises DataError or CatalogError with one sentence on bad input."""
        from training.data_io import read_decisions, read_outcomes, read_profiles

        return cls(
            decisions=read_decisions(decisions),
            outcomes=read_outcomes(outcomes),
            catalog=Catalog.load(catalog),
            profiles=read_profiles(profiles) if profiles is not None else None,
        )


# ---- model versions ---------------------------------------------------------------------------
def resolve_versions(registry: Any, spec: str | None) -> list[str]:
    """Return the version ids named by `spec`: ``V1,V2``, ``all``, ``current``, ``latest``; default current + latest."""
    available = registry.versions()
    current = registry.current()
    if not available:
        raise ValueError(f"registry {registry.root} has no model version")
    if spec is None or spec.strip() == "":
        chosen = [v for v in (current, available[-1]) if v is not None]
    elif spec.strip() == "all":
        chosen = list(available)
    else:
        chosen = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if part == "current":
                if current is None:
                    raise ValueError(f"registry {registry.root} has no current version")
                part = current
            elif part == "latest":
                part = available[-1]
            if part not in available:
                raise ValueError(f"model version {part!r} is not in registry {registry.root}")
            chosen.append(part)
    out: list[str] = []
    for v in chosen:
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError("no model version to evaluate")
    return out


def _training_window(manifest: dict[str, Any]) -> tuple[int | None, int | None]:
    """Return the (first, last) signed_date in ms of the data a version was trained on, when recorded."""
    data = manifest.get("training_data") or manifest.get("data") or {}
    if not isinstance(data, dict):
        return None, None

    def ms(v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, int | float) and math.isfinite(v):
            return int(v)
        try:
            return int(datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            return None

    for lo_key, hi_key in (("signed_date_min", "signed_date_max"), ("date_min", "date_max"), ("start", "end"),
                           ("first", "last"), ("from", "to")):
        if lo_key in data or hi_key in data:
            return ms(data.get(lo_key)), ms(data.get(hi_key))
    rng = data.get("date_range")
    if isinstance(rng, list | tuple) and len(rng) == 2:
        return ms(rng[0]), ms(rng[1])
    if isinstance(rng, dict):
        return ms(rng.get("min") or rng.get("start") or rng.get("first")), ms(rng.get("max") or rng.get("end") or rng.get("last"))
    return None, None


# ---- predictive metrics --------------------------------------------------------------------------
def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Return the ROC AUC (Mann-Whitney, ties counted half); NaN when only one class is present."""
    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(p, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-15) -> float:
    """Return the mean negative log-likelihood of 0/1 labels under probabilities `p` (clipped to [eps, 1-eps])."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean()) if len(y) else float("nan")


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Return the Brier score, the mean of (p − y)²."""
    y = np.asarray(y, dtype=np.float64)
    return float(((np.asarray(p, dtype=np.float64) - y) ** 2).mean()) if len(y) else float("nan")


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Return equal-width bins of predicted probability: count, mean prediction, observed rate (empty bins left out)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        c = int(m.sum())
        if c:
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": c,
                        "mean_predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Return ECE = Σ_b (n_b / n) |mean prediction_b − observed rate_b| over equal-width bins."""
    n = len(y)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["mean_predicted"] - b["observed"]) for b in calibration_bins(y, p, bins)))


def predictive_metrics(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Return AUC, log loss, Brier score, ECE, base rate and the calibration bins of predictions `p` for labels `y`."""
    keep = np.isfinite(p)
    y, p = np.asarray(y)[keep], np.asarray(p)[keep]
    return {
        "n": len(y),
        "auc": auc(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier(y, p),
        "ece": expected_calibration_error(y, p, bins),
        "base_rate": float(np.mean(y)) if len(y) else float("nan"),
        "mean_predicted": float(np.mean(p)) if len(p) else float("nan"),
        "calibration": calibration_bins(y, p, bins),
    }


# ---- the evaluation ----------------------------------------------------------------------------
@dataclasses.dataclass
class Evaluated:
    """An evaluation's raw material beside its summary: arrays for further analysis (benchmarks, tests)."""

    summary: dict[str, Any]
    logged: LoggedRequests  # the labelled requests the estimates use
    rewards: np.ndarray
    policies: dict[str, TargetPolicy]  # on the labelled requests
    results: dict[str, dict[str, ope.OPEResult]]
    bootstrap: ope.Bootstrap | None


def _clean(value: Any) -> Any:
    """Return `value` with non-finite floats as None and numpy scalars as Python ones (JSON-ready)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _message_label(catalog: Catalog, mid: str) -> str:
    m = catalog.messages.get(mid)
    kind = m.kind if m is not None else "?"
    return f"{kind} {mid[:8]}"


def evaluate(
    inputs: Inputs,
    registry: Any,
    versions: list[str],
    config: EvaluationConfig | None = None,
    *,
    ground_truth: pd.DataFrame | None = None,
    scorers: dict[str, Any] | None = None,
) -> Evaluated:
    """Return the evaluation of `versions` of `registry` (a models.registry.Registry) on `inputs`.

    `scorers` may supply ready :class:`models.scoring.Scorer` objects by version (tests, benchmarks).
    Raises ValueError with one sentence when nothing can be evaluated, and
    :class:`training.target_policy.MissingProfilesError` when a version reads profile columns that
    neither `inputs.profiles` nor the decisions' logged values give (unless the config allows it).
    """
    from tqdm import tqdm

    from training.labels import apple_choice, label_decisions
    from training.train import offer_identifiers

    cfg = config or EvaluationConfig()
    catalog = inputs.catalog
    warnings: list[str] = []
    needed = list(versions)
    if cfg.reward_model not in ("own", *needed):
        needed.append(cfg.reward_model)
    for v in needed:  # before any work: a version scored without the profiles it reads would be judged wrongly
        model = scorers[v].model if scorers and v in scorers else registry.load(v)
        require_profiles(model.schema, v, inputs.decisions, inputs.profiles, allow=cfg.allow_missing_profiles)
    steps = tqdm(total=5 + len(needed), desc="evaluate", unit="step", file=sys.stderr, disable=None if cfg.progress else True)

    # every decision, the requests answered with no message (404, policy apple_fallback) included, is
    # labelled and attributed; only those that showed a message can be scored and estimated
    full = inputs.decisions.reset_index(drop=True)
    unanswered = full["message_id"].isna().to_numpy()
    all_logged, dropped = prepare_logged(full.assign(**{_ROW: np.arange(len(full))})[~unanswered], catalog)
    if all_logged.n == 0:
        raise ValueError(
            "no decision is left to evaluate (every one names a candidate missing from the catalog, or was answered "
            "with no message)"
        )
    pos = all_logged.frame[_ROW].to_numpy(dtype=np.int64)
    labels_full, stats = label_decisions(full, inputs.outcomes, horizon_ms=cfg.horizon_ms, as_of_ms=cfg.as_of_ms,
                                         involuntary=cfg.involuntary)
    y_full = labels_full.to_numpy(dtype=np.float64)
    y_all = y_full[pos]
    # Apple's own choice (a 404, a late answer, an Apple retention offer redeemed) is its own arm: its
    # outcome says nothing about the message we logged, so it is reported apart and left out of every estimate
    apple_full, credited_full = apple_choice(full, inputs.outcomes, offer_identifiers(catalog),
                                             window_ms=cfg.offer_window_ms)
    apple = apple_full[pos]
    in_arm = unanswered.copy()
    in_arm[pos] = True  # the decisions not dropped for a candidate missing from the catalog
    arm = apple_full & in_arm
    apple_y = y_full[arm & np.isfinite(y_full)]
    apple_arm = {"decisions": int(arm.sum()), "labelled": int(apple_y.size),
                 "retention_rate": float(apple_y.mean()) if apple_y.size else None,
                 "unanswered": int(unanswered.sum()),
                 "offers_credited_to_ours": int((credited_full & in_arm).sum())}
    labelled = np.isfinite(y_all) & ~apple
    t_dec = all_logged.frame["signed_date"].to_numpy(dtype=np.int64)
    as_of = cfg.as_of_ms
    if as_of is None:
        as_of = int(inputs.outcomes["at"].max()) if len(inputs.outcomes) else int(t_dec.max())
    recent = (t_dec + cfg.horizon_ms > as_of) & labelled
    n_recent = int(recent.sum()) if cfg.mature_only else 0
    if cfg.mature_only:
        labelled &= ~recent
    if not labelled.any():
        raise ValueError(
            f"none of the {all_logged.n:,} decisions has a label window of {cfg.horizon_ms / DAY_MS:g} days that has "
            f"fully passed by {_iso(as_of)}: nothing to evaluate yet"
            + (" (--all-labelled also uses early labels, biased toward churn)" if cfg.mature_only else "")
        )
    logged = all_logged.subset(labelled)
    y = y_all[labelled]
    rows = np.arange(logged.n)
    rewards = y * logged.value_after[rows, logged.actions]
    steps.update()
    if apple_arm["decisions"]:
        warnings.append(
            f"{apple_arm['decisions']:,} decision(s) are Apple's choice (a 404, an answer later than Apple waits, or an "
            "Apple retention offer redeemed) and left out of every estimate; they are reported as their own arm"
        )
    if dropped["candidate not in catalog"]:
        warnings.append(
            f"{dropped['candidate not in catalog']:,} decision(s) left out: a candidate is no longer in the catalog, "
            "so its value cannot be computed"
        )
    if cfg.mature_only and n_recent:
        young = int((t_dec + cfg.horizon_ms > as_of).sum())
        warnings.append(
            f"{young:,} of {stats.total:,} decisions are newer than {_iso(as_of - cfg.horizon_ms)} and left out: their "
            f"label window has not passed ({young - n_recent:,} censored, {n_recent:,} labelled early only because the "
            "subscriber churned or renewed, an outcome-dependent sample)"
        )
    elif stats.censored:
        warnings.append(
            f"{stats.censored:,} of {stats.total:,} decisions ({stats.censored / stats.total:.1%}) are censored (outcome "
            "not known yet) and left out of every estimate"
        )
    if not cfg.mature_only and recent.any():
        warnings.append(
            f"{int(recent.sum()):,} decisions are labelled before their window passed (churns and early renewals only): "
            "the estimates lean toward churn"
        )
    inferred = int((logged.logging_source == "inferred").sum())

    # ---- score every version on every logged request (the truth needs the censored ones too)
    current = registry.current()
    scorers = dict(scorers or {})
    p_all: dict[str, np.ndarray] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for v in needed:
        scorer = scorers.get(v)
        if scorer is None:
            from models.scoring import Scorer

            scorer = Scorer(registry.load(v), intra_op_threads=0)
        manifests[v] = dict(scorer.model.manifest)
        p_all[v] = score_candidates(scorer, all_logged, catalog, inputs.profiles, progress=cfg.progress, desc=f"score {v}")
        steps.update()
    full_policies = {v: policy_from_scores(v, p_all[v], all_logged, catalog, cfg.exploration) for v in versions}
    policies = {v: _subset_policy(tp, labelled) for v, tp in full_policies.items()}

    # ---- estimates: every estimator of every policy, then one joint bootstrap
    results: dict[str, dict[str, ope.OPEResult]] = {}
    flat: dict[str, ope.OPEResult] = {}
    observed = ope.observed(rewards, n_resamples=0, level=cfg.level)
    flat[f"{LOGGING}/observed"] = observed
    for v, tp in policies.items():
        judge = tp if cfg.reward_model == "own" else _subset_policy(
            full_policies.get(cfg.reward_model) or policy_from_scores(cfg.reward_model, p_all[cfg.reward_model],
                                                                      all_logged, catalog, cfg.exploration),
            labelled,
        )
        res = ope.estimate_all(
            rewards, logged.actions, logged.propensities, tp.probs, judge.reward_hat(logged),
            logging_probs=logged.logging_probs, level=cfg.level, n_resamples=0,
        )
        results[v] = res
        flat.update({f"{v}/{name}": r for name, r in res.items()})
    # one subscriber's decisions share that subscriber's noise: resample subscribers, not decisions
    clusters = logged.frame["original_transaction_id"].astype(str).to_numpy()
    n_clusters = int(pd.unique(clusters).size)
    boot = ope.Bootstrap(flat, n_resamples=cfg.n_resamples, seed=cfg.seed, clusters=clusters) \
        if cfg.n_resamples else None
    if boot is not None:
        if cfg.interval in ("studentized", "hull"):  # every bootstrap-t interval below in one pass over the resamples
            current_in = current if current is not None and current in versions else None
            boot.prepare_studentized(
                [(name, None) for name in flat]
                + [(f"{v}/{name}", f"{LOGGING}/observed") for v in versions for name in results[v]]
                + [(f"{v}/{name}", f"{current_in}/{name}") for v in versions for name in results[v]
                   if current_in is not None and v != current_in],
                cfg.level,
            )
        observed = boot.with_interval(f"{LOGGING}/observed", cfg.level, cfg.interval)
        for v, res in results.items():
            results[v] = {name: boot.with_interval(f"{v}/{name}", cfg.level, cfg.interval) for name in res}
    steps.update()

    # ---- per-policy summaries
    n = logged.n
    ess_floor = max(cfg.min_ess, cfg.min_ess_fraction * n)
    holdout = _holdout_rows(logged, cfg.holdout_fraction)
    shown_share = pd.Series(logged.candidate_ids[rows, logged.actions]).value_counts(normalize=True)
    policy_rows: list[dict[str, Any]] = [
        {
            "name": LOGGING,
            "kind": "logging",
            "is_current": False,
            "estimates": {"observed": observed.to_dict()},
            "message_share": {str(k): float(v) for k, v in shown_share.items()},
            "segments": [],
        }
    ]
    for v in versions:
        tp, res = policies[v], results[v]
        row: dict[str, Any] = {
            "name": v,
            "kind": "model",
            "is_current": v == current,
            "estimates": {name: r.to_dict() for name, r in res.items()},
            "ess": res["ips"].ess,
            "ess_fraction": res["ips"].ess_fraction,
            "max_weight": res["ips"].max_weight,
            "unsupported_mass": res["ips"].unsupported_mass,
            "rule_fallback_share": float(tp.rule_rows.mean()),
            "greedy_differs_from_shown": float(np.mean(tp.greedy != logged.actions)),
            "mean_prob_of_shown": float(tp.probs[rows, logged.actions].mean()),
            "message_share": _message_share(tp, logged),
        }
        if boot is not None:
            row["vs_logging"] = {name: boot.difference(f"{v}/{name}", f"{LOGGING}/observed", cfg.level,
                                                       cfg.interval).to_dict() for name in res}
            row["vs_logging"]["dr"] |= _power(boot, f"{v}/dr", f"{LOGGING}/observed", cfg, n_clusters)
            row["vs_logging"]["dr"]["choices_differ"] = choices_differ(tp.greedy, logged.actions)
            if current is not None and current in versions and v != current:
                row["vs_current"] = {name: boot.difference(f"{v}/{name}", f"{current}/{name}", cfg.level,
                                                           cfg.interval).to_dict() for name in res}
                row["vs_current"]["dr"] |= _power(boot, f"{v}/dr", f"{current}/dr", cfg, n_clusters)
                row["vs_current"]["dr"]["choices_differ"] = choices_differ(tp.greedy, policies[current].greedy)
            # too few effective samples on either side: the bootstrap's verdict and the MDD mean nothing (the
            # gate's floor, cfg.min_ess: below it the gate refuses too; the 1%-of-requests level only warns)
            sides = {"vs_logging": [(v, res["ips"].ess)],
                     "vs_current": [(v, res["ips"].ess)] + ([(current, results[current]["ips"].ess)]
                                                            if current in results else [])}
            for key, side in sides.items():
                who, ess = min(side, key=lambda t: t[1])
                if ess < cfg.min_ess:
                    for d in (row.get(key) or {}).values():
                        d["too_few"] = {"version": who, "ess": float(ess), "floor": float(cfg.min_ess)}
                        for hidden in ("mdd", "se", "power", "decisions_for_one_percent"):  # no figure to misread
                            d.pop(hidden, None)
        p_shown = tp.p_stay[rows, logged.actions]
        row["predictive"] = predictive_metrics(y[holdout], p_shown[holdout], cfg.calibration_bins)
        lo, hi = _training_window(manifests.get(v, {}))
        row["training_window_ms"] = [lo, hi]
        policy_rows.append(row)
        # warnings the reader must see
        if res["ips"].ess < ess_floor:
            warnings.append(
                f"{v}: effective sample size {res['ips'].ess:,.0f} of {n:,} requests is below {ess_floor:,.0f}; its "
                "importance-weighted estimates (IPS, SNIPS, DR) are too noisy to trust"
            )
        if res["ips"].unsupported_mass > 1e-9:
            warnings.append(
                f"{v}: {res['ips'].unsupported_mass:.1%} of its probability mass goes to candidates the logging policy "
                "could not show (probability 0 there): IPS and SNIPS count them as zero reward, DM and DR rely on "
                "the reward model alone for them"
            )
        if tp.rule_rows.any():
            warnings.append(f"{v}: non-finite scores on {int(tp.rule_rows.sum())} request(s); serving's fallback rule is "
                            "evaluated there")
        try:
            overlap = training_overlap(registry, v, logged.frame) if v in registry.versions() else None
        except (ValueError, OSError) as exc:  # an unreadable record of its training requests: say so, evaluate on
            overlap = None
            warnings.append(f"{v}: its training requests could not be read ({exc}); overlap with this data not checked")
        if overlap is not None and overlap[0] > 0:
            warnings.append(
                f"{v}: {overlap[0]:,} of these {len(logged.frame):,} decisions are in its training data (matched "
                f"{overlap[1]}): its estimates are optimistic there; evaluate on decisions it was not trained on"
            )
    steps.update()

    # ---- values by segment (product, locale): DR per version, observed for the logging policy
    policy_rows[0]["segments"] = []
    seg_keys = logged.frame[["product_id", "user_locale"]].astype(str)
    groups = seg_keys.groupby(["product_id", "user_locale"], sort=True).indices
    seg_rows: list[dict[str, Any]] = []
    for (product, locale), idx in (groups.items() if cfg.segments else ()):
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        sub = {f"{LOGGING}/observed": observed.restrict(mask)}
        for v in versions:
            sub[f"{v}/dr"] = results[v]["dr"].restrict(mask)
        sb = ope.Bootstrap(sub, n_resamples=min(cfg.segment_resamples, cfg.n_resamples), seed=cfg.seed,
                           clusters=clusters[mask]) \
            if cfg.n_resamples and len(idx) > 1 else None
        entry: dict[str, Any] = {"product_id": product, "user_locale": locale, "n": len(idx), "values": {}}
        for key, r in sub.items():
            name = key.split("/")[0]
            lo_, hi_ = sb.interval(key, cfg.level) if sb is not None else (float("nan"), float("nan"))
            entry["values"][name] = {"estimate": r.estimate, "ci_low": lo_, "ci_high": hi_, "ess": r.ess}
        seg_rows.append(entry)
    steps.update()

    # ---- ground truth (simulated data only)
    truth: dict[str, Any] | None = None
    if ground_truth is not None:
        truth = _truth(ground_truth, logged, policies, inputs.decisions)
        for row in policy_rows:
            row["true_value"] = truth["policies"].get(row["name"])
    steps.update()
    steps.close()

    t_all = logged.frame["signed_date"].to_numpy(dtype=np.int64)
    summary = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "data": {
            "decisions": int(inputs.decisions.shape[0]),
            "evaluated": n,
            "retained": stats.retained,
            "churned": stats.churned,
            "censored": stats.censored,
            "recent_left_out": n_recent,
            "as_of": _iso(as_of),
            "left_out": dropped,
            "fallback_decisions": int(logged.is_fallback.sum()),
            "apple_fallback": apple_arm,
            "logging_distribution": {
                s: int((logged.logging_source == s).sum()) for s in ("logged", "fallback", "deterministic", "inferred")
            },
            "inferred_logging_rows": inferred,
            "first_decision": _iso(int(t_all.min())),
            "last_decision": _iso(int(t_all.max())),
            "holdout": {"fraction": cfg.holdout_fraction, "rows": int(holdout.sum()),
                        "from": _iso(int(t_all[holdout].min())) if holdout.any() else None},
            "mean_reward": float(rewards.mean()),
        },
        "settings": {
            "level": cfg.level,
            "interval": cfg.interval,
            "n_resamples": cfg.n_resamples,
            "seed": cfg.seed,
            "exploration": cfg.exploration.as_dict(),
            "horizon_days": cfg.horizon_ms / DAY_MS,
            "reward_model": cfg.reward_model,
            "mature_only": cfg.mature_only,
            "min_ess": ess_floor,
            "bootstrap_unit": "subscriber (original_transaction_id)",
            "bootstrap_clusters": n_clusters,
        },
        "current": current,
        "versions": list(versions),
        "estimators": list(ope.ESTIMATORS),
        "policies": policy_rows,
        "segments": seg_rows,
        "message_labels": {mid: _message_label(catalog, mid) for mid in catalog.messages},
        "ground_truth": truth,
        "warnings": warnings,
    }
    return Evaluated(_clean(summary), logged, rewards, policies, results, boot)


def choices_differ(a: np.ndarray, b: np.ndarray) -> float:
    """Return the share of requests on which two policies' choices (column indices, shape (n,)) differ.

    The MDD and the decisions a difference needs hold for a candidate that departs from its reference
    as much as this one: one that changes nearly nothing has a paired standard error near zero.
    """
    a, b = np.asarray(a), np.asarray(b)
    return float((a != b).mean()) if a.size else float("nan")


def _power(boot: ope.Bootstrap, candidate: str, reference: str, cfg: EvaluationConfig, clusters: int) -> dict[str, Any]:
    """Return what the paired DR difference can detect: its MDD at 80% power and the decisions 1% of the reference needs."""

    j = judge(boot, candidate, reference, level=cfg.level, clusters=clusters, method=cfg.interval)
    ref = boot.results[reference].estimate
    one_pct = 0.01 * ref if np.isfinite(ref) and ref > 0 else float("nan")
    need = j.decisions_needed(one_pct) if np.isfinite(one_pct) and np.isfinite(j.mdd) else None
    return {"se": j.se, "mdd": j.mdd, "power": j.power, "reference_value": ref, "decisions_for_one_percent": need}


# ---- fresh data: the candidate's training requests ------------------------------------------------
def training_overlap(registry: Any, version: str, decisions: Any) -> tuple[int, str] | None:
    """Return (decisions of `decisions` in `version`'s training data, how they were matched), or None if unknown.

    Matched by ``request_id`` against the hashes recorded at training time
    (:func:`training.train.request_hashes`); for a version without them, every decision inside
    its recorded training date range counts.
    """
    from training.train import TRAINING_REQUESTS_FILE, read_request_hashes, request_hashes

    path = registry.root / version / TRAINING_REQUESTS_FILE
    manifest = registry.manifest(version)
    if path.is_file():
        known = read_request_hashes(path, manifest)
        mine = request_hashes(decisions["request_id"].astype(str))
        return int(np.isin(mine, known, assume_unique=False).sum()), "by request_id"
    lo, hi = _training_window(manifest)
    if lo is None and hi is None:
        return None
    t = pd.to_numeric(decisions["signed_date"], errors="coerce").to_numpy(dtype=np.float64)
    inside = (t >= (lo if lo is not None else -np.inf)) & (t <= (hi if hi is not None else np.inf))
    why = (f"its record of training request ids, {TRAINING_REQUESTS_FILE}, is missing from the version's folder"
           if manifest.get("training_requests") else "this version predates request-id records")
    return int(inside.sum()), f"by date range ({why})"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _subset_policy(tp: TargetPolicy, mask: np.ndarray) -> TargetPolicy:
    return TargetPolicy(tp.name, tp.p_stay[mask], tp.values[mask], tp.probs[mask], tp.greedy[mask], tp.rule_rows[mask])


def _holdout_rows(logged: LoggedRequests, fraction: float) -> np.ndarray:
    """Return a mask of the latest `fraction` of requests by signed_date (the time-based held-out split)."""
    t = logged.frame["signed_date"].to_numpy(dtype=np.int64)
    if t.size == 0:
        return np.zeros(0, dtype=bool)
    cut = np.quantile(t, 1.0 - fraction)
    mask = t >= cut
    return mask if mask.any() else t == t.max()


def _message_share(tp: TargetPolicy, logged: LoggedRequests) -> dict[str, float]:
    """Return the share of requests on which the policy would show each message (its expected choice share)."""
    ids = logged.candidate_ids[logged.valid]
    probs = tp.probs[logged.valid]
    s = pd.Series(probs).groupby(ids).sum() / logged.n
    return {str(k): float(v) for k, v in s.sort_values(ascending=False).items()}


def _truth(
    ground_truth: pd.DataFrame, logged: LoggedRequests, policies: dict[str, TargetPolicy], decisions: pd.DataFrame
) -> dict[str, Any]:
    """Return the simulator's true values on the evaluated requests: every policy, the oracle, the best static message."""
    from training.simulate import best_static_value, logging_value, oracle_value, policy_value

    missing = [c for c in ("request_id", "message_id", "p_stay", "value_after") if c not in ground_truth.columns]
    if missing:
        raise ValueError(f"the ground truth lacks column(s) {', '.join(missing)}")
    ids = set(logged.frame["request_id"].astype(str))
    gt = ground_truth[ground_truth["request_id"].astype(str).isin(ids)]
    uncovered = len(ids - set(gt["request_id"].astype(str)))
    if uncovered:
        raise ValueError(f"the ground truth has no row for {uncovered:,} of the {len(ids):,} evaluated requests: it is "
                         "not the ground truth of these decisions (simulate writes one per world)")
    dec = decisions[decisions["request_id"].astype(str).isin(ids)]
    values = {name: policy_value(gt, tp.long_table(logged)) for name, tp in policies.items()}
    values[LOGGING] = logging_value(gt, dec)
    best, best_id = best_static_value(gt)
    return {"policies": values, "oracle": oracle_value(gt), "best_static": best, "best_static_message": best_id,
            "requests": len(ids)}


# ---- the text table --------------------------------------------------------------------------
def format_table(summary: dict[str, Any]) -> str:
    """Return the plain-text table of estimates that ``retention evaluate`` prints."""
    level = summary["settings"]["level"]
    w = max([len("policy")] + [len(p["name"]) + (10 if p.get("is_current") else 0) for p in summary["policies"]])
    head = f"{'policy':<{w}} {'estimator':<10} {'estimate':>10} {f'{level:.0%} interval':>22} {'ESS':>9} {'unsupported':>11}"
    has_truth = summary.get("ground_truth") is not None
    if has_truth:
        head += f" {'true':>9}"
    lines = [head, "-" * len(head)]
    for p in summary["policies"]:
        name = p["name"] + (" (current)" if p.get("is_current") else "")
        first = True
        for est, e in p["estimates"].items():
            ci = _fmt_ci(e.get("ci_low"), e.get("ci_high"))
            line = (f"{name if first else '':<{w}} {est:<10} {_fmt(e.get('estimate')):>10} {ci:>22} "
                    f"{_fmt(e.get('ess'), 0):>9} {_fmt_pct(e.get('unsupported_mass')):>11}")
            if has_truth:
                line += f" {_fmt(p.get('true_value')):>9}"  # on every estimator's row: each is compared with it
            lines.append(line)
            first = False
    diffs = []
    for p in summary["policies"]:
        for key, label in (("vs_current", f"− current {summary.get('current')}"), ("vs_logging", "− logging")):
            d = (p.get(key) or {}).get("dr")
            if d:
                line = f"  {p['name']} {label}: DR {_fmt(d['estimate'])} {_fmt_ci(d['ci_low'], d['ci_high'])}"
                if d.get("too_few"):
                    line += (f"; no verdict and no MDD: {d['too_few']['version']}'s effective sample size "
                             f"{d['too_few']['ess']:,.0f} is below {d['too_few']['floor']:,.0f}, too few for the "
                             "interval to mean anything")
                elif d.get("mdd") is not None:
                    line += f"; MDD {_fmt(d['mdd'])}"
                    if d.get("decisions_for_one_percent") is not None:
                        line += (f"; an advantage of 1% ({_fmt(0.01 * d['reference_value'], 4)}) needs about "
                                 f"{d['decisions_for_one_percent']:,} decisions")
                        if d.get("choices_differ") is not None:
                            line += f" {differ_clause(d['choices_differ'])}"
                diffs.append(line)
    if diffs:
        lines += ["", f"paired differences ({level:.0%} interval; MDD: the smallest true difference detected 80% of "
                  f"the time with these {summary['data']['evaluated']:,} decisions):", *diffs]
    if summary.get("warnings"):
        lines += ["", "warnings:", *(f"  ! {w}" for w in summary["warnings"])]
    return "\n".join(lines)


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _fmt_ci(lo: Any, hi: Any) -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"
