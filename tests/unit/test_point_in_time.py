"""Training on what serving saw: the raw profile values each decision logged, not the profiles file of today."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.features import Featurizer, build_schema
from serving.profiles import ProfileStore, import_profiles
from training.data_io import read_decisions, write_table
from training.simulate import simulate
from training.train import featurize, profile_index, profile_spec, train_frames


@pytest.fixture(scope="module")
def world() -> Any:
    return simulate(3000, seed=3)


def _logged_like_serving(world: Any, folder: Path) -> pd.DataFrame:
    """Return the world's decisions with the ``profile`` column serving logs: the profile store's answer at decision time."""
    src = folder / "profiles.parquet"
    write_table(world.profiles, src)
    import_profiles(src, folder / "profiles.sqlite")
    store = ProfileStore(folder / "profiles.sqlite")
    try:
        profile = [json.dumps(store.get(str(o))) for o in world.decisions["original_transaction_id"]]
    finally:
        store.close()
    d = world.decisions.copy()
    d["profile"] = profile
    # through the decisions file and back, as `retention train` reads it
    write_table(d, folder / "decisions.csv")
    return read_decisions(folder / "decisions.csv")


def _featurizer(world: Any) -> Featurizer:
    num, cat, vocab = profile_spec(world.profiles)
    schema = build_schema(world.catalog.products, world.catalog.messages, profile_numeric=num, profile_categorical=cat,
                          profile_vocab=vocab, locales=world.decisions["user_locale"].unique().tolist(),
                          environments=["Production", "Sandbox"])
    return Featurizer(schema, world.catalog.products, world.catalog.messages)


def test_logged_profiles_and_the_profiles_file_give_the_same_matrix_when_nothing_changed(
    world: Any, tmp_path: Path
) -> None:
    decisions = _logged_like_serving(world, tmp_path)
    assert decisions["profile"].notna().all() and (decisions["profile"] != "null").any()
    fz = _featurizer(world)
    prof = profile_index(world.profiles)
    logged = featurize(fz, decisions, prof)  # point in time (the default)
    refeaturized = featurize(fz, decisions, prof, point_in_time=False)
    from_log_alone = featurize(fz, decisions, None)  # no profiles file at all: the log is enough
    np.testing.assert_array_equal(logged, refeaturized)
    np.testing.assert_array_equal(from_log_alone, refeaturized)
    # and a whole training run agrees, feature for feature: the same model bytes
    a = train_frames(decisions, world.outcomes, world.profiles, world.catalog, seed=1)
    b = train_frames(decisions, world.outcomes, world.profiles, world.catalog, seed=1, refeaturize=True)
    assert a.onnx_bytes == b.onnx_bytes
    assert a.data_summary["features_from"].startswith("logged")
    assert b.data_summary["features_from"] == "profiles file"


def test_a_profile_changed_after_the_decision_does_not_change_its_training_row(world: Any, tmp_path: Path) -> None:
    decisions = _logged_like_serving(world, tmp_path)
    fz = _featurizer(world)
    numeric = fz.schema.profile_numeric[0]
    before = featurize(fz, decisions, profile_index(world.profiles))
    later = world.profiles.copy()  # the developer's profiles file, updated after the decisions were made
    later[numeric] = later[numeric] * 3 + 7
    for c in fz.schema.profile_categorical:
        later[c] = "changed"
    after = featurize(fz, decisions, profile_index(later))
    np.testing.assert_array_equal(after, before)
    # re-featurizing (asked for) sees the new values: the leak the default avoids
    leaked = featurize(fz, decisions, profile_index(later), point_in_time=False)
    assert not np.array_equal(leaked, before)


def test_decisions_that_logged_no_profile_are_joined_to_the_profiles_file(world: Any, tmp_path: Path) -> None:
    decisions = _logged_like_serving(world, tmp_path)
    fz = _featurizer(world)
    prof = profile_index(world.profiles)
    reference = featurize(fz, decisions, prof, point_in_time=False)
    old = decisions.copy()
    old.loc[old.index[::2], "profile"] = np.nan  # rows of an older log: nothing logged
    later = world.profiles.copy()
    np.testing.assert_array_equal(featurize(fz, old, profile_index(later)), reference)


def test_refeaturize_without_a_profiles_file_is_refused_not_trained_without_profiles(
    world: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import retention
    from training.train import TrainError

    decisions = _logged_like_serving(world, tmp_path)
    with pytest.raises(TrainError, match="--refeaturize joins every decision to --profiles"):
        train_frames(decisions, world.outcomes, None, world.catalog, refeaturize=True)
    write_table(world.outcomes, tmp_path / "outcomes.parquet")
    (tmp_path / "catalog.json").write_bytes(world.catalog.to_json())
    code = retention.main(["train", "--decisions", str(tmp_path / "decisions.csv"), "--outcomes",
                           str(tmp_path / "outcomes.parquet"), "--catalog", str(tmp_path / "catalog.json"),
                           "--registry", str(tmp_path / "registry"), "--refeaturize"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--profiles" in err and "Traceback" not in err
    assert not (tmp_path / "registry").exists()  # nothing trained, nothing written
