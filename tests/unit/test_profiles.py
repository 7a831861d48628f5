"""Profile store: keyed read, miss, typed columns, atomic re-import under a live reader, CLI."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import retention
from serving.profiles import ProfileStore, import_profiles
from serving.profiles_cli import main


def _frame(n: int, version: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "original_transaction_id": [f"{1000 + i:016d}" for i in range(n)],
            "tenure_days": [float(i + version) for i in range(n)],
            "sessions_30d": list(range(n)),
            "country": ["US" if i % 2 else "FR" for i in range(n)],
            "paid_before": [bool(i % 3) for i in range(n)],
            "version": [version] * n,
        }
    )


def test_keyed_read_miss_and_columns(tmp_path: Path) -> None:
    src = tmp_path / "profiles.parquet"
    df = _frame(50, 0)
    df.loc[3, "country"] = None
    df.loc[4, "tenure_days"] = float("nan")
    df.to_parquet(src)
    db = tmp_path / "data" / "profiles.sqlite"
    assert import_profiles(src, db) == 50

    store = ProfileStore(db)
    assert store.columns() == (["tenure_days", "sessions_30d", "paid_before", "version"], ["country"])
    assert store.get("0000000000001007") == {
        "tenure_days": 7.0,
        "sessions_30d": 7.0,
        "country": "US",
        "paid_before": 1.0,
        "version": 0.0,
    }
    assert store.get("0000000000001003")["country"] is None  # type: ignore[index]
    assert store.get("0000000000001004")["tenure_days"] is None  # type: ignore[index]
    assert store.get("no-such-subscriber") is None
    assert len(store) == 50


def test_csv_keeps_leading_zeros_and_missing_file_is_empty(tmp_path: Path) -> None:
    db = tmp_path / "profiles.sqlite"
    store = ProfileStore(db, check_interval_s=0.0)
    assert store.get("0000000000001001") is None and store.columns() == ([], [])
    src = tmp_path / "p.csv"
    _frame(5, 0).to_csv(src, index=False)
    import_profiles(src, db)
    # the file appeared after the store was created: picked up at the next check
    assert store.get("0000000000001001") == {
        "tenure_days": 1.0,
        "sessions_30d": 1.0,
        "country": "US",
        "paid_before": 1.0,
        "version": 0.0,
    }


def test_reimport_is_atomic_while_a_reader_holds_the_old_file(tmp_path: Path) -> None:
    db = tmp_path / "profiles.sqlite"
    old_src, new_src = tmp_path / "old.parquet", tmp_path / "new.parquet"
    _frame(3000, 1).to_parquet(old_src)
    _frame(3000, 2).to_parquet(new_src)
    import_profiles(old_src, db)
    store = ProfileStore(db, check_interval_s=0.01)
    assert store.get("0000000000001000")["version"] == 1.0  # type: ignore[index]

    seen: set[float] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            i = 0
            while not stop.is_set():
                key = f"{1000 + i % 3000:016d}"
                row = store.get(key)
                # every lookup during the swap finds a whole row of one version or the other
                assert row is not None, key
                assert row["tenure_days"] == (i % 3000) + row["version"], row  # type: ignore[operator]
                seen.add(row["version"])  # type: ignore[arg-type]
                i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            import_profiles(new_src, db)
            import_profiles(old_src, db)
        import_profiles(new_src, db)
        deadline = time.monotonic() + 5
        while store.get("0000000000001000")["version"] != 2.0 and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert store.get("0000000000001000")["version"] == 2.0  # type: ignore[index]
    assert seen == {1.0, 2.0}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".profiles-")]  # no temp file left behind


def test_bad_files_are_refused_and_keep_the_old_store(tmp_path: Path) -> None:
    db = tmp_path / "profiles.sqlite"
    good = tmp_path / "good.csv"
    _frame(4, 0).to_csv(good, index=False)
    import_profiles(good, db)
    before = db.read_bytes()

    no_key = tmp_path / "nokey.csv"
    pd.DataFrame({"tenure_days": [1.0]}).to_csv(no_key, index=False)
    dup = tmp_path / "dup.csv"
    pd.DataFrame({"original_transaction_id": ["1", "1"], "x": [1, 2]}).to_csv(dup, index=False)
    for path, pattern in (
        (no_key, "no original_transaction_id column"),
        (dup, "duplicate"),
        (tmp_path / "absent.csv", "does not exist"),
    ):
        with pytest.raises(ValueError, match=pattern):
            import_profiles(path, db)
    assert db.read_bytes() == before


def test_cli_import_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "p.csv"
    _frame(10, 0).to_csv(src, index=False)
    assert main(["import", str(src), "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "imported 10 profiles (4 numeric, 1 categorical columns)" in out
    assert (tmp_path / "d" / "profiles.sqlite").is_file()
    assert main(["show", "0000000000001002", "--data-dir", str(tmp_path / "d")]) == 0
    assert "country\tFR" in capsys.readouterr().out
    # bad input through the dispatcher: one line, non-zero, no traceback
    assert retention.main(["profiles", "import", str(tmp_path / "missing.csv"), "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("retention profiles: error:") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["empty.csv", "empty.parquet"])
def test_importing_an_empty_file_names_the_file(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / name
    empty.write_bytes(b"")
    assert retention.main(["profiles", "import", str(empty), "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "is empty" in err[0]

@pytest.mark.parametrize("content", ["original_transaction_id,tenure_days\n", "original_transaction_id\n", ""])
def test_a_file_without_rows_is_refused_and_the_live_store_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    data = tmp_path / "d"
    good = tmp_path / "good.csv"
    _frame(5, 0).to_csv(good, index=False)
    assert main(["import", str(good), "--data-dir", str(data)]) == 0
    capsys.readouterr()
    empty = tmp_path / "empty.csv"
    empty.write_text(content)
    assert retention.main(["profiles", "import", str(empty), "--data-dir", str(data)]) == 1
    captured = capsys.readouterr()
    assert "imported" not in captured.out
    assert captured.err.count("\n") == 1 and str(empty) in captured.err, captured.err
    assert "kept" in captured.err
    store = ProfileStore(data / "profiles.sqlite")
    assert len(store) == 5 and store.get("0000000000001003") is not None
