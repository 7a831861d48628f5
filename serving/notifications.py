"""``POST /apple/notifications``: App Store Server Notifications V2 recorded as outcomes.

Verified with the same trust roots and chain rules as realtime requests (validity at the
notification's signedDate, no freshness window: Apple retries notifications for days).
Idempotent by ``notificationUUID``: a retry is acknowledged and stored once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Response

from serving.decision_log import event_for_notification
from serving.errors import VerificationError
from serving.schemas import RealtimeRequestBody

if TYPE_CHECKING:
    from serving.app import RetentionService

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RealtimeRequestBody).decode

def _error(code: str, detail: str, status: int) -> Response[bytes]:
    return Response(content=_encode({"error": code, "detail": detail}), status_code=status, media_type=MediaType.JSON)


def handle_notification(svc: RetentionService, body: bytes) -> Response[bytes]:
    """Return the HTTP answer for one notification body, recording its outcome when it has one."""
    try:
        outer = _decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return _error("malformed_body", "The body must be a JSON object with a string signedPayload.", 400)
    try:
        payload: dict[str, Any] = svc.verifier.verify_signed_data(outer.signedPayload)
        data = payload.get("data") or {}
        ntype = payload.get("notificationType")
        uuid_ = payload.get("notificationUUID")
        signed_date = payload.get("signedDate")
        if not isinstance(ntype, str) or not isinstance(uuid_, str) or not isinstance(signed_date, int):
            raise VerificationError("invalid_payload", "notificationType, notificationUUID and signedDate are required.")
        env = data.get("environment")
        if env is not None and env != svc.settings.environment:
            raise VerificationError("wrong_environment", f"The notification is for {env}, not {svc.settings.environment}.")
        app_id = data.get("appAppleId")
        if app_id is not None and svc.settings.app_apple_id is not None and app_id != svc.settings.app_apple_id:
            raise VerificationError("wrong_app", "The notification is for another app.")
        otid = None
        for key in ("signedTransactionInfo", "signedRenewalInfo"):
            nested = data.get(key)
            if isinstance(nested, str):
                otid = svc.verifier.verify_signed_data(nested).get("originalTransactionId")
                if otid:
                    break
    except VerificationError as exc:
        svc.metrics.verification_failure(exc.code)
        return _error(exc.code, exc.detail, exc.status)
    subtype = payload.get("subtype")
    event = event_for_notification(ntype, subtype if isinstance(subtype, str) else None)
    if event is None or not otid:
        return Response(content=b'{"status":"ignored"}', status_code=200, media_type=MediaType.JSON)
    svc.decision_log.log_outcome(
        notification_uuid=uuid_,
        original_transaction_id=str(otid),
        event=event,
        at_ms=signed_date,
        raw_type=ntype,
        raw_subtype=subtype if isinstance(subtype, str) else None,
    )
    return Response(content=b'{"status":"recorded"}', status_code=200, media_type=MediaType.JSON)
