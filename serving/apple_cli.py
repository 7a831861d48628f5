"""``retention apple``: the realtime URL Apple calls, and Apple's Sandbox performance test of it.

    retention apple realtime-url show|set URL|delete
    retention apple performance-test --original-transaction-id ID [--wait]

Every call goes through Apple's client (serving/apple_api.py), paced under Apple's rate limits
and waiting out a 429 as Apple says. Apple's documented refusals each get one line saying what to
do. Exit status of ``performance-test``: 0 only when Apple reports PASS, 1 on FAIL or a refusal,
3 while Apple still reports PENDING (without ``--wait``, or past ``--wait-timeout``).
Pages: https://developer.apple.com/documentation/retentionmessaging/configure-realtime-url,
https://developer.apple.com/documentation/retentionmessaging/initiate-performance-test
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from appstoreserverlibrary.api_client import APIError, APIException

from retention import VerbParser
from serving.apple_api import AppleSetupError, add_arguments, check_arguments, client_from_arguments

PENDING_EXIT = 3
REALTIME_URL_MAX = 256


def refusal(exc: APIException, *, environment: str, transaction_id: str | None = None) -> str:
    """Return one line for Apple's answer `exc`: what Apple said, and what to do about it."""
    from serving.apple_api import explain_api_exception

    e = exc.api_error
    tid = transaction_id or "the transaction"
    if exc.http_status_code == 401:
        return explain_api_exception(exc)
    if e == APIError.EXISTING_PERFORMANCE_TEST_RUN:
        return ("Apple is already running a performance test for this app: wait for it to finish (check it with "
                "--request-id if you have its id), then start again")
    if e == APIError.FAMILY_TRANSACTION_NOT_SUPPORTED_ERROR:
        return (f"{tid} is a Family Sharing purchase, which Apple's test refuses: use the originalTransactionId of "
                "a Sandbox subscription bought by the Sandbox account itself")
    if e == APIError.TRANSACTION_ID_IS_NOT_ORIGINAL_TRANSACTION_ID_ERROR:
        return (f"{tid} is not an original transaction id: use the subscription's originalTransactionId (the "
                "first purchase's id, as in the transaction's originalTransactionId field)")
    if e in (APIError.INVALID_ORIGINAL_TRANSACTION_ID, APIError.ORIGINAL_TRANSACTION_ID_NOT_FOUND,
             APIError.ORIGINAL_TRANSACTION_ID_NOT_FOUND_RETRYABLE):
        return (f"Apple does not know {tid} in Sandbox: buy the subscription with a Sandbox account and use its "
                "originalTransactionId")
    if e == APIError.REALTIME_URL_NOT_FOUND:
        return (f"no realtime URL is configured in {environment}: set one first with "
                f"`retention apple realtime-url set https://... --environment {environment}`")
    if e == APIError.FORBIDDEN_NO_PASSING_TEST:
        return ("Apple accepts a Production realtime URL only after a Sandbox performance test has passed: set the "
                "Sandbox URL, run `retention apple performance-test --environment Sandbox --original-transaction-id ID "
                "--wait` (a Sandbox purchase's id), then set this one")
    if e == APIError.BAD_REQUEST_REALTIME_URL:
        return f"Apple refused the URL: it must be an https URL of at most {REALTIME_URL_MAX} characters that Apple can reach"
    if e == APIError.PERFORMANCE_TEST_RUN_NOT_FOUND or e == APIError.INVALID_REQUEST_ID:
        return "Apple knows no performance test with that request id (ids are per environment; results expire)"
    if e == APIError.INVALID_PERFORMANCE_TEST_REQUEST:
        return f"Apple refused the performance test request: {exc.error_message or 'invalid request'}"
    return explain_api_exception(exc)


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="retention apple",
                                description="Apple's realtime URL and Sandbox performance test. See docs/apple-setup.md.")
    sub = p.add_subparsers(dest="cmd", required=True)
    rt = sub.add_parser("realtime-url", help="show, set or delete the URL Apple calls for retention messages")
    rt.add_argument("action", choices=("show", "set", "delete"), metavar="show|set|delete")
    rt.add_argument("url", nargs="?", default=None, help="with set: the https URL of your endpoint")
    add_arguments(rt)
    pt = sub.add_parser("performance-test", help="run Apple's Sandbox performance test of your realtime URL",
                        description="Start Apple's Sandbox performance test of the Sandbox realtime URL (or read a "
                                    "test's result with --request-id) and print what Apple reports. Exit 0 only on "
                                    "PASS, 1 on FAIL or a refusal, 3 while it is still PENDING.")
    pt.add_argument("--original-transaction-id", default=None,
                    help="originalTransactionId of a Sandbox subscription purchase (not Family Sharing)")
    pt.add_argument("--request-id", default=None, help="read the result of a test already started, instead of starting one")
    pt.add_argument("--wait", action="store_true", help="poll until Apple reports PASS or FAIL")
    pt.add_argument("--poll-interval", type=float, default=None,
                    help="seconds between two polls (default: --min-interval, else Apple's Sandbox rate limit, 10)")
    pt.add_argument("--wait-timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    add_arguments(pt)
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``retention apple``."""
    args = _parser().parse_args(argv)
    prog = f"retention apple {args.cmd}"
    if args.cmd == "performance-test" and not args.environment:
        args.environment = "Sandbox"  # Apple runs the test in Sandbox only
    bad = check_arguments(args, prog)
    if bad is not None:
        return bad
    try:
        if args.cmd == "realtime-url":
            return _realtime_url(args, prog)
        return _performance_test(args, prog)
    except AppleSetupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


def _pacer(args: argparse.Namespace) -> Any:
    from serving.catalog_sync import Pacer, min_interval_for

    return Pacer(min_interval_for(args.environment) if args.min_interval is None else args.min_interval)


def _call(pacer: Any, endpoint: str, fn: Any, *fn_args: Any) -> Any:
    """Return fn(*fn_args) paced, 429s waited out; APIException passes through for `refusal`."""
    from serving.catalog_sync import SyncError

    caught: list[APIException] = []

    def guarded() -> Any:
        try:
            return fn(*fn_args)
        except APIException as exc:
            from serving.apple_api import RateLimited

            if isinstance(exc, RateLimited):
                raise
            caught.append(exc)
            return None

    try:
        out = pacer.call(endpoint, guarded)
    except SyncError as exc:
        raise _StopError(str(exc)) from None
    if caught:
        raise caught[0]
    return out


class _StopError(Exception):
    """A failure already phrased as one line."""


def _realtime_url(args: argparse.Namespace, prog: str) -> int:
    from appstoreserverlibrary.models.RealtimeUrlRequest import RealtimeUrlRequest

    env = args.environment
    if args.action == "set":
        url = args.url or ""
        if not url.startswith("https://") or len(url) > REALTIME_URL_MAX or len(url) <= len("https://"):
            print(f"{prog}: set needs an https URL of at most {REALTIME_URL_MAX} characters (Apple's rule), "
                  f"not {url!r}", file=sys.stderr)
            return 2
    elif args.url is not None:
        print(f"{prog}: {args.action} takes no URL", file=sys.stderr)
        return 2
    client = client_from_arguments(args)
    pacer = _pacer(args)
    try:
        if args.action == "show":
            try:
                got = _call(pacer, "get_realtime_url", client.get_realtime_url)
            except APIException as exc:
                if exc.api_error == APIError.REALTIME_URL_NOT_FOUND:
                    print(f"no realtime URL configured in {env}")
                    return 0
                raise
            print(f"{env} realtime URL: {got.realtimeURL}")
        elif args.action == "set":
            _call(pacer, "configure_realtime_url", client.configure_realtime_url, RealtimeUrlRequest(realtimeURL=args.url))
            print(f"{env} realtime URL set to {args.url}")
        else:
            try:
                _call(pacer, "delete_realtime_url", client.delete_realtime_url)
            except APIException as exc:
                if exc.api_error == APIError.REALTIME_URL_NOT_FOUND:
                    print(f"no realtime URL configured in {env}: nothing to delete")
                    return 0
                raise
            print(f"{env} realtime URL deleted: Apple now shows its fallback messages without calling you")
    except APIException as exc:
        print(f"{prog}: {refusal(exc, environment=env)}", file=sys.stderr)
        return 1
    except _StopError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def _config_line(config: Any) -> str:
    if config is None:
        return "config: (Apple sent none)"
    parts = [f"maxConcurrentRequests {config.maxConcurrentRequests}", f"totalRequests {config.totalRequests}"]
    if config.totalDuration is not None:
        parts.append(f"totalDuration {config.totalDuration} ms")
    parts += [f"responseTimeThreshold {config.responseTimeThreshold} ms",
              f"successRateThreshold {config.successRateThreshold}%"]
    return "config: " + ", ".join(parts)


def format_performance_result(res: Any) -> str:
    """Return Apple's PerformanceTestResultResponse as printed lines (states and reasons as Apple names them)."""
    lines = [_config_line(res.config)]
    if res.target:
        lines.append(f"target: {res.target}")
    rt = res.responseTimes
    if rt is not None:
        lines.append("responseTimes (ms): " + ", ".join(
            f"{k} {getattr(rt, k)}" for k in ("average", "p50", "p90", "p95", "p99") if getattr(rt, k) is not None))
    if res.successRate is not None:
        lines.append(f"successRate: {res.successRate}%")
    failures = res.rawFailures or {}
    lines.append("failures: " + (", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1]))
                                 if failures else "none"))
    if res.numPending:
        lines.append(f"numPending: {res.numPending}")
    lines.append(f"result: {res.rawResult or 'unknown'}")
    return "\n".join(lines)


def _performance_test(args: argparse.Namespace, prog: str) -> int:
    from appstoreserverlibrary.models.PerformanceTestRequest import PerformanceTestRequest

    env = args.environment
    if env != "Sandbox":
        print(f"{prog}: Apple runs the performance test in Sandbox only; use --environment Sandbox", file=sys.stderr)
        return 2
    if bool(args.original_transaction_id) == bool(args.request_id):
        print(f"{prog}: give --original-transaction-id ID (start a test) or --request-id ID (read one)", file=sys.stderr)
        return 2
    client = client_from_arguments(args)
    pacer = _pacer(args)
    poll = args.poll_interval if args.poll_interval is not None else pacer.min_interval
    if poll < 0:
        print(f"{prog}: --poll-interval must be >= 0", file=sys.stderr)
        return 2
    pacer.intervals["get_performance_test_results"] = poll  # the pacer spaces the polls
    tid = args.original_transaction_id
    try:
        request_id = args.request_id
        if request_id is None:
            started = _call(pacer, "initiate_performance_test", client.initiate_performance_test,
                            PerformanceTestRequest(originalTransactionId=tid))
            request_id = started.requestId
            print(f"started Apple's performance test {request_id} (Sandbox)")
            print(_config_line(started.config), flush=True)
        deadline = time.monotonic() + args.wait_timeout
        while True:
            res = _call(pacer, "get_performance_test_results", client.get_performance_test_results, request_id)
            if res.rawResult != "PENDING" or not args.wait or time.monotonic() >= deadline:
                break
            print(f"PENDING ({res.numPending} request(s) still to send); next check in {poll:.0f} s",
                  file=sys.stderr, flush=True)
    except APIException as exc:
        print(f"{prog}: {refusal(exc, environment=env, transaction_id=tid)}", file=sys.stderr)
        return 1
    except _StopError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(format_performance_result(res))
    if res.rawResult == "PASS":
        return 0
    if res.rawResult == "PENDING":
        print(f"{prog}: still PENDING: read it later with --request-id {request_id}", file=sys.stderr)
        return PENDING_EXIT
    return 1
