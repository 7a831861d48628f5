"""The endpoint in-process (Litestar's TestClient): answers, refusals, fallbacks, reload, metrics."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from litestar.testing import TestClient

from models.catalog import DEMO_CATALOG, Catalog
from serving.settings import Settings
from serving.snapshot import ModelBundle
from tests.conftest import APP_ID

PM = "com.example.premium.monthly"
URL = "/retention/message"


@pytest.fixture
def offer_key(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePublicKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp_path / "key.p8"
    p8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return p8, key.public_key()



def decisions(client: TestClient[Any]) -> list[dict[str, Any]]:
    """Return the rows the service logged so far (flushes the background writer first)."""
    from serving.log_reader import read_decisions

    svc = client.app.state.service
    svc.decision_log.flush()
    return list(read_decisions(svc.decision_log.path))


def post(client: TestClient[Any], body: bytes) -> Any:
    return client.post(URL, content=body, headers={"content-type": "application/json"})


def test_signed_request_gets_exactly_one_answer_and_is_logged(client_for: Any, pki: Any) -> None:
    c = client_for()
    r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == 1 and next(iter(body)) in ("message", "alternateProduct")  # no offer key: no offers
    rows = decisions(c)
    assert len(rows) == 1
    row = rows[0]
    assert row["policy"].startswith("ml:") and row["model_version"]
    assert 0 < row["propensity"] <= 1 and len(row["scores"]) == len(row["candidates"]) == 6
    assert abs(sum(row["probabilities"]) - 1) < 1e-9


def test_all_three_answers_and_the_offer_signature(client_for: Any, pki: Any, offer_key: Any) -> None:
    """Messages, alternate products and promotional offers are answered; offers are signed in the server and verify."""
    p8, public = offer_key
    c = client_for(epsilon=1.0, offer_key_file=str(p8), offer_key_id="KEY1", offer_issuer_id="issuer-1",
                   bundle_id="com.example.app")
    catalog = Catalog.load(DEMO_CATALOG)
    seen: dict[str, dict[str, Any]] = {}
    for i in range(60):
        otid = f"70000{i}"
        r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", original_transaction_id=otid))
        assert r.status_code == 200
        (kind, obj), = r.json().items()
        seen[kind] = {**obj, "_otid": otid}
    assert set(seen) == {"message", "alternateProduct", "promotionalOffer"}
    alt = seen["alternateProduct"]
    m = catalog.messages[alt["messageIdentifier"]]
    assert alt["productId"] == m.alternateProductId
    assert catalog.products[alt["productId"]].subscriptionGroup == catalog.products[PM].subscriptionGroup
    assert alt.get("billingPlanType") == m.billingPlanType
    offer = seen["promotionalOffer"]
    assert set(offer) - {"_otid"} == {"messageIdentifier", "promotionalOfferSignatureV2"}
    claims = jwt.decode(offer["promotionalOfferSignatureV2"], public, algorithms=["ES256"], audience="promotional-offer")
    assert claims["transactionId"] == offer["_otid"]
    assert claims["offerIdentifier"] == catalog.messages[offer["messageIdentifier"]].offerIdentifier
    assert claims["productId"] == PM and claims["bid"] == "com.example.app" and claims["iss"] == "issuer-1"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "malformed_body"),
        (b"{}", "malformed_body"),
        (b'{"signedPayload": 5}', "malformed_body"),
        (b"[" * 5000 + b"]" * 5000, "malformed_body"),
        (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b', "signedPayload": "a.b.c"}', None),
        (b'{"signedPayload": "a.b"}', "malformed_jws"),
        (b'{"signedPayload": "a.b.c.d"}', "malformed_jws"),
        (b'{"signedPayload": "%%%.***.!!!"}', "malformed_jws"),
    ],
)
def test_bad_bodies_get_a_stable_4xx_never_a_5xx(client_for: Any, body: bytes, code: str | None) -> None:
    c = client_for()
    r = post(c, body)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "detail"}
    if code:
        assert r.json()["error"] == code
    assert c.get("/health").status_code == 200  # still alive


def test_body_size_limit_at_and_one_byte_over(client_for: Any) -> None:
    c = client_for(max_body_bytes=4096)
    at = b'{"signedPayload": "' + b"a" * (4096 - 21) + b'"}'
    assert len(at) == 4096
    r = post(c, at)
    assert r.status_code == 400 and r.json()["error"] == "malformed_jws"
    over = at[:-2] + b'a"}'
    assert len(over) == 4097
    r = post(c, over)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_no_eligible_message_is_404_and_logged(client_for: Any, pki: Any) -> None:
    c = client_for()
    r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", user_locale="pt-BR"))
    assert r.status_code == 404 and r.json()["error"] == "no_eligible_message"
    rows = decisions(c)
    assert len(rows) == 1 and rows[0]["message_id"] is None and rows[0]["status"] == 404


class _FakeScorer:
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def p_stay(self, X: np.ndarray) -> np.ndarray:
        if self.behaviour == "raise":
            raise RuntimeError("broken model")
        if self.behaviour == "nan":
            return np.full(len(X), np.nan)
        time.sleep(0.2)
        return np.full(len(X), 0.5)


def _break_model(client: TestClient[Any], behaviour: str) -> None:
    svc = client.app.state.service
    snap = svc.runtime.snapshot
    bad = ModelBundle(snap.model.version, snap.model.featurizer, _FakeScorer(behaviour), snap.model.schema_sha256)
    svc.runtime.snapshot = dataclasses.replace(snap, model=bad)


@pytest.mark.parametrize(("behaviour", "reason"), [("raise", "model_error"), ("nan", "model_nan"), ("sleep", "deadline")])
def test_a_broken_model_never_costs_the_message(client_for: Any, pki: Any, behaviour: str, reason: str) -> None:
    c = client_for()
    _break_model(c, behaviour)
    default = Catalog.load(DEMO_CATALOG).default_for(PM, "en-US")
    for _ in range(4):
        r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
        assert r.status_code == 200 and r.json() == {"message": {"messageIdentifier": default.messageIdentifier}}
    rows = decisions(c)
    assert {row["fallback_reason"] for row in rows} <= {reason, "circuit_open"}
    assert rows[0]["policy"] == f"fallback:{reason}" and rows[0]["propensity"] == 1.0
    if behaviour == "sleep":  # one run past the budget opens the circuit at once: the model is not asked again
        assert [row["fallback_reason"] for row in rows[1:]] == ["circuit_open"] * 3


def test_without_a_model_the_rules_answer_and_ready_is_false(client_for: Any, pki: Any, tmp_path: Path) -> None:
    c = client_for(model=str(tmp_path / "empty-registry"))
    assert c.get("/ready").status_code == 503
    r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    assert r.status_code == 200
    assert decisions(c)[0]["policy"] == "fallback:no_model"


def test_kill_switch_file_sends_requests_to_the_rules(client_for: Any, pki: Any, tmp_path: Path) -> None:
    c = client_for()
    (Path(c.app.state.service.settings.data_dir) / "kill-switch").touch()
    r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    assert r.status_code == 200 and decisions(c)[0]["policy"] == "fallback:kill_switch"


def test_verification_failures_are_counted_in_metrics(client_for: Any, pki: Any) -> None:
    c = client_for()
    post(c, pki.signed_request_body(app_apple_id=APP_ID + 1, environment="Sandbox"))
    post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    text = c.get("/metrics").text
    assert "wrong_app" in text
    assert c.get("/ready").json()["ready"] is True


def test_reload_while_requests_are_in_flight_fails_none(
    client_for: Any, pki: Any, trained_registry: Path, tmp_path: Path
) -> None:
    import shutil

    from models.registry import Registry

    reg_dir = tmp_path / "reg"
    shutil.copytree(trained_registry, reg_dir)
    cat = tmp_path / "catalog.json"
    cat.write_text(DEMO_CATALOG.read_text())
    c = client_for(model=str(reg_dir), catalog=str(cat), reload_interval_s=0.05)
    reg = Registry(reg_dir)
    v1 = reg.current()
    # a second version: the same model files under a new id
    v2 = reg.write_version((reg_dir / v1 / "model.onnx").read_bytes(), reg.manifest(v1), "copy")
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
            statuses.append(r.status_code)
            versions.add(c.get("/ready").json()["model_version"])

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(0.3)
    reg.promote(v2)
    d = json.loads(cat.read_text())
    d["messages"][2]["messageState"] = "REJECTED"
    cat.write_text(json.dumps(d))
    time.sleep(0.6)
    cat.write_text("{ broken")  # refused: the previous catalog keeps serving
    time.sleep(0.4)
    stop.set()
    t.join()
    assert len(statuses) > 10 and set(statuses) == {200}
    assert {v1, v2} <= versions
    snap = c.app.state.service.runtime.snapshot
    assert snap.model.version == v2 and d["messages"][2]["messageIdentifier"] not in {
        m.messageIdentifier for m in snap.catalog.eligible(PM, "en-US")}
    assert "catalog" in c.get("/metrics").text


def test_shadow_model_is_scored_and_logged_never_shown(client_for: Any, pki: Any, trained_registry: Path, tmp_path: Path) -> None:
    import shutil

    from models.registry import Registry

    reg_dir = tmp_path / "reg"
    shutil.copytree(trained_registry, reg_dir)
    reg = Registry(reg_dir)
    v1 = reg.current()
    v2 = reg.write_version((reg_dir / v1 / "model.onnx").read_bytes(), reg.manifest(v1), "shadow copy")
    c = client_for(model=str(reg_dir), shadow_model=v2, epsilon=0.0)
    for _ in range(5):
        assert post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")).status_code == 200
    rows = decisions(c)
    assert all(r["model_version"] == v1 and r["shadow_model_version"] == v2 for r in rows)
    # the shadow is the same model, so with no exploration its choice equals the one shown
    assert all(r["shadow_message_id"] == r["message_id"] for r in rows)


def test_holdout_share_gets_the_default_with_its_probability_logged(client_for: Any, pki: Any) -> None:
    c = client_for(holdout=1.0, epsilon=0.0)
    default = Catalog.load(DEMO_CATALOG).default_for(PM, "en-US")
    for _ in range(3):
        r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
        assert r.json() == {"message": {"messageIdentifier": default.messageIdentifier}}
    rows = decisions(c)
    assert all(r["propensity"] == 1.0 and r["policy_params"]["holdout"] == 1.0 for r in rows)


def test_requests_ready_together_are_scored_in_one_run_each_with_its_own_scores(
    make_settings: Callable[..., Settings], pki: Any
) -> None:
    """Concurrent requests share one ONNX Runtime call; every answer still gets exactly its own rows' scores."""
    import asyncio

    from serving.app import RetentionService
    from serving.log_reader import read_decisions
    from serving.policy import candidates_for

    # a known chain and the in-process replay memory: all five are verified on the loop and reach scoring in one turn
    svc = RetentionService(make_settings(epsilon=0.0, replay_store="memory"))
    svc.verifier.verify(json.loads(pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))["signedPayload"])
    snap = svc.runtime.snapshot
    assert snap is not None and snap.model is not None
    calls: list[int] = []
    real = snap.model.scorer

    class Counting:
        def p_stay(self, X: np.ndarray) -> np.ndarray:
            calls.append(len(X))
            return np.asarray(real.p_stay(X))

    counted = ModelBundle(snap.model.version, snap.model.featurizer, Counting(), snap.model.schema_sha256)
    svc.runtime.snapshot = dataclasses.replace(snap, model=counted)
    products = [PM, "com.example.premium.annual", PM, PM, "com.example.basic.monthly"]
    bodies = [
        pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", product_id=p, original_transaction_id=str(9000 + i))
        for i, p in enumerate(products)
    ]

    async def main() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(svc.answer(b) for b in bodies))

    svc.start()
    try:
        answers = asyncio.run(main())
        assert svc.decision_log.flush()
    finally:
        svc.stop()
    assert [status for status, _ in answers] == [200] * 5
    rows = {r["original_transaction_id"]: r for r in read_decisions(svc.decision_log.path)}
    assert len(calls) == 1 and calls[0] == sum(len(r["candidates"]) for r in rows.values())
    for i, p in enumerate(products):
        row = rows[str(9000 + i)]
        request = svc.verifier.verify(json.loads(pki.signed_request_body(
            app_apple_id=APP_ID, environment="Sandbox", product_id=p, original_transaction_id=str(9000 + i)))["signedPayload"])
        cands, _ = candidates_for(snap.catalog, request, offers_enabled=svc.offer_signer is not None)
        _, alone = snap.model.score(request, None, cands)
        assert row["candidates"] == [m.messageIdentifier for m in cands]
        assert row["scores"] == pytest.approx(alone.tolist(), abs=1e-6)
        assert row["message_id"] == cands[int(np.argmax(row["values"]))].messageIdentifier  # ε = 0: the argmax


# ---- who chose the message, and what the decision used ------------------------------------------------
def test_a_404_is_logged_as_apple_s_choice(client_for: Any, pki: Any) -> None:
    c = client_for()
    r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", user_locale="pt-BR"))
    assert r.status_code == 404
    [row] = decisions(c)
    assert (row["policy"], row["fallback_reason"]) == ("apple_fallback", "no_eligible_message")


def test_an_answer_later_than_apple_waits_is_logged_as_apple_s_choice(client_for: Any, pki: Any, tmp_path: Path) -> None:
    c = client_for(apple_wait_ms=0.0)  # every answer is "too late" for a zero wait
    r = post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"))
    assert r.status_code == 200
    [row] = decisions(c)
    assert (row["policy"], row["fallback_reason"]) == ("apple_fallback", "answer_too_late")
    assert row["message_id"] == next(iter(r.json().values()))["messageIdentifier"]  # what we answered, kept
    # in time (the default 700 ms), the same request is ours
    c2 = client_for(data_dir=str(tmp_path / "in-time"))
    assert post(c2, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")).status_code == 200
    assert decisions(c2)[0]["policy"].startswith("ml:")


def test_each_decision_logs_the_raw_profile_values_it_used(client_for: Any, pki: Any, tmp_path: Path) -> None:
    from serving.profiles import import_profiles

    c = client_for()
    data_dir = Path(c.app.state.service.settings.data_dir)
    src = tmp_path / "profiles.csv"
    src.write_text("original_transaction_id,tenure_days,country\n2000000042,400,DE\n")
    import_profiles(src, data_dir / "profiles.sqlite")
    time.sleep(1.1)  # the store looks for a new file once a second
    for otid in ("2000000042", "2000000043"):
        assert post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox",
                                               original_transaction_id=otid)).status_code == 200
    (data_dir / "kill-switch").touch()  # a fallback that never scored still logs the profile it would have used
    time.sleep(1.1)
    assert post(c, pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox",
                                           original_transaction_id="2000000042")).status_code == 200
    rows = decisions(c)
    assert [json.loads(r["profile"]) for r in rows] == [{"tenure_days": 400, "country": "DE"}, None,
                                                         {"tenure_days": 400, "country": "DE"}]
    assert rows[2]["policy"] == "fallback:kill_switch"
