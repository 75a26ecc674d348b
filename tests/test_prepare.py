from __future__ import annotations

import json

import hypothesis.strategies as st
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from polars.testing import assert_frame_equal
from strategies import rarely_none

from recsys_ccl.cli import main
from recsys_ccl.data.prepare import PrepareConfig, build_prepared, prepare
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.errors import DataError, RecsysError

# Interaction logs with duplicates, missing ids, tied times and missing ratings.
rows = st.lists(
    st.tuples(
        rarely_none(st.integers(0, 6)),  # user
        rarely_none(st.integers(0, 15)),  # item
        st.integers(0, 30),  # ts (many ties)
        rarely_none(st.integers(1, 5)),  # rating
    ),
    min_size=1,
    max_size=150,
)


def write_log(path, data):
    pl.DataFrame(data, schema=["user_id", "item_id", "timestamp", "rating"],
                 orient="row").write_csv(path)


def check_invariants(data, config):
    """Accounting, no leakage, vocabulary round trip; returns the prepared data."""
    try:
        prepared = build_prepared(config)
    except DataError as exc:
        assert "no interactions left" in str(exc)
        return None
    m = prepared.manifest
    rows_ = m["rows"]
    assert rows_["input"] == len(data)
    assert rows_["input"] == rows_["kept"] + sum(rows_["dropped"].values())
    splits = prepared.splits
    assert rows_["kept"] == sum(s.height for s in splits.values())
    # every evaluated id has a trained embedding, indices are contiguous
    train = splits["train"]
    for s in splits.values():
        assert set(s["user_idx"]) <= set(train["user_idx"])
        assert set(s["item_idx"]) <= set(train["item_idx"])
    assert prepared.users["user_idx"].to_list() == list(range(prepared.users.height))
    assert prepared.items["item_idx"].to_list() == list(range(prepared.items.height))
    assert prepared.items["train_count"].sum() == train.height
    # round trip: encoded pairs decode to pairs of the input
    inp = {(str(u), str(i)) for u, i, _, _ in data if u is not None and i is not None}
    uid = dict(prepared.users.rows())
    iid = dict(prepared.items.select("item_idx", "item_id").rows())
    for s in splits.values():
        for u, i, _ in s.rows():
            assert (uid[u], iid[i]) in inp
    # no (user, item) pair in two places
    allpairs = pl.concat([s.select("user_idx", "item_idx") for s in splits.values()])
    assert allpairs.is_duplicated().sum() == 0
    return prepared


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=rows, holdout=st.integers(1, 3), k=st.integers(0, 3),
       min_rating=st.one_of(st.none(), st.integers(1, 5)))
def test_temporal_properties(tmp_path, data, holdout, k, min_rating):
    p = tmp_path / "log.csv"
    write_log(p, data)
    config = PrepareConfig(input=str(p), format="csv", split="temporal", holdout=holdout,
                           k_core=k, min_rating=min_rating)
    prepared = check_invariants(data, config)
    if prepared is None:
        return
    # no leakage: every held-out interaction is at or after all of that user's train ones
    train = prepared.splits["train"].group_by("user_idx").agg(pl.col("ts").max().alias("tmax"))
    for name in ("valid", "test"):
        held = prepared.splits[name].join(train, on="user_idx")
        assert (held["ts"] >= held["tmax"]).all()
        assert (prepared.splits[name].group_by("user_idx").len()["len"] <= holdout).all()
    # and the other engine gives the same frames
    duck = build_prepared(PrepareConfig(**{**config.__dict__, "engine": "duckdb"}))
    for name in ("train", "valid", "test"):
        assert_frame_equal(prepared.splits[name], duck.splits[name])
    assert_frame_equal(prepared.items, duck.items)
    assert prepared.manifest["rows"] == duck.manifest["rows"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=rows, seed=st.integers(0, 3), engine=st.sampled_from(["polars", "duckdb"]))
def test_random_split_properties_and_determinism(tmp_path, data, seed, engine):
    p = tmp_path / "log.csv"
    write_log(p, data)
    config = PrepareConfig(input=str(p), format="csv", split="random", test_ratio=0.3,
                           valid_ratio=0.2, seed=seed, engine=engine)
    a = check_invariants(data, config)
    if a is None:
        return
    b = build_prepared(config)
    for name in a.splits:
        assert_frame_equal(a.splits[name], b.splits[name])


def test_movielens_u_data_min_rating_temporal(tmp_path):
    """u.data format (synthetic content): --min-rating 4 --split temporal --holdout 1."""
    df = write_synth(SynthConfig(users=300, items=200, interactions=20_000, seed=5),
                     tmp_path / "s.parquet")
    (tmp_path / "ml").mkdir()
    df.select("user_id", "item_id", "rating", "timestamp").write_csv(
        tmp_path / "ml" / "u.data", separator="\t", include_header=False)
    out = tmp_path / "data"
    assert main(["prepare", "--input", str(tmp_path / "ml" / "u.data"), "--format",
                 "movielens", "--min-rating", "4", "--split", "temporal", "--holdout", "1",
                 "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    r = m["rows"]
    assert r["input"] == 20_000 == r["kept"] + sum(r["dropped"].values())
    assert r["dropped"]["below_min_rating"] > 0 and r["dropped"]["duplicate"] > 0
    assert 0 < m["counts"]["test_rows"] <= m["counts"]["users"]  # at most one per user
    train = pl.read_parquet(out / "train.parquet")
    for name in ("valid", "test"):
        held = pl.read_parquet(out / f"{name}.parquet").join(
            train.group_by("user_idx").agg(pl.col("ts").max().alias("tmax")), on="user_idx")
        assert (held["ts"] >= held["tmax"]).all()
    assert m["input"]["sha256"] and m["parameters"]["min_rating"] == 4.0


def test_outputs_schema_and_log_q(tmp_path):
    write_synth(SynthConfig(users=200, items=100, interactions=5_000), tmp_path / "s.csv")
    m = prepare(PrepareConfig(input=str(tmp_path / "s.csv"), format="csv", k_core=2),
                tmp_path / "d")
    d = tmp_path / "d"
    for name in ("train", "valid", "test"):
        assert pl.read_parquet(d / f"{name}.parquet").schema == pl.Schema(
            {"user_idx": pl.Int32, "item_idx": pl.Int32, "ts": pl.Int64})
    items = pl.read_parquet(d / "items.parquet")
    assert items.columns == ["item_idx", "item_id", "train_count", "log_q"]
    assert abs(items["log_q"].exp().sum() - 1.0) < 1e-9
    assert m["counts"]["train_rows"] == items["train_count"].sum()
    users = pl.read_parquet(d / "users.parquet")
    assert users.schema == pl.Schema({"user_idx": pl.Int32, "user_id": pl.String})


def test_existing_out_is_left_untouched(tmp_path):
    write_synth(SynthConfig(users=50, items=40, interactions=1_000), tmp_path / "s.csv")
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = PrepareConfig(input=str(tmp_path / "s.csv"), format="csv")
    with pytest.raises(DataError, match="already exists"):
        prepare(cfg, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(RecsysError, match=r"holds no manifest\.json"):
        prepare(cfg, out, overwrite=True)  # not an earlier output: never replaced
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    prepare(cfg, out, overwrite=True)  # an empty directory
    (out / "users.parquet").unlink()
    prepare(cfg, out, overwrite=True)  # an earlier (here damaged) output
    assert (out / "manifest.json").exists() and (out / "users.parquet").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


BAD_INPUTS = [
    ("missing file", lambda d: ["--input", str(d / "nope.csv"), "--format", "csv"],
     "input not found"),
    ("missing column", lambda d: ["--input", str(d / "cols.csv"), "--format", "csv"],
     "column 'user_id' (--user-col) not found"),
    ("time not numeric", lambda d: ["--input", str(d / "time.csv"), "--format", "csv"],
     "time column 'timestamp' is not numeric or a timestamp"),
    ("filter empties", lambda d: ["--input", str(d / "ok.csv"), "--format", "csv",
                                  "--min-rating", "9"],
     "no interactions left after below_min_rating"),
    ("k-core empties", lambda d: ["--input", str(d / "ok.csv"), "--format", "csv",
                                  "--k-core", "50"], "no interactions left after k_core"),
]


@pytest.mark.parametrize(("name", "args", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_error_no_out(tmp_path, capsys, name, args, message):
    (tmp_path / "cols.csv").write_text("user,item_id\n1,2\n")
    (tmp_path / "time.csv").write_text("user_id,item_id,timestamp\n1,2,soon\n")
    (tmp_path / "ok.csv").write_text("user_id,item_id,timestamp,rating\n1,2,3,4\n1,3,4,5\n")
    out = tmp_path / "out"
    code = main(["prepare", *args(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_input_through_the_console_script(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "recsys_ccl.cli", "prepare", "--input",
                        str(tmp_path / "x.csv"), "--format", "csv", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"recsys-ccl prepare: error: input not found: {tmp_path / 'x.csv'}"]


# -- malformed files: a clear one-line error, or rows kept with the accounting intact --

_HEADER = b"user_id,item_id,timestamp,rating\n"
MALFORMED = [
    ("empty file", b"", "input is empty"),
    ("header only", _HEADER, "input has no rows"),
    ("wrong column count", _HEADER + b"1,2,3,4\n1,3,4,5\n8,9,10,11,12\n2,3,4,5\n",
     "line 4 has 5 fields, the header has 4"),
    ("bad encoding", _HEADER + b"1,2,3,4\n\xe9t\xe9,3,4,5\n2,3,4,5\n",
     "line 3 is not valid UTF-8 (byte 0xe9 at column 1)"),
    ("utf-16 file", "user_id,item_id\n1,2\n".encode("utf-16"), "the file is UTF-16"),
    ("binary garbage", bytes(range(256)) * 8, "binary data (NUL bytes), not CSV text"),
    ("parquet given as csv", b"PAR1\x15\x04\x00\x00" * 4, "use --format parquet"),
    ("only a header of other names", b"a,b,c\n1,2,3\n", "column 'user_id' (--user-col) not found"),
]


@pytest.mark.parametrize(("name", "content", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_csv_one_line_error_no_out(tmp_path, capsys, name, content, message):
    (tmp_path / "in.csv").write_bytes(content)
    out = tmp_path / "out"
    code = main(["prepare", "--input", str(tmp_path / "in.csv"), "--format", "csv",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert str(tmp_path / "in.csv") in err or "in.csv" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_corrupted_parquet_input_names_the_file(tmp_path, capsys):
    good = tmp_path / "good.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [4, 5, 6]}).write_parquet(good)
    data = good.read_bytes()
    for name, damaged in [("truncated", data[: len(data) // 2]),
                          ("flipped", data[:8] + bytes(b ^ 0xFF for b in data[8:-8]) + data[-8:])]:
        bad = tmp_path / f"{name}.parquet"
        bad.write_bytes(damaged)
        code = main(["prepare", "--input", str(bad), "--format", "parquet",
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and f"cannot read {bad}" in err, err
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_mixed_types_keep_rows_and_account_for_every_one(tmp_path):
    """Text in numeric columns: ids become strings (a valid vocabulary), an unparseable time
    drops the row under the temporal split, an unparseable rating fails --min-rating; each
    dropped row is counted under its reason."""
    (tmp_path / "in.csv").write_text(
        "user_id,item_id,timestamp,rating\n"
        "1,10,100,5\n1,11,101,5\n1,12,102,5\n"  # a user with three good rows
        "u2,10,103,5\nu2,11,104,5\nu2,12,oops,5\n"  # a text id; one unparseable time
        "1,13,105,five\n"  # an unparseable rating
        ",10,106,5\n"  # a missing user id
    )
    out = tmp_path / "out"
    prepare(PrepareConfig(input=str(tmp_path / "in.csv"), format="csv", min_rating=4,
                          k_core=1, holdout=1), out)
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert rows["input"] == 8
    assert rows["dropped"]["null_id"] == 1
    assert rows["dropped"]["null_timestamp"] == 1
    assert rows["dropped"]["below_min_rating"] == 1
    assert rows["input"] == rows["kept"] + sum(rows["dropped"].values())
    users = pl.read_parquet(out / "users.parquet")["user_id"].to_list()
    assert sorted(users) == ["1", "u2"]
