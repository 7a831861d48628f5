"""``retention models``: list, show, promote and roll back model versions in a registry.

The registry folder is ``--registry``, else ``$RETENTION_MODEL`` (a ``DIR@VERSION`` pin is
ignored here), else ``models/registry`` in the checkout. A running server picks up a
promotion or rollback within its reload interval, without restart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from models.registry import ModelLoadError, Registry

DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "models" / "registry"


def _registry(arg: str | None) -> Registry:
    spec = arg or os.environ.get("RETENTION_MODEL") or str(DEFAULT_REGISTRY)
    return Registry.parse(spec)[0]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retention models",
        description="List, show, promote and roll back model versions. Registry: --registry, else $RETENTION_MODEL, "
        "else models/registry.",
    )
    reg = argparse.ArgumentParser(add_help=False)
    reg.add_argument("--registry", help="model registry folder")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", parents=[reg], help="list versions, newest last; * marks the current one")
    s = sub.add_parser("show", parents=[reg], help="print a version's manifest (JSON) and model card")
    s.add_argument("version", help="version id, or 'current'")
    s.add_argument("--json", action="store_true", help="print only the manifest JSON")
    pr = sub.add_parser("promote", parents=[reg], help="make a version current")
    pr.add_argument("version", help="version id")
    pr.add_argument("--if-better", action="store_true",
                    help="promote only if the off-policy gate says it beats the current version on logged data")
    pr.add_argument("--decisions", type=Path, help="decisions file (with --if-better)")
    pr.add_argument("--outcomes", type=Path, help="outcomes file (with --if-better)")
    pr.add_argument("--profiles", type=Path, help="profiles file (optional, with --if-better)")
    pr.add_argument("--catalog", type=Path, help="catalog JSON (with --if-better)")
    sub.add_parser("rollback", parents=[reg], help="make the previously promoted version current again")
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
    rows = [("", "version", "created", "model", "rows", "log loss", "AUC", "gap")]
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def main(argv: list[str]) -> int:
    """Run ``retention models``; return the exit status."""
    args = _parser().parse_args(argv)
    registry = _registry(args.registry)
    if args.action == "list":
        return _list(registry)
    if args.action == "show":
        version = registry.current() if args.version == "current" else args.version
        if version is None:
            raise ModelLoadError(f"registry {registry.root} has no current model version")
        manifest = registry.manifest(version)
        print(json.dumps(manifest, indent=2))
        if not args.json:
            card = registry.root / version / "model_card.md"
            if card.is_file():
                print()
                print(card.read_text().rstrip())
        return 0
    if args.action == "promote":
        if args.if_better:
            need = [f"--{n}" for n in ("decisions", "outcomes", "catalog") if getattr(args, n) is None]
            if need:
                print(f"retention models: error: --if-better needs {', '.join(need)}", file=sys.stderr)
                return 2
            registry.load(args.version)  # refuse an unloadable candidate before any evaluation
            from training.gate import promotion_gate  # written by the evaluation side; imported only here

            ok, reason = promotion_gate(
                registry.root, args.version, args.decisions, args.outcomes, args.profiles, args.catalog
            )
            print(reason)
            if not ok:
                print(f"retention models: {args.version} left unpromoted; current stays {registry.current() or 'none'}",
                      file=sys.stderr)
                return 1
        before = registry.current()
        registry.promote(args.version)
        print(f"promoted {args.version} (was {before or 'none'})")
        return 0
    if args.action == "rollback":
        before = registry.current()
        now = registry.rollback()
        print(f"rolled back to {now} (was {before or 'none'})")
        return 0
    return 2


if __name__ == "__main__":
    import retention

    sys.exit(retention.main(["models", *sys.argv[1:]]))
