"""Cleaning and splitting on Polars frames (the random and given splits, and the steps the
other paths share): each step takes a frame and returns the kept rows.

Each step is a pure function of a normalised frame (see `readers`). Row accounting is done by the
caller from the heights before and after, so a step cannot lose rows silently.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_ccl.data.schema import SPLIT_DTYPE

__all__ = [
    "collapse_duplicates",
    "drop_cold",
    "drop_null_ids",
    "filter_min_rating",
    "k_core",
    "pair_key",
    "split_given",
    "split_random",
]



def drop_null_ids(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Rows whose user or item id was missing or unparseable."""
    return lf.filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null())


def pair_key(df: pl.DataFrame) -> pl.Expr | None:
    """One Int64 per (user, item) that sorts as the pair does, when both ids are integers whose
    ranges multiply to less than 2^63; else None. Sorting one integer column is several times
    faster than sorting two."""
    if not (df.schema["user_id"].is_integer() and df.schema["item_id"].is_integer()):
        return None
    if df.height == 0:
        return None
    bounds = df.select(u0=pl.col("user_id").min(), u1=pl.col("user_id").max(),
                       i0=pl.col("item_id").min(), i1=pl.col("item_id").max()).row(0)
    u0, u1, i0, i1 = (int(x) for x in bounds)
    users, items = u1 - u0 + 1, i1 - i0 + 1
    if users * items >= 2**63:
        return None
    return ((pl.col("user_id").cast(pl.Int64) - u0) * items
            + (pl.col("item_id").cast(pl.Int64) - i0))


def collapse_duplicates(lf: pl.LazyFrame, key: pl.Expr | None = None) -> pl.LazyFrame:
    """One row per (user, item): the latest by time (a missing time is the earliest), then by
    position in the input. Rows come out in (user, item) order.

    With `key` (`pair_key` of the frame): sort by that one integer, then keep the row holding
    its pair's latest time and, among those, the last position (windows over a sorted key: no
    hash table). Without: sort by (user, item, time, position), which puts each pair's rows side
    by side, latest last, and keep each pair's last row."""
    if key is not None:
        t = pl.col("ts").fill_null(-(2**63))
        return (lf.with_columns(key.alias("_pair")).sort("_pair")
                .filter(t == t.max().over("_pair"))
                .filter(pl.col("row_nr") == pl.col("row_nr").max().over("_pair"))
                .drop("_pair"))
    last_of_pair = (
        (pl.col("user_id") != pl.col("user_id").shift(-1))
        | (pl.col("item_id") != pl.col("item_id").shift(-1))
    ).fill_null(True)
    return lf.sort(["user_id", "item_id", "ts", "row_nr"], nulls_last=False).filter(last_of_pair)


def filter_min_rating(lf: pl.LazyFrame, min_rating: float) -> pl.LazyFrame:
    """Implicit feedback: keep ratings >= min_rating (a missing rating does not pass)."""
    return lf.filter(pl.col("rating") >= min_rating)


def k_core(df: pl.DataFrame, k: int) -> pl.DataFrame:
    """Iteratively drop users and items with fewer than k interactions until none is left."""
    if k <= 1:
        return df
    while True:
        kept = df.filter(
            (pl.len().over("user_id") >= k) & (pl.len().over("item_id") >= k)
        )
        if kept.height == df.height:
            return kept
        df = kept


def _assign_split(rank: pl.Expr, n_test: pl.Expr, n_valid: pl.Expr) -> pl.Expr:
    """Within a user: rank < n_test -> test, the next n_valid -> valid, the rest -> train."""
    return (
        pl.when(rank < n_test).then(pl.lit("test", dtype=SPLIT_DTYPE))
        .when(rank < n_test + n_valid).then(pl.lit("valid", dtype=SPLIT_DTYPE))
        .otherwise(pl.lit("train", dtype=SPLIT_DTYPE))
        .alias("split")
    )


def split_random(
    df: pl.DataFrame, test_ratio: float, valid_ratio: float, seed: int
) -> pl.DataFrame:
    """Per user, a seeded random `test_ratio` share to test and `valid_ratio` to valid (rounded,
    at least one interaction left in train). Deterministic: keys are drawn in (user, item)
    order, so the result does not depend on the input's row order."""
    df = df.sort(["user_id", "item_id"])
    keys = np.random.default_rng(seed).random(df.height)
    n = pl.len().over("user_id")
    rank = pl.col("_key").rank("ordinal").over("user_id") - 1
    n_test = pl.min_horizontal((n * test_ratio).round().cast(pl.Int64), n - 1)
    n_valid = pl.min_horizontal((n * valid_ratio).round().cast(pl.Int64), n - 1 - n_test)
    return (
        df.with_columns(pl.Series("_key", keys))
        .with_columns(_assign_split(rank, n_test, n_valid))
        .drop("_key")
    )


def split_given(df: pl.DataFrame) -> pl.DataFrame:
    """Keep the split the input carried (LightGCN's train.txt / test.txt)."""
    return df.with_columns(pl.col("given_split").alias("split"))


def drop_cold(df: pl.DataFrame) -> tuple[pl.DataFrame, int, int]:
    """Drop valid/test rows whose user or item has no train interaction (they would have no
    trained embedding). Returns the kept rows and the counts dropped for user, then item."""
    train = df.filter(pl.col("split") == "train")
    held = pl.col("split") != "train"
    known_user = pl.col("user_id").is_in(train.get_column("user_id").unique().implode())
    known_item = pl.col("item_id").is_in(train.get_column("item_id").unique().implode())
    after_users = df.filter(~held | known_user)
    kept = after_users.filter(~held | known_item)
    return kept, df.height - after_users.height, after_users.height - kept.height
