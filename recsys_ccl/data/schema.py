"""Column names and dtypes shared by every stage of the data pipeline."""

from __future__ import annotations

import polars as pl

__all__ = [
    "FEATURES_FORMAT_VERSION",
    "FEATURES_JSON",
    "FORMAT_VERSION",
    "ITEMS_SCHEMA",
    "SPLITS",
    "SPLIT_DTYPE",
    "SPLIT_SCHEMA",
    "USERS_SCHEMA",
]

# Bumped whenever the layout or meaning of a DATA directory changes incompatibly
# (2: ids are their exact input text).
FORMAT_VERSION = 2

SPLITS = ("train", "valid", "test")
# The split of each row while preparing: an Enum is 4 bytes a row where a string is 16+.
SPLIT_DTYPE = pl.Enum(list(SPLITS))

# train.parquet / valid.parquet / test.parquet; ts is seconds since the epoch, or null.
SPLIT_SCHEMA = pl.Schema({"user_idx": pl.Int32, "item_idx": pl.Int32, "ts": pl.Int64})
USERS_SCHEMA = pl.Schema({"user_idx": pl.Int32, "user_id": pl.String})
ITEMS_SCHEMA = pl.Schema(
    {"item_idx": pl.Int32, "item_id": pl.String, "train_count": pl.Int64, "log_q": pl.Float64}
)

# features.json: {"format_version", "item": FeatureSpec dict, "user": FeatureSpec dict} (either
# side only when its table was given); item_features.parquet / user_features.parquet hold one
# encoded row per item_idx / user_idx (see recsys_ccl.features).
FEATURES_JSON = "features.json"
FEATURES_FORMAT_VERSION = 1
