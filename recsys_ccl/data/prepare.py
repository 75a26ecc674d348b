"""`recsys-ccl prepare`: raw interactions -> a DATA directory.

    read (readers) -> drop null ids -> [drop null times] -> collapse duplicates -> [min rating]
    -> [k-core] -> split -> drop cold valid/test rows -> vocabularies -> Parquet + manifest

Engines: the Polars path runs a temporal split on integer codes (`temporal_codes`) and the
random and given splits on frames (`cleaning`); the DuckDB engine runs them all in SQL
(`duckdb_engine`); `--memory-limit` streams through both (`out_of_core`). All give the same
frames. Every input row is accounted for: `manifest["rows"]["input"] == kept + sum(dropped)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_ccl.data import cleaning
from recsys_ccl.data.feature_tables import EncodedFeatures, add_features
from recsys_ccl.data.item_stats import log_q
from recsys_ccl.data.plan import (
    PrepareConfig,
    SplitMethod,
    check_not_emptied,
    data_manifest,
    resolve_split,
)
from recsys_ccl.data.post_split import carve_valid
from recsys_ccl.data.readers import ColumnMap, RawInteractions, read_interactions
from recsys_ccl.data.schema import (
    FEATURES_FORMAT_VERSION,
    FEATURES_JSON,
    ITEMS_SCHEMA,
    SPLIT_SCHEMA,
    SPLITS,
    USERS_SCHEMA,
)
from recsys_ccl.data.temporal_codes import prepare_temporal
from recsys_ccl.errors import DataError
from recsys_ccl.fileio import (
    BackgroundSha256,
    atomic_directory,
    sha256_file,
    write_json_atomic,
)
from recsys_ccl.progress import heartbeat

__all__ = ["PrepareConfig", "PreparedData", "build_prepared", "prepare", "prepare_summary",
           "write_prepared"]

@dataclass(frozen=True)
class PreparedData:
    """The content of a DATA directory, before it is written."""

    splits: dict[str, pl.DataFrame]  # "train"/"valid"/"test" -> SPLIT_SCHEMA frames
    users: pl.DataFrame  # USERS_SCHEMA
    items: pl.DataFrame  # ITEMS_SCHEMA
    manifest: dict[str, Any]
    features: dict[str, EncodedFeatures] = field(default_factory=dict)  # "item" / "user"


def _clean_and_split_polars(
    raw: RawInteractions, config: PrepareConfig, split: SplitMethod
) -> tuple[pl.DataFrame, list[tuple[str, int]]]:
    steps: list[tuple[str, int]] = []
    frame = raw.take_frame()  # here, not as an argument, so that it can be let go below

    def step(reason: str, df: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
        steps.append((reason, df.height - new.height))
        return new

    df = step("null_id", frame, cleaning.drop_null_ids(frame.lazy()).collect())
    del frame
    df = step("duplicate", df,
              cleaning.collapse_duplicates(df.lazy(), cleaning.pair_key(df)).collect())
    if config.min_rating is not None:
        df = step(
            "below_min_rating", df,
            cleaning.filter_min_rating(df.lazy(), config.min_rating).collect(),
        )
    df = df.select("user_id", "item_id", "ts", "row_nr",
                   *(["given_split"] if split == "given" else []))
    if config.k_core > 1:
        df = step("k_core", df, cleaning.k_core(df, config.k_core))
    if split == "random":
        df = cleaning.split_random(df, config.test_ratio, config.valid_ratio, config.seed)
    elif split == "given":
        df = cleaning.split_given(df)
    else:  # the temporal split runs on integer codes (temporal_codes)
        raise ValueError(f"the frame path does not run the {split} split")
    return df.select("user_id", "item_id", "ts", "split"), steps


def build_prepared(config: PrepareConfig) -> PreparedData:
    """Read, clean, split and index the input of `config`. Pure apart from reading."""
    config.validate()
    columns = ColumnMap(config.user_col, config.item_col, config.time_col, config.rating_col)
    raw = read_interactions(config.input, config.format, columns,
                            ratings=config.min_rating is not None)
    input_sha256 = BackgroundSha256(raw.files)
    split = resolve_split(config, raw)
    if config.min_rating is not None and not raw.has_rating:
        raise DataError("--min-rating needs a rating column; none found (name it with "
                        "--rating-col)")
    if config.engine not in ("polars", "duckdb"):
        raise DataError(f"unknown engine {config.engine!r}; expected polars or duckdb")
    if config.engine == "polars" and split == "temporal":
        splits, users, items, steps = prepare_temporal(raw, config)
    else:
        splits, users, items, steps = _clean_split_and_index(raw, config, split)
    dropped = dict(steps)
    features: dict[str, EncodedFeatures] = {}
    cold: dict[str, int] = {}
    carved = None
    if config.valid_from_train:
        splits, items, carved = carve_valid(splits, items, config.valid_from_train, config.seed)
    if config.has_features or config.cold_items or config.cold_users:
        splits, users, items, features, cold = add_features(
            splits, users, items, item_features=config.item_features,
            user_features=config.user_features, overrides=config.features,
            min_count=config.feature_min_count, cold_items=config.cold_items,
            cold_users=config.cold_users, seed=config.seed, item_col=config.item_col,
            user_col=config.user_col, fmt=config.format, input_path=config.input)

    counts = {"users": users.height, "items": items.height,
              **{f"{name}_rows": s.height for name, s in splits.items()}}
    if carved is not None:
        counts["valid_from_train"] = carved
    if features or cold:
        train_users = splits["train"].get_column("user_idx").n_unique()
        counts |= {"cold_items": int((items["train_count"] == 0).sum()),
                   "cold_users": users.height - train_users, **cold}
    manifest = data_manifest(config, raw, split, counts, dropped, input_sha256.result())
    if features:
        manifest["features"] = {side: f.counts for side, f in features.items()}
    return PreparedData(splits=splits, users=users, items=items, manifest=manifest,
                        features=features)


def _clean_split_and_index(
    raw: RawInteractions, config: PrepareConfig, split: SplitMethod
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, pl.DataFrame, list[tuple[str, int]]]:
    """The generic steps on frames: the DuckDB engine, and the Polars path's random and given
    splits (its temporal split runs on integer codes, see `temporal_codes`)."""
    if config.engine == "duckdb":
        from recsys_ccl.data.duckdb_engine import clean_and_split_duckdb  # DuckDB on demand

        df, steps = clean_and_split_duckdb(raw, config, split)
    else:
        df, steps = _clean_and_split_polars(raw, config, split)
    check_not_emptied(steps, raw.num_rows, config)

    if not config.keep_cold_targets:
        df, cold_users, cold_items = cleaning.drop_cold(df)
        steps += [("cold_user", cold_users), ("cold_item", cold_items)]

    train = df.filter(pl.col("split") == "train")
    users = _vocabulary(df if config.keep_cold_targets else train, "user_id", "user_idx")
    items = _item_vocabulary(train, df if config.keep_cold_targets else None)
    splits = {
        name: _encode(df.filter(pl.col("split") == name), users, items) for name in SPLITS
    }
    users = users.with_columns(pl.col("user_id").cast(pl.String)).match_to_schema(USERS_SCHEMA)
    items = items.drop("_native_id").match_to_schema(ITEMS_SCHEMA)
    return splits, users, items, steps


def _vocabulary(train: pl.DataFrame, id_col: str, idx_col: str) -> pl.DataFrame:
    """Contiguous int32 indices over the train ids, in id order (deterministic)."""
    return (
        train.select(id_col).unique().sort(id_col)
        .with_row_index(idx_col).with_columns(pl.col(idx_col).cast(pl.Int32))
    )


def _item_vocabulary(train: pl.DataFrame, every: pl.DataFrame | None = None) -> pl.DataFrame:
    """Items of the train rows (of `every` row when given: items without a train row get
    train_count 0 and log_q -inf) with their counts, in id order."""
    total = train.height
    counts = train.group_by("item_id").len("train_count")
    if every is not None:
        counts = (every.select("item_id").unique().join(counts, on="item_id", how="left")
                  .with_columns(pl.col("train_count").fill_null(0)))
    items = counts.sort("item_id").with_row_index("item_idx").select(
        pl.col("item_idx").cast(pl.Int32),
        pl.col("item_id").cast(pl.String),
        pl.col("train_count").cast(pl.Int64),
        pl.col("item_id").alias("_native_id"),
    )
    c = items["train_count"].to_numpy()
    lq = np.full(c.shape, -np.inf)
    lq[c > 0] = log_q(c[c > 0], total)
    return items.insert_column(3, pl.Series("log_q", lq))


def _encode(part: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    return (
        part.lazy()
        .join(users.lazy(), on="user_id", how="inner")  # native ids: Int64 or String
        .join(
            items.lazy().select("item_idx", pl.col("_native_id").alias("item_id")),
            on="item_id", how="inner",
        )
        .select("user_idx", "item_idx", pl.col("ts").cast(pl.Int64))
        .sort(["user_idx", "ts", "item_idx"], nulls_last=False)
        .collect()
        .match_to_schema(SPLIT_SCHEMA)
    )


def write_prepared(data: PreparedData, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a DATA directory atomically (a temporary directory renamed into place)."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for name, frame in data.splits.items():
            frame.rechunk().write_parquet(tmp / f"{name}.parquet")
        data.users.write_parquet(tmp / "users.parquet")
        data.items.write_parquet(tmp / "items.parquet")
        for side, enc in data.features.items():
            enc.table.write_parquet(tmp / f"{side}_features.parquet")
        if data.features:
            write_json_atomic(tmp / FEATURES_JSON, {
                "format_version": FEATURES_FORMAT_VERSION,
                **{side: enc.spec.to_dict() for side, enc in data.features.items()}})
        # Readers verify these: Parquet has no checksum a reader must check, so a flipped byte
        # in a page could otherwise pass as different data.
        data.manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.parquet"))}
        if data.features:
            data.manifest["files"][FEATURES_JSON] = sha256_file(tmp / FEATURES_JSON)
        write_json_atomic(tmp / "manifest.json", data.manifest)
    return Path(out)


def prepare(config: PrepareConfig, out: str | Path, *, overwrite: bool = False,
            progress: bool = False) -> dict:
    """Build and write a DATA directory; return its manifest. With `config.memory_limit`
    the out-of-core path runs (see `out_of_core`). progress: a line per step on stderr, and
    'still running' lines at least every 30 s (recsys_ccl/progress.py)."""
    out = Path(out)
    config.validate()  # a mistake in the arguments is one line, before any progress line
    if not Path(config.input).exists():
        raise DataError(f"input not found: {config.input}")
    if config.memory_limit is not None:
        from recsys_ccl.data.out_of_core import prepare_out_of_core

        with heartbeat(f"prepare 1/1: {config.input} -> {out} (out of core, within "
                       f"{config.memory_limit})", enabled=progress):
            return prepare_out_of_core(config, out, overwrite=overwrite)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    with heartbeat(f"prepare 1/2: read, clean, split and index {config.input}",
                   enabled=progress):
        data = build_prepared(config)
    with heartbeat(f"prepare 2/2: write {out}", enabled=progress):
        write_prepared(data, out, overwrite=overwrite)
    return data.manifest


def prepare_summary(manifest: dict) -> str:
    """Three lines for people: counts, the row accounting, the split."""
    c, rows = manifest["counts"], manifest["rows"]
    dropped = ", ".join(f"{k} {v:,}" for k, v in rows["dropped"].items() if v) or "none"
    lines = [
        f"users {c['users']:,}  items {c['items']:,}  "
        f"train {c['train_rows']:,}  valid {c['valid_rows']:,}  test {c['test_rows']:,}",
        f"rows: input {rows['input']:,} = kept {rows['kept']:,} + dropped "
        f"{sum(rows['dropped'].values()):,} ({dropped})",
        f"split: {manifest['parameters']['split']}"
        + (f" (valid: {c['valid_from_train']:,} rows carved from train)"
           if "valid_from_train" in c else ""),
    ]
    for side, f in manifest.get("features", {}).items():
        lines.append(
            f"{side} features: rows {f['rows_read']:,} = matched {f['matched']:,} + "
            f"catalogue only {f['catalogue_only']:,} + dropped "
            f"{f['dropped_null_id'] + f['dropped_duplicate_id']:,} (null id "
            f"{f['dropped_null_id']:,}, duplicate id {f['dropped_duplicate_id']:,}); "
            f"{f['without_features']:,} {side}s without a feature row")
    if "cold_items" in c:
        lines.append(f"cold (no training interaction): items {c['cold_items']:,} "
                     f"({c['cold_items_held_out']:,} held out), users {c['cold_users']:,} "
                     f"({c['cold_users_held_out']:,} held out)")
    return "\n".join(lines)
