"""The developer's subscriber profiles in an embedded SQLite store, one keyed read per request.

``retention profiles import FILE`` loads a Parquet or CSV table keyed by ``original_transaction_id``
into ``DATA_DIR/profiles.sqlite``. The new database is written beside the old one under a temporary
name and moved over it with ``os.replace``, so a reader sees the old table or the new one, whole,
never a half-written one. The server's :class:`ProfileStore` keeps a read-only connection and notices a
replaced file by its inode, size and mtime, checked at most once a second (one ``stat``; the
old connection keeps reading the old, unlinked file until then, so no lookup ever fails).
Opening it ``immutable=1`` measured no faster (``bench/building_blocks.py``), so the store
keeps SQLite's ordinary locking, which also stays correct if someone edits the file in place.

Numeric columns (ints, floats, booleans) are stored as REAL, every other column as TEXT; the
store reports which is which so the featurizer can treat them accordingly.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("retention.profiles")

KEY = "original_transaction_id"
DB_NAME = "profiles.sqlite"
_CHUNK = 20_000


def profiles_path(data_dir: str | Path) -> Path:
    """Return the profile store's path inside `data_dir`."""
    return Path(data_dir) / DB_NAME


def _q(name: str) -> str:
    """Return `name` quoted as an SQL identifier (column names come from the user's file)."""
    return '"' + name.replace('"', '""') + '"'


class ProfileStore:
    """Read-only view of the profile store: ``get(original_transaction_id)`` is one keyed read.

    A missing file is an empty store (every lookup a miss); a file that appears or is replaced
    later is picked up within `check_interval_s`. Safe to call from several threads.
    """

    def __init__(self, path: str | Path, *, check_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._sql = ""
        self._names: tuple[str, ...] = ()
        self._numeric: list[str] = []
        self._categorical: list[str] = []
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._last_error_log = 0.0
        with self._lock:
            self._refresh(time.monotonic())

    # -- reading -------------------------------------------------------------------------
    def get(self, original_transaction_id: str) -> dict[str, object] | None:
        """Return the subscriber's profile (column -> value, None for a missing value), or None on a miss.

        Never raises: a store that cannot be read counts as a miss and is logged (at most once a minute).
        """
        with self._lock:
            now = time.monotonic()
            if now >= self._next_check:
                self._refresh(now)
            conn = self._conn
            if conn is None:
                return None
            try:
                row = conn.execute(self._sql, (original_transaction_id,)).fetchone()
            except sqlite3.Error as exc:
                self._log_error(now, f"profile lookup failed, answering without a profile: {exc}")
                return None
        if row is None:
            return None
        return dict(zip(self._names, row, strict=True))

    def columns(self) -> tuple[list[str], list[str]]:
        """Return the store's (numeric, categorical) column names, in file order."""
        with self._lock:
            return list(self._numeric), list(self._categorical)

    def __len__(self) -> int:
        with self._lock:
            if self._conn is None:
                return 0
            return int(self._conn.execute("SELECT count(*) FROM profiles").fetchone()[0])

    def close(self) -> None:
        """Close the connection; a later ``get`` reopens it."""
        with self._lock:
            self._swap(None, (), [], [], None)
            self._next_check = 0.0

    # -- reopening -----------------------------------------------------------------------
    def _log_error(self, now: float, text: str) -> None:
        if now - self._last_error_log >= 60.0 or self._last_error_log == 0.0:
            self._last_error_log = now
            log.warning("%s (%s)", text, self.path)

    def _swap(
        self,
        conn: sqlite3.Connection | None,
        names: tuple[str, ...],
        numeric: list[str],
        categorical: list[str],
        stamp: tuple[int, int, int] | None,
    ) -> None:
        old, self._conn = self._conn, conn
        self._names, self._numeric, self._categorical, self._stamp = names, numeric, categorical, stamp
        self._sql = f"SELECT {', '.join(_q(n) for n in names) or 'NULL'} FROM profiles WHERE {_q(KEY)} = ?"
        if old is not None:
            old.close()

    def _refresh(self, now: float) -> None:
        """Reopen the store if its file appeared, changed or vanished since the last check (lock held)."""
        self._next_check = now + self.check_interval_s
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._conn is not None:
                log.info("profile store %s is gone; answering without profiles", self.path)
            self._swap(None, (), [], [], None)
            return
        except OSError as exc:
            self._log_error(now, f"cannot stat the profile store: {exc}")
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            rows = conn.execute("SELECT name, kind FROM profile_columns ORDER BY position").fetchall()
        except sqlite3.Error as exc:
            self._log_error(now, f"cannot open the profile store, keeping the previous one: {exc}")
            self._stamp = stamp  # do not retry a broken file every second; a re-import changes the stamp
            return
        names = tuple(str(n) for n, _ in rows)
        numeric = [str(n) for n, k in rows if k == "numeric"]
        categorical = [str(n) for n, k in rows if k != "numeric"]
        self._swap(conn, names, numeric, categorical, stamp)
        log.info("profile store %s opened: %d columns", self.path, len(names))


# -- import --------------------------------------------------------------------------------
def _read_table(src: Path) -> Any:
    """Return the source file as a pandas DataFrame (Parquet by suffix, else CSV), key as strings."""
    import pandas as pd

    if not src.is_file():
        raise ValueError(f"profile file {str(src)!r} does not exist")
    if src.stat().st_size == 0:
        raise ValueError(f"profile file {str(src)!r} is empty: it needs a header row with {KEY} and one row per "
                         "subscriber; the profile store was kept")
    suffix = src.suffix.lower()
    is_csv = suffix in (".csv", ".txt", ".gz") or src.name.lower().endswith(".csv.gz")
    if suffix not in (".parquet", ".pq") and not is_csv:
        raise ValueError(f"profile file {str(src)!r} must be Parquet (.parquet) or CSV (.csv)")
    try:
        df = pd.read_csv(src, dtype={KEY: str}, keep_default_na=True) if is_csv else pd.read_parquet(src)
    except Exception as exc:  # pandas' and pyarrow's errors do not name the file: this line does
        raise ValueError(
            f"cannot read the profile file {str(src)!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return df


def _column_values(series: Any, numeric: bool) -> list[Any]:
    import pandas as pd

    if numeric:
        values = pd.to_numeric(series, errors="coerce").astype("float64").tolist()
        return [None if v != v else v for v in values]  # NaN -> NULL
    return [None if pd.isna(v) else str(v) for v in series.tolist()]


def import_profiles(src: str | Path, db_path: str | Path, *, progress: bool = False) -> int:
    """Return the number of profiles imported from `src` into `db_path`, replacing the store atomically.

    Raises ValueError (one sentence) for a file without ``original_transaction_id``, with no rows (empty,
    or a header only: importing it would empty the live store), with an empty or duplicated key, or that
    cannot be read. On any error the store is left as it was.
    """
    import pandas as pd

    src, db_path = Path(src), Path(db_path)
    df = _read_table(src)
    if KEY not in df.columns:
        raise ValueError(
            f"profile file {str(src)!r} has no {KEY} column (columns: {', '.join(map(str, df.columns[:10]))})"
        )
    if len(df) == 0:
        raise ValueError(f"profile file {str(src)!r} has no rows (a header only); the profile store was kept")
    names = [str(c) for c in df.columns]
    if len(set(names)) != len(names):
        raise ValueError(f"profile file {str(src)!r} has duplicate column names")
    keys = df[KEY]
    if keys.isna().any():
        raise ValueError(f"profile file {str(src)!r} has {int(keys.isna().sum())} rows without {KEY}")
    keys = keys.astype(str).str.strip()
    if (keys == "").any():
        raise ValueError(f"profile file {str(src)!r} has rows with an empty {KEY}")
    dup = keys.duplicated()
    if dup.any():
        raise ValueError(
            f"profile file {str(src)!r} has {int(dup.sum())} duplicate {KEY} values (first: {keys[dup].iloc[0]!r})"
        )

    features = [c for c in df.columns if str(c) != KEY]
    kinds = {
        str(c): "numeric"
        if (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))
        else "categorical"
        for c in features
    }
    db_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".profiles-", suffix=".sqlite.tmp", dir=db_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp)
        try:
            cols_sql = ", ".join(f"{_q(str(c))} {'REAL' if kinds[str(c)] == 'numeric' else 'TEXT'}" for c in features)
            conn.execute("PRAGMA journal_mode=OFF")  # a private temp file: a crash just leaves it to delete
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute(
                f"CREATE TABLE profiles ({_q(KEY)} TEXT PRIMARY KEY{', ' if features else ''}{cols_sql}) WITHOUT ROWID"
            )
            conn.execute(
                "CREATE TABLE profile_columns (position INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL)"
            )
            conn.executemany(
                "INSERT INTO profile_columns VALUES (?, ?, ?)",
                [(i, str(c), kinds[str(c)]) for i, c in enumerate(features)],
            )
            conn.execute("CREATE TABLE profile_meta (key TEXT PRIMARY KEY, value TEXT)")
            conn.executemany(
                "INSERT INTO profile_meta VALUES (?, ?)",
                [("source", str(src)), ("imported_at_ms", str(int(time.time() * 1000))), ("rows", str(len(df)))],
            )
            insert = f"INSERT INTO profiles VALUES ({', '.join('?' * (len(features) + 1))})"
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(df), unit="profile", desc="import", file=sys.stderr, disable=True if len(df) < 50_000 else None)
            for start in range(0, len(df), _CHUNK):
                part = df.iloc[start : start + _CHUNK]
                columns = [keys.iloc[start : start + _CHUNK].tolist()]
                columns += [_column_values(part[c], kinds[str(c)] == "numeric") for c in features]
                conn.executemany(insert, zip(*columns, strict=True))
                if bar is not None:
                    bar.update(len(part))
            if bar is not None:
                bar.close()
            conn.commit()
        finally:
            conn.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, db_path)
        try:
            dir_fd = os.open(db_path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # some file systems cannot fsync a directory; the replace itself is still atomic
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(df)
