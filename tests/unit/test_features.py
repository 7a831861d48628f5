"""The featurizer: one row layout for training and serving, unknown values in <other>, exact batch = single."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models.catalog import DEMO_CATALOG, Catalog
from models.features import (
    FEATURIZER_VERSION,
    OTHER,
    FeatureSchema,
    Featurizer,
    build_schema,
    split_locale,
)

MONTHLY = "com.example.premium.monthly"
ANNUAL = "com.example.premium.annual"
SWITCH_TO_ANNUAL = "38b1c1ec-260f-5ee1-8b40-a1108a235c02"
SWITCH_TO_BASIC = "013f302b-6fd5-5f57-9d19-726318a925ee"
HALF_OFF = "38eedb3e-4ee0-5ba1-8e4f-a543613b3fc6"
# 2026-11-28 (a Saturday) 21:15:00 UTC
SAT_2115_MS = 1_795_900_500_000


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(DEMO_CATALOG)


@pytest.fixture(scope="module")
def schema(catalog: Catalog) -> FeatureSchema:
    return build_schema(
        catalog.products,
        catalog.messages,
        profile_numeric=["tenure_days", "engagement"],
        profile_categorical=["country"],
        profile_vocab={"country": ["US", "FR", "JP"]},
        locales=["en-AU"],
    )


@pytest.fixture(scope="module")
def fz(schema: FeatureSchema, catalog: Catalog) -> Featurizer:
    return Featurizer(schema, catalog.products, catalog.messages)


def row(fz: Featurizer, X: np.ndarray, r: int = 0) -> dict[str, float]:
    """Return the non-zero features of row r by name."""
    return {n: float(v) for n, v in zip(fz.schema.names, X[r], strict=True) if v != 0}


def test_locale_split() -> None:
    assert split_locale("en-US") == ("en", "US")
    assert split_locale("zh-Hant-TW") == ("zh", "TW")
    assert split_locale("es-419") == ("es", "419")
    assert split_locale("fr") == ("fr", "")
    assert split_locale("pt_BR") == ("pt", "BR")


def test_schema_round_trips_and_hash_is_stable(schema: FeatureSchema) -> None:
    again = FeatureSchema.from_dict(schema.to_dict())
    assert again == schema and again.sha256() == schema.sha256()
    assert schema.featurizer_version == FEATURIZER_VERSION
    assert set(schema.dtypes) == {"float32"} and len(schema.dtypes) == len(schema.names)
    # the context block comes first, the message block after it
    assert schema.names[schema.n_context] == "kind=message"
    assert "region=AU" in schema.names  # from the training locales, not only the catalog's


def test_schema_with_edited_names_is_refused(schema: FeatureSchema) -> None:
    data = schema.to_dict()
    data["names"] = list(reversed(data["names"]))
    with pytest.raises(ValueError, match="do not match"):
        FeatureSchema.from_dict(data)


def test_schema_hash_changes_with_vocabulary(catalog: Catalog, schema: FeatureSchema) -> None:
    other = build_schema(catalog.products, catalog.messages, profile_numeric=["tenure_days", "engagement"],
                         profile_categorical=["country"], profile_vocab={"country": ["US", "FR"]}, locales=["en-AU"])
    assert other.sha256() != schema.sha256()


def test_request_matrix_features(fz: Featurizer, catalog: Catalog) -> None:
    cands = catalog.eligible(MONTHLY, "en-US")
    X = fz.matrix(product_id=MONTHLY, user_locale="en-US", environment="Production", signed_date_ms=SAT_2115_MS,
                  profile={"tenure_days": 400, "engagement": 0.25, "country": "FR"}, candidates=cands)
    assert X.dtype == np.float32 and X.shape == (len(cands), fz.n_features) and len(cands) == 8
    r = row(fz, X, [m.messageIdentifier for m in cands].index(SWITCH_TO_BASIC))
    assert r["product=" + MONTHLY] == 1 and r["language=en"] == 1 and r["region=US"] == 1
    assert r["environment=Production"] == 1
    assert r["hour_utc"] == 21 and r["weekday_utc"] == 5  # Monday is 0
    assert "profile_missing" not in r and r["profile.tenure_days"] == 400 and r["profile.country=FR"] == 1
    assert math.isclose(r["profile.engagement"], 0.25, rel_tol=1e-6)
    assert r["kind=alternateProduct"] == 1 and r["message=" + SWITCH_TO_BASIC] == 1
    assert r["alt_cheaper"] == 1 and r["alt_same_group"] == 1 and "alt_pricier" not in r
    assert math.isclose(r["value_ratio"], 59.88 / 119.88, rel_tol=1e-6)
    offer = row(fz, X, [m.messageIdentifier for m in cands].index(HALF_OFF))
    assert offer["cost"] == 15 and math.isclose(offer["value_after"], 119.88 - 15, rel_tol=1e-6)
    assert math.isclose(offer["cost_share"], 15 / 119.88, rel_tol=1e-6)
    # the context part is the same on every row
    assert (X[:, : fz.n_context] == X[0, : fz.n_context]).all()


def test_unknown_values_use_other_slots_and_missing_profile(fz: Featurizer, catalog: Catalog) -> None:
    cands = catalog.eligible(MONTHLY, "en-US")[:2]
    X = fz.matrix(product_id="com.example.unknown", user_locale="xx-ZZ", environment="Xcode",
                  signed_date_ms=0, profile=None, candidates=cands)
    r = row(fz, X)
    for block in ("product", "language", "region", "environment"):
        assert r[f"{block}={OTHER}"] == 1
    assert r["profile_missing"] == 1 and not any(k.startswith("profile.") for k in r)
    assert r["weekday_utc"] == 3  # 1970-01-01 was a Thursday
    # a profile with an unseen category, a NaN and a non-number
    X2 = fz.matrix(product_id=MONTHLY, user_locale="en-US", environment="Sandbox", signed_date_ms=0,
                   profile={"tenure_days": float("nan"), "engagement": "high", "country": "BR"}, candidates=cands)
    r2 = row(fz, X2)
    assert r2[f"profile.country={OTHER}"] == 1 and "profile.tenure_days" not in r2 and "profile.engagement" not in r2
    assert "profile_missing" not in r2


def test_candidate_missing_from_the_featurizer_catalog(fz: Featurizer, catalog: Catalog) -> None:
    import msgspec

    base = catalog.messages[HALF_OFF]
    new = msgspec.structs.replace(base, messageIdentifier="11111111-2222-4333-8444-555555555555", cost=30.0)
    X = fz.matrix(product_id=MONTHLY, user_locale="en-US", environment="Production", signed_date_ms=0,
                  profile=None, candidates=[base, new])
    assert row(fz, X, 1)[f"message={OTHER}"] == 1 and row(fz, X, 1)["cost"] == 30
    assert row(fz, X, 0)["message=" + HALF_OFF] == 1


def test_a_request_without_profile_reuses_its_matrix_read_only_and_equal_to_a_fresh_build(catalog: Catalog,
                                                                                           schema: FeatureSchema) -> None:
    fz = Featurizer(schema, catalog.products, catalog.messages)
    cands = catalog.eligible(MONTHLY, "en-US")
    args = {"product_id": MONTHLY, "user_locale": "en-US", "environment": "Production", "candidates": cands}
    a = fz.matrix(signed_date_ms=SAT_2115_MS, profile=None, **args)
    b = fz.matrix(signed_date_ms=SAT_2115_MS + 60_000, profile=None, **args)  # same hour: the same matrix
    assert b is a and not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    later = fz.matrix(signed_date_ms=SAT_2115_MS + 3_600_000, profile=None, **args)
    assert row(fz, later)["hour_utc"] == 22 and row(fz, a)["hour_utc"] == 21
    fresh = Featurizer(schema, catalog.products, catalog.messages)._build(
        MONTHLY, "en-US", "Production", 21, 5, None, cands, known=False)
    assert fresh is not None and np.array_equal(a, fresh)
    # a profile makes the matrix the subscriber's own: built each time, writable
    p1 = fz.matrix(signed_date_ms=SAT_2115_MS, profile={"tenure_days": 5, "country": "US"}, **args)
    p2 = fz.matrix(signed_date_ms=SAT_2115_MS, profile={"tenure_days": 6, "country": "US"}, **args)
    assert p1.flags.writeable and row(fz, p1)["profile.tenure_days"] == 5 and row(fz, p2)["profile.tenure_days"] == 6


def test_a_candidate_unknown_to_the_featurizer_is_never_served_from_the_cache(fz: Featurizer, catalog: Catalog) -> None:
    import msgspec

    base = catalog.messages[HALF_OFF]
    new_id = "11111111-2222-4333-8444-555555555556"
    for cost in (30.0, 45.0):  # the same id with other fields (a catalog reload) gets its own row each time
        m = msgspec.structs.replace(base, messageIdentifier=new_id, cost=cost)
        X = fz.matrix(product_id=MONTHLY, user_locale="en-US", environment="Production", signed_date_ms=0,
                      profile=None, candidates=[base, m])
        assert row(fz, X, 1)["cost"] == cost


def test_batch_rows_equal_request_rows(fz: Featurizer, catalog: Catalog) -> None:
    requests = [
        (MONTHLY, "en-US", "Production", SAT_2115_MS, {"tenure_days": 12, "engagement": 0.9, "country": "US"}),
        (ANNUAL, "fr-CA", "Sandbox", SAT_2115_MS + 7 * 3_600_000, None),
        (MONTHLY, "de-AT", "Xcode", 1_767_225_600_123, {"tenure_days": None, "engagement": 0.5, "country": "BR"}),
        ("com.example.unknown", "xx", "Production", 5, {"tenure_days": 3.0, "engagement": float("nan"), "country": None}),
        # beyond float32's range: read as 0 (missing), never as an infinite feature
        (MONTHLY, "en-US", "Production", 6, {"tenure_days": 1e308, "engagement": -1e39, "country": "US"}),
    ]
    singles, rows = [], []
    for i, (pid, loc, env, ms, prof) in enumerate(requests):
        cands = catalog.eligible(pid, loc) or catalog.eligible(MONTHLY, "en-US")
        singles.append(fz.matrix(product_id=pid, user_locale=loc, environment=env, signed_date_ms=ms,
                                 profile=prof, candidates=cands))
        for m in cands:
            rows.append({"product_id": pid, "user_locale": loc, "environment": env, "signed_date": ms,
                         "message_id": m.messageIdentifier, "has": prof is not None,
                         **{k: (prof or {}).get(k) for k in ("tenure_days", "engagement", "country")}, "i": i})
    df = pd.DataFrame(rows)
    df["tenure_days"] = pd.to_numeric(df["tenure_days"])
    for columns in (df, {k: df[k].to_numpy() for k in df.columns}):  # pandas Series or plain arrays
        Xb = fz.matrix_batch(
            product_id=columns["product_id"], user_locale=columns["user_locale"],
            environment=columns["environment"], signed_date_ms=columns["signed_date"],
            message_id=columns["message_id"],
            profile={k: columns[k] for k in ("tenure_days", "engagement", "country")},
            has_profile=columns["has"],
        )
        assert Xb.dtype == np.float32 and np.isfinite(Xb).all()
        np.testing.assert_array_equal(Xb, np.concatenate(singles))


def test_featurizer_refuses_a_schema_from_other_code(schema: FeatureSchema, catalog: Catalog) -> None:
    data = schema.to_dict()
    data["featurizer_version"] = "0"
    old = FeatureSchema.from_dict(data)
    with pytest.raises(ValueError, match="featurizer version 0"):
        Featurizer(old, catalog.products, catalog.messages)


def test_a_schema_without_profile_columns_ignores_profiles(catalog: Catalog) -> None:
    bare = Featurizer(build_schema(catalog.products, catalog.messages), catalog.products, catalog.messages)
    cands = catalog.eligible(MONTHLY, "en-US")
    kw = dict(product_id=MONTHLY, user_locale="en-US", environment="Production", signed_date_ms=0, candidates=cands)
    with_profile = bare.matrix(profile={"tenure_days": 3}, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(with_profile, bare.matrix(profile=None, **kw))  # type: ignore[arg-type]
    assert row(bare, with_profile)["profile_missing"] == 1  # as in training, where it is constant
