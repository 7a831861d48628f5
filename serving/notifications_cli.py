"""``retention notifications backfill``: record the outcomes Apple sent while they could not be stored.

In Sandbox Apple sends a notification once; in Production it stops retrying after a few days.
This verb reads Apple's notification history (Get Notification History, through Apple's own
``AppStoreServerAPIClient``) from ``--since`` to ``--until``, page by page, verifies each
signed payload exactly as ``POST /apple/notifications`` does (same roots, same checks, same
mapping to events and offers), and records every outcome whose ``notificationUUID`` no log in
``--data-dir`` holds yet: running it twice records nothing the second time.
https://developer.apple.com/documentation/appstoreserverapi/get-notification-history
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from retention import VerbParser, parse_time
from serving.settings import Settings

#: Apple keeps about 180 days of notification history.
HISTORY_DAYS = 180
#: The log file the backfill writes (beside the server processes' own files, read by every export).
BACKFILL_WORKER = "backfill"


def recorded_uuids(data_dir: Path) -> set[str]:
    """Return the notificationUUIDs already recorded in any decision log file of `data_dir`."""
    from serving.log_reader import log_files

    seen: set[str] = set()
    for path in log_files(data_dir):
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            seen.update(r[0] for r in conn.execute("SELECT notification_uuid FROM outcomes"))
        except sqlite3.OperationalError:  # a file without an outcomes table yet
            pass
        finally:
            conn.close()
    return seen


@dataclasses.dataclass
class BackfillResult:
    """What a backfill saw and did: notifications read, outcomes recorded, already there, without outcome, refused."""

    read: int = 0
    recorded: int = 0
    already: int = 0
    ignored: int = 0
    refused: int = 0
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)


class _Verifying:
    """The two things :func:`serving.notifications.parse_notification` needs of the service."""

    def __init__(self, settings: Settings) -> None:
        from serving.verify import RequestVerifier

        self.settings = settings
        self.verifier = RequestVerifier.from_settings(settings)


def backfill(
    client: Any,
    settings: Settings,
    since_ms: int,
    until_ms: int,
    *,
    progress: bool | None = None,
) -> BackfillResult:
    """Return what recording Apple's notification history from `since_ms` to `until_ms` did.

    `client` is Apple's ``AppStoreServerAPIClient`` (or one that answers ``get_notification_history``
    like it). Outcomes go to ``decisions-<host>-backfill.sqlite`` in the settings' data folder,
    each notificationUUID once across every log there. A payload that does not verify is counted
    by its error code and left out. Raises APIException when Apple refuses a page, OSError when
    the log cannot be written. The progress bar shows only on a terminal (`progress` None).
    """
    from appstoreserverlibrary.models.NotificationHistoryRequest import NotificationHistoryRequest
    from tqdm import tqdm

    from serving.errors import VerificationError
    from serving.log_writer import DecisionLog, log_file_name
    from serving.notifications import parse_notification

    data_dir = Path(settings.data_dir)
    seen = recorded_uuids(data_dir)
    svc = _Verifying(settings)
    result = BackfillResult()
    dlog = DecisionLog(data_dir / log_file_name(BACKFILL_WORKER))
    dlog.start()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(desc="backfill", unit="notification", file=sys.stderr, disable=not show)
    try:
        request = NotificationHistoryRequest(startDate=since_ms, endDate=until_ms)
        token: str | None = None
        while True:
            page = client.get_notification_history(token, request)
            for item in page.notificationHistory or []:
                result.read += 1
                bar.update()
                if not item.signedPayload:
                    result.ignored += 1
                    continue
                try:
                    outcome = parse_notification(svc, item.signedPayload)
                except VerificationError as exc:
                    result.refused += 1
                    result.refusals[exc.code] = result.refusals.get(exc.code, 0) + 1
                    continue
                if outcome is None:
                    result.ignored += 1
                elif outcome.notification_uuid in seen:
                    result.already += 1
                else:
                    seen.add(outcome.notification_uuid)
                    dlog.log_outcome(
                        outcome.notification_uuid, outcome.original_transaction_id, outcome.event, outcome.at_ms,
                        outcome.raw_type, outcome.raw_subtype, offer_type=outcome.offer_type,
                        offer_identifier=outcome.offer_identifier, offer_discount_type=outcome.offer_discount_type,
                        transaction_reason=outcome.transaction_reason,
                    )
                    result.recorded += 1
            token = page.paginationToken
            if not page.hasMore or not token:
                break
        if not dlog.flush(30.0) or dlog.stats()["write_errors"] or dlog.stats()["dropped"]:
            raise OSError(f"the outcomes could not all be written to {dlog.path}; run the backfill again")
    finally:
        bar.close()
        dlog.close()
    return result


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = VerbParser(prog="retention notifications", description="App Store Server Notifications.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "backfill",
        help="record the outcomes in Apple's notification history that the log does not hold yet",
        description="Read Apple's notification history (Get Notification History) and record every outcome whose "
        "notificationUUID is not in the log yet. Run it after an outage, or any time: it is idempotent.",
    )
    b.add_argument("--since", required=True, help="start: ms since 1970 or ISO 8601 (Apple keeps about 180 days)")
    b.add_argument("--until", default=None, help="end (default: now), same forms")
    b.add_argument("--key-file", default=env("RETENTION_OFFER_KEY_FILE"),
                   help="In-App Purchase key (.p8) [env RETENTION_OFFER_KEY_FILE]")
    b.add_argument("--key-id", default=env("RETENTION_OFFER_KEY_ID"), help="its key id [env RETENTION_OFFER_KEY_ID]")
    b.add_argument("--issuer-id", default=env("RETENTION_OFFER_ISSUER_ID"),
                   help="issuer id [env RETENTION_OFFER_ISSUER_ID]")
    b.add_argument("--bundle-id", default=env("RETENTION_BUNDLE_ID"), help="your app's bundle id [env RETENTION_BUNDLE_ID]")
    b.add_argument("--environment", default=env("RETENTION_ENVIRONMENT"), choices=("Sandbox", "Production"),
                   help="Sandbox or Production [env RETENTION_ENVIRONMENT]")
    b.add_argument("--data-dir", default=None, help="folder of the decision and outcome log [env RETENTION_DATA_DIR]")
    b.add_argument("--create-data-dir", action="store_true",
                   help="record into a data folder that does not exist yet or holds no decision log (by default "
                   "such a folder is refused: a mistyped --data-dir would record where no export looks)")
    b.add_argument("--root-certs", default=None,
                   help="root certificates to trust, comma-separated [env RETENTION_ROOT_CERTS]")
    b.add_argument("--app-apple-id", type=int, default=None, help="your app's appAppleId [env RETENTION_APP_APPLE_ID]")
    return p


def main(argv: list[str]) -> int:
    """Run ``retention notifications``; return the exit status (bad input is one line on stderr)."""
    args = _parser().parse_args(argv)
    missing = [f"--{n.replace('_', '-')}" for n in ("key_file", "key_id", "issuer_id", "bundle_id", "environment")
               if not getattr(args, n)]
    if missing:
        print(f"retention notifications: error: {', '.join(missing)} needed (or their RETENTION_* variables)",
              file=sys.stderr)
        return 2
    try:
        since = parse_time(args.since)
        until = parse_time(args.until) if args.until else int(time.time() * 1000)
    except ValueError as exc:
        print(f"retention notifications: error: {exc}", file=sys.stderr)
        return 2
    if since >= until:
        print("retention notifications: error: --since must be before --until", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {"environment": args.environment, "bundle_id": args.bundle_id}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.root_certs:
        overrides["root_certs"] = tuple(s for s in args.root_certs.split(",") if s)
    if args.app_apple_id is not None:
        overrides["app_apple_id"] = args.app_apple_id
    settings = Settings.from_env(**overrides)
    data_dir = Path(settings.data_dir)
    if not args.create_data_dir:
        from serving.log_reader import log_files

        why = ("does not exist" if not data_dir.is_dir()
               else None if log_files(data_dir) else "holds no decision log (decisions-*.sqlite)")
        if why is not None:
            print(f"retention notifications: error: the data folder {data_dir} {why}; give the server's --data-dir, "
                  "or --create-data-dir to record there anyway", file=sys.stderr)
            return 2
    if not settings.root_certs:
        print("retention notifications: error: no root certificate configured (--root-certs or RETENTION_ROOT_CERTS)",
              file=sys.stderr)
        return 2
    from appstoreserverlibrary.api_client import APIException

    from serving.apple_api import describe_api_exception, make_client

    client = make_client(args.key_file, args.key_id, args.issuer_id, args.bundle_id, args.environment)
    try:
        r = backfill(client, settings, since, until)
    except APIException as exc:
        print(f"retention notifications: error: {describe_api_exception(exc)}", file=sys.stderr)
        return 1
    refused = "".join(f", {n} {code}" for code, n in sorted(r.refusals.items()))
    print(f"read {r.read:,} notifications: {r.recorded:,} recorded, {r.already:,} already recorded, "
          f"{r.ignored:,} without an outcome, {r.refused:,} refused{refused}")
    return 0
