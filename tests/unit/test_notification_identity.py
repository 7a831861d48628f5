"""Only our app's notifications are stored: bundleId, appAppleId and environment, as Apple's library checks them.

Every notification here is correctly signed by the test CA the server trusts; what differs is the app and
environment it names, in the outer container (``data``, ``summary``, ``appData``, ``externalPurchaseToken``)
or in its nested signed transaction and renewal info. The same notifications also go through Apple's
``SignedDataVerifier`` (app-store-server-library), whose verdict ours must equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from litestar.testing import TestClient

from serving.app import create_app
from serving.log_reader import read_outcomes
from serving.settings import Settings, SettingsError
from serving.testpki import TestPKI
from tests.conftest import APP_ID, BUNDLE_ID
from tests.integration.test_server import free_port

URL = "/apple/notifications"
PM = "com.example.premium.monthly"
OTHER_BUNDLE = "com.example.someone-else"
UNSET = object()  # a field left out of the payload


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    if value is UNSET:
        d.pop(key, None)
    else:
        d[key] = value


def notification(
    pki: TestPKI,
    *,
    env: str = "Sandbox",
    container: str = "data",
    bundle_id: Any = BUNDLE_ID,
    app_apple_id: Any = APP_ID,
    environment: Any = None,
    transaction: dict[str, Any] | None = None,
    renewal: dict[str, Any] | None = None,
    ntype: str = "DID_RENEW",
    otid: str = "2000000123",
) -> dict[str, Any]:
    """Return a decoded notification payload naming (`bundle_id`, `app_apple_id`, `environment`) in `container`.

    `environment` defaults to `env`; UNSET leaves a field out. In ``data``, a signed transaction and renewal
    info for `env` and our bundle id are added, with the fields of `transaction` / `renewal` over them.
    """
    now = int(time.time() * 1000)
    c: dict[str, Any] = {"bundleVersion": "1"}
    _put(c, "bundleId", bundle_id)
    _put(c, "appAppleId", app_apple_id)
    if container == "externalPurchaseToken":  # its environment is told by the externalPurchaseId prefix
        c["externalPurchaseId"] = ("SANDBOX" if env == "Sandbox" else "") + str(uuid.uuid4())
        c["tokenCreationDate"] = now
    else:
        _put(c, "environment", env if environment is None else environment)
    if container == "data":
        c["status"] = 1
        txn = {"originalTransactionId": otid, "transactionId": otid + "9", "productId": PM, "bundleId": BUNDLE_ID,
               "purchaseDate": now - 1000, "type": "Auto-Renewable Subscription", "environment": env,
               "signedDate": now}
        ren = {"originalTransactionId": otid, "autoRenewProductId": PM, "productId": PM, "autoRenewStatus": 1,
               "environment": env, "signedDate": now}
        for base, over in ((txn, transaction), (ren, renewal)):
            for k, v in (over or {}).items():
                _put(base, k, v)
        c["signedTransactionInfo"] = pki.sign(txn)
        c["signedRenewalInfo"] = pki.sign(ren)
    if container == "summary":
        c.update({"requestIdentifier": str(uuid.uuid4()), "storefrontCountryCodes": ["USA"], "succeededCount": 1,
                  "failedCount": 0, "productId": PM})
        ntype = "RENEWAL_EXTENSION"
    if container == "externalPurchaseToken":
        ntype = "EXTERNAL_PURCHASE_TOKEN"
    if container == "appData":
        ntype = "RESCIND_CONSENT"
    return {"notificationType": ntype, "notificationUUID": str(uuid.uuid4()), container: c, "version": "2.0",
            "signedDate": now}



def post(client: TestClient[Any], pki: TestPKI, payload: dict[str, Any]) -> tuple[int, str]:
    """Return (status, error code or the status word) for one signed notification."""
    r = client.post(URL, content=json.dumps({"signedPayload": pki.sign(payload)}).encode())
    body = r.json()
    return r.status_code, body.get("error") or body.get("status")


def stored(client: TestClient[Any]) -> list[str]:
    svc = client.app.state.service
    svc.decision_log.flush()
    return [o["original_transaction_id"] for o in read_outcomes(svc.decision_log.path)]


# (id, server environment, notification keyword arguments, expected (status, code))
CASES: list[tuple[str, str, dict[str, Any], tuple[int, str]]] = [
    ("ours-sandbox", "Sandbox", {}, (200, "recorded")),
    ("ours-sandbox-without-app-apple-id", "Sandbox", {"app_apple_id": UNSET}, (200, "recorded")),
    ("ours-production", "Production", {"env": "Production"}, (200, "recorded")),
    ("other-bundle-id", "Sandbox", {"bundle_id": OTHER_BUNDLE}, (403, "wrong_app")),
    ("no-bundle-id", "Sandbox", {"bundle_id": UNSET}, (403, "wrong_app")),
    ("bundle-id-not-a-string", "Sandbox", {"bundle_id": ["com.example.app"]}, (403, "wrong_app")),
    ("other-bundle-id-production", "Production", {"env": "Production", "bundle_id": OTHER_BUNDLE}, (403, "wrong_app")),
    ("production-without-app-apple-id", "Production", {"env": "Production", "app_apple_id": UNSET}, (403, "wrong_app")),
    ("production-other-app-apple-id", "Production", {"env": "Production", "app_apple_id": APP_ID + 1},
     (403, "wrong_app")),
    ("production-app-apple-id-as-string", "Production", {"env": "Production", "app_apple_id": str(APP_ID)},
     (403, "wrong_app")),
    ("sandbox-on-a-production-server", "Production", {"env": "Sandbox"}, (403, "wrong_environment")),
    ("production-on-a-sandbox-server", "Sandbox", {"env": "Production"}, (403, "wrong_environment")),
    ("no-environment", "Sandbox", {"environment": UNSET}, (403, "wrong_environment")),
    ("xcode-environment", "Sandbox", {"environment": "Xcode"}, (403, "wrong_environment")),
    ("transaction-of-another-app", "Sandbox", {"transaction": {"bundleId": OTHER_BUNDLE}}, (403, "wrong_app")),
    ("transaction-without-bundle-id", "Sandbox", {"transaction": {"bundleId": UNSET}}, (403, "wrong_app")),
    ("transaction-from-production", "Sandbox", {"transaction": {"environment": "Production"}},
     (403, "wrong_environment")),
    ("renewal-from-production", "Sandbox", {"renewal": {"environment": "Production"}}, (403, "wrong_environment")),
    ("renewal-without-environment", "Production", {"env": "Production", "renewal": {"environment": UNSET}},
     (403, "wrong_environment")),
    ("summary-ours", "Sandbox", {"container": "summary"}, (200, "ignored")),
    ("summary-of-another-app", "Sandbox", {"container": "summary", "bundle_id": OTHER_BUNDLE}, (403, "wrong_app")),
    ("summary-production-without-app-apple-id", "Production",
     {"env": "Production", "container": "summary", "app_apple_id": UNSET}, (403, "wrong_app")),
    ("app-data-ours", "Sandbox", {"container": "appData"}, (200, "ignored")),
    ("app-data-of-another-app", "Sandbox", {"container": "appData", "bundle_id": OTHER_BUNDLE}, (403, "wrong_app")),
    ("app-data-from-production", "Sandbox", {"container": "appData", "env": "Production"}, (403, "wrong_environment")),
    ("external-purchase-ours", "Sandbox", {"container": "externalPurchaseToken"}, (200, "ignored")),
    ("external-purchase-production-id-on-sandbox", "Sandbox", {"container": "externalPurchaseToken",
                                                               "env": "Production"}, (403, "wrong_environment")),
    ("external-purchase-of-another-app", "Production",
     {"container": "externalPurchaseToken", "env": "Production", "bundle_id": OTHER_BUNDLE}, (403, "wrong_app")),
]


@pytest.mark.parametrize(("server_env", "kw", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_notification_is_stored_only_when_it_is_for_our_app_and_environment(
    client_for: Any, pki: TestPKI, server_env: str, kw: dict[str, Any], expected: tuple[int, str]
) -> None:
    c = client_for(environment=server_env)
    assert post(c, pki, notification(pki, **kw)) == expected
    assert stored(c) == (["2000000123"] if expected == (200, "recorded") else [])


def test_a_notification_without_any_container_names_no_app(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    bare = {"notificationType": "DID_RENEW", "notificationUUID": str(uuid.uuid4()), "version": "2.0",
            "signedDate": int(time.time() * 1000)}
    assert post(c, pki, bare) == (403, "wrong_app")


def test_refusals_are_counted_by_code(client_for: Any, pki: TestPKI) -> None:
    c = client_for()
    post(c, pki, notification(pki, bundle_id=OTHER_BUNDLE))
    post(c, pki, notification(pki, env="Production"))
    metrics = c.get("/metrics").text
    assert 'retention_verification_failures_total{code="wrong_app"} 1.0' in metrics
    assert 'retention_verification_failures_total{code="wrong_environment"} 1.0' in metrics


# ---- the same verdicts as Apple's SignedDataVerifier ------------------------------------------------------
def _apple_verdict(pki: TestPKI, env: str, payload: dict[str, Any]) -> str:
    """Return Apple's library's verdict: ok, wrong_app or wrong_environment (nested tokens of data included)."""
    from appstoreserverlibrary.models.Environment import Environment
    from appstoreserverlibrary.signed_data_verifier import SignedDataVerifier, VerificationException, VerificationStatus

    v = SignedDataVerifier([pki.root_cert.public_bytes(Encoding.DER)], enable_online_checks=False,
                           environment=Environment(env), bundle_id=BUNDLE_ID, app_apple_id=APP_ID)
    codes = {VerificationStatus.INVALID_APP_IDENTIFIER: "wrong_app",
             VerificationStatus.INVALID_ENVIRONMENT: "wrong_environment"}
    try:
        v.verify_and_decode_notification(pki.sign(payload))
        data = payload.get("data") or {}
        v.verify_and_decode_signed_transaction(data["signedTransactionInfo"]) if "signedTransactionInfo" in data else None
        v.verify_and_decode_renewal_info(data["signedRenewalInfo"]) if "signedRenewalInfo" in data else None
    except VerificationException as exc:
        return codes.get(exc.status, f"other:{exc.status}")
    return "ok"


# Apple's library reads appAppleId only in Production; ours also refuses a different one in Sandbox (unless
# relax_app_id_in_sandbox), and wants appAppleId an integer where cattrs would convert a string.
STRICTER = {"bundle-id-not-a-string", "production-app-apple-id-as-string"}


@pytest.mark.parametrize(("server_env", "kw", "expected"), [c[1:] for c in CASES if c[0] not in STRICTER],
                         ids=[c[0] for c in CASES if c[0] not in STRICTER])
def test_apples_library_gives_the_same_verdict(server_env: str, kw: dict[str, Any], expected: tuple[int, str],
                                              pki: TestPKI) -> None:
    assert _apple_verdict(pki, server_env, notification(pki, **kw)) == ("ok" if expected[0] == 200 else expected[1])


def test_a_different_app_apple_id_in_sandbox_is_refused_unless_relaxed(client_for: Any, pki: TestPKI) -> None:
    strict = client_for()
    assert post(strict, pki, notification(pki, app_apple_id=APP_ID + 1)) == (403, "wrong_app")
    relaxed = client_for(relax_app_id_in_sandbox=True)
    assert post(relaxed, pki, notification(pki, app_apple_id=APP_ID + 1)) == (200, "recorded")
    assert _apple_verdict(pki, "Sandbox", notification(pki, app_apple_id=APP_ID + 1)) == "ok"


# ---- configuration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("environment", ["Xcode", "LocalTesting", "sandbox", ""])
def test_only_sandbox_or_production_is_an_environment(environment: str) -> None:
    with pytest.raises(SettingsError, match="must be Sandbox or Production"):
        Settings(environment=environment)


def test_an_app_without_a_bundle_id_is_not_built(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError, match="RETENTION_BUNDLE_ID"):
        create_app(make_settings(bundle_id=None))


def _serve(env: dict[str, str]) -> tuple[int | None, str]:
    """Return (exit status, stderr) of ``retention serve``; None when it was still serving after 60 s (killed)."""
    proc = subprocess.Popen([sys.executable, "-m", "retention", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its children
        return None, proc.communicate()[1]


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"RETENTION_BUNDLE_ID": None}, "no bundle id configured"),
        ({"RETENTION_ENVIRONMENT": "Xcode"}, "must be Sandbox or Production"),
        ({"RETENTION_ENVIRONMENT": "LocalTesting"}, "must be Sandbox or Production"),
    ],
    ids=["no-bundle-id", "xcode", "local-testing"],
)
def test_serve_refuses_to_start_with_one_line(pki_dir: Path, tmp_path: Path, change: dict[str, str | None],
                                              phrase: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    env.update({"RETENTION_ROOT_CERTS": str(pki_dir / "root.pem"), "RETENTION_APP_APPLE_ID": str(APP_ID),
                "RETENTION_BUNDLE_ID": BUNDLE_ID, "RETENTION_ENVIRONMENT": "Sandbox",
                "RETENTION_DATA_DIR": str(tmp_path / "data"), "RETENTION_PORT": str(free_port())})
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    status, err = _serve(env)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2, err
    assert len(lines) == 1 and phrase in lines[0] and "Traceback" not in err, err
