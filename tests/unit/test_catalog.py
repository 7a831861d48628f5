"""The catalog: validation errors a developer would hit, eligibility and locale fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from models.catalog import DEMO_CATALOG, Catalog, CatalogError

PM = "com.example.premium.monthly"


def demo() -> dict[str, Any]:
    return json.loads(DEMO_CATALOG.read_text())


def load(d: dict[str, Any]) -> Catalog:
    return Catalog.from_bytes(json.dumps(d).encode())


def test_demo_catalog_is_valid_and_offers_eight_candidates() -> None:
    c = Catalog.load(DEMO_CATALOG)
    cands = c.eligible(PM, "en-US")
    assert len(cands) == 8
    assert {m.kind for m in cands} == {"message", "alternateProduct", "promotionalOffer"}
    assert all(m.messageState == "APPROVED" for m in cands)


def test_pending_message_and_pending_image_are_not_eligible() -> None:
    c = Catalog.load(DEMO_CATALOG)
    ids = {m.messageIdentifier for m in c.eligible(PM, "en-US")}
    pending = [m for m in c.messages.values() if m.messageState == "PENDING" or m.imageState == "PENDING"]
    assert pending and not ids & {m.messageIdentifier for m in pending}


def test_locale_falls_back_to_same_language_then_nothing() -> None:
    c = Catalog.load(DEMO_CATALOG)
    assert c.eligible(PM, "en-AU") == c.eligible(PM, "en-US")  # en-* fallback
    assert c.eligible(PM, "pt-BR") == ()
    assert c.default_for(PM, "en-AU") is c.default_for(PM, "en-GB")
    assert c.default_for(PM, "pt-BR") is None


@pytest.mark.parametrize(
    ("mutate", "phrase"),
    [
        (lambda d: d["messages"][0].update(messageIdentifier="not-a-uuid"), "not a UUID"),
        (lambda d: d["messages"][0].update(kind="banner"), "unknown kind"),
        (lambda d: d["messages"][4].update(imageIdentifier=d["messages"][1]["imageIdentifier"], imageState="APPROVED"),
         "must have no image"),
        (lambda d: d["messages"][7].update(imageIdentifier=d["messages"][1]["imageIdentifier"], imageState="APPROVED"),
         "must have no image"),
        (lambda d: d["messages"][4].update(alternateProductId="com.example.family.monthly"), "outside the subscription group"),
        (lambda d: d["defaults"][0].update(messageIdentifier=d["messages"][4]["messageIdentifier"]), "a default must be a plain message"),
        (lambda d: d["defaults"][0].update(messageIdentifier=d["messages"][9]["messageIdentifier"]), "not APPROVED"),
        (lambda d: d["messages"][7].update(offerIdentifier=None), "needs offerIdentifier"),
        (lambda d: d["messages"][0]["productIds"].append("com.unknown"), "not in the catalog's products"),
    ],
)
def test_invalid_catalog_is_refused_with_a_clear_sentence(mutate: Any, phrase: str) -> None:
    d = demo()
    mutate(d)
    with pytest.raises(CatalogError, match=phrase):
        load(d)


def test_not_json_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not valid JSON"):
        Catalog.from_bytes(b"{nope")
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(tmp_path / "absent.json")


def test_value_after_is_product_value_minus_cost() -> None:
    c = Catalog.load(DEMO_CATALOG)
    by_kind = {m.kind: m for m in c.eligible(PM, "en-US")}
    offer = by_kind["promotionalOffer"]
    assert c.value_after(offer, PM) == pytest.approx(c.products[PM].value - offer.cost)
    switch = next(m for m in c.eligible(PM, "en-US") if m.alternateProductId == "com.example.basic.monthly")
    assert c.value_after(switch, PM) == pytest.approx(c.products["com.example.basic.monthly"].value)


def test_catalog_cli_validate_and_coverage(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "retention", "catalog", "validate", "--catalog", str(DEMO_CATALOG)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    d = demo()
    d["messages"][0]["kind"] = "banner"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "retention", "catalog", "validate", "--catalog", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown kind" in r.stderr and "Traceback" not in r.stderr
    cov = subprocess.run([sys.executable, "-m", "retention", "catalog", "coverage", "--catalog", str(DEMO_CATALOG),
                          "--locales", "en-US,pt-BR"], capture_output=True, text=True)
    assert cov.returncode == 1 and f"no default: {PM} pt-BR" in cov.stdout


def test_catalog_validate_takes_the_file_as_an_argument(tmp_path: Path) -> None:
    d = demo()
    d["messages"][0]["kind"] = "banner"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    # the argument wins over RETENTION_CATALOG (which names a valid catalog here)
    env = {**os.environ, "RETENTION_CATALOG": str(DEMO_CATALOG)}
    r = subprocess.run([sys.executable, "-m", "retention", "catalog", "validate", str(bad)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "unknown kind" in r.stderr and "Traceback" not in r.stderr
    ok = subprocess.run([sys.executable, "-m", "retention", "catalog", "validate", str(DEMO_CATALOG)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and f"catalog {DEMO_CATALOG}: valid" in ok.stdout
