"""``retention catalog``: validate the catalog, check that every product and locale has a default, sync from Apple."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from models.catalog import DEMO_CATALOG, Catalog, CatalogError
from retention import VerbParser
from serving.apple_api import add_arguments, check_arguments


def main(argv: list[str]) -> int:
    """Entry point of ``retention catalog``."""
    p = VerbParser(prog="retention catalog", description="Validate the catalog of approved messages.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("validate", "load and validate the catalog; print a summary"),
                        ("coverage", "list products and locales that have no default message")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("file", nargs="?", default=None, metavar="FILE", help="catalog JSON (same as --catalog)")
        sp.add_argument("--catalog", default=os.environ.get("RETENTION_CATALOG", str(DEMO_CATALOG)),
                        help="catalog JSON [env RETENTION_CATALOG; default the demo catalog]")
        if name == "coverage":
            sp.add_argument("--locales", default=None,
                            help="comma-separated locales served in real time (default: every locale the catalog names)")
    _add_sync_parser(sub)
    _add_apply_parsers(sub)
    args = p.parse_args(argv)
    if args.cmd == "sync":
        return _sync(args)
    if args.cmd in ("plan", "apply"):
        return _apply(args)
    if args.file is not None:
        args.catalog = args.file
    try:
        catalog = Catalog.load(args.catalog)
    except CatalogError as exc:
        print(f"retention catalog: error: invalid catalog: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "validate":
        kinds = Counter(m.kind for m in catalog.messages.values())

        def shown(environment: str | None) -> int:
            served = {mid for mid, _loc in Catalog._served_identifiers(catalog.data, catalog.record(environment))}
            return sum(1 for m in catalog.messages.values()
                       if (catalog.is_shown(m) if m.content is None else m.messageIdentifier in served))

        envs = [e for e in catalog.records if e]  # the upload record is per environment (catalog apply)
        approved = ", ".join(f"{e} {shown(e)}" for e in envs) if len(envs) > 1 else str(shown(None))
        from serving.catalog_content import content_problems

        problems = content_problems(catalog, os.path.dirname(os.path.abspath(args.catalog)))
        for line in problems:
            print(f"retention catalog: {line}", file=sys.stderr)
        if problems:
            print(f"retention catalog: error: invalid catalog: {len(problems)} problem(s) with Apple's limits", file=sys.stderr)
            return 1
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


def _add_apply_parsers(sub: argparse._SubParsersAction[VerbParser]) -> None:
    for name, help_ in (
        ("plan", "read Apple's messages, images, default messages and realtime URL; print what apply would change"),
        ("apply", "upload the catalog's images and texts to Apple, set default messages once approved "
                  "(--prune also deletes what the catalog no longer has)"),
    ):
        sp = sub.add_parser(name, help=help_, description=help_ + ". See docs/apple-setup.md.")
        sp.add_argument("--catalog", default=os.environ.get("RETENTION_CATALOG"),
                        help="catalog JSON [env RETENTION_CATALOG]")
        add_arguments(sp)
        sp.add_argument("--prune", action="store_true",
                        help="delete at Apple what the catalog no longer has: defaults, then messages, then images")
        sp.add_argument("--max-wait", type=float, default=300.0,
                        help="most seconds to wait in all when Apple answers 429 with a Retry-After (default 300)")


def _apply(args: argparse.Namespace) -> int:
    from serving.apple_api import base_url_of
    from serving.catalog_apply import ApplyError, CatalogRefusedError, format_plan, make_pacer, run
    from serving.catalog_sync import SyncError, make_client, min_interval_for

    prog = f"retention catalog {args.cmd}"
    if not args.catalog:
        print(f"{prog}: missing --catalog (flag or RETENTION_CATALOG)", file=sys.stderr)
        return 2
    bad = check_arguments(args, prog)
    if bad is not None:
        return bad
    interval = min_interval_for(args.environment) if args.min_interval is None else args.min_interval
    try:
        client = make_client(args.key_file, args.key_id, args.issuer_id, args.bundle_id, args.environment)
    except SyncError as exc:  # the key, environment or URL override: nothing was sent to Apple
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(args.catalog, client, make_pacer(interval, max_wait=args.max_wait), apply=args.cmd == "apply",
                     environment=args.environment,
                     prune=args.prune, log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ApplyError, SyncError) as exc:
        lines = str(exc).splitlines()
        for line in lines[1:]:
            print(f"{prog}: {line}", file=sys.stderr)
        print(f"{prog}: {lines[0]}", file=sys.stderr)
        if args.cmd == "apply" and not isinstance(exc, CatalogRefusedError):
            print(f"{prog}: stopped; what was done is recorded in {args.catalog}: run it again to continue",
                  file=sys.stderr)
        return 1
    print(format_plan(result.plan, applied=result.done if args.cmd == "apply" else None))
    waits = f", waited {sum(result.rate_limited_waits):.0f} s on 429s" if result.rate_limited_waits else ""
    print(f"{result.calls} call(s) to Apple {args.environment} at {base_url_of(client)}{waits}")
    return 1 if result.plan.rejected else 0


def _add_sync_parser(sub: argparse._SubParsersAction[VerbParser]) -> None:
    env = os.environ.get
    sp = sub.add_parser(
        "sync",
        help="update message and image states (and check default messages) from Apple's Retention Messaging API",
        description=(
            "Fetch Apple's message and image lists and write their states (PENDING, APPROVED, REJECTED) into the "
            "catalog. Catalog entries Apple does not know are kept and marked PENDING; entries only Apple knows "
            "are reported. The result is validated before it is written, atomically. Calls are spaced by "
            "--min-interval per endpoint (Apple: 1 request/s, sandbox a tenth of that)."
        ),
    )
    sp.add_argument("--catalog", default=env("RETENTION_CATALOG"), help="catalog JSON to sync [env RETENTION_CATALOG]")
    sp.add_argument("--key-file", default=env("RETENTION_OFFER_KEY_FILE"),
                    help="In-App Purchase private key, SubscriptionKey_*.p8 [env RETENTION_OFFER_KEY_FILE]")
    sp.add_argument("--key-id", default=env("RETENTION_OFFER_KEY_ID"), help="key id of that key [env RETENTION_OFFER_KEY_ID]")
    sp.add_argument("--issuer-id", default=env("RETENTION_OFFER_ISSUER_ID"),
                    help="issuer id from App Store Connect [env RETENTION_OFFER_ISSUER_ID]")
    sp.add_argument("--bundle-id", default=env("RETENTION_BUNDLE_ID"), help="your app's bundle id [env RETENTION_BUNDLE_ID]")
    sp.add_argument("--environment", default=env("RETENTION_ENVIRONMENT"), choices=("Sandbox", "Production"),
                    help="which of Apple's environments to read [env RETENTION_ENVIRONMENT]")
    sp.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    sp.add_argument("--out", default=None, help="write the synced catalog here instead of over --catalog")
    sp.add_argument("--check-defaults", action="store_true",
                    help="also fetch the default message of every product x locale and report mismatches")
    sp.add_argument("--adopt-defaults", action="store_true",
                    help="set the catalog's defaults to Apple's where they differ (implies --check-defaults; "
                         "never removes a default)")
    sp.add_argument("--locales", default=None,
                    help="comma-separated locales for the default check (default: every locale the catalog names)")
    sp.add_argument("--min-interval", type=float, default=None,
                    help="seconds between two calls to one endpoint (default: 1 in Production, 10 in Sandbox)")


def _sync(args: argparse.Namespace) -> int:
    from serving.catalog_sync import SyncError, format_report, make_client, min_interval_for, sync_catalog

    missing = [flag for flag, value in (("--catalog", args.catalog), ("--key-file", args.key_file),
                                        ("--key-id", args.key_id), ("--issuer-id", args.issuer_id),
                                        ("--bundle-id", args.bundle_id), ("--environment", args.environment))
               if not value]
    if missing:
        print(f"retention catalog sync: missing {', '.join(missing)} (flag or RETENTION_* variable)", file=sys.stderr)
        return 2
    if args.environment not in ("Sandbox", "Production"):
        print(f"retention catalog sync: --environment must be Sandbox or Production, not {args.environment!r}",
              file=sys.stderr)
        return 2
    if args.min_interval is not None and args.min_interval < 0:
        print("retention catalog sync: --min-interval must be >= 0", file=sys.stderr)
        return 2
    locales = [x.strip() for x in args.locales.split(",") if x.strip()] if args.locales else None
    try:
        client = make_client(args.key_file, args.key_id, args.issuer_id, args.bundle_id, args.environment)
        plan, written = sync_catalog(
            args.catalog,
            client,
            out_path=args.out,
            dry_run=args.dry_run,
            check_defaults=args.check_defaults or args.adopt_defaults,
            locales=locales,
            adopt_defaults=args.adopt_defaults,
            min_interval=min_interval_for(args.environment) if args.min_interval is None else args.min_interval,
            progress=True,
        )
    except SyncError as exc:
        print(f"retention catalog sync: {exc}; the catalog was not changed", file=sys.stderr)
        return 1
    print(format_report(plan))
    if plan.problem is not None:
        print(f"retention catalog sync: refused, the synced catalog would be invalid: {plan.problem}; "
              "the catalog was not changed", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: nothing written ({plan.calls} call(s) to Apple {args.environment})")
    elif written is None:
        print(f"{args.catalog} already up to date, not rewritten ({plan.calls} call(s) to Apple {args.environment})")
    else:
        print(f"wrote {written} ({len(plan.changes)} change(s); {plan.calls} call(s) to Apple {args.environment})")
    return 0
