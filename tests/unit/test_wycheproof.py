"""Every Wycheproof ES256 (P-256, SHA-256, raw r||s) vector through our own signature path gives the file's verdict.

The vectors are not part of the project: they are read from ../shared/vectors and the test skips, with a
reason, where that folder is absent. "acceptable" cases may go either way (../shared/vectors/README.md).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from serving.verify import verify_es256

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "wycheproof" / "ecdsa_secp256r1_sha256_p1363_test.json"


@pytest.fixture(scope="module")
def suite() -> dict[str, Any]:
    if not VECTORS.is_file():
        pytest.skip(f"Wycheproof vectors not found at {VECTORS} (../shared/vectors is absent)")
    return json.loads(VECTORS.read_text())


def _key(group: dict[str, Any]) -> ec.EllipticCurvePublicKey | None:
    try:
        key = load_der_public_key(bytes.fromhex(group["publicKeyDer"]))
    except ValueError:
        return None  # a key OpenSSL refuses to load: every signature under it counts as refused
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    return key


def test_every_vector_gives_the_files_verdict(suite: dict[str, Any]) -> None:
    assert suite["algorithm"] == "ECDSA"
    wrong: list[str] = []
    results: Counter[str] = Counter()
    total = 0
    for group in suite["testGroups"]:
        assert group["publicKey"]["curve"] == "secp256r1" and group["sha"] == "SHA-256"
        key = _key(group)
        for case in group["tests"]:
            total += 1
            accepted = key is not None and verify_es256(key, bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"]))
            results[f"{case['result']}:{'accepted' if accepted else 'refused'}"] += 1
            if case["result"] == "acceptable":
                continue
            if accepted != (case["result"] == "valid"):
                wrong.append(f"tcId {case['tcId']} ({case['comment']}): expected {case['result']}, got accepted={accepted}")
    assert total == suite["numberOfTests"] == 262
    assert not wrong, "\n".join(wrong)
    # Both kinds are present, so the test is not vacuous.
    assert results["valid:accepted"] > 100 and results["invalid:refused"] > 50
