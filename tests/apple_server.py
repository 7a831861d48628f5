"""A loopback stand-in for Apple's Retention Messaging API, reached through Apple's own client.

It implements the documented paths and methods under ``/inApps/v1/messaging`` (images,
messages, default messages, realtime URL, performance test), checks the bearer token the way
Apple does for a token made by ``AppStoreServerAPIClient`` (ES256 with the In-App Purchase key,
``kid``, ``iss``, ``aud`` = ``appstoreconnect-v1``, ``bid``, ``exp``), keeps state, and answers
Apple's documented bodies and error codes (``{"errorCode": ..., "errorMessage": ...}``),
including 429 with ``Retry-After`` (a UNIX time in milliseconds, as Apple's server APIs send it).

Test controls: ``approve``/``reject`` (Apple's review), ``auto_approve`` (the sandbox approves at
once), ``throttle`` (the next calls answer 429), ``fail_after`` (the server breaks after N more
changes: an interrupted run), ``performance_result`` (what a test run reports).
Pages: https://developer.apple.com/documentation/retentionmessaging
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PREFIX = "/inApps/v1/messaging"
MAX_MESSAGES = 2000
MAX_IMAGES = 2000
#: error codes of Apple's Retention Messaging API (the numbers of appstoreserverlibrary's APIError)
E = {
    "GENERAL_BAD_REQUEST": 4000000, "INVALID_ORIGINAL_TRANSACTION_ID": 4000008, "INVALID_IMAGE": 4000161,
    "HEADER_TOO_LONG": 4000162, "BODY_TOO_LONG": 4000163, "INVALID_LOCALE": 4000164, "ALT_TEXT_TOO_LONG": 4000175,
    "FAMILY_TRANSACTION_NOT_SUPPORTED_ERROR": 4000185, "TRANSACTION_ID_IS_NOT_ORIGINAL_TRANSACTION_ID_ERROR": 4000187,
    "INVALID_PERFORMANCE_TEST_REQUEST": 4000211, "INVALID_REQUEST_ID": 4000212, "EXISTING_PERFORMANCE_TEST_RUN": 4000213,
    "BAD_REQUEST_REALTIME_URL": 4000215, "BAD_REQUEST_IMAGE_SIZE": 4000216, "BAD_REQUEST_TOO_MANY_BULLET_POINTS": 4000218,
    "BAD_REQUEST_BULLET_POINT_TEXT_TOO_LONG": 4000219, "BAD_REQUEST_ABOVE_IMAGE_REQUIRES_AN_IMAGE": 4000224,
    "MAXIMUM_NUMBER_OF_IMAGES_REACHED": 4030014, "MAXIMUM_NUMBER_OF_MESSAGES_REACHED": 4030016,
    "MESSAGE_NOT_APPROVED": 4030017, "IMAGE_NOT_APPROVED": 4030018, "IMAGE_IN_USE": 4030019,
    "FORBIDDEN_NO_PASSING_TEST": 4030026, "ORIGINAL_TRANSACTION_ID_NOT_FOUND": 4040005, "IMAGE_NOT_FOUND": 4040014,
    "MESSAGE_NOT_FOUND": 4040015, "PERFORMANCE_TEST_RUN_NOT_FOUND": 4040018, "DEFAULT_MESSAGE_NOT_FOUND": 4040020,
    "REALTIME_URL_NOT_FOUND": 4040021, "IMAGE_ALREADY_EXISTS": 4090000, "MESSAGE_ALREADY_EXISTS": 4090001,
    "RATE_LIMIT_EXCEEDED": 4290000, "GENERAL_INTERNAL": 5000000,
}
LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


# ---- PNG files for tests ----------------------------------------------------------------------
def png(width: int, height: int, *, alpha: bool = False, trns: bool = False, seed: int = 0) -> bytes:
    """Return a valid PNG of `width` x `height` (RGB, or RGBA with `alpha`; a tRNS chunk with `trns`)."""
    channels = 4 if alpha else 3
    row = b"\x00" + bytes([seed % 256]) * (width * channels)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if alpha else 2, 0, 0, 0)
    extra = chunk(b"tRNS", b"\x00\x00\x00\x00\x00\x00") if trns else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


# ---- state --------------------------------------------------------------------------------------
@dataclass
class PerformanceRun:
    originalTransactionId: str
    result: dict[str, Any]
    polls_pending: int


@dataclass
class AppleAccount:
    """What Apple keeps for one app in one environment."""

    environment: str = "Sandbox"
    auto_approve: bool = True
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {state, size, data}
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {state, body}
    defaults: dict[tuple[str, str], str] = field(default_factory=dict)
    realtime_url: str | None = None
    passed_test: bool = False
    runs: dict[str, PerformanceRun] = field(default_factory=dict)
    #: transaction ids of Family Sharing purchases, and ids that are not original ones
    family_transactions: set[str] = field(default_factory=set)
    non_original_transactions: set[str] = field(default_factory=set)
    no_access: bool = False
    #: what a performance test run reports once it is done (Apple's PerformanceTestResultResponse fields)
    performance_result: dict[str, Any] = field(default_factory=lambda: {
        "result": "PASS", "successRate": 100, "numPending": 0,
        "responseTimes": {"average": 80, "p50": 70, "p90": 120, "p95": 150, "p99": 210}, "failures": {},
    })
    performance_config: dict[str, Any] = field(default_factory=lambda: {
        "maxConcurrentRequests": 50, "totalRequests": 2000, "totalDuration": 60000,
        "responseTimeThreshold": 700, "successRateThreshold": 99,
    })
    pending_polls: int = 1


class AppleServer:
    """The loopback server; ``base_url`` goes into ``RETENTION_APPLE_API_URL`` (or ``set_base_url``)."""

    def __init__(self, *, key_id: str, issuer_id: str, bundle_id: str, public_key: ec.EllipticCurvePublicKey,
                 environment: str = "Sandbox") -> None:
        self.key_id, self.issuer_id, self.bundle_id, self.public_key = key_id, issuer_id, bundle_id, public_key
        self.account = AppleAccount(environment=environment)
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self._throttle: list[int | None] = []  # Retry-After in ms from now per throttled call (None: no header)
        self._fail_after: int | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- lifecycle ----
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> AppleServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- test controls ----
    def approve(self, identifier: str) -> None:
        """Approve a message or an image, as Apple's review does."""
        self._review(identifier, "APPROVED")

    def reject(self, identifier: str) -> None:
        """Reject a message or an image."""
        self._review(identifier, "REJECTED")

    def _review(self, identifier: str, state: str) -> None:
        with self.lock:
            table = self.account.messages if identifier in self.account.messages else self.account.images
            table[identifier]["state"] = state

    def throttle(self, calls: int, retry_after_ms: int | None = 1000) -> None:
        """Answer the next `calls` requests with 429, ``Retry-After`` that many ms from now (None: no header)."""
        self._throttle += [retry_after_ms] * calls

    def fail_after(self, changes: int | None) -> None:
        """After `changes` more successful PUT/DELETE calls, answer 500 to every call (None: heal)."""
        self._fail_after = changes

    def mutations(self) -> list[tuple[str, str]]:
        """Return the successful PUT/DELETE/POST calls, in order."""
        return [(m, p) for m, p, s in self.log if m != "GET" and s < 300]

    # ---- HTTP ----
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _do(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = server.handle(self.command, self.path, dict(self.headers.items()), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_DELETE = do_POST = _do

        return Handler

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Return (status, headers, body) for one request; records it in ``log``."""
        parts = urlsplit(target)
        with self.lock:
            status, out_headers, payload = self._route(method, parts.path, parse_qs(parts.query), headers, body)
            self.log.append((method, parts.path, status))
        return status, out_headers, payload

    def _error(self, status: int, name: str, message: str) -> tuple[int, dict[str, str], bytes]:
        body = json.dumps({"errorCode": E[name], "errorMessage": message}).encode()
        return status, {"Content-Type": "application/json"}, body

    @staticmethod
    def _json(obj: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    def _auth(self, headers: dict[str, str]) -> str | None:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if not auth.startswith("Bearer "):
            return "no bearer token"
        token = auth[len("Bearer "):]
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
                return "wrong alg or kid"
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"], audience="appstoreconnect-v1",
                                issuer=self.issuer_id, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            return f"bad token: {exc}"
        if claims.get("bid") != self.bundle_id:
            return "wrong bid"
        if claims["exp"] > time.time() + 3600:
            return "exp more than an hour ahead"
        return None

    def _route(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._auth(headers) is not None:
            return 401, {}, b""  # Apple answers 401 with no body
        if self._throttle:
            ms = self._throttle.pop(0)
            status, h, payload = self._error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded.")
            if ms is not None:
                h["Retry-After"] = str(int(time.time() * 1000) + ms)
            return status, h, payload
        if self._fail_after is not None and self._fail_after <= 0:
            return self._error(500, "GENERAL_INTERNAL", "An unknown error occurred.")
        if self.account.no_access:
            return 404, {}, b""
        if not path.startswith(PREFIX):
            return 404, {}, b""
        rest = path[len(PREFIX):]
        result = self._dispatch(method, rest, query, body)
        if method != "GET" and result[0] < 300 and self._fail_after is not None:
            self._fail_after -= 1
        return result

    def _dispatch(self, method: str, rest: str, query: dict[str, list[str]],
                  body: bytes) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        if rest == "/image/list" and method == "GET":
            return self._json({"imageIdentifiers": [
                {"imageIdentifier": i, "imageState": v["state"], "imageSize": v["size"]} for i, v in a.images.items()]})
        if rest == "/message/list" and method == "GET":
            return self._json({"messageIdentifiers": [
                {"messageIdentifier": i, "messageState": v["state"]} for i, v in a.messages.items()]})
        m = re.fullmatch(r"/image/([^/]+)", rest)
        if m:
            return self._image(method, m.group(1), query, body)
        m = re.fullmatch(r"/message/([^/]+)", rest)
        if m:
            return self._message(method, m.group(1), body)
        m = re.fullmatch(r"/default/([^/]+)/([^/]+)", rest)
        if m:
            return self._default(method, m.group(1), m.group(2), body)
        if rest == "/realtime/url":
            return self._realtime(method, body)
        if rest == "/performanceTest" and method == "POST":
            return self._start_test(body)
        m = re.fullmatch(r"/performanceTest/result/([^/]+)", rest)
        if m and method == "GET":
            return self._test_result(m.group(1))
        return 404, {}, b""

    @staticmethod
    def _uuid(text: str) -> str | None:
        try:
            return str(uuid.UUID(text))
        except ValueError:
            return None

    def _image(self, method: str, raw_id: str, query: dict[str, list[str]],
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        iid = self._uuid(raw_id)
        if iid is None:
            return self._error(400, "GENERAL_BAD_REQUEST", "Invalid image identifier.")
        if method == "DELETE":
            if iid not in a.images:
                return self._error(404, "IMAGE_NOT_FOUND", "Image not found.")
            if any(iid in _images_of(v["body"]) for v in a.messages.values()):
                return self._error(403, "IMAGE_IN_USE", "The image is in use by a message.")
            del a.images[iid]
            return 200, {}, b""
        if method != "PUT":
            return 404, {}, b""
        size = (query.get("imageSize") or ["FULL_SIZE"])[0]
        if size not in ("FULL_SIZE", "BULLET_POINT"):
            return self._error(400, "BAD_REQUEST_IMAGE_SIZE", "Invalid image size.")
        dims = _png_size(body)
        if dims is None or body[25] in (4, 6) or b"tRNS" in body:
            return self._error(400, "INVALID_IMAGE", "The image must be a PNG without transparency.")
        w, h = dims
        if (size == "FULL_SIZE" and not (w == 3840 and 160 <= h <= 2160)) or (size == "BULLET_POINT" and (w, h) != (1024, 1024)):
            return self._error(400, "BAD_REQUEST_IMAGE_SIZE", f"{w}x{h} does not fit imageSize {size}.")
        if iid in a.images:
            return self._error(409, "IMAGE_ALREADY_EXISTS", "The image identifier already exists.")
        if len(a.images) >= MAX_IMAGES:
            return self._error(403, "MAXIMUM_NUMBER_OF_IMAGES_REACHED", "Maximum number of images reached.")
        a.images[iid] = {"state": "APPROVED" if a.auto_approve else "PENDING", "size": size, "data": body}
        return 200, {}, b""

    def _message(self, method: str, raw_id: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        mid = self._uuid(raw_id)
        if mid is None:
            return self._error(400, "GENERAL_BAD_REQUEST", "Invalid message identifier.")
        if method == "DELETE":
            if mid not in a.messages:
                return self._error(404, "MESSAGE_NOT_FOUND", "Message not found.")
            del a.messages[mid]
            return 200, {}, b""
        if method != "PUT":
            return 404, {}, b""
        try:
            doc = json.loads(body)
            header, text = doc["header"], doc["body"]
        except (ValueError, KeyError, TypeError):
            return self._error(400, "GENERAL_BAD_REQUEST", "Invalid request body.")
        if len(header) > 66:
            return self._error(400, "HEADER_TOO_LONG", "Header is too long.")
        if len(text) > 144:
            return self._error(400, "BODY_TOO_LONG", "Body is too long.")
        image = doc.get("image")
        bullets = doc.get("bulletPoints") or []
        if image is not None and len(image.get("altText", "")) > 150:
            return self._error(400, "ALT_TEXT_TOO_LONG", "Alt text is too long.")
        if len(bullets) > 5:
            return self._error(400, "BAD_REQUEST_TOO_MANY_BULLET_POINTS", "Too many bullet points.")
        for b in bullets:
            if len(b.get("text", "")) > 66:
                return self._error(400, "BAD_REQUEST_BULLET_POINT_TEXT_TOO_LONG", "Bullet point text is too long.")
            if len(b.get("altText", "")) > 150:
                return self._error(400, "ALT_TEXT_TOO_LONG", "Alt text is too long.")
        if doc.get("headerPosition") == "ABOVE_IMAGE" and image is None:
            return self._error(400, "BAD_REQUEST_ABOVE_IMAGE_REQUIRES_AN_IMAGE", "ABOVE_IMAGE requires an image.")
        for iid in _images_of(doc):
            if iid not in a.images:
                return self._error(404, "IMAGE_NOT_FOUND", f"Image {iid} not found.")
        if mid in a.messages:
            return self._error(409, "MESSAGE_ALREADY_EXISTS", "The message identifier already exists.")
        if len(a.messages) >= MAX_MESSAGES:
            return self._error(403, "MAXIMUM_NUMBER_OF_MESSAGES_REACHED", "Maximum number of messages reached.")
        a.messages[mid] = {"state": "APPROVED" if a.auto_approve else "PENDING", "body": doc}
        return 200, {}, b""

    def _default(self, method: str, product_id: str, locale: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        if not LOCALE.match(locale):
            return self._error(400, "INVALID_LOCALE", "Invalid locale.")
        key = (product_id, locale)
        if method == "GET":
            if key not in a.defaults:
                return self._error(404, "DEFAULT_MESSAGE_NOT_FOUND", "Default message not found.")
            return self._json({"messageIdentifier": a.defaults[key]})
        if method == "DELETE":
            if key not in a.defaults:
                return self._error(404, "DEFAULT_MESSAGE_NOT_FOUND", "Default message not found.")
            del a.defaults[key]
            return 200, {}, b""
        if method != "PUT":
            return 404, {}, b""
        try:
            mid = self._uuid(json.loads(body)["messageIdentifier"])
        except (ValueError, KeyError, TypeError):
            mid = None
        if mid is None:
            return self._error(400, "GENERAL_BAD_REQUEST", "Invalid request body.")
        msg = a.messages.get(mid)
        if msg is None:
            return self._error(404, "MESSAGE_NOT_FOUND", "Message not found.")
        if msg["state"] != "APPROVED":
            return self._error(403, "MESSAGE_NOT_APPROVED", "The message is not approved.")
        if any(a.images.get(i, {}).get("state") != "APPROVED" for i in _images_of(msg["body"])):
            return self._error(403, "IMAGE_NOT_APPROVED", "The message's image is not approved.")
        a.defaults[key] = mid
        return 200, {}, b""

    def _realtime(self, method: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        if method == "GET":
            if a.realtime_url is None:
                return self._error(404, "REALTIME_URL_NOT_FOUND", "Realtime URL not found.")
            return self._json({"realtimeURL": a.realtime_url})
        if method == "DELETE":
            if a.realtime_url is None:
                return self._error(404, "REALTIME_URL_NOT_FOUND", "Realtime URL not found.")
            a.realtime_url = None
            return 200, {}, b""
        if method != "PUT":
            return 404, {}, b""
        try:
            url = json.loads(body)["realtimeURL"]
        except (ValueError, KeyError, TypeError):
            url = None
        if not isinstance(url, str) or not url.startswith("https://") or len(url) > 256:
            return self._error(400, "BAD_REQUEST_REALTIME_URL", "Invalid realtime URL.")
        if a.environment == "Production" and not a.passed_test:
            return self._error(403, "FORBIDDEN_NO_PASSING_TEST", "A passing performance test is required.")
        a.realtime_url = url
        return 200, {}, b""

    def _start_test(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        try:
            otid = json.loads(body)["originalTransactionId"]
        except (ValueError, KeyError, TypeError):
            return self._error(400, "INVALID_PERFORMANCE_TEST_REQUEST", "Invalid performance test request.")
        if not isinstance(otid, str) or not otid.isdigit():
            return self._error(400, "INVALID_ORIGINAL_TRANSACTION_ID", "Invalid original transaction id.")
        if any(r.polls_pending > 0 for r in a.runs.values()):
            return self._error(400, "EXISTING_PERFORMANCE_TEST_RUN", "A performance test is already running.")
        if otid in a.family_transactions:
            return self._error(400, "FAMILY_TRANSACTION_NOT_SUPPORTED_ERROR", "Family Sharing transaction.")
        if otid in a.non_original_transactions:
            return self._error(400, "TRANSACTION_ID_IS_NOT_ORIGINAL_TRANSACTION_ID_ERROR", "Not an original transaction id.")
        if a.realtime_url is None:
            return self._error(404, "REALTIME_URL_NOT_FOUND", "Realtime URL not found.")
        rid = str(uuid.uuid4())
        a.runs[rid] = PerformanceRun(otid, dict(a.performance_result), a.pending_polls)
        return self._json({"config": a.performance_config, "requestId": rid})

    def _test_result(self, rid: str) -> tuple[int, dict[str, str], bytes]:
        a = self.account
        run = a.runs.get(rid)
        if run is None:
            return self._error(404, "PERFORMANCE_TEST_RUN_NOT_FOUND", "Performance test run not found.")
        base = {"config": a.performance_config, "target": a.realtime_url}
        if run.polls_pending > 0:
            run.polls_pending -= 1
            return self._json({**base, "result": "PENDING", "numPending": a.performance_config["totalRequests"]})
        if run.result.get("result") == "PASS":
            a.passed_test = True
        return self._json({**base, **run.result})


def _images_of(message_body: dict[str, Any]) -> list[str]:
    out = []
    if message_body.get("image"):
        out.append(str(message_body["image"]["imageIdentifier"]))
    out += [str(b["imageIdentifier"]) for b in message_body.get("bulletPoints") or []]
    return out


def signing_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return `key` as the PEM bytes of a ``SubscriptionKey_*.p8`` file."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
