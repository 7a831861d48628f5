"""The data-file contract of DESIGN.md: the columns of the decisions and outcomes files and the outcome events.

Serving writes these files (``retention decisions export``), the simulator writes them, training reads them:
one definition, so the three cannot drift.
"""

from __future__ import annotations

#: The DESIGN.md decisions columns, in order (the server's export adds its own columns after them).
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
#: The DESIGN.md outcomes columns.
OUTCOME_COLUMNS: tuple[str, ...] = ("original_transaction_id", "event", "at")
#: The outcome events, in DESIGN.md's order.
EVENTS: tuple[str, ...] = ("cancelled", "reenabled", "renewed", "expired", "switched", "offer_redeemed", "refunded")
