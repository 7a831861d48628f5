"""Online experiments: sticky balanced assignment, the confidence sequence's coverage, planning, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import retention
from models.experiment import (
    Experiment,
    ExperimentError,
    assign_arm,
    mixture_probabilities,
    read_experiment,
    write_experiment,
)
from models.registry import Registry
from serving.catalog import Catalog
from serving.settings import DEMO_CATALOG
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
    assert retention.main(["experiment", "plan", "--baseline-rate", "0", "--lift", "0.01", "--traffic", "9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "baseline-rate" in err


def test_experiment_file_is_validated(tmp_path: Path) -> None:
    write_experiment(tmp_path, Experiment("exp-1", "v1", 0.2))
    assert read_experiment(tmp_path) == Experiment("exp-1", "v1", 0.2)
    (tmp_path / "experiment.json").write_text(json.dumps({"experiment_id": "e", "challenger": "v", "share": 1.5}))
    with pytest.raises(ExperimentError, match="share"):
        read_experiment(tmp_path)
    with pytest.raises(ExperimentError, match="experiment id"):
        Experiment("no spaces", "v1", 0.5)


def _world(catalog: Catalog, *, n: int, lift: float, seed: int, experiment_id: str = "exp-t") -> tuple[pd.DataFrame, pd.DataFrame]:
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
        "experiment_id": experiment_id, "arm": arms,
    })
    p = np.where(np.array(arms) == "challenger", 0.3 + lift, 0.3)
    churn = rng.random(n) >= p
    out = pd.DataFrame({"original_transaction_id": np.array(ids)[churn], "event": "cancelled",
                        "at": dec["signed_date"].to_numpy()[churn] + 1000})
    # a late renewal closes every window as of 40 days after the first decision
    out = pd.concat([out, pd.DataFrame({"original_transaction_id": ["someone-else"], "event": ["renewed"],
                                        "at": [t0 + 40 * DAY + n * 60_000]})])
    return dec, out


def test_status_counts_open_windows_as_pending_not_churn() -> None:
    cat = Catalog.load(DEMO_CATALOG)
    dec, out = _world(cat, n=400, lift=0.0, seed=1)
    s = experiment_status(dec, out, cat, experiment_id="exp-t", challenger="v2", share=0.5,
                          as_of_ms=int(dec["signed_date"].min()) + 30 * DAY + 100 * 60_000)
    labelled = sum(a.labelled for a in s.arms)
    pending = sum(a.pending for a in s.arms)
    assert pending > 0 and labelled + pending == 400
    assert all(a.censored == 0 for a in s.arms)


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
    dec, out = _world(cat, n=600, lift=0.0, seed=5)
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
    dec, out = _world(cat, n=3000, lift=0.3, seed=6)
    write_table(dec, tmp_path / "d1.parquet")
    write_table(out, tmp_path / "o1.parquet")
    args = ["--registry", str(reg_dir), "--decisions", str(tmp_path / "d1.parquet"), "--outcomes",
            str(tmp_path / "o1.parquet")]
    assert retention.main(["experiment", "status", *args, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["decision"] == "challenger wins" and status["lower"] > 0
    assert retention.main(["experiment", "promote", *args]) == 0
    assert Registry(reg_dir).current() == challenger
    exp = read_experiment(reg_dir)
    assert exp is not None and not exp.active
