"""The endpoint benchmark's mandatory-work reference (bench/reference_app.py) really does the work it stands for.

A yardstick that skipped its signature check or its offer signature would make the endpoint look slow for
nothing: these tests pin that it checks Apple's signature (a tampered one is refused), scores, and mints an
offer JWS that verifies with the key's public half.
"""

from __future__ import annotations

import base64
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from litestar.testing import TestClient

from tests.conftest import APP_ID

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def reference(trained_registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp_path / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    monkeypatch.setenv("BENCH_MODEL", str(trained_registry))
    monkeypatch.setenv("BENCH_OFFER_KEY", str(p8))
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("bench.reference_app", None)  # it reads its settings when imported
    module = importlib.import_module("bench.reference_app")
    yield module, key
    sys.modules.pop("bench.reference_app", None)


def test_the_reference_checks_the_signature_scores_and_signs_a_verifiable_offer(reference: Any, pki: Any) -> None:
    module, key = reference
    body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")
    with TestClient(app=module.app) as client:
        good = client.post("/retention/message", content=body)
        token = json.loads(body)["signedPayload"]
        head, payload, sig = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
        raw[10] ^= 0x01
        forged = f"{head}.{payload}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"
        bad = client.post("/retention/message", content=json.dumps({"signedPayload": forged}))
    assert good.status_code == 200 and good.json()["ok"] is True
    assert 0.0 <= good.json()["p"] <= 1.0
    claims = jwt.decode(good.json()["promotionalOfferSignatureV2"], key.public_key(), algorithms=["ES256"],
                        audience="promotional-offer")
    assert claims["transactionId"] == "1"
    assert bad.status_code == 401 and bad.json()["ok"] is False
