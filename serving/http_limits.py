"""What one HTTP client may hold of a worker: a request must arrive whole in time, with a bounded head, and
connections are capped.

uvicorn has no timeout for receiving a request (its issue 157): a client that sends half a header, or headers
and then part of the body, keeps its connection, its file descriptor and, once the headers are in, a waiting
request task for as long as it likes; a few thousand such clients exhaust the process's file descriptors, and
then even ``/health`` is refused. Nor does it bound a request's headers: httptools keeps a header of any size in
memory. :class:`RequestLimitsProtocol` is uvicorn's httptools protocol with these limits, set by
:class:`LimitedConfig` from the settings:

* ``request_timeout_s`` (``--request-timeout-s``, default 10 s): from a connection's accept (a TLS handshake
  included), and from the first byte of each later request on it, the request line, headers and body must all
  have arrived within this time. Otherwise the server answers ``408 {"error": "request_timeout", ...}`` (when no
  answer to that request has begun) and closes the connection; an application waiting for the body sees a
  disconnect. A TLS handshake not done by then is closed without an answer. Idle keep-alive connections are
  closed by uvicorn's own ``timeout_keep_alive`` (5 s).
* ``max_connections`` (``--max-connections``, default 1000 per worker), counted from the accept, TLS handshakes
  under way included: a connection beyond it is answered ``503 {"error": "too_many_connections", ...}`` (with
  TLS: closed before its handshake) so open connections (and their file descriptors) never exceed it much.
  :func:`ensure_fd_limit` raises the soft ``RLIMIT_NOFILE`` when it is too low for that many.
* ``max_header_bytes`` (``--max-header-bytes``, default 16 KiB): a request line and headers beyond it are
  answered ``431 {"error": "request_header_fields_too_large", ...}`` once that much has arrived; a URL over
  :data:`MAX_URL_BYTES` ``414 {"error": "uri_too_long", ...}``. Bytes that are not HTTP/1.1 get
  ``400 {"error": "malformed_request", ...}``.

Each refusal is logged through :data:`serving.stderr_log.refusals` (one line per code per interval), counted in
``retention_connections_refused_total{code}``, and closed gracefully: the answer, then our end of the stream,
then what the client still sends is read and dropped until it closes (at most :data:`LINGER_S`), so that the
client reads the answer rather than a reset. With TLS, :func:`limited_protocol` wraps the protocol in the event
loop's own TLS protocol (uvloop's, else asyncio's), made at the accept, with the handshake timeout set to the
request timeout (the loops' default is 60 s).

In front of the server, a reverse proxy does the same with its own settings (docs/security.md).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import resource
import ssl
from typing import Any, Final

import httptools
import msgspec
import uvloop
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.errors import ERROR_STATUS
from serving.metrics import connection_refused
from serving.stderr_log import refusals
from serving.tls_config import Tls12Config

log = logging.getLogger("retention.http")

DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 1000
DEFAULT_MAX_HEADER_BYTES: Final = 16384
MAX_URL_BYTES: Final = 8192
LINGER_S: Final = 2.0  # how long a refused connection is read and dropped, at most, before it is closed
LINGER_SLOTS: Final = 100  # connections beyond the cap that may linger so; past them a refusal closes at once
FD_RESERVE: Final = 128  # descriptors a worker needs besides its connections (SQLite, pipes, the model, logs)


def _raw_response(code: str, detail: str) -> bytes:
    """Return a whole HTTP/1.1 response with the JSON error body, closing the connection."""
    body = msgspec.json.encode({"error": code, "detail": detail})
    return b"".join([
        STATUS_LINE[ERROR_STATUS[code]],
        b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
        b"\r\nconnection: close\r\n\r\n", body,
    ])


def open_connections(server_state: Any) -> set[object]:
    """Return the set of this server's open connections, counted from the accept (TLS ones before their handshake)."""
    opened: set[object] | None = getattr(server_state, "open_connections", None)
    if opened is None:
        opened = set()
        server_state.open_connections = opened
    return opened


def _count_refusal(code: str, detail: str) -> None:
    refusals.note(code, detail)  # one log line per code per interval, however many connections
    connection_refused(code)  # retention_connections_refused_total{code}


class RequestLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that closes requests not received within the timeout or with too big a head,
    and caps connections.

    The limits come from the config (:class:`LimitedConfig`); a plain ``uvicorn.Config`` gets the defaults.
    Made at the connection's accept (by :func:`limited_protocol`), so the first request's time runs from there,
    TLS handshake included.
    """

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.request_timeout_s: float = getattr(config, "request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S)
        self.max_connections: int = getattr(config, "max_connections", DEFAULT_MAX_CONNECTIONS)
        self.max_header_bytes: int = getattr(config, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES)
        self.behind_tls = False  # True when a TLS protocol (:class:`CountedTls`) wraps this one and counts it
        self._opened_at = self.loop.time()  # the accept
        self._request_timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # between a request's first byte and the end of its headers
        self._head_read = 0  # bytes received while in a request's headers (bounds what the parser buffers)
        self._head_bytes = 0  # exact size of this request's line and headers, as parsed
        self._refused = False  # answered with an error: whatever else arrives is read and dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.behind_tls:
            opened = open_connections(self.server_state)
            opened.add(self)
            if len(opened) > self.max_connections:
                self._close_with("too_many_connections",
                                 f"The server holds its maximum of {self.max_connections} connections; try again.")
                return
        # the first request's time runs from the accept (before a TLS handshake)
        self._request_timer = self.loop.call_at(self._opened_at + self.request_timeout_s, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.behind_tls:
            open_connections(self.server_state).discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so that closing sends no reset over the answer
        if self._in_headers:
            self._head_read += len(data)
        # uvicorn's data_received, with its 400 for bytes that are not HTTP as one of our refusals (JSON, counted
        # and rate-limited) rather than a plain-text answer and a warning line per connection
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if not self._refused:
                self._refuse_request("malformed_request", "The request is not valid HTTP/1.1.")
            return
        if self._in_headers and self._head_read > self.max_header_bytes and not self._refused:
            self._head_too_large()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_headers = True
        self._head_bytes = 0
        if self._request_timer is None:  # a later request on this connection (the first one's runs from the opening)
            self._arm()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._head_bytes += len(url)
        if len(self.url) + len(url) > min(MAX_URL_BYTES, self.max_header_bytes):
            self._refuse_request("uri_too_long", f"The request's URL is longer than "
                                 f"{min(MAX_URL_BYTES, self.max_header_bytes)} bytes.")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._head_read = 0
        super().on_message_complete()

    def _arm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = self.loop.call_later(self.request_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _answering(self) -> bool:
        """Whether an answer to an earlier request (pipelining) is still being written."""
        return self.cycle is not None and not self.cycle.response_complete

    def _timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing() or self._refused:
            return
        cycle = self.cycle
        # an answer may be under way: to the previous request (pipelining), or to this one (sent before its body)
        answering = cycle is not None and (cycle.response_started if not self._in_headers else not cycle.response_complete)
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            if not self._in_headers:  # the application waits for the body: it gets a disconnect
                cycle.disconnected = True
                cycle.message_event.set()
        if answering:
            _count_refusal("request_timeout", f"The request did not arrive whole within {self.request_timeout_s:g} s.")
            self.transport.close()
        else:
            self._close_with("request_timeout",
                             f"The request did not arrive whole within {self.request_timeout_s:g} s.")

    def _head_too_large(self) -> None:
        self._refuse_request("request_header_fields_too_large",
                             f"The request's line and headers exceed {self.max_header_bytes} bytes.")

    def _refuse_request(self, code: str, detail: str) -> None:
        """Refuse the request whose head is being parsed; an earlier answer under way is cut (the connection closes)."""
        if self._answering():
            assert self.cycle is not None
            self.cycle.keep_alive = False
            self._refused = True
            _count_refusal(code, detail)
            self.transport.close()
        else:
            self._close_with(code, detail)

    def _close_with(self, code: str, detail: str) -> None:
        """Answer `code` and close gracefully: end our side, read and drop what the client still sends, close at
        its end of file or after :data:`LINGER_S`, so the client reads the answer rather than a reset."""
        _count_refusal(code, detail)
        self._refused = True
        self._disarm()
        self.transport.write(_raw_response(code, detail))
        if self.flow is not None:
            self.flow.resume_reading()
        lingering = len(open_connections(self.server_state)) <= self.max_connections + LINGER_SLOTS
        if lingering and self.transport.can_write_eof():
            self.transport.write_eof()  # FIN after the answer; the client's end of file then closes the connection
            self.loop.call_later(LINGER_S, self.transport.close)
        else:  # TLS: close() sends close_notify after the answer and waits for the client's
            self.transport.close()


class CountedTls:
    """Mixin for the TLS protocol that wraps :class:`RequestLimitsProtocol`: counts the connection from its accept,
    before the handshake, and refuses it at once beyond the cap (no answer can be sent before a handshake)."""

    limits: RequestLimitsProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        opened = open_connections(self.limits.server_state)
        opened.add(self)
        if len(opened) > self.limits.max_connections:
            _count_refusal("too_many_connections", f"The server holds its maximum of {self.limits.max_connections} "
                           "connections (refused before the TLS handshake).")
            transport.close()
            return
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, exc: BaseException | None) -> None:
        open_connections(self.limits.server_state).discard(self)
        super().connection_lost(exc)  # type: ignore[misc]


class _UvloopTls(CountedTls, uvloop.loop.SSLProtocol):  # type: ignore[name-defined]
    pass


class _AsyncioTls(CountedTls, asyncio.sslproto.SSLProtocol):
    pass


def limited_protocol(config: Any, server_state: Any, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> asyncio.BaseProtocol:
    """uvicorn's protocol factory (``http_protocol_class``), called at each accept: a :class:`RequestLimitsProtocol`,
    wrapped in a TLS protocol with the handshake timeout set to the request timeout when the server terminates TLS."""
    http = RequestLimitsProtocol(config, server_state, app_state, _loop)
    tls_context = getattr(config, "tls_context", None)
    if tls_context is None:
        return http
    http.behind_tls = True
    cls: Any = _UvloopTls if isinstance(http.loop, uvloop.Loop) else _AsyncioTls
    tls = cls(http.loop, http, tls_context, None, server_side=True,
                   ssl_handshake_timeout=http.request_timeout_s, ssl_shutdown_timeout=http.request_timeout_s)
    tls.limits = http
    return tls


class LimitedConfig(Tls12Config):
    """The server's uvicorn config: TLS 1.2 or later, and :class:`RequestLimitsProtocol` with these limits.

    The TLS context moves from ``ssl`` to ``tls_context``: :func:`limited_protocol` does the handshake itself,
    so that it counts and times the connection from its accept.
    """

    def __init__(self, app: Any, *, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 **kwargs: Any) -> None:
        super().__init__(app, http=limited_protocol, **kwargs)  # type: ignore[arg-type]
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.tls_context: ssl.SSLContext | None = None

    def load(self) -> None:
        super().load()
        self.tls_context, self.ssl = self.ssl, None


def ensure_fd_limit(max_connections: int) -> None:
    """Raise this process's soft ``RLIMIT_NOFILE`` (up to the hard limit) to hold `max_connections` connections.

    Worker processes inherit it. Logs a warning when the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + LINGER_SLOTS + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < want:
            log.warning("open files limit %d is below --max-connections %d + %d; raise `ulimit -n`",
                        new, max_connections, LINGER_SLOTS + FD_RESERVE)
