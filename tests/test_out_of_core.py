"""Out-of-core prepare (--memory-limit): the same DATA directory as the in-memory paths, every
row accounted for, and the process stays within the limit."""

from __future__ import annotations

import json
import subprocess
import sys

import hypothesis.strategies as st
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from polars.testing import assert_frame_equal
from strategies import rarely_none

from recsys_ccl.cli import main
from recsys_ccl.data.out_of_core import parse_memory_limit
from recsys_ccl.data.prepare import PrepareConfig, prepare
from recsys_ccl.errors import DataError

FILES = ("train", "valid", "test", "users", "items")

# logs with text and integer ids, missing ids, duplicates, tied and missing times, ratings
rows = st.lists(
    st.tuples(
        rarely_none(st.sampled_from(["a", " b", "c ", "007", "8", "-3", "é"])),
        rarely_none(st.one_of(st.integers(0, 12).map(str), st.just("x9"))),
        rarely_none(st.integers(0, 30)),
        rarely_none(st.integers(1, 5)),
    ),
    min_size=1, max_size=120,
)


def _write(path, data, fmt):
    df = pl.DataFrame(data, schema=["user_id", "item_id", "timestamp", "rating"], orient="row")
    if fmt == "csv":
        df.write_csv(path)
    else:
        df.write_parquet(path)


def _same_output(a, b) -> None:
    for name in FILES:
        assert_frame_equal(pl.read_parquet(a / f"{name}.parquet"),
                           pl.read_parquet(b / f"{name}.parquet"), check_exact=True)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["rows"] == mb["rows"] and ma["counts"] == mb["counts"]
    assert ma["rows"]["input"] == ma["rows"]["kept"] + sum(ma["rows"]["dropped"].values())


def _prepare_both(tmp_path, cfg: PrepareConfig, reference_engine: str):
    """(error or None, out-of-core dir, reference dir)."""
    results = []
    for name, extra in (("ooc", {"memory_limit": "320MB"}),
                        ("ref", {"engine": reference_engine})):
        out = tmp_path / name
        try:
            prepare(PrepareConfig(**{**cfg.__dict__, **extra}), out, overwrite=True)
            results.append(None)
        except DataError as exc:
            results.append(str(exc))
    return results, tmp_path / "ooc", tmp_path / "ref"


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=rows, fmt=st.sampled_from(["csv", "parquet"]), k=st.sampled_from([0, 2]),
       min_rating=st.sampled_from([None, 3.0]))
def test_temporal_equals_the_polars_path(tmp_path, data, fmt, k, min_rating):
    _write(tmp_path / f"in.{fmt}", data, fmt)
    cfg = PrepareConfig(input=str(tmp_path / f"in.{fmt}"), format=fmt, k_core=k,
                        min_rating=min_rating, split="temporal", holdout=1)
    (err_ooc, err_ref), ooc, ref = _prepare_both(tmp_path, cfg, "polars")
    assert err_ooc == err_ref  # the same one-line error, or none
    if err_ref is None:
        _same_output(ooc, ref)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=rows, seed=st.integers(0, 3))
def test_random_split_equals_the_duckdb_path(tmp_path, data, seed):
    _write(tmp_path / "in.csv", data, "csv")
    cfg = PrepareConfig(input=str(tmp_path / "in.csv"), format="csv", split="random",
                        test_ratio=0.2, valid_ratio=0.2, seed=seed)
    (err_ooc, err_ref), ooc, ref = _prepare_both(tmp_path, cfg, "duckdb")
    assert err_ooc == err_ref
    if err_ref is None:
        _same_output(ooc, ref)


def test_text_dates_are_parsed_like_the_in_memory_reader(tmp_path):
    (tmp_path / "in.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(
            f"u{u},i{i},2024-0{1 + (u + i) % 9}-1{i % 10} 10:0{u % 10}:00\n"
            for u in range(20) for i in range(6)) + "u1,i9,not a date\n")
    cfg = PrepareConfig(input=str(tmp_path / "in.csv"), format="csv", split="temporal")
    (err_ooc, err_ref), ooc, ref = _prepare_both(tmp_path, cfg, "polars")
    assert err_ooc is None and err_ref is None
    _same_output(ooc, ref)


@pytest.mark.parametrize(("text", "expected"), [("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29),
                                                ("400000000", 4 * 10**8), (" 2gb ", 2 * 10**9)])
def test_memory_limit_parsing(text, expected):
    assert parse_memory_limit(text) == expected


@pytest.mark.parametrize("text", ["lots", "512XB", "-1GB", "300MB", ""])
def test_bad_memory_limits_are_one_line_errors(tmp_path, capsys, text):
    (tmp_path / "in.csv").write_text("user_id,item_id\n1,2\n")
    code = main(["prepare", "--input", str(tmp_path / "in.csv"), "--format", "csv", "--out",
                 str(tmp_path / "out"), f"--memory-limit={text}"])
    err = capsys.readouterr().err
    assert code == 2 and "--memory-limit" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_lightgcn_is_refused_out_of_core(tmp_path, capsys, gowalla_dir):
    code = main(["prepare", "--input", str(gowalla_dir), "--format", "lightgcn", "--out",
                 str(tmp_path / "out"), "--memory-limit", "512MB"])
    assert code == 2 and "reads csv and parquet" in capsys.readouterr().err


# Peak RSS of this process (VmHWM: a fresh address space starts at 0 after exec, unlike
# ru_maxrss, which keeps the forking parent's figure) and of its largest child.
_PEAK = """
import resource, sys
from recsys_ccl.cli import main
rc = main(sys.argv[1:])
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
print(max(int(hwm), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024)
sys.exit(rc)
"""


@pytest.mark.slow
def test_stays_within_the_limit_on_an_input_larger_than_it(tmp_path):
    """1.4 x 10^7 interactions (a CSV of ~345 MB, ~350 MB in memory as Arrow) under the
    smallest limit, 320MB: the peak RSS of the command and of its child."""
    limit = 320 * 10**6
    csv = tmp_path / "in.csv"
    subprocess.run([sys.executable, "-m", "recsys_ccl.cli", "synth", "--out", str(csv),
                    "--users", "100000", "--items", "50000", "--interactions", "14000000"],
                   check=True, capture_output=True)
    assert csv.stat().st_size > limit
    args = ["prepare", "--input", str(csv), "--format", "csv", "--k-core", "5",
            "--split", "temporal"]
    r = subprocess.run([sys.executable, "-c", _PEAK, *args, "--out", str(tmp_path / "ooc"),
                        "--memory-limit", "320MB"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1])
    assert peak <= limit, f"peak RSS {peak / 1e6:.0f} MB over the {limit / 1e6:.0f} MB limit"
    assert pl.scan_csv(csv).collect().estimated_size() > limit, "the input is larger"
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    _same_output(tmp_path / "ooc", tmp_path / "ref")
