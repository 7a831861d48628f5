"""The registry: atomic versions, verified loading with a sentence per failed check, promote and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import retention
from models.catalog import DEMO_CATALOG, Catalog
from models.features import FEATURIZER_VERSION, FeatureSchema, build_schema
from models.registry import ModelLoadError, Registry, RegistryError, is_version_id
from models.scoring import Scorer


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    cat = Catalog.load(DEMO_CATALOG)
    return build_schema(cat.products, cat.messages, profile_numeric=["tenure_days"])


@pytest.fixture(scope="module")
def onnx_bytes(schema: FeatureSchema) -> bytes:
    from training.fit import export_onnx, fit_model

    rng = np.random.default_rng(0)
    X = rng.random((600, schema.n_features)).astype(np.float32)
    y = (rng.random(600) < 0.3 + 0.4 * X[:, 0]).astype(int)
    est, _ = fit_model(X, y, model="logreg")
    return export_onnx(est, schema.n_features)


def manifest(schema: FeatureSchema) -> dict:
    return {
        "featurizer_version": FEATURIZER_VERSION,
        "feature_schema": schema.to_dict(),
        "feature_schema_sha256": schema.sha256(),
        "model": "logreg",
        "metrics": {"holdout_log_loss": 0.5},
        "training_data": {"rows_used": 600},
    }


def write(reg: Registry, onnx_bytes: bytes, schema: FeatureSchema) -> str:
    return reg.write_version(onnx_bytes, manifest(schema), "# Model {version}\n")


def test_write_and_load_a_version(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.versions() == [] and reg.current() is None
    v = write(reg, onnx_bytes, schema)
    assert is_version_id(v) and reg.versions() == [v]
    assert sorted(p.name for p in (tmp_path / "reg" / v).iterdir()) == ["manifest.json", "model.onnx", "model_card.md"]
    assert (tmp_path / "reg" / v / "model_card.md").read_text() == f"# Model {v}\n"
    assert [p.name for p in (tmp_path / "reg").iterdir() if p.name.startswith(".")] == [".lock"]  # no temp folder left
    m = reg.manifest(v)
    assert m["version"] == v and m["created"].endswith("Z") and len(m["onnx_sha256"]) == 64
    loaded = reg.load(v)
    assert loaded.schema == schema and loaded.onnx_path.name == "model.onnx"
    with pytest.raises(ModelLoadError, match="no current model version"):
        reg.load()


def test_scorer_returns_p_stay_per_row(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema) -> None:
    reg = Registry(tmp_path)
    loaded = reg.load(write(reg, onnx_bytes, schema))
    scorer = Scorer(loaded)
    opts = scorer.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    X = np.random.default_rng(1).random((8, schema.n_features)).astype(np.float32)
    p = scorer.p_stay(X)
    assert p.shape == (8,) and p.dtype == np.float64 and ((p > 0) & (p < 1)).all()
    assert scorer.p_stay(X.astype(np.float64)).tolist() == p.tolist()  # cast, same answer


def test_changed_onnx_file_is_refused(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema) -> None:
    reg = Registry(tmp_path)
    v = write(reg, onnx_bytes, schema)
    path = tmp_path / v / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match=f"model {v}: sha256 mismatch for model.onnx"):
        reg.load(v)


def test_other_featurizer_version_is_refused(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema) -> None:
    reg = Registry(tmp_path)
    v = write(reg, onnx_bytes, schema)
    mpath = tmp_path / v / "manifest.json"
    m = json.loads(mpath.read_text())
    m["featurizer_version"] = "0"
    mpath.write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match=rf"featurizer version differs \(ours {FEATURIZER_VERSION}, model's 0\)"):
        reg.load(v)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.onnx").unlink(), "missing file model.onnx"),
        (lambda d: (d / "manifest.json").unlink(), "missing file manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "bad manifest"),
        (lambda d: (d / "manifest.json").write_text("{}"), "bad manifest"),
    ],
)
def test_damaged_version_is_refused(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema, damage, message) -> None:
    reg = Registry(tmp_path)
    v = write(reg, onnx_bytes, schema)
    damage(tmp_path / v)
    with pytest.raises(ModelLoadError, match=message):
        reg.load(v)
    with pytest.raises(ModelLoadError, match="no such version"):
        reg.load("20990101T000000Z-abcdef")


def test_scorer_refuses_a_graph_of_another_width(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema) -> None:
    reg = Registry(tmp_path)
    other = build_schema(Catalog.load(DEMO_CATALOG).products, Catalog.load(DEMO_CATALOG).messages)
    v = reg.write_version(onnx_bytes, manifest(other), "")
    with pytest.raises(ModelLoadError, match=r"takes \d+ features, its schema has"):
        Scorer(reg.load(v))


def test_promote_and_rollback(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema) -> None:
    reg = Registry(tmp_path)
    a, b, c = (write(reg, onnx_bytes, schema) for _ in range(3))
    assert reg.versions() == sorted([a, b, c])
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    reg.promote(a)
    reg.promote(b)
    reg.promote(c)
    assert reg.current() == c and reg.load().version == c
    assert reg.rollback() == b and reg.current() == b
    assert reg.rollback() == a and reg.current() == a
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    reg.promote(c)
    assert reg.rollback() == a
    # a damaged version cannot be promoted
    (tmp_path / b / "model.onnx").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        reg.promote(b)
    assert reg.current() == a


def test_parse_pinned_spec(tmp_path: Path) -> None:
    reg, pinned = Registry.parse(f"{tmp_path}@20261128T211500Z-a1b2c3")
    assert reg.root == tmp_path and pinned == "20261128T211500Z-a1b2c3"
    reg, pinned = Registry.parse(str(tmp_path))
    assert reg.root == tmp_path and pinned is None


def test_models_cli(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(tmp_path)
    a, b = write(reg, onnx_bytes, schema), write(reg, onnx_bytes, schema)
    monkeypatch.setenv("RETENTION_MODEL", str(tmp_path))  # the default registry
    assert retention.main(["models", "promote", a]) == 0
    assert retention.main(["models", "promote", b, "--registry", str(tmp_path)]) == 0
    capsys.readouterr()
    assert retention.main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["version", "created"]
    assert "gap" not in lines[0] and len(lines) == 3  # no simulated ground truth: no column of dashes, no footnote
    assert lines[2].startswith("*") and b in lines[2] and a in lines[1] and not lines[1].startswith("*")
    assert retention.main(["models", "show", "current", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == b
    assert retention.main(["models", "rollback"]) == 0
    assert f"rolled back to {a}" in capsys.readouterr().out and reg.current() == a
    # promoting the current version says so; once the history is stepped back to its start, rollback says that
    assert retention.main(["models", "promote", "current"]) == 0
    assert capsys.readouterr().out.strip() == f"{a} is already current"
    assert retention.main(["models", "rollback"]) == 1
    err = capsys.readouterr().err
    assert f"the promotion history holds no version before {a}" in err and "ever promoted" not in err
    # bad input: one line, non-zero
    assert retention.main(["models", "promote", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such version" in err[0]
    with pytest.raises(SystemExit) as exit_:
        retention.main(["models", "promote", a, "--if-better"])
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        "retention models promote: error: --if-better needs --decisions, --outcomes, --catalog "
        "(see retention models promote --help)\n")


def test_models_show_prints_the_card_first_and_json_only_when_asked(
    tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path)
    a = write(reg, onnx_bytes, schema)
    reg.promote(a)
    capsys.readouterr()
    assert retention.main(["models", "show", "current", "--registry", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# Model {a}" and "{" not in out  # the card, no JSON
    assert retention.main(["models", "show", "latest", "--registry", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == a  # JSON only: it parses whole


def test_current_and_latest_are_version_aliases(tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(tmp_path)
    a, b = write(reg, onnx_bytes, schema), write(reg, onnx_bytes, schema)
    reg.promote(a)
    assert reg.load("current").version == a and reg.load("latest").version == b
    assert reg.manifest("latest")["version"] == b
    assert retention.main(["models", "promote", "latest", "--registry", str(tmp_path)]) == 0
    assert reg.current() == b and f"promoted {b}" in capsys.readouterr().out
    empty = Registry(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model version"):
        empty.load("latest")


def test_models_prune_keeps_the_newest_and_never_current_or_shadow(
    tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RETENTION_MODEL", raising=False)
    reg = Registry(tmp_path)
    a, b, c, d, e = (write(reg, onnx_bytes, schema) for _ in range(5))
    reg.promote(a)
    assert retention.main(["models", "prune", "--keep", "1", "--registry", str(tmp_path), "--shadow", b,
                           "--dry-run"]) == 0
    assert reg.versions() == [a, b, c, d, e] and f"would delete {c}" in capsys.readouterr().out
    assert retention.main(["models", "prune", "--keep", "1", "--registry", str(tmp_path), "--shadow", b]) == 0
    assert reg.versions() == [a, b, e]  # current a, shadow b, newest e
    assert reg.load().version == a
    # the newest version is always kept: a server pinned at DIR@latest serves it
    assert retention.main(["models", "prune", "--keep", "0", "--registry", str(tmp_path)]) == 2
    assert "--keep must be 1 or more" in capsys.readouterr().err
    assert retention.main(["models", "prune", "--keep", "-1", "--registry", str(tmp_path)]) == 2
    assert retention.main(["models", "prune", "--keep", "1", "--registry", str(tmp_path)]) == 0
    assert reg.versions() == [a, e]
    # a shadow version that does not exist is refused, not silently ignored
    capsys.readouterr()
    assert retention.main(["models", "prune", "--keep", "1", "--registry", str(tmp_path), "--shadow", "nosuch",
                           "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nosuch' is not a version of" in err[0]


def test_models_list_of_a_missing_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "typo"
    assert retention.main(["models", "list", "--registry", str(missing)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and str(missing) in err[0] and captured.out == ""


def test_a_promotion_judged_against_one_version_never_replaces_another(
    tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema
) -> None:
    """`promote --if-better` judged the candidate against the version current when it began: if another
    was promoted meanwhile, the candidate is refused and the other stays current."""
    reg = Registry(tmp_path)
    a, b, c = (write(reg, onnx_bytes, schema) for _ in range(3))
    reg.promote(a)
    reg.promote(b)  # promoted while c was being judged against a
    with pytest.raises(RegistryError, match=f"changed from {a} to {b} while {c} was judged against it"):
        reg.promote(c, expect_current=a)
    assert reg.current() == b and [h["version"] for h in reg.history()] == [a, b]
    reg.promote(c, expect_current=b)
    assert reg.current() == c


def test_concurrent_promotions_and_prunes_keep_the_registry_whole(
    tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema
) -> None:
    """Promote, rollback and prune hold the registry's lock: run together from many threads, no promotion
    is lost from the history and `current` never names a deleted version."""
    import threading

    reg = Registry(tmp_path)
    versions = [write(reg, onnx_bytes, schema) for _ in range(24)]
    reg.promote(versions[0])
    promoted: list[str] = []
    errors: list[BaseException] = []

    def promote_some(mine: list[str]) -> None:
        try:
            for v in mine:
                Registry(tmp_path).promote(v)
                promoted.append(v)
        except BaseException as exc:
            errors.append(exc)

    def prune_some() -> None:
        try:
            for _ in range(12):
                Registry(tmp_path).prune(1)
        except BaseException as exc:
            errors.append(exc)

    # promote only versions a prune cannot take yet (each thread's own, promoted newest first is not needed:
    # a version promoted is current, and a prune under the lock never deletes the current one)
    threads = [threading.Thread(target=promote_some, args=(versions[1 + i::3],)) for i in range(3)]
    threads.append(threading.Thread(target=prune_some))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deleted = [e for e in errors if isinstance(e, ModelLoadError)]  # promoting a version a prune took first
    assert len(deleted) == len(errors), errors
    assert reg.current() in reg.versions()
    history = [h["version"] for h in reg.history()]
    assert history[0] == versions[0] and len(history) == 1 + len(promoted)  # every promotion recorded once
    assert history[-1] == reg.current()


def test_if_better_says_not_promoted_when_current_moved_while_it_judged(
    tmp_path: Path, onnx_bytes: bytes, schema: FeatureSchema, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import training.gate

    reg = Registry(tmp_path)
    a, b, c = (write(reg, onnx_bytes, schema) for _ in range(3))
    reg.promote(a)

    def judged_while_b_lands(root: Path, version: str, *args: object, **kwargs: object) -> tuple[bool, str]:
        assert Registry(root).promote(b) == a  # another promotion lands while the gate judges; it returns the one before
        return True, f"promoted: DR estimate of {version} minus current version {a}: +1.0"

    monkeypatch.setattr(training.gate, "promotion_gate", judged_while_b_lands)
    gate = ["--decisions", "d.parquet", "--outcomes", "o.parquet", "--catalog", "c.json"]
    assert retention.main(["models", "promote", c, "--if-better", "--registry", str(tmp_path), *gate]) == 1
    said = capsys.readouterr()
    assert said.out.startswith(f"shown better, but not promoted: DR estimate of {c}") and "promoted:" not in said.out[:6]
    assert f"the current version changed from {a} to {b}" in said.err
    assert reg.current() == b
    assert retention.main(["models", "rollback", "--registry", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"rolled back to {a} (was {b})"
