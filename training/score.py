"""``retention score``: batch-score a file of logged requests with a model version.

For each request (a row of a decisions file, docs/data-formats.md; only the context columns and
``candidates`` are needed), every candidate is featurized with the model's own schema and
scored with ONNX Runtime; the output has one row per request: ``request_id``,
``message_id`` (the greedy choice among that request's own candidates, by
P(stay) × (V(product after m) − cost(m)), first on ties) and ``expected_value``.
A candidate that the catalog lacks is never chosen; a request none of whose candidates the
catalog knows gets an empty message_id and NaN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from models import data_files
from retention import VerbParser

# the decisions file's columns (docs/data-formats.md) that describe a request (what was shown and why is not needed to score it)
SCORE_COLUMNS = tuple(
    c for c in data_files.DECISION_COLUMNS if c not in ("message_id", "propensity", "model_version", "policy")
)


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention score",
        description="Batch-score logged requests with a model version: one row per request with the greedy "
        "message among its own candidates and its expected value.",
    )
    p.add_argument("--registry", help="model registry folder (or DIR@VERSION) [env RETENTION_MODEL; default "
                   "models/registry in the checkout]")
    p.add_argument("--version", help="model version, 'current' or 'latest' (default: the registry's current one)")
    p.add_argument("--catalog", required=True, type=Path, help="catalog JSON")
    p.add_argument("--input", required=True, type=Path, help="decisions file (.parquet or .csv)")
    p.add_argument("--profiles", type=Path, help="subscriber profiles file, keyed by original_transaction_id")
    p.add_argument("--output", required=True, type=Path, help="output file (.parquet or .csv)")
    p.add_argument("--allow-missing-profiles", action="store_true",
                   help="score a model trained with profile columns without --profiles (every request then counts "
                        "as having no profile, which such a model scores worse)")
    return p


def score_frame(
    decisions: pd.DataFrame, profiles: pd.DataFrame | None, catalog: object, model: object
) -> pd.DataFrame:
    """Return one row per request (request_id, message_id, expected_value) scored by a LoadedModel."""
    from models.features import Featurizer
    from models.registry import LoadedModel
    from training.fit import onnx_session
    from training.train import greedy_table, profile_index

    assert isinstance(model, LoadedModel)
    missing = [c for c in SCORE_COLUMNS if c not in decisions.columns]
    if missing:
        raise ValueError(f"the input lacks column(s) {', '.join(missing)}")
    fz = Featurizer(model.schema, catalog.products, catalog.messages)  # type: ignore[attr-defined]
    prof = profile_index(profiles)
    session = onnx_session(model.onnx_path.read_bytes())
    table = greedy_table(session, fz, decisions.reset_index(drop=True), prof, catalog)
    best = table.loc[table["greedy"], ["request_id", "message_id", "expected_value"]]
    out = decisions[["request_id"]].drop_duplicates().merge(best, on="request_id", how="left")
    out["message_id"] = out["message_id"].fillna("")
    out["expected_value"] = out["expected_value"].astype(np.float64)
    return out.reset_index(drop=True)


def main(argv: list[str]) -> int:
    """Run ``retention score``; return the exit status."""
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    from models.catalog import Catalog
    from models.registry import Registry, registry_spec
    from training.data_io import check_requests, read_profiles, read_table, write_table
    from training.target_policy import MissingProfilesError, require_profiles

    registry, pinned = Registry.parse(registry_spec(args.registry))
    registry.require_folder()
    model = registry.load(args.version or pinned)
    catalog = Catalog.load(args.catalog)
    decisions = read_table(args.input)
    missing = [c for c in SCORE_COLUMNS if c not in decisions.columns]
    if missing:
        raise ValueError(f"{args.input}: the input lacks column(s) {', '.join(missing)}")
    decisions = decisions.reset_index(drop=True)
    check_requests(decisions, Path(args.input))  # a request given twice would be scored once, silently
    bad = [i for i, c in enumerate(decisions["candidates"].tolist()) if not isinstance(c, list)]
    if bad:
        raise ValueError(f"{args.input}: row {bad[0] + 1}: candidates must be a list of message ids")
    try:
        require_profiles(model.schema, model.version, decisions, args.profiles, allow=args.allow_missing_profiles)
    except MissingProfilesError as exc:
        print(f"retention score: error: {exc}", file=sys.stderr)
        return 2
    profiles = read_profiles(args.profiles) if args.profiles else None
    with tqdm(total=2, desc="score", unit="step", file=sys.stderr, leave=False, disable=None) as bar:
        out = score_frame(decisions, profiles, catalog, model)
        bar.update()
        write_table(out, args.output)
        bar.update()
    chosen = int((out["message_id"] != "").sum())
    print(f"scored {len(out):,} requests with model {model.version} ({chosen:,} with a choice) -> {args.output}")
    return 0


if __name__ == "__main__":
    import retention

    sys.exit(retention.main(["score", *sys.argv[1:]]))
