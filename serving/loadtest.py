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
with exactly one of Apple's four answer keys. Failures, with Apple's names: ``TIMED_OUT`` (no
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
from typing import Any
from urllib.parse import urlsplit

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
        """Return the `q`-th percentile (0-100) of response times, nearest rank, in ms (nan with no answer)."""
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        rank = max(1, int(-(-q * len(xs) // 100)))  # ceil(q/100 * n)
        return xs[min(rank, len(xs)) - 1]

    def response_times(self) -> dict[str, float]:
        """Return Apple's PerformanceTestResponseTimes fields: average, p50, p90, p95, p99 (ms)."""
        avg = sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else float("nan")
        return {"average": avg, **{f"p{q}": self.percentile(q) for q in (50, 90, 95, 99)}}


def format_result(r: LoadTestResult) -> str:
    """Return the result printed as Apple prints its performance test result, then PASS or FAIL."""
    c = r.config
    rt = r.response_times()
    lines = [
        f"target: {r.target}",
        f"config: maxConcurrentRequests {c.maxConcurrentRequests}, totalRequests {c.totalRequests}, "
        f"responseTimeThreshold {c.responseTimeThreshold} ms, successRateThreshold {c.successRateThreshold:g}%",
        "responseTimes (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in rt.items()),
        f"successRate: {r.success_rate:.2f}% ({r.successes} of {r.total})",
        "failures: " + (", ".join(f"{k} {n}" for k, n in r.failures.most_common()) if r.failures else "none"),
        f"throughput: {r.requests_per_s:.0f} requests/s over {r.duration_s:.1f} s",
        f"result: {'PASS' if r.passed else 'FAIL'}",
    ]
    return "\n".join(lines)


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

    def __init__(self, url: str, verify: ssl.SSLContext | bool) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.ssl: ssl.SSLContext | None = None
        if self.tls:
            if isinstance(verify, ssl.SSLContext):
                self.ssl = verify
            else:
                self.ssl = ssl.create_default_context()
                if not verify:
                    self.ssl.check_hostname = False
                    self.ssl.verify_mode = ssl.CERT_NONE
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

    async def one(conn: _Connection) -> None:
        body = make_body()
        t0 = time.perf_counter()
        try:
            status, content = await asyncio.wait_for(conn.post(body), threshold_s)
        except Exception as exc:
            conn.close()
            result.failures[_classify(exc)] += 1
            return
        ms = (time.perf_counter() - t0) * 1000.0
        result.latencies_ms.append(ms)
        if ms > config.responseTimeThreshold:
            result.failures["TIMED_OUT"] += 1
        elif status != 200:
            result.failures["UNSUCCESSFUL_HTTP_RESPONSE_CODE"] += 1
        elif not _valid_answer(content):
            result.failures["INVALID_RESPONSE"] += 1
        else:
            result.successes += 1

    async def worker() -> None:
        nonlocal remaining
        conn = _Connection(url, verify)
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
    p = argparse.ArgumentParser(
        prog="retention loadtest",
        description=(
            "Run Apple's performance test shape against URL (a Get Retention Message endpoint): totalRequests "
            "freshly signed requests, at most maxConcurrentRequests in flight, each a success when answered 200 "
            "with a valid body within the response-time threshold; PASS when the success rate reaches the "
            "threshold. Requests are signed by the test CA in --ca (minted there when absent): the endpoint "
            "must trust DIR/root.pem (RETENTION_ROOT_CERTS). Exit 0 on PASS, 1 on FAIL. See docs/apple-setup.md."
        ),
    )
    p.add_argument("url", metavar="URL", help="the endpoint, e.g. http://127.0.0.1:8000/retention/message")
    p.add_argument("--ca", required=True, metavar="DIR", help="folder of the test CA (minted there when absent)")
    p.add_argument("--concurrency", type=int, default=50, help="maxConcurrentRequests (default 50)")
    p.add_argument("--total", type=int, default=2000, help="totalRequests (default 2000)")
    p.add_argument("--threshold-ms", type=int, default=700, help="responseTimeThreshold in ms (default 700, Apple's)")
    p.add_argument("--success-rate", type=float, default=99.9,
                   help="successRateThreshold in percent (default 99.9)")
    p.add_argument("--app-apple-id", type=int, default=1234567890, help="appAppleId of the requests")
    p.add_argument("--environment", default="Sandbox", help="environment of the requests (Sandbox or Production)")
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

    if TestPKI.exists_in(args.ca):
        pki = TestPKI.load(args.ca)
    else:
        pki = TestPKI.mint()
        root = pki.write(args.ca)
        print(f"{prog}: minted a new test CA in {args.ca}; the endpoint must trust it: RETENTION_ROOT_CERTS={root}",
              file=sys.stderr)

    def make_body() -> bytes:
        return bytes(pki.signed_request_body(app_apple_id=args.app_apple_id, environment=args.environment,
                                             product_id=args.product_id, user_locale=args.locale,
                                             original_transaction_id=args.original_transaction_id))

    config = LoadTestConfig(args.concurrency, args.total, args.threshold_ms, args.success_rate)
    result = run(run_loadtest(args.url, make_body, config, verify=verify, progress=sys.stderr.isatty()))
    print(format_result(result))
    return 0 if result.passed else 1
