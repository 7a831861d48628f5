"""Message content: Apple's limits, the PNG checks, and the Apple identifiers derived from a text.

Apple's messages carry no locale and are immutable once uploaded, so each locale's text of a
catalog message is uploaded under an identifier derived from what is uploaded: a UUID
version 5 (RFC 9562) of the logical message, the locale and the exact Upload Message body. The
same text always gets the same identifier (a re-run finds it already at Apple), a changed text
gets a new one. Images are identified by their bytes and size kind the same way, so one PNG used
by several messages is uploaded once.

Apple's limits (https://developer.apple.com/documentation/retentionmessaging/uploadmessagerequestbody,
``upload-image``): header 66 characters, body 144, alt text 150, bullet point text 66, at most
5 bullet points, ``headerPosition`` ABOVE_BODY or ABOVE_IMAGE (ABOVE_IMAGE needs an image),
images PNG without transparency, full size 3840 pixels wide and 160 to 2160 high, bullet-point
images 1024 x 1024, at most 2000 messages and 2000 images per app. A switch-plan
(``alternateProduct``) or promotional-offer message takes neither ``image`` nor
``bulletPoints``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.catalog import Catalog, CatalogMessage, ImageRef, MessageText

#: namespace of every identifier derived here (a fixed random UUID: changing it renames every upload)
NAMESPACE = uuid.UUID("6d1f7c52-5e0b-4c8e-9a55-2f0d3c9b8e41")
HEADER_MAX, BODY_MAX, ALT_TEXT_MAX, BULLET_TEXT_MAX, BULLETS_MAX = 66, 144, 150, 66, 5
MAX_MESSAGES = MAX_IMAGES = 2000
FULL_SIZE_WIDTH, FULL_SIZE_HEIGHTS = 3840, (160, 2160)
BULLET_POINT_SIZE = (1024, 1024)
HEADER_POSITIONS = ("ABOVE_BODY", "ABOVE_IMAGE")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class PngInfo:
    """What the PNG checks need: size in pixels and whether the image can be transparent."""

    width: int
    height: int
    transparent: bool


def png_info(data: bytes) -> PngInfo | None:
    """Return the size and transparency of PNG bytes (from IHDR and a tRNS chunk), or None when not a PNG.

    Transparency: colour type 4 or 6 (an alpha channel), or a tRNS chunk (PNG spec, 11.2.2 and 11.3.2.1).
    """
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, _depth, colour = struct.unpack(">IIBB", data[16:26])
    transparent = colour in (4, 6)
    pos = 8
    while pos + 8 <= len(data):  # walk the chunks up to the image data
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        if kind == b"tRNS":
            transparent = True
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return PngInfo(width, height, transparent)


def image_identifier(data: bytes, image_size: str) -> str:
    """Return the Apple imageIdentifier of PNG bytes uploaded as `image_size` (lowercase UUID v5)."""
    return str(uuid.uuid5(NAMESPACE, f"image:{image_size}:{hashlib.sha256(data).hexdigest()}"))


def message_identifier(message: str, locale: str, upload: dict[str, Any]) -> str:
    """Return the Apple messageIdentifier of one locale's text of logical message `message` (lowercase UUID v5)."""
    canonical = json.dumps({"message": message, "locale": locale, "upload": upload}, sort_keys=True,
                           ensure_ascii=False, separators=(",", ":"))
    return str(uuid.uuid5(NAMESPACE, canonical))


@dataclass(frozen=True)
class DesiredImage:
    """An image the catalog needs at Apple."""

    imageIdentifier: str
    file: str
    path: Path
    imageSize: str  # FULL_SIZE or BULLET_POINT
    sha256: str


@dataclass(frozen=True)
class DesiredMessage:
    """One locale's text of a catalog message, as it must be at Apple."""

    messageIdentifier: str
    message: str
    locale: str
    upload: dict[str, Any]  # Apple's UploadMessageRequestBody, JSON names
    imageIdentifiers: tuple[str, ...]


@dataclass
class Desired:
    """Everything the catalog needs at Apple: images, messages (per locale), and its default messages."""

    images: dict[str, DesiredImage]
    messages: dict[str, DesiredMessage]
    #: (productId, locale) -> logical message id
    defaults: dict[tuple[str, str], str]
    problems: list[str]


class _Images:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.cache: dict[tuple[str, str], DesiredImage | str] = {}

    def get(self, ref: ImageRef, size: str) -> DesiredImage | str:
        """Return the image, or one line saying what is wrong with it."""
        key = (ref.file, size)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        self.cache[key] = result = self._load(ref.file, size)
        return result

    def _load(self, file: str, size: str) -> DesiredImage | str:
        path = (self.base_dir / file) if not Path(file).is_absolute() else Path(file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"image {file}: cannot read it ({exc.strerror or type(exc).__name__})"
        info = png_info(data)
        if info is None:
            return f"image {file}: not a PNG file (Apple takes PNG only)"
        if info.transparent:
            return f"image {file}: has transparency (an alpha channel or tRNS); Apple takes PNG without transparency"
        if size == "FULL_SIZE":
            lo, hi = FULL_SIZE_HEIGHTS
            if info.width != FULL_SIZE_WIDTH or not lo <= info.height <= hi:
                return (f"image {file}: {info.width}x{info.height} pixels; a message image must be "
                        f"{FULL_SIZE_WIDTH} wide and {lo} to {hi} high")
        elif (info.width, info.height) != BULLET_POINT_SIZE:
            return (f"image {file}: {info.width}x{info.height} pixels; a bullet-point image must be "
                    f"{BULLET_POINT_SIZE[0]}x{BULLET_POINT_SIZE[1]}")
        return DesiredImage(image_identifier(data, size), file, path, size, hashlib.sha256(data).hexdigest())


def _text_problems(where: str, kind: str, text: MessageText) -> list[str]:
    out = []
    if not text.header.strip():
        out.append(f"{where}: header is empty")
    if len(text.header) > HEADER_MAX:
        out.append(f"{where}: header is {len(text.header)} characters; Apple allows {HEADER_MAX}")
    if not text.body.strip():
        out.append(f"{where}: body is empty")
    if len(text.body) > BODY_MAX:
        out.append(f"{where}: body is {len(text.body)} characters; Apple allows {BODY_MAX}")
    if text.image is not None and len(text.image.altText) > ALT_TEXT_MAX:
        out.append(f"{where}: image altText is {len(text.image.altText)} characters; Apple allows {ALT_TEXT_MAX}")
    if len(text.bulletPoints) > BULLETS_MAX:
        out.append(f"{where}: {len(text.bulletPoints)} bullet points; Apple allows {BULLETS_MAX}")
    for n, b in enumerate(text.bulletPoints, 1):
        if not b.text.strip():
            out.append(f"{where}: bullet point {n} has no text")
        if len(b.text) > BULLET_TEXT_MAX:
            out.append(f"{where}: bullet point {n} text is {len(b.text)} characters; Apple allows {BULLET_TEXT_MAX}")
        if len(b.image.altText) > ALT_TEXT_MAX:
            out.append(f"{where}: bullet point {n} altText is {len(b.image.altText)} characters; Apple allows {ALT_TEXT_MAX}")
    if text.headerPosition is not None and text.headerPosition not in HEADER_POSITIONS:
        out.append(f"{where}: headerPosition {text.headerPosition!r} is not one of {', '.join(HEADER_POSITIONS)}")
    if text.headerPosition == "ABOVE_IMAGE" and text.image is None:
        out.append(f"{where}: headerPosition ABOVE_IMAGE needs an image")
    if kind != "message" and text.image is not None:
        out.append(f"{where}: a {kind} message must have no image (Apple refuses it; Apple falls back to the default)")
    if kind != "message" and text.bulletPoints:
        out.append(f"{where}: a {kind} message must have no bullet points (Apple refuses them; Apple falls back "
                   "to the default)")
    return out


def _upload_body(text: MessageText, image: DesiredImage | None, bullets: list[DesiredImage]) -> dict[str, Any]:
    body: dict[str, Any] = {"header": text.header, "body": text.body}
    if image is not None and text.image is not None:
        body["image"] = {"imageIdentifier": image.imageIdentifier, "altText": text.image.altText}
    if text.bulletPoints:
        body["bulletPoints"] = [{"text": b.text, "imageIdentifier": img.imageIdentifier, "altText": b.image.altText}
                                for b, img in zip(text.bulletPoints, bullets, strict=True)]
    if text.headerPosition is not None:
        body["headerPosition"] = text.headerPosition
    return body


def desired(catalog: Catalog, base_dir: str | Path) -> Desired:
    """Return what the catalog's content needs at Apple, and every problem found, one line each.

    Image files are read relative to `base_dir` (the catalog's folder). A message whose text or
    images have a problem contributes nothing; the problems say why.
    """
    images = _Images(Path(base_dir))
    out = Desired(images={}, messages={}, defaults={}, problems=[])
    for m in catalog.messages.values():
        if m.content is None:
            continue
        for loc, text in sorted(m.content.items()):
            _add_text(out, images, m, loc, text)
    for (pid, loc), m in catalog.defaults.items():
        if m.content is not None:
            if catalog.content_locale(m, loc) is None:
                out.problems.append(f"default for {pid} {loc}: message {m.messageIdentifier} has no text for {loc} "
                                    f"(nor for its language); its texts are {', '.join(sorted(m.content))}")
                continue
            out.defaults[(pid, loc)] = m.messageIdentifier
    if len(out.messages) > MAX_MESSAGES:
        out.problems.append(f"the catalog needs {len(out.messages)} messages at Apple; Apple keeps at most {MAX_MESSAGES}")
    if len(out.images) > MAX_IMAGES:
        out.problems.append(f"the catalog needs {len(out.images)} images at Apple; Apple keeps at most {MAX_IMAGES}")
    return out


def _add_text(out: Desired, images: _Images, m: CatalogMessage, loc: str, text: MessageText) -> None:
    where = f"message {m.messageIdentifier} {loc}"
    problems = _text_problems(where, m.kind, text)
    image: DesiredImage | None = None
    if text.image is not None:
        got = images.get(text.image, "FULL_SIZE")
        if isinstance(got, str):
            problems.append(f"{where}: {got}")
        else:
            image = got
    bullets: list[DesiredImage] = []
    for b in text.bulletPoints:
        got = images.get(b.image, "BULLET_POINT")
        if isinstance(got, str):
            problems.append(f"{where}: {got}")
        else:
            bullets.append(got)
    if problems:
        out.problems += problems
        return
    upload = _upload_body(text, image, bullets)
    used = ([image] if image is not None else []) + bullets
    for img in used:
        out.images.setdefault(img.imageIdentifier, img)
    mid = message_identifier(m.messageIdentifier, loc, upload)
    out.messages[mid] = DesiredMessage(mid, m.messageIdentifier, loc, upload, tuple(i.imageIdentifier for i in used))


def content_problems(catalog: Catalog, base_dir: str | Path) -> list[str]:
    """Return every problem of the catalog's message content against Apple's limits, one line each."""
    return desired(catalog, base_dir).problems
