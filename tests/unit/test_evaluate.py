"""Off-policy evaluation of model versions on the simulator: target policies, the CLI, the gate, accuracy."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.catalog import Catalog
from models.exploration import Exploration, action_probabilities
from models.registry import Registry
from training.evaluate import (
    EvaluationConfig,
    Inputs,
    auc,
    brier,
    calibration_bins,
    evaluate,
    expected_calibration_error,
    format_table,
    log_loss,
    resolve_versions,
)
from training.simulate import World, simulate, write_world
from training.target_policy import logging_policy, prepare_logged, target_policy
from training.verdict import z_sum

FAST = EvaluationConfig(n_resamples=300, segment_resamples=50)


@dataclass
class Lab:
    registry: Path
    weak: str  # logistic regression that ignores the subscriber: the current version
    strong: str  # gradient boosting on every feature: a candidate that should win
    world: World  # evaluation data, another seed than the training data
    files: dict[str, Path]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    import sklearn.ensemble  # noqa: F401  (load OpenMP first, so the thread limit below applies to it)
    from threadpoolctl import threadpool_limits

    from training.train import train_frames, write_result

    root = tmp_path_factory.mktemp("ope")
    registry = Registry(root / "registry")
    train = simulate(20_000, seed=100)
    # one thread: on a shared 2-core machine OpenMP spinning costs more than it gains
    with threadpool_limits(1):
        weak = train_frames(train.decisions, train.outcomes, train.profiles, train.catalog, model="logreg", context=False)
        weak_id, _ = write_result(weak, registry, promote=True)
        strong = train_frames(train.decisions, train.outcomes, train.profiles, train.catalog)
        strong_id, _ = write_result(strong, registry)
    world = simulate(20_000, seed=1)
    files = write_world(world, root / "world")
    return Lab(registry.root, weak_id, strong_id, world, files)


def _inputs(world: World, decisions: pd.DataFrame | None = None) -> Inputs:
    return Inputs(world.decisions if decisions is None else decisions, world.outcomes, world.catalog, world.profiles)


# ---- target policies ---------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon,holdout", [(0.05, 0.0), (0.1, 0.2)])
def test_target_policy_is_servings_exact_math(lab: Lab, epsilon: float, holdout: float) -> None:
    from models.scoring import Scorer

    catalog = lab.world.catalog
    decisions = lab.world.decisions.iloc[:400]
    logged, dropped = prepare_logged(decisions, catalog)
    assert dropped == {"candidate not in catalog": 0}
    exploration = Exploration(epsilon=epsilon, holdout=holdout)
    scorer = Scorer(Registry(lab.registry).load(lab.strong))
    tp = target_policy(scorer, logged, catalog, exploration, lab.world.profiles)
    assert np.allclose(tp.probs.sum(axis=1), 1.0)
    for i in range(400):  # bit for bit what serving computes, on every request
        row = decisions.iloc[i]
        cands = [catalog.messages[m] for m in row["candidates"]]
        values = tp.p_stay[i, : len(cands)] * np.array([catalog.value_after(m, row["product_id"]) for m in cands])
        default = catalog.default_for(row["product_id"], row["user_locale"])
        d = [m.messageIdentifier for m in cands].index(default.messageIdentifier) if default else None
        want = action_probabilities(values, epsilon=epsilon, holdout=holdout, default_index=d)
        assert np.array_equal(tp.probs[i, : len(cands)], want)
        assert not tp.probs[i, len(cands):].any()
        assert tp.greedy[i] == int(np.argmax(values))


def test_the_target_policy_is_scored_with_the_profile_values_serving_logged(lab: Lab) -> None:
    """A decision that logged the profile values serving used is scored with those, with or without a profiles
    file (as training featurizes it): evaluating the server's own export needs no --profiles."""
    from models.scoring import Scorer
    from training.target_policy import score_candidates

    catalog = lab.world.catalog
    plain = lab.world.decisions.iloc[:300].reset_index(drop=True)
    prof = lab.world.profiles.set_index("original_transaction_id")
    logged_values = [json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in prof.loc[o].items()})
                     for o in plain["original_transaction_id"]]
    scorer = Scorer(Registry(lab.registry).load(lab.strong))
    assert scorer.model.schema.profile_numeric  # the strong model reads profiles

    def p_stay(decisions: pd.DataFrame, profiles: pd.DataFrame | None) -> np.ndarray:
        return score_candidates(scorer, prepare_logged(decisions, catalog)[0], catalog, profiles)

    with_file = p_stay(plain, lab.world.profiles)
    without = p_stay(plain, None)
    assert not np.allclose(with_file, without, equal_nan=True)  # the profiles matter to this model
    assert np.allclose(p_stay(plain.assign(profile=logged_values), None), with_file, equal_nan=True)
    # the logged values win over the file's: "null" (asked, no profile) scores as no profile at all
    assert np.allclose(p_stay(plain.assign(profile="null"), lab.world.profiles), without, equal_nan=True)
    # with no file, logged "null" is what serving did; an empty cell (logged before the column existed) is not
    from training.target_policy import MissingProfilesError, require_profiles

    schema = scorer.model.schema
    require_profiles(schema, lab.strong, plain.assign(profile="null"), None)
    half = plain.assign(profile=["null" if i % 2 else None for i in range(len(plain))])
    with pytest.raises(MissingProfilesError, match="150 of the 300 decisions carry no profile values"):
        require_profiles(schema, lab.strong, half, None)
    require_profiles(schema, lab.strong, half, lab.world.profiles)  # the file gives them
    require_profiles(schema, lab.strong, half, None, allow=True)


def test_evaluation_explores_as_the_server_started_with_the_same_variables() -> None:
    from serving.settings import Settings

    def servers(env: dict[str, str]) -> Exploration:
        s = Settings.from_env(env)
        return Exploration(epsilon=s.epsilon, scheme=s.exploration, temperature=s.temperature, holdout=s.holdout)

    assert Exploration.from_env({}) == servers({}) == Exploration(epsilon=0.05, scheme="epsilon", temperature=1.0)
    env = {"RETENTION_EPSILON": "0.2", "RETENTION_EXPLORATION": "softmax", "RETENTION_TEMPERATURE": "3",
           "RETENTION_HOLDOUT": "0.1"}
    assert Exploration.from_env(env) == servers(env) == Exploration(0.2, "softmax", 3.0, 0.1)
    with pytest.raises(ValueError, match="RETENTION_EPSILON: 'lots' is not a valid float"):
        Exploration.from_env({"RETENTION_EPSILON": "lots"})
    with pytest.raises(ValueError, match="epsilon must be within"):
        Exploration.from_env({"RETENTION_EPSILON": "1.5"})


def test_logging_distribution_sources(lab: Lab) -> None:
    catalog = lab.world.catalog
    d = lab.world.decisions.iloc[:6].copy()
    # request 0: a fallback; request 1: the server logged every candidate's probability
    d.loc[0, "policy"] = "fallback:model_error"
    d.loc[0, "propensity"] = 1.0
    k1 = len(d.loc[1, "candidates"])
    probs = [0.0] * k1
    probs[d.loc[1, "candidates"].index(d.loc[1, "message_id"])] = 1.0
    d.loc[1, "propensity"] = 1.0
    d["probabilities"] = [None, probs, None, None, None, None]
    logged, _ = prepare_logged(d, catalog)
    assert list(logged.logging_source[:3]) == ["fallback", "logged", "inferred"]
    assert logged.logging_probs[0].sum() == pytest.approx(1.0)
    assert logged.logging_probs[0, logged.actions[0]] == 1.0
    assert logged.propensities[0] == 1.0
    assert (logged.logging_probs[1] > 0).sum() == 1  # the logged distribution says nothing else could be shown
    assert (logged.logging_probs[2, : logged.k[2]] > 0).all()  # an exploring policy could show any candidate
    # the logging policy as a target reproduces its own distribution
    assert np.allclose(logging_policy(logged).probs, logged.logging_probs)


def test_requests_naming_a_retired_message_are_left_out_and_counted(lab: Lab) -> None:
    d = lab.world.decisions.iloc[:50].copy()
    gone = d.loc[3, "candidates"][0]
    raw = json.loads(lab.world.catalog.to_json())
    raw["messages"] = [m for m in raw["messages"] if m["messageIdentifier"] != gone]
    raw["defaults"] = [x for x in raw["defaults"] if x["messageIdentifier"] != gone]
    smaller = Catalog.from_bytes(json.dumps(raw).encode())
    logged, dropped = prepare_logged(d, smaller)
    uses = sum(gone in c for c in d["candidates"])
    assert dropped["candidate not in catalog"] == uses > 0
    assert logged.n == 50 - uses


# ---- the evaluation ----------------------------------------------------------------------------
def test_evaluation_summary(lab: Lab) -> None:
    reg = Registry(lab.registry)
    versions = resolve_versions(reg, None)
    assert versions == [lab.weak, lab.strong]  # current, then the latest
    ev = evaluate(_inputs(lab.world), reg, versions, FAST, ground_truth=lab.world.ground_truth)
    s = ev.summary
    json.dumps(s, allow_nan=False)
    logging_row, weak, strong = s["policies"]
    assert logging_row["name"] == "logging"
    assert logging_row["estimates"]["observed"]["estimate"] == pytest.approx(ev.rewards.mean())
    assert weak["is_current"] and not strong["is_current"]
    for p in (weak, strong):
        assert set(p["estimates"]) == {"ips", "snips", "dm", "dr", "switch-dr"}
        for name, e in p["estimates"].items():
            assert e["ci_low"] <= e["estimate"] <= e["ci_high"], name
        assert sum(p["message_share"].values()) == pytest.approx(1.0)
        assert 0.5 < p["predictive"]["auc"] <= 1.0
        assert p["predictive"]["n"] == s["data"]["holdout"]["rows"] > 0
        assert p["unsupported_mass"] == 0.0  # ε-greedy logging could show every candidate
    assert "vs_current" in strong and "vs_current" not in weak
    assert sum(seg["n"] for seg in s["segments"]) == s["data"]["evaluated"]
    # only decisions whose 30-day window has passed are evaluated, and the rest is said
    assert s["data"]["evaluated"] < s["data"]["decisions"]
    assert any("label window has not passed" in w for w in s["warnings"])
    # the strong model's policy really is better, and the paired DR difference finds it
    truth = s["ground_truth"]["policies"]
    assert truth[lab.strong] > truth[lab.weak]
    assert strong["vs_current"]["dr"]["ci_low"] > 0
    table = format_table(s)
    assert lab.strong in table and "switch-dr" in table and "paired differences" in table
    # what the paired difference can detect: the gate's MDD and the decisions 1% of the current value needs
    d = strong["vs_current"]["dr"]
    assert d["mdd"] == pytest.approx(z_sum() * d["se"]) and d["mdd"] > 0
    assert d["decisions_for_one_percent"] == math.ceil(s["data"]["evaluated"] * (d["mdd"] / (0.01 * d["reference_value"])) ** 2)
    assert f"MDD {d['mdd']:.3f}; an advantage of 1% ({0.01 * d['reference_value']:.4f}) needs about " \
           f"{d['decisions_for_one_percent']:,} decisions" in table


def test_an_evaluation_takes_the_intervals_it_can_give_every_row(lab: Lab) -> None:
    """The percentile interval alone nests in the default hull; the bootstrap-t alone is refused up front.

    (A SNIPS difference has no bootstrap-t: its two results have their own denominators.)
    """
    reg = Registry(lab.registry)
    cfg = dataclasses.replace(FAST, segments=False)
    hull = evaluate(_inputs(lab.world), reg, [lab.weak, lab.strong], cfg).summary["policies"]
    pct = evaluate(_inputs(lab.world), reg, [lab.weak, lab.strong],
                   dataclasses.replace(cfg, interval="percentile")).summary["policies"]
    for h, p in zip(hull[1:], pct[1:], strict=True):
        for name in ("snips", "dr"):
            e, f = h["estimates"][name], p["estimates"][name]
            assert e["estimate"] == f["estimate"] and e["ci_low"] <= f["ci_low"] <= f["ci_high"] <= e["ci_high"]
    with pytest.raises(ValueError, match="unknown interval 'studentized' for an evaluation; one of hull"):
        EvaluationConfig(interval="studentized")


def test_every_bootstrap_t_of_an_evaluation_is_computed_in_its_prepared_passes(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over the resamples per 8 intervals, all up front: none is left to cost a pass of its own later."""
    from training import ope

    passes: list[tuple[bool, int]] = []  # (inside prepare_studentized, intervals in the pass)
    inside = [False]
    prepare, studentized = ope.Bootstrap.prepare_studentized, ope.Bootstrap._studentized

    def prepare_spy(self: ope.Bootstrap, pairs: Any, level: float = ope.DEFAULT_LEVEL) -> None:
        inside[0] = True
        try:
            prepare(self, pairs, level)
        finally:
            inside[0] = False

    def studentized_spy(self: ope.Bootstrap, pairs: list[tuple[str, str | None]], level: float) -> Any:
        passes.append((inside[0], len(pairs)))
        return studentized(self, pairs, level)

    monkeypatch.setattr(ope.Bootstrap, "prepare_studentized", prepare_spy)
    monkeypatch.setattr(ope.Bootstrap, "_studentized", studentized_spy)
    reg = Registry(lab.registry)
    evaluate(_inputs(lab.world), reg, [lab.weak, lab.strong], dataclasses.replace(FAST, segments=False))
    assert passes and all(prepared for prepared, _ in passes), passes
    assert all(k == ope.STUDENTIZED_PAIRS_PER_PASS for _, k in passes[:-1]) and 0 < passes[-1][1] <= 8


def test_the_logging_policy_as_target_gives_its_observed_mean(lab: Lab) -> None:
    from training import ope

    ev = evaluate(_inputs(lab.world), Registry(lab.registry), [lab.weak], FAST)
    lg = ev.logged
    res = ope.ips(ev.rewards, lg.actions, lg.propensities, logging_policy(lg).probs, n_resamples=0)
    assert res.estimate == pytest.approx(ev.rewards.mean())
    assert res.ess == pytest.approx(lg.n)


def test_overlap_with_training_data_is_warned_by_request_id_not_by_date(lab: Lab) -> None:
    # the lab's evaluation world spans the same dates as the training world, but no request of it was trained on
    fresh = evaluate(_inputs(lab.world, lab.world.decisions.iloc[:3000].copy()), Registry(lab.registry),
                     [lab.strong], dataclasses.replace(FAST, segments=False))
    assert not any(lab.strong in w and ("training data" in w or "optimistic" in w or "trained on" in w)
                   for w in fresh.summary["warnings"]), fresh.summary["warnings"]
    # its own training decisions (the same simulator seed): warned, with how many and how they were matched
    train = simulate(20_000, seed=100)
    own = evaluate(_inputs(train, train.decisions.iloc[:3000].copy()), Registry(lab.registry), [lab.strong],
                   dataclasses.replace(FAST, segments=False))
    hits = [w for w in own.summary["warnings"] if "training data" in w]
    assert len(hits) == 1 and hits[0].startswith(f"{lab.strong}: ") and "(matched by request_id)" in hits[0], hits
    count = int(hits[0].split(": ")[1].split(" of ")[0].replace(",", ""))
    assert 2500 < count <= 3000  # every labelled one of the 3,000 (the censored ones were not trained on)


def test_an_unreadable_record_of_training_requests_is_a_warning_not_a_failed_evaluation(lab: Lab, tmp_path: Path) -> None:
    from training.train import TRAINING_REQUESTS_FILE

    shutil.copytree(lab.registry, tmp_path / "registry")
    (tmp_path / "registry" / lab.strong / TRAINING_REQUESTS_FILE).write_bytes(b"damaged")
    ev = evaluate(_inputs(lab.world, lab.world.decisions.iloc[:2000].copy()), Registry(tmp_path / "registry"),
                  [lab.strong], dataclasses.replace(FAST, segments=False))
    hits = [w for w in ev.summary["warnings"] if "training requests could not be read" in w]
    assert len(hits) == 1 and hits[0].startswith(f"{lab.strong}: ") and "sha256 mismatch" in hits[0], hits
    assert ev.summary["policies"][1]["estimates"]["dr"]["estimate"] > 0  # evaluated all the same


def test_fallback_decisions_put_target_mass_where_logging_had_none(lab: Lab) -> None:
    d = lab.world.decisions.iloc[:10_000].copy()
    rows = np.arange(0, len(d), 4)  # a quarter of the requests fell back to the default message
    for i in rows:
        default = lab.world.catalog.default_for(d.at[i, "product_id"], d.at[i, "user_locale"])
        d.at[i, "message_id"] = default.messageIdentifier
        d.at[i, "propensity"] = 1.0
        d.at[i, "policy"] = "fallback:no_model"
    ev = evaluate(_inputs(lab.world, d), Registry(lab.registry), [lab.strong], FAST)
    row = ev.summary["policies"][1]
    assert ev.summary["data"]["fallback_decisions"] > 0
    # the target spreads ~3/4 of its mass away from the default on those requests: reported, not hidden
    assert 0.05 < row["unsupported_mass"] < 0.25
    assert row["estimates"]["ips"]["unsupported_mass"] == pytest.approx(row["unsupported_mass"])
    assert any("could not show" in w and lab.strong in w for w in ev.summary["warnings"])


def test_apple_s_choices_are_their_own_arm_left_out_of_every_estimate(lab: Lab) -> None:
    d = lab.world.decisions.iloc[:10_000].copy()
    apple_rows = np.arange(0, len(d), 5)  # answered 404 or too late: Apple showed its own message
    d.loc[d.index[apple_rows], "policy"] = "apple_fallback"
    outcomes = lab.world.outcomes.copy()
    # a retention offer Apple chose itself (offerType 5) redeemed right after another decision: Apple's too
    other = d.index[1]
    outcomes = pd.concat([outcomes, pd.DataFrame({
        "original_transaction_id": [d.at[other, "original_transaction_id"]], "event": ["offer_redeemed"],
        "at": [int(d.at[other, "signed_date"]) + 60_000], "offer_type": [5], "offer_identifier": ["apple-7"],
    })], ignore_index=True)
    inputs = Inputs(d, outcomes, lab.world.catalog, lab.world.profiles)
    ev = evaluate(inputs, Registry(lab.registry), [lab.strong], FAST)
    arm = ev.summary["data"]["apple_fallback"]
    assert arm["decisions"] == len(apple_rows) + 1
    assert 0 < arm["labelled"] <= arm["decisions"] and 0.0 <= arm["retention_rate"] <= 1.0
    base = evaluate(_inputs(lab.world, lab.world.decisions.iloc[:10_000].copy()), Registry(lab.registry),
                    [lab.strong], FAST)
    assert ev.summary["data"]["evaluated"] == base.summary["data"]["evaluated"] - arm["labelled"]
    assert any("Apple's choice" in w for w in ev.summary["warnings"])


def test_predictive_metrics_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert auc(y, p) == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs are ordered right
    assert log_loss(y, p) == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))
    assert brier(y, p) == pytest.approx(np.mean([0.01, 0.16, 0.4225, 0.04]))
    bins = calibration_bins(y, p, bins=2)  # [0, 0.5): 0.1, 0.4, 0.35 ; [0.5, 1]: 0.8
    assert [b["count"] for b in bins] == [3, 1]
    ece = 3 / 4 * abs(np.mean([0.1, 0.4, 0.35]) - 1 / 3) + 1 / 4 * abs(0.8 - 1.0)
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(ece)
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


# ---- the command line ---------------------------------------------------------------------------
def _cli_args(lab: Lab, out: Path) -> list[str]:
    f = lab.files
    return ["evaluate", "--decisions", str(f["decisions"]), "--outcomes", str(f["outcomes"]), "--profiles",
            str(f["profiles"]), "--catalog", str(f["catalog"]), "--registry", str(lab.registry), "--versions", "all",
            "--resamples", "200", "--out", str(out), "--ground-truth", str(f["ground_truth"])]


def test_cli_prints_the_table_and_writes_json_and_html(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    assert retention.main(_cli_args(lab, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "estimator" in out and lab.strong in out and "true" in out
    assert "(this holds for a candidate whose choices differ on " in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["name"] for p in summary["policies"]] == ["logging", lab.weak, lab.strong]
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="estimates"' in page and page.count("data:image/png;base64,") >= 4
    strong_dr = next(p for p in summary["policies"] if p["name"] == lab.strong)["vs_current"]["dr"]
    assert "decisions a 1% advantage needs" in page and f"<td>{strong_dr['decisions_for_one_percent']:,}</td>" in page
    assert f"<td>{strong_dr['choices_differ']:.1%}</td>" in page
    assert "http://" not in page and "https://" not in page  # self-contained


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        (lambda a: a.__setitem__(a.index("--decisions") + 1, "/nonexistent/d.parquet"), 1, "no such file"),
        (lambda a: a.__setitem__(a.index("--versions") + 1, "nope"), 1, "not in registry"),
        (lambda a: a.extend(["--level", "1.5"]), 2, "--level"),
        (lambda a: a.extend(["--level", "1e-9"]), 2, "--level must be from 0.5 to 0.999"),
        (lambda a: a.extend(["--min-ess", "nan"]), 2, "--min-ess must be a number, 0 or more"),
        (lambda a: a.__setitem__(a.index("--registry") + 1, "/nonexistent/reg"), 1, "/nonexistent/reg does not exist"),
        (lambda a: a.__setitem__(a.index("--resamples") + 1, "5"), 2, "must be 0 (no intervals) or 100 or more"),
        (lambda a: a.__setitem__(a.index("--ground-truth") + 1, a[a.index("--decisions") + 1]), 1,
         "the ground truth lacks column(s) p_stay, value_after"),
        (lambda a: a.extend(["--reward-model", "nope"]), 1, "--reward-model 'nope' is neither 'own' nor a version"),
        # the strong version reads profile columns: without the file (and none logged) it would be scored blind
        (lambda a: a.__delitem__(slice(a.index("--profiles"), a.index("--profiles") + 2)), 2,
         "was trained with profile columns (tenure_days, "),
    ],
)
def test_cli_bad_input_is_one_line(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str], change, code, needle) -> None:  # type: ignore[no-untyped-def]
    import retention

    args = _cli_args(lab, tmp_path / "out")
    change(args)
    try:
        status = retention.main(args)
    except SystemExit as exit_:  # a usage error: argparse's exit
        status = exit_.code
    assert status == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_below_the_ess_floor_a_difference_has_no_verdict_and_no_mdd(lab: Lab) -> None:
    """With too few effective samples the bootstrap interval of a difference can exclude the truth with
    confidence: the table, the JSON and the report then give no verdict and no MDD, only the estimate."""
    from training.report import render

    reg = Registry(lab.registry)
    config = dataclasses.replace(FAST, min_ess=1e9, segments=False)  # every version below the floor
    ev = evaluate(_inputs(lab.world), reg, [lab.weak, lab.strong], config)
    strong = next(p for p in ev.summary["policies"] if p["name"] == lab.strong)
    d = strong["vs_logging"]["dr"]
    assert d["too_few"]["floor"] == 1e9 and d["too_few"]["ess"] == pytest.approx(ev.results[lab.strong]["ips"].ess)
    assert "mdd" not in d and "decisions_for_one_percent" not in d  # no figure a script could misread
    # against the current version, the thinner of the two sides is named
    vc = strong["vs_current"]["dr"]["too_few"]
    thinner = min((lab.strong, lab.weak), key=lambda v: ev.results[v]["ips"].ess)
    assert vc["version"] == thinner and vc["ess"] == pytest.approx(ev.results[thinner]["ips"].ess)
    table = format_table(ev.summary)
    assert f"no verdict and no MDD: {lab.strong}'s effective sample size" in table and "needs about" not in table
    page = render(ev.summary)
    assert "too few effective samples" in page and ">better<" not in page and ">worse<" not in page


def test_a_ground_truth_of_another_world_is_refused(lab: Lab) -> None:
    other = simulate(300, seed=7)
    config = dataclasses.replace(FAST, n_resamples=0, segments=False)
    with pytest.raises(ValueError, match=r"the ground truth has no row for [\d,]+ of the [\d,]+ evaluated requests"):
        evaluate(_inputs(lab.world), Registry(lab.registry), [lab.weak], config, ground_truth=other.ground_truth)


def test_cli_reward_model_takes_the_version_aliases(lab: Lab, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    args = _cli_args(lab, tmp_path / "out")
    i = args.index("--profiles")
    del args[i:i + 2]
    args += ["--reward-model", "current", "--allow-missing-profiles"]  # scored blind, as asked
    assert retention.main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["reward_model"] == lab.weak  # the current version, by its id


# ---- the promotion gate --------------------------------------------------------------------------
def test_gate_promotes_only_a_proven_winner(lab: Lab, tmp_path: Path) -> None:
    from training.gate import promotion_gate

    root = tmp_path / "registry"
    shutil.copytree(lab.registry, root)
    f = lab.files
    args = (f["decisions"], f["outcomes"], f["profiles"], f["catalog"])
    ok, why = promotion_gate(root, lab.strong, *args, n_resamples=300)
    assert ok, why
    assert "lower bound is above zero" in why and lab.weak in why
    # the decisions a 1% advantage needs hold for a candidate that departs from the current one as this one does
    ev = evaluate(_inputs(lab.world), Registry(root), [lab.strong, lab.weak], FAST)
    differ = float((ev.policies[lab.strong].greedy != ev.policies[lab.weak].greedy).mean())
    assert 0.05 < differ < 1
    assert "needs about" in why and f"whose choices differ on {differ:.1%} of the requests, as this one's do" in why
    Registry(root).promote(lab.strong)
    ok, why = promotion_gate(root, lab.weak, *args, n_resamples=300)
    assert not ok
    assert "not promoted" in why and "not above zero" in why
    ok, why = promotion_gate(root, lab.strong, *args, n_resamples=300)
    assert not ok and "already the current version" in why
    with pytest.raises(ValueError, match="not in registry"):
        promotion_gate(root, "20990101T000000Z-abcdef", *args)


# ---- a smaller version of the simulator accuracy and coverage study (bench/bench_ope.py) -----------
def test_snips_and_dr_are_accurate_and_cover_the_truth_on_the_simulator(lab: Lab) -> None:
    from models.scoring import Scorer

    reg = Registry(lab.registry)
    scorer = {lab.strong: Scorer(reg.load(lab.strong))}
    n, seeds = 20_000, (11, 12, 13, 14, 15)
    cfg = EvaluationConfig(n_resamples=400, segments=False, exploration=Exploration(epsilon=0.05))
    errors: dict[str, list[float]] = {"snips": [], "dr": []}
    covered: dict[str, int] = {"snips": 0, "dr": 0}
    for seed in seeds:
        world = simulate(n, seed=seed, epsilon=0.1)
        ev = evaluate(_inputs(world), reg, [lab.strong], cfg, ground_truth=world.ground_truth, scorers=scorer)
        truth = ev.summary["ground_truth"]["policies"]
        gap = truth[lab.strong] - truth["logging"]
        # the trained policy's greedy choice differs from the logging policy's on >= 30% of requests
        gt = world.ground_truth
        logging_greedy = gt.loc[gt.groupby("request_id", sort=False)["logging_prob"].idxmax(), ["request_id", "message_id"]]
        greedy = pd.Series(ev.logged.candidate_ids[np.arange(ev.logged.n), ev.policies[lab.strong].greedy],
                           index=ev.logged.frame["request_id"].to_numpy())
        lg = logging_greedy.set_index("request_id")["message_id"].reindex(greedy.index)
        assert (greedy != lg).mean() >= 0.3
        for name in errors:
            e = ev.results[lab.strong][name]
            errors[name].append((e.estimate - truth[lab.strong]) / gap)
            covered[name] += e.ci_low <= truth[lab.strong] <= e.ci_high
    # at 100k decisions the bar is a quarter of the true gap (model − logging); the noise shrinks with √n
    bar = 0.25 * np.sqrt(100_000 / n)
    for name, rel in errors.items():
        assert np.median(np.abs(rel)) <= bar, (name, rel)
        assert abs(np.mean(rel)) <= bar / np.sqrt(len(seeds)), (name, rel)  # no systematic bias either
        assert covered[name] >= 0.8 * len(seeds), (name, covered[name])


def test_models_promote_if_better_cli_promotes_a_winner_and_refuses_a_loser(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import retention

    root = tmp_path / "registry"
    shutil.copytree(lab.registry, root)
    f = lab.files
    data = ["--decisions", str(f["decisions"]), "--outcomes", str(f["outcomes"]), "--profiles", str(f["profiles"]),
            "--catalog", str(f["catalog"]), "--registry", str(root)]
    Registry(root).promote(lab.weak)
    # the gate's data without --if-better is a forgotten flag, not a plain promotion
    with pytest.raises(SystemExit) as exit_:
        retention.main(["models", "promote", lab.strong, *data])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--decisions, --outcomes, --catalog, --profiles go only with --if-better" in err
    # the strong version reads profile columns: judged without them, it would be judged on other choices
    no_profiles = [a for i, a in enumerate(data) if "--profiles" not in data[max(i - 1, 0):i + 1]]
    assert retention.main(["models", "promote", lab.strong, "--if-better", *no_profiles]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retention models promote: error: model ") and "give --profiles, or" in err
    assert Registry(root).current() == lab.weak
    assert retention.main(["models", "promote", lab.strong, "--if-better", *data]) == 0
    assert Registry(root).current() == lab.strong
    assert retention.main(["models", "promote", lab.weak, "--if-better", *data]) != 0
    said = capsys.readouterr()
    assert "not promoted" in said.out + said.err
    assert Registry(root).current() == lab.strong
