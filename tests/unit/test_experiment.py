"""Online experiments: sticky balanced assignment, the confidence sequence's coverage, planning, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import retention
from models.catalog import DEMO_CATALOG, Catalog
from models.experiment import (
    Experiment,
    ExperimentError,
    assign_arm,
    mixture_probabilities,
    read_experiment,
    write_experiment,
)
from models.registry import Registry
from training.experiment import aipw_terms, confidence_sequence, experiment_status, plan_experiment

DAY = 86_400_000


def test_assignment_is_sticky_and_balanced_over_200k_subscribers() -> None:
    rng = np.random.default_rng(20261130)
    ids = [str(x) for x in rng.integers(10**14, 10**15, size=200_000)]
    for share in (0.5, 0.1):
        arms = [assign_arm("exp-a", i, share) for i in ids]
        realized = sum(a == "challenger" for a in arms) / len(ids)
        assert abs(realized - share) < 0.003, (share, realized)
        # the same subscriber always lands in the same arm
        assert [assign_arm("exp-a", i, share) for i in ids[:2000]] == arms[:2000]
    # another experiment id reshuffles: about half of the challenger arm moves
    a = np.array([assign_arm("exp-a", i, 0.5) == "challenger" for i in ids[:20_000]])
    b = np.array([assign_arm("exp-b", i, 0.5) == "challenger" for i in ids[:20_000]])
    assert 0.45 < float(np.mean(a == b)) < 0.55


def test_mixture_is_the_share_weighted_sum() -> None:
    p = mixture_probabilities([0.9, 0.05, 0.05], [0.05, 0.9, 0.05], 0.25)
    assert p == pytest.approx([0.75 * 0.9 + 0.25 * 0.05, 0.75 * 0.05 + 0.25 * 0.9, 0.05])
    assert sum(p) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mixture_probabilities([1.0], [0.5, 0.5], 0.5)


@pytest.mark.parametrize("level,rate,value", [(0.9, 0.3, 10.0), (0.9, 0.02, 60.0), (0.95, 0.3, 10.0)])
def test_confidence_sequence_covers_under_100_looks(level: float, rate: float, value: float) -> None:
    """500 experiments with no true difference, each read 100 times: the sequence must contain 0 at every
    look in at least `level` of them (a z-test read 100 times would fail far more often)."""
    rng = np.random.default_rng(7)
    n, experiments = 6000, 500
    looks = np.linspace(60, n, 100).astype(int)
    z_test_misses = misses = 0
    for _ in range(experiments):
        z = rng.random(n) < 0.5
        y = (rng.random(n) < rate) * value
        psi = aipw_terms(z, y, 0.5)
        states = confidence_sequence(psi, 1 - level, 2000, looks)
        misses += any(s.lower > 0 or s.upper < 0 for s in states)
        zq = 1.6449 if level == 0.9 else 1.96
        z_test_misses += any(abs(s.estimate) > zq * s.sd / np.sqrt(s.n) for s in states)
    assert 1 - misses / experiments >= level
    assert 1 - z_test_misses / experiments < level  # the naive test read daily does not hold its level


def test_repeat_visits_that_share_an_outcome_keep_the_level_with_subscriber_groups() -> None:
    """Subscribers who open the cancel page about 3 times each, one arm and one outcome per subscriber (a
    label window covers their visits), no true difference, read 50 times: with the subscribers as groups the
    95% sequence contains 0 at every look in at least 95% of 300 experiments; treating each visit as
    independent understates the spread and calls a winner far more often."""
    rng = np.random.default_rng(11)
    experiments, subscribers, level = 300, 1500, 0.95
    looks = np.linspace(300, 4000, 50).astype(int)
    misses = {"grouped": 0, "per visit": 0}
    for _ in range(experiments):
        visits = 1 + rng.poisson(2.0, subscribers)
        sub = np.repeat(np.arange(subscribers), visits)
        order = np.argsort(rng.random(len(sub)), kind="stable")  # visits interleave in time
        sub = sub[order][: looks[-1]]
        z = (rng.random(subscribers) < 0.5)[sub]
        y = (rng.random(subscribers) < 0.3)[sub] * 10.0
        psi = aipw_terms(z, y, 0.5)
        for name, groups in (("grouped", sub), ("per visit", None)):
            states = confidence_sequence(psi, 1 - level, 2000, looks, groups=groups)
            misses[name] += any(s.lower > 0 or s.upper < 0 for s in states)
    assert 1 - misses["grouped"] / experiments >= level, misses
    assert 1 - misses["per visit"] / experiments < level - 0.03, misses


def test_a_subscriber_seen_three_times_counts_as_one_with_three_times_the_weight() -> None:
    """Each term repeated by the same subscriber three times in a row: the grouped sd is exactly √3 times the sd of
    the distinct terms (three visits carry the information of one), the per-visit sd about the same as theirs."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=400) * 7.0
    psi, groups = np.repeat(x, 3), np.repeat([f"sub-{i}" for i in range(400)], 3)
    grouped = confidence_sequence(psi, 0.05, 1000, groups=groups)[0]
    assert grouped.sd == pytest.approx(np.sqrt(3.0) * np.std(x, ddof=1), rel=1e-9)
    assert confidence_sequence(psi, 0.05, 1000)[0].sd == pytest.approx(np.std(x, ddof=1), rel=2e-3)


def test_groups_of_one_give_the_plain_sequence() -> None:
    rng = np.random.default_rng(3)
    psi = aipw_terms(rng.random(500) < 0.5, (rng.random(500) < 0.2) * 30.0, 0.5)
    plain = confidence_sequence(psi, 0.05, 300, np.array([50, 500]))
    grouped = confidence_sequence(psi, 0.05, 300, np.array([50, 500]), groups=np.arange(500)[::-1])
    for a, b in zip(plain, grouped, strict=True):
        assert b.sd == pytest.approx(a.sd, rel=1e-12) and b.lower == pytest.approx(a.lower, rel=1e-12)


def test_plan_at_apples_effect_sizes_finds_the_lift_with_the_stated_power() -> None:
    plan = plan_experiment(0.0171, 0.014, 2000.0)
    assert plan.decisions_median is not None and plan.decisions_power is not None
    assert plan.decisions_median < plan.decisions_power
    assert plan.decisions_fixed < plan.decisions_power  # anytime validity costs samples
    # simulate experiments with the true lift, stopping at the planned count: >= 80% conclude by then
    rng = np.random.default_rng(3)
    n = plan.decisions_power
    looks = np.linspace(100, n, 50).astype(int)
    found = 0
    for _ in range(200):
        z = rng.random(n) < 0.5
        y = (rng.random(n) < np.where(z, 0.0171 + 0.014, 0.0171)).astype(float)
        states = confidence_sequence(aipw_terms(z, y, 0.5), 0.05, plan.decisions_fixed, looks)
        found += any(s.lower > 0 for s in states)
    assert found / 200 >= 0.8
    with pytest.raises(ValueError, match="baseline-rate"):
        plan_experiment(1.5, 0.01, 100)


def test_plan_cli_shows_the_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    assert retention.main(["experiment", "plan", "--baseline-rate", "0.0247", "--lift", "0.055",
                           "--traffic", "500/day"]) == 0
    out = capsys.readouterr().out
    assert "sigma = sqrt(p1(1-p1)/S + p0(1-p0)/(1-S))" in out and "days" in out and "z-test" in out
    assert retention.main(["experiment", "plan", "--baseline-rate", "0", "--lift", "0.01", "--traffic", "9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "baseline-rate" in err and err.startswith("retention experiment plan: error: ")
    # values no plan can mean: a usage error, not a 300-digit count or a division by zero
    for flag, value, said in (("--lift", "1e-300", "at least 0.00001"), ("--traffic", "1e300", "from 1 to"),
                              ("--traffic", "0.0001", "from 1 to"), ("--share", "1e-300", "from 0.001 to 0.999")):
        args = {"--baseline-rate": "0.017", "--lift": "0.014", "--traffic": "1000", flag: value}
        assert retention.main(["experiment", "plan", *[x for kv in args.items() for x in kv]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err


def test_experiment_file_is_validated(tmp_path: Path) -> None:
    write_experiment(tmp_path, Experiment("exp-1", "v1", 0.2))
    assert read_experiment(tmp_path) == Experiment("exp-1", "v1", 0.2)
    (tmp_path / "experiment.json").write_text(json.dumps({"experiment_id": "e", "challenger": "v", "share": 1.5}))
    with pytest.raises(ExperimentError, match="share"):
        read_experiment(tmp_path)
    with pytest.raises(ExperimentError, match="experiment id"):
        Experiment("no spaces", "v1", 0.5)


def _world(catalog: Catalog, *, n: int, lift: float, seed: int, experiment_id: str = "exp-t",
           challenger: str = "v2") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decisions of one experiment and their outcomes: the challenger arm keeps `lift` more subscribers."""
    rng = np.random.default_rng(seed)
    product = next(iter(catalog.products))
    message = catalog.default_for(product, "en-US") or next(iter(catalog.messages.values()))
    t0 = 1_700_000_000_000
    ids = [f"otid-{i}" for i in range(n)]
    arms = [assign_arm(experiment_id, i, 0.5) for i in ids]
    dec = pd.DataFrame({
        "request_id": [f"r{i}" for i in range(n)], "original_transaction_id": ids, "product_id": product,
        "user_locale": "en-US", "environment": "Sandbox", "signed_date": t0 + np.arange(n) * 60_000,
        "candidates": [[message.messageIdentifier]] * n, "message_id": message.messageIdentifier,
        "propensity": 1.0, "model_version": "v", "policy": "ml:epsilon-greedy",
        # as the server logs them and the export writes them: JSON text in policy_params
        "policy_params": [json.dumps({"epsilon": 0.05, "experiment_id": experiment_id, "arm": a,
                                      "challenger_share": 0.5, "challenger_version": challenger}) for a in arms],
    })
    p = np.where(np.array(arms) == "challenger", 0.3 + lift, 0.3)
    churn = rng.random(n) >= p
    out = pd.DataFrame({"original_transaction_id": np.array(ids)[churn], "event": "cancelled",
                        "at": dec["signed_date"].to_numpy()[churn] + 1000})
    # a late renewal closes every window as of 40 days after the first decision
    out = pd.concat([out, pd.DataFrame({"original_transaction_id": ["someone-else"], "event": ["renewed"],
                                        "at": [t0 + 40 * DAY + n * 60_000]})])
    return dec, out


def test_status_leaves_apples_choices_out_of_the_arms() -> None:
    cat = Catalog.load(DEMO_CATALOG)
    dec, out = _world(cat, n=400, lift=0.0, seed=2)
    dec.loc[dec.index[:40], "policy"] = "apple_fallback"
    s = experiment_status(dec, out, cat, experiment_id="exp-t", challenger="v2", share=0.5)
    assert sum(a.apple_choice for a in s.arms) == 40
    assert sum(a.labelled for a in s.arms) == 360


def test_status_counts_open_windows_as_pending_not_churn() -> None:
    cat = Catalog.load(DEMO_CATALOG)
    dec, out = _world(cat, n=400, lift=0.0, seed=1)
    s = experiment_status(dec, out, cat, experiment_id="exp-t", challenger="v2", share=0.5,
                          as_of_ms=int(dec["signed_date"].min()) + 30 * DAY + 100 * 60_000)
    labelled = sum(a.labelled for a in s.arms)
    pending = sum(a.pending for a in s.arms)
    assert pending > 0 and labelled + pending == 400
    assert all(a.censored == 0 for a in s.arms)


def test_status_counts_a_returning_subscriber_once_in_the_spread() -> None:
    """The same 600 subscribers, each reaching the cancel page in three months in a row (one arm, and the same
    choice each time: cancel or stay): the interval is about as wide as with one visit each, not √3 narrower
    as it would be if each visit counted as an independent subscriber."""
    cat = Catalog.load(DEMO_CATALOG)
    dec, out = _world(cat, n=600, lift=0.0, seed=5)
    # t_star near these sizes: there the boundary shrinks as 1/√t, so a width compares information
    once = experiment_status(dec, out, cat, experiment_id="exp-t", challenger="v2", share=0.5, t_star=1000)
    month = 35 * DAY
    cancels = out[out["event"] == "cancelled"]
    late = pd.DataFrame({"original_transaction_id": ["someone-else"], "event": ["renewed"],
                         "at": [int(dec["signed_date"].max()) + 3 * month]})
    thrice = pd.concat([dec.assign(request_id=dec["request_id"] + f"-{k}", signed_date=dec["signed_date"] + k * month)
                        for k in range(3)], ignore_index=True)
    out3 = pd.concat([*(cancels.assign(at=cancels["at"] + k * month) for k in range(3)), late], ignore_index=True)
    three = experiment_status(thrice, out3, cat, experiment_id="exp-t", challenger="v2", share=0.5, t_star=1000)
    assert sum(a.labelled for a in three.arms) == 3 * sum(a.labelled for a in once.arms)
    assert once.upper is not None and once.lower is not None and three.upper is not None and three.lower is not None
    width_once, width_three = once.upper - once.lower, three.upper - three.lower
    assert 0.85 * width_once < width_three < 1.1 * width_once  # counted per visit it would be about 0.58 of it


def _registry_with_two_versions(tmp_path: Path, trained_registry: Path) -> tuple[Path, str, str]:
    reg_dir = tmp_path / "reg"
    shutil.copytree(trained_registry, reg_dir)
    reg = Registry(reg_dir)
    cur = reg.current()
    assert cur is not None
    src = reg_dir / cur
    other = "20991231T000000Z-challenger"
    shutil.copytree(src, reg_dir / other)
    man = json.loads((reg_dir / other / "manifest.json").read_text())
    man["version"] = other
    (reg_dir / other / "manifest.json").write_text(json.dumps(man))
    return reg_dir, cur, other


def test_cli_start_status_promote(tmp_path: Path, trained_registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg_dir, cur, challenger = _registry_with_two_versions(tmp_path, trained_registry)
    Registry(reg_dir).load(challenger)  # a valid version of its own
    assert retention.main(["experiment", "start", "--registry", str(reg_dir), "--challenger", challenger,
                           "--share", "0.5", "--id", "exp-t"]) == 0
    assert read_experiment(reg_dir) == Experiment("exp-t", challenger, 0.5, True,
                                                  read_experiment(reg_dir).started_at_ms)  # type: ignore[union-attr]
    assert retention.main(["experiment", "start", "--registry", str(reg_dir), "--challenger", challenger]) == 1
    assert "is running" in capsys.readouterr().err

    cat = Catalog.load(DEMO_CATALOG)
    from training.data_io import write_table

    # no real difference: promote refuses, and the registry keeps its current version
    dec, out = _world(cat, n=600, lift=0.0, seed=5, challenger=challenger)
    write_table(dec, tmp_path / "d0.parquet")
    write_table(out, tmp_path / "o0.parquet")
    args = ["--registry", str(reg_dir), "--decisions", str(tmp_path / "d0.parquet"), "--outcomes",
            str(tmp_path / "o0.parquet")]
    assert retention.main(["experiment", "status", *args]) == 0
    assert "decision: continue" in capsys.readouterr().out
    assert retention.main(["experiment", "promote", *args]) == 1
    assert "not promoted" in capsys.readouterr().err
    assert Registry(reg_dir).current() == cur

    # a large true lift: the sequence leaves zero and promote makes the challenger current
    dec, out = _world(cat, n=3000, lift=0.3, seed=6, challenger=challenger)
    write_table(dec, tmp_path / "d1.parquet")
    write_table(out, tmp_path / "o1.parquet")
    args = ["--registry", str(reg_dir), "--decisions", str(tmp_path / "d1.parquet"), "--outcomes",
            str(tmp_path / "o1.parquet")]
    assert retention.main(["experiment", "status", *args, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["decision"] == "challenger wins" and status["lower"] > 0
    # an experiment other than the registry's is never promoted, whatever its result
    assert retention.main(["experiment", "stop", "--registry", str(reg_dir)]) == 0
    assert retention.main(["experiment", "start", "--registry", str(reg_dir), "--challenger", challenger,
                           "--id", "exp-new"]) == 0
    capsys.readouterr()
    assert retention.main(["experiment", "promote", *args, "--experiment", "exp-t"]) == 1
    out, err = capsys.readouterr()
    assert "challenger wins" in out and "is not the registry's experiment (exp-new)" in err
    assert Registry(reg_dir).current() == cur and read_experiment(reg_dir).active  # type: ignore[union-attr]
    assert retention.main(["experiment", "stop", "--registry", str(reg_dir)]) == 0
    (reg_dir / "experiment.json").write_text(Experiment("exp-t", challenger, 0.5).to_json().decode())
    assert retention.main(["experiment", "promote", *args]) == 0
    assert Registry(reg_dir).current() == challenger
    exp = read_experiment(reg_dir)
    assert exp is not None and not exp.active
    capsys.readouterr()
    assert retention.main(["experiment", "promote", *args]) == 1  # a second promote: the experiment is stopped
    assert "is stopped" in capsys.readouterr().err


# ---- serving: the challenger on live traffic ---------------------------------------------------
@pytest.fixture(scope="module")
def two_model_registry(tmp_path_factory: pytest.TempPathFactory, trained_registry: Path) -> tuple[Path, str, str]:
    """A registry whose current version is the session's model and whose latest is another, different one."""
    from training.train import train_demo_model

    reg_dir = tmp_path_factory.mktemp("exp") / "reg"
    shutil.copytree(trained_registry, reg_dir)
    reg = Registry(reg_dir)
    cur = reg.current()
    assert cur is not None
    challenger = train_demo_model(reg_dir, n_decisions=3000, seed=11)
    reg.promote(cur)
    assert challenger != cur
    return reg_dir, cur, challenger


def _served(client: Any, pki: Any, n: int, prefix: str) -> list[dict[str, Any]]:
    from serving.log_reader import read_decisions
    from tests.conftest import APP_ID

    for i in range(n):
        body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox",
                                       original_transaction_id=f"{prefix}{i:06d}")
        r = client.post("/retention/message", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
    svc = client.app.state.service
    svc.decision_log.flush()
    return [d for d in read_decisions(svc.decision_log.path) if d["original_transaction_id"].startswith(prefix)]


def test_live_experiment_logs_arms_and_exact_mixture_probabilities(
    tmp_path: Path, make_settings: Any, pki: Any, two_model_registry: tuple[Path, str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from litestar.testing import TestClient

    from models.exploration import epsilon_probabilities_list
    from serving.app import create_app
    from serving.snapshot import load_bundle

    src, cur, challenger = two_model_registry
    reg_dir = tmp_path / "reg"
    shutil.copytree(src, reg_dir)
    settings = make_settings(model=str(reg_dir), challenger=challenger, challenger_share=0.3, experiment_id="exp-live",
                             epsilon=0.3)
    cat = Catalog.load(DEMO_CATALOG)
    bundles = {v: load_bundle(str(reg_dir), cat, v) for v in (cur, challenger)}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        rows = _served(client, pki, 120, "31")
        assert len(rows) == 120
        arms = {"current": 0, "challenger": 0}
        for d in rows:
            params = d["policy_params"]
            arm = assign_arm("exp-live", d["original_transaction_id"], 0.3)
            assert params["experiment_id"] == "exp-live" and params["arm"] == arm
            arms[arm] += 1
            # the arm's model chose the message
            assert d["model_version"] == (challenger if arm == "challenger" else cur)
            # the logged probabilities are the exact mixture of both arms' exploration distributions
            X = np.asarray(d["features"], dtype=np.float32)
            after = [cat.value_after(cat.messages[m], d["product_id"]) for m in d["candidates"]]
            per_arm = []
            for v in (cur, challenger):
                p = np.asarray(bundles[v].scorer.p_stay(X), dtype=np.float64)
                per_arm.append(epsilon_probabilities_list([float(a * b) for a, b in zip(p, after, strict=True)], 0.3))
            mix = [0.7 * a + 0.3 * b for a, b in zip(*per_arm, strict=True)]
            assert d["probabilities"] == pytest.approx(mix, rel=1e-6)
            assert d["propensity"] == pytest.approx(mix[d["candidates"].index(d["message_id"])], rel=1e-6)
        assert arms["current"] > 0 and arms["challenger"] > 0

        # the share and the stop hot-reload from the registry's experiment file
        svc = client.app.state.service
        assert retention.main(["experiment", "share", "--registry", str(reg_dir), "0.8"]) == 0
        svc.runtime.check_reload()
        rows = _served(client, pki, 40, "32")
        assert all(d["policy_params"]["challenger_share"] == 0.8 for d in rows)
        assert all(d["policy_params"]["arm"] == assign_arm("exp-live", d["original_transaction_id"], 0.8) for d in rows)
        # status straight from the server's log folder: every decision so far is pending (no outcome yet)
        capsys.readouterr()
        assert retention.main(["experiment", "status", "--registry", str(reg_dir), "--data-dir", settings.data_dir,
                               "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert sum(a["decisions"] for a in status["arms"]) == 160
        assert sum(a["pending"] for a in status["arms"]) == 160 and status["decision"] == "continue"
        assert retention.main(["experiment", "stop", "--registry", str(reg_dir)]) == 0
        svc.runtime.check_reload()
        rows = _served(client, pki, 20, "33")
        assert all("arm" not in d["policy_params"] and d["model_version"] == cur for d in rows)


def test_serve_flags_never_resurrect_or_override_what_the_registry_holds(
    tmp_path: Path, two_model_registry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from serving.snapshot import start_experiment

    src, cur, challenger = two_model_registry
    reg_dir = tmp_path / "reg"
    shutil.copytree(src, reg_dir)
    with pytest.raises(ExperimentError, match="no such version"):
        start_experiment(str(reg_dir), "20000101T000000Z-nope", 0.5)
    with pytest.raises(ExperimentError, match="is the current version"):
        start_experiment(str(reg_dir), cur, 0.5)
    first = start_experiment(str(reg_dir), challenger, 0.2)
    assert first.experiment_id == f"exp-{challenger}" and read_experiment(reg_dir) == first
    assert start_experiment(str(reg_dir), challenger, 0.2) == first  # a second replica with the same flags
    # the share changed at run time: a replica restarted with the old flags keeps the registry's share
    assert retention.main(["experiment", "share", "--registry", str(reg_dir), "0.5"]) == 0
    assert start_experiment(str(reg_dir), challenger, 0.2).share == 0.5
    assert "ignored" in caplog.text
    # another experiment is running: refused
    with pytest.raises(ExperimentError, match="is running"):
        start_experiment(str(reg_dir), challenger, 0.2, "exp-other")
    # stopped: a restart with the same flags does not start it again
    assert retention.main(["experiment", "stop", "--registry", str(reg_dir)]) == 0
    again = start_experiment(str(reg_dir), challenger, 0.2)
    assert not again.active and not read_experiment(reg_dir).active  # type: ignore[union-attr]
    assert "was stopped" in caplog.text


def test_settings_refuse_experiment_flags_without_a_challenger() -> None:
    from serving.settings import Settings

    with pytest.raises(ValueError, match="only with --challenger"):
        Settings(challenger_share=0.3)
    with pytest.raises(ValueError, match="only with --challenger"):
        Settings(experiment_id="exp-x")


def test_promoting_the_challenger_by_hand_ends_the_experiment(tmp_path: Path, two_model_registry: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from serving.snapshot import Runtime

    src, cur, challenger = two_model_registry
    reg_dir = tmp_path / "reg"
    shutil.copytree(src, reg_dir)
    assert retention.main(["experiment", "start", "--registry", str(reg_dir), "--challenger", challenger,
                           "--id", "exp-h"]) == 0
    rt = Runtime(catalog_path=str(DEMO_CATALOG), registry_spec=str(reg_dir))
    snap = rt.load()
    assert snap.experiment is not None and snap.challenger is not None
    # a server whose current pointer now names the challenger serves no experiment (both arms would be one model)
    Registry(reg_dir).promote(challenger)
    rt.check_reload()
    assert rt.snapshot is not None and rt.snapshot.experiment is None
    Registry(reg_dir).promote(cur)
    capsys.readouterr()
    assert retention.main(["models", "promote", challenger, "--registry", str(reg_dir)]) == 0
    assert "stopped experiment exp-h" in capsys.readouterr().out
    exp = read_experiment(reg_dir)
    assert exp is not None and not exp.active


def test_cli_refusals_are_one_line_each(tmp_path: Path, two_model_registry: Any,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src, _, challenger = two_model_registry
    reg_dir = tmp_path / "reg"
    shutil.copytree(src, reg_dir)
    reg = ["--registry", str(reg_dir)]
    cases = [  # a value out of range is a usage error (2); a state that refuses the action is 1
        (["plan", "--baseline-rate", "0.02", "--lift", "0.01", "--traffic", "1000/week"], "--traffic", 2),
        (["plan", "--baseline-rate", "0.02", "--lift", "0.01", "--traffic", "9", "--level", "95"], "--level", 2),
        (["plan", "--baseline-rate", "0.02", "--lift", "0.01", "--traffic", "9", "--horizon-days", "-3"], "horizon", 2),
        (["start", *reg, "--challenger", "nosuchversion"], "--challenger nosuchversion", 1),
        (["stop", *reg], "has no experiment", 1),
        (["status", *reg, "--level", "95"], "--level", 2),
    ]
    for argv, words, code in cases:
        assert retention.main(["experiment", *argv]) == code, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
    with pytest.raises(SystemExit) as exit_:  # an empty value, as from an unset shell variable
        retention.main(["experiment", "start", *reg, "--challenger", challenger, "--id", ""])
    assert exit_.value.code == 2 and "argument --id: is empty" in capsys.readouterr().err
    # a registry with no current version cannot start an experiment (every request would fall back)
    empty = tmp_path / "empty"
    shutil.copytree(src, empty)
    (empty / "current").unlink()
    assert retention.main(["experiment", "start", "--registry", str(empty), "--challenger", "latest"]) == 1
    assert "no current version" in capsys.readouterr().err


def test_stop_twice_and_an_unreadable_file(tmp_path: Path, two_model_registry: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src, _, challenger = two_model_registry
    reg_dir = tmp_path / "reg"
    shutil.copytree(src, reg_dir)
    reg = ["--registry", str(reg_dir)]
    assert retention.main(["experiment", "start", *reg, "--challenger", challenger, "--id", "exp-s"]) == 0
    assert retention.main(["experiment", "stop", *reg]) == 0
    capsys.readouterr()
    assert retention.main(["experiment", "stop", *reg]) == 0
    assert "already stopped" in capsys.readouterr().out
    # hand-edited values of the wrong type are refused, not read as true
    path = reg_dir / "experiment.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "active": "false"}))
    with pytest.raises(ExperimentError, match="active"):
        read_experiment(reg_dir)
    path.write_text("{not json")
    assert retention.main(["experiment", "stop", *reg]) == 0
    assert "set the unreadable experiment file aside" in capsys.readouterr().out
    assert read_experiment(reg_dir) is None
