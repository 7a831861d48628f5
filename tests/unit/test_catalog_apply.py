"""``retention catalog plan`` / ``apply`` against the loopback Apple server, through Apple's client.

The catalog holds the message content; Apple ends up holding one message per locale (UUID v5
identifiers), the images, and the default messages; the endpoint answers the Apple identifier of
the request's locale while the decision log keeps the catalog's message.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from models.catalog import Catalog
from serving import catalog_cli
from serving.catalog_apply import ApplyError, make_pacer, run
from tests.apple_server import png
from tests.conftest import APP_ID

MONTHLY, ANNUAL = "com.example.monthly", "com.example.annual"
M_TEXT = "5b0c1c3e-6f7a-4d35-9a0e-1f2b3c4d5e6f"  # plain message with an image and a bullet point
M_SWITCH = "6c1d2d4f-7a8b-4e46-8b1f-2a3b4c5d6e7f"  # switch-plan message, no image
LEGACY = "33333333-3333-4333-8333-333333333333"  # a message without content, uploaded by hand


def catalog_doc() -> dict[str, Any]:
    hero = {"file": "img/hero.png", "altText": "A calm lake"}
    bullet = {"text": "Offline downloads", "image": {"file": "img/offline.png", "altText": "A cloud"}}
    return {
        "products": [{"productId": MONTHLY, "subscriptionGroup": "premium", "value": 119.88},
                     {"productId": ANNUAL, "subscriptionGroup": "premium", "value": 79.99}],
        "messages": [
            {"messageIdentifier": M_TEXT, "kind": "message", "productIds": [MONTHLY, ANNUAL], "cost": 0.0,
             "content": {
                 "en-US": {"header": "Before you go", "body": "Your playlists stay with you.", "image": hero,
                           "bulletPoints": [bullet], "headerPosition": "ABOVE_IMAGE"},
                 "fr-FR": {"header": "Avant de partir", "body": "Vos listes restent avec vous."}}},
            {"messageIdentifier": M_SWITCH, "kind": "alternateProduct", "productIds": [MONTHLY],
             "alternateProductId": ANNUAL, "cost": 5.0,
             "content": {"en-US": {"header": "Pay yearly", "body": "Save a third with the annual plan."},
                         "fr-FR": {"header": "Payez à l'année", "body": "Économisez un tiers par an."}}},
            {"messageIdentifier": LEGACY, "messageState": "APPROVED", "kind": "message", "locales": ["de-DE"],
             "productIds": [MONTHLY]},
        ],
        "defaults": [{"productId": MONTHLY, "locale": "en-US", "messageIdentifier": M_TEXT},
                     {"productId": MONTHLY, "locale": "fr-FR", "messageIdentifier": M_TEXT},
                     {"productId": ANNUAL, "locale": "en-US", "messageIdentifier": M_TEXT}],
    }


def write_catalog(folder: Path, doc: dict[str, Any] | None = None) -> Path:
    (folder / "img").mkdir(exist_ok=True)
    (folder / "img" / "hero.png").write_bytes(png(3840, 400))
    (folder / "img" / "offline.png").write_bytes(png(1024, 1024))
    path = folder / "catalog.json"
    path.write_text(json.dumps(doc or catalog_doc(), indent=2))
    return path


@pytest.fixture
def cat(tmp_path: Path) -> Path:
    return write_catalog(tmp_path)


def apply(apple: Any, path: Path, *, prune: bool = False, waits: list[float] | None = None) -> Any:
    sleeps = waits if waits is not None else []
    return run(path, apple.client(), make_pacer(0.0, sleep=sleeps.append), apply=True, prune=prune,
               environment=apple.environment)


def plan(apple: Any, path: Path, *, prune: bool = False) -> Any:
    return run(path, apple.client(), make_pacer(0.0, sleep=lambda s: None), apply=False, prune=prune,
               environment=apple.environment)


def assert_converged(apple: Any, path: Path) -> Catalog:
    """Apple holds exactly the catalog's texts and images, the defaults name the served texts, the record agrees."""
    catalog = Catalog.load(path)
    acct = apple.account
    up = catalog.record(apple.environment)
    assert up is not None
    ours = {u.messageIdentifier for u in up.messages}
    assert ours <= set(acct.messages) and len(ours) == 4  # 2 messages x 2 locales
    assert {(u.message, u.locale) for u in up.messages} == {(m, lo) for m in (M_TEXT, M_SWITCH) for lo in ("en-US", "fr-FR")}
    assert {i.imageIdentifier for i in up.images} <= set(acct.images) and len(up.images) == 2
    for (pid, loc), m in catalog.defaults.items():
        assert acct.defaults[(pid, loc)] == catalog.apple_id(m, loc)
    again = plan(apple, path)
    assert again.plan.steps == [], again.plan.steps
    return catalog


# ---- converging -----------------------------------------------------------------------------
def test_apply_converges_from_an_empty_account_and_a_second_run_changes_nothing(apple, cat, capsys):
    assert catalog_cli.main(["plan", "--catalog", str(cat), "--min-interval", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("upload-image") == 2 and out.count("upload-message") == 4 and "realtime URL: none" in out
    assert apple.server.mutations() == []  # plan changes nothing at Apple
    assert catalog_cli.main(["apply", "--catalog", str(cat), "--min-interval", "0"]) == 0
    catalog = assert_converged(apple, cat)
    # images go up before the texts that use them; the defaults last
    actions = [p.split("/")[4] for _, p in apple.server.mutations()]
    assert actions == ["image"] * 2 + ["message"] * 4 + ["default"] * 3
    # one Apple text per locale, and each says what the catalog says
    en, fr = catalog.apple_id(catalog.messages[M_TEXT], "en-US"), catalog.apple_id(catalog.messages[M_TEXT], "fr-FR")
    assert en != fr
    body = apple.account.messages[en]["body"]
    assert body["header"] == "Before you go" and body["headerPosition"] == "ABOVE_IMAGE"
    assert body["bulletPoints"][0]["text"] == "Offline downloads" and "image" in body
    assert apple.account.images[body["image"]["imageIdentifier"]]["size"] == "FULL_SIZE"
    n = len(apple.server.mutations())
    assert catalog_cli.main(["apply", "--catalog", str(cat), "--min-interval", "0"]) == 0
    assert len(apple.server.mutations()) == n  # idempotent
    assert "nothing done" in capsys.readouterr().out
    assert catalog_cli.main(["validate", "--catalog", str(cat)]) == 0
    assert "shown by Apple: 3" in capsys.readouterr().out  # two with content (approved texts) and the legacy one


def test_apply_converges_from_a_drifted_account_and_prunes_only_when_asked(apple, cat, tmp_path):
    apply(apple, cat)
    acct = apple.account
    catalog = Catalog.load(cat)
    en = catalog.apple_id(catalog.messages[M_TEXT], "en-US")
    fr_switch = catalog.apple_id(catalog.messages[M_SWITCH], "fr-FR")
    # drift: someone deleted a text and a default, repointed another default, and uploaded their own things
    stray_img, stray_msg = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb", "44444444-4444-4444-8444-444444444444"
    del acct.messages[fr_switch]
    del acct.defaults[(ANNUAL, "en-US")]
    acct.images[stray_img] = {"state": "APPROVED", "size": "FULL_SIZE", "data": b""}
    acct.messages[stray_msg] = {"state": "APPROVED", "body": {"header": "x", "body": "y",
                                                              "image": {"imageIdentifier": stray_img, "altText": "z"}}}
    acct.messages[LEGACY] = {"state": "APPROVED", "body": {"header": "legacy", "body": "kept"}}
    acct.defaults[(MONTHLY, "fr-FR")] = stray_msg
    acct.defaults[(MONTHLY, "de-DE")] = stray_msg  # the catalog has no default there
    p = plan(apple, cat).plan
    assert {(s.action, s.target) for s in p.steps} == {
        ("upload-message", fr_switch), ("set-default", f"{ANNUAL} en-US"), ("set-default", f"{MONTHLY} fr-FR")}
    apply(apple, cat)
    assert_converged(apple, cat)
    assert stray_msg in acct.messages and stray_img in acct.images  # kept without --prune
    # --prune: the stray default, then the stray message, then its image; LEGACY (in the catalog) stays
    acct.defaults[(MONTHLY, "de-DE")] = stray_msg
    catalog = Catalog.load(cat)
    doc = json.loads(cat.read_text())
    doc["uploaded"]["Sandbox"]["defaults"].append({"productId": MONTHLY, "locale": "de-DE", "messageIdentifier": stray_msg})
    cat.write_text(json.dumps(doc))
    before = len(apple.server.mutations())
    apply(apple, cat, prune=True)
    pruned = apple.server.mutations()[before:]
    assert [(m, p.split("/")[4]) for m, p in pruned] == [("DELETE", "default"), ("DELETE", "message"), ("DELETE", "image")]
    assert stray_msg not in acct.messages and stray_img not in acct.images and (MONTHLY, "de-DE") not in acct.defaults
    assert LEGACY in acct.messages and en in acct.messages
    assert_converged(apple, cat)


def test_a_run_interrupted_halfway_converges_when_run_again(apple, cat, capsys):
    apple.server.fail_after(3)  # Apple breaks after two images and one text
    assert catalog_cli.main(["apply", "--catalog", str(cat), "--min-interval", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "HTTP 500" in err[-2] and "run it again" in err[-1]
    recorded = Catalog.load(cat).record("Sandbox")
    assert recorded is not None and len(recorded.images) == 2 and len(recorded.messages) == 1  # what Apple holds
    apple.server.fail_after(None)
    assert catalog_cli.main(["apply", "--catalog", str(cat), "--min-interval", "0"]) == 0
    assert_converged(apple, cat)
    uploads = [p for m, p in apple.server.mutations() if m == "PUT" and "/default/" not in p]
    assert len(uploads) == len(set(uploads)) == 6  # nothing uploaded twice


def test_an_upload_that_apple_took_but_the_record_missed_is_adopted(apple, cat):
    apply(apple, cat)
    doc = json.loads(cat.read_text())
    del doc["uploaded"]  # e.g. the process died between Apple's 200 and the record's write
    cat.write_text(json.dumps(doc))
    n = len(apple.server.mutations())
    apply(apple, cat)
    assert len(apple.server.mutations()) == n
    assert_converged(apple, cat)


def test_apply_waits_as_apples_429_says_and_converges(apple, cat):
    apple.server.throttle(2, retry_after_ms=2_000)
    waits: list[float] = []
    result = apply(apple, cat, waits=waits)
    assert len(result.rate_limited_waits) == 2 and all(0 < w <= 2.0 for w in result.rate_limited_waits)
    assert_converged(apple, cat)


def test_a_429_asking_for_longer_than_max_wait_is_one_line(apple, cat, capsys):
    apple.server.throttle(1, retry_after_ms=3_600_000)
    assert catalog_cli.main(["plan", "--catalog", str(cat), "--min-interval", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RATE_LIMIT_EXCEEDED" in err[0] and "wait 3600 s" in err[0]


# ---- review: pending, changed, rejected -------------------------------------------------------
def test_a_changed_text_gets_a_new_identifier_and_the_old_one_serves_until_approved(apple, cat):
    apply(apple, cat)
    old = Catalog.load(cat)
    old_en = old.apple_id(old.messages[M_TEXT], "en-US")
    apple.account.auto_approve = False
    doc = json.loads(cat.read_text())
    doc["messages"][0]["content"]["en-US"]["header"] = "Wait, one more thing"
    cat.write_text(json.dumps(doc))
    result = apply(apple, cat)
    new = Catalog.load(cat)
    new_en = next(s.target for s in result.done if s.action == "upload-message")
    assert new_en != old_en and apple.account.messages[new_en]["state"] == "PENDING"
    assert new.apple_id(new.messages[M_TEXT], "en-US") == old_en  # the approved old text keeps serving
    assert apple.account.defaults[(MONTHLY, "en-US")] == old_en
    assert any("PENDING" in w and old_en in w for w in result.plan.waiting)
    apple.server.approve(new_en)
    result = apply(apple, cat, prune=True)
    new = Catalog.load(cat)
    assert new.apple_id(new.messages[M_TEXT], "en-US") == new_en
    assert apple.account.defaults[(MONTHLY, "en-US")] == new_en and old_en not in apple.account.messages


def test_a_rejected_text_is_reported_and_never_answered(apple, cat, make_settings, tmp_path, pki, capsys):
    apple.account.auto_approve = False
    apply(apple, cat)
    catalog = Catalog.load(cat)
    assert catalog.served == {}  # nothing approved: nothing served, no default set
    assert apple.account.defaults == {}
    fr_text = next(u.messageIdentifier for u in catalog.record("Sandbox").messages
                   if u.message == M_TEXT and u.locale == "fr-FR")
    for mid in list(apple.account.messages):
        (apple.server.reject if mid == fr_text else apple.server.approve)(mid)
    for iid in list(apple.account.images):
        apple.server.approve(iid)
    assert catalog_cli.main(["apply", "--catalog", str(cat), "--min-interval", "0"]) == 1
    out = capsys.readouterr().out
    assert f"rejected: message {M_TEXT} fr-FR: Apple REJECTED its text ({fr_text})" in out
    assert (MONTHLY, "fr-FR") not in apple.account.defaults  # a default must be approved
    catalog = Catalog.load(cat)
    assert catalog.apple_id(catalog.messages[M_TEXT], "fr-FR") is None
    # the endpoint: fr-FR never gets the rejected text; the decision log keeps the catalog's message ids
    from serving.app import create_app

    empty_registry = tmp_path / "no-model"
    empty_registry.mkdir()
    settings = make_settings(catalog=str(cat), model=str(empty_registry))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        answers = []
        for locale in ("fr-FR", "fr-FR", "en-US"):
            body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox", product_id=MONTHLY,
                                           user_locale=locale)
            r = client.post("/retention/message", content=body, headers={"content-type": "application/json"})
            answers.append((r.status_code, r.text))
        svc = client.app.state.service
        svc.decision_log.flush()
        from serving.log_reader import read_decisions

        rows = list(read_decisions(svc.decision_log.path))
    assert all(fr_text not in text for _, text in answers)
    fr_switch = catalog.apple_id(catalog.messages[M_SWITCH], "fr-FR")
    assert answers[0][0] == 200
    assert json.loads(answers[0][1]) == {"alternateProduct": {"messageIdentifier": fr_switch, "productId": ANNUAL}}
    en_text = catalog.apple_id(catalog.messages[M_TEXT], "en-US")
    assert json.loads(answers[2][1]) == {"message": {"messageIdentifier": en_text}}  # the default, in its locale
    assert {r["message_id"] for r in rows} == {M_SWITCH, M_TEXT}  # logical ids, never Apple's per-locale ones
    assert all(set(r["candidates"]) <= {M_TEXT, M_SWITCH, LEGACY} for r in rows)


# ---- validation -------------------------------------------------------------------------------
def test_content_problems_are_one_line_each(tmp_path, capsys):
    doc = catalog_doc()
    en = doc["messages"][0]["content"]["en-US"]
    en["header"] = "h" * 67
    en["bulletPoints"][0]["image"]["file"] = "img/alpha.png"
    doc["messages"][0]["content"]["fr-FR"]["headerPosition"] = "ABOVE_IMAGE"
    doc["messages"][1]["content"]["en-US"]["image"] = {"file": "img/hero.png", "altText": "x" * 151}
    path = write_catalog(tmp_path, doc)
    (tmp_path / "img" / "alpha.png").write_bytes(png(1024, 1024, alpha=True))
    (tmp_path / "img" / "hero.png").write_bytes(png(3000, 400))
    assert catalog_cli.main(["validate", "--catalog", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    expected = [
        "header is 67 characters; Apple allows 66",
        "image img/hero.png: 3000x400 pixels; a message image must be 3840 wide and 160 to 2160 high",
        "image img/alpha.png: has transparency",
        "fr-FR: headerPosition ABOVE_IMAGE needs an image",
        "image altText is 151 characters; Apple allows 150",
    ]
    for text in expected:
        assert sum(text in line for line in err) >= 1, (text, err)
    assert all(line.startswith("retention catalog: ") for line in err)
    with pytest.raises(ApplyError, match="breaks Apple's limits"):
        run(path, None, make_pacer(0.0), apply=False, environment="Sandbox")


def test_a_tRNS_chunk_and_a_non_png_are_refused(tmp_path):
    from serving.catalog_content import png_info

    assert png_info(png(1024, 1024, trns=True)).transparent  # type: ignore[union-attr]
    assert not png_info(png(1024, 1024)).transparent  # type: ignore[union-attr]
    assert png_info(b"GIF89a" + b"\0" * 40) is None


def test_identifiers_follow_the_text(tmp_path):
    from serving.catalog_content import desired

    a = desired(Catalog.load(write_catalog(tmp_path)), tmp_path)
    doc = copy.deepcopy(catalog_doc())
    doc["messages"][1]["content"]["fr-FR"]["body"] = "Économisez davantage."
    (tmp_path / "b").mkdir()
    b = desired(Catalog.load(write_catalog(tmp_path / "b", doc)), tmp_path / "b")
    changed = set(a.messages) ^ set(b.messages)
    assert len(changed) == 2  # only the edited locale's identifier changed
    assert all(str(k) == str(k).lower() and k[14] == "5" for k in a.messages)  # UUID version 5, lowercase
    assert set(a.images) == set(b.images)


def test_catalogs_without_content_keep_working(tmp_path):
    from models.catalog import DEMO_CATALOG

    assert catalog_cli.main(["validate", "--catalog", str(DEMO_CATALOG)]) == 0
    demo = Catalog.load(DEMO_CATALOG)
    m = next(iter(demo.messages.values()))
    assert demo.apple_id(m, m.locales[0]) == m.messageIdentifier


def test_sync_leaves_texts_with_content_to_apply(apple, cat, capsys):
    apply(apple, cat)
    apple.account.messages[LEGACY] = {"state": "APPROVED", "body": {"header": "legacy", "body": "uploaded by hand"}}
    before = cat.read_bytes()
    assert catalog_cli.main(["sync", "--catalog", str(cat), "--min-interval", "0"]) == 0
    out = capsys.readouterr().out
    assert "at Apple but not in the catalog" not in out  # the uploaded texts are the record's, not strays
    assert cat.read_bytes() == before


def test_defaults_are_paced_ten_times_faster_than_the_other_calls():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(round(s, 3))
        now[0] += s

    pacer = make_pacer(1.0, sleep=sleep, clock=lambda: now[0])
    for _ in range(3):
        pacer.call("configure_default_message", lambda: None)
    for _ in range(2):
        pacer.call("upload_message", lambda: None)
    assert slept == [0.1, 0.1, 1.0]  # Apple: 10 requests/s for Configure Default Message, 1/s elsewhere


def test_a_message_without_content_still_needs_its_state_and_locales_must_match_content(tmp_path):
    from models.catalog import CatalogError

    doc = catalog_doc()
    del doc["messages"][2]["messageState"]
    with pytest.raises(CatalogError, match="messageState is missing"):
        Catalog.from_bytes(json.dumps(doc).encode())
    doc = catalog_doc()
    doc["messages"][0]["locales"] = ["en-US"]
    with pytest.raises(CatalogError, match="locales must be left out or equal"):
        Catalog.from_bytes(json.dumps(doc).encode())
    doc["messages"][0]["locales"] = ["fr-FR", "en-US"]
    assert Catalog.from_bytes(json.dumps(doc).encode()).messages[M_TEXT].locales == ["en-US", "fr-FR"]


# ---- one record per environment -----------------------------------------------------------------
def test_sandbox_approvals_never_make_a_production_endpoint_answer_a_text_pending_in_production(
        apple, cat, tmp_path, make_settings, pki):
    from serving.app import create_app
    from tests.conftest import AppleFixture

    (tmp_path / "prod").mkdir()
    prod = AppleFixture(tmp_path / "prod", environment="Production")
    try:
        prod.account.auto_approve = False
        apply(prod, cat)  # Production: every text PENDING, no default set
        apply(apple, cat)  # Sandbox: every text APPROVED at once
        doc = json.loads(cat.read_text())
        assert set(doc["uploaded"]) == {"Sandbox", "Production"}
        in_prod, in_sandbox = Catalog.load(cat, "Production"), Catalog.load(cat, "Sandbox")
        assert in_prod.served == {} and len(in_sandbox.served) == 4
        assert {u.messageState for u in in_prod.record().messages} == {"PENDING"}  # type: ignore[union-attr]
        assert prod.account.defaults == {} and len(apple.account.defaults) == 3
        sandbox_texts = set(in_sandbox.served.values())
        empty_registry = tmp_path / "no-model"
        empty_registry.mkdir()
        settings = make_settings(catalog=str(cat), model=str(empty_registry), environment="Production")
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            texts = []
            for locale in ("en-US", "fr-FR"):
                body = pki.signed_request_body(app_apple_id=APP_ID, environment="Production", product_id=MONTHLY,
                                               user_locale=locale)
                r = client.post("/retention/message", content=body, headers={"content-type": "application/json"})
                assert r.status_code in (200, 404), r.text
                texts.append(r.text)
        assert not any(mid in text for mid in sandbox_texts | set(prod.account.messages) for text in texts)
        # Production approves: its own apply makes those texts (and only those) answered there
        for mid in list(prod.account.messages) + list(prod.account.images):
            prod.server.approve(mid)
        apply(prod, cat)
        assert Catalog.load(cat, "Production").served == in_sandbox.served  # same texts, same UUIDs
        assert len(prod.account.defaults) == 3
    finally:
        prod.server.stop()


def test_a_record_in_the_older_single_form_is_read_and_rewritten_per_environment(apple, cat):
    apply(apple, cat)
    doc = json.loads(cat.read_text())
    doc["uploaded"] = doc["uploaded"]["Sandbox"]  # what apply wrote before records were per environment
    cat.write_text(json.dumps(doc))
    old = Catalog.load(cat, "Production")
    assert len(old.served) == 4  # read as it was
    n = len(apple.server.mutations())
    apply(apple, cat)
    assert len(apple.server.mutations()) == n  # nothing uploaded again
    assert set(json.loads(cat.read_text())["uploaded"]) == {"Sandbox"}
    assert Catalog.load(cat, "Production").served == {}
    assert_converged(apple, cat)


def test_sync_check_defaults_matches_the_defaults_apply_set_through_the_per_locale_texts(apple, cat, capsys):
    apple.account.messages[LEGACY] = {"state": "APPROVED", "body": {"header": "legacy", "body": "by hand"}}
    apply(apple, cat)
    capsys.readouterr()
    assert catalog_cli.main(["sync", "--catalog", str(cat), "--check-defaults", "--min-interval", "0",
                             "--locales", "en-US"]) == 0
    out = capsys.readouterr().out
    assert "0 mismatch(es)" in out and "differ" not in out, out
    before = cat.read_bytes()
    assert catalog_cli.main(["sync", "--catalog", str(cat), "--adopt-defaults", "--min-interval", "0",
                             "--locales", "en-US"]) == 0
    assert cat.read_bytes() == before  # nothing to adopt: Apple's defaults are the catalog's, per locale
    # Apple's default repointed to another catalog message's text: reported, and adopted as that message
    doc = json.loads(before)
    doc["messages"].append({"messageIdentifier": "77777777-7777-4777-8777-777777777777", "kind": "message",
                            "productIds": [ANNUAL], "content": {"en-US": {"header": "Stay", "body": "Please."}}})
    cat.write_text(json.dumps(doc))
    apply(apple, cat)
    other = Catalog.load(cat).apple_id(Catalog.load(cat).messages["77777777-7777-4777-8777-777777777777"], "en-US")
    assert other is not None
    apple.account.defaults[(ANNUAL, "en-US")] = other
    capsys.readouterr()
    assert catalog_cli.main(["sync", "--catalog", str(cat), "--adopt-defaults", "--min-interval", "0",
                             "--locales", "en-US"]) == 0
    assert Catalog.load(cat).defaults[(ANNUAL, "en-US")].messageIdentifier == "77777777-7777-4777-8777-777777777777"


# ---- review: what Apple's Upload Message refuses, and defaults without a text ----------------------
def test_a_switch_plan_message_with_bullet_points_and_a_default_without_a_text_are_refused(tmp_path, capsys):
    doc = catalog_doc()
    bullet = {"text": "Offline downloads", "image": {"file": "img/offline.png", "altText": "A cloud"}}
    doc["messages"][1]["content"]["en-US"]["bulletPoints"] = [bullet]  # M_SWITCH: alternateProduct
    doc["defaults"].append({"productId": ANNUAL, "locale": "de-DE", "messageIdentifier": M_TEXT})  # no de text
    path = write_catalog(tmp_path, doc)
    assert catalog_cli.main(["validate", "--catalog", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"message {M_SWITCH} en-US: a alternateProduct message must have no bullet points" in err
    assert f"default for {ANNUAL} de-DE: message {M_TEXT} has no text for de-DE" in err
    with pytest.raises(ApplyError, match="breaks Apple's limits"):
        run(path, None, make_pacer(0.0), apply=False, environment="Sandbox")


def test_a_content_key_that_is_not_a_locale_is_refused(tmp_path, capsys):
    doc = catalog_doc()
    doc["messages"][0]["content"]["english"] = dict(doc["messages"][0]["content"]["en-US"])
    path = write_catalog(tmp_path, doc)
    assert catalog_cli.main(["validate", "--catalog", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "content locale 'english' is not a locale code" in err[0]
    doc["messages"][0]["content"]["zh-Hans-CN"] = doc["messages"][0]["content"].pop("english")
    path = write_catalog(tmp_path, doc)
    assert catalog_cli.main(["validate", "--catalog", str(path)]) == 0


def test_serve_refuses_a_catalog_that_validate_refuses_one_line_per_problem(tmp_path, pki_dir):
    from serving.server import preflight
    from serving.settings import SettingsError, parse_settings
    from tests.conftest import BUNDLE_ID

    doc = catalog_doc()
    doc["messages"][0]["content"]["en-US"]["header"] = "h" * 67
    doc["messages"][0]["content"]["fr-FR"]["body"] = "b" * 145
    path = write_catalog(tmp_path, doc)
    argv = ["--catalog", str(path), "--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", str(APP_ID),
            "--bundle-id", BUNDLE_ID, "--environment", "Sandbox", "--data-dir", str(tmp_path / "data")]
    with pytest.raises(SettingsError) as caught:  # `retention serve` prints each line and exits 2
        preflight(parse_settings(argv))
    err = str(caught.value).splitlines()
    assert all(line.startswith(f"catalog {path}: ") for line in err) and len(err) == 3
    assert "header is 67 characters; Apple allows 66" in err[0] and "body is 145 characters" in err[1]


# ---- review: one line that says what to do ----------------------------------------------------------
def test_no_api_access_in_plan_and_apply_is_the_access_hint(apple, cat, capsys):
    apple.account.no_access = True
    for verb in ("plan", "apply"):
        assert catalog_cli.main([verb, "--catalog", str(cat), "--min-interval", "0"]) == 1
        err = capsys.readouterr().err
        assert "no access to the Retention Messaging API" in err and "no error code" not in err


def test_a_key_that_is_not_ec_p256_is_named_not_blamed_on_apple(apple, cat, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = tmp_path / "rsa.p8"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert catalog_cli.main(["plan", "--catalog", str(cat), "--min-interval", "0", "--key-file", str(rsa_key)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an EC P-256 key (RSA)" in err[0] and "Apple" in err[0]
    assert "no usable answer" not in err[0] and "BEGIN" not in err[0]
    assert apple.server.log == []  # nothing was sent


def test_apply_on_a_catalog_breaking_apples_limits_says_nothing_was_done(apple, tmp_path, capsys):
    doc = catalog_doc()
    doc["messages"][0]["content"]["en-US"]["header"] = "h" * 67
    path = write_catalog(tmp_path, doc)
    assert catalog_cli.main(["apply", "--catalog", str(path), "--min-interval", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "header is 67 characters" in err[0]
    assert err[-1].endswith("nothing was sent to Apple") and not any(line.rstrip().endswith(":") for line in err)
    assert not any("run it again" in line for line in err) and apple.server.log == []


def test_plan_words_answered_as_what_apply_makes_true_and_names_the_host(apple, cat, capsys):
    assert catalog_cli.main(["plan", "--catalog", str(cat), "--min-interval", "0"]) == 0
    out = capsys.readouterr().out
    assert "once apply has recorded them" in out and f"at {apple.server.base_url}" in out
    assert catalog_cli.main(["apply", "--catalog", str(cat), "--min-interval", "0"]) == 0
    capsys.readouterr()
    assert catalog_cli.main(["plan", "--catalog", str(cat), "--min-interval", "0"]) == 0
    assert "APPROVED     answered after apply" in capsys.readouterr().out


def test_an_empty_apple_api_url_is_refused_not_taken_for_apples_host(apple, cat, monkeypatch, capsys):
    monkeypatch.setenv("RETENTION_APPLE_API_URL", "")
    assert catalog_cli.main(["plan", "--catalog", str(cat), "--min-interval", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RETENTION_APPLE_API_URL is set but empty" in err[0]


def test_the_docs_example_catalog_validates_and_covers_its_own_locales(tmp_path, capsys):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "apple-setup.md").read_text()
    block = docs.split("```json\n", 1)[1].split("```", 1)[0]
    path = write_catalog(tmp_path, json.loads(block))
    assert catalog_cli.main(["validate", "--catalog", str(path)]) == 0
    catalog = Catalog.load(path)  # every product has a default in every locale the catalog has texts for
    locales = {loc for m in catalog.messages.values() for loc in m.locales}
    assert {(p, loc) for p in catalog.products for loc in locales} <= set(catalog.defaults)


def test_validate_counts_what_apple_shows_per_environment(apple, cat, tmp_path, capsys):
    from tests.conftest import AppleFixture

    (tmp_path / "prod").mkdir()
    prod = AppleFixture(tmp_path / "prod", environment="Production")
    try:
        prod.account.auto_approve = False
        apply(prod, cat)
        apply(apple, cat)
    finally:
        prod.server.stop()
    assert catalog_cli.main(["validate", "--catalog", str(cat)]) == 0
    assert "shown by Apple: Sandbox 3, Production 1" in capsys.readouterr().out  # the legacy message, in both
