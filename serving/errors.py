"""The stable error codes of the endpoint and the one exception that carries them."""

from __future__ import annotations

from typing import Final

# code -> HTTP status. The codes are a public contract (docs/http-api.md): never rename one.
ERROR_STATUS: Final[dict[str, int]] = {
    "malformed_body": 400,
    "malformed_jws": 400,
    "unsupported_alg": 400,
    "bad_chain_length": 400,
    "untrusted_chain": 401,
    "missing_apple_oid": 401,
    "certificate_expired": 401,
    "bad_signature": 401,
    "invalid_payload": 400,
    "wrong_app": 403,
    "wrong_environment": 403,
    "stale_request": 401,
    "replayed_request": 409,
    "payload_too_large": 413,
    "unknown_critical_header": 400,
    "no_eligible_message": 404,
    "request_timeout": 408,  # the request did not arrive whole in time (serving/http_limits.py)
    "too_many_connections": 503,  # the worker holds its maximum of connections (serving/http_limits.py)
    "request_header_fields_too_large": 431,  # request line and headers beyond --max-header-bytes (http_limits.py)
    "malformed_request": 400,  # bytes that are not an HTTP/1.1 request (serving/http_limits.py)
    "uri_too_long": 414,  # the request's URL beyond 8 KiB (serving/http_limits.py)
    "chain_check_busy": 503,
    "not_found": 404,
    "method_not_allowed": 405,
    "http_error": 400,  # another HTTP-level refusal by the framework; the answer carries its own status
    "outcome_not_stored": 503,
    "internal_error": 503,  # a fault nobody foresaw: logged with its traceback, counted, never a 500
}


class ApiError(Exception):
    """A request that cannot be served: a stable `code`, its HTTP status and a one-sentence detail."""

    __slots__ = ("code", "detail", "status")

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = ERROR_STATUS[code]


class VerificationError(ApiError):
    """Apple's signed payload failed one verification rule (the code says which)."""
