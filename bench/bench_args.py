"""Argument types shared by the benchmark scripts: a bad value is one line and exit status 2, never a traceback.

Each returns an ``argparse`` type (a callable that raises ``argparse.ArgumentTypeError`` with the reason).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retention import int_in
from training.simulate import PRESETS

__all__ = ["json_out", "preset_list", "read_runs", "share_list", "size_list"]


def preset_list(text: str) -> list[str]:
    """Comma-separated simulator presets, each one of training.simulate.PRESETS; at least one."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one preset")
    unknown = [p for p in names if p not in PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown preset {unknown[0]!r}; one of {', '.join(PRESETS)}")
    return names


def size_list(low: int) -> Callable[[str], list[int]]:
    """Comma-separated whole numbers, each at least `low`; at least one."""
    one = int_in(low)

    def parse(text: str) -> list[int]:
        values = [one(s.strip()) for s in text.split(",") if s.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one number")
        return values

    return parse


def share_list(text: str) -> list[float]:
    """Comma-separated shares in (0, 1]; at least one."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"shares must be in (0, 1], not {text!r}")
    return values


def json_out(text: str) -> Path:
    """A results file that can be written, checked before the bench runs (not after an hour of it); nothing is created.

    A plain file (new or to replace) in a folder this process may write; its partial results go beside it.
    """
    import os

    path = Path(text)
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a plain file (a folder, a device); give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}: permission denied")
    return path


def read_runs(path: Path) -> Any:
    """Return the JSON a bench wrote to `path`; ValueError (one line) when it cannot be read as such."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {(exc.strerror or str(exc)).lower()}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a bench's JSON file ({exc})") from None
