"""``retention catalog plan`` / ``apply``: bring Apple's messages, images and default messages in line with the catalog.

The catalog file is the source of truth for the message content (serving/catalog_content.py).
Apple is read through Apple's own client (serving/apple_api.py); calls are spaced per endpoint
under Apple's rate limits and a 429 is waited out as Apple's ``Retry-After`` says
(serving/catalog_sync.Pacer). Apple's pages: https://developer.apple.com/documentation/retentionmessaging

What ``apply`` does, in order (``plan`` reads the same and prints the steps without doing them):

1. read the catalog and check its content against Apple's limits (a problem stops everything);
2. read Apple's image list, message list, realtime URL, and the default message of every
   product and locale the catalog or the record names;
3. upload the images Apple lacks, then the texts Apple lacks (``PUT``; a 409 "already exists"
   counts as done, so a re-run after a crash converges);
4. read the lists again when something was uploaded (the sandbox approves at once), and
   record Apple's states;
5. set the default message of every product and locale to the text that serves there: the
   current text once Apple approved it, else the previous approved one (an old text keeps
   serving until its replacement is approved); nothing when no text is approved yet;
6. with ``prune`` only: delete the defaults the catalog no longer has, then the messages, then
   the images that nothing kept uses (Apple refuses to delete an image in use).

After every change at Apple the record (the catalog's ``uploaded`` section, one record per
environment: ``{"Sandbox": {...}, "Production": {...}}``) is written atomically, so the file
always says what Apple holds, even after an interruption. Apply in one environment touches only
that environment's record; a record in the older single form is taken as this environment's
(its states are read again from Apple) and rewritten per environment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
from appstoreserverlibrary.api_client import APIError, APIException
from appstoreserverlibrary.models.BulletPoint import BulletPoint
from appstoreserverlibrary.models.DefaultConfigurationRequest import DefaultConfigurationRequest
from appstoreserverlibrary.models.HeaderPosition import HeaderPosition
from appstoreserverlibrary.models.ImageSize import ImageSize
from appstoreserverlibrary.models.UploadMessageImage import UploadMessageImage
from appstoreserverlibrary.models.UploadMessageRequestBody import UploadMessageRequestBody

from models.catalog import (
    ENVIRONMENTS,
    Catalog,
    CatalogError,
    DefaultMessage,
    Uploaded,
    UploadedImage,
    UploadedMessage,
)
from serving.catalog_content import Desired, desired
from serving.catalog_sync import Pacer, SyncError, state_of, write_atomic

#: seconds between two Configure Default Message calls, as a share of the others' (Apple allows 10/s there, 1/s elsewhere)
DEFAULT_CONFIG_SHARE = 0.1


class ApplyError(RuntimeError):
    """Plan or apply stopped; the message's first line says why (Apple's answer, or what is wrong with the catalog)."""


class CatalogRefusedError(ApplyError):
    """The catalog is invalid or breaks Apple's limits: nothing was read from or sent to Apple.

    The first line says so; the lines after it are the problems, one each.
    """


@dataclass
class AppleView:
    """What Apple holds now."""

    messages: dict[str, str]  # messageIdentifier -> Apple's state
    images: dict[str, str]
    defaults: dict[tuple[str, str], str | None]  # checked pairs only
    realtime_url: str | None


@dataclass(frozen=True)
class Step:
    """One change at Apple."""

    action: str  # upload-image, upload-message, set-default, delete-default, delete-message, delete-image
    target: str  # an identifier, or "productId locale"
    detail: str = ""
    value: str | None = None  # the message of a set-default


@dataclass
class TextState:
    """One locale's text of a catalog message, as Apple reports it."""

    message: str
    locale: str
    messageIdentifier: str
    state: str  # Apple's state, or "not uploaded"
    serving: str | None  # the Apple identifier the endpoint answers for this message and locale


@dataclass
class Plan:
    """The steps apply would take now, and what the user should know."""

    steps: list[Step]
    texts: list[TextState]
    waiting: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # at Apple, not in the catalog, kept without --prune
    realtime_url: str | None = None


# ---- reading ----------------------------------------------------------------------------------
def _lists(client: Any, pacer: Pacer) -> tuple[dict[str, str], dict[str, str]]:
    msgs = pacer.call("get_message_list", client.get_message_list)
    imgs = pacer.call("get_image_list", client.get_image_list)
    messages = {str(i.messageIdentifier).lower(): state_of(i.rawMessageState, i.messageState)
                for i in msgs.messageIdentifiers or [] if i.messageIdentifier is not None}
    images = {str(i.imageIdentifier).lower(): state_of(i.rawImageState, i.imageState)
              for i in imgs.imageIdentifiers or [] if i.imageIdentifier is not None}
    return messages, images


def _not_found_is_none(fn: Callable[[], Any], *codes: APIError) -> Callable[[], Any]:
    def call() -> Any:
        try:
            return fn()
        except APIException as exc:
            if exc.api_error in codes:
                return None
            raise

    return call


def read_apple(client: Any, pacer: Pacer, pairs: list[tuple[str, str]]) -> AppleView:
    """Return Apple's lists, realtime URL and the default message of each (product, locale) in `pairs`."""
    messages, images = _lists(client, pacer)
    url = pacer.call("get_realtime_url", _not_found_is_none(client.get_realtime_url, APIError.REALTIME_URL_NOT_FOUND))
    defaults: dict[tuple[str, str], str | None] = {}
    for pid, loc in pairs:
        def get(p: str = pid, lo: str = loc) -> Any:
            return client.get_default_message(p, lo)

        got = pacer.call("get_default_message", _not_found_is_none(get, APIError.DEFAULT_MESSAGE_NOT_FOUND),
                         what=f"get_default_message {pid} {loc}")
        defaults[(pid, loc)] = None if got is None else str(got.messageIdentifier).lower()
    return AppleView(messages, images, defaults, None if url is None else url.realtimeURL)


# ---- the record -------------------------------------------------------------------------------
class Record:
    """One environment's record in the catalog file's ``uploaded`` section, kept in step with Apple and written after every change."""

    def __init__(self, path: Path, doc: dict[str, Any], uploaded: Uploaded | None, *, write: bool,
                 environment: str) -> None:
        self.path, self.doc, self.write_enabled, self.environment = path, doc, write, environment
        up = uploaded or Uploaded()
        self.messages: dict[str, UploadedMessage] = {u.messageIdentifier: u for u in up.messages}
        self.images: dict[str, UploadedImage] = {u.imageIdentifier: u for u in up.images}
        self.defaults: dict[tuple[str, str], str] = {(d.productId, d.locale): d.messageIdentifier for d in up.defaults}
        self.writes = 0

    def to_builtins(self) -> dict[str, Any]:
        rec = Uploaded(messages=list(self.messages.values()), images=list(self.images.values()),
                       defaults=[DefaultMessage(p, lo, m) for (p, lo), m in sorted(self.defaults.items())])
        out: dict[str, Any] = msgspec.to_builtins(rec)
        return out

    def save(self) -> None:
        """Write the catalog with this record, atomically, when it changed (and writing is on)."""
        old = self.doc.get("uploaded") or {}
        others = {env: old[env] for env in ENVIRONMENTS if env in old and env != self.environment} \
            if set(old) <= set(ENVIRONMENTS) else {}  # the older single form becomes this environment's
        new = {env: rec for env, rec in sorted({**others, self.environment: self.to_builtins()}.items())}
        if not self.write_enabled or old == new:
            return
        self.doc["uploaded"] = new
        data = (json.dumps(self.doc, indent=2, ensure_ascii=False) + "\n").encode()
        try:
            Catalog.from_bytes(data, source="catalog with its upload record")
            write_atomic(self.path, data)
        except (CatalogError, OSError) as exc:
            raise ApplyError(f"cannot write the upload record into {self.path}: {exc}") from None
        self.writes += 1

    def refresh(self, apple: AppleView, want: Desired) -> None:
        """Take Apple's states; adopt the catalog's texts Apple already has; drop what Apple no longer has."""
        for mid, d in want.messages.items():
            if mid in apple.messages and mid not in self.messages:
                self.messages[mid] = UploadedMessage(messageIdentifier=mid, message=d.message, locale=d.locale,
                                                     messageState=apple.messages[mid],
                                                     imageIdentifiers=list(d.imageIdentifiers), upload=d.upload)
        for iid, img in want.images.items():
            if iid in apple.images and iid not in self.images:
                self.images[iid] = UploadedImage(imageIdentifier=iid, file=img.file, sha256=img.sha256,
                                                 imageSize=img.imageSize, imageState=apple.images[iid])
        self.messages = {k: msgspec.structs.replace(u, messageState=apple.messages[k])
                         for k, u in self.messages.items() if k in apple.messages}
        self.images = {k: msgspec.structs.replace(u, imageState=apple.images[k])
                       for k, u in self.images.items() if k in apple.images}
        for pair, theirs in apple.defaults.items():
            if theirs is None:
                self.defaults.pop(pair, None)
            elif pair in self.defaults or theirs in self.messages:
                self.defaults[pair] = theirs


# ---- planning ---------------------------------------------------------------------------------
def _serving(record: Record, apple: AppleView, catalog: Catalog, want: Desired,
             message: str, locale: str) -> str | None:
    """Return the Apple id that serves (message, content locale): the newest approved upload, else None."""
    current = next((k for k, d in want.messages.items() if d.message == message and d.locale == locale), None)

    def approved(mid: str) -> bool:
        u = record.messages.get(mid)
        d = want.messages.get(mid)
        images = u.imageIdentifiers if u is not None else (list(d.imageIdentifiers) if d is not None else [])
        return apple.messages.get(mid) == "APPROVED" and all(apple.images.get(i) == "APPROVED" for i in images)

    if current is not None and approved(current):
        return current
    older = [k for k, u in record.messages.items() if u.message == message and u.locale == locale and approved(k)]
    return older[-1] if older else None


def make_plan(catalog: Catalog, want: Desired, apple: AppleView, record: Record, *, prune: bool) -> Plan:
    """Return the steps that bring Apple in line with the catalog, given what Apple holds now."""
    steps: list[Step] = []
    plan = Plan(steps=steps, texts=[], realtime_url=apple.realtime_url)
    for iid, img in want.images.items():
        if iid not in apple.images:
            steps.append(Step("upload-image", iid, f"{img.file} ({img.imageSize})"))
    for mid, d in want.messages.items():
        if mid not in apple.messages:
            steps.append(Step("upload-message", mid, f"{d.message} {d.locale}: {d.upload['header']!r}"))
    serving: dict[tuple[str, str], str | None] = {}
    for mid, d in want.messages.items():
        key = (d.message, d.locale)
        serving[key] = _serving(record, apple, catalog, want, *key)
        state = apple.messages.get(mid, "not uploaded")
        plan.texts.append(TextState(d.message, d.locale, mid, state, serving[key]))
        bad_images = [i for i in d.imageIdentifiers if apple.images.get(i) == "REJECTED"]
        if state == "REJECTED" or bad_images:
            what = "its text" if state == "REJECTED" else f"its image {', '.join(bad_images)}"
            old = f"; the endpoint answers the previous text {serving[key]}" if serving[key] else \
                "; the endpoint does not answer this message in this locale"
            plan.rejected.append(f"message {d.message} {d.locale}: Apple REJECTED {what} ({mid}): change the text "
                                 f"or image in the catalog and apply again{old}")
        elif state != "APPROVED":
            plan.waiting.append(f"message {d.message} {d.locale}: {mid} is {state} at Apple"
                                + (f"; {serving[key]} serves until it is approved" if serving[key] else ""))
    future_defaults = dict(apple.defaults)  # Apple's defaults once the steps are done
    for (pid, loc), logical in sorted(want.defaults.items()):
        m = catalog.messages[logical]
        cl = catalog.content_locale(m, loc)
        target = serving.get((logical, cl)) if cl is not None else None
        theirs = apple.defaults.get((pid, loc))
        if cl is None:
            plan.waiting.append(f"default {pid} {loc}: message {logical} has no text for {loc}")
        elif target is None:
            plan.waiting.append(f"default {pid} {loc}: waits until Apple approves message {logical} {cl}")
        elif theirs != target:
            steps.append(Step("set-default", f"{pid} {loc}", f"{logical} {cl} (Apple has {theirs or 'none'})", target))
            future_defaults[(pid, loc)] = target
    keep_messages = set(want.messages) | {m.messageIdentifier for m in catalog.messages.values() if m.content is None}
    keep_messages |= {v for v in serving.values() if v is not None}
    stale_defaults = [(p, lo) for (p, lo), theirs in sorted(apple.defaults.items())
                      if theirs is not None and (p, lo) not in want.defaults and (p, lo) not in catalog.defaults]
    for p, lo in stale_defaults:
        if prune:
            steps.append(Step("delete-default", f"{p} {lo}", f"Apple has {apple.defaults[(p, lo)]}"))
        else:
            plan.kept.append(f"default {p} {lo} -> {apple.defaults[(p, lo)]} (not in the catalog)")
    keep_messages |= {v for pair, v in future_defaults.items() if v is not None and (pair not in stale_defaults or not prune)}
    for mid in sorted(apple.messages):
        if mid in keep_messages:
            continue
        if prune:
            steps.append(Step("delete-message", mid, _describe_uploaded(record, mid)))
        else:
            plan.kept.append(f"message {mid} ({apple.messages[mid]}) {_describe_uploaded(record, mid)}".rstrip())
    kept_images = set(want.images) | {m.imageIdentifier for m in catalog.messages.values() if m.imageIdentifier}
    for mid in keep_messages:
        u = record.messages.get(mid)
        if u is not None:
            kept_images |= set(u.imageIdentifiers)
    for iid in sorted(apple.images):
        if iid in kept_images:
            continue
        if prune:
            steps.append(Step("delete-image", iid, record.images[iid].file if iid in record.images else ""))
        else:
            plan.kept.append(f"image {iid} ({apple.images[iid]})")
    return plan


def _describe_uploaded(record: Record, mid: str) -> str:
    u = record.messages.get(mid)
    return f"(was {u.message} {u.locale}: {u.upload.get('header', '')!r})" if u is not None else ""


# ---- doing --------------------------------------------------------------------------------------
def _upload_body(upload: dict[str, Any]) -> UploadMessageRequestBody:
    image = upload.get("image")
    return UploadMessageRequestBody(
        header=upload["header"],
        body=upload["body"],
        image=UploadMessageImage(imageIdentifier=UUID(image["imageIdentifier"]), altText=image["altText"]) if image else None,
        headerPosition=HeaderPosition(upload["headerPosition"]) if upload.get("headerPosition") else None,
        bulletPoints=[BulletPoint(text=b["text"], imageIdentifier=UUID(b["imageIdentifier"]), altText=b["altText"])
                      for b in upload["bulletPoints"]] if upload.get("bulletPoints") else None,
    )


def _ignore(fn: Callable[[], Any], *codes: APIError) -> Callable[[], Any]:
    """Wrap `fn` so Apple's answer with one of `codes` counts as done (a re-run after a crash)."""
    return _not_found_is_none(fn, *codes)


class _Run:
    def __init__(self, client: Any, pacer: Pacer, record: Record, want: Desired, log: Callable[[str], None]) -> None:
        self.client, self.pacer, self.record, self.want, self.log = client, pacer, record, want, log
        self.done: list[Step] = []

    def do(self, step: Step) -> None:
        c, r = self.client, self.record
        if step.action == "upload-image":
            img = self.want.images[step.target]
            try:
                data = img.path.read_bytes()
            except OSError as exc:
                raise ApplyError(f"cannot read image {img.file}: {exc.strerror or type(exc).__name__}") from None
            if hashlib.sha256(data).hexdigest() != img.sha256:
                raise ApplyError(f"image {img.file} changed while apply ran: run apply again")
            self.pacer.call("upload_image", _ignore(lambda: c.upload_image(UUID(step.target), data, ImageSize(img.imageSize)),
                                                    APIError.IMAGE_ALREADY_EXISTS), what=f"upload image {img.file}")
            r.images[step.target] = UploadedImage(imageIdentifier=step.target, file=img.file, sha256=img.sha256,
                                                  imageSize=img.imageSize, imageState="PENDING")
        elif step.action == "upload-message":
            d = self.want.messages[step.target]
            body = _upload_body(d.upload)
            self.pacer.call("upload_message", _ignore(lambda: c.upload_message(UUID(step.target), body),
                                                      APIError.MESSAGE_ALREADY_EXISTS),
                            what=f"upload message {d.message} {d.locale}")
            r.messages.pop(step.target, None)  # re-adopted: it goes last, the newest
            r.messages[step.target] = UploadedMessage(messageIdentifier=step.target, message=d.message, locale=d.locale,
                                                      messageState="PENDING", imageIdentifiers=list(d.imageIdentifiers),
                                                      upload=d.upload)
        elif step.action == "set-default":
            pid, loc = step.target.split(" ", 1)
            assert step.value is not None
            req = DefaultConfigurationRequest(messageIdentifier=UUID(step.value))
            self.pacer.call("configure_default_message", lambda: c.configure_default_message(pid, loc, req),
                            what=f"set default {pid} {loc}")
            r.defaults[(pid, loc)] = step.value
        elif step.action == "delete-default":
            pid, loc = step.target.split(" ", 1)
            self.pacer.call("delete_default_message", _ignore(lambda: c.delete_default_message(pid, loc),
                                                              APIError.DEFAULT_MESSAGE_NOT_FOUND),
                            what=f"delete default {pid} {loc}")
            r.defaults.pop((pid, loc), None)
        elif step.action == "delete-message":
            self.pacer.call("delete_message", _ignore(lambda: c.delete_message(UUID(step.target)), APIError.MESSAGE_NOT_FOUND),
                            what=f"delete message {step.target}")
            r.messages.pop(step.target, None)
        elif step.action == "delete-image":
            try:
                self.pacer.call("delete_image", _ignore(lambda: c.delete_image(UUID(step.target)), APIError.IMAGE_NOT_FOUND),
                                what=f"delete image {step.target}")
            except SyncError as exc:
                if "IMAGE_IN_USE" not in str(exc):
                    raise
                self.log(f"kept image {step.target}: Apple says a message still uses it")
                return
            r.images.pop(step.target, None)
        r.save()
        self.done.append(step)
        self.log(f"done: {step.action} {step.target}")


@dataclass
class Result:
    """What plan or apply found and did."""

    plan: Plan
    done: list[Step]
    calls: int
    record_writes: int
    rate_limited_waits: list[float]


def load(catalog_path: str | Path) -> tuple[Path, bytes, Catalog, Desired]:
    """Return the catalog's path, bytes, parsed catalog and what it needs at Apple; ApplyError on any problem."""
    path = Path(catalog_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ApplyError(f"cannot read catalog {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        catalog = Catalog.from_bytes(raw, source=str(path))
    except CatalogError as exc:
        raise CatalogRefusedError(f"the catalog is invalid, nothing was sent to Apple: {exc}") from None
    want = desired(catalog, path.parent)
    if want.problems:
        lines = "\n".join(want.problems)
        raise CatalogRefusedError(f"the catalog's content breaks Apple's limits ({len(want.problems)} problem(s), listed "
                             f"above); nothing was sent to Apple\n{lines}")
    return path, raw, catalog, want


def run(
    catalog_path: str | Path,
    client: Any,
    pacer: Pacer,
    *,
    apply: bool,
    environment: str,
    prune: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> Result:
    """Return the plan (and, with `apply`, what was done). Raises ApplyError or SyncError (one line each).

    `environment` (``Sandbox`` or ``Production``) is the one `client` calls: its record in the
    catalog's ``uploaded`` section is the one read and written. Without `apply` nothing changes
    at Apple or on disk.
    """
    path, _raw, catalog, want = load(catalog_path)
    doc = json.loads(_raw)
    record = Record(path, doc, catalog.record(environment), write=apply, environment=environment)
    pairs = sorted(set(want.defaults) | set(record.defaults))
    apple = read_apple(client, pacer, pairs)
    record.refresh(apple, want)
    plan = make_plan(catalog, want, apple, record, prune=prune)
    if not apply:
        return Result(plan, [], pacer.calls, 0, pacer.rate_limited_waits)
    record.save()
    r = _Run(client, pacer, record, want, log)
    uploads = [s for s in plan.steps if s.action.startswith("upload-")]
    for step in sorted(uploads, key=lambda s: s.action != "upload-image"):  # images before the texts that use them
        r.do(step)
    if uploads:
        apple.messages, apple.images = _lists(client, pacer)
        for step in uploads:  # Apple may still list an upload late; never take it for missing
            if step.action == "upload-image":
                apple.images.setdefault(step.target, "PENDING")
            else:
                apple.messages.setdefault(step.target, "PENDING")
        record.refresh(apple, want)
        record.save()
    plan = make_plan(catalog, want, apple, record, prune=prune)
    order = ["set-default", "delete-default", "delete-message", "delete-image"]
    for action in order:
        for step in [s for s in plan.steps if s.action == action]:
            r.do(step)
            if action == "delete-message":
                apple.messages.pop(step.target, None)
            elif action == "set-default":
                apple.defaults[tuple(step.target.split(" ", 1))] = step.value  # type: ignore[index]
    return Result(plan, r.done, pacer.calls, record.writes, pacer.rate_limited_waits)


def make_pacer(min_interval: float, **kw: Any) -> Pacer:
    """Return the pacer of plan/apply: `min_interval` per endpoint, a tenth of it for Configure Default Message."""
    return Pacer(min_interval, intervals={"configure_default_message": min_interval * DEFAULT_CONFIG_SHARE}, **kw)


# ---- the report -----------------------------------------------------------------------------
def format_plan(plan: Plan, *, applied: list[Step] | None = None) -> str:
    """Return the report: steps (to do, or done), texts with Apple's states, rejections, waits, what is kept."""
    out: list[str] = []
    steps = plan.steps if applied is None else applied
    head = "to do" if applied is None else "done"
    if steps:
        out.append(f"{head} ({len(steps)}):")
        out += [f"  {s.action:<15} {s.target}  {s.detail}".rstrip() for s in steps]
    else:
        out.append("nothing to do: Apple matches the catalog" if applied is None else "nothing done: Apple matched the catalog")
    if plan.texts:
        # the endpoint reads the record apply writes: a plan's "answered" is what holds once apply has run
        out.append("texts (Apple's states; what the endpoint answers once apply has recorded them):" if applied is None
                   else "texts (Apple's states; what the endpoint answers now):")
        yes, no = ("answered after apply", "not answered after apply") if applied is None else ("answered", "not answered")
        for t in sorted(plan.texts, key=lambda t: (t.message, t.locale)):
            serving = yes if t.serving == t.messageIdentifier else (
                f"{no}; {t.serving} is" if t.serving else no)
            out.append(f"  {t.message} {t.locale:<8} {t.messageIdentifier} {t.state:<12} {serving}")
    out += [f"rejected: {line}" for line in plan.rejected]
    out += [f"waiting: {line}" for line in plan.waiting]
    if plan.kept:
        out.append(f"at Apple, not in the catalog ({len(plan.kept)}; kept, --prune deletes them):")
        out += [f"  {line}" for line in plan.kept]
    out.append(f"realtime URL: {plan.realtime_url or 'none configured'}")
    return "\n".join(out)
