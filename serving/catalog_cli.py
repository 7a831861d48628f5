"""``retention catalog``: validate the catalog and check that every product and locale has a default."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from serving.catalog import Catalog, CatalogError
from serving.settings import DEMO_CATALOG


def main(argv: list[str]) -> int:
    """Entry point of ``retention catalog``."""
    p = argparse.ArgumentParser(prog="retention catalog", description="Validate the catalog of approved messages.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("validate", "load and validate the catalog; print a summary"),
                        ("coverage", "list products and locales that have no default message")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--catalog", default=os.environ.get("RETENTION_CATALOG", str(DEMO_CATALOG)),
                        help="catalog JSON [env RETENTION_CATALOG]")
        if name == "coverage":
            sp.add_argument("--locales", default=None,
                            help="comma-separated locales served in real time (default: every locale the catalog names)")
    args = p.parse_args(argv)
    try:
        catalog = Catalog.load(args.catalog)
    except CatalogError as exc:
        print(f"retention catalog: invalid: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "validate":
        kinds = Counter(m.kind for m in catalog.messages.values())
        approved = sum(1 for m in catalog.messages.values() if catalog.is_shown(m))
        print(f"catalog {args.catalog}: valid (sha256 {catalog.sha256[:16]})")
        print(f"  products: {len(catalog.products)}; messages: {len(catalog.messages)} "
              f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}); shown by Apple: {approved}; "
              f"defaults: {len(catalog.defaults)}")
        return 0
    locales = (
        [x.strip() for x in args.locales.split(",") if x.strip()]
        if args.locales
        else sorted({loc for m in catalog.messages.values() for loc in m.locales})
    )
    missing = catalog.missing_defaults(locales)
    if not missing:
        print(f"every product has a default message in {len(locales)} locale(s)")
        return 0
    for pid, loc in missing:
        print(f"no default: {pid} {loc}")
    print(f"{len(missing)} product/locale pair(s) without a default: Apple shows nothing there when our answer fails",
          file=sys.stderr)
    return 1
