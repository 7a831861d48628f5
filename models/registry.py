"""The model registry: versions on disk, a `current` pointer, promote and rollback.

Layout of a registry folder::

    REGISTRY/
      current                 the serving version's id (one line, replaced atomically)
      history.json            promotions, oldest first: [{"version", "at"}]; rollback pops the last
      20261128T211500Z-a1b2c3/
        model.onnx
        manifest.json         version, created, featurizer version, feature schema and its sha256,
                              training data summary, metrics, parity, onnx_sha256, library versions,
                              hyperparameters
        model_card.md

A version folder is written under a temporary name and renamed into place, so a reader
never sees half a version; version ids sort by creation time. Loading checks that every
file is there, that model.onnx has the manifest's sha256 and that the featurizer version
is this code's, and refuses with a sentence that names the check that failed.

This module imports nothing heavier than numpy (through models.features): serving uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.features import FEATURIZER_VERSION, FeatureSchema

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "model_card.md"
CURRENT_FILE = "current"
HISTORY_FILE = "history.json"
ALIASES = ("current", "latest")  # accepted wherever a version id is taken
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "registry"  # in the checkout, git-ignored
_VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def registry_spec(arg: str | Path | None) -> str:
    """Return the registry the commands use: `arg` (``--registry``), else ``$RETENTION_MODEL``, else the checkout's.

    The result may end in ``@VERSION`` (a pin); :meth:`Registry.parse` splits it off. (An empty
    ``--registry`` never gets here: every verb's parser refuses an empty value.)
    """
    return str(arg or os.environ.get("RETENTION_MODEL") or DEFAULT_REGISTRY)


class RegistryError(Exception):
    """A registry operation failed (no such version, nothing to roll back to); the message says which."""


class ModelLoadError(RegistryError):
    """A model version cannot be loaded; the message names the failed check."""


@dataclass(frozen=True)
class LoadedModel:
    """A verified model version: its id, manifest, feature schema and ONNX file."""

    version: str
    manifest: dict[str, Any]
    schema: FeatureSchema
    onnx_path: Path


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_version_id(now: float | None = None) -> str:
    """Return a fresh, sortable version id such as ``20261128T211500Z-a1b2c3``."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return f"{t.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


LOCK_FILE = ".lock"
_UNCHECKED = object()  # promote's expect_current when no check is asked for


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the registry's lock (an exclusive ``flock`` on ``REGISTRY/.lock``) for a read-modify-write.

    Promote, rollback, prune and writing a version take it, so two commands never interleave their
    reads of ``current`` and ``history.json`` with each other's writes (a prune deleting the version
    a promote just made current, a promotion lost from the history). Readers (serving, ``load``)
    do not need it: every file is replaced atomically.
    """
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another command holds it: say what we wait for, then wait
            print(f"waiting for {root / LOCK_FILE}: another retention command is changing this registry",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Registry:
    """A folder of model versions with a `current` pointer (see the module docstring)."""

    rolled_back_from: str | None = None  # the version the last rollback() replaced

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def parse(spec: str | Path) -> tuple[Registry, str | None]:
        """Return (registry, pinned version or None) for ``DIR`` or ``DIR@VERSION``."""
        text = str(spec)
        head, sep, tail = text.rpartition("@")
        if sep and tail and "/" not in tail and os.sep not in tail:
            return Registry(head), tail
        return Registry(text), None

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ---- reading ------------------------------------------------------------------------
    def require_folder(self) -> None:
        """Raise RegistryError when the registry folder does not exist (a typo should not read as empty)."""
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise RegistryError(f"model registry folder {self.root} {what}")

    def require_creatable(self) -> None:
        """Raise RegistryError unless the registry folder exists or can be made where it is named.

        Checked before a long job writes into it (training): a file in its place or above it, or a
        broken symbolic link, would otherwise fail only at the end.
        """
        root = self.root
        if root.is_symlink() and not root.exists():
            raise RegistryError(f"model registry folder {root} is a broken symbolic link")
        if root.exists():
            self.require_folder()
            return
        for parent in root.parents:
            if parent.is_symlink() and not parent.exists():
                raise RegistryError(f"model registry folder {root} cannot be made: {parent} is a broken symbolic link")
            if parent.exists():
                if not parent.is_dir():
                    raise RegistryError(f"model registry folder {root} cannot be made: {parent} is not a folder")
                return

    def resolve(self, version: str) -> str:
        """Return the version id `version` names: ``current``, ``latest`` (the newest written) or an id as is.

        Raises ModelLoadError when an alias names nothing (no promoted version, an empty registry).
        """
        if version == "current":
            cur = self.current()
            if cur is None:
                raise ModelLoadError(f"registry {self.root} has no current model version")
            return cur
        if version == "latest":
            versions = self.versions()
            if not versions:
                raise ModelLoadError(f"registry {self.root} has no model version")
            return versions[-1]
        return version

    def versions(self) -> list[str]:
        """Return the version ids in the registry, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
        )

    def current(self) -> str | None:
        """Return the current version id, or None when nothing was promoted."""
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, OSError) as exc:
            why = "not text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc)).lower()
            raise RegistryError(f"registry pointer {self.root / CURRENT_FILE} is unreadable ({why}); "
                                "retention models promote VERSION rewrites it") from None
        return text or None

    def history(self) -> list[dict[str, Any]]:
        """Return the promotion history, oldest first (each entry: version, at)."""
        try:
            data = json.loads((self.root / HISTORY_FILE).read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise RegistryError(f"registry history {self.root / HISTORY_FILE} is unreadable: {exc}") from None
        return list(data) if isinstance(data, list) else []

    def manifest(self, version: str) -> dict[str, Any]:
        """Return a version's manifest (`version` may be an alias); raises ModelLoadError when missing or malformed."""
        version = self.resolve(version)
        folder = self._folder(version)
        path = folder / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"model {version}: missing file {MANIFEST_FILE}") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {version}: bad manifest ({exc})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"model {version}: bad manifest (not a JSON object)")
        return data

    def _folder(self, version: str) -> Path:
        version = self.resolve(version)
        if not version or "/" in version or version.startswith("."):
            raise ModelLoadError(f"{version!r} is not a model version id")
        folder = self.root / version
        if not folder.is_dir():
            raise ModelLoadError(f"model {version}: no such version in registry {self.root}")
        return folder

    def load(self, version: str | None = None) -> LoadedModel:
        """Return the verified model `version` (default: current); raises ModelLoadError naming the failed check."""
        if version is None:
            version = self.current()
            if version is None:
                raise ModelLoadError(f"registry {self.root} has no current model version")
        version = self.resolve(version)
        folder = self._folder(version)
        manifest = self.manifest(version)
        onnx_path = folder / MODEL_FILE
        if not onnx_path.is_file():
            raise ModelLoadError(f"model {version}: missing file {MODEL_FILE}")
        for key in ("featurizer_version", "feature_schema", "onnx_sha256"):
            if key not in manifest:
                raise ModelLoadError(f"model {version}: bad manifest (no {key!r})")
        theirs = str(manifest["featurizer_version"])
        if theirs != FEATURIZER_VERSION:
            raise ModelLoadError(
                f"model {version}: featurizer version differs (ours {FEATURIZER_VERSION}, model's {theirs}); "
                "retrain it with this code"
            )
        actual = sha256_file(onnx_path)
        if actual != manifest["onnx_sha256"]:
            raise ModelLoadError(
                f"model {version}: sha256 mismatch for {MODEL_FILE} (manifest {str(manifest['onnx_sha256'])[:12]}…, "
                f"file {actual[:12]}…): the file was changed or corrupted"
            )
        try:
            schema = FeatureSchema.from_dict(manifest["feature_schema"])
        except ValueError as exc:
            raise ModelLoadError(f"model {version}: bad manifest (feature schema: {exc})") from None
        want = manifest.get("feature_schema_sha256")
        if want is not None and want != schema.sha256():
            raise ModelLoadError(f"model {version}: bad manifest (feature schema does not match its sha256)")
        return LoadedModel(version=version, manifest=manifest, schema=schema, onnx_path=onnx_path)

    # ---- writing ------------------------------------------------------------------------
    def write_version(
        self, onnx_bytes: bytes, manifest: dict[str, Any], card_md: str, extra_files: dict[str, bytes] | None = None
    ) -> str:
        """Return the id of a new version holding these files, written atomically (not promoted).

        `extra_files` (plain file names to bytes) are written beside the model, e.g. the
        hashes of the request ids it was trained on.
        """
        extra = dict(extra_files or {})
        for name in extra:
            if not name or "/" in name or name.startswith(".") or name in (MODEL_FILE, MANIFEST_FILE, CARD_FILE):
                raise RegistryError(f"{name!r} is not an allowed extra file name")
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root):
            return self._write_version_locked(onnx_bytes, manifest, card_md, extra)

    def _write_version_locked(
        self, onnx_bytes: bytes, manifest: dict[str, Any], card_md: str, extra: dict[str, bytes]
    ) -> str:
        # ids must sort by creation: within one second, draw again until this one sorts after the newest
        newest = max(self.versions() + [p.name[5:] for p in self.root.glob(".tmp-*")], default="")
        version = new_version_id()
        while version <= newest or (self.root / version).exists():
            if version[:16] < newest[:16] and not (self.root / version).exists():
                break  # the clock went back: keep the id rather than wait for it
            version = new_version_id()
        data = dict(manifest)
        data["version"] = version
        data.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
        data["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
        data.setdefault("featurizer_version", FEATURIZER_VERSION)
        tmp = self.root / f".tmp-{version}"
        tmp.mkdir()
        try:
            (tmp / MODEL_FILE).write_bytes(onnx_bytes)
            (tmp / MANIFEST_FILE).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
            (tmp / CARD_FILE).write_text(card_md.replace("{version}", version))
            for name, data_bytes in extra.items():
                (tmp / name).write_bytes(data_bytes)
            for name in (MODEL_FILE, MANIFEST_FILE, CARD_FILE, *extra):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, self.root / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def promote(self, version: str, *, expect_current: object = _UNCHECKED) -> str | None:
        """Make `version` (an id or alias) current after verifying it loads, record it in the history, and
        return the version that was current before (read under the lock: right even among concurrent promotions).

        With `expect_current` (a version id, or None for "no current version"), refuse with
        RegistryError when the current version is another one by then: a promotion judged against one
        version (``promote --if-better``) must not replace a version that was promoted meanwhile.
        """
        with _locked(self.root):
            cur = self.current()
            if expect_current is not _UNCHECKED and cur != expect_current:
                raise RegistryError(
                    f"the current version changed from {expect_current or 'none'} to {cur or 'none'} while "
                    f"{version} was judged against it; nothing promoted (judge it again against {cur or 'none'})"
                )
            self._promote_locked(version)
            return cur

    def _promote_locked(self, version: str) -> None:
        version = self.load(version).version
        hist = self.history()
        if not hist or hist[-1].get("version") != version:
            hist.append({"version": version, "at": datetime.now(UTC).isoformat(timespec="seconds")})
        _write_atomic(self.root / HISTORY_FILE, (json.dumps(hist, indent=1) + "\n").encode())
        _write_atomic(self.root / CURRENT_FILE, (version + "\n").encode())

    def rollback(self) -> str:
        """Return the version made current again: the one promoted before the current one.

        The version it replaced, read under the lock, is left in :attr:`rolled_back_from`.
        """
        with _locked(self.root):
            self.rolled_back_from = self.current()
            return self._rollback_locked()

    def _rollback_locked(self) -> str:
        hist = self.history()
        cur = self.current()
        # drop entries at the end that are the current version, then the previous one is the target
        while hist and hist[-1].get("version") == cur:
            hist.pop()
        while hist and not (self.root / str(hist[-1].get("version"))).is_dir():
            hist.pop()
        if not hist:
            if cur is None:
                raise RegistryError(f"nothing to roll back to: registry {self.root} has no promoted version")
            raise RegistryError(f"nothing to roll back to: the promotion history holds no version before {cur} "
                                "(each rollback steps back once)")
        target = str(hist[-1]["version"])
        self.load(target)
        _write_atomic(self.root / HISTORY_FILE, (json.dumps(hist, indent=1) + "\n").encode())
        _write_atomic(self.root / CURRENT_FILE, (target + "\n").encode())
        return target


    def prune(self, keep: int, *, protect: tuple[str | None, ...] = ()) -> list[str]:
        """Delete all but the newest `keep` versions; return the ids deleted, oldest first.

        The current version and every id in `protect` (a shadow version) are never deleted and do
        not count toward `keep`'s newest. The newest version is always kept (``keep`` >= 1): a server
        pinned at ``DIR@latest`` serves it. A version is renamed away before it is removed, so a reader
        never sees half a version. Raises RegistryError when `keep` < 1.
        """
        if keep < 1:
            raise RegistryError(f"--keep must be 1 or more (the newest version is always kept), not {keep}")
        with _locked(self.root):  # `current` cannot move to a version while it is being deleted
            kept = {v for v in (self.current(), *protect) if v}
            candidates = [v for v in self.versions() if v not in kept]
            doomed = candidates[: max(0, len(candidates) - keep)]
            for version in doomed:
                tmp = self.root / f".del-{version}"
                os.rename(self.root / version, tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        return doomed


def is_version_id(text: str) -> bool:
    """Return True when `text` has the shape of a version id made by :func:`new_version_id`."""
    return bool(_VERSION_RE.match(text))


__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "Registry",
    "RegistryError",
    "is_version_id",
    "new_version_id",
    "registry_spec",
    "sha256_file",
]
