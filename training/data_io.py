"""Reading and writing the training data files (docs/data-formats.md), with validation.

Parquet or CSV, chosen by the file's suffix (``.parquet``/``.pq``, ``.csv``, optionally
``.csv.gz``). In CSV the ``candidates`` column holds a JSON list of message ids, so a
file round-trips between the two formats. Identifiers (transaction ids, request ids,
message ids, locales) are always read as strings: Apple's transaction ids look numeric,
and a CSV reader that turned them into integers would break the joins.

Every problem is a :class:`DataError` whose message is one sentence naming the file and,
for a bad value, the first offending row, so the CLI can print it as its one error line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.data_files import APPLE_FALLBACK_POLICY, DECISION_COLUMNS, EVENTS, OUTCOME_COLUMNS

# Columns that are identifiers or labels and must stay strings whatever they look like.
_STRING_COLUMNS: tuple[str, ...] = (
    "request_id",
    "original_transaction_id",
    "product_id",
    "user_locale",
    "environment",
    "message_id",
    "model_version",
    "policy",
    "event",
    "offer_identifier",
    "raw_type",
    "raw_subtype",
)
# Columns holding a list per row; JSON text in CSV. ``candidates`` becomes a Python list of ids;
# the server log's numeric lists (one entry per candidate, or the logged feature row) become
# float arrays, as Parquet gives them, whichever the format.
_LIST_COLUMNS: tuple[str, ...] = ("candidates",)
_NUMERIC_LIST_COLUMNS: tuple[str, ...] = ("scores", "values", "probabilities", "features")


class DataError(ValueError):
    """A data file is unreadable or breaks the format; the message names the file and the problem."""


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataError(f"{path}: unknown file format (expected a .parquet or .csv file)")


def _parse_list(value: object, path: Path, column: str, row: int) -> object:
    """Return a list cell as a Python list: JSON text (CSV) is parsed, arrays (Parquet) converted."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise DataError(f"{path}: row {row + 1}: column {column!r} is not a JSON list: {value[:60]!r}") from None


def _numeric_list(value: object) -> object:
    """Return a parsed JSON list of numbers as a float array (None stays None)."""
    if isinstance(value, list):
        return np.array([np.nan if v is None else v for v in value], dtype=np.float64)
    return value


def read_table(path: str | Path) -> pd.DataFrame:
    """Return the table in a Parquet or CSV file, identifiers as strings and list columns as lists."""
    p = Path(path)
    fmt = _format_of(p)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a data file")
    try:
        if fmt == "parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, dtype={c: str for c in _STRING_COLUMNS}, keep_default_na=True)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{p}: cannot read it as {fmt}: {first}") from None
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{p}: cannot read it as {fmt}: {first}") from None
    for column in _LIST_COLUMNS:
        if column in df.columns:
            df[column] = [_parse_list(v, p, column, i) for i, v in enumerate(df[column].tolist())]
    if fmt == "csv":
        for column in _NUMERIC_LIST_COLUMNS:
            if column in df.columns:
                df[column] = [_numeric_list(_parse_list(v, p, column, i)) for i, v in enumerate(df[column].tolist())]
    for column in _STRING_COLUMNS:
        # Parquet written by other tools may carry integer ids; normalise them like CSV.
        if column in df.columns and not (pd.api.types.is_string_dtype(df[column]) or df[column].dtype == object):
            df[column] = df[column].astype("str")
    return df


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write a table as Parquet or CSV (by suffix); list columns become JSON text in CSV."""
    p = Path(path)
    fmt = _format_of(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        out = df
        for column in _LIST_COLUMNS:
            if column in out.columns:
                out = out.copy() if out is df else out
                out[column] = [list(v) if isinstance(v, np.ndarray | tuple) else v for v in out[column].tolist()]
        out.to_parquet(p, index=False)
    else:
        out = df.copy()
        for column in (*_LIST_COLUMNS, *_NUMERIC_LIST_COLUMNS):
            if column in out.columns:
                out[column] = [json.dumps(_plain(v)) if _is_listlike(v) else v for v in out[column].tolist()]
        out.to_csv(p, index=False)


def _plain(value: list | tuple | np.ndarray) -> list:
    """Return a list of plain Python values (numpy scalars and NaN made JSON-safe)."""
    items = value.tolist() if isinstance(value, np.ndarray) else list(value)
    return [None if isinstance(v, float) and v != v else v for v in items]


def _is_listlike(value: object) -> bool:
    return isinstance(value, list | tuple | np.ndarray)


def _require_columns(df: pd.DataFrame, required: tuple[str, ...], path: Path, what: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: the {what} file lacks column(s) {', '.join(missing)}")


def _first_bad(mask: np.ndarray) -> int | None:
    """Return the position of the first True in a boolean mask, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _shown(value: Any) -> str:
    """Return `value` as an error message shows it: a numpy number plainly (1.5, not np.float64(1.5)), text quoted."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _row_name(df: pd.DataFrame, pos: int, key: str) -> str:
    """Return 'row N (key=value)' for error messages; N counts data rows from 1."""
    if key in df.columns:
        return f"row {pos + 1} ({key} {_shown(df[key].iloc[pos])})"
    return f"row {pos + 1}"


def _require_strings(df: pd.DataFrame, columns: tuple[str, ...], path: Path, key: str) -> None:
    for column in columns:
        bad = _first_bad(df[column].isna().to_numpy())
        if bad is not None:
            raise DataError(f"{path}: {_row_name(df, bad, key)}: {column} is missing")


_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: a later "time" is an error in the file, not a date


def _require_ms(df: pd.DataFrame, column: str, path: Path, key: str) -> None:
    """Convert a millisecond timestamp column to int64 in place, or raise naming the first bad row."""
    values = pd.to_numeric(df[column], errors="coerce")
    arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = _first_bad(~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr > _MAX_MS))
    if bad is not None:
        raise DataError(f"{path}: {_row_name(df, bad, key)}: {column} {_shown(df[column].iloc[bad])} is not a time in ms "
                        "(ms since 1970, up to the year 9999)")
    df[column] = values.astype(np.int64)


def check_requests(df: pd.DataFrame, path: Path) -> None:
    """Check the request columns every reader of logged requests needs (in place: signed_date becomes int64).

    Raises DataError naming the first bad row: ids that are not text, a ``request_id`` given twice (an
    export appended twice would weigh its decisions twice, or score one of two requests only), a
    ``signed_date`` that is not a time in ms from 1970 to the year 9999. `df` has a fresh RangeIndex.
    """
    _require_strings(df, ("request_id", "original_transaction_id", "product_id", "user_locale"), path, "request_id")
    dup = _first_bad(df["request_id"].duplicated().to_numpy())
    if dup is not None:
        raise DataError(
            f"{path}: {_row_name(df, dup, 'request_id')}: request_id appears more than once (a decision is logged "
            "once; was an export appended twice?)"
        )
    _require_ms(df, "signed_date", path, "request_id")


def read_decisions(path: str | Path) -> pd.DataFrame:
    """Return a validated decisions table (extra columns are kept), or raise DataError naming the first bad row.

    Each ``request_id`` must appear once: a file holding an export twice would weigh its decisions twice.
    """
    p = Path(path)
    df = read_table(p)
    _require_columns(df, DECISION_COLUMNS, p, "decisions")
    df = df.reset_index(drop=True)
    check_requests(df, p)
    # a request answered with no message (404) is Apple's choice: logged with policy apple_fallback, it
    # has no shown message and may have no candidate; every other row must name the message it showed
    unanswered = (df["message_id"].isna() & (df["policy"].astype("str") == APPLE_FALLBACK_POLICY)).to_numpy()
    bad = _first_bad(df["message_id"].isna().to_numpy() & ~unanswered)
    if bad is not None:
        raise DataError(
            f"{p}: {_row_name(df, bad, 'request_id')}: message_id is missing (only a request answered with no "
            f"message, policy {APPLE_FALLBACK_POLICY}, may have none)"
        )
    prop = pd.to_numeric(df["propensity"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = _first_bad(~((prop > 0.0) & (prop <= 1.0)))
    if bad is not None:
        raise DataError(
            f"{p}: {_row_name(df, bad, 'request_id')}: propensity {_shown(df['propensity'].iloc[bad])} is outside (0, 1]"
        )
    df["propensity"] = prop
    candidates = df["candidates"].tolist()
    ok_list = np.fromiter((isinstance(c, list) and len(c) > 0 for c in candidates), dtype=bool, count=len(df))
    ok_list |= unanswered & np.fromiter((isinstance(c, list) or c is None for c in candidates), dtype=bool, count=len(df))
    bad = _first_bad(~ok_list)
    if bad is not None:
        raise DataError(f"{p}: {_row_name(df, bad, 'request_id')}: candidates must be a non-empty list of message ids")
    shown = df["message_id"].tolist()
    in_list = np.fromiter((isinstance(c, list) and m in c for m, c in zip(shown, candidates, strict=True)), dtype=bool, count=len(df))
    bad = _first_bad(~(in_list | unanswered))
    if bad is not None:
        raise DataError(
            f"{p}: {_row_name(df, bad, 'request_id')}: message_id {shown[bad]!r} is not in its own candidates"
        )
    return df


def read_outcomes(path: str | Path) -> pd.DataFrame:
    """Return a validated outcome-events table (``at`` as int64 ms), or raise DataError naming the first bad row."""
    p = Path(path)
    df = read_table(p)
    _require_columns(df, OUTCOME_COLUMNS, p, "outcomes")
    df = df.reset_index(drop=True)
    _require_strings(df, ("original_transaction_id",), p, "original_transaction_id")
    known = df["event"].isin(EVENTS).to_numpy()
    bad = _first_bad(~known)
    if bad is not None:
        raise DataError(
            f"{p}: {_row_name(df, bad, 'original_transaction_id')}: unknown event {_shown(df['event'].iloc[bad])} "
            f"(expected one of {', '.join(EVENTS)})"
        )
    _require_ms(df, "at", p, "original_transaction_id")
    return df


def read_profiles(path: str | Path) -> pd.DataFrame:
    """Return a subscriber-profiles table keyed by a unique ``original_transaction_id``, or raise DataError."""
    p = Path(path)
    df = read_table(p)
    _require_columns(df, ("original_transaction_id",), p, "profiles")
    df = df.reset_index(drop=True)
    _require_strings(df, ("original_transaction_id",), p, "original_transaction_id")
    dup = _first_bad(df["original_transaction_id"].duplicated().to_numpy())
    if dup is not None:
        raise DataError(
            f"{p}: {_row_name(df, dup, 'original_transaction_id')}: original_transaction_id appears more than once"
        )
    return df
