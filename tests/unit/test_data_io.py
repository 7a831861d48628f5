"""Reading the training data files: formats, round trips, and one clear error per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data_io import DataError, read_decisions, read_outcomes, read_profiles, read_table, write_table

M1 = "9eebaa90-da9b-5666-9499-ef0f5eb99be0"
M2 = "788924e7-397b-5ac9-ae2b-48eb98aa56ea"
M3 = "48463545-6a00-5a72-8cc2-1134ca25bd55"


def _decisions(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": [f"req-{i}" for i in range(n)],
            "original_transaction_id": [f"000{1000 + i}" for i in range(n)],  # leading zeros must survive
            "product_id": ["com.example.premium.monthly"] * n,
            "user_locale": ["en-AU"] * n,
            "environment": ["Production"] * n,
            "signed_date": [1_767_225_600_000 + i for i in range(n)],
            "candidates": [[M1, M2, M3] for _ in range(n)],
            "message_id": [M2] * n,
            "propensity": [0.9] * n,
            "model_version": ["rules-v0"] * n,
            "policy": ["simulated:epsilon-greedy"] * n,
            "score_extra": [0.5] * n,
        }
    )


@pytest.fixture(params=["parquet", "csv"])
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_round_trip_keeps_lists_ids_and_extra_columns(tmp_path: Path, fmt: str) -> None:
    df = _decisions()
    path = tmp_path / f"decisions.{fmt}"
    write_table(df, path)
    back = read_decisions(path)
    assert back["candidates"].tolist() == [[M1, M2, M3]] * 3
    assert all(isinstance(c, list) for c in back["candidates"])
    assert back["original_transaction_id"].tolist() == ["0001000", "0001001", "0001002"]
    assert back["signed_date"].dtype == np.int64
    assert back["score_extra"].tolist() == [0.5] * 3


def test_csv_stores_candidates_as_json(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    write_table(_decisions(1), path)
    assert f'"[""{M1}"", ""{M2}"", ""{M3}""]"' in path.read_text()


def test_numeric_looking_ids_stay_strings_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text("original_transaction_id,event,at\n2000000000000013,renewed,1767225600000\n")
    out = read_outcomes(path)
    assert out["original_transaction_id"].tolist() == ["2000000000000013"]
    assert out["at"].dtype == np.int64


def test_missing_columns(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"decisions.{fmt}"
    write_table(_decisions().drop(columns=["propensity", "policy"]), path)
    with pytest.raises(DataError, match=r"lacks column\(s\) propensity, policy") as exc:
        read_decisions(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, float("nan")])
def test_propensity_outside_zero_one(tmp_path: Path, fmt: str, bad: float) -> None:
    df = _decisions()
    df.loc[1, "propensity"] = bad
    path = tmp_path / f"decisions.{fmt}"
    write_table(df, path)
    with pytest.raises(DataError, match=r"row 2 \(request_id 'req-1'\): propensity .* outside \(0, 1\]"):
        read_decisions(path)


def test_propensity_one_is_valid(tmp_path: Path) -> None:
    df = _decisions()
    df["propensity"] = 1.0
    write_table(df, tmp_path / "d.parquet")
    assert read_decisions(tmp_path / "d.parquet")["propensity"].tolist() == [1.0] * 3


def test_message_not_in_candidates(tmp_path: Path, fmt: str) -> None:
    df = _decisions()
    df.at[2, "message_id"] = "66c686b6-f9df-5b60-8bbd-749041c144a4"
    path = tmp_path / f"decisions.{fmt}"
    write_table(df, path)
    with pytest.raises(DataError, match=r"row 3 \(request_id 'req-2'\): message_id .* is not in its own candidates"):
        read_decisions(path)


def test_a_request_id_twice_is_refused(tmp_path: Path, fmt: str) -> None:
    """An export appended twice would weigh every decision twice in training and in every estimate."""
    df = _decisions()
    path = tmp_path / f"decisions.{fmt}"
    write_table(pd.concat([df, df.iloc[[1]]], ignore_index=True), path)
    with pytest.raises(DataError, match=r"row 4 \(request_id 'req-1'\): request_id appears more than once"):
        read_decisions(path)


def test_empty_candidates(tmp_path: Path, fmt: str) -> None:
    df = _decisions()
    df.at[0, "candidates"] = []
    path = tmp_path / f"decisions.{fmt}"
    write_table(df, path)
    with pytest.raises(DataError, match=r"row 1 .*candidates must be a non-empty list"):
        read_decisions(path)


def test_a_request_answered_with_no_message_is_read_as_apple_s_choice(tmp_path: Path, fmt: str) -> None:
    df = _decisions()
    df["message_id"] = df["message_id"].astype(object)
    df.at[1, "message_id"], df.at[1, "candidates"], df.at[1, "policy"] = None, [], "apple_fallback"  # a 404
    path = tmp_path / f"decisions.{fmt}"
    write_table(df, path)
    got = read_decisions(path)
    assert len(got) == 3 and pd.isna(got.at[1, "message_id"]) and got.at[1, "policy"] == "apple_fallback"
    df.at[1, "policy"] = "ml"  # a missing message on any other policy is still an error
    write_table(df, path)
    with pytest.raises(DataError, match=r"row 2 \(request_id 'req-1'\): message_id is missing"):
        read_decisions(path)


def test_candidates_not_json_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    write_table(_decisions(1), path)
    text = path.read_text().replace(f'"[""{M1}"", ""{M2}"", ""{M3}""]"', "not-a-list")
    path.write_text(text)
    with pytest.raises(DataError, match="row 1: column 'candidates' is not a JSON list"):
        read_decisions(path)


def test_bad_signed_date(tmp_path: Path) -> None:
    df = _decisions()
    df["signed_date"] = df["signed_date"].astype(object)
    df.at[1, "signed_date"] = "yesterday"
    path = tmp_path / "d.csv"
    write_table(df, path)
    with pytest.raises(DataError, match=r"row 2 .*signed_date 'yesterday' is not a time in ms"):
        read_decisions(path)
    for far in (2**62, -5):  # a number, but no time: said with its row, not as a failed date conversion later
        df.at[1, "signed_date"] = far
        write_table(df, path)
        with pytest.raises(DataError, match=rf"row 2 .*signed_date {far} is not a time in ms \(ms since 1970"):
            read_decisions(path)


def test_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "decisions.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="cannot read it as parquet"):
        read_decisions(garbage)
    with pytest.raises(DataError, match="no such file"):
        read_decisions(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unknown file format"):
        read_table(tmp_path / "decisions.xlsx")
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="is a folder"):
        read_table(folder)
    binary = tmp_path / "decisions.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage\x00")
    with pytest.raises(DataError, match=r"decisions\.csv"):
        read_decisions(binary)


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "o.parquet"
    garbage.write_bytes(b"PAR1 broken")
    with pytest.raises(DataError) as exc:
        read_outcomes(garbage)
    assert "\n" not in str(exc.value)


def test_outcomes_validation(tmp_path: Path) -> None:
    good = pd.DataFrame({"original_transaction_id": ["1", "2"], "event": ["cancelled", "renewed"], "at": [5, 6]})
    write_table(good, tmp_path / "o.parquet")
    assert read_outcomes(tmp_path / "o.parquet")["event"].tolist() == ["cancelled", "renewed"]

    bad = good.assign(event=["cancelled", "paused"])
    write_table(bad, tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"row 2 .*unknown event 'paused'"):
        read_outcomes(tmp_path / "bad.csv")

    write_table(good.drop(columns=["at"]), tmp_path / "noat.csv")
    with pytest.raises(DataError, match=r"lacks column\(s\) at"):
        read_outcomes(tmp_path / "noat.csv")

    write_table(good.assign(at=[5.0, np.nan]), tmp_path / "nan.parquet")
    with pytest.raises(DataError, match=r"row 2 .*at .* is not a time in ms"):
        read_outcomes(tmp_path / "nan.parquet")


def test_profiles_validation(tmp_path: Path, fmt: str) -> None:
    prof = pd.DataFrame(
        {"original_transaction_id": ["1", "2"], "tenure_days": [10, 400], "country": ["US", "JP"]}
    )
    write_table(prof, tmp_path / f"p.{fmt}")
    back = read_profiles(tmp_path / f"p.{fmt}")
    assert back["tenure_days"].tolist() == [10, 400] and back["country"].tolist() == ["US", "JP"]

    write_table(pd.concat([prof, prof.iloc[[1]]]), tmp_path / f"dup.{fmt}")
    with pytest.raises(DataError, match=r"row 3 .*appears more than once"):
        read_profiles(tmp_path / f"dup.{fmt}")

    write_table(prof.drop(columns=["original_transaction_id"]), tmp_path / f"noid.{fmt}")
    with pytest.raises(DataError, match=r"lacks column\(s\) original_transaction_id"):
        read_profiles(tmp_path / f"noid.{fmt}")


def test_integer_ids_from_other_tools_become_strings(tmp_path: Path) -> None:
    prof = pd.DataFrame({"original_transaction_id": [2000000000000013, 2000000000000020], "x": [1.0, 2.0]})
    prof.to_parquet(tmp_path / "p.parquet")
    back = read_profiles(tmp_path / "p.parquet")
    assert back["original_transaction_id"].tolist() == ["2000000000000013", "2000000000000020"]


def test_server_log_list_columns_read_alike_in_both_formats(tmp_path: Path) -> None:
    df = _decisions(2)
    df["probabilities"] = [np.array([0.05, 0.9, 0.05]), np.array([0.05, 0.9, 0.05])]
    df["scores"] = [[0.5, float("nan"), 0.7], None]
    for fmt in ("parquet", "csv"):
        path = tmp_path / f"log.{fmt}"
        write_table(df, path)
        back = read_decisions(path)
        np.testing.assert_allclose(back["probabilities"].iloc[0], [0.05, 0.9, 0.05])
        s = np.asarray(back["scores"].iloc[0], dtype=float)
        assert s[0] == 0.5 and np.isnan(s[1]) and s[2] == 0.7
        assert back["scores"].iloc[1] is None or (
            np.isscalar(back["scores"].iloc[1]) and np.isnan(back["scores"].iloc[1])
        )
