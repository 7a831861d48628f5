"""``retention catalog sync``: Apple's message/image states into the catalog, without a network.

Apple's client is replaced by a fake with the same method names that answers the
library's own response models (or raises its APIException), as the real client would.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import requests
from appstoreserverlibrary.api_client import APIException, AppStoreServerAPIClient
from appstoreserverlibrary.models.DefaultConfigurationResponse import DefaultConfigurationResponse
from appstoreserverlibrary.models.GetImageListResponse import GetImageListResponse
from appstoreserverlibrary.models.GetImageListResponseItem import GetImageListResponseItem
from appstoreserverlibrary.models.GetMessageListResponse import GetMessageListResponse
from appstoreserverlibrary.models.GetMessageListResponseItem import GetMessageListResponseItem
from appstoreserverlibrary.models.ImageState import ImageState
from appstoreserverlibrary.models.MessageState import MessageState

from models.catalog import Catalog
from serving import catalog_cli, catalog_sync
from serving.catalog_sync import Pacer, SyncError, make_client, write_atomic

M_IMG = "11111111-1111-4111-8111-111111111111"  # plain message with an image
M_ALT = "22222222-2222-4222-8222-222222222222"  # switch-plan message
M_DEF = "33333333-3333-4333-8333-333333333333"  # plain message, the default
IMG = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
APPLE_ONLY_MSG = "44444444-4444-4444-8444-444444444444"
APPLE_ONLY_IMG = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
MONTHLY, ANNUAL = "com.example.monthly", "com.example.annual"


def catalog_doc() -> dict[str, Any]:
    def msg(mid: str, state: str, kind: str = "message", **kw: Any) -> dict[str, Any]:
        base = {"messageIdentifier": mid, "messageState": state, "kind": kind, "imageIdentifier": None,
                "imageState": None, "locales": ["en-US", "fr-FR"], "productIds": [MONTHLY],
                "alternateProductId": None, "billingPlanType": None, "offerIdentifier": None, "cost": 0.0}
        base.update(kw)
        return base

    return {
        "products": [{"productId": MONTHLY, "subscriptionGroup": "premium", "value": 119.88},
                     {"productId": ANNUAL, "subscriptionGroup": "premium", "value": 79.99}],
        "messages": [
            msg(M_IMG, "APPROVED", imageIdentifier=IMG, imageState="PENDING", note="kept by a sync"),
            msg(M_ALT, "PENDING", kind="alternateProduct", alternateProductId=ANNUAL, cost=5.0),
            msg(M_DEF, "APPROVED"),
        ],
        "defaults": [{"productId": MONTHLY, "locale": "en-US", "messageIdentifier": M_DEF}],
    }


class FakeApple:
    """Answers like ``AppStoreServerAPIClient``: the library's models, or its APIException."""

    def __init__(self, messages: dict[str, str], images: dict[str, str],
                 defaults: dict[tuple[str, str], str] | None = None, fail: dict[str, Exception] | None = None) -> None:
        self.messages, self.images, self.defaults = messages, images, defaults or {}
        self.fail = fail or {}
        self.calls: list[str] = []

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def get_message_list(self) -> GetMessageListResponse:
        self._maybe_fail("get_message_list")
        items = [GetMessageListResponseItem(messageIdentifier=UUID(i), messageState=MessageState(s))
                 if s in MessageState else GetMessageListResponseItem(messageIdentifier=UUID(i), rawMessageState=s)
                 for i, s in self.messages.items()]
        return GetMessageListResponse(messageIdentifiers=items)

    def get_image_list(self) -> GetImageListResponse:
        self._maybe_fail("get_image_list")
        return GetImageListResponse(imageIdentifiers=[
            GetImageListResponseItem(imageIdentifier=UUID(i), imageState=ImageState(s)) for i, s in self.images.items()
        ])

    def get_default_message(self, product_id: str, locale: str) -> DefaultConfigurationResponse:
        self._maybe_fail("get_default_message")
        mid = self.defaults.get((product_id, locale))
        if mid is None:
            raise APIException(404, 4040020, "Default message not found.")
        return DefaultConfigurationResponse(messageIdentifier=UUID(mid))


def all_approved() -> FakeApple:
    return FakeApple({M_IMG: "APPROVED", M_ALT: "APPROVED", M_DEF: "APPROVED"}, {IMG: "APPROVED"})


def change_row(out: str, *cells: str) -> bool:
    """Return True when one line of the report's change table holds all `cells`, in order."""
    return any(line.split()[: len(cells)] == list(cells) for line in out.splitlines())


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(catalog_doc(), indent=2))
    return path


def run_sync(monkeypatch: pytest.MonkeyPatch, fake: FakeApple, catalog: Path, *extra: str) -> int:
    monkeypatch.setattr(catalog_sync, "make_client", lambda *a: fake)
    argv = ["sync", "--catalog", str(catalog), "--key-file", "SubscriptionKey_TEST.p8", "--key-id", "KEYID",
            "--issuer-id", "issuer", "--bundle-id", "com.example.app", "--environment", "Production",
            "--min-interval", "0", *extra]
    return catalog_cli.main(argv)


def state(path: Path, mid: str) -> tuple[str, str | None]:
    m = Catalog.load(path).messages[mid]
    return m.messageState, m.imageState


# ---- states ----------------------------------------------------------------------------------
def test_sync_writes_apples_states_and_the_server_sees_them(monkeypatch, catalog_file, capsys):
    fake = FakeApple({M_IMG: "REJECTED", M_ALT: "APPROVED", M_DEF: "APPROVED"}, {IMG: "APPROVED"})
    before = {m.messageIdentifier for m in Catalog.load(catalog_file).eligible(MONTHLY, "en-US")}
    assert before == {M_DEF}  # M_IMG's image is pending, M_ALT is pending
    assert run_sync(monkeypatch, fake, catalog_file) == 0
    assert state(catalog_file, M_IMG) == ("REJECTED", "APPROVED")
    assert state(catalog_file, M_ALT) == ("APPROVED", None)
    after = {m.messageIdentifier for m in Catalog.load(catalog_file).eligible(MONTHLY, "en-US")}
    assert after == {M_ALT, M_DEF}
    # keys the schema does not know survive; nothing else moved
    doc = json.loads(catalog_file.read_text())
    assert doc["messages"][0]["note"] == "kept by a sync"
    assert doc["products"] == catalog_doc()["products"] and doc["defaults"] == catalog_doc()["defaults"]
    out = capsys.readouterr().out
    assert "changes (3)" in out and f"wrote {catalog_file}" in out
    assert change_row(out, "message", M_IMG, "messageState", "APPROVED", "REJECTED")
    assert change_row(out, "image", M_IMG, "imageState", f"({IMG})", "PENDING", "APPROVED")
    assert fake.calls == ["get_message_list", "get_image_list"]


def test_unknown_on_either_side_is_reported_and_nothing_is_deleted(monkeypatch, catalog_file, capsys):
    fake = FakeApple({M_IMG: "APPROVED", M_DEF: "APPROVED", APPLE_ONLY_MSG: "APPROVED"}, {APPLE_ONLY_IMG: "PENDING"})
    assert run_sync(monkeypatch, fake, catalog_file) == 0
    cat = Catalog.load(catalog_file)
    assert set(cat.messages) == {M_IMG, M_ALT, M_DEF}  # Apple-only entries are not invented
    assert state(catalog_file, M_ALT) == ("PENDING", None)  # unknown to Apple: kept, not served
    assert state(catalog_file, M_IMG) == ("APPROVED", "PENDING")  # its image is unknown to Apple
    out = capsys.readouterr().out
    only_apple = out.split("at Apple but not in the catalog")[1].split("in the catalog but unknown to Apple")[0]
    assert APPLE_ONLY_MSG in only_apple and APPLE_ONLY_IMG in only_apple
    unknown = out.split("in the catalog but unknown to Apple")[1]
    assert M_ALT in unknown and IMG in unknown and "marked PENDING" in unknown


def test_a_state_apple_adds_later_is_treated_as_not_shown(monkeypatch, catalog_file, capsys):
    fake = FakeApple({M_IMG: "IN_REVIEW", M_ALT: "APPROVED", M_DEF: "APPROVED"}, {IMG: "APPROVED"})
    assert run_sync(monkeypatch, fake, catalog_file) == 0
    assert state(catalog_file, M_IMG)[0] == "PENDING"
    assert "IN_REVIEW" in capsys.readouterr().out


def test_no_change_leaves_the_file_alone(monkeypatch, tmp_path, capsys):
    doc = catalog_doc()
    doc["messages"][0]["imageState"] = "APPROVED"
    doc["messages"][1]["messageState"] = "APPROVED"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    before = path.stat()
    assert run_sync(monkeypatch, all_approved(), path) == 0
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # no reload triggered
    assert "already up to date" in capsys.readouterr().out


# ---- refusals ----------------------------------------------------------------------------------
def test_invalid_result_is_refused_and_the_file_untouched(monkeypatch, catalog_file, capsys):
    original = catalog_file.read_bytes()
    fake = FakeApple({M_IMG: "APPROVED", M_ALT: "APPROVED", M_DEF: "REJECTED"}, {IMG: "APPROVED"})  # the default
    assert run_sync(monkeypatch, fake, catalog_file) == 1
    assert catalog_file.read_bytes() == original
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "not APPROVED" in err[0] and M_DEF in err[0]
    assert list(catalog_file.parent.iterdir()) == [catalog_file]  # no temporary file left


@pytest.mark.parametrize(
    "fail, expected",
    [
        (APIException(429, 4290000, "Rate limit exceeded."), ["HTTP 429", "4290000", "RATE_LIMIT_EXCEEDED"]),
        (APIException(401), ["HTTP 401", "check --key-id"]),
        (APIException(404), ["no access to the Retention Messaging API", "docs/apple-setup.md"]),
        (requests.ConnectionError("Max retries exceeded with url\n (Caused by NameResolutionError)"),
         ["no usable answer", "ConnectionError"]),
    ],
)
def test_apple_error_is_one_line_and_the_file_untouched(monkeypatch, catalog_file, capsys, fail, expected):
    original = catalog_file.read_bytes()
    fake = FakeApple({M_IMG: "REJECTED"}, {}, fail={"get_image_list": fail})
    assert run_sync(monkeypatch, fake, catalog_file) == 1
    assert catalog_file.read_bytes() == original
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "get_image_list" in err[0] and "not changed" in err[0]
    assert all(e in err[0] for e in expected)
    assert "Traceback" not in captured.err and captured.out == ""


def test_an_invalid_catalog_stops_before_any_call_to_apple(monkeypatch, tmp_path, capsys):
    path = tmp_path / "bad.json"
    doc = catalog_doc()
    doc["messages"][0]["kind"] = "banner"
    path.write_text(json.dumps(doc))
    fake = FakeApple({}, {})
    assert run_sync(monkeypatch, fake, path) == 1
    assert fake.calls == [] and "banner" in capsys.readouterr().err


# ---- dry run, --out, atomic write ----------------------------------------------------------------
def test_dry_run_prints_the_diff_and_writes_nothing(monkeypatch, catalog_file, capsys):
    original, st = catalog_file.read_bytes(), catalog_file.stat()
    assert run_sync(monkeypatch, all_approved(), catalog_file, "--dry-run", "--out", str(catalog_file) + ".new") == 0
    assert catalog_file.read_bytes() == original and catalog_file.stat().st_mtime_ns == st.st_mtime_ns
    assert not Path(str(catalog_file) + ".new").exists()
    out = capsys.readouterr().out
    assert change_row(out, "message", M_ALT, "messageState", "PENDING", "APPROVED")
    assert "dry run: nothing written" in out


def test_out_writes_elsewhere_and_leaves_the_catalog(monkeypatch, catalog_file):
    original = catalog_file.read_bytes()
    out = catalog_file.parent / "synced.json"
    assert run_sync(monkeypatch, all_approved(), catalog_file, "--out", str(out)) == 0
    assert catalog_file.read_bytes() == original
    assert state(out, M_ALT) == ("APPROVED", None)


def test_write_is_atomic_replace_keeping_permissions(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    ino = path.stat().st_ino
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != ino  # a new file renamed over the old: a reader has the old one or the new one
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert list(tmp_path.iterdir()) == [path]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "catalog.json"
    path.write_bytes(b"old")

    def boom(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog_sync.os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


# ---- default messages ------------------------------------------------------------------------------
def test_default_messages_checked_per_product_and_locale(monkeypatch, catalog_file, capsys):
    fake = FakeApple({M_IMG: "APPROVED", M_ALT: "APPROVED", M_DEF: "APPROVED"}, {IMG: "APPROVED"},
                     defaults={(MONTHLY, "en-US"): M_DEF, (MONTHLY, "fr-FR"): M_IMG, (ANNUAL, "en-US"): M_DEF})
    assert run_sync(monkeypatch, fake, catalog_file, "--check-defaults") == 0
    assert fake.calls.count("get_default_message") == 4  # 2 products x 2 locales
    out = capsys.readouterr().out
    assert "4 product/locale pair(s) checked, 3 mismatch(es)" in out
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if line.startswith("  com.example")}
    assert "only Apple has a default" in rows[(MONTHLY, "fr-FR")]
    assert "no default anywhere" in rows[(ANNUAL, "fr-FR")]
    assert (MONTHLY, "en-US") not in rows  # the same on both sides
    assert json.loads(catalog_file.read_text())["defaults"] == catalog_doc()["defaults"]  # only reported


def test_adopt_defaults_takes_apples_configuration(monkeypatch, catalog_file, capsys):
    fake = FakeApple({M_IMG: "APPROVED", M_ALT: "APPROVED", M_DEF: "APPROVED"}, {IMG: "APPROVED"},
                     defaults={(ANNUAL, "fr-FR"): M_DEF, (ANNUAL, "en-US"): APPLE_ONLY_MSG})
    assert run_sync(monkeypatch, fake, catalog_file, "--adopt-defaults", "--locales", "en-US,fr-FR") == 0
    cat = Catalog.load(catalog_file)
    assert cat.defaults[(ANNUAL, "fr-FR")].messageIdentifier == M_DEF
    assert (ANNUAL, "en-US") not in cat.defaults  # Apple's default is not in the catalog: reported, not adopted
    assert cat.defaults[(MONTHLY, "en-US")].messageIdentifier == M_DEF  # Apple has none: ours is never removed
    assert "Apple's default is not in the catalog" in capsys.readouterr().out


def test_calls_to_one_endpoint_are_spaced_by_the_rate_limit():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pacer = Pacer(1.0, sleep=sleep, clock=lambda: now[0])
    fake = FakeApple({}, {}, defaults={})
    catalog_sync.fetch_apple_state(fake, pacer, [(MONTHLY, "en-US"), (MONTHLY, "fr-FR"), (ANNUAL, "en-US")])
    assert pacer.calls == 5
    assert slept == [1.0, 1.0]  # the two lists are separate endpoints; three default calls, two gaps
    assert catalog_sync.min_interval_for("Sandbox") == 10.0 and catalog_sync.min_interval_for("Production") == 1.0


# ---- credentials and usage --------------------------------------------------------------------------
def test_client_is_apples_and_built_from_the_key_file_without_network(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "SubscriptionKey_TEST.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    client = make_client(path, "KEYID", "issuer", "com.example.app", "Sandbox")
    assert isinstance(client, AppStoreServerAPIClient)
    assert client._base_url == "https://api.storekit-sandbox.apple.com"


def test_a_bad_key_file_is_one_line_that_does_not_quote_it(tmp_path, capsys):
    path = tmp_path / "SubscriptionKey_TEST.p8"
    path.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SyncError) as info:
        make_client(path, "KEYID", "issuer", "com.example.app", "Production")
    assert "not a PEM private key" in str(info.value) and "c2VjcmV0" not in str(info.value)
    argv = ["sync", "--catalog", "c.json", "--key-file", str(path), "--key-id", "K", "--issuer-id", "i",
            "--bundle-id", "b", "--environment", "Production"]
    assert catalog_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "c2VjcmV0" not in err


def test_missing_credentials_are_a_usage_error(catalog_file, capsys, monkeypatch):
    for var in ("RETENTION_OFFER_KEY_FILE", "RETENTION_OFFER_KEY_ID", "RETENTION_OFFER_ISSUER_ID",
                "RETENTION_BUNDLE_ID", "RETENTION_ENVIRONMENT"):
        monkeypatch.delenv(var, raising=False)
    assert catalog_cli.main(["sync", "--catalog", str(catalog_file)]) == 2
    assert "--key-file" in capsys.readouterr().err


def test_validate_and_coverage_still_work(catalog_file, capsys):
    assert catalog_cli.main(["validate", "--catalog", str(catalog_file)]) == 0
    assert "valid" in capsys.readouterr().out
    assert catalog_cli.main(["coverage", "--catalog", str(catalog_file), "--locales", "en-US"]) == 1
    assert f"no default: {ANNUAL} en-US" in capsys.readouterr().out


def test_an_unwritable_target_is_one_line(monkeypatch, catalog_file, capsys):
    out = catalog_file.parent / "missing-folder" / "synced.json"
    assert run_sync(monkeypatch, all_approved(), catalog_file, "--out", str(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]


def test_a_symlinked_catalog_stays_a_symlink(tmp_path):
    real = tmp_path / "releases" / "catalog.json"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "catalog.json"
    link.symlink_to(real)
    write_atomic(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
