"""``POST /apple/notifications``: App Store Server Notifications V2 recorded as outcomes.

Verified with the same trust roots and chain rules as realtime requests (validity at the
notification's signedDate, no freshness window: Apple retries notifications for days), and only
for our app: ``bundleId``, ``appAppleId`` and ``environment`` checked as Apple's library does
(:func:`check_identity`).
Idempotent by ``notificationUUID``: a retry is acknowledged and stored once.

A 200 tells Apple to stop retrying, so an outcome is committed to the log before the answer
leaves; when it cannot be (the log is closing, full, or failed to write), the answer is
``503 {"error": "outcome_not_stored"}`` and Apple's retry brings it again.
https://developer.apple.com/documentation/appstoreservernotifications/responding-to-app-store-server-notifications
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
from litestar import MediaType, Response

from models.data_files import event_for_notification, unstorable
from serving.errors import VerificationError
from serving.schemas import RealtimeRequestBody
from serving.settings import Settings, SettingsError
from serving.stderr_log import refusals

if TYPE_CHECKING:
    from serving.metrics import Metrics

__all__ = [
    "CONTAINERS",
    "NotificationService",
    "Outcome",
    "Verifying",
    "check_identity",
    "configured_bundle_id",
    "handle_notification",
    "parse_notification",
    "receive_notification",
]

_encode = msgspec.json.Encoder().encode
# The outer body has the same shape as a realtime request's: {"signedPayload": "<JWS>"}.
_decode = msgspec.json.Decoder(RealtimeRequestBody).decode

#: How long the handler waits for the log writer to commit an outcome before answering 503.
STORE_TIMEOUT_S = 2.0

_RECORDED = b'{"status":"recorded"}'
_IGNORED = b'{"status":"ignored"}'


class SignedDataVerifier(Protocol):
    """Checks an App Store JWS and returns its payload (serving.verify.RequestVerifier is one)."""

    def verify_signed_data(self, token: str | bytes) -> dict[str, Any]: ...


class OutcomeLog(Protocol):
    """Where outcomes are committed: the decision log (its SQLite file, or the fleet's PostgreSQL)."""

    def log_outcome(
        self,
        notification_uuid: str,
        original_transaction_id: str,
        event: str,
        at_ms: int,
        raw_type: str | None = None,
        raw_subtype: str | None = None,
        *,
        offer_type: int | None = None,
        offer_identifier: str | None = None,
        offer_discount_type: str | None = None,
        transaction_reason: str | None = None,
    ) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def flush(self, timeout: float = 5.0) -> bool: ...


class Verifying(Protocol):
    """What :func:`parse_notification` needs: the server's settings and a verifier of Apple's signed data."""

    @property
    def settings(self) -> Settings: ...

    @property
    def verifier(self) -> SignedDataVerifier: ...


class NotificationService(Verifying, Protocol):
    """What the notification handler needs of the server (serving.app.RetentionService is one), so that
    this module does not import the app that routes to it."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def decision_log(self) -> OutcomeLog: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """One verified notification, its outcome event and the offer its transaction (else renewal) info names.

    ``offer_type`` is Apple's raw integer (1 introductory, 2 promotional, 3 offer code, 4 win-back,
    5 retention offer chosen by Apple), kept even where Apple's library does not know it.
    https://developer.apple.com/documentation/appstoreservernotifications/offertype
    """

    notification_uuid: str
    original_transaction_id: str
    event: str
    at_ms: int
    raw_type: str
    raw_subtype: str | None
    offer_type: int | None = None
    offer_identifier: str | None = None
    offer_discount_type: str | None = None
    transaction_reason: str | None = None


# Apple's name of each stored Outcome field, for the refusal's detail.
_APPLE_NAMES = {
    "notification_uuid": "notificationUUID", "original_transaction_id": "originalTransactionId", "at_ms": "signedDate",
    "raw_type": "notificationType", "raw_subtype": "subtype", "offer_type": "offerType",
    "offer_identifier": "offerIdentifier", "offer_discount_type": "offerDiscountType",
    "transaction_reason": "transactionReason",
}


def _error(code: str, detail: str, status: int) -> Response[bytes]:
    refusals.note(code, detail)
    return Response(content=_encode({"error": code, "detail": detail}), status_code=status, media_type=MediaType.JSON)


def _ok(content: bytes) -> Response[bytes]:
    return Response(content=content, status_code=200, media_type=MediaType.JSON)


def _invalid(detail: str) -> VerificationError:
    return VerificationError("invalid_payload", detail)


def configured_bundle_id(settings: Settings) -> str:
    """Return the bundle id notifications are checked against; SettingsError (one sentence) when none is set."""
    if not settings.bundle_id:
        raise SettingsError(
            "no bundle id configured: set RETENTION_BUNDLE_ID (or --bundle-id) to your app's bundle id; "
            "App Store Server Notifications are accepted only for it"
        )
    return settings.bundle_id


#: The containers a notification names its app in, in the order Apple's SignedDataVerifier reads them.
CONTAINERS: Final = ("data", "summary", "externalPurchaseToken", "appData")


def check_identity(settings: Settings, payload: dict[str, Any]) -> None:
    """Raise VerificationError (``wrong_app``, ``wrong_environment``) unless the notification is for our app.

    As ``SignedDataVerifier.verify_and_decode_notification`` of Apple's app-store-server-library does:
    the first container present among :data:`CONTAINERS` must carry our ``bundleId``; in Production
    also our ``appAppleId`` (Apple leaves it out in Sandbox, where a different one is still refused unless
    ``relax_app_id_in_sandbox``); its ``environment`` (for ``externalPurchaseToken``: Sandbox when
    ``externalPurchaseId`` starts with ``SANDBOX``, else Production) must equal ours. A notification
    with no container names no app and is refused as ``wrong_app``.
    https://developer.apple.com/documentation/appstoreservernotifications/responsebodyv2decodedpayload
    """
    container: Any = None
    for key in CONTAINERS:
        container = payload.get(key)
        if container is not None:
            if not isinstance(container, dict):
                raise _invalid(f"the notification's {key} is not a JSON object.")
            break
    c: dict[str, Any] = container or {}
    env: Any
    if key == "externalPurchaseToken" and container is not None:
        purchase_id = c.get("externalPurchaseId")
        env = "Sandbox" if isinstance(purchase_id, str) and purchase_id.startswith("SANDBOX") else "Production"
    else:
        env = c.get("environment")
    if c.get("bundleId") != configured_bundle_id(settings):
        raise VerificationError("wrong_app", "The notification is for another app (its bundleId is not ours).")
    app_id = c.get("appAppleId")
    if settings.environment == "Production" or app_id is not None:
        relaxed = settings.relax_app_id_in_sandbox and settings.environment == "Sandbox"
        if (type(app_id) is not int or app_id != settings.app_apple_id) and not relaxed:
            raise VerificationError("wrong_app", "The notification is for another app (its appAppleId is not ours).")
    _check_environment(settings, env, "notification")


def _check_environment(settings: Settings, env: Any, what: str) -> None:
    if env != settings.environment:
        shown = repr(env)[:40] if isinstance(env, str) else "no environment"
        raise VerificationError("wrong_environment", f"The {what} is for {shown}, not {settings.environment}.")


def _check_nested(settings: Settings, key: str, nested: dict[str, Any]) -> None:
    """Raise VerificationError unless a nested transaction (bundleId, environment) or renewal info (environment) is ours.

    As Apple's ``verify_and_decode_signed_transaction`` and ``verify_and_decode_renewal_info`` do
    (a renewal info carries no bundleId).
    """
    if key == "signedTransactionInfo" and nested.get("bundleId") != settings.bundle_id:
        raise VerificationError("wrong_app", f"The notification's {key} is for another app (its bundleId is not ours).")
    _check_environment(settings, nested.get("environment"), f"notification's {key}")


def parse_notification(svc: Verifying, signed_payload: str) -> Outcome | None:
    """Return the outcome a signed notification carries, None when it carries none; raise VerificationError.

    Checks the outer JWS and each nested one (chain valid at its signedDate) and that the notification
    and its nested transaction and renewal info are for our app and environment (:func:`check_identity`).
    """
    payload: dict[str, Any] = svc.verifier.verify_signed_data(signed_payload)
    ntype = payload.get("notificationType")
    uuid_ = payload.get("notificationUUID")
    signed_date = payload.get("signedDate")
    if not isinstance(ntype, str) or not isinstance(uuid_, str) or not uuid_:
        raise _invalid("the notification has no string notificationType and notificationUUID.")
    if isinstance(signed_date, bool) or not isinstance(signed_date, int):
        raise _invalid("the notification has no integer signedDate.")
    subtype = payload.get("subtype")
    if subtype is not None and not isinstance(subtype, str):
        raise _invalid("the notification's subtype is not a string.")
    settings = svc.settings
    check_identity(settings, payload)
    data = payload.get("data")
    if data is None:  # summary notifications carry "summary" instead; none of them is an outcome
        data = {}
    event = event_for_notification(ntype, subtype)
    if event is None:
        return None  # TEST: nothing to record, its nested tokens (if any) are not worth verifying
    otid: str | None = None
    offer: dict[str, Any] = {}
    for key in ("signedTransactionInfo", "signedRenewalInfo"):
        nested = data.get(key)
        if nested is None:
            continue
        if not isinstance(nested, str):
            raise _invalid(f"the notification's {key} is not a string.")
        info = svc.verifier.verify_signed_data(nested)
        value = info.get("originalTransactionId")
        if key == "signedTransactionInfo":
            offer["transaction_reason"] = _string(info, "transactionReason", key)
        if "offer_type" not in offer and info.get("offerType") is not None:
            offer.update(_offer_fields(info, key))
        if value is not None and (not isinstance(value, str) or not value):
            raise _invalid(f"the originalTransactionId in {key} is not a non-empty string.")
        _check_nested(settings, key, info)
        otid = otid or value
    if otid is None:
        return None
    outcome = Outcome(uuid_, otid, event, signed_date, ntype, subtype, **offer)
    # refused now, never acknowledged and then dropped, nor answered 503 on every retry
    problem = unstorable({_APPLE_NAMES[k]: v for k, v in asdict(outcome).items() if k != "event"})
    if problem is not None:
        raise _invalid(f"the notification cannot be stored: {problem}.")
    return outcome


def _offer_fields(info: dict[str, Any], key: str) -> dict[str, Any]:
    """Return the offer a signed transaction or renewal info names, as Outcome keyword arguments.

    Fields of https://developer.apple.com/documentation/appstoreservernotifications/jwstransactiondecodedpayload
    (``offerType``, ``offerIdentifier``, ``offerDiscountType``, ``transactionReason``); the renewal info
    has the first three. Raises VerificationError for a value of the wrong JSON type.
    """
    offer_type = info.get("offerType")
    if isinstance(offer_type, bool) or not isinstance(offer_type, int):
        raise _invalid(f"the offerType in {key} is not an integer.")
    return {
        "offer_type": offer_type,
        "offer_identifier": _string(info, "offerIdentifier", key),
        "offer_discount_type": _string(info, "offerDiscountType", key),
    }


def _string(info: dict[str, Any], field: str, key: str) -> str | None:
    v = info.get(field)
    if v is not None and not isinstance(v, str):
        raise _invalid(f"the {field} in {key} is not a string.")
    return v


def _verify(svc: NotificationService, body: bytes) -> Response[bytes] | Outcome:
    """Return the answer for a body that is refused or records nothing, else the outcome to store."""
    try:
        outer = _decode(body)
    except Exception:  # whatever the bytes make the decoder raise (UnicodeDecodeError too) is the sender's fault
        svc.metrics.verification_failure("malformed_body")
        return _error("malformed_body", "The body must be a JSON object with a string signedPayload.", 400)
    try:
        outcome = parse_notification(svc, outer.signedPayload)
    except VerificationError as exc:
        svc.metrics.verification_failure(exc.code)
        return _error(exc.code, exc.detail, exc.status)
    except Exception as exc:  # an input we did not foresee is still the sender's fault, never a 500
        svc.metrics.verification_failure("invalid_payload")
        return _error("invalid_payload", f"The notification could not be read ({type(exc).__name__}).", 400)
    return _ok(_IGNORED) if outcome is None else outcome


def _queue(svc: NotificationService, o: Outcome) -> tuple[int, int]:
    """Queue `o` in the log; return the log's (dropped, write_errors) counts from just before."""
    stats = svc.decision_log.stats()
    svc.decision_log.log_outcome(
        notification_uuid=o.notification_uuid,
        original_transaction_id=o.original_transaction_id,
        event=o.event,
        at_ms=o.at_ms,
        raw_type=o.raw_type,
        raw_subtype=o.raw_subtype,
        offer_type=o.offer_type,
        offer_identifier=o.offer_identifier,
        offer_discount_type=o.offer_discount_type,
        transaction_reason=o.transaction_reason,
    )
    return stats["dropped"], stats["write_errors"]


def _stored(svc: NotificationService, before: tuple[int, int], flushed: bool) -> Response[bytes]:
    """Return 200 when the outcome is committed, else 503 so that Apple sends it again."""
    stats = svc.decision_log.stats()
    # A drop or write error anywhere since queueing may have been ours: answering 503 costs only a
    # retry, which the notificationUUID key makes harmless, while a wrong 200 loses the outcome.
    if flushed and stats["writer_alive"] and (stats["dropped"], stats["write_errors"]) == before:
        return _ok(_RECORDED)
    return _error("outcome_not_stored", "The outcome could not be stored now; send the notification again.", 503)


def handle_notification(svc: NotificationService, body: bytes) -> Response[bytes]:
    """Return the HTTP answer for one notification body, after committing its outcome when it has one.

    Waits for the log writer on the calling thread (about a millisecond, longer while the writer
    is busy); an async caller should prefer :func:`receive_notification`, which waits off the loop.
    """
    checked = _verify(svc, body)
    if isinstance(checked, Response):
        return checked
    before = _queue(svc, checked)
    return _stored(svc, before, svc.decision_log.flush(STORE_TIMEOUT_S))


async def receive_notification(svc: NotificationService, body: bytes) -> Response[bytes]:
    """Return the HTTP answer for one notification body; like :func:`handle_notification` but never blocks the loop."""
    import anyio.to_thread

    checked = _verify(svc, body)
    if isinstance(checked, Response):
        return checked
    before = _queue(svc, checked)
    flushed = await anyio.to_thread.run_sync(svc.decision_log.flush, STORE_TIMEOUT_S)
    return _stored(svc, before, flushed)
