"""Reading the decision log: decisions, outcomes and feature schemas from its files, their export, training's inputs.

The one module of ``serving`` that ``training`` imports. It reads the SQLite files the server's writers leave
in the data folder (``decisions-<host>-<pid>.sqlite``, one per server process, and the archive
``retention decisions compact`` merges them into: ``serving/log_writer.py``), and through
:func:`training_inputs` the fleet's PostgreSQL log (``serving/pg_log.py``). The row layout is
``serving/log_schema.py``'s.

Every reader takes several files and merges them: a decision held by two files (an archive and the file it
came from, a batch written again after a fault) is read once. A damaged file is read as far as SQLite can
(``on_bad_file`` is told what was skipped); without ``on_bad_file`` it raises ValueError naming the file.
The export writes the decisions file that ``retention train`` reads (docs/data-formats.md).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from serving import pg_log
from serving.log_schema import (
    DECISION_COLUMNS_SQL,
    EXTRA_DECISION_COLUMNS,
    OUTCOME_COLUMNS,
    REQUIRED_DECISION_COLUMNS,
    SCHEMA_VERSION,
    columns_sql,
    decisions_arrow_schema,
    decode_decision,
    decode_json,
    encode_json,
    export_columns,
    export_format,
    prepare_output,
    write_outcomes_file,
)


def log_files(data_dir: str | Path) -> list[Path]:
    """Return every process's decision log file in `data_dir` (and the compacted archive), sorted by name."""
    return sorted(Path(data_dir).glob("decisions-*.sqlite"))


def _open_ro(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ValueError(f"decision log {str(path)!r} does not exist")
    try:
        return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ValueError(f"cannot open the decision log {str(path)!r}: {exc}") from None


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        return [Path(paths)]
    return [Path(p) for p in paths]


#: Told (path, why) about a log file that cannot be read (fully); without one, such a file raises ValueError.
OnBadFile = Callable[[Path, str], None]


def report_bad_file(path: Path, exc: BaseException, on_bad_file: OnBadFile | None) -> None:
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if on_bad_file is None:
        raise ValueError(f"cannot read the decision log {str(path)!r}: {why}") from None
    on_bad_file(path, why)


#: Rows read at a time when salvaging a damaged file (the rowid range probed row by row when it fails).
_SALVAGE_CHUNK = 500
#: Failed ranges in a row after which the rest of a table counts as unreadable (bounds a garbage max(rowid)).
_SALVAGE_MAX_FAILED_RANGES = 2000


def _salvage(
    conn: sqlite3.Connection, table: str, cols: str, decode: Callable[[sqlite3.Row], Any]
) -> tuple[list[Any], int, str]:
    """Read what SQLite can of `table` in a damaged file, a rowid range at a time, row by row where a range fails.

    Returns (decoded rows in rowid order, rows or ranges that could not be read, the last error or "").
    A page SQLite finds malformed, or text that is not UTF-8, costs only the rows stored on it.
    """
    try:
        lo, hi = conn.execute(f"SELECT min(rowid), max(rowid) FROM {table}").fetchone()
    except sqlite3.DatabaseError as exc:
        return [], 1, f"table {table}: {exc}"
    if lo is None:
        return [], 0, ""
    out: list[Any] = []
    lost = 0
    why = ""
    failed_in_a_row = 0
    start = int(lo)
    sql_range = f"SELECT {cols} FROM {table} WHERE rowid >= ? AND rowid < ? ORDER BY rowid"
    sql_one = f"SELECT {cols} FROM {table} WHERE rowid = ?"
    while start <= hi:
        end = start + _SALVAGE_CHUNK
        try:
            out += [decode(r) for r in conn.execute(sql_range, (start, end)).fetchall()]
            failed_in_a_row = 0
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failed_in_a_row += 1
            for rowid in range(start, end):
                try:
                    row = conn.execute(sql_one, (rowid,)).fetchone()
                    if row is not None:
                        out.append(decode(row))
                except Exception:
                    lost += 1
            if failed_in_a_row >= _SALVAGE_MAX_FAILED_RANGES:
                lost += 1
                break
        start = end
    return out, lost, why


def _salvaged(path: Path, table: str, n: int, why: str, on_bad_file: OnBadFile) -> None:
    if n:
        on_bad_file(path, f"{n} unreadable {table} row(s) skipped, the rest read ({why})")


def _order(answered_at: Any, rowid: Any) -> tuple[int, int]:
    return (answered_at if answered_at is not None else -1, rowid)


def _salvage_decisions(
    conn: sqlite3.Connection, path: Path, last: tuple[Any, Any] | None, exc: BaseException, on_bad_file: OnBadFile
) -> Iterator[dict[str, Any]]:
    """Yield, in answered_at order, the decisions of a damaged file read row by row that come after `last`."""
    try:
        cols = columns_sql(conn, "decisions", DECISION_COLUMNS_SQL)
    except sqlite3.DatabaseError as exc2:
        report_bad_file(path, exc2, on_bad_file)
        return
    got, lost, why = _salvage(
        conn, "decisions", f"id, {cols}", lambda r: (_order(r["answered_at"], r["id"]), decode_decision(r))
    )
    if not got and not lost:  # nothing to salvage: the error was elsewhere (say so as it was)
        report_bad_file(path, exc, on_bad_file)
        return
    _salvaged(path, "decision", lost, why or str(exc), on_bad_file)
    got.sort(key=lambda kd: kd[0])
    after = _order(*last) if last is not None else None
    for key, d in got:
        if after is None or key > after:
            yield d


def read_decisions(
    paths: str | Path | Iterable[str | Path], *, batch: int = 5000, on_bad_file: OnBadFile | None = None
) -> Iterator[dict[str, Any]]:
    """Yield every logged decision of the given log files as a dict, in answered_at order across files.

    Vectors are lists, ``policy_params`` a dict, ``features`` a float32 K x F numpy array (or None).
    A decision held by several files (an archive and the file it came from, a batch written again
    after a fault) is yielded once. With `on_bad_file`, a damaged file is read row by row: only the
    rows SQLite cannot read are skipped, and their count is reported; without, ValueError names the file.
    """

    def one(path: Path) -> Iterator[dict[str, Any]]:
        try:
            conn = _open_ro(path)
        except ValueError as exc:
            report_bad_file(path, exc, on_bad_file)
            return
        conn.row_factory = sqlite3.Row
        last: tuple[Any, Any] | None = None  # (answered_at, id) of the last row yielded
        try:
            cols = columns_sql(conn, "decisions", DECISION_COLUMNS_SQL)
            cur = conn.execute(f"SELECT id, {cols} FROM decisions ORDER BY answered_at, id")
            while rows := cur.fetchmany(batch):
                for row in rows:
                    d = decode_decision(row)
                    last = (row["answered_at"], row["id"])
                    yield d
        except (sqlite3.DatabaseError, ValueError) as exc:
            if on_bad_file is None:
                report_bad_file(path, exc, on_bad_file)  # raises
            assert on_bad_file is not None
            yield from _salvage_decisions(conn, path, last, exc, on_bad_file)
        finally:
            conn.close()

    last_at: Any = None
    seen: set[str] = set()
    for d in heapq.merge(*(one(p) for p in _as_paths(paths)), key=lambda d: d["answered_at"]):
        rid = d["request_id"]
        if d["answered_at"] != last_at:  # copies of one decision share its answered_at: a bounded set
            last_at = d["answered_at"]
            seen.clear()
        if rid is not None:
            if rid in seen:
                continue
            seen.add(rid)
        yield d


def latest_decisions(
    paths: str | Path | Iterable[str | Path], n: int, *, on_bad_file: OnBadFile | None = None
) -> list[dict[str, Any]]:
    """Return the `n` most recently answered decisions of the given log files, oldest first.

    With `on_bad_file`, a file that cannot be opened is reported and skipped, and a damaged one read
    row by row (its unreadable rows counted and reported); without, ValueError names the file.
    """
    rows: list[dict[str, Any]] = []
    for path in _as_paths(paths):
        try:
            conn = _open_ro(path)
        except ValueError as exc:
            report_bad_file(path, exc, on_bad_file)
            continue
        conn.row_factory = sqlite3.Row
        try:
            cols = columns_sql(conn, "decisions", DECISION_COLUMNS_SQL)
            sql = f"SELECT id, {cols} FROM decisions ORDER BY answered_at DESC, id DESC LIMIT ?"
            rows += reversed(
                [decode_decision(r) for r in conn.execute(sql, (n,))]
            )  # oldest first, so ties keep log order
        except (sqlite3.DatabaseError, ValueError) as exc:
            if on_bad_file is None:
                report_bad_file(path, exc, on_bad_file)  # raises
            assert on_bad_file is not None
            rows += list(_salvage_decisions(conn, path, None, exc, on_bad_file))[-n:]
        finally:
            conn.close()
    rows.sort(key=lambda d: d["answered_at"] if d["answered_at"] is not None else -1)
    return rows[-n:] if n > 0 else []


def _query_each(
    paths: str | Path | Iterable[str | Path],
    sql: str | Callable[[sqlite3.Connection], str],
    on_bad_file: OnBadFile | None,
    salvage: tuple[str, Callable[[sqlite3.Connection], str]] | None = None,
) -> Iterator[sqlite3.Row]:
    """Yield the rows of `sql` (or of ``sql(conn)``) in each file; a file that fails is reported (rows read before kept).

    With `salvage` (table, its columns) and `on_bad_file`, a damaged file's table is then read row by
    row: every readable row is yielded (again: callers keep one per key) and the unreadable ones counted.
    """
    for path in _as_paths(paths):
        try:
            conn = _open_ro(path)
        except ValueError as exc:
            report_bad_file(path, exc, on_bad_file)
            continue
        conn.row_factory = sqlite3.Row
        try:
            yield from conn.execute(sql if isinstance(sql, str) else sql(conn))
        except sqlite3.DatabaseError as exc:
            if salvage is None or on_bad_file is None:
                report_bad_file(path, exc, on_bad_file)
                continue
            table, cols = salvage
            try:
                got, lost, why = _salvage(conn, table, cols(conn), lambda r: r)
            except sqlite3.DatabaseError as exc2:
                report_bad_file(path, exc2, on_bad_file)
                continue
            if not got and not lost:
                report_bad_file(path, exc, on_bad_file)
            _salvaged(path, table.rstrip("s").replace("_schema", " schema"), lost, why or str(exc), on_bad_file)
            yield from got
        finally:
            conn.close()


def _outcome_columns(conn: sqlite3.Connection) -> str:  # a file made earlier lacks the added columns
    return columns_sql(conn, "outcomes", ", ".join(OUTCOME_COLUMNS))


def read_outcomes(
    paths: str | Path | Iterable[str | Path], *, on_bad_file: OnBadFile | None = None
) -> list[dict[str, Any]]:
    """Return the outcomes of the given log files, one per notification UUID (first received), sorted by ``at``.

    With `on_bad_file`, a damaged file is read row by row (unreadable rows counted and reported).
    """
    seen: dict[str, dict[str, Any]] = {}

    def sql(conn: sqlite3.Connection) -> str:
        return f"SELECT {_outcome_columns(conn)} FROM outcomes"

    for row in _query_each(paths, sql, on_bad_file, salvage=("outcomes", _outcome_columns)):
        d = dict(row)
        prev = seen.get(d["notification_uuid"])
        if prev is None or (d["received_at"] or 0) < (prev["received_at"] or 0):
            seen[d["notification_uuid"]] = d
    return sorted(seen.values(), key=lambda d: (d["at"], d["notification_uuid"]))


def feature_schemas(
    paths: str | Path | Iterable[str | Path], *, on_bad_file: OnBadFile | None = None
) -> dict[str, list[str]]:
    """Return {feature_names_sha: feature names} recorded in the given log files (damaged ones read row by row)."""
    rows = _query_each(
        paths, "SELECT sha, names FROM feature_schemas", on_bad_file, salvage=("feature_schemas", lambda c: "sha, names")
    )
    return {row["sha"]: decode_json(row["names"]) for row in rows}


def decisions_frame(paths: str | Path | Iterable[str | Path]) -> Any:
    """Return the logged decisions of the given files as a pandas DataFrame (export columns, answered_at order)."""
    import pandas as pd

    rows = list(read_decisions(paths))
    return pd.DataFrame(rows, columns=list(REQUIRED_DECISION_COLUMNS + EXTRA_DECISION_COLUMNS))


def outcomes_frame(paths: str | Path | Iterable[str | Path]) -> Any:
    """Return the logged outcomes of the given files as a pandas DataFrame (:data:`OUTCOME_COLUMNS`, ``at`` order)."""
    import pandas as pd

    return pd.DataFrame(read_outcomes(paths), columns=list(OUTCOME_COLUMNS))


def _ignore(path: Path, why: str) -> None:
    """An on_bad_file that says nothing: for figures whose file is reported by the read that follows."""


def _count(paths: list[Path], table: str, on_bad_file: OnBadFile | None = None) -> int:
    return sum(int(r[0]) for r in _query_each(paths, f"SELECT count(*) FROM {table}", on_bad_file))


def count_unanswered(paths: str | Path | Iterable[str | Path], *, on_bad_file: OnBadFile | None = None) -> int:
    """Return how many logged requests of the given log files were answered with no message (404).

    With `on_bad_file`, a damaged file is read row by row and its readable rows counted.
    """
    sql = "SELECT message_id FROM decisions WHERE message_id IS NULL"
    return sum(
        1
        for r in _query_each(paths, sql, on_bad_file, salvage=("decisions", lambda c: "message_id"))
        if r["message_id"] is None
    )


def export_decisions(
    db_paths: Sequence[str | Path],
    out: str | Path,
    *,
    progress: bool = False,
    chunk: int = 20_000,
    shown_only: bool = False,
    on_bad_file: OnBadFile | None = None,
) -> int:
    """Return the number of decisions written from the log files `db_paths` to `out` (Parquet or CSV by suffix).

    Columns: the decisions file's required columns (docs/data-formats.md), then the server's own (scores, values, probabilities,
    features, policy parameters, catalog hash...). In CSV, list and dict columns are JSON text. The
    Parquet file's metadata holds the feature names of every ``feature_names_sha`` seen.
    `shown_only` leaves out the requests answered with no message (404 no_eligible_message); by
    default they are written with policy ``apple_fallback`` (Apple showed its own message), which
    ``retention evaluate`` reports as its own arm and ``retention train`` leaves out.
    With `on_bad_file`, a log file that cannot be read (corrupt, not a log) is reported and the rest
    exported (with what could be read of it); without, ValueError names it and nothing is written.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    fmt = export_format(out)
    paths = _as_paths(db_paths)
    if not paths:
        raise ValueError("no decision log files to export (looked for decisions-*.sqlite)")
    total = _count(paths, "decisions", _ignore if on_bad_file else None)
    schema = decisions_arrow_schema()
    names = [f.name for f in schema]
    schemas = feature_schemas(paths, on_bad_file=on_bad_file)
    tmp = prepare_output(out)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="decision", desc="export", file=sys.stderr, disable=True if total < 50_000 else None)
    written = 0
    writer: Any = None
    try:
        if fmt == "parquet":
            meta = {
                b"retention.feature_schemas": encode_json(schemas),
                b"retention.schema_version": str(SCHEMA_VERSION).encode(),
            }
            writer = pq.ParquetWriter(tmp, schema.with_metadata(meta))
        rows_iter = read_decisions(paths, on_bad_file=on_bad_file)
        first = True
        while True:
            raw = list(itertools.islice(rows_iter, chunk))
            if not raw and not first:
                break
            rows = [d for d in raw if d["message_id"] is not None] if shown_only else raw
            cols = export_columns(rows, names)
            if fmt == "parquet":
                writer.write_table(pa.table(cols, schema=schema))
            else:
                frame = pd.DataFrame(cols, columns=names)
                for n in ("candidates", "scores", "values", "probabilities", "features"):
                    frame[n] = [None if v is None else encode_json(v).decode() for v in frame[n]]
                frame.to_csv(tmp, mode="w" if first else "a", header=first, index=False)
            first = False
            written += len(rows)
            if bar is not None:
                bar.update(len(raw))
            if not raw:
                break
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return written


def export_outcomes(
    db_paths: Sequence[str | Path], out: str | Path, *, on_bad_file: OnBadFile | None = None
) -> int:
    """Return the number of outcomes written from the log files `db_paths` to `out` (Parquet or CSV), one per notification."""
    prepare_output(Path(out))  # a bad name or an unwritable place is refused before the logs are read
    return write_outcomes_file(read_outcomes(db_paths, on_bad_file=on_bad_file), out)


def read_decisions_file(path: str | Path) -> Any:
    """Return an exported decisions file (Parquet or CSV) as a DataFrame, list columns decoded from CSV's JSON."""
    import pandas as pd

    path = Path(path)
    if export_format(path) == "parquet":
        return pd.read_parquet(path)
    frame = pd.read_csv(
        path,
        dtype={"request_id": str, "original_transaction_id": str, "message_id": str, "model_version": str},
        keep_default_na=False,
        na_values=[""],
    )
    for n in ("candidates", "scores", "values", "probabilities", "features"):
        if n in frame.columns:
            frame[n] = [None if not isinstance(v, str) else decode_json(v) for v in frame[n]]
    return frame


def source(value: str) -> str | Path:
    """argparse type of a training input: a ``postgresql://`` URL (kept as text) or a file path."""
    return value if value.startswith(("postgresql://", "postgres://")) else Path(value)


@contextlib.contextmanager
def training_inputs(decisions: str | Path, outcomes: str | Path) -> Iterator[tuple[Path, Path]]:
    """Yield (decisions file, outcomes file) for ``retention train`` / ``evaluate``; a database URL is exported first.

    A URL's decisions (the 404s included, policy ``apple_fallback``, as ``retention decisions export`` writes by default) and
    outcomes are streamed into temporary Parquet files, removed afterwards; a path is yielded as it is.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="retention-db-export-") as tmp:
        d, o = decisions, outcomes
        if isinstance(d, str):
            d = Path(tmp) / "decisions.parquet"
            pg_log.export_decisions(str(decisions), d)
        if isinstance(o, str):
            o = Path(tmp) / "outcomes.parquet"
            pg_log.export_outcomes(str(outcomes), o)
        yield Path(d), Path(o)
