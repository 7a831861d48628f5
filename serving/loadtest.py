"""``retention loadtest URL``: Apple's performance test, run locally against any Get Retention Message endpoint.

Apple's Sandbox performance test (https://developer.apple.com/documentation/retentionmessaging/initiate-performance-test)
sends ``totalRequests`` signed requests with at most ``maxConcurrentRequests`` in flight and
counts a request as successful when the endpoint answers in time with a valid body; it passes
when the share of successes reaches ``successRateThreshold``. This does the same from here, with
requests freshly signed (each its own ``requestIdentifier`` and ``signedDate``) by a local
Apple-shaped test CA (serving/testpki.py), so the endpoint under test must trust that CA's root
(``RETENTION_ROOT_CERTS``). It prints the result in the shape of Apple's
PerformanceTestResultResponse: the configuration, p50/p90/p95/p99 response times, the success
rate, failures by Apple's ``SendAttemptResult`` reasons, and PASS or FAIL.

A request succeeds when it gets HTTP 200 within the response-time threshold and a JSON body
with exactly one of Apple's four answer keys. Response times include the timed-out requests
(each counted at the threshold, when it was given up); a request that got no answer
at all (a socket or TLS error) has no response time. Failures, with Apple's names: ``TIMED_OUT`` (no
answer within the threshold), ``UNSUCCESSFUL_HTTP_RESPONSE_CODE``, ``INVALID_RESPONSE``,
``TLS_ISSUE``, ``SOCKET_ISSUE``, ``NO_RESPONSE``, ``OTHER``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from retention import VerbParser

ANSWER_KEYS = frozenset({"message", "alternateProduct", "promotionalOffer", "advancedCommerceInfo"})


@dataclass(frozen=True)
class LoadTestConfig:
    """Apple's PerformanceTestConfig fields (successRateThreshold in percent, may be fractional here)."""

    maxConcurrentRequests: int = 50
    totalRequests: int = 2000
    responseTimeThreshold: int = 700  # ms
    successRateThreshold: float = 99.9  # percent


@dataclass
class LoadTestResult:
    """What a run measured, in the shape of Apple's PerformanceTestResultResponse (times in ms)."""

    config: LoadTestConfig
    target: str
    latencies_ms: list[float] = field(default_factory=list)  # of every answer received, successful or not
    successes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    #: the answers that were not 200: "HTTP 403 wrong_environment" (the endpoint's error code when it gave one)
    statuses: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0

    @property
    def total(self) -> int:
        """Return the number of requests sent."""
        return self.successes + sum(self.failures.values())

    @property
    def success_rate(self) -> float:
        """Return the share of successful requests, in percent."""
        return 100.0 * self.successes / self.total if self.total else 0.0

    @property
    def passed(self) -> bool:
        """Return True when the success rate reaches the threshold (Apple's PASS)."""
        return self.total > 0 and self.success_rate >= self.config.successRateThreshold

    @property
    def requests_per_s(self) -> float:
        """Return requests sent per second of wall time."""
        return self.total / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Return the `q`-th percentile (0-100) of response times, nearest rank, in ms (nan with no answer; never printed)."""
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        rank = max(1, int(-(-q * len(xs) // 100)))  # ceil(q/100 * n)
        return xs[min(rank, len(xs)) - 1]

    def response_times(self) -> dict[str, float]:
        """Return Apple's PerformanceTestResponseTimes fields: average, p50, p90, p95, p99 (ms); empty with no answer."""
        if not self.latencies_ms:
            return {}
        avg = sum(self.latencies_ms) / len(self.latencies_ms)
        return {"average": avg, **{f"p{q}": self.percentile(q) for q in (50, 90, 95, 99)}}


#: what a non-200 answer usually means, by the endpoint's error code (docs/http-api.md)
_HINTS = {
    "wrong_environment": "the endpoint serves the other environment: give --environment to match its "
                         "RETENTION_ENVIRONMENT (loadtest signs Sandbox requests by default)",
    "wrong_app": "the endpoint serves another app: give --app-apple-id to match its RETENTION_APP_APPLE_ID",
    "untrusted_chain": "the endpoint does not trust the test CA: add the --ca folder's root.pem to its "
                       "RETENTION_ROOT_CERTS and restart it",
}


def format_result(r: LoadTestResult) -> str:
    """Return the result printed as Apple prints its performance test result, then PASS or FAIL."""
    c = r.config
    rt = r.response_times()
    answered = len(r.latencies_ms)
    times = ", ".join(f"{k} {v:.1f}" for k, v in rt.items()) if rt else "none (no request was answered)"
    if rt and r.failures.get("TIMED_OUT"):
        times += " (timed-out requests counted at the threshold, when they were given up)"
    if rt and answered < r.total:
        times += f"; {r.total - answered} request(s) without any answer are not in them"
    failures = []
    for k, n in r.failures.most_common():
        detail = ""
        if k == "UNSUCCESSFUL_HTTP_RESPONSE_CODE" and r.statuses:
            detail = " (" + ", ".join(f"{s} {m}" for s, m in r.statuses.most_common()) + ")"
        failures.append(f"{k} {n}{detail}")
    lines = [
        f"target: {r.target}",
        f"config: maxConcurrentRequests {c.maxConcurrentRequests}, totalRequests {c.totalRequests}, "
        f"responseTimeThreshold {c.responseTimeThreshold} ms, successRateThreshold {c.successRateThreshold:g}%",
        "responseTimes (ms): " + times,
        f"successRate: {r.success_rate:.2f}% ({r.successes} of {r.total})",
        "failures: " + (", ".join(failures) if failures else "none"),
    ]
    for status in r.statuses:
        code = status.rsplit(" ", 1)[-1]
        if code in _HINTS:
            lines.append(f"hint: {_HINTS[code]}")
    if answered and r.duration_s > 0:
        lines.append(f"throughput: {r.requests_per_s:.0f} requests/s over {r.duration_s:.1f} s")
    else:
        lines.append("throughput: none (no request was answered)")
    lines.append(f"result: {'PASS' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def _status_label(status: int, body: bytes) -> str:
    """Return "HTTP 403 wrong_environment" (the endpoint's stable error code when its body has one), else "HTTP 403"."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    code = doc.get("error") if isinstance(doc, dict) else None
    return f"HTTP {status} {code}" if isinstance(code, str) and code.isidentifier() and len(code) <= 64 \
        else f"HTTP {status}"


def ssl_context(url: str, verify: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    """Return the one TLS context of a run against `url` (None for http://).

    Built once per run: building a default context loads the system's CA store (tens of ms of
    CPU), too much to do per connection on the event loop that times the requests.
    """
    if urlsplit(url).scheme != "https":
        return None
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _valid_answer(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in ANSWER_KEYS and isinstance(
        next(iter(doc.values())), dict)


class _Answer:
    """httptools callbacks for one response: the body, and whether it is complete."""

    __slots__ = ("body", "done")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True


class _Connection:
    """One keep-alive HTTP/1.1 connection: requests written by hand, responses parsed by httptools (C).

    The client must cost the machine much less than the server it measures: httpx spends about
    1.5 ms of CPU per request here (its pool is scanned per request), this about a tenth of that.
    """

    def __init__(self, url: str, context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.ssl = context  # one per run (ssl_context)
        host_header = parts.netloc.encode("idna")
        self.head = b"POST " + (parts.path or "/").encode() + (b"?" + parts.query.encode() if parts.query else b"") + \
            b" HTTP/1.1\r\nHost: " + host_header + b"\r\nContent-Type: application/json\r\nContent-Length: "
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """Return (status, body) of one POST; opens the connection first when there is none."""
        import httptools

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.tls else None)
        assert self.reader is not None
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = _Answer()
        parser = httptools.HttpResponseParser(answer)
        while not answer.done:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionResetError("the server closed the connection before answering")
            parser.feed_data(data)
        if not parser.should_keep_alive():
            self.close()
        return parser.get_status_code(), b"".join(answer.body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _classify(exc: BaseException) -> str:
    """Return Apple's SendAttemptResult name for a request that got no usable HTTP answer."""
    import httptools

    if isinstance(exc, TimeoutError):
        return "TIMED_OUT"
    if isinstance(exc, ssl.SSLError):
        return "TLS_ISSUE"
    if isinstance(exc, httptools.HttpParserError):
        return "INVALID_RESPONSE"
    if isinstance(exc, ConnectionResetError | asyncio.IncompleteReadError):
        return "PREMATURE_CLOSE"
    if isinstance(exc, OSError):
        return "SOCKET_ISSUE"
    return "OTHER"


async def run_loadtest(
    url: str,
    make_body: Any,
    config: LoadTestConfig,
    *,
    verify: ssl.SSLContext | bool = True,
    progress: bool = False,
) -> LoadTestResult:
    """Return the result of sending `config.totalRequests` bodies from `make_body()` to `url`, POST, JSON.

    At most `config.maxConcurrentRequests` are in flight, each on its own keep-alive connection;
    each body is made (signed) just before it is sent. A request unanswered at the threshold is
    TIMED_OUT, and its connection is closed (the next request opens a new one).
    """
    result = LoadTestResult(config, url)
    threshold_s = config.responseTimeThreshold / 1000.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.totalRequests, desc="loadtest", unit="req", file=sys.stderr)
    remaining = config.totalRequests
    context = ssl_context(url, verify)

    async def one(conn: _Connection) -> None:
        body = make_body()
        t0 = time.perf_counter()
        try:
            status, content = await asyncio.wait_for(conn.post(body), threshold_s)
        except Exception as exc:
            conn.close()
            reason = _classify(exc)
            if reason == "TIMED_OUT":  # in the response times, at least the threshold (when it was given up)
                result.latencies_ms.append(max(config.responseTimeThreshold, (time.perf_counter() - t0) * 1000.0))
            result.failures[reason] += 1
            return
        ms = (time.perf_counter() - t0) * 1000.0
        result.latencies_ms.append(ms)
        if ms > config.responseTimeThreshold:
            result.failures["TIMED_OUT"] += 1
        elif status != 200:
            result.failures["UNSUCCESSFUL_HTTP_RESPONSE_CODE"] += 1
            result.statuses[_status_label(status, content)] += 1
        elif not _valid_answer(content):
            result.failures["INVALID_RESPONSE"] += 1
        else:
            result.successes += 1

    async def worker() -> None:
        nonlocal remaining
        conn = _Connection(url, context)
        try:
            while remaining > 0:
                remaining -= 1
                await one(conn)
                if bar is not None:
                    bar.update(1)
        finally:
            conn.close()

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(config.maxConcurrentRequests, config.totalRequests))))
    result.duration_s = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    return result


def run(coro: Any) -> LoadTestResult:
    """Return the result of `coro` run on uvloop (about 30% less client CPU per request than asyncio's loop)."""
    import uvloop

    result: LoadTestResult = uvloop.run(coro)
    return result


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention loadtest",
        description=(
            "Run Apple's performance test shape against URL (a Get Retention Message endpoint): totalRequests "
            "freshly signed requests, at most maxConcurrentRequests in flight, each a success when answered 200 "
            "with a valid body within the response-time threshold; PASS when the success rate reaches the "
            "threshold. Requests are signed by the test CA in --ca: the endpoint must trust DIR/root.pem "
            "(RETENTION_ROOT_CERTS). A --ca folder that does not exist yet gets a new test CA and the run stops "
            "there (exit 2) so the endpoint can be configured to trust it. Exit 0 on PASS, 1 on FAIL, 2 on bad "
            "usage. See docs/apple-setup.md."
        ),
    )
    p.add_argument("url", metavar="URL", help="the endpoint, e.g. http://127.0.0.1:8000/retention/message")
    p.add_argument("--ca", required=True, metavar="DIR",
                   help="folder of the test CA (when absent: minted there, and the run stops so the endpoint can trust it)")
    p.add_argument("--concurrency", type=int, default=50, help="maxConcurrentRequests (default 50)")
    p.add_argument("--total", type=int, default=2000, help="totalRequests (default 2000)")
    p.add_argument("--threshold-ms", type=int, default=700, help="responseTimeThreshold in ms (default 700, Apple's)")
    p.add_argument("--success-rate", type=float, default=99.9,
                   help="successRateThreshold in percent, 1 to 100 (default 99.9, i.e. 99.9%%)")
    p.add_argument("--app-apple-id", type=int, default=1234567890, help="appAppleId of the requests")
    p.add_argument("--environment", default="Sandbox",
                   help="environment of the requests, Sandbox or Production (default Sandbox, as Apple's "
                        "performance test; it must match the endpoint's RETENTION_ENVIRONMENT)")
    p.add_argument("--product-id", default="com.example.premium.monthly", help="productId of the requests")
    p.add_argument("--locale", default="en-US", help="userLocale of the requests")
    p.add_argument("--original-transaction-id", default=None,
                   help="originalTransactionId of every request (default: a random one per request)")
    p.add_argument("--cacert", default=None, help="PEM bundle to verify an https endpoint's certificate with")
    p.add_argument("--insecure", action="store_true", help="do not verify an https endpoint's certificate (staging)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``retention loadtest``: 0 on PASS, 1 on FAIL, 2 on bad usage."""
    args = _parser().parse_args(argv)
    prog = "retention loadtest"
    problems = []
    if not args.url.startswith(("http://", "https://")):
        problems.append(f"URL must start with http:// or https://, not {args.url!r}")
    if args.concurrency < 1 or args.total < 1:
        problems.append("--concurrency and --total must be at least 1")
    if args.threshold_ms < 1:
        problems.append("--threshold-ms must be at least 1")
    if not 0 <= args.success_rate <= 100:
        problems.append("--success-rate must be a percentage between 0 and 100")
    elif 0 < args.success_rate <= 1:
        problems.append(f"--success-rate is a percentage: {args.success_rate:g} would mean {args.success_rate:g}%; "
                        f"for {100 * args.success_rate:g}% give {100 * args.success_rate:g}")
    if args.environment not in ("Sandbox", "Production"):
        problems.append(f"--environment must be Sandbox or Production, not {args.environment!r}")
    if problems:
        print(f"{prog}: {problems[0]}", file=sys.stderr)
        return 2
    verify: ssl.SSLContext | bool = True
    if args.insecure:
        verify = False
    elif args.cacert:
        try:
            verify = ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as exc:
            print(f"{prog}: cannot read --cacert {args.cacert}: {exc}", file=sys.stderr)
            return 2

    from serving.testpki import TestPKI

    ca = Path(args.ca)
    if ca.exists() and not ca.is_dir():
        print(f"{prog}: --ca {args.ca} is a file; it must be the test CA's folder (a new one is minted in a folder "
              "that does not exist yet)", file=sys.stderr)
        return 2
    try:
        if TestPKI.exists_in(args.ca):
            pki = TestPKI.load(args.ca)
        else:
            root = TestPKI.mint().write(args.ca)
            print(f"{prog}: minted a new test CA in {args.ca}; no request was sent: the endpoint cannot trust it yet. "
                  f"Add {root} to the endpoint's RETENTION_ROOT_CERTS, restart it, and run this again", file=sys.stderr)
            return 2
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot use --ca {args.ca}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2

    def make_body() -> bytes:
        return bytes(pki.signed_request_body(app_apple_id=args.app_apple_id, environment=args.environment,
                                             product_id=args.product_id, user_locale=args.locale,
                                             original_transaction_id=args.original_transaction_id))

    config = LoadTestConfig(args.concurrency, args.total, args.threshold_ms, args.success_rate)
    result = run(run_loadtest(args.url, make_body, config, verify=verify, progress=sys.stderr.isatty()))
    print(format_result(result))
    return 0 if result.passed else 1
