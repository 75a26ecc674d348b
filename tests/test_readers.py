from __future__ import annotations

import polars as pl
import pytest

from recsys_ccl.data.readers import ColumnMap, read_interactions
from recsys_ccl.errors import DataError


def test_csv_column_mapping_and_types(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("uid,iid,when,stars\n 7 ,a,2024-01-02T03:04:05,4.5\n8,,2024-01-03,x\n,b,bad,3\n")
    raw = read_interactions(p, "csv", ColumnMap("uid", "iid", "when", "stars"))
    f = raw.frame
    assert f.schema["user_id"] == pl.String  # " 7 " is not the integer 7: kept as written
    assert f.schema["item_id"] == pl.String
    assert f["user_id"].to_list() == [" 7 ", "8", None]
    assert f["item_id"].to_list() == ["a", None, "b"]
    assert f["ts"].to_list() == [1704164645, 1704240000, None]
    assert f["rating"].to_list() == [4.5, None, 3.0]
    assert f["row_nr"].to_list() == [0, 1, 2]
    assert raw.has_time and raw.has_rating and not raw.has_given_split


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ids_are_kept_byte_for_byte(tmp_path, fmt):
    """"007", "7", "-7", "+7", "7 " and " 7" are six ids; a column of canonical integers may
    travel as Int64 because its decimal text is exactly what was written."""
    ids = ["007", "7", "-7", "+7", "7 ", " 7", "1e3", "ünï", "a b"]
    df = pl.DataFrame({"user_id": ids, "item_id": [str(i) for i in range(len(ids))]})
    p = tmp_path / f"log.{fmt}"
    df.write_csv(p) if fmt == "csv" else df.write_parquet(p)
    f = read_interactions(p, fmt).frame
    assert f["user_id"].to_list() == ids
    assert f.schema["item_id"] == pl.Int64  # "0".."8": canonical integers
    assert f["item_id"].cast(pl.String).to_list() == [str(i) for i in range(len(ids))]


def test_integer_parquet_ids_are_their_decimal_text(tmp_path):
    p = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": [7, -3, 0], "item_id": ["a", "b", "c"]}).write_parquet(p)
    f = read_interactions(p, "parquet").frame
    assert f["user_id"].cast(pl.String).to_list() == ["7", "-3", "0"]


def test_csv_default_optional_columns_absent(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id\nu1,i1\nu2,i2\n")
    raw = read_interactions(p, "csv")
    assert not raw.has_time and not raw.has_rating
    assert raw.frame["ts"].null_count() == 2
    assert "rating" not in raw.frame.columns


def test_missing_column_names_it_and_lists_found(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match=r"'user_id' \(--user-col\).*columns found: user, "
                                        r"item_id, timestamp"):
        read_interactions(p, "csv")


def test_explicit_time_column_missing(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match="--time-col"):
        read_interactions(p, "csv", ColumnMap(time="when"))


def test_time_column_not_numeric_or_timestamp(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\n1,2,monday\n1,3,tuesday\n")
    with pytest.raises(DataError, match="not numeric or a timestamp"):
        read_interactions(p, "csv")


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        read_interactions(tmp_path / "nope.csv", "csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_interactions(tmp_path / "empty.csv", "csv")


def test_parquet_with_datetime_column(tmp_path):
    from datetime import datetime

    p = tmp_path / "log.parquet"
    pl.DataFrame(
        {"user_id": [1, 2], "item_id": ["x", "y"],
         "timestamp": [datetime(2020, 1, 1), datetime(2020, 1, 2)]}
    ).write_parquet(p)
    f = read_interactions(p, "parquet").frame
    assert f["ts"].to_list() == [1577836800, 1577923200]


def test_movielens_u_data_and_ratings_dat(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    f = read_interactions(tmp_path / "u.data", "movielens").frame
    assert f.select("user_id", "item_id", "ts", "rating").rows() == [
        (196, 242, 881250949, 3.0), (186, 302, 891717742, 3.0)]
    d = tmp_path / "ml1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    f = read_interactions(d, "movielens").frame  # a directory finds its ratings file
    assert f.select("user_id", "item_id", "ts", "rating").rows() == [
        (1, 1193, 978300760, 5.0), (1, 661, 978302109, 3.0)]


def test_movielens_wrong_field_count(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(DataError, match="expected 4 fields"):
        read_interactions(tmp_path / "u.data", "movielens")


def test_lightgcn_directory(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 3\n1 2\n2\n")
    (tmp_path / "test.txt").write_text("0 4\n1 3 1\n")
    f = read_interactions(tmp_path, "lightgcn").frame
    assert f.select("user_id", "item_id", pl.col("given_split").cast(pl.String)).rows() == [
        (0, 1, "train"), (0, 2, "train"), (0, 3, "train"), (1, 2, "train"),
        (0, 4, "test"), (1, 3, "test"), (1, 1, "test")]


def test_lightgcn_needs_both_files(tmp_path):
    (tmp_path / "train.txt").write_text("0 1\n")
    with pytest.raises(DataError, match=r"missing .*test\.txt"):
        read_interactions(tmp_path, "lightgcn")


def test_csv_ids_integer_at_first_then_text(tmp_path):
    """Type inference sees only the first rows: a later non-integer id must not be lost."""
    p = tmp_path / "log.csv"
    lines = ["user_id,item_id"] + [f"{i},{i}" for i in range(12_000)] + ["u-x,i-y"]
    p.write_text("\n".join(lines) + "\n")
    f = read_interactions(p, "csv").frame
    assert f.schema["user_id"] == pl.String
    assert f["user_id"].null_count() == 0
    assert f["user_id"][-1] == "u-x" and f["item_id"][0] == "0"


def test_a_stray_text_value_past_the_inferred_prefix(tmp_path):
    """CSV types are inferred from the first 10,000 rows; an "NA" in the time and rating
    columns after them becomes null instead of failing the read, and the numbers stay exact."""
    n = 12_000
    lines = [f"{i % 97},{i % 89},{1_600_000_000 + i},{1 + i % 5}" for i in range(n)]
    lines[11_000] = "5,6,NA,NA"
    (tmp_path / "x.csv").write_text("user_id,item_id,timestamp,rating\n" + "\n".join(lines))
    frame = read_interactions(tmp_path / "x.csv", "csv").take_frame()
    assert frame.height == n
    assert frame["ts"].null_count() == 1 and frame["rating"].null_count() == 1
    assert frame["ts"][11_001] == 1_600_011_001 and frame["ts"].dtype == pl.Int64
    assert frame["user_id"].dtype == pl.Int64
