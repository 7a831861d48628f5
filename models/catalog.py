"""The catalog of approved retention messages: products, messages, values, costs and eligibility.

The contract between training and serving, like the featurizer (models/features.py): serving
answers from it, training and the off-policy evaluator value each message with it. The JSON mirrors
Apple's names (docs/data-formats.md, "The catalog"), so a sync from Apple's management API maps one to one.
:data:`DEMO_CATALOG` is the catalog the demo, the simulator and a Sandbox server without
``RETENTION_CATALOG`` use; it ships inside the package (``models/data/demo_catalog.json``).

Locale fallback, in order:
1. messages whose ``locales`` contain the request's ``userLocale`` exactly (``en-AU``);
2. if there is none, messages for the same language (``en``, ``en-US``, ``en-GB``... for ``en-AU``);
3. if there is still none, no candidate: the policy answers the product's default.
Defaults follow the same order: the exact ``(productId, locale)`` default, else a
default for the same language of that product (the lexically first locale, so the
choice is deterministic).

Message content. A message may carry ``content``: its text per locale, in the fields of
Apple's Upload Message (``header``, ``body``, optional ``image`` with ``altText``,
``bulletPoints``, ``headerPosition``), images named by PNG file. Apple's messages have no
locale, so ``retention catalog apply`` uploads each locale's text under its own Apple
identifier (a UUID version 5 of the text, serving/catalog_content.py, which only the
server's catalog commands use) and records what it uploaded, with Apple's states, in the
catalog's ``uploaded`` section, one record per Apple environment (``{"Sandbox": {...}, "Production": {...}}``: Sandbox and Production review texts
separately). A catalog loaded for an environment (the server's ``RETENTION_ENVIRONMENT``) answers
only texts approved in that environment's record. A record in the older single form (``messages``,
``images``, ``defaults`` directly under ``uploaded``) is read as it was, for whichever environment
loads it, until the next ``apply`` rewrites it per environment. The model and the
decision log still see one message (its ``messageIdentifier``, whatever the locale); only
the answer names the Apple identifier of the request's locale: the newest one uploaded for
that message and locale whose message and images Apple has APPROVED (so an old text keeps
serving until its replacement is approved, and a rejected text is never answered). A message
without ``content`` is served under its own ``messageIdentifier`` with its own states, as before.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec

Kind = Literal["message", "alternateProduct", "promotionalOffer"]
KINDS: tuple[str, ...] = ("message", "alternateProduct", "promotionalOffer")
STATES: tuple[str, ...] = ("PENDING", "APPROVED", "REJECTED")
#: a locale code as Apple's userLocale gives it: language, optional script, optional region (BCP 47's common part)
LOCALE_TAG = re.compile(r"[a-z]{2,3}(?:[-_][A-Z][a-z]{3})?(?:[-_](?:[A-Z]{2}|[0-9]{3}))?")
#: the demo catalog, package data of ``models`` (a Production server refuses to start on it)
DEMO_CATALOG = Path(__file__).resolve().parent / "data" / "demo_catalog.json"


class CatalogError(ValueError):
    """The catalog file is unreadable or breaks a rule; the message says which entry and why."""


class Product(msgspec.Struct, frozen=True):
    """A subscription product and what a subscriber on it is worth per year."""

    productId: str
    subscriptionGroup: str
    value: float


class ImageRef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An image of a message's text: a PNG file (relative to the catalog's folder) and its alt text."""

    file: str
    altText: str


class BulletPointText(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One of Apple's bullet points: text and a 1024 x 1024 PNG with its alt text."""

    text: str
    image: ImageRef


class MessageText(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One locale's text, in the fields of Apple's UploadMessageRequestBody.

    https://developer.apple.com/documentation/retentionmessaging/uploadmessagerequestbody
    """

    header: str
    body: str
    image: ImageRef | None = None
    bulletPoints: list[BulletPointText] = []
    headerPosition: str | None = None  # ABOVE_BODY or ABOVE_IMAGE


class UploadedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One locale's text as uploaded to Apple: Apple's identifier, the logical message, Apple's state."""

    messageIdentifier: str
    message: str
    locale: str
    messageState: str
    imageIdentifiers: list[str] = []
    #: the UploadMessageRequestBody sent (Apple never gives a message's text back)
    upload: dict[str, Any] = {}


class UploadedImage(msgspec.Struct, frozen=True, kw_only=True):
    """One PNG as uploaded to Apple."""

    imageIdentifier: str
    file: str
    sha256: str
    imageSize: str
    imageState: str


class Uploaded(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The local record of what ``retention catalog apply`` uploaded to one environment, in upload order, with Apple's states."""

    messages: list[UploadedMessage] = []
    images: list[UploadedImage] = []
    #: default messages apply set at Apple, with Apple's identifiers
    defaults: list[DefaultMessage] = []


class CatalogMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message as uploaded to Apple, with what it costs us when the subscriber stays.

    With ``content`` the message is logical: ``locales`` are the content's locales and the
    states come from the catalog's ``uploaded`` record, per locale.
    """

    messageIdentifier: str
    #: Apple's state; required without content (with content the record holds a state per locale)
    messageState: str | None = None
    kind: str
    locales: list[str] = []
    productIds: list[str]
    imageIdentifier: str | None = None
    imageState: str | None = None
    alternateProductId: str | None = None
    billingPlanType: str | None = None
    offerIdentifier: str | None = None
    cost: float = 0.0
    content: dict[str, MessageText] | None = None


class DefaultMessage(msgspec.Struct, frozen=True):
    """The default message Apple shows for a product and locale when our answer fails."""

    productId: str
    locale: str
    messageIdentifier: str


class CatalogFile(msgspec.Struct, frozen=True):
    """The catalog JSON file as written on disk."""

    products: list[Product]
    messages: list[CatalogMessage]
    defaults: list[DefaultMessage] = []
    #: per environment, ``{"Sandbox": Uploaded, "Production": Uploaded}``; or the older single form (one Uploaded)
    uploaded: dict[str, Any] | None = None


ENVIRONMENTS: tuple[str, ...] = ("Sandbox", "Production")
#: the key of a record in the older single form, whose environment is not known
LEGACY_RECORD = ""


def upload_records(uploaded: dict[str, Any] | None, source: str = "catalog") -> dict[str, Uploaded]:
    """Return the ``uploaded`` section as environment -> record (``LEGACY_RECORD`` for the older single form).

    Raises CatalogError naming what is wrong with the section.
    """
    if not uploaded:
        return {}
    if set(uploaded) <= set(ENVIRONMENTS):
        items = [(env, uploaded[env]) for env in ENVIRONMENTS if env in uploaded]
    else:
        items = [(LEGACY_RECORD, uploaded)]
    out: dict[str, Uploaded] = {}
    for env, raw in items:
        try:
            out[env] = msgspec.convert(raw, Uploaded)
        except msgspec.ValidationError as exc:
            where = f"uploaded.{env}" if env else "uploaded"
            raise CatalogError(f"{source}: {where}: {exc} (expected {{\"Sandbox\": {{...}}, \"Production\": {{...}}}})") from None
    return out


def language(locale: str) -> str:
    """Return the language part of a locale code (``en`` for ``en-AU``, ``zh`` for ``zh-Hant-TW``)."""
    return locale.split("-", 1)[0].split("_", 1)[0]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


class Catalog:
    """A validated catalog with precomputed eligibility lookups.

    Build one with :meth:`load` (a path) or :meth:`from_bytes`; both raise
    :class:`CatalogError` with a sentence naming the bad entry.
    """

    def __init__(self, data: CatalogFile, sha256: str, environment: str | None = None) -> None:
        self.data = data
        self.sha256 = sha256
        #: the Apple environment whose upload record is answered (None: the only record there is)
        self.environment = environment
        #: environment -> what ``catalog apply`` uploaded there (``LEGACY_RECORD``: the older single form)
        self.records: dict[str, Uploaded] = upload_records(data.uploaded)
        self.products: dict[str, Product] = {}
        for p in data.products:
            if p.productId in self.products:
                raise CatalogError(f"product {p.productId!r} is listed twice")
            if not p.value >= 0:
                raise CatalogError(f"product {p.productId!r} has a negative or missing value")
            self.products[p.productId] = p
        self.messages: dict[str, CatalogMessage] = {}
        if any(m.content is not None for m in data.messages):
            for m in data.messages:
                if m.content is not None and m.locales and sorted(m.locales) != sorted(m.content):
                    raise CatalogError(f"message {m.messageIdentifier}: locales must be left out or equal the "
                                       f"content's locales ({', '.join(sorted(m.content))})")
            data = msgspec.structs.replace(data, messages=[
                msgspec.structs.replace(m, locales=sorted(m.content)) if m.content is not None else m
                for m in data.messages])
            self.data = data
        for m in data.messages:
            self._validate_message(m)
            self.messages[m.messageIdentifier] = m
        #: (message, content locale) -> the Apple identifier answered there (see module doc)
        self.served: dict[tuple[str, str], str] = self._served_identifiers(data, self.record())
        self.defaults: dict[tuple[str, str], CatalogMessage] = {}
        for d in data.defaults:
            self._validate_default(d)
            self.defaults[(d.productId, d.locale)] = self.messages[d.messageIdentifier]
        # (productId, userLocale) -> candidates; filled lazily, bounded by the catalog's size
        self._eligible_cache: dict[tuple[str, str], tuple[CatalogMessage, ...]] = {}
        self._default_cache: dict[tuple[str, str], CatalogMessage | None] = {}
        # per-catalog memo for derived lookups of the request path (bounded by the catalog's combinations)
        self.memo: dict[object, object] = {}

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "catalog", environment: str | None = None) -> Catalog:
        """Return the validated catalog parsed from JSON bytes, answering `environment`'s approved texts."""
        try:
            data = msgspec.json.decode(raw, type=CatalogFile)
        except msgspec.ValidationError as exc:
            raise CatalogError(f"{source}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise CatalogError(f"{source} is not valid JSON: {exc}") from None
        return cls(data, hashlib.sha256(raw).hexdigest(), environment)

    @classmethod
    def load(cls, path: str | Path, environment: str | None = None) -> Catalog:
        """Return the validated catalog read from a JSON file, answering `environment`'s approved texts.

        `environment` is ``Sandbox`` or ``Production`` (the server's); None takes the record there
        is when the file holds one environment's (or the older single form), else none. Raises
        CatalogError, naming the entry and the rule it breaks, for an unreadable file or an invalid catalog.
        Field names are Apple's (https://developer.apple.com/documentation/retentionmessaging).
        """
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path}: {exc.strerror or exc}") from None
        return cls.from_bytes(raw, source=str(path), environment=environment)

    def to_json(self) -> bytes:
        """Return the catalog as JSON bytes (the file format)."""
        return msgspec.json.format(msgspec.json.encode(self.data), indent=2)

    # ---- validation ---------------------------------------------------------------
    def _validate_message(self, m: CatalogMessage) -> None:
        mid = m.messageIdentifier
        if not _is_uuid(mid):
            raise CatalogError(f"message {mid!r}: messageIdentifier is not a UUID")
        if mid != mid.lower():
            raise CatalogError(f"message {mid!r}: Apple writes UUIDs lowercase")
        if mid in self.messages:
            raise CatalogError(f"message {mid!r} is listed twice")
        if m.kind not in KINDS:
            raise CatalogError(f"message {mid}: unknown kind {m.kind!r} (expected one of {', '.join(KINDS)})")
        if m.content is None and m.messageState is None:
            raise CatalogError(f"message {mid}: messageState is missing (PENDING, APPROVED or REJECTED, as Apple reports it)")
        if m.messageState is not None and m.messageState not in STATES:
            raise CatalogError(f"message {mid}: unknown messageState {m.messageState!r}")
        if m.imageState is not None and m.imageState not in STATES:
            raise CatalogError(f"message {mid}: unknown imageState {m.imageState!r}")
        if m.imageIdentifier is not None and not _is_uuid(m.imageIdentifier):
            raise CatalogError(f"message {mid}: imageIdentifier is not a UUID")
        if m.kind != "message" and m.imageIdentifier is not None:
            raise CatalogError(f"message {mid}: a {m.kind} message must have no image (Apple refuses it)")
        if m.content is not None:
            self._validate_content(m)
        if not m.locales:
            raise CatalogError(f"message {mid}: no locales")
        if not m.productIds:
            raise CatalogError(f"message {mid}: no productIds")
        if not m.cost >= 0:
            raise CatalogError(f"message {mid}: cost must be a number >= 0")
        for pid in m.productIds:
            if pid not in self.products:
                raise CatalogError(f"message {mid}: product {pid!r} is not in the catalog's products")
        if m.kind == "alternateProduct":
            alt = m.alternateProductId
            if alt is None:
                raise CatalogError(f"message {mid}: an alternateProduct message needs alternateProductId")
            if alt not in self.products:
                raise CatalogError(f"message {mid}: alternate product {alt!r} is not in the catalog's products")
            for pid in m.productIds:
                if self.products[pid].subscriptionGroup != self.products[alt].subscriptionGroup:
                    raise CatalogError(
                        f"message {mid}: alternate product {alt!r} is outside the subscription group "
                        f"of {pid!r} ({self.products[pid].subscriptionGroup!r})"
                    )
                if pid == alt:
                    raise CatalogError(f"message {mid}: alternate product {alt!r} is the current product")
            if m.billingPlanType is not None and m.billingPlanType not in ("BILLED_UPFRONT", "MONTHLY"):
                raise CatalogError(f"message {mid}: unknown billingPlanType {m.billingPlanType!r}")
        elif m.alternateProductId is not None or m.billingPlanType is not None:
            raise CatalogError(f"message {mid}: only an alternateProduct message has alternateProductId")
        if m.kind == "promotionalOffer":
            if not m.offerIdentifier:
                raise CatalogError(f"message {mid}: a promotionalOffer message needs offerIdentifier")
        elif m.offerIdentifier is not None:
            raise CatalogError(f"message {mid}: only a promotionalOffer message has offerIdentifier")

    @staticmethod
    def _validate_content(m: CatalogMessage) -> None:
        mid = m.messageIdentifier
        if m.imageIdentifier is not None or m.imageState is not None:
            raise CatalogError(f"message {mid}: a message with content names its images in content, not imageIdentifier")
        for loc in m.content or {}:
            if not LOCALE_TAG.fullmatch(loc):
                raise CatalogError(f"message {mid}: content locale {loc!r} is not a locale code (a language, "
                                   "optionally a script and a region: en, en-US, zh-Hans-CN)")

    def record(self, environment: str | None = None) -> Uploaded | None:
        """Return the upload record of `environment` (default: the catalog's), or None.

        A record in the older single form stands for any environment; with no environment
        given, the one record the file holds.
        """
        env = environment or self.environment
        if env is not None:
            found = self.records.get(env)
            return found if found is not None else self.records.get(LEGACY_RECORD)
        return next(iter(self.records.values())) if len(self.records) == 1 else None

    @staticmethod
    def _served_identifiers(data: CatalogFile, uploaded: Uploaded | None) -> dict[tuple[str, str], str]:
        if uploaded is None:
            return {}
        content_locales = {m.messageIdentifier: set(m.content) for m in data.messages if m.content is not None}
        image_ok = {i.imageIdentifier for i in uploaded.images if i.imageState == "APPROVED"}
        served: dict[tuple[str, str], str] = {}
        for u in uploaded.messages:  # upload order: a later approved text replaces an earlier one
            if u.locale not in content_locales.get(u.message, ()):
                continue
            if u.messageState == "APPROVED" and all(i in image_ok for i in u.imageIdentifiers):
                served[(u.message, u.locale)] = u.messageIdentifier
        return served

    def _validate_default(self, d: DefaultMessage) -> None:
        m = self.messages.get(d.messageIdentifier)
        where = f"default for {d.productId} {d.locale}"
        if d.productId not in self.products:
            raise CatalogError(f"{where}: product is not in the catalog's products")
        if m is None:
            raise CatalogError(f"{where}: message {d.messageIdentifier} is not in the catalog")
        if m.kind != "message":
            raise CatalogError(f"{where}: message {m.messageIdentifier} is a {m.kind}, a default must be a plain message")
        if m.content is None and not self.is_shown(m):
            # a message with content becomes Apple's default once its text is approved (catalog apply)
            raise CatalogError(f"{where}: message {m.messageIdentifier} (or its image) is not APPROVED")
        if (d.productId, d.locale) in self.defaults:
            raise CatalogError(f"{where}: listed twice")

    # ---- queries ------------------------------------------------------------------
    @staticmethod
    def is_shown(m: CatalogMessage) -> bool:
        """Return True when Apple would show `m`: the message and any image are APPROVED."""
        return m.messageState == "APPROVED" and (m.imageIdentifier is None or m.imageState == "APPROVED")

    @staticmethod
    def content_locale(m: CatalogMessage, user_locale: str) -> str | None:
        """Return the locale of `m`'s content that serves `user_locale` (exact, else same language), or None."""
        if m.content is None:
            return None
        if user_locale in m.content:
            return user_locale
        lang = language(user_locale)
        same = sorted(loc for loc in m.content if language(loc) == lang)
        return same[0] if same else None

    def apple_id(self, m: CatalogMessage, user_locale: str) -> str | None:
        """Return the Apple messageIdentifier to answer for `m` in `user_locale`, or None when Apple would not show it.

        A message without content answers its own identifier when it is shown; one with
        content answers the newest approved upload of the locale's text (module doc).
        """
        if m.content is None:
            return m.messageIdentifier if self.is_shown(m) else None
        loc = self.content_locale(m, user_locale)
        return None if loc is None else self.served.get((m.messageIdentifier, loc))

    def _shown_in(self, m: CatalogMessage, user_locale: str) -> bool:
        return self.is_shown(m) if m.content is None else self.apple_id(m, user_locale) is not None

    def eligible(self, product_id: str, user_locale: str) -> tuple[CatalogMessage, ...]:
        """Return the approved candidates for a product and locale, in catalog order (see module doc)."""
        key = (product_id, user_locale)
        hit = self._eligible_cache.get(key)
        if hit is not None:
            return hit
        usable = [m for m in self.data.messages if product_id in m.productIds and self._shown_in(m, user_locale)]
        exact = tuple(m for m in usable if user_locale in m.locales)
        if exact:
            result = exact
        else:
            lang = language(user_locale)
            result = tuple(m for m in usable if any(language(loc) == lang for loc in m.locales))
        if len(self._eligible_cache) < 100_000:
            self._eligible_cache[key] = result
        return result

    def default_for(self, product_id: str, user_locale: str) -> CatalogMessage | None:
        """Return the default message for a product and locale (same-language fallback), or None."""
        key = (product_id, user_locale)
        if key in self._default_cache:
            return self._default_cache[key]
        found = self.defaults.get(key)
        if found is None:
            lang = language(user_locale)
            same = sorted(loc for (pid, loc) in self.defaults if pid == product_id and language(loc) == lang)
            if same:
                found = self.defaults[(product_id, same[0])]
        if found is not None and found.content is not None and self.apple_id(found, user_locale) is None:
            found = None  # its text for this locale is not approved yet: Apple's own default stands
        if len(self._default_cache) < 100_000:
            self._default_cache[key] = found
        return found

    def product_after(self, m: CatalogMessage, current_product: str) -> str:
        """Return the product the subscriber is on if they stay after seeing `m`."""
        return m.alternateProductId if m.kind == "alternateProduct" and m.alternateProductId else current_product

    def value_after(self, m: CatalogMessage, current_product: str) -> float:
        """Return V(product after m) - cost(m), the reward of a subscriber who stays (docs/data-formats.md, "The reward")."""
        return self.products[self.product_after(m, current_product)].value - m.cost

    def missing_defaults(self, locales: Iterable[str]) -> list[tuple[str, str]]:
        """Return the (product, locale) pairs among `locales` with no default, exact or same-language."""
        return [(p, loc) for p in self.products for loc in locales if self.default_for(p, loc) is None]
