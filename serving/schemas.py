"""msgspec structs for every Apple object of the Retention Messaging API.

Field names are Apple's, exactly (Apple's Retention Messaging API: Get Retention Message, RealtimeRequestBody and RealtimeResponseBody).
Enums that come from Apple keep a raw-string twin, so a value Apple adds tomorrow
does not break parsing: ``environment`` is an :class:`Environment` or ``None`` and
``rawEnvironment`` is always the string Apple sent.
"""

from __future__ import annotations

import enum

import msgspec


class Environment(str, enum.Enum):
    """Apple's server environments (Apple's libraries also know Xcode and LocalTesting)."""

    SANDBOX = "Sandbox"
    PRODUCTION = "Production"
    XCODE = "Xcode"
    LOCAL_TESTING = "LocalTesting"

    @classmethod
    def parse(cls, raw: str) -> Environment | None:
        """Return the known environment for `raw`, or None for a value this code does not know."""
        try:
            return cls(raw)
        except ValueError:
            return None


class BillingPlanType(str, enum.Enum):
    """API 1.5 billing plan of a switch-plan answer."""

    BILLED_UPFRONT = "BILLED_UPFRONT"
    MONTHLY = "MONTHLY"


class RealtimeRequestBody(msgspec.Struct, forbid_unknown_fields=False):
    """The POST body Apple sends: one JWS in compact serialization."""

    signedPayload: str


class DecodedRealtimeRequestBody(msgspec.Struct, frozen=True, kw_only=True):
    """The verified JWS payload. All seven fields are required; unknown extras are tolerated."""

    originalTransactionId: str
    appAppleId: int
    productId: str
    userLocale: str
    requestIdentifier: str
    rawEnvironment: str = msgspec.field(name="environment")
    signedDate: int

    @property
    def environment(self) -> Environment | None:
        """The environment as an enum, or None when Apple sent a value this code does not know."""
        return Environment.parse(self.rawEnvironment)


class Message(msgspec.Struct, frozen=True):
    """A plain retention message (text, optional image and bullet points)."""

    messageIdentifier: str


class AlternateProduct(msgspec.Struct, frozen=True, omit_defaults=True):
    """A switch-plan message: the target product must be in the same subscription group."""

    messageIdentifier: str
    productId: str
    billingPlanType: str | None = None


class PromotionalOfferSignatureV1(msgspec.Struct, frozen=True, omit_defaults=True):
    """The V1 promotional offer signature object."""

    encodedSignature: str
    productId: str
    nonce: str
    timestamp: int
    keyId: str
    offerIdentifier: str
    appAccountToken: str | None = None


class PromotionalOffer(msgspec.Struct, frozen=True, omit_defaults=True):
    """A promotional offer message with exactly one of the two signature forms."""

    messageIdentifier: str
    promotionalOfferSignatureV2: str | None = None
    promotionalOfferSignatureV1: PromotionalOfferSignatureV1 | None = None


class AdvancedCommerceInfo(msgspec.Struct, frozen=True):
    """Only for Advanced Commerce API subscriptions; modelled, never chosen."""

    messageIdentifier: str
    advancedCommerceData: str


class RealtimeResponseBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer: exactly one of the four keys is set (enforced by :meth:`check`)."""

    message: Message | None = None
    alternateProduct: AlternateProduct | None = None
    promotionalOffer: PromotionalOffer | None = None
    advancedCommerceInfo: AdvancedCommerceInfo | None = None

    def __post_init__(self) -> None:
        present = sum(
            x is not None
            for x in (self.message, self.alternateProduct, self.promotionalOffer, self.advancedCommerceInfo)
        )
        if present != 1:
            raise ValueError(f"RealtimeResponseBody needs exactly one key, got {present}")
        po = self.promotionalOffer
        if po is not None and (po.promotionalOfferSignatureV1 is None) == (po.promotionalOfferSignatureV2 is None):
            raise ValueError("promotionalOffer needs exactly one of promotionalOfferSignatureV1/V2")


class ErrorBody(msgspec.Struct, frozen=True):
    """Every 4xx answer: a stable code and one human sentence."""

    error: str
    detail: str
