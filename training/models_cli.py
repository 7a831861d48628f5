"""``retention models``: list, show, promote and roll back model versions in a registry.

The registry folder is ``--registry``, else ``$RETENTION_MODEL`` (a ``DIR@VERSION`` pin is
ignored here), else ``models/registry`` in the checkout; a folder that does not exist is an
error, not an empty registry. Wherever a version is taken, ``current`` (the promoted one) and
``latest`` (the newest written) are accepted too. A running server picks up a promotion or
rollback within its reload interval, without restart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from models.registry import ModelLoadError, Registry, RegistryError, registry_spec
from retention import VerbParser


def _registry(arg: str | None) -> Registry:
    registry = Registry.parse(registry_spec(arg))[0]
    registry.require_folder()
    return registry


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention models",
        description="List, show, promote and roll back model versions. Registry: --registry, else $RETENTION_MODEL, "
        "else models/registry.",
    )
    reg = VerbParser(add_help=False)
    reg.add_argument("--registry", help="model registry folder")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[reg], help="list versions, newest last; * marks the current one")
    s = sub.add_parser("show", parents=[reg], help="print a version's model card (its manifest JSON with --json)")
    s.add_argument("version", help="version id, 'current' or 'latest'")
    s.add_argument("--json", action="store_true", help="print the manifest JSON instead of the model card")
    pr = sub.add_parser("promote", parents=[reg], help="make a version current")
    pr.add_argument("version", help="version id, 'current' or 'latest'")
    pr.add_argument("--if-better", action="store_true",
                    help="promote only if the off-policy gate says it beats the current version on logged data")
    pr.add_argument("--decisions", type=Path, help="decisions file (with --if-better)")
    pr.add_argument("--outcomes", type=Path, help="outcomes file (with --if-better)")
    pr.add_argument("--profiles", type=Path, help="profiles file (optional, with --if-better)")
    pr.add_argument("--catalog", type=Path, help="catalog JSON (with --if-better)")
    pr.add_argument("--allow-missing-profiles", action="store_true",
                    help="with --if-better: score a version trained with profile columns even when neither --profiles "
                         "nor the decisions give them (refused by default: its choices would change)")
    pr.add_argument("--allow-overlap", action="store_true",
                    help="with --if-better: judge even when the evaluation decisions overlap the candidate's training "
                         "data (refused by default: a model looks better on the decisions it learned from)")
    sub.add_parser("rollback", parents=[reg], help="make the previously promoted version current again")
    pn = sub.add_parser("prune", parents=[reg],
                        help="delete all but the newest N versions; never the current, the shadow or the newest version")
    pn.add_argument("--keep", type=int, required=True, metavar="N",
                    help="how many of the newest versions to keep, 1 or more (the newest is always kept)")
    pn.add_argument("--shadow", default=os.environ.get("RETENTION_SHADOW_MODEL"),
                    help="a shadow version to keep as well [env RETENTION_SHADOW_MODEL]")
    pn.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    return p


def _fmt_metric(manifest: dict, key: str) -> str:
    v = (manifest.get("metrics") or {}).get(key)
    return f"{v:.4f}" if isinstance(v, int | float) else "-"


def _list(registry: Registry) -> int:
    versions = registry.versions()
    if not versions:
        print(f"no model versions in {registry.root}")
        return 0
    cur = registry.current()
    rows: list[tuple[str, ...]] = [("", "version", "created", "model", "rows", "log loss", "AUC", "gap")]
    for v in versions:
        try:
            m = registry.manifest(v)
        except ModelLoadError as exc:
            rows.append(("*" if v == cur else "", v, "?", f"unreadable: {exc}", "", "", "", ""))
            continue
        data = m.get("training_data") or {}
        rows.append((
            "*" if v == cur else "",
            v,
            str(m.get("created", "?")),
            str(m.get("model", "?")),
            f"{data.get('rows_used', 0):,}",
            _fmt_metric(m, "holdout_log_loss"),
            _fmt_metric(m, "holdout_auc"),
            _fmt_metric(m, "gap_captured"),
        ))
    if cur is not None and cur not in versions:
        print(f"retention models: warning: current names {cur}, which is not in {registry.root} (deleted?); a server "
              "keeps the model it loaded, a new one cannot start: promote a version", file=sys.stderr)
    gap_known = any(r[-1] not in ("-", "") for r in rows[1:])
    if not gap_known:  # the gap needs a simulated world's ground truth: leave out a column of dashes
        rows = [r[:-1] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if gap_known:
        print("gap: share of the gap from the best single message to the oracle that the model captured on a "
              "simulated world's ground truth (train --ground-truth)")
    return 0


def _prune(registry: Registry, args: argparse.Namespace) -> int:
    if args.keep < 1:
        print("retention models prune: error: --keep must be 1 or more: the newest version is always kept "
              "(a server pinned at DIR@latest serves it)", file=sys.stderr)
        return 2
    if args.shadow and args.shadow not in ("current", "latest") and args.shadow not in registry.versions():
        print(f"retention models prune: error: --shadow (RETENTION_SHADOW_MODEL) {args.shadow!r} is not a version of "
              f"{registry.root}", file=sys.stderr)
        return 2
    pinned = Registry.parse(os.environ.get("RETENTION_MODEL", ""))[1]
    protect = tuple(registry.resolve(v) for v in (args.shadow, pinned) if v)
    if args.dry_run:
        kept = {v for v in (registry.current(), *protect) if v}
        candidates = [v for v in registry.versions() if v not in kept]
        doomed = candidates[: max(0, len(candidates) - args.keep)]
    else:
        doomed = registry.prune(args.keep, protect=protect)
    for v in doomed:
        print(f"{'would delete' if args.dry_run else 'deleted'} {v}")
    left = len(registry.versions()) - (len(doomed) if args.dry_run else 0)
    print(f"{len(doomed)} version(s) {'to delete' if args.dry_run else 'deleted'}; {left} left "
          f"(current {registry.current() or 'none'} kept)")
    return 0


def main(argv: list[str]) -> int:
    """Run ``retention models``; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    registry = _registry(args.registry)
    if args.action == "list":
        return _list(registry)
    if args.action == "show":
        version = registry.resolve(args.version)
        manifest = registry.manifest(version)
        if args.json:
            print(json.dumps(manifest, indent=2))
            return 0
        card = registry.root / version / "model_card.md"
        if card.is_file():
            print(card.read_text(encoding="utf-8", errors="replace").rstrip())  # a damaged card still shows
        else:
            print(f"model {version}: no model card; the manifest is `retention models show {version} --json`")
        return 0
    if args.action == "prune":
        return _prune(registry, args)
    if args.action == "promote":
        promote = parser._commands.choices["promote"]  # type: ignore[attr-defined]
        gate_only = [f"--{n.replace('_', '-')}" for n in ("decisions", "outcomes", "catalog", "profiles")
                     if getattr(args, n) is not None]
        gate_only += [f"--{n.replace('_', '-')}" for n in ("allow_overlap", "allow_missing_profiles") if getattr(args, n)]
        if gate_only and not args.if_better:  # a forgotten --if-better must not promote without the gate
            promote.error(f"{', '.join(gate_only)} {'go' if len(gate_only) > 1 else 'goes'} only with --if-better "
                          "(without it the version is promoted unchecked)")
        if args.if_better:
            need = [f"--{n}" for n in ("decisions", "outcomes", "catalog") if getattr(args, n) is None]
            if need:
                promote.error(f"--if-better needs {', '.join(need)}")
            args.version = registry.resolve(args.version)
            registry.load(args.version)  # refuse an unloadable candidate before any evaluation
            judged_against = registry.current()  # the gate judges against this one: only it may be replaced
            from training.gate import promotion_gate  # written by the evaluation side; imported only here
            from training.target_policy import MissingProfilesError

            try:
                ok, reason = promotion_gate(
                    registry.root, args.version, args.decisions, args.outcomes, args.profiles, args.catalog,
                    allow_overlap=args.allow_overlap, allow_missing_profiles=args.allow_missing_profiles,
                )
            except MissingProfilesError as exc:
                print(f"retention models promote: error: {exc}", file=sys.stderr)
                return 2
            if not ok:
                print(reason)
                cur = registry.current()
                print(f"retention models: {args.version} left unpromoted; "
                      + (f"current stays {cur}" if cur else "the registry still has no current version"),
                      file=sys.stderr)
                return 1
        version = registry.resolve(args.version)
        if args.if_better:
            try:
                before = registry.promote(version, expect_current=judged_against)
            except (RegistryError, ModelLoadError) as exc:  # current moved, or the candidate was pruned, meanwhile
                print(reason.replace("promoted: ", "shown better, but not promoted: ", 1))
                print(f"retention models promote: error: {exc}", file=sys.stderr)
                return 1
            print(reason)  # the verdict only once the promotion is done
        else:
            before = registry.promote(version)
        print(f"{version} is already current" if version == before else f"promoted {version} (was {before or 'none'})")
        _end_experiment_of(registry, version)
        return 0
    if args.action == "rollback":
        now = registry.rollback()
        print(f"rolled back to {now} (was {registry.rolled_back_from or 'none'})")
        return 0
    return 2


if __name__ == "__main__":
    import retention

    sys.exit(retention.main(["models", *sys.argv[1:]]))


def _end_experiment_of(registry: Registry, version: str) -> None:
    """Stop the running experiment whose challenger was just promoted (both arms would get the same model)."""
    from models.experiment import Experiment, ExperimentError, read_experiment, write_experiment

    try:
        exp = read_experiment(registry.root)
    except ExperimentError:
        return
    if exp is not None and exp.active and exp.challenger == version:
        write_experiment(registry.root, Experiment(exp.experiment_id, exp.challenger, exp.share, False,
                                                   exp.started_at_ms))
        print(f"stopped experiment {exp.experiment_id}: its challenger is now the current version")
