"""Apple's App Store Server API client, built once for every verb that calls Apple, with two additions.

Every call to Apple goes through Apple's own ``app-store-server-library`` client
(``AppStoreServerAPIClient``: it signs the ES256 bearer token, knows the paths and parses the
answers into typed models). This module adds only what that client lacks:

1. ``RETENTION_APPLE_API_URL`` replaces Apple's base URL (tests against a loopback server,
   egress proxies). The client keeps its base URL in the private attribute ``_base_url``;
   :func:`set_base_url` is the one place that touches it, and a test guards that it still
   takes effect with the pinned library version.
2. A 429 answer becomes :class:`RateLimited`, an ``APIException`` that carries the wait
   Apple's ``Retry-After`` header asked for (the library drops the header). Apple documents
   the header's value for its server APIs as a UNIX time in milliseconds; a plain number of
   seconds or an HTTP date (RFC 9110) is understood too.

Apple's pages: https://developer.apple.com/documentation/retentionmessaging and
https://developer.apple.com/documentation/appstoreserverapi/identifying-rate-limits
"""

from __future__ import annotations

import argparse
import email.utils
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from appstoreserverlibrary.api_client import APIException, AppStoreServerAPIClient, BaseAppStoreServerAPIClient
from appstoreserverlibrary.models.Environment import Environment

#: Environment variable that replaces Apple's base URL (``https://api.storekit.apple.com`` and the sandbox host).
BASE_URL_ENV = "RETENTION_APPLE_API_URL"


class AppleSetupError(ValueError):
    """The key, environment or base URL given for Apple's client is unusable; the message is one sentence."""


class RateLimited(APIException):
    """Apple answered 429; ``retry_after_s`` is how long Apple asked to wait (None when it did not say)."""

    def __init__(self, http_status_code: int, raw_api_error: int | None, error_message: str | None,
                 retry_after_s: float | None) -> None:
        # the library's explicit __init__ takes these three; attrs' generated signature (what mypy sees) differs
        super().__init__(http_status_code, raw_api_error, error_message)  # type: ignore[call-arg]
        self.retry_after_s = retry_after_s


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Return the seconds to wait that a ``Retry-After`` value asks for (>= 0), or None when absent or unreadable.

    Accepts a UNIX time in milliseconds (Apple's server APIs), a number of seconds, or an HTTP date.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    now = time.time() if now is None else now
    try:
        number = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - now)
    if number != number or number < 0:  # NaN or negative
        return None
    if number > 1e11:  # a UNIX time in milliseconds (1e11 ms is 1973; 1e11 s is year 5138)
        return max(0.0, number / 1000.0 - now)
    return number


class RetentionAPIClient(AppStoreServerAPIClient):
    """Apple's ``AppStoreServerAPIClient`` whose 429 answers raise :class:`RateLimited` with Apple's wait."""

    def _parse_response(self, status_code: int, headers: MutableMapping[str, str], json_supplier: Any,
                        destination_class: Any) -> Any:
        try:
            return super()._parse_response(status_code, headers, json_supplier, destination_class)
        except APIException as exc:
            if status_code != 429:
                raise
            raise RateLimited(exc.http_status_code, exc.raw_api_error, exc.error_message,
                              retry_after_seconds(headers.get("Retry-After"))) from None


def set_base_url(client: BaseAppStoreServerAPIClient, base_url: str) -> None:
    """Point `client` (Apple's sync or async client) at `base_url` (scheme and host, optionally a path prefix).

    Raises AppleSetupError when `base_url` is not an http(s) URL. The library keeps the base
    URL in ``_base_url``; tests/unit/test_apple_api.py fails if a new version stops using it.
    """
    url = base_url.strip().rstrip("/")
    if not url.startswith(("https://", "http://")) or len(url.split("://", 1)[1]) == 0:
        raise AppleSetupError(f"{BASE_URL_ENV} must be an http(s) URL, not {base_url!r}")
    if not hasattr(client, "_base_url"):
        raise AppleSetupError("this version of app-store-server-library has no _base_url: the URL override needs updating")
    client._base_url = url


def make_client(
    key: bytes | str | Path,
    key_id: str,
    issuer_id: str,
    bundle_id: str,
    environment: str,
    *,
    base_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> RetentionAPIClient:
    """Return Apple's client for the In-App Purchase key `key` (PEM bytes, or the path of the ``.p8`` file).

    `environment` is ``Sandbox`` or ``Production``. `base_url`, else ``RETENTION_APPLE_API_URL``
    from `environ` (default ``os.environ``), replaces Apple's host. Raises AppleSetupError (one
    sentence that never quotes the key) on an unreadable key, a bad environment or a bad URL.
    """
    if environment not in ("Sandbox", "Production"):
        raise AppleSetupError(f"environment must be Sandbox or Production, not {environment!r}")
    if isinstance(key, bytes):
        pem = key
    else:
        try:
            pem = Path(key).read_bytes()
        except OSError as exc:
            raise AppleSetupError(f"cannot read key file {key}: {exc.strerror or type(exc).__name__}") from None
    where = "the key" if isinstance(key, bytes) else f"key file {key}"
    _check_es256_key(pem, where)
    try:
        client = RetentionAPIClient(pem, key_id, issuer_id, bundle_id, Environment(environment))
    except Exception:  # the library's own error text is not shown: it could quote the key
        raise AppleSetupError(
            f"{where} is not a PEM private key (expected the In-App Purchase key, SubscriptionKey_*.p8)"
        ) from None
    env = os.environ if environ is None else environ
    override = base_url if base_url is not None else env.get(BASE_URL_ENV)
    if override is not None and not override.strip():
        # an empty value is a mistake (a variable set for a test, emptied): never let it mean Apple's real host
        raise AppleSetupError(f"{BASE_URL_ENV} is set but empty: unset it to call Apple's own host, or give the URL")
    if override:
        set_base_url(client, override)
    return client


def base_url_of(client: BaseAppStoreServerAPIClient) -> str:
    """Return the scheme and host `client` calls (Apple's, or the ``RETENTION_APPLE_API_URL`` override)."""
    return str(getattr(client, "_base_url", "") or "Apple's host")


def _check_es256_key(pem: bytes, where: str) -> None:
    """Raise AppleSetupError unless `pem` is an EC P-256 private key (Apple's tokens are ES256); the key is never quoted."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except Exception:  # the error text is not shown: it could quote the key
        raise AppleSetupError(
            f"{where} is not a PEM private key (expected the In-App Purchase key, SubscriptionKey_*.p8)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise AppleSetupError(
            f"{where} is not an EC P-256 key ({kind or 'another kind'}); Apple's tokens are ES256: use the "
            "In-App Purchase key from App Store Connect, SubscriptionKey_*.p8"
        )


#: what a 404 without Apple's error code means (docs/apple-setup.md, "Request access")
NO_ACCESS_HINT = ("Apple answered 404: this app has no access to the Retention Messaging API yet; request it with "
                  "Apple's Retention Messaging API access form in your developer account (docs/apple-setup.md)")
#: what a 401 means
CREDENTIALS_HINT = ("Apple refused the credentials (HTTP 401): check --key-id, --issuer-id and --bundle-id, and that "
                    "the key is an In-App Purchase key (SubscriptionKey_*.p8) of this app's team")


def explain_api_exception(exc: APIException) -> str:
    """Return one line for Apple's answer `exc`, with what to do where Apple's answer says it.

    A 401 names the credentials to check; a 404 without an error code (Apple's answer to an
    app without Retention Messaging API access) says how to get access; anything else is
    :func:`describe_api_exception`. Every verb that calls Apple prints this.
    """
    if exc.http_status_code == 401:
        return CREDENTIALS_HINT
    if exc.http_status_code == 404 and exc.api_error is None:
        return NO_ACCESS_HINT
    return describe_api_exception(exc)


def describe_api_exception(exc: APIException) -> str:
    """Return one line naming Apple's HTTP status, error code (number and name) and message."""
    name = exc.api_error.name if exc.api_error is not None else None
    code = f"error {exc.raw_api_error}" + (f" {name}" if name else "") if exc.raw_api_error is not None else "no error code"
    text = f"Apple answered HTTP {exc.http_status_code}, {code}"
    if exc.error_message:
        text += f": {exc.error_message}"
    return text


# ---- command-line flags shared by every verb that calls Apple ------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that build Apple's client, each also a ``RETENTION_*`` variable, and ``--min-interval``."""
    env = os.environ.get
    parser.add_argument("--key-file", default=env("RETENTION_OFFER_KEY_FILE"),
                        help="In-App Purchase private key, SubscriptionKey_*.p8 [env RETENTION_OFFER_KEY_FILE]")
    parser.add_argument("--key-id", default=env("RETENTION_OFFER_KEY_ID"),
                        help="key id of that key [env RETENTION_OFFER_KEY_ID]")
    parser.add_argument("--issuer-id", default=env("RETENTION_OFFER_ISSUER_ID"),
                        help="issuer id from App Store Connect [env RETENTION_OFFER_ISSUER_ID]")
    parser.add_argument("--bundle-id", default=env("RETENTION_BUNDLE_ID"),
                        help="your app's bundle id [env RETENTION_BUNDLE_ID]")
    parser.add_argument("--environment", default=env("RETENTION_ENVIRONMENT"), choices=("Sandbox", "Production"),
                        help=f"which of Apple's environments [env RETENTION_ENVIRONMENT]; {BASE_URL_ENV} replaces "
                             "Apple's host (tests, egress proxies)")
    parser.add_argument("--min-interval", type=float, default=None,
                        help="seconds between two calls to one endpoint (default: 1 in Production, 10 in Sandbox, "
                             "Apple's rate limits)")


def check_arguments(args: argparse.Namespace, prog: str) -> int | None:
    """Print one line and return 2 when a flag of :func:`add_arguments` is missing or bad; else None."""
    missing = [flag for flag, value in (("--key-file", args.key_file), ("--key-id", args.key_id),
                                        ("--issuer-id", args.issuer_id), ("--bundle-id", args.bundle_id),
                                        ("--environment", args.environment)) if not value]
    if missing:
        print(f"{prog}: missing {', '.join(missing)} (flag or RETENTION_* variable)", file=sys.stderr)
        return 2
    if args.min_interval is not None and args.min_interval < 0:
        print(f"{prog}: --min-interval must be >= 0", file=sys.stderr)
        return 2
    return None


def client_from_arguments(args: argparse.Namespace, environment: str | None = None) -> RetentionAPIClient:
    """Return Apple's client for the flags of :func:`add_arguments` (`environment` overrides ``--environment``)."""
    return make_client(args.key_file, args.key_id, args.issuer_id, args.bundle_id, environment or args.environment)
