"""Feature tables and cold-start splits in `prepare`, after any engine has split and indexed the
interactions (so every engine gives the same output):

    hold out cold items / users (all their rows to test) -> read the feature tables ->
    extend the vocabularies by the catalogue (ids with features but no interactions) ->
    fit the spec on the training entities -> encode every vocabulary row

An item (user) is cold when it has no training interaction: held out by --cold-items, or
present only in the feature table. Row accounting of a feature table: read = matched +
catalogue-only + dropped (null id, duplicate id); vocabulary entries without a feature row
are counted too (their fields are all out-of-vocabulary / missing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys_ccl.data.post_split import hold_out_cold
from recsys_ccl.data.schema import ITEMS_SCHEMA, USERS_SCHEMA
from recsys_ccl.errors import DataError
from recsys_ccl.features import (
    FeatureSpec,
    FieldType,
    encode_table,
    fit_spec,
    infer_types,
    pack_vector,
    parse_feature_override,
    vector_columns,
)

__all__ = ["EncodedFeatures", "add_features", "attach_features", "parse_overrides",
           "read_feature_table"]

# rows of a feature table looked at to infer whether a text column is multi_hot
_SAMPLE_ROWS = 10_000


@dataclass(frozen=True)
class EncodedFeatures:
    """One side's features, ready to write: the spec and one encoded row per vocabulary entry
    (in index order, the index column first)."""

    spec: FeatureSpec
    table: pl.DataFrame
    counts: dict[str, int]


def read_feature_table(path: str | Path, key: str, column: str | None = None) -> pl.DataFrame:
    """A feature table (.csv or .parquet) with its id column (`column`, the interactions' id
    column name, or else `key`) as exact id text named `key` (CSV ids are never
    type-inferred, as in `readers`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature table not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            header = pl.read_csv(path, n_rows=0).columns
            df = pl.read_csv(path, schema_overrides={c: pl.String for c in (column, key)
                                                     if c in header},
                             infer_schema_length=_SAMPLE_ROWS)
        elif suffix == ".parquet":
            df = pl.read_parquet(path)
        else:
            raise DataError(f"feature table {path.name}: expected .csv or .parquet")
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read feature table {path}: {first}") from exc
    if key not in df.columns and column in df.columns:
        df = df.rename({column: key})
    if key not in df.columns:
        raise DataError(f"feature table {path.name} has no {key!r} column (found "
                        f"{df.columns}); it must be keyed by the interactions' id column")
    if len(df.columns) < 2:
        raise DataError(f"feature table {path.name} has no feature columns besides {key!r}")
    return df.with_columns(pl.col(key).cast(pl.String))


def attach_features(
    raw: pl.DataFrame, side: str, vocab: pl.DataFrame, train: pl.DataFrame,
    overrides: dict[str, tuple[FieldType, str | None]], min_count: int,
) -> tuple[pl.DataFrame, EncodedFeatures]:
    """Take `side`'s ("item" or "user") feature table (read_feature_table), add its unseen ids
    to the vocabulary
    (new indices after the existing ones, in id order), fit the spec on the rows of entities
    with training interactions and encode one row per vocabulary entry.

    vocab: items.parquet- or users.parquet-shaped frame; train: the train split (indices).
    Returns the extended vocabulary and the encoded features."""
    key, idx = f"{side}_id", f"{side}_idx"
    read = raw.height
    no_id = raw.filter(pl.col(key).is_null() | (pl.col(key) == ""))
    raw = raw.filter(pl.col(key).is_not_null() & (pl.col(key) != ""))
    deduped = raw.unique(subset=key, keep="first", maintain_order=True)
    counts = {"rows_read": read, "dropped_null_id": no_id.height,
              "dropped_duplicate_id": raw.height - deduped.height}
    known = set(vocab.get_column(key).to_list())
    extra_ids = sorted(set(deduped.get_column(key).to_list()) - known)
    counts["matched"] = deduped.height - len(extra_ids)
    counts["catalogue_only"] = len(extra_ids)
    counts["without_features"] = vocab.height - counts["matched"]
    if extra_ids:
        start = vocab.height
        extra = pl.DataFrame({idx: pl.Series(range(start, start + len(extra_ids)),
                                             dtype=pl.Int32),
                              key: pl.Series(extra_ids, dtype=pl.String)})
        if side == "item":
            extra = extra.with_columns(pl.lit(0, dtype=pl.Int64).alias("train_count"),
                                       pl.lit(float("-inf")).alias("log_q"))
        vocab = pl.concat([vocab, extra.match_to_schema(vocab.schema)])
    packs = {}  # vector fields packed from numeric columns (this table's)
    for name, (kind, option) in overrides.items():
        if kind == "vector" and option:
            cols = vector_columns(deduped.columns, option)
            if cols and all(c in deduped.columns for c in cols):
                packs[name] = cols
                deduped = pack_vector(deduped, name, cols)
    rows = vocab.select(idx, key).join(deduped, on=key, how="left").sort(idx)

    mine = {name: t for name, t in overrides.items() if name in deduped.columns}
    types = infer_types(deduped.schema, key, mine, sample=deduped.head(_SAMPLE_ROWS))
    warm = train.get_column(idx).unique()
    fit_rows = rows.filter(pl.col(idx).is_in(warm.implode()))
    spec = fit_spec(fit_rows.drop(idx), key, types, min_count)
    spec = FeatureSpec(key=spec.key, fields=tuple(
        dataclasses.replace(f, columns=packs.get(f.name, ())) for f in spec.fields))
    table = encode_table(rows.drop(idx), spec).drop(key)
    table = rows.select(idx).hstack(table)
    schema = USERS_SCHEMA if side == "user" else ITEMS_SCHEMA
    return vocab.match_to_schema(schema), EncodedFeatures(spec, table, counts)


def _feature_table(path: str, side: str, column: str, fmt: str,
                   input_path: str) -> pl.DataFrame:
    """A feature table from its file, or "auto": MovieLens' own tables beside the ratings."""
    if path != "auto":
        return read_feature_table(path, f"{side}_id", column)
    if fmt != "movielens":
        raise DataError(f"--{side}-features auto reads MovieLens' own {side} table: it needs "
                        f"--format movielens, not {fmt}")
    from recsys_ccl.data.movielens_features import (
        movielens_item_features,
        movielens_user_features,
    )

    read = movielens_item_features if side == "item" else movielens_user_features
    return read(input_path)


def parse_overrides(texts: tuple[str, ...], *tables: pl.DataFrame | None
                    ) -> dict[str, tuple[FieldType, str | None]]:
    """--feature NAME=TYPE values -> {name: (type, option)}; a name that no given feature table
    has is an error (a typo must not pass as "inferred")."""
    out = {}
    columns = {c for t in tables if t is not None for c in t.columns}
    for text in texts:
        name, kind, option = parse_feature_override(text)
        if kind == "vector" and option:
            packed = vector_columns(sorted(columns), option)
            if not packed or any(c not in columns for c in packed):
                raise DataError(f"--feature {text!r}: no feature table has the columns "
                                f"{option!r} names")
        elif name not in columns:
            raise DataError(f"--feature {text!r}: no feature table has a column {name!r}")
        out[name] = (kind, option)
    return out


def add_features(
    splits: dict[str, pl.DataFrame], users: pl.DataFrame, items: pl.DataFrame, *,
    item_features: str | None, user_features: str | None, overrides: tuple[str, ...],
    min_count: int, cold_items: float, cold_users: float, seed: int,
    item_col: str = "item_id", user_col: str = "user_id", fmt: str = "csv",
    input_path: str = "",
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, pl.DataFrame, dict[str, EncodedFeatures],
           dict[str, int]]:
    """The whole post-split step: cold hold-out, then each feature table. Returns (splits,
    users, items, {"item"/"user": EncodedFeatures}, counts for the manifest)."""
    if cold_items and item_features is None:
        raise DataError("--cold-items needs --item-features: a held-out item can only be "
                        "recommended from its features")
    if cold_users and user_features is None:
        raise DataError("--cold-users needs --user-features: a held-out user can only be "
                        "embedded from their features")
    if overrides and item_features is None and user_features is None:
        raise DataError("--feature needs --item-features or --user-features")
    splits, items, counts = hold_out_cold(splits, users, items, cold_items, cold_users, seed)
    tables = {side: _feature_table(path, side, column, fmt, input_path)
              for side, path, column in (("item", item_features, item_col),
                                         ("user", user_features, user_col)) if path}
    parsed = parse_overrides(overrides, *tables.values())
    encoded: dict[str, EncodedFeatures] = {}
    for side, raw in tables.items():
        vocab = items if side == "item" else users
        vocab, enc = attach_features(raw, side, vocab, splits["train"], parsed, min_count)
        if side == "item":
            items = vocab
        else:
            users = vocab
        encoded[side] = enc
    return splits, users, items, encoded, counts
