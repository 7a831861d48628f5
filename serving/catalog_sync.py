"""Sync message and image states (and default messages) from Apple's Retention Messaging API into the catalog.

The network side is Apple's own ``app-store-server-library`` client (it signs the ES256
JWT, knows the endpoints and parses the answers into typed models); it is injected, so
everything here runs without a network in tests. Apple's docs:
https://developer.apple.com/documentation/retentionmessaging

What a sync does, in order:

1. read and validate the catalog (a broken catalog stops before any rate-limited call);
2. fetch Apple's message list and image list (one call each), and optionally the default
   message of each product x locale;
3. map them one to one by ``messageIdentifier`` / ``imageIdentifier`` onto the catalog's
   entries and update ``messageState`` / ``imageState``;
4. a catalog message or image Apple does not know is kept and marked ``PENDING``: Apple
   would not show it (an unknown id makes Apple fall back to the default message), and
   ``PENDING`` is the state an upload would give it; it is reported, never deleted.
   Messages and images only Apple knows are reported: the catalog cannot invent their
   kind, products or cost;
5. validate the result with :class:`models.catalog.Catalog`; an invalid result is
   refused and nothing is written;
6. write atomically (a temporary file in the same folder, then ``os.replace``), so a
   server hot-reloading the catalog only ever sees a complete file.

The catalog is edited as plain JSON, not re-encoded from the typed structs, so keys the
catalog's schema does not know (notes, message texts) survive a sync untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from appstoreserverlibrary.api_client import APIError, APIException
from appstoreserverlibrary.models.DefaultConfigurationResponse import DefaultConfigurationResponse
from appstoreserverlibrary.models.GetImageListResponse import GetImageListResponse
from appstoreserverlibrary.models.GetMessageListResponse import GetMessageListResponse

from models.catalog import STATES, Catalog, CatalogError, upload_records
from serving.apple_api import RateLimited
from serving.apple_api import explain_api_exception as _describe

T = TypeVar("T")

#: Production rate limit of every read endpoint used here: 1 request/s per endpoint, enforced
#: per hour; the sandbox allows a tenth of that (Apple, "Identifying rate limits").
PRODUCTION_MIN_INTERVAL_S = 1.0
SANDBOX_MIN_INTERVAL_S = 10.0
#: State given to catalog entries Apple does not know: not shown, and what an upload would give.
UNKNOWN_TO_APPLE_STATE = "PENDING"


class RetentionMessagingClient(Protocol):
    """The three read calls of Apple's ``AppStoreServerAPIClient`` that a sync uses."""

    def get_message_list(self) -> GetMessageListResponse: ...

    def get_image_list(self) -> GetImageListResponse: ...

    def get_default_message(self, product_id: str, locale: str) -> DefaultConfigurationResponse: ...


class SyncError(RuntimeError):
    """A sync could not be completed; the message is one sentence and the catalog file is untouched."""


def min_interval_for(environment: str) -> float:
    """Return the default seconds between two calls to one endpoint in `environment`."""
    return SANDBOX_MIN_INTERVAL_S if environment == "Sandbox" else PRODUCTION_MIN_INTERVAL_S


def make_client(key_file: str | Path, key_id: str, issuer_id: str, bundle_id: str, environment: str) -> Any:
    """Return Apple's ``AppStoreServerAPIClient`` for the In-App Purchase key in `key_file` (serving.apple_api).

    ``RETENTION_APPLE_API_URL`` replaces Apple's host. The key is read from the file and handed
    to the library only; no message here ever contains its bytes.
    """
    from serving.apple_api import AppleSetupError
    from serving.apple_api import make_client as apple_client

    try:
        return apple_client(key_file, key_id, issuer_id, bundle_id, environment)
    except AppleSetupError as exc:
        raise SyncError(str(exc)) from None


# ---- calling Apple --------------------------------------------------------------------
def describe_api_exception(exc: APIException) -> str:
    """Return one line naming Apple's HTTP status, error code and message, and what to do about a 401, an access 404 or a 429."""
    text = _describe(exc)
    if exc.api_error == APIError.RATE_LIMIT_EXCEEDED:
        text += " (Apple counts its rate limit per hour: try again later, or raise --min-interval)"
    return text


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Pacer:
    """Calls Apple, at most one call per `min_interval` seconds per endpoint, turning failures into SyncError.

    Apple enforces 1 request/s per endpoint in production (10/s for Configure Default
    Message) and a tenth of that in the sandbox, counted per hour; spacing each endpoint's
    calls by the per-second rate can therefore never exceed it. `intervals` overrides the
    spacing of named endpoints. A 429 that says how long to wait (``Retry-After``, surfaced
    by serving.apple_api.RateLimited) is retried after that wait while the waits add up to at
    most `max_wait` seconds; a 429 without one, or asking for longer, is a SyncError.
    """

    def __init__(
        self,
        min_interval: float,
        *,
        intervals: dict[str, float] | None = None,
        max_wait: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_interval = max(0.0, float(min_interval))
        self.intervals = {k: max(0.0, float(v)) for k, v in (intervals or {}).items()}
        self.max_wait = max_wait
        self._sleep = sleep
        self._clock = clock
        self._last: dict[str, float] = {}
        self.calls = 0
        #: seconds slept because Apple answered 429, in order
        self.rate_limited_waits: list[float] = []

    def _space(self, endpoint: str) -> None:
        last = self._last.get(endpoint)
        if last is not None:
            wait = last + self.intervals.get(endpoint, self.min_interval) - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last[endpoint] = self._clock()
        self.calls += 1

    def call(self, endpoint: str, fn: Callable[..., T], *args: Any, what: str | None = None) -> T:
        """Return `fn(*args)` once `endpoint` may be called again; raise SyncError (naming `what`) on any failure."""
        what = what or endpoint
        waited = 0.0
        while True:
            self._space(endpoint)
            try:
                return fn(*args)
            except RateLimited as exc:
                wait = exc.retry_after_s
                if wait is None or waited + wait > self.max_wait:
                    after = "" if wait is None else f" (Apple asked to wait {wait:.0f} s)"
                    raise SyncError(f"{what}: {describe_api_exception(exc)}{after}") from None
                self.rate_limited_waits.append(wait)
                self._sleep(wait)
                waited += wait
            except APIException as exc:
                raise SyncError(f"{what}: {describe_api_exception(exc)}") from None
            except SyncError:
                raise
            except Exception as exc:  # network failure, timeout, or an answer the library could not parse
                raise SyncError(
                    f"{what}: no usable answer from Apple: {type(exc).__name__}: {_one_line(str(exc))}"
                ) from None


@dataclass
class AppleState:
    """What Apple says: message and image states by identifier, and default messages by (product, locale)."""

    messages: dict[str, str]
    images: dict[str, str]
    #: (productId, locale) -> messageIdentifier, or None where Apple has no default; only pairs checked
    defaults: dict[tuple[str, str], str | None] = field(default_factory=dict)


def state_of(raw: str | None, main: Any) -> str:
    """Return Apple's state as Apple wrote it (the raw twin), else the enum's value, else ""."""
    if raw is not None:
        return raw
    return str(main.value) if main is not None else ""


def fetch_apple_state(
    client: RetentionMessagingClient,
    pacer: Pacer,
    default_pairs: Sequence[tuple[str, str]] = (),
    progress: bool = False,
) -> AppleState:
    """Return Apple's message and image states, and the default message of each pair in `default_pairs`."""
    msg_resp = pacer.call("get_message_list", client.get_message_list)
    img_resp = pacer.call("get_image_list", client.get_image_list)
    state = AppleState(messages={}, images={})
    for item in msg_resp.messageIdentifiers or []:
        if item.messageIdentifier is not None:
            state.messages[str(item.messageIdentifier).lower()] = state_of(item.rawMessageState, item.messageState)
    for img in img_resp.imageIdentifiers or []:
        if img.imageIdentifier is not None:
            state.images[str(img.imageIdentifier).lower()] = state_of(img.rawImageState, img.imageState)
    pairs: Iterable[tuple[str, str]] = default_pairs
    if progress and default_pairs:
        from tqdm import tqdm

        pairs = tqdm(default_pairs, desc="default messages", unit="call", disable=None)
    for pid, loc in pairs:
        state.defaults[(pid, loc)] = _fetch_default(client, pacer, pid, loc)
    return state


def _fetch_default(client: RetentionMessagingClient, pacer: Pacer, product_id: str, locale: str) -> str | None:
    def get() -> str | None:
        try:
            return str(client.get_default_message(product_id, locale).messageIdentifier).lower()
        except APIException as exc:
            if exc.api_error == APIError.DEFAULT_MESSAGE_NOT_FOUND:
                return None
            raise

    return pacer.call("get_default_message", get, what=f"get_default_message {product_id} {locale}")


# ---- planning the new catalog -----------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """One field of the catalog that the sync changes."""

    what: str  # "message", "image" or "default"
    identifier: str  # message id, or "productId locale" for a default
    field: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class DefaultCheck:
    """The default message of one product and locale, in the catalog and at Apple."""

    productId: str
    locale: str
    catalog: str | None
    apple: str | None
    note: str
    #: the catalog message Apple's default is a locale's text of (``catalog apply``'s record), else Apple's id itself
    apple_message: str | None = None

    @property
    def matches(self) -> bool:
        """Return True when the catalog and Apple name the same default (or neither names one).

        Apple's default may be one locale's text of a catalog message with content (its own
        UUID v5, see serving/catalog_content.py): it matches that message.
        """
        theirs = self.apple_message if self.apple_message is not None else self.apple
        return self.catalog == theirs and self.catalog is not None


@dataclass
class SyncPlan:
    """The synced catalog (not yet written) and everything worth telling the user about it."""

    original: bytes
    new_bytes: bytes
    changes: list[Change]
    apple_only_messages: list[tuple[str, str]]  # (id, Apple's state)
    apple_only_images: list[tuple[str, str]]
    unknown_to_apple_messages: list[str]
    unknown_to_apple_images: list[str]
    unknown_states: dict[str, str]
    default_checks: list[DefaultCheck]
    #: why the synced catalog is invalid (then it must not be written), else None
    problem: str | None = None
    calls: int = 0

    @property
    def changed(self) -> bool:
        """Return True when the synced catalog differs from the file's content."""
        return bool(self.changes)


def _known_state(state: str, ident: str, unknown: dict[str, str]) -> str:
    # A state Apple adds later is not one the catalog accepts; treat it as not shown, and say so.
    if state in STATES:
        return state
    unknown[ident] = state
    return UNKNOWN_TO_APPLE_STATE


def plan_sync(raw: bytes, apple: AppleState, *, adopt_defaults: bool = False, source: str = "catalog") -> SyncPlan:
    """Return the plan that maps Apple's states onto the catalog in `raw` (validated; nothing written)."""
    try:
        Catalog.from_bytes(raw, source=source)
        doc = json.loads(raw)
    except CatalogError as exc:
        raise SyncError(f"the catalog is invalid before any sync, fix it first: {exc}") from None
    except ValueError as exc:
        raise SyncError(f"{source} is not valid JSON: {exc}") from None
    changes: list[Change] = []
    unknown_states: dict[str, str] = {}
    seen_messages: set[str] = set()
    seen_images: set[str] = set()
    unknown_msgs: list[str] = []
    unknown_imgs: list[str] = []
    # texts uploaded by `catalog apply` keep their states in the record (one per environment), which apply maintains
    per_locale: dict[str, str] = {}  # Apple's id of one locale's text -> the catalog message
    for up in upload_records(doc.get("uploaded")).values():
        seen_messages.update(u.messageIdentifier for u in up.messages)
        seen_images.update(u.imageIdentifier for u in up.images)
        per_locale.update((u.messageIdentifier, u.message) for u in up.messages)
    for m in doc.get("messages", []):
        if m.get("content") is not None:
            continue
        mid = m["messageIdentifier"]
        seen_messages.add(mid)
        if mid in apple.messages:
            new = _known_state(apple.messages[mid], mid, unknown_states)
        else:
            new = UNKNOWN_TO_APPLE_STATE
            unknown_msgs.append(mid)
        if m.get("messageState") != new:
            changes.append(Change("message", mid, "messageState", m.get("messageState"), new))
            m["messageState"] = new
        iid = m.get("imageIdentifier")
        if iid is None:
            continue
        seen_images.add(iid)
        if iid in apple.images:
            new_img = _known_state(apple.images[iid], iid, unknown_states)
        else:
            new_img = UNKNOWN_TO_APPLE_STATE
            if iid not in unknown_imgs:
                unknown_imgs.append(iid)
        if m.get("imageState") != new_img:
            changes.append(Change("image", mid, f"imageState ({iid})", m.get("imageState"), new_img))
            m["imageState"] = new_img
    apple_only_messages = sorted((i, s) for i, s in apple.messages.items() if i not in seen_messages)
    apple_only_images = sorted((i, s) for i, s in apple.images.items() if i not in seen_images)

    checks = _check_defaults(doc, apple, seen_messages, per_locale)
    if adopt_defaults:
        changes += _adopt_defaults(doc, checks, seen_messages)

    new_bytes = raw if not changes else (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
    problem = None
    if changes:
        try:
            Catalog.from_bytes(new_bytes, source="synced catalog")
        except CatalogError as exc:
            problem = str(exc)
            if "not APPROVED" in problem:
                problem += " (a default must be an approved message: change the catalog's defaults, or wait for Apple's review)"
    return SyncPlan(
        original=raw,
        new_bytes=new_bytes,
        changes=changes,
        apple_only_messages=apple_only_messages,
        apple_only_images=apple_only_images,
        unknown_to_apple_messages=unknown_msgs,
        unknown_to_apple_images=unknown_imgs,
        unknown_states=unknown_states,
        default_checks=checks,
        problem=problem,
    )


def _check_defaults(doc: dict[str, Any], apple: AppleState, catalog_ids: set[str],
                    per_locale: dict[str, str]) -> list[DefaultCheck]:
    ours = {(d["productId"], d["locale"]): d["messageIdentifier"] for d in doc.get("defaults", [])}
    checks = []
    for (pid, loc), apple_id in apple.defaults.items():
        mine = ours.get((pid, loc))
        theirs = per_locale.get(apple_id, apple_id) if apple_id is not None else None
        if mine == theirs:
            note = "same" if mine is not None else "no default anywhere: Apple shows nothing when our answer fails"
        elif theirs is None:
            note = "Apple has no default: it shows nothing when our answer fails"
        elif mine is None:
            note = "only Apple has a default"
        else:
            note = "differ"
        if apple_id is not None and apple_id not in catalog_ids:
            note += "; Apple's default is not in the catalog"
        elif apple_id is not None and theirs != apple_id:
            note += f" (Apple's {apple_id} is message {theirs}'s text)"
        checks.append(DefaultCheck(pid, loc, mine, apple_id, note, theirs))
    return checks


def _adopt_defaults(doc: dict[str, Any], checks: list[DefaultCheck], catalog_ids: set[str]) -> list[Change]:
    """Make the catalog's defaults name Apple's where Apple has one the catalog knows; never remove one."""
    changes: list[Change] = []
    defaults: list[dict[str, Any]] = doc.setdefault("defaults", [])
    index = {(d["productId"], d["locale"]): d for d in defaults}
    for c in checks:
        theirs = c.apple_message if c.apple_message is not None else c.apple
        if c.apple is None or c.matches or c.apple not in catalog_ids:
            continue
        entry = index.get((c.productId, c.locale))
        if entry is None:
            defaults.append({"productId": c.productId, "locale": c.locale, "messageIdentifier": theirs})
        else:
            entry["messageIdentifier"] = theirs
        changes.append(Change("default", f"{c.productId} {c.locale}", "messageIdentifier", c.catalog, theirs))
    return changes


# ---- writing --------------------------------------------------------------------------------
def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and ``os.replace``: readers see the old or the new file, whole.

    The temporary file lives in the target's folder (``os.replace`` is atomic only within
    one file system), is flushed to disk before the rename, and keeps the old file's
    permissions; on any failure it is removed and the target is untouched. A symlinked
    target is followed, so the link stays a link and its file is what gets replaced.
    """
    target = Path(os.path.realpath(path))
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # the rename itself survives a crash only once the folder's entry is on disk
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---- the whole sync -------------------------------------------------------------------------
def default_pairs(catalog: Catalog, locales: Sequence[str] | None) -> list[tuple[str, str]]:
    """Return the (product, locale) pairs whose default message to check, products in catalog order.

    Without `locales`, every locale the catalog's messages name, plus the pairs of the
    catalog's own defaults.
    """
    if locales:
        wanted = list(dict.fromkeys(locales))
    else:
        wanted = sorted({loc for m in catalog.messages.values() for loc in m.locales})
    pairs = [(p, loc) for p in catalog.products for loc in wanted]
    if not locales:
        listed = set(pairs)
        pairs += [k for k in catalog.defaults if k not in listed]
    return pairs


def sync_catalog(
    catalog_path: str | Path,
    client: RetentionMessagingClient,
    *,
    out_path: str | Path | None = None,
    dry_run: bool = False,
    check_defaults: bool = False,
    locales: Sequence[str] | None = None,
    adopt_defaults: bool = False,
    min_interval: float = PRODUCTION_MIN_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    progress: bool = False,
) -> tuple[SyncPlan, Path | None]:
    """Return the sync plan and the path written (None when nothing was written).

    Raises SyncError (one sentence) when the catalog is unreadable or invalid, or Apple
    fails; the catalog file is then untouched. An invalid synced catalog is not an
    exception: ``plan.problem`` says why, and nothing is written.
    """
    path = Path(catalog_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SyncError(f"cannot read catalog {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        before = Catalog.from_bytes(raw, source=str(path))
    except CatalogError as exc:
        raise SyncError(f"the catalog is invalid before any sync, fix it first: {exc}") from None
    pacer = Pacer(min_interval, sleep=sleep, clock=clock)
    pairs = default_pairs(before, locales) if (check_defaults or adopt_defaults) else []
    apple = fetch_apple_state(client, pacer, pairs, progress=progress)
    plan = plan_sync(raw, apple, adopt_defaults=adopt_defaults, source=str(path))
    plan.calls = pacer.calls
    if dry_run or plan.problem is not None:
        return plan, None
    target = Path(out_path) if out_path is not None else path
    if target == path and not plan.changed:
        return plan, None  # no rewrite: a server watching the file has nothing to reload
    try:
        write_atomic(target, plan.new_bytes)
    except OSError as exc:
        raise SyncError(f"cannot write {target}: {exc.strerror or type(exc).__name__}") from None
    return plan, target


# ---- the report -----------------------------------------------------------------------------
def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _s(value: str | None) -> str:
    return "-" if value is None else value


def format_report(plan: SyncPlan, *, show_all_defaults: bool = False) -> str:
    """Return the human-readable report of a plan: changes, identifiers on one side only, default checks."""
    out: list[str] = []
    if plan.changes:
        out.append(f"changes ({len(plan.changes)}):")
        rows: list[tuple[str, ...]] = [("what", "identifier", "field", "catalog", "Apple")]
        rows += [(c.what, c.identifier, c.field, _s(c.old), _s(c.new)) for c in plan.changes]
        out += _table(rows)
    else:
        out.append("no changes: the catalog already matches Apple")
    if plan.apple_only_messages or plan.apple_only_images:
        n = len(plan.apple_only_messages) + len(plan.apple_only_images)
        out.append(f"at Apple but not in the catalog ({n}; add them to the catalog to use them):")
        rows2: list[tuple[str, ...]] = [("what", "identifier", "Apple's state")]
        rows2 += [("message", i, s) for i, s in plan.apple_only_messages]
        rows2 += [("image", i, s) for i, s in plan.apple_only_images]
        out += _table(rows2)
    if plan.unknown_to_apple_messages or plan.unknown_to_apple_images:
        n = len(plan.unknown_to_apple_messages) + len(plan.unknown_to_apple_images)
        out.append(
            f"in the catalog but unknown to Apple ({n}; kept, marked {UNKNOWN_TO_APPLE_STATE} so they are not served; "
            "upload them, or check --environment):"
        )
        rows3: list[tuple[str, ...]] = [("what", "identifier")]
        rows3 += [("message", i) for i in plan.unknown_to_apple_messages]
        rows3 += [("image", i) for i in plan.unknown_to_apple_images]
        out += _table(rows3)
    if plan.unknown_states:
        out.append(f"states this tool does not know ({len(plan.unknown_states)}; treated as {UNKNOWN_TO_APPLE_STATE}):")
        out += _table([("identifier", "Apple's state"), *sorted(plan.unknown_states.items())])
    if plan.default_checks:
        bad = [c for c in plan.default_checks if not c.matches]
        out.append(f"default messages: {len(plan.default_checks)} product/locale pair(s) checked, {len(bad)} mismatch(es)")
        shown = plan.default_checks if show_all_defaults else bad
        if shown:
            rows4: list[tuple[str, ...]] = [("product", "locale", "catalog", "Apple", "note")]
            rows4 += [(c.productId, c.locale, _s(c.catalog), _s(c.apple), c.note) for c in shown]
            out += _table(rows4)
    return "\n".join(out)
