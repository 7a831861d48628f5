"""The data-file contract: the columns of the decisions and outcomes files and the outcome events (docs/data-formats.md).

Serving writes these files (``retention decisions export``), the simulator writes them, training reads them:
one definition, so the three cannot drift. The meaning of each App Store Server Notification V2 as an
outcome event is here too (:func:`event_for_notification`), for the same reason.
"""

from __future__ import annotations

#: The decisions file's columns (docs/data-formats.md), in order (the server's export adds its own columns after them).
DECISION_COLUMNS: tuple[str, ...] = (
    "request_id",
    "original_transaction_id",
    "product_id",
    "user_locale",
    "environment",
    "signed_date",
    "candidates",
    "message_id",
    "propensity",
    "model_version",
    "policy",
)
#: The outcomes file's columns (docs/data-formats.md).
OUTCOME_COLUMNS: tuple[str, ...] = ("original_transaction_id", "event", "at")
#: The outcome events: Apple's seven first (docs/data-formats.md, "Events") (their positions are codes in simulated files), then the
#: finer ones the notifications carry. ``switched`` is written by the simulator and by logs made before
#: UPGRADE and DOWNGRADE were told apart; ``other`` is a notification stored raw that no label reads.
EVENTS: tuple[str, ...] = (
    "cancelled",
    "reenabled",
    "renewed",
    "expired",
    "switched",
    "offer_redeemed",
    "refunded",
    "upgraded",
    "downgraded",
    "downgrade_reverted",
    "expired_involuntary",
    "billing_failed",
    "grace_expired",
    "subscribed",
    "resubscribed",
    "refund_reversed",
    "other",
)
#: Events that end a subscription for a billing or price reason, not the subscriber's choice.
INVOLUNTARY_ENDS: frozenset[str] = frozenset({"expired_involuntary", "grace_expired"})
#: The policy name of a decision whose answer Apple did not use (404, or later than Apple waits): Apple
#: then shows its own App Store Connect retention message, with offers it chooses (``offerType`` 5).
APPLE_FALLBACK_POLICY = "apple_fallback"
#: Apple's ``offerType`` values (https://developer.apple.com/documentation/appstoreservernotifications/offertype).
OFFER_TYPE_PROMOTIONAL = 2
OFFER_TYPE_RETENTION = 5  # chosen by Apple in App Store Connect retention messaging; unknown to Apple's library 3.1.2

#: The range of an integer the log (SQLite INTEGER) and the data files (Parquet int64) can hold.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def unstorable(fields: dict[str, object]) -> str | None:
    """Return a phrase naming the first value of `fields` (name -> value) the log cannot store, else None.

    Integers must fit 64 bits; text must be encodable as UTF-8 (no lone surrogate) and hold no NUL
    (U+0000: PostgreSQL's text type cannot, and one such row would stop every batch behind it). The endpoints
    refuse such a value with ``400 invalid_payload`` before acknowledging it, so that it is never
    acknowledged and then dropped, nor answered 503 on every retry.
    """
    for name, value in fields.items():
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            return f"{name} {str(value)[:24]}{'...' if len(str(value)) > 24 else ''} is outside the 64-bit range"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"{name} is not valid Unicode text"
            if "\x00" in value:
                return f"{name} contains a NUL character"
    return None


_BY_TYPE_AND_SUBTYPE: dict[tuple[str, str | None], str] = {
    ("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_DISABLED"): "cancelled",
    ("DID_CHANGE_RENEWAL_STATUS", "AUTO_RENEW_ENABLED"): "reenabled",
    ("DID_CHANGE_RENEWAL_PREF", "UPGRADE"): "upgraded",
    ("DID_CHANGE_RENEWAL_PREF", "DOWNGRADE"): "downgraded",
    ("DID_CHANGE_RENEWAL_PREF", None): "downgrade_reverted",
    ("EXPIRED", "VOLUNTARY"): "expired",
    ("EXPIRED", "BILLING_RETRY"): "expired_involuntary",
    ("EXPIRED", "PRICE_INCREASE"): "expired_involuntary",
    ("EXPIRED", "PRODUCT_NOT_FOR_SALE"): "expired_involuntary",
    ("DID_FAIL_TO_RENEW", None): "billing_failed",
    ("DID_FAIL_TO_RENEW", "GRACE_PERIOD"): "billing_failed",
    ("GRACE_PERIOD_EXPIRED", None): "grace_expired",
    ("SUBSCRIBED", "INITIAL_BUY"): "subscribed",
    ("SUBSCRIBED", "RESUBSCRIBE"): "resubscribed",
    ("REFUND_REVERSED", None): "refund_reversed",
    ("DID_RENEW", None): "renewed",
    ("DID_RENEW", "BILLING_RECOVERY"): "renewed",
    # the offer itself is in the signed transaction; the subtype says what the redemption did
    ("OFFER_REDEEMED", None): "offer_redeemed",
    ("OFFER_REDEEMED", "UPGRADE"): "offer_redeemed",
    ("OFFER_REDEEMED", "DOWNGRADE"): "offer_redeemed",
    ("OFFER_REDEEMED", "INITIAL_BUY"): "offer_redeemed",
    ("OFFER_REDEEMED", "RESUBSCRIBE"): "offer_redeemed",
    ("REFUND", None): "refunded",
}


def event_for_notification(notification_type: str, subtype: str | None) -> str | None:
    """Return the outcome event of an App Store Server Notification V2; None only for ``TEST``.

    Only the (type, subtype) pairs listed here have an event: a type or subtype not known here
    (``REVOKE``, ``CONSUMPTION_REQUEST``, ``PRICE_INCREASE``, a type Apple adds later, a new
    subtype of ``DID_RENEW``...) is ``"other"``: stored with its raw notificationType and subtype,
    read by no label. https://developer.apple.com/documentation/appstoreservernotifications/notificationtype and
    https://developer.apple.com/documentation/appstoreservernotifications/subtype
    """
    if notification_type == "TEST":
        return None
    return _BY_TYPE_AND_SUBTYPE.get((notification_type, subtype), "other")
