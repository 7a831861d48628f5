"""The one featurizer: training and serving both build every feature row here, so they cannot drift.

A row describes one (request, candidate message) pair, float32 throughout:

- context part (the same for every candidate of a request): current product, locale
  language and region, environment (one-hot, each with an ``<other>`` slot for values the
  model never saw), hour and weekday of ``signedDate`` in UTC, and the subscriber profile:
  a missing-profile indicator, the schema's numeric columns as they are (NaN and unparsable
  values become 0) and its categorical columns one-hot with an ``<other>`` slot;
- message part (depends on the candidate and the current product only, so it is
  precomputed per (product, message)): kind, message identity (one-hot), cost, cost as a
  share of the current product's value, value ratio of the product after the message to
  the current one, value after (V(product after) - cost), and for a switch-plan message
  whether the alternate product is cheaper, pricier, in the same subscription group and
  billed upfront.

Interactions (which message works for whom) are left to the trees.

:class:`FeatureSchema` is what a model's manifest records; :class:`Featurizer` is compiled
from a schema plus the catalog's products and messages (duck-typed: products have
``productId``, ``subscriptionGroup``, ``value``; messages ``messageIdentifier``, ``kind``,
``cost``, ``alternateProductId``, ``billingPlanType``, ``offerIdentifier``).

This module imports nothing of ours and only numpy: serving loads it on the request path.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Change this whenever the code below changes what a row means (layout, encoding, a formula):
# a model trained with another version is refused at load time.
FEATURIZER_VERSION = "1"

OTHER = "<other>"
KINDS: tuple[str, ...] = ("message", "alternateProduct", "promotionalOffer")
ENVIRONMENTS: tuple[str, ...] = ("Production", "Sandbox")
_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000
_MAX_CONTEXT_CACHE = 50_000
_MAX_MATRIX_CACHE = 4096  # finished matrices of requests without a profile (~2.2 kB each for 8 x 70: ~9 MB at most)

# The message block's numeric columns, in order (after the kind and message one-hots).
MESSAGE_NUMERIC: tuple[str, ...] = (
    "cost",
    "cost_share",
    "value_ratio",
    "value_after",
    "alt_cheaper",
    "alt_pricier",
    "alt_same_group",
    "billed_upfront",
)


def split_locale(locale: str) -> tuple[str, str]:
    """Return (language, region) of a locale code; region is "" when the code has none.

    ``en-US`` -> ("en", "US"); ``zh-Hant-TW`` -> ("zh", "TW"); ``es-419`` -> ("es", "419"); ``fr`` -> ("fr", "").
    """
    parts = str(locale).replace("_", "-").split("-")
    lang = parts[0]
    region = ""
    if len(parts) > 1:
        last = parts[-1]
        if (len(last) == 2 and last.isalpha()) or (len(last) == 3 and last.isdigit()):
            region = last
    return lang, region


def _values(objs: Mapping[str, Any] | Iterable[Any]) -> list[Any]:
    return list(objs.values()) if isinstance(objs, Mapping) else list(objs)


def _uniq(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        if it is not None and it != "" and it != OTHER:
            seen.setdefault(str(it), None)
    return list(seen)


@dataclass(frozen=True)
class FeatureSchema:
    """The layout of a feature row: names in order, dtypes, vocabularies and profile columns.

    ``vocabularies`` keys: ``product``, ``language``, ``region``, ``environment``, ``kind``,
    ``message`` and ``profile:<column>`` for each categorical profile column. Each
    vocabulary gets one extra ``<other>`` slot in the row.
    """

    vocabularies: dict[str, list[str]]
    profile_numeric: list[str] = field(default_factory=list)
    profile_categorical: list[str] = field(default_factory=list)
    featurizer_version: str = FEATURIZER_VERSION
    names: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    n_context: int = 0

    def __post_init__(self) -> None:
        names, n_context = _layout(self.vocabularies, self.profile_numeric, self.profile_categorical)
        if self.names and list(self.names) != names:
            raise ValueError("feature schema names do not match its vocabularies (edited or from other code)")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "dtypes", ["float32"] * len(names))
        object.__setattr__(self, "n_context", n_context)

    @property
    def n_features(self) -> int:
        """Return the number of columns of a feature row."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """Return the schema as plain JSON-able data (what the manifest stores)."""
        return {
            "featurizer_version": self.featurizer_version,
            "names": list(self.names),
            "dtypes": list(self.dtypes),
            "n_context": self.n_context,
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            "profile_numeric": list(self.profile_numeric),
            "profile_categorical": list(self.profile_categorical),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSchema:
        """Return the schema stored by :meth:`to_dict`; raises ValueError if it is inconsistent."""
        try:
            return cls(
                vocabularies={str(k): [str(x) for x in v] for k, v in data["vocabularies"].items()},
                profile_numeric=[str(c) for c in data.get("profile_numeric", [])],
                profile_categorical=[str(c) for c in data.get("profile_categorical", [])],
                featurizer_version=str(data["featurizer_version"]),
                names=[str(n) for n in data.get("names", [])],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"feature schema is incomplete: {exc}") from None

    def sha256(self) -> str:
        """Return the hex sha256 of the canonical JSON of this schema."""
        raw = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()


def _layout(
    vocab: Mapping[str, Sequence[str]], numeric: Sequence[str], categorical: Sequence[str]
) -> tuple[list[str], int]:
    for key in ("product", "language", "region", "environment", "kind", "message"):
        if key not in vocab:
            raise ValueError(f"feature schema has no {key!r} vocabulary")
    names: list[str] = []

    def onehot(prefix: str, words: Sequence[str]) -> None:
        names.extend(f"{prefix}={w}" for w in words)
        names.append(f"{prefix}={OTHER}")

    onehot("product", vocab["product"])
    onehot("language", vocab["language"])
    onehot("region", vocab["region"])
    onehot("environment", vocab["environment"])
    names += ["hour_utc", "weekday_utc", "profile_missing"]
    names += [f"profile.{c}" for c in numeric]
    for c in categorical:
        onehot(f"profile.{c}", vocab.get(f"profile:{c}", []))
    n_context = len(names)
    onehot("kind", vocab["kind"])
    onehot("message", vocab["message"])
    names += list(MESSAGE_NUMERIC)
    if len(set(names)) != len(names):
        raise ValueError("feature names collide (a profile column named like another feature?)")
    return names, n_context


def build_schema(
    products: Mapping[str, Any] | Iterable[Any],
    messages: Mapping[str, Any] | Iterable[Any],
    *,
    profile_numeric: Sequence[str] = (),
    profile_categorical: Sequence[str] = (),
    profile_vocab: Mapping[str, Sequence[str]] | None = None,
    locales: Iterable[str] = (),
    environments: Iterable[str] = ENVIRONMENTS,
) -> FeatureSchema:
    """Return the schema for a catalog and profile columns.

    Languages and regions come from the messages' ``locales`` (when they have them) and from
    `locales` (the training data's, so that a locale served through language fallback gets
    its own slot). `profile_vocab` maps a categorical profile column to its known values.
    """
    prods = _values(products)
    msgs = _values(messages)
    all_locales = [loc for m in msgs for loc in (getattr(m, "locales", None) or ())] + list(locales)
    langs = sorted(_uniq(split_locale(loc)[0] for loc in all_locales))
    regions = sorted(_uniq(split_locale(loc)[1] for loc in all_locales))
    pv = profile_vocab or {}
    vocab: dict[str, list[str]] = {
        "product": _uniq(p.productId for p in prods),
        "language": langs,
        "region": regions,
        "environment": _uniq(environments),
        "kind": list(KINDS),
        "message": _uniq(m.messageIdentifier for m in msgs),
    }
    for c in profile_categorical:
        vocab[f"profile:{c}"] = _uniq(str(v) for v in pv.get(c, ()))
    overlap = set(profile_numeric) & set(profile_categorical)
    if overlap:
        raise ValueError(f"profile column(s) {sorted(overlap)} declared both numeric and categorical")
    return FeatureSchema(
        vocabularies=vocab,
        profile_numeric=[str(c) for c in profile_numeric],
        profile_categorical=[str(c) for c in profile_categorical],
    )


_FLOAT32_MAX = float(np.finfo(np.float32).max)  # features are float32: a larger value would become infinite


def _to_float(v: object) -> float:
    """Return v as a finite float, or 0.0 when it is missing, non-finite, beyond float32's range or not a number."""
    if v is None:
        return 0.0
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return f if math.isfinite(f) and abs(f) <= _FLOAT32_MAX else 0.0


def _is_missing(v: object) -> bool:
    if v is None:
        return True
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def category_key(v: object) -> str:
    """Return the vocabulary key of a categorical value: integral floats read as ints (3.0 -> "3")."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


class Featurizer:
    """Builds feature rows for a schema and a catalog; the per-message part is precomputed.

    ``matrix`` serves one request (the request path); ``matrix_batch`` builds many rows at
    once (training, scoring, evaluation) from the same per-key rows, so both agree exactly.
    """

    def __init__(self, schema: FeatureSchema, products: Mapping[str, Any], messages: Mapping[str, Any]) -> None:
        if schema.featurizer_version != FEATURIZER_VERSION:
            raise ValueError(
                f"feature schema is for featurizer version {schema.featurizer_version}, this code is {FEATURIZER_VERSION}"
            )
        self.schema = schema
        self.products = {p.productId: p for p in _values(products)}
        self.messages = {m.messageIdentifier: m for m in _values(messages)}
        self.n_features = schema.n_features
        self.n_context = schema.n_context
        col = {n: i for i, n in enumerate(schema.names)}
        self._col = col
        v = schema.vocabularies

        def index(prefix: str, words: Sequence[str]) -> tuple[dict[str, int], int]:
            return {w: col[f"{prefix}={w}"] for w in words}, col[f"{prefix}={OTHER}"]

        self._product_ix = index("product", v["product"])
        self._language_ix = index("language", v["language"])
        self._region_ix = index("region", v["region"])
        self._environment_ix = index("environment", v["environment"])
        self._kind_ix = index("kind", v["kind"])
        self._message_ix = index("message", v["message"])
        self._hour = col["hour_utc"]
        self._weekday = col["weekday_utc"]
        self._missing = col["profile_missing"]
        self._num_cols = [(c, col[f"profile.{c}"]) for c in schema.profile_numeric]
        self._cat_cols = [(c, index(f"profile.{c}", v.get(f"profile:{c}", []))) for c in schema.profile_categorical]
        # a model trained without profile columns ignores profiles: its profile_missing column is
        # constant 1 in training, and serving with a profile store must not change that
        self._uses_profile = bool(self._num_cols or self._cat_cols)
        self._msg_numeric = [col[n] - self.n_context for n in MESSAGE_NUMERIC]
        self._context_cache: dict[tuple[str, str, str], np.ndarray] = {}
        self._message_tables: dict[str, tuple[dict[str, int], np.ndarray]] = {}
        self._matrix_cache: dict[tuple[object, ...], np.ndarray] = {}

    # ---- the two parts of a row ---------------------------------------------------------
    def context_base(self, product_id: str, user_locale: str, environment: str) -> np.ndarray:
        """Return the context part for a missing profile at hour 0 of a Monday (cached per key)."""
        key = (product_id, user_locale, environment)
        row = self._context_cache.get(key)
        if row is not None:
            return row
        row = np.zeros(self.n_context, dtype=np.float32)
        lang, region = split_locale(user_locale)
        for value, (ix, other) in (
            (product_id, self._product_ix),
            (lang, self._language_ix),
            (region, self._region_ix),
            (environment, self._environment_ix),
        ):
            row[ix.get(value, other)] = 1.0
        row[self._missing] = 1.0
        row.setflags(write=False)
        if len(self._context_cache) < _MAX_CONTEXT_CACHE:
            self._context_cache[key] = row
        return row

    def message_row(self, product_id: str, message: Any) -> np.ndarray:
        """Return the message part of a row for `message` shown to a subscriber on `product_id`."""
        out = np.zeros(self.n_features - self.n_context, dtype=np.float32)
        c0 = self.n_context
        kix, kother = self._kind_ix
        out[kix.get(str(message.kind), kother) - c0] = 1.0
        mix, mother = self._message_ix
        out[mix.get(message.messageIdentifier, mother) - c0] = 1.0
        cur = self.products.get(product_id)
        cost = _to_float(getattr(message, "cost", 0.0))
        v_cur = float(cur.value) if cur is not None else 0.0
        alt_id = getattr(message, "alternateProductId", None)
        alt = self.products.get(alt_id) if (message.kind == "alternateProduct" and alt_id) else None
        v_after = float(alt.value) if alt is not None else v_cur
        cheaper = pricier = same_group = 0.0
        if alt is not None and cur is not None:
            cheaper = float(alt.value < cur.value)
            pricier = float(alt.value > cur.value)
            same_group = float(alt.subscriptionGroup == cur.subscriptionGroup)
        numeric = (
            cost,
            cost / v_cur if v_cur > 0 else 0.0,
            v_after / v_cur if v_cur > 0 else 1.0,
            v_after - cost,
            cheaper,
            pricier,
            same_group,
            float(getattr(message, "billingPlanType", None) == "BILLED_UPFRONT"),
        )
        for j, x in zip(self._msg_numeric, numeric, strict=True):
            out[j] = x
        return out

    def _message_table(self, product_id: str) -> tuple[dict[str, int], np.ndarray]:
        hit = self._message_tables.get(product_id)
        if hit is None:
            ids = list(self.messages)
            table = (
                np.stack([self.message_row(product_id, self.messages[i]) for i in ids])
                if ids
                else np.zeros((0, self.n_features - self.n_context), dtype=np.float32)
            )
            hit = ({i: k for k, i in enumerate(ids)}, table)
            if len(self._message_tables) < _MAX_CONTEXT_CACHE:
                self._message_tables[product_id] = hit
        return hit

    def _fill_profile(self, ctx: np.ndarray, profile: Mapping[str, object]) -> None:
        ctx[self._missing] = 0.0
        for name, j in self._num_cols:
            ctx[j] = _to_float(profile.get(name))
        for name, (ix, other) in self._cat_cols:
            v = profile.get(name)
            if not _is_missing(v):
                ctx[ix.get(category_key(v), other)] = 1.0

    # ---- the request path -------------------------------------------------------------
    def matrix(
        self,
        *,
        product_id: str,
        user_locale: str,
        environment: str,
        signed_date_ms: int,
        profile: Mapping[str, object] | None,
        candidates: Sequence[Any],
    ) -> np.ndarray:
        """Return the float32 (K, n_features) matrix for one request and its K candidates.

        Without a profile (or for a model that uses none) the matrix depends only on the product, locale,
        environment, hour, weekday and candidates: it is built once and returned again, read-only, for
        every such request (at most :data:`_MAX_MATRIX_CACHE` kept; emptied when full).
        """
        ms = int(signed_date_ms)
        hour = (ms // _HOUR_MS) % 24
        weekday = (ms // _DAY_MS + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
        if profile is None or not self._uses_profile:
            key = (product_id, user_locale, environment, hour, weekday, *[m.messageIdentifier for m in candidates])
            out = self._matrix_cache.get(key)
            if out is not None:
                return out
            out = self._build(product_id, user_locale, environment, hour, weekday, None, candidates, known=True)
            if out is not None:
                out.setflags(write=False)
                if len(self._matrix_cache) >= _MAX_MATRIX_CACHE:
                    self._matrix_cache.clear()
                self._matrix_cache[key] = out
                return out
            # a candidate this featurizer's catalog does not know: its row depends on its fields, not only its id
        out = self._build(product_id, user_locale, environment, hour, weekday, profile, candidates, known=False)
        assert out is not None
        return out

    def _build(
        self,
        product_id: str,
        user_locale: str,
        environment: str,
        hour: int,
        weekday: int,
        profile: Mapping[str, object] | None,
        candidates: Sequence[Any],
        *,
        known: bool,
    ) -> np.ndarray | None:
        """Build one request's matrix; with `known`, return None when a candidate is not in the catalog's table."""
        ctx = self.context_base(product_id, user_locale, environment).copy()
        ctx[self._hour] = hour
        ctx[self._weekday] = weekday
        if profile is not None and self._uses_profile:
            self._fill_profile(ctx, profile)
        k = len(candidates)
        out = np.empty((k, self.n_features), dtype=np.float32)
        out[:, : self.n_context] = ctx
        ids, table = self._message_table(product_id)
        try:
            out[:, self.n_context :] = table[[ids[m.messageIdentifier] for m in candidates]]
        except KeyError:  # a candidate the featurizer's catalog does not know: build its row
            if known:
                return None
            for r, m in enumerate(candidates):
                i = ids.get(m.messageIdentifier)
                out[r, self.n_context :] = table[i] if i is not None else self.message_row(product_id, m)
        return out

    # ---- many rows at once --------------------------------------------------------------
    def matrix_batch(
        self,
        *,
        product_id: Sequence[str],
        user_locale: Sequence[str],
        environment: Sequence[str],
        signed_date_ms: Sequence[int],
        message_id: Sequence[str],
        profile: Mapping[str, Sequence[object]] | None = None,
        has_profile: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """Return the float32 (N, n_features) matrix for N (request, candidate) rows.

        Every argument is a column of N values (numpy arrays or pandas Series). `profile`
        maps the schema's profile columns to N values each (already joined to the rows);
        `has_profile` says which rows have a profile at all (default: none do). Rows equal
        what :meth:`matrix` builds for the same request, profile and candidate.
        """
        n = len(message_id)
        out = np.empty((n, self.n_features), dtype=np.float32)
        if n == 0:
            return out
        # context: one base row per distinct (product, locale, environment)
        pc, pu = _factorize(product_id, na_as="")
        lc, lu = _factorize(user_locale, na_as="")
        ec, eu = _factorize(environment, na_as="")
        key = (pc.astype(np.int64) * len(lu) + lc) * len(eu) + ec
        ukey, inv = np.unique(key, return_inverse=True)
        bases = np.empty((len(ukey), self.n_context), dtype=np.float32)
        for r, kk in enumerate(ukey.tolist()):
            e = kk % len(eu)
            rest = kk // len(eu)
            bases[r] = self.context_base(str(pu[rest // len(lu)]), str(lu[rest % len(lu)]), str(eu[e]))
        ctx = out[:, : self.n_context]
        np.take(bases, inv, axis=0, out=ctx)
        ms = np.asarray(signed_date_ms, dtype=np.int64)
        ctx[:, self._hour] = (ms // _HOUR_MS) % 24
        ctx[:, self._weekday] = (ms // _DAY_MS + 3) % 7
        if profile is not None and has_profile is not None and self._uses_profile:
            hp = np.asarray(has_profile, dtype=bool)
            ctx[hp, self._missing] = 0.0
            for name, j in self._num_cols:
                col = _numeric_column(profile[name]) if name in profile else np.zeros(n)
                ctx[:, j] = np.where(hp, col, 0.0)
            for name, (ix, other) in self._cat_cols:
                if name not in profile:
                    continue
                codes, uniques = _factorize(profile[name])
                target = np.full(len(uniques) + 1, -1, dtype=np.int64)  # last slot: missing -> no column
                for u, val in enumerate(uniques):
                    if not _is_missing(val):
                        target[u] = ix.get(category_key(val), other)
                cols = target[np.where(codes < 0, len(uniques), codes)]
                rows = np.nonzero(hp & (cols >= 0))[0]
                ctx[rows, cols[rows]] = 1.0
        # message part: one row per distinct (product, message)
        mc, mu = _factorize(message_id, na_as="")
        key2 = pc.astype(np.int64) * len(mu) + mc
        ukey2, inv2 = np.unique(key2, return_inverse=True)
        mrows = np.empty((len(ukey2), self.n_features - self.n_context), dtype=np.float32)
        for r, kk in enumerate(ukey2.tolist()):
            pid = str(pu[kk // len(mu)])
            mid = str(mu[kk % len(mu)])
            msg = self.messages.get(mid)
            if msg is None:
                raise KeyError(f"message {mid} is not in the catalog")
            ids, table = self._message_table(pid)
            mrows[r] = table[ids[mid]]
        np.take(mrows, inv2, axis=0, out=out[:, self.n_context :])
        return out


def _factorize(values: Sequence[Any], na_as: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (codes, uniques) of a column, missing values coded -1 (or as the value `na_as`).

    pandas objects use their own fast factorize (duck-typed: pandas is not imported here).
    """
    fz = getattr(values, "factorize", None)
    if fz is not None:
        codes, uniq = fz(use_na_sentinel=True)
        codes = np.asarray(codes, dtype=np.int64)
        uniques = np.asarray(uniq, dtype=object)
    else:
        arr = np.asarray(values, dtype=object)
        seen: dict[Any, int] = {}
        codes = np.empty(len(arr), dtype=np.int64)
        for i, v in enumerate(arr.tolist()):
            codes[i] = -1 if _is_missing(v) else seen.setdefault(v, len(seen))
        uniques = np.asarray(list(seen), dtype=object)
    if na_as is not None and (codes < 0).any():
        codes = np.where(codes < 0, len(uniques), codes)
        uniques = np.append(uniques, np.asarray([na_as], dtype=object))
    return codes, uniques


def _numeric_column(values: Sequence[object]) -> np.ndarray:
    """Return a float64 column with missing, non-finite, unparsable and beyond-float32 values as 0 (as _to_float)."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        arr = np.array([_to_float(v) for v in values], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(arr) & (np.abs(arr) <= _FLOAT32_MAX), arr, 0.0)
