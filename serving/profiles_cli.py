"""``retention profiles``: import the developer's subscriber profiles, and show one subscriber's.

``import FILE`` writes the embedded store of :mod:`serving.profiles` (``DATA_DIR/profiles.sqlite``), or with
``--database-url`` the fleet's PostgreSQL database (:func:`serving.database.import_profiles`), which every
replica copies. Bad input (a missing or empty file, a file without ``original_transaction_id``) is one line
on stderr and exit status 1, and the stored profiles are kept.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from retention import VerbParser
from serving import database
from serving.profiles import ProfileStore, import_profiles, profiles_path


def _default_data_dir() -> str:
    return os.environ.get("RETENTION_DATA_DIR") or "data"


def main(argv: Sequence[str]) -> int:
    """Run ``retention profiles import FILE [--data-dir DIR]`` or ``retention profiles show ID``; return the exit status."""
    parser = VerbParser(
        prog="retention profiles",
        description="Import the developer's subscriber profiles into the embedded store the server reads.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import", help="load a Parquet or CSV file keyed by original_transaction_id (replaces the store atomically)"
    )
    imp.add_argument("file", help="Parquet (.parquet) or CSV (.csv) file with an original_transaction_id column")
    imp.add_argument(
        "--data-dir", default=None, help="data folder of the server [env RETENTION_DATA_DIR; default 'data']"
    )
    imp.add_argument(
        "--database-url", default=None,
        help="import into the fleet's PostgreSQL database instead (every replica copies it within seconds) "
        "[env RETENTION_DATABASE_URL]",
    )
    show = sub.add_parser("show", help="print one subscriber's stored profile")
    show.add_argument("original_transaction_id")
    show.add_argument(
        "--data-dir", default=None, help="data folder of the server [env RETENTION_DATA_DIR; default 'data']"
    )
    args = parser.parse_args(list(argv))
    db = profiles_path(args.data_dir or _default_data_dir())
    url = getattr(args, "database_url", None) or (None if args.data_dir else os.environ.get("RETENTION_DATABASE_URL"))
    if args.command == "import" and url:
        t0 = time.perf_counter()
        try:
            n = database.import_profiles(args.file, database.check_url(url))
        except (ValueError, database.DatabaseError) as exc:
            print(f"retention profiles: {exc}", file=sys.stderr)
            return 1
        print(f"imported {n} profiles into {database.safe_url(url)} in {time.perf_counter() - t0:.1f} s; "
              "every replica copies them within a few seconds")
        return 0
    if args.command == "import":
        t0 = time.perf_counter()
        n = import_profiles(args.file, db, progress=True)
        numeric, categorical = ProfileStore(db).columns()
        print(
            f"imported {n} profiles ({len(numeric)} numeric, {len(categorical)} categorical columns) "
            f"into {db} in {time.perf_counter() - t0:.1f} s"
        )
        return 0
    store = ProfileStore(db)
    profile = store.get(args.original_transaction_id)
    if profile is None:
        print(f"retention profiles: no profile for {args.original_transaction_id!r} in {db}", file=sys.stderr)
        return 1
    for name, value in profile.items():
        print(f"{name}\t{value}")
    return 0
