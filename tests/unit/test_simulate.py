"""The simulated world: deterministic, exact propensities, a real gap to close, labels that read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.catalog import DEMO_CATALOG, Catalog
from training.data_io import read_decisions, read_outcomes, read_profiles, read_table
from training.labels import label_decisions
from training.simulate import (
    DAY_MS,
    World,
    best_static_value,
    choice_value,
    gap_captured,
    logging_value,
    main,
    oracle_value,
    policy_value,
    simulate,
    static_values,
    write_world,
)


@pytest.fixture(scope="module")
def world() -> World:
    return simulate(20_000, seed=7)


def test_same_seed_same_world_other_seed_other_world() -> None:
    a, b, c = simulate(1500, seed=3), simulate(1500, seed=3), simulate(1500, seed=4)
    for name in ("decisions", "outcomes", "profiles", "ground_truth"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert not a.decisions["request_id"].equals(c.decisions["request_id"])
    assert not np.array_equal(a.ground_truth["p_stay"].to_numpy()[:50], c.ground_truth["p_stay"].to_numpy()[:50])


def test_decisions_follow_the_file_format(world: World) -> None:
    d = world.decisions
    assert len(d) == 20_000
    assert d["request_id"].is_unique
    assert ((d["propensity"] > 0) & (d["propensity"] <= 1)).all()
    assert all(m in c for m, c in zip(d["message_id"], d["candidates"], strict=True))
    assert set(d["policy"]) == {"simulated:epsilon-greedy"} and set(d["model_version"]) == {"rules-v0"}
    assert set(d["environment"]) <= {"Production", "Sandbox"}
    span_days = (d["signed_date"].max() - d["signed_date"].min()) / DAY_MS
    assert 50 < span_days <= 61
    assert d["signed_date"].is_monotonic_increasing


def test_candidates_are_the_catalog_eligible_set_with_the_default(world: World) -> None:
    cat = world.catalog
    d = world.decisions
    assert "en-AU" in set(d["user_locale"])  # no exact match in the demo catalog: falls back to en-*
    for (product, locale), cands in d.groupby(["product_id", "user_locale"])["candidates"].first().items():
        expected = [m.messageIdentifier for m in cat.eligible(product, locale)]
        default = cat.default_for(product, locale)
        assert default is not None and default.messageIdentifier in cands
        assert cands[: len(expected)] == expected
    assert set(d["product_id"]) == set(cat.products)


def test_propensities_are_the_exact_epsilon_greedy_mixture() -> None:
    for eps in (0.1, 0.3):
        w = simulate(3000, seed=1, epsilon=eps)
        gt = w.ground_truth
        k = gt.groupby("request_id", sort=False)["message_id"].transform("size").to_numpy()
        p = gt["logging_prob"].to_numpy()
        greedy = np.isclose(p, 1 - eps + eps / k, rtol=0, atol=1e-12)
        explore = np.isclose(p, eps / k, rtol=0, atol=1e-12)
        assert (greedy | explore).all()
        assert (gt.assign(g=greedy).groupby("request_id")["g"].sum() == 1).all()
        # the logged propensity is the shown message's probability
        shown = w.decisions[["request_id", "message_id", "propensity"]].merge(gt, on=["request_id", "message_id"])
        assert len(shown) == len(w.decisions)
        np.testing.assert_allclose(shown["propensity"], shown["logging_prob"], rtol=0, atol=1e-15)


def test_exploration_shows_every_candidate(world: World) -> None:
    shown = set(world.decisions["message_id"])
    offered = {m for c in world.decisions["candidates"] for m in c}
    assert shown == offered
    assert (world.decisions["propensity"] < 0.2).mean() > 0.05  # the ε share shows up


def test_best_static_message_is_well_below_the_oracle(world: World) -> None:
    v_oracle = oracle_value(world.ground_truth)
    v_static, static_id = best_static_value(world.ground_truth)
    assert static_id in world.catalog.messages
    assert v_static <= v_oracle * 0.97
    # and the best message really differs between subscribers
    gt = world.ground_truth.assign(v=world.ground_truth["p_stay"] * world.ground_truth["value_after"])
    best = gt.loc[gt.groupby("request_id", sort=False)["v"].idxmax(), "message_id"]
    assert best.value_counts(normalize=True).iloc[0] < 0.6
    assert best.nunique() >= 5


def test_policy_values(world: World) -> None:
    gt = world.ground_truth
    v_oracle = oracle_value(gt)
    statics = static_values(gt)
    default_id = gt.loc[gt["is_default"], "message_id"].iloc[0]
    defaults = gt.loc[gt["is_default"], ["request_id", "message_id"]]
    assert choice_value(gt, defaults) == pytest.approx(statics[default_id])
    uniform = gt[["request_id", "message_id"]].assign(
        prob=1.0 / gt.groupby("request_id", sort=False)["message_id"].transform("size")
    )
    v_uniform = policy_value(gt, uniform)
    assert v_uniform < statics.iloc[0] < v_oracle
    # shuffled rows give the same value (joined by key, not by position)
    assert policy_value(gt, uniform.sample(frac=1.0, random_state=0)) == pytest.approx(v_uniform)
    v_log = logging_value(gt, world.decisions)
    shown_value = choice_value(gt.drop(columns=["logging_prob"]), world.decisions)
    assert v_log == pytest.approx(logging_value(gt.drop(columns=["logging_prob"]), world.decisions), rel=0.02)
    assert shown_value == pytest.approx(v_log, rel=0.02)
    with pytest.raises(ValueError, match="do not sum to 1"):
        policy_value(gt, uniform.iloc[1:])
    assert gap_captured(v_oracle, statics.iloc[0], v_oracle) == 1.0
    assert gap_captured(statics.iloc[0], statics.iloc[0], v_oracle) == 0.0
    assert np.isnan(gap_captured(1.0, 2.0, 2.0))


def test_label_rule_recovers_the_sampled_outcome(world: World) -> None:
    labels, stats = label_decisions(world.decisions, world.outcomes)
    assert world.sampled is not None
    stayed = world.sampled["stayed"].to_numpy()
    known = labels.notna().to_numpy()
    np.testing.assert_array_equal(labels.to_numpy()[known], stayed[known].astype(float))
    # the latest decisions are censored naturally, but not too many
    assert 0.01 < stats.censored / stats.total < 0.2
    late = world.decisions["signed_date"] > world.decisions["signed_date"].max() - 20 * DAY_MS
    assert (~known[~late.to_numpy()]).mean() < 0.01
    # the rule sees every kind of event the simulator writes
    assert set(world.outcomes["event"]) == {
        "cancelled", "reenabled", "renewed", "expired", "switched", "offer_redeemed", "refunded"
    }


def test_some_subscriptions_decide_twice_some_within_the_horizon(world: World) -> None:
    d = world.decisions
    counts = d["original_transaction_id"].value_counts()
    twice = counts[counts == 2].index
    assert 0.05 < len(twice) / len(counts) < 0.2
    gaps = d[d["original_transaction_id"].isin(twice)].groupby("original_transaction_id")["signed_date"].agg(
        lambda s: s.max() - s.min()
    )
    assert (gaps < 30 * DAY_MS).any() and (gaps > 30 * DAY_MS).any()


def test_profiles_cover_every_subscription(world: World) -> None:
    prof = world.profiles
    assert prof["original_transaction_id"].is_unique
    assert set(prof["original_transaction_id"]) == set(world.decisions["original_transaction_id"])
    assert prof["engagement"].between(0, 1).all()
    assert {"tenure_days", "price_paid", "sessions_30d", "country", "acquisition_channel"} <= set(prof.columns)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_written_files_read_back_and_validate(tmp_path: Path, fmt: str) -> None:
    w = simulate(600, seed=2)
    paths = write_world(w, tmp_path, fmt)
    assert set(paths) == {"decisions", "outcomes", "profiles", "ground_truth", "catalog"}
    d = read_decisions(paths["decisions"])
    assert d["candidates"].tolist() == w.decisions["candidates"].tolist()
    assert d["request_id"].tolist() == w.decisions["request_id"].tolist()
    assert len(read_outcomes(paths["outcomes"])) == len(w.outcomes)
    assert len(read_profiles(paths["profiles"])) == len(w.profiles)
    gt = read_table(paths["ground_truth"])
    assert oracle_value(gt) == pytest.approx(oracle_value(w.ground_truth))
    assert set(Catalog.load(paths["catalog"]).messages) == set(w.catalog.messages)


def test_any_catalog_works(tmp_path: Path) -> None:
    raw = json.loads(DEMO_CATALOG.read_text())
    # only plain messages, only in German: the other languages get no decision at all
    keep = {"9eebaa90-da9b-5666-9499-ef0f5eb99be0", "21d2a679-3da2-5b6d-b763-b58bd42ddb00"}
    raw["messages"] = [{**m, "locales": ["de-DE"]} for m in raw["messages"] if m["messageIdentifier"] in keep]
    raw["defaults"] = [x for x in raw["defaults"] if x["locale"] == "de-DE"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    w = simulate(500, seed=0, catalog=Catalog.load(path))
    assert set(w.decisions["user_locale"]) == {"de-DE", "de-AT"}
    assert all(len(c) == 2 for c in w.decisions["candidates"])
    assert oracle_value(w.ground_truth) >= best_static_value(w.ground_truth)[0] - 1e-9


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        simulate(0)
    with pytest.raises(ValueError, match="epsilon"):
        simulate(10, epsilon=1.5)


def test_cli_writes_files_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    assert main(["--n", "400", "--seed", "5", "--out", str(out), "--format", "csv"]) == 0
    text = capsys.readouterr().out
    assert "oracle value" in text and "best static" in text and "gap captured" in text
    assert (out / "decisions.csv").exists() and (out / "catalog.json").exists()
    assert main(["--n", "300", "--seed", "6", "--out", str(out)]) == 0  # replaced in Parquet: no CSV file stays
    assert sorted(p.name for p in out.iterdir()) == ["catalog.json", "decisions.parquet", "ground_truth.parquet",
                                                     "outcomes.parquet", "profiles.parquet"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--n", "0", "--out", str(out)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("retention simulate: error: argument --n: must be from 1 to 100,000,000, "
                                       "not 0 (see retention simulate --help)\n")
    for flags, said in ((["--n", "99999999999999999999"], "argument --n: must be from 1 to 100,000,000"),
                        (["--start-ms", "99999999999999999999"], "argument --start-ms:"),
                        (["--horizon-days", "0"], "--horizon-days must be from 0.001 to 3650")):
        with pytest.raises(SystemExit) as exc:
            main([*flags, "--out", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


# ---- Apple-sized presets ----------------------------------------------------------------------------
def _effects(world: World) -> pd.DataFrame:
    """Return every non-default candidate with its effect on P(stay) in points over the default message."""
    gt = world.ground_truth
    base = gt[gt["is_default"]].set_index("request_id")["p_stay"].rename("base")
    out = gt.join(base, on="request_id")
    out["points"] = 100 * (out["p_stay"] - out["base"])
    return out[~out["is_default"]]


@pytest.mark.parametrize("preset", ["apple-segments", "apple-smooth", "apple-interactions"])
def test_cancel_intent_presets_follow_apples_figures(preset: str) -> None:
    from training.simulate import PRESETS

    assert PRESETS[preset].cancel_intent
    w = simulate(8000, seed=3, epsilon=0.05, preset=preset)
    gt = w.ground_truth
    base = gt.loc[gt["is_default"], "p_stay"]
    assert 0.012 <= base.mean() <= 0.03  # a base save rate of a few percent (Apple: about 1.7-2.5%)
    e = _effects(w)
    lifts = e[e["role"] != "dearer_plan"]  # an upgrade offered to someone leaving is the one message that hurts
    assert lifts["points"].min() >= 1.0 - 1e-9 and lifts["points"].max() <= 6.0 + 1e-9  # +1 to +6 points
    plain = e[e["role"].isin(["feature", "whats_new", "loyalty"])]["points"].mean()
    assert 1.1 <= plain <= 1.8  # Apple: messages +1.4 points on average
    # heterogeneous: every lifting role reaches both ends for somebody
    by_role = lifts.groupby("role")["points"]
    assert (by_role.min() < 1.5).all() and (by_role.max() > 4.5).all()
    # Apple: offers +5.5 on average where developers show them; here, to subscribers in their first 90 days
    # (the segments world), to newcomers by a smooth decay from +6 on day one (smooth), or only to
    # promo-acquired newcomers (interactions)
    prof = w.profiles.set_index("original_transaction_id")
    otid = w.decisions.set_index("request_id")["original_transaction_id"]
    offers = e[e["role"] == "offer"]
    who = prof.reindex(otid.reindex(offers["request_id"]).to_numpy())
    new = (who["tenure_days"] < 90).to_numpy().copy()
    if preset == "apple-interactions":
        new &= (who["acquisition_channel"] == "promo").to_numpy()
    want = {"apple-segments": 5.5, "apple-smooth": 3.5, "apple-interactions": 5.5}[preset]
    assert offers.loc[new, "points"].mean() >= want
    assert offers.loc[~new, "points"].mean() <= 3.5
    # the best message differs between subscribers: a single static one leaves a real gap
    v_static, _ = best_static_value(gt)
    assert oracle_value(gt) > 1.08 * v_static


def test_browse_preset_is_page_views_without_cancel_intent() -> None:
    from training.simulate import PRESETS

    assert not PRESETS["apple-browse"].cancel_intent
    w = simulate(6000, seed=3, epsilon=0.05, preset="apple-browse")
    gt = w.ground_truth
    assert gt.loc[gt["is_default"], "p_stay"].mean() >= 0.95
    e = _effects(w)
    small = e[e["role"] != "dearer_plan"]["points"]
    assert small.abs().max() <= 0.5 + 1e-9
    # nobody is leaving, so the offers only give their discount away: never the best message
    vals = gt.assign(v=gt["p_stay"] * gt["value_after"])
    best = vals.loc[vals.groupby("request_id")["v"].idxmax(), "role"]
    assert "offer" not in set(best)


def test_unknown_preset_and_logging_rule_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'apple'.*apple-segments"):
        simulate(100, preset="apple")
    with pytest.raises(ValueError, match="unknown logging rule"):
        simulate(100, logging_rule="oracle")
    assert main(["--n", "200", "--out", str(tmp_path / "w"), "--preset", "apple-browse"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["--n", "200", "--out", str(tmp_path / "w"), "--preset", "nope"])
    assert exc.value.code == 2 and "unknown preset 'nope'; one of demo, apple-segments" in capsys.readouterr().err


def test_default_logging_rule_explores_around_the_default_message() -> None:
    w = simulate(3000, seed=2, epsilon=0.05, preset="apple-segments", logging_rule="default")
    gt = w.ground_truth
    top = gt.loc[gt.groupby("request_id")["logging_prob"].idxmax()]
    assert top["is_default"].all()
