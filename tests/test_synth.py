from __future__ import annotations

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from recsys_ccl.cli import main
from recsys_ccl.data.synth import SynthConfig, generate_interactions


def test_deterministic_and_seed_sensitive():
    cfg = SynthConfig(users=500, items=300, interactions=20_000, seed=1)
    a, b = generate_interactions(cfg), generate_interactions(cfg)
    assert_frame_equal(a, b)
    c = generate_interactions(SynthConfig(users=500, items=300, interactions=20_000, seed=2))
    assert not a.equals(c)
    assert a.height == 20_000 and a["user_id"].n_unique() == 500


def test_power_law_popularity_and_activity_spread():
    df = generate_interactions(SynthConfig(users=2_000, items=2_000, interactions=200_000))
    counts = np.sort(df.group_by("item_id").len()["len"].to_numpy())[::-1]
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.35  # the top 10 % of items take far more than 10 %
    acts = df.group_by("user_id").len()["len"].to_numpy()
    assert acts.max() > 5 * np.median(acts)


def test_taste_structure_is_learnable():
    """Users concentrate on few clusters: the items a user picks in the first half of their
    history predict the second half far better than global popularity does."""
    df = generate_interactions(SynthConfig(users=1_000, items=1_000, interactions=100_000))
    df = df.with_columns(pl.col("timestamp").rank("ordinal").over("user_id").alias("r"),
                         pl.len().over("user_id").alias("n"))
    early, late = df.filter(pl.col("r") <= pl.col("n") // 2), df.filter(pl.col("r") >
                                                                          pl.col("n") // 2)
    pop = set(df.group_by("item_id").len().sort("len", descending=True)["item_id"][:50])
    hit_pop = late["item_id"].is_in(list(pop)).mean()
    # item-item co-occurrence: does a user's late item appear in the early items' co-bought set
    pairs = early.select("user_id", "item_id").join(late.select("user_id", "item_id"),
                                                     on="user_id", suffix="_late")
    co = pairs.group_by("item_id", "item_id_late").len()
    top = co.sort("len", descending=True).group_by("item_id").head(10)
    joined = early.join(top, on="item_id").select("user_id", pl.col("item_id_late"))
    cand = joined.unique()
    hit_taste = late.join(cand, left_on=["user_id", "item_id"],
                          right_on=["user_id", "item_id_late"], how="semi").height / late.height
    assert hit_taste > 1.5 * hit_pop


def test_cli_writes_csv_and_parquet(tmp_path, capsys):
    for name in ("s.csv", "s.parquet"):
        assert main(["synth", "--out", str(tmp_path / name), "--users", "50", "--items", "40",
                     "--interactions", "1000"]) == 0
    a = pl.read_csv(tmp_path / "s.csv")
    b = pl.read_parquet(tmp_path / "s.parquet")
    assert_frame_equal(a, b, check_dtypes=False)
    assert a.columns == ["user_id", "item_id", "timestamp", "rating"]


def test_vectorised_generation_of_many_rows():
    """10^6 rows (a Python loop over rows would take minutes); its speed at 10^7 rows is
    measured in benchmarks/bench_prepare.py, not asserted here."""
    df = generate_interactions(SynthConfig(users=20_000, items=10_000,
                                           interactions=1_000_000))
    assert df.height == 1_000_000
    assert df["user_id"].n_unique() > 10_000 and df["item_id"].n_unique() > 5_000
