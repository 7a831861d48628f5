"""Cost per offer of a promotionalOfferSignatureV2, beside the signature check every request already pays.

Run: .venv/bin/python bench/offer_signature.py [--n 2000] [--rounds 7]   (medians of the rounds, and the ratios)

Lines, all in the same run:

- ``OfferSigner.sign``: what the server pays per offer (claims, encoding, and OpenSSL's ECDSA P-256 signature
  with the key object; nothing made ahead, nothing from another process);
- its parts: the signing input alone (claims and encoding, no signature), so the rest is OpenSSL's;
- baseline: one ES256 check of a signature of the same size with ``serving.verify.verify_es256``, what every
  request pays once for Apple's signature (on the event loop);
- Apple's ``PromotionalOfferV2SignatureCreator`` (PyJWT) for the same offer, for comparison.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appstoreserverlibrary.jws_signature_creator import PromotionalOfferV2SignatureCreator
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from serving.offers import OfferSigner
from serving.verify import verify_es256

OFFER = {"product_id": "com.example.premium.monthly", "offer_identifier": "winback50", "transaction_id": "2000000123456789"}


def per_call_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    """Return the median over `rounds` of the mean µs per call of `fn` (n calls a round)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    n, rounds = args.n, args.rounds

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ours = OfferSigner(key, key_id="KEYID12345", issuer_id="issuer-uuid", bundle_id="com.example.app")
    apple = PromotionalOfferV2SignatureCreator(pem, "KEYID12345", "issuer-uuid", "com.example.app")
    token = ours.sign(**OFFER)
    signing_input, _, sig = token.rpartition(".")
    raw, data, public = base64.urlsafe_b64decode(sig + "=="), signing_input.encode(), key.public_key()
    assert verify_es256(public, data, raw)

    sign = per_call_us(lambda: ours.sign(**OFFER), n, rounds)
    claims = per_call_us(lambda: ours._signing_input(OFFER["product_id"], OFFER["offer_identifier"],
                                                     OFFER["transaction_id"]), n, rounds)
    verify = per_call_us(lambda: verify_es256(public, data, raw), n, rounds)
    lib = per_call_us(lambda: apple.create_signature(*OFFER.values()), n, rounds)
    print(f"OfferSigner.sign (OpenSSL signs with the key object):  median {sign:7.1f} us/offer")
    print(f"  of which the signing input (claims, encoding):        median {claims:7.1f} us")
    print(f"baseline: verify_es256, one ES256 check (every request): median {verify:7.1f} us")
    print(f"Apple's PromotionalOfferV2SignatureCreator (PyJWT):      median {lib:7.1f} us/offer")
    print(f"ratios: offer / check {sign / verify:.2f}; ECDSA share of an offer {(sign - claims) / sign:.2f}; "
          f"Apple's / ours {lib / sign:.2f}")


if __name__ == "__main__":
    main()
