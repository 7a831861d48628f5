"""``retention sign``: requests, notifications and a test In-App Purchase key, enough to drive every path."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from litestar.testing import TestClient

import retention
from serving.app import create_app
from serving.log_reader import read_outcomes
from serving.settings import Settings
from tests.conftest import APP_ID


def claims_of(token: str) -> dict[str, Any]:
    segment = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


def signed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert retention.main(argv) == 0
    return capsys.readouterr().out


def test_sign_notification_with_offer_fields_is_recorded_by_the_endpoint(
    pki_dir: Path, make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    out = signed(["sign", "notification", "--ca", str(pki_dir), "--type", "OFFER_REDEEMED", "--subtype", "UPGRADE",
                  "--app-apple-id", str(APP_ID), "--bundle-id", "com.example.app", "--original-transaction-id",
                  "2000000555", "--offer-type", "2", "--offer-identifier", "winback50", "--offer-discount-type",
                  "PAY_AS_YOU_GO", "--transaction-reason", "RENEWAL", "--transaction-field", "price=4990"], capsys)
    assert len(out.splitlines()) == 1
    payload = claims_of(json.loads(out)["signedPayload"])
    assert payload["notificationType"] == "OFFER_REDEEMED" and payload["subtype"] == "UPGRADE"
    data = payload["data"]
    assert data["appAppleId"] == APP_ID and data["bundleId"] == "com.example.app" and data["environment"] == "Sandbox"
    tx, renewal = claims_of(data["signedTransactionInfo"]), claims_of(data["signedRenewalInfo"])
    assert tx["originalTransactionId"] == renewal["originalTransactionId"] == "2000000555"
    assert (tx["offerType"], tx["offerIdentifier"], tx["offerDiscountType"]) == (2, "winback50", "PAY_AS_YOU_GO")
    assert tx["transactionReason"] == "RENEWAL" and tx["price"] == 4990 and renewal["offerIdentifier"] == "winback50"

    with TestClient(create_app(make_settings())) as client:
        r = client.post("/apple/notifications", content=out.encode())
        assert r.status_code == 200 and r.json() == {"status": "recorded"}
        test = signed(["sign", "notification", "--ca", str(pki_dir), "--type", "TEST", "--no-transaction",
                       "--no-renewal", "--app-apple-id", str(APP_ID)], capsys)
        assert client.post("/apple/notifications", content=test.encode()).json() == {"status": "ignored"}
        svc = client.app.state.service
        svc.decision_log.flush()
        rows = read_outcomes(svc.decision_log.path)
    assert [(o["original_transaction_id"], o["event"]) for o in rows] == [("2000000555", "offer_redeemed")]


def test_a_minted_iap_key_signs_offers_that_verify(
    tmp_path: Path, pki: Any, make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "SubscriptionKey_TEST123.p8"
    out = signed(["sign", "iap-key", "--out", str(key_file), "--key-id", "TEST123"], capsys)
    settings = dict(part.split("=", 1) for part in out.split())
    assert settings["RETENTION_OFFER_KEY_FILE"] == str(key_file) and settings["RETENTION_OFFER_KEY_ID"] == "TEST123"
    assert key_file.stat().st_mode & 0o077 == 0
    public = serialization.load_pem_public_key((tmp_path / "SubscriptionKey_TEST123.p8.pub.pem").read_bytes())
    app = create_app(make_settings(epsilon=1.0, offer_key_file=str(key_file), offer_key_id="TEST123",
                                   offer_issuer_id=settings["RETENTION_OFFER_ISSUER_ID"], bundle_id="com.example.app"))
    with TestClient(app) as client:
        offers = []
        for i in range(60):
            body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", original_transaction_id=f"8{i}")
            answer = client.post("/retention/message", content=body).json()
            offers += [answer["promotionalOffer"]] if "promotionalOffer" in answer else []
    assert offers
    claims = jwt.decode(offers[0]["promotionalOfferSignatureV2"], public,  # type: ignore[arg-type]
                        algorithms=["ES256"], audience="promotional-offer")
    assert claims["bid"] == "com.example.app"
    # a second run never overwrites the key
    assert retention.main(["sign", "iap-key", "--out", str(key_file), "--key-id", "TEST123"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]


def test_sign_ca_on_an_existing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "ca"
    a_file.write_text("")
    assert retention.main(["sign", "--ca", str(a_file)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"--ca {a_file} is a file" in err[0] and captured.out == ""


@pytest.mark.parametrize("count", ["0", "-3"])
def test_sign_count_below_one_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], count: str
) -> None:
    assert retention.main(["sign", "--ca", str(tmp_path / "ca"), "--count", count]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--count must be 1 or more" in err[0] and captured.out == ""


def test_sign_ca_that_cannot_be_created_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert retention.main(["sign", "--ca", "/proc/forbidden"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err == ["retention sign: error: cannot create the test CA folder /proc/forbidden (--ca): "
                   "No such file or directory"] and captured.out == ""


@pytest.mark.parametrize("locale", ["", " ", " en-US"])
def test_sign_blank_locale_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], locale: str
) -> None:
    argv = ["sign", "--ca", str(tmp_path / "ca"), "--locale", locale]
    if locale.strip():
        assert retention.main(argv) == 2
        expected = f"retention sign: error: --locale must be a locale such as en-US, not {locale!r}\n"
    else:  # an empty value (an unset shell variable) is refused by the parser, as for every option
        with pytest.raises(SystemExit) as exit_:
            retention.main(argv)
        assert exit_.value.code == 2
        expected = "retention sign: error: argument --locale: is empty (see retention sign --help)\n"
    captured = capsys.readouterr()
    assert captured.err == expected
    assert captured.out == "" and not (tmp_path / "ca").exists()  # refused before a CA is minted
