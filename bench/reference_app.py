"""The endpoint benchmark's second baseline: only the work the protocol makes every answer pay.

``POST /retention/message`` here decodes the body, checks the ES256 signature of Apple's JWS once with the
leaf certificate's key, scores one 8-row matrix with the benchmark's ONNX model, and, unless
``BENCH_REFERENCE_OFFERS=0``, mints one ``promotionalOfferSignatureV2``. The two ECDSA operations are done
the way ``retention serve`` does them: both by OpenSSL on the event loop (``serving.verify.verify_es256``,
``serving.offers.OfferSigner``). Nothing else: no certificate chain, no claim, freshness or replay check,
no catalog, features, exploration, decision log or metrics. It is not a server anyone should run (it
trusts any certificate); it tells how far this machine lets a Python endpoint go at all, so the full
endpoint can be read against it as well as against the bare echo.

Configured by environment: ``BENCH_MODEL`` (a model registry), ``BENCH_OFFER_KEY`` (a ``.p8`` file).
"""

from __future__ import annotations

import base64
import os
from typing import Any

import msgspec
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from litestar import Litestar, asgi, get

from models.registry import Registry
from models.scoring import Scorer
from serving.offers import OfferSigner
from serving.verify import verify_es256

_scorer = Scorer(Registry(os.environ["BENCH_MODEL"]).load())
_rows = np.random.default_rng(0).random((8, _scorer.n_features), dtype=np.float32)
# each row shows one message, as a featurized candidate does (the model scales P(stay) by that message's factor)
_message_cols = [i for i, name in enumerate(_scorer.model.schema.names) if name.startswith("message=")]
_rows[:, _message_cols] = 0.0
_rows[np.arange(8), [_message_cols[i % len(_message_cols)] for i in range(8)]] = 1.0
_signer = (
    OfferSigner.from_key_file(os.environ["BENCH_OFFER_KEY"], key_id="BENCH", issuer_id="bench", bundle_id="com.example")
    if os.environ.get("BENCH_REFERENCE_OFFERS", "1") == "1"
    else None
)
_leaves: dict[str, ec.EllipticCurvePublicKey] = {}  # header -> its leaf certificate's key (no chain is checked)


class _Body(msgspec.Struct):
    signedPayload: str


_decode = msgspec.json.Decoder(_Body).decode
_encode = msgspec.json.Encoder().encode


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _leaf_key(header: str) -> ec.EllipticCurvePublicKey:
    key = _leaves.get(header)
    if key is None:
        x5c = msgspec.json.decode(_b64url(header))["x5c"]
        leaf_key = x509.load_der_x509_certificate(base64.b64decode(x5c[0])).public_key()
        assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
        key = _leaves[header] = leaf_key
    return key


@asgi("/retention/message", copy_scope=False)
async def reference(scope: Any, receive: Any, send: Any) -> None:
    chunks = []
    while True:
        event = await receive()
        chunks.append(event.get("body", b""))
        if not event.get("more_body", False):
            break
    header, payload, signature = _decode(b"".join(chunks)).signedPayload.split(".")
    ok = verify_es256(_leaf_key(header), f"{header}.{payload}".encode(), _b64url(signature))
    p_stay = float(_scorer.p_stay(_rows).max())
    offer = _signer.sign(product_id="p", offer_identifier="o", transaction_id="1") if _signer else ""
    body = _encode({"ok": ok, "p": p_stay, "promotionalOfferSignatureV2": offer})
    status = 200 if ok else 401
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "alive"}


app = Litestar(route_handlers=[reference, health], openapi_config=None)
