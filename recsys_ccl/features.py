"""Feature spec and encoders shared by data and model: what an item's (or a user's) content
columns are, how each becomes numbers, and the statistics that make it so.

A feature table is keyed by the same id column as the interactions (item_id or user_id) and
has one column per field. Field types:

    categorical  one value per row; vocabulary from the training entities (min count), code 0
                 is the out-of-vocabulary / null bucket, 1..V the vocabulary in sorted order
    multi_hot    tokens split on a separator (genres, tags); the same vocabulary rules, each
                 row a list of codes (an empty or null row is [0])
    numeric      a number, standardised with the training entities' mean and standard
                 deviation (optionally of log1p(x)); null is 0 plus a missing indicator
    vector       a fixed-length list of floats (a precomputed text or image embedding), or N
                 numeric columns packed into one (`vector:emb_*` or `vector:a,b,c`); null (or
                 any null component) is zeros plus a missing indicator

`fit_spec` learns a spec (vocabularies, statistics) from the rows of the training entities;
`encode_table` turns any table into the encoded frame the model reads, by those rules, so an
item added after training is encoded exactly as a training item would have been. Encoded
columns: `<name>` (Int32 code, List[Int32] codes, Float32 value or List[Float32] vector) and,
for numeric and vector fields, `<name>__missing` (Boolean).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import polars as pl

from recsys_ccl.errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FIELD_TYPES",
    "FeatureField",
    "FeatureSpec",
    "FeatureValue",
    "FieldType",
    "encode_table",
    "encode_values",
    "feature_tensors",
    "fit_spec",
    "infer_types",
    "model_features",
    "pack_vector",
    "parse_feature_override",
    "vector_columns",
]

FieldType = Literal["categorical", "multi_hot", "numeric", "vector"]
FIELD_TYPES: tuple[FieldType, ...] = ("categorical", "multi_hot", "numeric", "vector")
DEFAULT_SEPARATOR = "|"
OOV = 0  # the code of a value outside the vocabulary, or of a missing value


@dataclass(frozen=True)
class FeatureField:
    """One column of a feature table and what training learnt about it."""

    name: str
    type: FieldType
    separator: str = DEFAULT_SEPARATOR  # multi_hot: between tokens of a text value
    log1p: bool = False  # numeric: standardise log1p(x) (heavy-tailed, non-negative values)
    vocabulary: tuple[str, ...] = ()  # categorical / multi_hot: code k + 1 is vocabulary[k]
    mean: float = 0.0  # numeric: of the (log1p-ed) training values
    std: float = 1.0
    length: int = 0  # vector: number of floats
    columns: tuple[str, ...] = ()  # vector: the numeric columns it packs (none: a list column)

    @property
    def cardinality(self) -> int:
        """Codes a categorical or multi_hot field takes: the vocabulary and the OOV bucket."""
        return len(self.vocabulary) + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        d["columns"] = list(self.columns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureField:
        return cls(**{**d, "vocabulary": tuple(d.get("vocabulary", ())),
                      "columns": tuple(d.get("columns", ()))})


@dataclass(frozen=True)
class FeatureSpec:
    """The fields of one feature table (item or user), keyed by `key` (item_id / user_id)."""

    key: str
    fields: tuple[FeatureField, ...] = field(default_factory=tuple)

    def field(self, name: str) -> FeatureField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def to_dict(self) -> dict:
        return {"key": self.key, "fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(key=d["key"], fields=tuple(FeatureField.from_dict(f) for f in d["fields"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def parse_feature_override(text: str) -> tuple[str, FieldType, str | None]:
    """`NAME=TYPE`, TYPE one of categorical, multi_hot[:SEP], numeric[:log1p],
    vector[:COLUMNS] (COLUMNS a glob such as emb_* or a comma-separated list: numeric columns
    packed into the vector NAME) -> (name, type, option). A one-line DataError otherwise."""
    name, eq, kind = text.partition("=")
    if not eq or not name or not kind:
        raise DataError(f"--feature {text!r}: expected NAME=TYPE with TYPE one of "
                        f"{', '.join(FIELD_TYPES)} (multi_hot:SEP, numeric:log1p)")
    base, _, option = kind.partition(":")
    if base not in FIELD_TYPES:
        raise DataError(f"--feature {text!r}: unknown type {base!r}; expected one of "
                        f"{', '.join(FIELD_TYPES)}")
    if option and base not in ("multi_hot", "numeric", "vector"):
        raise DataError(f"--feature {text!r}: {base} takes no option")
    if base == "numeric" and option not in ("", "log1p"):
        raise DataError(f"--feature {text!r}: numeric takes only the option log1p")
    return name, base, option or None  # type: ignore[return-value]


def infer_types(schema: pl.Schema, key: str,
                overrides: dict[str, tuple[FieldType, str | None]] | None = None,
                sample: pl.DataFrame | None = None) -> dict[str, tuple[FieldType, str | None]]:
    """Field type (and option) of every column but `key`: numbers -> numeric, lists of numbers
    -> vector, lists of text -> multi_hot, text -> categorical, or multi_hot on "|" when
    `sample` shows the separator in at least half of its non-null values. `overrides` win; an
    override naming a column the table lacks is an error."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(schema.names()))
    if unknown:
        raise DataError(f"--feature names columns the feature table lacks: {unknown}; it has "
                        f"{[c for c in schema.names() if c != key]}")
    out: dict[str, tuple[FieldType, str | None]] = {}
    for name, dtype in schema.items():
        if name == key:
            continue
        if name in overrides:
            out[name] = overrides[name]
            continue
        if dtype.is_numeric() or dtype == pl.Boolean:
            out[name] = ("numeric", None)
        elif isinstance(dtype, pl.List | pl.Array):
            inner = dtype.inner
            out[name] = ("vector", None) if inner.is_numeric() else ("multi_hot", None)
        elif dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum):
            out[name] = ("categorical", None)
            if sample is not None and name in sample.columns:
                values = sample.get_column(name).cast(pl.String).drop_nulls()
                with_sep = values.str.contains(DEFAULT_SEPARATOR, literal=True)
                if values.len() and with_sep.mean() >= 0.5:
                    out[name] = ("multi_hot", DEFAULT_SEPARATOR)
        else:
            raise DataError(f"feature column {name!r} has type {dtype}, which no field type "
                            f"reads; name a type with --feature {name}=TYPE or drop the column")
    return out


def _tokens(col: pl.Expr, dtype: pl.DataType, separator: str) -> pl.Expr:
    """A text or list column as a list of text tokens (empty tokens dropped)."""
    if isinstance(dtype, pl.List | pl.Array):
        lists = col.cast(pl.List(pl.String))
    else:
        lists = col.cast(pl.String).str.split(separator)
    return lists.list.eval(pl.element().filter(pl.element().str.len_bytes() > 0))


def _numeric(df: pl.DataFrame, name: str) -> pl.Series:
    """The column as Float64; text that is not a number (beyond a null) is an error."""
    s = df.get_column(name)
    if s.dtype.is_numeric() or s.dtype == pl.Boolean:
        return s.cast(pl.Float64)
    text = s.cast(pl.String)
    parsed = text.str.strip_chars().cast(pl.Float64, strict=False)
    bad = text.is_not_null() & (text.str.strip_chars() != "") & parsed.is_null()
    if bad.any():
        example = text.filter(bad)[0]
        raise DataError(f"feature {name!r} is numeric but holds text: {example!r} "
                        f"({int(bad.sum())} such values)")
    return parsed


def _vector(df: pl.DataFrame, name: str, length: int | None) -> pl.Series:
    """The column as List[Float32]; every non-null row must have the same length."""
    s = df.get_column(name)
    if not isinstance(s.dtype, pl.List | pl.Array):
        raise DataError(f"feature {name!r} is a vector but its column has type {s.dtype} "
                        "(expected a list of numbers)")
    s = s.cast(pl.List(pl.Float32))
    lengths = s.list.len().drop_nulls().unique().sort().to_list()
    expected = length if length is not None else (lengths[0] if lengths else 0)
    if any(n != expected for n in lengths):
        raise DataError(f"feature {name!r}: ragged vectors, lengths {lengths[:5]} (every "
                        f"row needs {expected} floats)")
    return s


def fit_spec(train_rows: pl.DataFrame, key: str,
             types: dict[str, tuple[FieldType, str | None]], min_count: int = 1) -> FeatureSpec:
    """Learn vocabularies (values seen in at least `min_count` training rows), means and
    standard deviations, and vector lengths from `train_rows`: the feature rows of the
    entities that have training interactions."""
    fields = []
    for name, (kind, option) in types.items():
        dtype = train_rows.schema[name]
        if kind in ("categorical", "multi_hot"):
            sep = option or DEFAULT_SEPARATOR
            if kind == "categorical":
                values = train_rows.get_column(name).cast(pl.String).drop_nulls()
            else:
                values = train_rows.select(_tokens(pl.col(name), dtype, sep)).to_series().explode()
                values = values.drop_nulls()
            counts = values.value_counts()
            vocab = counts.filter(pl.col("count") >= min_count).get_column(values.name)
            fields.append(FeatureField(name, kind, separator=sep,
                                       vocabulary=tuple(sorted(vocab.to_list()))))
        elif kind == "numeric":
            log1p = option == "log1p"
            x = _numeric(train_rows, name)
            if log1p:
                if (x.drop_nulls() < 0).any():
                    raise DataError(f"feature {name!r}: numeric:log1p needs values >= 0")
                x = x.log1p()
            x = x.drop_nulls().drop_nans()
            mean = float(x.mean()) if x.len() else 0.0
            std = float(x.std()) if x.len() > 1 else 0.0
            fields.append(FeatureField(name, "numeric", log1p=log1p, mean=mean,
                                       std=std if std > 0 and math.isfinite(std) else 1.0))
        else:
            length = _vector(train_rows, name, None).list.len().drop_nulls()
            fields.append(FeatureField(name, "vector", length=int(length[0]) if length.len()
                                       else 0))
    return FeatureSpec(key=key, fields=tuple(fields))


def vector_columns(columns: list[str], pattern: str) -> tuple[str, ...]:
    """The columns a `vector:PATTERN` packs: a comma-separated list as given, or the columns
    matching a glob, ordered by their trailing number (emb_2 before emb_10)."""
    if "," in pattern or not any(c in pattern for c in "*?["):
        return tuple(p.strip() for p in pattern.split(",") if p.strip())
    matched = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]

    def order(c: str) -> tuple[int, str]:
        digits = re.search(r"(\d+)$", c)
        return (int(digits.group(1)) if digits else -1, c)

    return tuple(sorted(matched, key=order))


def pack_vector(df: pl.DataFrame, name: str, columns: tuple[str, ...]) -> pl.DataFrame:
    """Replace numeric `columns` by one List[Float32] column `name` (null where any component
    is null); an absent or non-numeric column is an error."""
    missing = [c for c in columns if c not in df.columns]
    if not columns or missing:
        raise DataError(f"feature {name!r}: vector columns {list(missing or columns)} not in "
                        f"the table")
    x = [_numeric(df, c).cast(pl.Float32) for c in columns]
    frame = pl.DataFrame(x)
    packed = (pl.when(pl.any_horizontal(pl.all().is_null())).then(None)
              .otherwise(pl.concat_list(pl.all())))
    return df.drop(columns).with_columns(frame.select(packed.alias(name)).to_series())


def encode_table(df: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """Encode a feature table (its key column kept as is) by `spec`'s rules. Values outside a
    vocabulary take code 0; extra columns are ignored; a missing field column is an error."""
    for f in spec.fields:
        if f.columns and f.name not in df.columns:
            df = pack_vector(df, f.name, f.columns)
    missing = [f.name for f in spec.fields if f.name not in df.columns]
    if missing:
        raise DataError(f"feature table lacks the columns {missing} the model was trained with")
    out = [df.get_column(spec.key)]
    for f in spec.fields:
        dtype = df.schema[f.name]
        if f.type in ("categorical", "multi_hot"):
            codes = pl.DataFrame({"value": list(f.vocabulary)},
                                 schema={"value": pl.String}).with_row_index("code", offset=1)
            mapping = dict(zip(codes["value"].to_list(), codes["code"].to_list(), strict=True))
            if f.type == "categorical":
                s = (df.get_column(f.name).cast(pl.String)
                     .replace_strict(mapping, default=OOV, return_dtype=pl.Int32))
                out.append(s.alias(f.name))
            else:
                toks = df.select(_tokens(pl.col(f.name), dtype, f.separator)).to_series()
                coded = (toks.list.eval(pl.element().replace_strict(
                    mapping, default=OOV, return_dtype=pl.Int32)))
                coded = (pl.when(coded.is_null() | (coded.list.len() == 0))
                         .then(pl.lit([OOV], dtype=pl.List(pl.Int32))).otherwise(coded))
                out.append(pl.select(coded.alias(f.name)).to_series())
        elif f.type == "numeric":
            x = _numeric(df, f.name)
            if f.log1p:
                x = x.clip(lower_bound=0.0).log1p()
            missing_mask = x.is_null() | x.is_nan()
            z = ((x - f.mean) / f.std).fill_nan(None).fill_null(0.0).cast(pl.Float32)
            out += [z.alias(f.name), missing_mask.alias(f"{f.name}__missing")]
        else:
            v = _vector(df, f.name, f.length)
            missing_mask = v.is_null()
            v = pl.select(pl.when(v.is_null()).then(pl.lit([0.0] * f.length,
                                                           dtype=pl.List(pl.Float32)))
                          .otherwise(v).alias(f.name)).to_series()
            out += [v, missing_mask.alias(f"{f.name}__missing")]
    return pl.DataFrame(out)


# -- the model side: encoded tables as tensors, and the per-field encoders --


def feature_tensors(table: pl.DataFrame, spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """An encoded table (encode_table's columns, one row per entity in index order) as one
    tensor per field: categorical (n,) int64; multi_hot (n, T) int64 padded with the field's
    cardinality (EmbeddingBag's padding index); numeric (n, 2) and vector (n, L + 1) float32
    whose last column is the missing indicator."""
    import numpy as np
    import torch

    out: dict[str, torch.Tensor] = {}
    for f in spec.fields:
        if f.type == "categorical":
            out[f.name] = torch.from_numpy(table[f.name].to_numpy().astype(np.int64))
        elif f.type == "multi_hot":
            lists = table[f.name]
            width = max(int(lists.list.len().max() or 1), 1)
            pad = f.cardinality
            rows = np.full((table.height, width), pad, dtype=np.int64)
            lengths = lists.list.len().to_numpy().astype(np.int64)
            flat = lists.explode().to_numpy().astype(np.int64)
            r = np.repeat(np.arange(table.height), lengths)
            c = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            rows[r, c] = flat
            out[f.name] = torch.from_numpy(rows)
        elif f.type == "numeric":
            x = np.stack([table[f.name].to_numpy().astype(np.float32),
                          table[f"{f.name}__missing"].to_numpy().astype(np.float32)], 1)
            out[f.name] = torch.from_numpy(x)
        else:
            v = np.asarray(table[f.name].to_list(), dtype=np.float32).reshape(table.height,
                                                                               f.length)
            miss = table[f"{f.name}__missing"].to_numpy().astype(np.float32)[:, None]
            out[f.name] = torch.from_numpy(np.concatenate([v, miss], 1))
    return out


def model_features(spec: FeatureSpec, rows: dict[str, torch.Tensor]) -> dict:
    """ModelConfig.item_features / user_features for a spec and its encoded rows: the spec and
    each field's per-row tensor shape (what a model needs to rebuild its buffers)."""
    return {"spec": spec.to_dict(),
            "shapes": {name: list(t.shape[1:]) for name, t in rows.items()}}


FeatureValue = str | list[str] | float | list[float] | None


def encode_values(spec: FeatureSpec, rows: list[dict[str, FeatureValue]]
                  ) -> dict[str, torch.Tensor]:
    """Feature rows given as plain values ({field: value}, a missing field is null; e.g. a
    request's user features) -> the tensors feature_tensors makes, by encode_table's rules: it
    is encode_table on a small frame, so serving encodes exactly as prepare did. multi_hot
    takes a text (split on the field's separator) or a list of texts."""
    cols: dict[str, pl.Series] = {spec.key: pl.Series([str(i) for i in range(len(rows))])}
    for f in spec.fields:
        values = [r.get(f.name) for r in rows]
        if f.type == "categorical":
            cols[f.name] = pl.Series(f.name, values, dtype=pl.String)
        elif f.type == "multi_hot":
            lists = [v.split(f.separator) if isinstance(v, str) else v for v in values]
            cols[f.name] = pl.Series(f.name, lists, dtype=pl.List(pl.String))
        elif f.type == "numeric":
            cols[f.name] = pl.Series(f.name, values, dtype=pl.Float64)
        else:
            cols[f.name] = pl.Series(f.name, values, dtype=pl.List(pl.Float32))
    return feature_tensors(encode_table(pl.DataFrame(cols), spec), spec)
