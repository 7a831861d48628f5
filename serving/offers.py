"""Promotional offer signatures (``promotionalOfferSignatureV2``), minted per request, cached nowhere.

The JWS is exactly what Apple's ``PromotionalOfferV2SignatureCreator`` (app-store-server-library
3.1.2) produces: header ``{"alg":"ES256","kid":KEY_ID,"typ":"JWT"}`` and claims ``productId``,
``offerIdentifier``, ``transactionId``, ``bid``, ``iss``, ``aud="promotional-offer"``, ``iat``
(seconds) and ``nonce`` (a lowercase uuid4), signed with the developer's In-App Purchase key.
See https://developer.apple.com/documentation/storekit/generating-jws-to-sign-app-store-requests

We build it ourselves instead of calling the library on every request: the header segment is
encoded once, the claims with msgspec, and the signature straight from ``cryptography``. That is
the same bytes on the wire as PyJWT's output (apart from the nonce, the time and ECDSA's own
randomness) at about half the cost per call (``bench/offer_signature.py``); the test suite checks
both against each other and against the public key.

Every signature is made by OpenSSL (``cryptography``) with the key object, in the server's process: the
private key is never taken out of it (no ``private_numbers()``, no ``private_bytes()``), and nothing another
process sends goes into a signature (docs/security.md).
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

if TYPE_CHECKING:
    from serving.settings import Settings

AUDIENCE = "promotional-offer"

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_encode_json = msgspec.json.Encoder().encode


def _uuid4() -> str:
    """Return a random lowercase UUID version 4 string (what ``str(uuid.uuid4())`` gives, at a fifth of the cost)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def load_offer_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Return the EC P-256 private key of an In-App Purchase ``.p8`` file (PKCS#8 PEM).

    Raises ValueError with one sentence naming the file, never its content.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"cannot read the In-App Purchase key file {str(p)!r}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        # cryptography's own message is not shown: it may quote part of the file.
        raise ValueError(
            f"the In-App Purchase key file {str(p)!r} is not an unencrypted PEM private key (.p8)"
        ) from None
    except Exception:
        raise ValueError(f"the In-App Purchase key file {str(p)!r} cannot be loaded as a private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"the In-App Purchase key file {str(p)!r} is not an EC P-256 key (ES256 needs one)")
    return key


class OfferSigner:
    """Mints ``promotionalOfferSignatureV2`` JWS strings with the developer's In-App Purchase key."""

    __slots__ = ("_bundle_id", "_header_b64", "_issuer_id", "_key", "key_id")

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, *, key_id: str, issuer_id: str, bundle_id: str) -> None:
        for name, value in (("key id", key_id), ("issuer id", issuer_id), ("bundle id", bundle_id)):
            if not value or not str(value).strip():
                raise ValueError(f"promotional offers need the In-App Purchase {name}")
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("promotional offers need an EC P-256 private key")
        self._key = private_key  # used only through sign(): the secret stays inside OpenSSL
        self.key_id = key_id
        self._issuer_id = issuer_id
        self._bundle_id = bundle_id
        # PyJWT sorts header keys; we write them in that order so the header segment is byte-identical.
        self._header_b64 = _b64url(_encode_json({"alg": "ES256", "kid": key_id, "typ": "JWT"})) + b"."

    def __repr__(self) -> str:  # never show the key
        return f"OfferSigner(key_id={self.key_id!r}, bundle_id={self._bundle_id!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> OfferSigner | None:
        """Return a signer from the ``offer_*`` and ``bundle_id`` settings, or None when no key file is set.

        The key is read from the file once, here. Raises ValueError (one sentence, never the key
        content) when the file is unreadable, not an EC P-256 key, or an id is missing.
        """
        if not settings.offer_key_file:
            return None
        missing = [
            flag
            for flag, value in (
                ("--offer-key-id", settings.offer_key_id),
                ("--offer-issuer-id", settings.offer_issuer_id),
                ("--bundle-id", settings.bundle_id),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"--offer-key-file is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; "
                "promotional offers need all four of "
                "--offer-key-file, --offer-key-id, --offer-issuer-id and --bundle-id (RETENTION_OFFER_KEY_FILE, "
                "RETENTION_OFFER_KEY_ID, RETENTION_OFFER_ISSUER_ID, RETENTION_BUNDLE_ID)"
            )
        key = load_offer_key(settings.offer_key_file)
        return cls(
            key,
            key_id=settings.offer_key_id or "",
            issuer_id=settings.offer_issuer_id or "",
            bundle_id=settings.bundle_id or "",
        )

    @classmethod
    def from_key_file(cls, path: str | Path, *, key_id: str, issuer_id: str, bundle_id: str) -> OfferSigner:
        """Return a signer for the ``.p8`` key at `path` (ValueError when it is not an EC P-256 key)."""
        return cls(load_offer_key(path), key_id=key_id, issuer_id=issuer_id, bundle_id=bundle_id)

    def sign(self, *, product_id: str, offer_identifier: str, transaction_id: str) -> str:
        """Return a fresh ES256 JWS for this offer; `transaction_id` is the request's originalTransactionId.

        OpenSSL signs (ECDSA P-256 with SHA-256, a fresh random nonce each call): ~40 µs on an idle core
        (``bench/offer_signature.py``).
        """
        signing_input = self._signing_input(product_id, offer_identifier, transaction_id)
        return self._jws(signing_input, self._key.sign(signing_input, _ECDSA_SHA256))

    def _signing_input(self, product_id: str, offer_identifier: str, transaction_id: str) -> bytes:
        # Same claim order as Apple's creator: feature claims first, then bid, iss, aud, iat, nonce.
        claims = {
            "productId": product_id,
            "offerIdentifier": offer_identifier,
            "transactionId": transaction_id,
            "bid": self._bundle_id,
            "iss": self._issuer_id,
            "aud": AUDIENCE,
            "iat": int(time.time()),
            "nonce": _uuid4(),
        }
        return self._header_b64 + _b64url(_encode_json(claims))

    @staticmethod
    def _jws(signing_input: bytes, der_signature: bytes) -> str:
        r, s = decode_dss_signature(der_signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r||s, not DER
        return (signing_input + b"." + _b64url(signature)).decode("ascii")
