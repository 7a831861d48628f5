"""Training: the gap figure on the simulator, sklearn/ONNX parity, the train and score CLIs, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import retention
from models.features import Featurizer
from models.registry import Registry, is_version_id
from models.scoring import Scorer
from training.data_io import read_table, write_table
from training.fit import check_parity, export_onnx
from training.simulate import simulate, write_world
from training.train import TrainResult, train_demo_model, train_frames, values_after, write_result

# The bar is 0.9 of the static-to-oracle gap at 100,000 decisions (measured by hand: see
# README-model). This test runs at 30,000 to stay fast: the messages the logging policy shows only
# when exploring then have under a third of the rows, so the bar is lower. Over simulator seeds
# 0-2 the context model captured 0.88-0.93 and the message-only model -0.12 (worse than the best
# static message), so 0.8 and 0.5 leave room for numeric noise without letting a broken model pass.
N_GAP = 30_000
GAP_BAR_SMALL = 0.8
CONTEXT_FREE_BAR = 0.5


@pytest.fixture(scope="module")
def world30() -> Any:
    return simulate(N_GAP, seed=0)


@pytest.fixture(scope="module")
def trained30(world30: Any) -> TrainResult:
    w = world30
    return train_frames(w.decisions, w.outcomes, w.profiles, w.catalog, ground_truth=w.ground_truth)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3,000-decision world written as Parquet, plus a CSV copy of the decisions."""
    folder = tmp_path_factory.mktemp("world")
    paths = write_world(simulate(3000, seed=1), folder)
    paths["decisions_csv"] = folder / "decisions.csv"
    write_table(read_table(paths["decisions"]), paths["decisions_csv"])
    return paths


# ---- the gap figure ---------------------------------------------------------------------------
def test_learned_policy_captures_most_of_the_gap(trained30: TrainResult) -> None:
    g = trained30.gap
    assert g is not None and g["ground_truth_requests"] == N_GAP
    assert g["v_oracle"] > g["v_static"]
    assert g["gap_captured"] >= GAP_BAR_SMALL, g
    assert trained30.manifest["metrics"]["gap_captured"] == g["gap_captured"]


def test_model_that_ignores_the_context_falls_short(world30: Any) -> None:
    w = world30
    r = train_frames(w.decisions, w.outcomes, w.profiles, w.catalog, ground_truth=w.ground_truth, context=False)
    assert r.gap is not None and r.gap["gap_captured"] < CONTEXT_FREE_BAR, r.gap
    assert r.manifest["context_features"] is False
    # no baseline either: it reads who the subscriber is, so it would bring the context back
    assert r.estimator.baseline is None and not r.manifest["hyperparameters"]["credibility"]["baseline"]["fitted"]


# ---- parity -----------------------------------------------------------------------------------
def test_parity_sklearn_onnx_with_unseen_categories_and_missing_profiles(
    trained30: TrainResult, world30: Any, tmp_path: Path
) -> None:
    assert trained30.parity.passed and trained30.parity.requests_compared > 1000
    reg = Registry(tmp_path)
    version, _ = write_result(trained30, reg)
    scorer = Scorer(reg.load(version))  # what serving runs: one thread, from the registry
    cat = world30.catalog
    fz = Featurizer(trained30.schema, cat.products, cat.messages)
    profiles = world30.profiles.set_index("original_transaction_id")
    decisions = world30.decisions.iloc[:400]
    blocks, rids, values = [], [], []
    for i, d in enumerate(decisions.itertuples()):
        prof: dict[str, Any] | None = profiles.loc[d.original_transaction_id].to_dict()
        locale, env, product = d.user_locale, d.environment, d.product_id
        match i % 5:
            case 1:
                prof = None  # no profile at all
            case 2:
                assert prof is not None
                prof.update(country="ZZ", acquisition_channel="tv", tenure_days=float("nan"), engagement=None)
            case 3:
                locale, env = "pt-BR", "Xcode"  # a language, region and environment the model never saw
            case 4:
                product = "com.example.unseen"
        cands = cat.eligible(d.product_id, d.user_locale) or cat.eligible("com.example.premium.monthly", "en-US")
        X = fz.matrix(product_id=product, user_locale=locale, environment=env, signed_date_ms=d.signed_date,
                      profile=prof, candidates=cands)
        blocks.append(X)
        rids += [d.request_id] * len(cands)
        values += [cat.value_after(m, d.product_id) for m in cands]
    X = np.concatenate(blocks)
    p_sk = trained30.estimator.predict_proba(X)[:, 1]
    p_ox = np.concatenate([scorer.p_stay(b) for b in blocks])
    result = check_parity(p_sk, p_ox, np.array(rids), np.array(values))
    assert result.max_abs_diff <= 1e-5
    assert result.choice_mismatches == 0 and result.requests_compared > 350


def test_near_tied_values_at_a_large_scale_pass_parity(trained30: TrainResult, world30: Any, tmp_path: Path) -> None:
    """Values near 150 whose two best differ by a few float32 ulps are ties, not parity failures.

    An absolute margin (1e-6 of value) took them for real differences: float32 rounding of P moved
    such values by ~1e-5 and refused about 1 retrain in 7 on a 50k-decision world.
    """
    from training.fit import greedy_choices
    from training.train import explode_candidates, featurize, in_catalog, profile_index

    assert trained30.parity.passed
    reg = Registry(tmp_path)
    scorer = Scorer(reg.load(write_result(trained30, reg)[0]))
    fz = Featurizer(trained30.schema, world30.catalog.products, world30.catalog.messages)
    cand = explode_candidates(world30.decisions.iloc[:6000])
    cand = cand[in_catalog(cand["candidate"], world30.catalog)]
    cand = cand[cand.groupby("request_id").cumcount() < 2].reset_index(drop=True)  # two candidates a request
    cand = cand[cand.groupby("request_id")["candidate"].transform("size") == 2].reset_index(drop=True)
    X = featurize(fz, cand, profile_index(world30.profiles), message_col="candidate")
    p_sk = trained30.estimator.predict_proba(X)[:, 1]
    p_ox = scorer.p_stay(X).astype(np.float64)
    rid = cand["request_id"].to_numpy()
    first, second = np.arange(0, len(cand), 2), np.arange(1, len(cand), 2)
    old_rule_mismatches = 0
    for rel in (1e-7, 3e-7, 1e-6):
        values = np.full(len(cand), 150.0)
        # the second candidate's value made to equal the first's within `rel` (sklearn's P): a near tie
        values[second] = 150.0 * p_sk[first] / p_sk[second] * (1 - rel)
        # half the requests get a clear difference instead, so the choice check still has work to do
        values[second[::2]] *= 0.9
        result = check_parity(p_sk, p_ox, rid, values)
        assert result.passed, result
        assert result.requests_compared >= len(first) // 2 - 1
        codes, _ = pd.factorize(rid)
        best_sk, _, margin = greedy_choices(codes, p_sk * values)
        best_ox, _, _ = greedy_choices(codes, p_ox * values)
        old_rule_mismatches += int(((margin > 1e-6) & (best_sk != best_ox)).sum())
    assert old_rule_mismatches > 0  # the near ties are real: float32 breaks some of them the other way


# ---- the CLIs ---------------------------------------------------------------------------------
def train_args(paths: dict[str, Path], registry: Path, *extra: str) -> list[str]:
    return ["train", "--decisions", str(paths["decisions"]), "--outcomes", str(paths["outcomes"]),
            "--profiles", str(paths["profiles"]), "--catalog", str(paths["catalog"]), "--registry", str(registry),
            *extra]


def test_train_cli_writes_a_version_and_prints_its_id_last(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    assert retention.main(train_args(small_files, registry, "--ground-truth", str(small_files["ground_truth"]))) == 0
    out = capsys.readouterr().out.strip().splitlines()
    first = out[-1]
    assert is_version_id(first)
    reg = Registry(registry)
    assert reg.versions() == [first] and reg.current() == first  # the first version becomes current
    assert any(re.match(r"gap captured\s+-?\d+\.\d{3}", line) for line in out)
    m = reg.manifest(first)
    for key in ("version", "created", "featurizer_version", "feature_schema", "feature_schema_sha256",
                "training_data", "metrics", "parity", "onnx_sha256", "library_versions", "hyperparameters"):
        assert key in m, key
    td = m["training_data"]
    assert td["decisions"] == 3000 and td["censored"] > 0
    assert td["retained"] + td["churned"] + td["censored"] == 3000
    assert len(td["date_range"]) == 2 and td["date_range"][0] < td["date_range"][1]
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff"] <= 1e-5
    assert set(m["library_versions"]) >= {"scikit-learn", "skl2onnx", "onnxruntime"}
    assert m["feature_schema"]["profile_categorical"] == ["acquisition_channel", "country"]
    assert (registry / first / "model_card.md").read_text().startswith(f"# Model {first}")

    reg.load(first)  # verifies

    # a second version is not promoted unless asked; CSV input and logreg work too
    assert retention.main(train_args({**small_files, "decisions": small_files["decisions_csv"]}, registry,
                                     "--model", "logreg")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    second = out[-1]
    assert reg.current() == first and reg.versions() == [first, second]
    # the summary's values line up in one column, the registry line's included; a logistic model has no trees
    table = out[out.index(next(line for line in out if line.startswith("decisions"))):-1]
    assert table[-1].startswith("registry") and table[-1].endswith("(not promoted)")
    assert len({len(line) - len(line[line.index("  "):].lstrip()) for line in table}) == 1, table
    assert "fit the model" in "\n".join(table) and "trees" not in "\n".join(table)
    assert reg.manifest(second)["model"] == "logreg"
    assert retention.main(train_args(small_files, registry, "--promote")) == 0
    third = capsys.readouterr().out.strip().splitlines()[-1]
    assert reg.current() == third


def test_score_cli_writes_the_greedy_choice_per_request(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    assert retention.main(train_args(small_files, registry)) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    out = tmp_path / "scored.csv"
    assert retention.main(["score", "--registry", str(registry), "--catalog", str(small_files["catalog"]),
                           "--input", str(small_files["decisions"]), "--profiles", str(small_files["profiles"]),
                           "--output", str(out)]) == 0
    scored = pd.read_csv(out, dtype={"request_id": str, "message_id": str})
    decisions = read_table(small_files["decisions"])
    assert list(scored.columns) == ["request_id", "message_id", "expected_value"]
    assert len(scored) == len(decisions) and set(scored["request_id"]) == set(decisions["request_id"])
    merged = scored.merge(decisions[["request_id", "candidates", "product_id"]], on="request_id")
    assert all(m in c for m, c in zip(merged["message_id"], merged["candidates"], strict=True))
    assert np.isfinite(scored["expected_value"]).all() and (scored["expected_value"] > 0).all()
    # the choice is the argmax of P x value_after among the request's own candidates
    from models.catalog import Catalog

    cat = Catalog.load(small_files["catalog"])
    loaded = Registry(registry).load(version)
    fz, scorer = Featurizer(loaded.schema, cat.products, cat.messages), Scorer(loaded)
    profiles = read_table(small_files["profiles"]).set_index("original_transaction_id")
    for d in merged.merge(decisions[["request_id", "original_transaction_id", "user_locale", "environment",
                                     "signed_date"]], on="request_id").head(50).itertuples():
        cands = [cat.messages[m] for m in d.candidates]
        prof = profiles.loc[d.original_transaction_id].to_dict() if d.original_transaction_id in profiles.index else None
        X = fz.matrix(product_id=d.product_id, user_locale=d.user_locale, environment=d.environment,
                      signed_date_ms=d.signed_date, profile=prof, candidates=cands)
        ev = scorer.p_stay(X) * np.array([cat.value_after(m, d.product_id) for m in cands])
        assert d.message_id == d.candidates[int(np.argmax(ev))]
        assert abs(d.expected_value - ev.max()) < 1e-4 * max(1.0, ev.max())
    assert retention.main(["models", "list", "--registry", str(registry)]) == 0


def test_train_demo_model_promotes_a_version(tmp_path: Path) -> None:
    version = train_demo_model(tmp_path / "reg", n_decisions=3000, seed=2)
    assert Registry(tmp_path / "reg").current() == version


# ---- bad input: one clear line, non-zero exit ------------------------------------------------
def _broken(paths: dict[str, Path], tmp: Path, what: str) -> dict[str, Path]:
    d = read_table(paths["decisions"])
    o = read_table(paths["outcomes"])
    out = dict(paths)
    if what == "missing column":
        d = d.drop(columns=["propensity"])
    elif what == "propensity zero":
        d.loc[5, "propensity"] = 0.0
    elif what == "propensity above one":
        d.loc[7, "propensity"] = 1.5
    elif what == "message not in candidates":
        d.loc[3, "message_id"] = "00000000-0000-4000-8000-000000000000"
    elif what == "no rows after the join":
        o = o.iloc[:0]  # no events and an as-of at the first decision: every window is still open
    elif what == "too few churned":  # the cancellations of three subscribers only
        churn = o["event"].isin(["cancelled", "expired"])
        few = o.loc[churn, "original_transaction_id"].unique()[:3]
        o = o[~churn | o["original_transaction_id"].isin(few)]
    elif what == "unreadable file":
        (tmp / "decisions.parquet").write_bytes(b"PAR1 this is not parquet")
        out["decisions"] = tmp / "decisions.parquet"
        return out
    elif what == "no such file":
        out["decisions"] = tmp / "absent.parquet"
        return out
    write_table(d, tmp / "decisions.parquet")
    write_table(o, tmp / "outcomes.parquet")
    out["decisions"], out["outcomes"] = tmp / "decisions.parquet", tmp / "outcomes.parquet"
    return out


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("missing column", "lacks column(s) propensity"),
        ("propensity zero", "propensity 0.0 is outside (0, 1]"),
        ("propensity above one", "propensity 1.5 is outside (0, 1]"),  # a plain number, not np.float64(1.5)
        ("message not in candidates", "not in its own candidates"),
        ("no rows after the join", "no rows after the join"),
        ("too few churned", "churned: training needs at least 10 of each, and hundreds for a useful model"),
        ("unreadable file", "cannot read"),
        ("no such file", "no such file"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, expected: str
) -> None:
    paths = _broken(small_files, tmp_path, what)
    extra = ["--as-of", str(int(read_table(small_files["decisions"])["signed_date"].min()))] if "join" in what else []
    code = retention.main(train_args(paths, tmp_path / "registry", *extra))
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retention train: error:") and expected in lines[0], lines
    assert "Traceback" not in captured.err and not (tmp_path / "registry").exists()


def test_an_as_of_before_every_decision_is_refused(small_files: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A time in seconds (a common slip) reads as January 1970: before the data, so refused, not trained on."""
    first_s = int(read_table(small_files["decisions"])["signed_date"].min()) // 1000
    assert retention.main(train_args(small_files, tmp_path / "registry", "--as-of", str(first_s))) == 1
    err = capsys.readouterr().err
    assert err.startswith("retention train: error: --as-of 1970-") and "is before every decision" in err
    assert not (tmp_path / "registry").exists()


def test_a_file_as_the_registry_is_refused_before_the_fit(small_files: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "registry.json"
    taken.write_text("{}\n")
    assert retention.main(train_args(small_files, taken)) == 1
    captured = capsys.readouterr()
    assert captured.err == f"retention train: error: model registry folder {taken} is not a folder\n"
    assert "decisions" not in captured.out and taken.read_text() == "{}\n"  # no summary: nothing was fitted


def test_score_refuses_a_damaged_model(small_files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    registry = tmp_path / "registry"
    assert retention.main(train_args(small_files, registry)) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    manifest_path = registry / version / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["featurizer_version"] = "0"
    manifest_path.write_text(json.dumps(m))
    code = retention.main(["score", "--registry", f"{registry}@{version}", "--catalog", str(small_files["catalog"]),
                           "--input", str(small_files["decisions"]), "--output", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "featurizer version differs" in err[0]


def test_values_after_matches_the_catalog(world30: Any) -> None:
    d = world30.decisions.head(100)
    v = values_after(world30.catalog, d["product_id"], d["message_id"])
    expected = [world30.catalog.value_after(world30.catalog.messages[m], p) for m, p in zip(d["message_id"], d["product_id"], strict=True)]
    np.testing.assert_allclose(v, expected)


def test_train_matured_only_leaves_early_labels_out(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    censored = []
    for extra in ((), ("--matured-only",)):
        registry = tmp_path / f"registry{len(extra)}"
        assert retention.main(train_args(small_files, registry, *extra)) == 0
        version = capsys.readouterr().out.strip().splitlines()[-1]
        censored.append(Registry(registry).manifest(version)["training_data"]["censored"])
    assert censored[1] > censored[0]


# ---- silent bad inputs made loud -----------------------------------------------------------------
def test_logs_without_exploration_warn_and_never_make_a_first_version_current_unasked(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = read_table(small_files["decisions"])
    d["propensity"] = 1.0  # a deterministic rule: every message shown with probability 1
    write_table(d, tmp_path / "rule.parquet")
    paths = {**small_files, "decisions": tmp_path / "rule.parquet"}
    registry = tmp_path / "registry"
    assert retention.main(train_args(paths, registry)) == 0
    captured = capsys.readouterr()
    version = captured.out.strip().splitlines()[-1]
    warnings = [line for line in captured.err.splitlines() if line.startswith("retention train: warning:")]
    assert len(warnings) == 1 and "no exploration" in warnings[0]
    reg = Registry(registry)
    assert reg.versions() == [version] and reg.current() is None  # written, not served
    assert "no exploration" in (registry / version / "model_card.md").read_text()
    assert reg.manifest(version)["training_data"]["no_exploration"] is True
    assert retention.main(train_args(paths, registry, "--promote")) == 0
    assert reg.current() == capsys.readouterr().out.strip().splitlines()[-1]
    # logs that explored: no warning
    assert retention.main(train_args(small_files, tmp_path / "other")) == 0
    assert "warning" not in capsys.readouterr().err


def test_score_refuses_a_profile_model_without_profiles_unless_allowed(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "registry"
    assert retention.main(train_args(small_files, registry)) == 0
    capsys.readouterr()
    base = ["score", "--registry", str(registry), "--catalog", str(small_files["catalog"]),
            "--input", str(small_files["decisions"]), "--output", str(tmp_path / "o.csv")]
    assert retention.main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--profiles" in err[0] and "--allow-missing-profiles" in err[0]
    assert not (tmp_path / "o.csv").exists()
    assert retention.main([*base, "--allow-missing-profiles"]) == 0
    assert (tmp_path / "o.csv").exists()
    # a request given twice (or a time that is none) is refused with its row, not scored once in silence
    import pandas as pd

    d = pd.read_parquet(small_files["decisions"])
    for bad, said in ((pd.concat([d, d.iloc[[3]]], ignore_index=True), "request_id appears more than once"),
                      (d.assign(signed_date=d["signed_date"].where(d.index != 2, 2**62)), "is not a time in ms")):
        bad.to_parquet(tmp_path / "bad.parquet")
        args = [*base, "--allow-missing-profiles"]
        args[args.index("--input") + 1] = str(tmp_path / "bad.parquet")
        assert retention.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "bad.parquet: row " in err[0], err


def test_train_score_and_evaluate_read_the_registry_from_retention_model(
    small_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "from-env"
    monkeypatch.setenv("RETENTION_MODEL", str(registry))
    no_registry = [a for a in train_args(small_files, registry) if a not in ("--registry", str(registry))]
    assert retention.main(no_registry) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    assert Registry(registry).current() == version
    out = tmp_path / "scored.csv"
    assert retention.main(["score", "--catalog", str(small_files["catalog"]), "--input", str(small_files["decisions"]),
                           "--profiles", str(small_files["profiles"]), "--output", str(out)]) == 0
    assert f"with model {version}" in capsys.readouterr().out and out.is_file()
    assert retention.main(["evaluate", "--decisions", str(small_files["decisions"]), "--outcomes",
                           str(small_files["outcomes"]), "--catalog", str(small_files["catalog"]),
                           "--profiles", str(small_files["profiles"]),
                           "--out", str(tmp_path / "ev"), "--versions", "latest"]) == 0
    assert version in capsys.readouterr().out


# ---- the model choice by cross-validated policy value ---------------------------------------------
def test_greedy_dr_terms_by_hand() -> None:
    from training.fit import greedy_dr_terms

    # decision 0: candidates a (shown, μ 0.5) and b; decision 1: candidates a and b (b shown, μ 0.25)
    p = np.array([0.2, 0.5, 0.4, 0.1])
    value = np.array([10.0, 10.0, 10.0, 10.0])
    owner = np.array([0, 0, 1, 1])
    shown = np.array([True, False, False, True])
    rewards = np.array([10.0, 0.0])
    mu = np.array([0.5, 0.25])
    t = greedy_dr_terms(p, value, owner, shown, rewards, mu)
    # greedy: b for decision 0 (not shown: the model's 5 alone), a for decision 1 (not shown: 4)
    assert t == pytest.approx([5.0, 4.0])
    t = greedy_dr_terms(np.array([0.6, 0.5, 0.4, 0.9]), value, owner, shown, rewards, mu)
    # now the shown message is the greedy one in both: r̂ + (r − r̂) / μ
    assert t == pytest.approx([6.0 + (10.0 - 6.0) / 0.5, 9.0 + (0.0 - 9.0) / 0.25])


def test_the_model_is_chosen_by_cross_validated_policy_value(trained30: TrainResult) -> None:
    sel = trained30.manifest["hyperparameters"]["selection"]
    values = sel["values"]
    assert set(values) == {"hgb", "hgb-plain", "hgb-smooth"}
    assert sel["chosen"] in values and all(np.isfinite(v) for v in values.values())
    assert trained30.manifest["context_features"] is True
    assert "cross-validated doubly robust" in sel["rule"] and "Chosen: " in trained30.card
    # the summary shows why: each later choice's difference to the first with its standard error, and the rule
    from training.train import summary_table

    line = next(ln for ln in summary_table(trained30).splitlines() if ln.startswith("chosen"))
    se = sel["se_vs_first"]
    for name in ("hgb-plain", "hgb-smooth"):
        assert f"{name} {values[name]:.3f} ({values[name] - values['hgb']:+.3f} ± {se[name]:.3f})" in line
    assert line.split()[1] == sel["chosen"] and "ahead by more than 1 standard error" in line
    ahead = {k: values[k] - values["hgb"] - se[k] for k in ("hgb-plain", "hgb-smooth")}
    best = max(ahead, key=ahead.get)  # type: ignore[arg-type]
    assert sel["chosen"] == (best if ahead[best] > 0 else "hgb")


# ---- the message factors: act on what the logs back ----------------------------------------------
def test_the_baseline_learns_the_logging_policy_s_own_choice_and_only_from_decisions_that_show_it() -> None:
    """b(x, m): whom the logging policy shows which message, learned from decisions whose shown message had
    probability >= 0.5; exploration rows (here 30% of the decisions) do not teach it, a message it never
    chose gets b = 0, and a logging policy without a dominant choice gives no baseline at all."""
    from training.fit import fit_baseline

    rng = np.random.default_rng(0)
    n, k, eps = 4000, 3, 0.3
    young = rng.random(n) < 0.4  # the rule: message 1 for young subscribers, message 0 for the others
    rule = np.where(young, 1, 0)
    shown_code = np.where(rng.random(n) < eps, rng.integers(0, k, n), rule)
    propensity = np.where(shown_code == rule, 1 - eps + eps / k, eps / k)
    owner = np.repeat(np.arange(n), k)
    code = np.tile(np.arange(k), n)
    X = np.column_stack([young[owner], *(code == j for j in range(k))]).astype(np.float32)
    shown = code == shown_code[owner]
    base, ev = fit_baseline(X, owner, shown, propensity, code, k + 1, seed=0)
    assert base is not None and ev["fitted"] and ev["decisions"] == int((propensity >= 0.5).sum())
    b = base.b(X, code)
    is_rule = code == rule[owner]
    # learned from the rule's own decisions only: near 1 and 0 (the 30% exploration rows would pull both to ~0.8 / ~0.1)
    assert b[is_rule].min() > 0.95 and b[~is_rule].max() < 0.05
    # message 2 (never the rule's choice) and message 3 (<other>, never a candidate) are not vouched for
    assert base.messages.tolist() == [True, True, False, False]
    assert base.b(X[:3], np.array([3, 3, 3])).tolist() == [0.0, 0.0, 0.0]
    # a uniform logging policy has no own choice, not even over two candidates (probability 0.5 each)
    two = code < 2
    owner2 = owner[two]
    base, ev = fit_baseline(X[two], owner2, (code[two] == rng.integers(0, 2, n)[owner2]), np.full(n, 0.5),
                            code[two], k + 1, seed=0)
    assert base is None and not ev["fitted"] and ev["decisions"] == 0


def test_credibility_factors_by_hand() -> None:
    from training.fit import credibility_factors

    # 1,000 decisions, each with candidates a (code 0) and b (code 1); the model says P 0.1 × value 10 = 1
    # for both. a was shown in 900 decisions (μ 0.9), b in 100 (μ 0.1); both kept 10% of the subscribers.
    n = 1000
    owner = np.repeat(np.arange(n), 2)
    code = np.tile([0, 1], n)
    shown_b = np.zeros(n, dtype=bool)
    shown_b[::10] = True
    shown = np.column_stack([~shown_b, shown_b]).ravel()
    mu = np.where(shown_b, 0.1, 0.9)
    rewards = np.zeros(n)
    rewards[np.flatnonzero(~shown_b)[:90]] = 10.0  # a kept 90 of its 900
    rewards[np.flatnonzero(shown_b)[:10]] = 10.0  # b kept 10 of its 100
    p = np.full(2 * n, 0.1)
    value = np.full(2 * n, 10.0)
    f0, stats = credibility_factors(p, value, code, owner, shown, rewards, mu, c=0.0, n_messages=3)
    # without pessimism the factor is the doubly robust mean over the model's mean: here both are 1
    assert stats["model_mean"][:2] == pytest.approx([1.0, 1.0])
    assert stats["dr_mean"][:2] == pytest.approx([1.0, 1.0])
    assert f0[:2] == pytest.approx([1.0, 1.0]) and f0[2] == 0.0  # no decision had message 2: factor 0
    f1, stats = credibility_factors(p, value, code, owner, shown, rewards, mu, c=2.0, n_messages=3)
    # pessimism of 2 × the squared relative standard error (D = 1 here): a, known to about ±10%, loses about 2%;
    # b, shown a tenth as often with ten times the weight (about ±30%), loses about 18%
    se = stats["se"]
    assert f1[0] == pytest.approx(1.0 - 2.0 * se[0] ** 2) and f1[1] == pytest.approx(1.0 - 2.0 * se[1] ** 2)
    assert 0.09 < se[0] < 0.11 and 0.28 < se[1] < 0.32
    assert 0.97 < f1[0] < 0.99 and 0.78 < f1[1] < 0.86
    # the penalty falls as the square of the standard error: 100 times the decisions, a hundredth of it
    big = np.arange(100 * 2 * n) % (2 * n)
    grow = np.repeat(np.arange(100), 2 * n) * n
    fb, sb = credibility_factors(p[big], value[big], code[big], owner[big] + grow, shown[big],
                                 np.tile(rewards, 100), np.tile(mu, 100), c=2.0, n_messages=3)
    assert sb["se"][:2] == pytest.approx(se[:2] / 10, rel=0.01)
    assert 1.0 - fb[:2] == pytest.approx((1.0 - f1[:2]) / 100, rel=0.02)
    # the factors do not depend on the unit of value: ten times the values, the same factors
    f10, s10 = credibility_factors(p, 10.0 * value, code, owner, shown, 10.0 * rewards, mu, c=2.0, n_messages=3)
    assert f10 == pytest.approx(f1) and s10["dr_mean"][:2] == pytest.approx([10.0, 10.0])
    # a message that loses value (D < 0: an upgrade most leave) gets factor 0, however uncertain
    fneg, sneg = credibility_factors(p, value, code, owner, shown, np.where(rewards > 0, -rewards, 0.0), mu,
                                     c=2.0, n_messages=3)
    assert sneg["dr_mean"][1] < 0 and fneg[1] == 0.0
    assert credibility_factors(p, value, code, owner, shown, np.where(rewards > 0, -rewards, 0.0), mu,
                               c=50.0, n_messages=3)[0][1] == 0.0  # the penalty never turns a loss into a gain
    # a message whose pessimistic value is at or below zero keeps a thousandth of its mean: ranked below the rest
    f3, _ = credibility_factors(p, value, code, owner, shown, rewards, mu, c=20.0, n_messages=3)
    assert f3[1] == pytest.approx(1e-3) and f3[0] == pytest.approx(1.0 - 20.0 * se[0] ** 2) and f3[0] > f3[1]


@pytest.fixture(scope="module")
def apple_small() -> Any:
    return simulate(4000, seed=1, epsilon=0.05, preset="apple-segments")


@pytest.fixture(scope="module")
def trained_apple_small(apple_small: Any) -> TrainResult:
    w = apple_small
    return train_frames(w.decisions, w.outcomes, w.profiles, w.catalog, ground_truth=w.ground_truth, seed=1)


def test_with_little_data_the_policy_does_not_chase_a_rarely_shown_valuable_message(
    trained_apple_small: TrainResult, apple_small: Any, tmp_path: Path
) -> None:
    """4,000 decisions at Apple's effect sizes: the upgrade was shown a handful of times.

    The model alone prices it at the average P(stay) and, with its higher value, would show it
    to many; the served policy (ONNX, from the registry) does not, and earns what the best single
    message earns (the static-to-oracle gap captured is about zero, where the model alone loses).
    """
    from training.fit import onnx_session
    from training.train import greedy_table, profile_index

    w, r = apple_small, trained_apple_small
    roles = w.ground_truth.drop_duplicates("message_id").set_index("message_id")["role"]
    upgrade = roles.index[roles == "dearer_plan"][0]
    assert (w.decisions["message_id"] == upgrade).sum() < 20  # rarely shown by the logging policy
    fz = Featurizer(r.schema, w.catalog.products, w.catalog.messages)
    prof = profile_index(w.profiles)
    served = greedy_table(onnx_session(r.onnx_bytes), fz, w.decisions, prof, w.catalog)
    model_alone = greedy_table(onnx_session(export_onnx(r.estimator.estimator, r.schema.n_features)), fz,
                               w.decisions, prof, w.catalog)
    picks_served = served.loc[served["greedy"], "message_id"]
    picks_alone = model_alone.loc[model_alone["greedy"], "message_id"]
    assert (picks_alone == upgrade).mean() > 0.05
    assert (picks_served == upgrade).sum() == 0
    assert r.gap is not None and r.gap["gap_captured"] > -0.05, r.gap
    # the served policy is the one registered: the factors are in the manifest
    factors = r.manifest["hyperparameters"]["credibility"]["factors"]
    assert factors[upgrade] < factors[r.gap["static_message"]]


def test_the_message_factors_are_in_the_onnx_graph(trained_apple_small: TrainResult, apple_small: Any,
                                                   tmp_path: Path) -> None:
    """Serving's P(stay) is the model's times the row's factor, baseline included: in float32, as sklearn computes it.

    The factor is the message's pessimistic one, moved to 1 where the logging policy's own choice for
    this subscriber is the message (b, the baseline classifier's probability).
    """
    r, w = trained_apple_small, apple_small
    reg = Registry(tmp_path)
    scorer = Scorer(reg.load(write_result(r, reg)[0]))
    fz = Featurizer(r.schema, w.catalog.products, w.catalog.messages)
    own = w.decisions[w.decisions["propensity"] >= 0.5]  # decisions that showed the logging policy's own choice
    d = own.iloc[0]
    prof = w.profiles.set_index("original_transaction_id").loc[d.original_transaction_id].to_dict()
    cands = tuple(w.catalog.messages[m] for m in d.candidates)
    X = fz.matrix(product_id=d.product_id, user_locale=d.user_locale, environment=d.environment,
                  signed_date_ms=d.signed_date, profile=prof, candidates=cands)
    cred = r.manifest["hyperparameters"]["credibility"]
    assert cred["baseline"]["fitted"] and cred["baseline"]["mean_b_shown"] > 0.9 > 0.1 > cred["baseline"]["mean_b_not_shown"]
    factors = np.array([cred["factors"][m] for m in d.candidates])
    assert r.estimator.baseline is not None
    b = r.estimator.baseline.model.predict_proba(X)[:, 1]
    learned = np.array([r.estimator.baseline.messages[list(cred["factors"]).index(m)] for m in d.candidates])
    expected = r.estimator.estimator.predict_proba(X)[:, 1] * (factors + b * learned * (1.0 - factors))
    assert scorer.p_stay(X) == pytest.approx(expected, rel=1e-5, abs=1e-8)  # the graph's factor is float32
    # the logging policy's own choice keeps (nearly) the model's P(stay); the other messages their factors
    shown = list(d.candidates).index(d.message_id)
    assert b[shown] > 0.9 and np.delete(b, shown).max() < 0.1
    assert len(set(np.round(np.delete(factors, shown), 6))) > 1  # the factors differ
    assert f"Baseline: the logging policy's own choice, learned from {cred['baseline']['decisions']:,} decisions" in r.card
    # a message added to the catalog after training (<other> to the model) is vouched for by nothing: whatever
    # the baseline's trees say about such a row, its served P(stay) stays 0, as its factor is
    import msgspec

    shown_msg = w.catalog.messages[d.message_id]
    new = msgspec.structs.replace(shown_msg, messageIdentifier="added-after-training")
    X_new = fz.matrix(product_id=d.product_id, user_locale=d.user_locale, environment=d.environment,
                      signed_date_ms=d.signed_date, profile=prof, candidates=(*cands, new))
    assert cred["factors"]["<other>"] == 0.0 and X_new[-1, r.estimator.columns[-1]] == 1.0
    assert r.estimator.baseline_shift()[-1] == 0.0 and not r.estimator.baseline.messages[-1]
    assert scorer.p_stay(X_new)[-1] == 0.0
