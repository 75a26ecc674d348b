"""The Gowalla benchmark split must come through `prepare` with its published counts."""

from __future__ import annotations

import json

import polars as pl

from recsys_ccl.cli import main


def test_gowalla_exact_counts(gowalla_dir, tmp_path):
    out = tmp_path / "gowalla"
    assert main(["prepare", "--input", str(gowalla_dir), "--format", "lightgcn",
                 "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"] == {"users": 29_858, "items": 40_981, "train_rows": 810_128,
                           "valid_rows": 0, "test_rows": 217_242}
    assert m["rows"] == {"input": 1_027_370, "kept": 1_027_370,
                         "dropped": {"null_id": 0, "duplicate": 0, "cold_user": 0,
                                     "cold_item": 0}}
    assert m["input"]["sha256"]
    # ids are 0-based and contiguous, so the vocabulary is the identity
    users = pl.read_parquet(out / "users.parquet")
    assert (users["user_id"].cast(pl.Int64) == users["user_idx"]).all()
    test = pl.read_parquet(out / "test.parquet")
    first = (gowalla_dir / "test.txt").read_text().splitlines()[0].split()
    assert sorted(test.filter(pl.col("user_idx") == int(first[0]))["item_idx"].to_list()) == \
        sorted(int(x) for x in first[1:])
