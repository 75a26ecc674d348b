"""Steps on the split, after any engine has split and indexed the interactions (so every
engine gives the same output): a validation set carved from train (`--valid-from-train`, for
splits that come without one, such as the LightGCN benchmark's), and the cold-start hold-out
(`--cold-items`, `--cold-users`). Both move rows between splits and conserve them; both
recompute the items' train_count and log_q.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_ccl.data.item_stats import log_q
from recsys_ccl.data.schema import ITEMS_SCHEMA, SPLIT_SCHEMA
from recsys_ccl.errors import DataError

__all__ = ["carve_valid", "hold_out_cold", "with_train_counts"]

_ORDER = ["user_idx", "ts", "item_idx"]  # how prepare sorts every split


def carve_valid(splits: dict[str, pl.DataFrame], items: pl.DataFrame, fraction: float,
                seed: int) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, int]:
    """Move a seeded random `fraction` of each user's train rows (rounded, at least one row
    left in train) to valid. Keys are drawn in (user, item) order, so the result depends only
    on the rows, not on their order or the engine. Returns the splits, items with recounted
    train_count / log_q (an item whose every train row moved becomes cold), and the number of
    rows moved."""
    train = splits["train"].sort(["user_idx", "item_idx"])
    keys = np.random.default_rng([seed, 0x7A11D]).random(train.height)
    n = pl.len().over("user_idx")
    n_valid = pl.min_horizontal((n * fraction).round().cast(pl.Int64), n - 1)
    rank = pl.col("_key").rank("ordinal").over("user_idx") - 1
    marked = train.with_columns(pl.Series("_key", keys)).with_columns(
        (rank < n_valid).alias("_to_valid"))
    moved = marked.filter(pl.col("_to_valid")).drop("_key", "_to_valid")
    out = dict(splits)
    out["train"] = (marked.filter(~pl.col("_to_valid")).drop("_key", "_to_valid")
                    .sort(_ORDER, nulls_last=False).match_to_schema(SPLIT_SCHEMA))
    out["valid"] = (pl.concat([splits["valid"], moved]).sort(_ORDER, nulls_last=False)
                    .match_to_schema(SPLIT_SCHEMA))
    return out, with_train_counts(items, out["train"]), moved.height


def hold_out_cold(
    splits: dict[str, pl.DataFrame], users: pl.DataFrame, items: pl.DataFrame,
    cold_items: float, cold_users: float, seed: int,
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, dict[str, int]]:
    """Move every interaction of a seeded random `cold_items` share of the items (and
    `cold_users` of the users) to test, so that none of them appears in train or valid.
    Returns the new splits, items with train_count and log_q recomputed, and the counts."""
    rng = np.random.default_rng([seed, 0xC01D])
    n_items, n_users = items.height, users.height
    held_items = _draw(rng, n_items, cold_items)
    held_users = _draw(rng, n_users, cold_users)
    if held_items.size == 0 and held_users.size == 0:
        return splits, items, {"cold_items_held_out": 0, "cold_users_held_out": 0}
    held = (pl.col("item_idx").is_in(pl.Series(held_items, dtype=pl.Int32).implode())
            | pl.col("user_idx").is_in(pl.Series(held_users, dtype=pl.Int32).implode()))
    moved = [splits[name].filter(held) for name in ("train", "valid")]
    out = {name: splits[name].filter(~held) for name in ("train", "valid")}
    out["test"] = (pl.concat([splits["test"], *moved]).sort(_ORDER, nulls_last=False)
                   .match_to_schema(SPLIT_SCHEMA))
    if out["train"].height == 0:
        raise DataError("--cold-items / --cold-users held out every training interaction")
    items = with_train_counts(items, out["train"])
    return out, items, {"cold_items_held_out": int(held_items.size),
                        "cold_users_held_out": int(held_users.size)}


def _draw(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    k = round(n * fraction)
    return np.sort(rng.permutation(n)[:k]).astype(np.int32)


def with_train_counts(items: pl.DataFrame, train: pl.DataFrame) -> pl.DataFrame:
    """items with train_count and log_q from `train`; an item without training interactions
    has count 0 and log_q -inf (its share is 0; it is never drawn as a negative)."""
    counts = train.group_by("item_idx").len("n")
    items = (items.drop("train_count", "log_q").join(counts, on="item_idx", how="left")
             .with_columns(pl.col("n").fill_null(0).cast(pl.Int64).alias("train_count"))
             .drop("n").sort("item_idx"))
    c = items["train_count"].to_numpy()
    lq = np.full(c.shape, -np.inf)
    if (c > 0).any():
        lq[c > 0] = log_q(c[c > 0], int(c.sum()))
    return items.with_columns(pl.Series("log_q", lq)).match_to_schema(ITEMS_SCHEMA)
