"""Cost per call of a promotionalOfferSignatureV2: Apple's creator (PyJWT) against serving.offers.OfferSigner.

Run: .venv/bin/python bench/offer_signature.py   (prints medians of 7 rounds and the ratios)

Three lines: Apple's creator; ``OfferSigner.sign`` with OpenSSL signing (``--verify-with thread``); and
``OfferSigner.sign`` with a nonce pair made ahead (what the event loop pays with the signature process, the
default). The pairs' own cost, paid by the signature process off the loop, is the fourth line.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appstoreserverlibrary.jws_signature_creator import PromotionalOfferV2SignatureCreator
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from serving.offers import OfferSigner
from serving.sigproc import _Child

N, ROUNDS = 2000, 7


def per_call_us(fn) -> float:  # type: ignore[no-untyped-def]
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        rounds.append((time.perf_counter() - t0) / N * 1e6)
    return statistics.median(rounds)


def main() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    apple = PromotionalOfferV2SignatureCreator(pem, "KEYID12345", "issuer-uuid", "com.example.app")
    ours = OfferSigner(key, key_id="KEYID12345", issuer_id="issuer-uuid", bundle_id="com.example.app")
    a = per_call_us(lambda: apple.create_signature("com.example.premium.monthly", "winback50", "2000000123456789"))
    b = per_call_us(
        lambda: ours.sign(
            product_id="com.example.premium.monthly", offer_identifier="winback50", transaction_id="2000000123456789"
        )
    )
    child = _Child(4, keep_nonces=False)
    pairs = child.make_nonces(N * ROUNDS)
    nonces = iter([(int.from_bytes(p[:32], "big"), int.from_bytes(p[32:], "big")) for p in pairs])
    c = per_call_us(
        lambda: ours.sign(
            product_id="com.example.premium.monthly", offer_identifier="winback50", transaction_id="2000000123456789",
            nonce=next(nonces),
        )
    )
    d = per_call_us(lambda: child.make_nonces(8)) / 8
    print(f"Apple PromotionalOfferV2SignatureCreator:          median {a:7.1f} us/call")
    print(f"serving.offers.OfferSigner.sign (OpenSSL signs):   median {b:7.1f} us/call")
    print(f"serving.offers.OfferSigner.sign (a nonce at hand): median {c:7.1f} us/call")
    print(f"  a nonce pair, made by the signature process:     median {d:7.1f} us/call")
    print(f"ratio (Apple / ours): {a / b:.2f}x; OpenSSL signing / with a nonce at hand: {b / c:.1f}x")


if __name__ == "__main__":
    main()
