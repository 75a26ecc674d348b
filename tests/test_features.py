"""Feature tables and cold-start splits: the encoding rules (recsys_ccl.features), prepare with
--item-features / --user-features / --cold-items / --cold-users on both engines, the row
accounting of feature tables, and one-line errors on bad feature input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from recsys_ccl.data.prepare import PrepareConfig, build_prepared, prepare
from recsys_ccl.errors import DataError
from recsys_ccl.features import (
    FeatureSpec,
    encode_table,
    fit_spec,
    infer_types,
    parse_feature_override,
)

# -- the encoding rules --


def _table() -> pl.DataFrame:
    return pl.DataFrame({
        "item_id": ["a", "b", "c", "d", "e"],
        "genre": ["rock", "jazz", "rock", None, "polka"],
        "tags": ["x|y", "y", None, "", "y|w"],
        "price": [1.0, 3.0, None, 9.0, 100.0],
        "emb": [[0.5, -1.0], [0.25, 2.0], None, [1.0, 1.0], [3.0, 0.0]],
    })


def test_types_are_inferred_and_overridable():
    df = _table()
    assert infer_types(df.schema, "item_id", sample=df) == {
        "genre": ("categorical", None), "tags": ("multi_hot", "|"),
        "price": ("numeric", None), "emb": ("vector", None)}
    got = infer_types(df.schema, "item_id", {"price": ("numeric", "log1p")}, sample=df)
    assert got["price"] == ("numeric", "log1p")
    with pytest.raises(DataError, match=r"lacks: \['colour'\]"):
        infer_types(df.schema, "item_id", {"colour": ("categorical", None)})


def test_encoding_follows_the_training_rows_only():
    """Vocabulary, mean and std come from the training rows (a, b, c); e's 'polka' and 'w'
    were never seen in training, so they take the out-of-vocabulary code 0."""
    df = _table()
    spec = fit_spec(df.head(3), "item_id", infer_types(df.schema, "item_id", sample=df))
    assert spec.field("genre").vocabulary == ("jazz", "rock")
    assert spec.field("tags").vocabulary == ("x", "y")
    price = spec.field("price")
    assert price.mean == pytest.approx(2.0) and price.std == pytest.approx(math.sqrt(2.0))
    enc = encode_table(df, spec)
    assert enc["genre"].to_list() == [2, 1, 2, 0, 0]
    assert enc["tags"].to_list() == [[1, 2], [2], [0], [0], [2, 0]]
    assert enc["price__missing"].to_list() == [False, False, True, False, False]
    assert enc["price"][2] == 0.0
    assert enc["price"][3] == pytest.approx((9.0 - 2.0) / math.sqrt(2.0))
    assert enc["emb"][2].to_list() == [0.0, 0.0] and enc["emb__missing"][2]
    assert FeatureSpec.from_dict(json.loads(spec.to_json())) == spec


def test_min_count_sends_rare_values_to_the_oov_bucket():
    df = _table()
    spec = fit_spec(df, "item_id", {"genre": ("categorical", None)}, min_count=2)
    assert spec.field("genre").vocabulary == ("rock",)
    assert encode_table(df, spec)["genre"].to_list() == [1, 0, 1, 0, 0]


@pytest.mark.parametrize(("text", "message"), [
    ("price", "expected NAME=TYPE"),
    ("price=float", "unknown type 'float'"),
    ("price=categorical:3", "categorical takes no option"),
    ("price=numeric:sqrt", "only the option log1p"),
])
def test_bad_overrides_are_one_line_errors(text, message):
    with pytest.raises(DataError, match=message):
        parse_feature_override(text)


def test_bad_values_are_named():
    df = _table().with_columns(pl.Series("price", ["1", "2.5", None, "cheap", " 3 "]))
    with pytest.raises(DataError, match="numeric but holds text: 'cheap'"):
        fit_spec(df, "item_id", {"price": ("numeric", None)})
    ragged = _table().with_columns(pl.Series("emb", [[1.0], [1.0, 2.0], None, [0.0], [1.0]]))
    with pytest.raises(DataError, match="ragged vectors"):
        fit_spec(ragged, "item_id", {"emb": ("vector", None)})


# -- prepare with feature tables --


def _inputs(root: Path, seed: int = 0, n: int = 3000) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    inter = pl.DataFrame({"user_id": rng.integers(0, 120, n).astype(str),
                          "item_id": rng.integers(0, 80, n).astype(str),
                          "timestamp": rng.integers(0, 10**6, n)})
    # ids as text with a leading zero beside their integer twin: two different items
    inter = inter.with_columns(pl.when(pl.col("item_id") == "7").then(pl.lit("007"))
                               .otherwise(pl.col("item_id")).alias("item_id"))
    inter.write_csv(root / "inter.csv")
    ids = [str(i) for i in range(90)] + ["007", "3", ""]  # 80..89 catalogue only; 3 twice
    pl.DataFrame({
        "item_id": ids,
        "genre": [["a", "b", "c"][i % 3] for i in range(len(ids))],
        "tags": ["x|y" if i % 2 else "z" for i in range(len(ids))],
        "price": [float(i % 17) for i in range(len(ids))],
    }).write_csv(root / "items.csv")
    pl.DataFrame({"user_id": [str(i) for i in range(130)],
                  "region": [f"r{i % 4}" for i in range(130)],
                  "age": [18 + i % 40 for i in range(130)]}).write_parquet(root / "users.parquet")
    return {"inter": root / "inter.csv", "items": root / "items.csv",
            "users": root / "users.parquet"}


def _config(paths, **kw) -> PrepareConfig:
    return PrepareConfig(input=str(paths["inter"]), format="csv",
                         item_features=str(paths["items"]),
                         user_features=str(paths["users"]), **kw)


def test_both_engines_write_the_same_directory(tmp_path):
    """(The random split is the one each engine draws its own way, see duckdb_engine.)"""
    split = "temporal"
    paths = _inputs(tmp_path)
    outs = []
    for engine in ("polars", "duckdb"):
        out = tmp_path / engine
        prepare(_config(paths, engine=engine, split=split, cold_items=0.1, cold_users=0.05),
                out)
        outs.append(out)
    for name in ("train", "valid", "test", "items", "users", "item_features",
                 "user_features"):
        assert (outs[0] / f"{name}.parquet").read_bytes() == \
            (outs[1] / f"{name}.parquet").read_bytes(), name
    assert (outs[0] / "features.json").read_text() == (outs[1] / "features.json").read_text()


def test_feature_rows_are_accounted_and_the_catalogue_is_kept(tmp_path):
    paths = _inputs(tmp_path)
    data = build_prepared(_config(paths))
    f = data.manifest["features"]["item"]
    assert f["rows_read"] == 93
    assert f["rows_read"] == (f["matched"] + f["catalogue_only"] + f["dropped_null_id"]
                              + f["dropped_duplicate_id"])
    assert (f["dropped_null_id"], f["dropped_duplicate_id"]) == (1, 1)
    items = data.items
    # every id of the feature table is in the catalogue, byte for byte ("007" is not "7")
    assert {str(i) for i in range(90)} | {"007"} <= set(items["item_id"].to_list())
    catalogue_only = items.filter(pl.col("item_id").is_in([str(i) for i in range(80, 90)]))
    assert catalogue_only.height == 10
    assert (catalogue_only["train_count"] == 0).all()
    assert (catalogue_only["log_q"] == -math.inf).all()
    enc = data.features["item"].table
    assert enc.height == items.height
    assert enc["item_idx"].to_list() == list(range(items.height))
    # "007" has features of its own row (genre of position 90: "a")
    idx = items.filter(pl.col("item_id") == "007")["item_idx"][0]
    genre = data.features["item"].spec.field("genre")
    assert genre.vocabulary[enc["genre"][idx] - 1] == ["a", "b", "c"][90 % 3]


def _total(data) -> int:
    return sum(s.height for s in data.splits.values())


def _held_out(data, side: str) -> set[int]:
    """Ids (indices) that have no train or valid row but do have test rows."""
    col = f"{side}_idx"
    seen = set(data.splits["train"][col].to_list()) | set(data.splits["valid"][col].to_list())
    return set(data.splits["test"][col].to_list()) - seen


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cold_items=st.floats(0.0, 0.5), cold_users=st.floats(0.0, 0.3),
       seed=st.integers(0, 1000), split=st.sampled_from(["temporal", "random"]))
@example(cold_items=0.5, cold_users=0.0, seed=0, split="temporal")  # catalogue-only items
def test_cold_hold_out_leaks_nothing_and_conserves_rows(tmp_path_factory, cold_items,
                                                        cold_users, seed, split):
    root = tmp_path_factory.mktemp("cold")
    paths = _inputs(root, seed=seed % 7)
    base = build_prepared(_config(paths, split=split, seed=seed))
    data = build_prepared(_config(paths, split=split, seed=seed, cold_items=cold_items,
                                  cold_users=cold_users))
    assert _total(data) == _total(base)  # rows move to test, none is lost or added
    assert data.manifest["rows"] == base.manifest["rows"]
    held_items = data.manifest["counts"]["cold_items_held_out"]
    held_users = data.manifest["counts"]["cold_users_held_out"]
    # a share of the items with interactions (the catalogue-only ones are cold already)
    assert held_items == round(base.items.filter(pl.col("train_count") > 0).height
                               * cold_items)
    # no held-out item or user has a train or valid row
    train_items = set(data.splits["train"]["item_idx"].to_list())
    warm = set(data.items.filter(pl.col("train_count") > 0)["item_idx"].to_list())
    assert train_items == warm
    if held_users:
        assert len(_held_out(data, "user")) >= 1
    for name in ("train", "valid"):
        assert not (set(data.splits[name]["item_idx"].to_list())
                    & (set(data.items["item_idx"].to_list()) - warm))


def test_hold_out_is_seeded(tmp_path):
    paths = _inputs(tmp_path)
    a = build_prepared(_config(paths, cold_items=0.2, seed=1))
    b = build_prepared(_config(paths, cold_items=0.2, seed=1))
    c = build_prepared(_config(paths, cold_items=0.2, seed=2))
    assert a.splits["test"].equals(b.splits["test"])
    assert not a.splits["test"].equals(c.splits["test"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--cold-items", "0.1", "--user-features", "{users}"], "--cold-items needs --item-features"),
    (["--item-features", "{items}", "--feature", "colour=categorical"],
     "no feature table has a column 'colour'"),
    (["--item-features", "{items}", "--feature", "genre=text"], "unknown type 'text'"),
    (["--item-features", "{items}", "--feature", "genre=numeric"],
     "'genre' is numeric but holds text"),
    (["--item-features", "{missing}"], "feature table not found"),
    (["--item-features", "{items}", "--cold-items", "1.5"], "--cold-items must be in"),
])
def test_cli_errors_are_one_line(tmp_path, extra, message):
    paths = _inputs(tmp_path)
    fill = {"items": paths["items"], "users": paths["users"], "missing": tmp_path / "no.csv"}
    cmd = [sys.executable, "-m", "recsys_ccl.cli", "prepare", "--input", str(paths["inter"]),
           "--format", "csv", "--out", str(tmp_path / "out"),
           *[a.format(**fill) for a in extra]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_values_encode_as_tables_do():
    """encode_values (serving's path, plain values per row) equals encode_table +
    feature_tensors on the same rows: every field type, unseen values and missing fields."""
    from recsys_ccl.features import encode_values, feature_tensors

    df = _table()
    spec = fit_spec(df.head(3), "item_id", infer_types(df.schema, "item_id", sample=df))
    rows = [{k: v for k, v in r.items() if k != "item_id" and v is not None}
            for r in df.to_dicts()]
    rows[4]["tags"] = ["y", "w"]  # a list of texts as well as "y|w" text
    got = encode_values(spec, rows)
    want = feature_tensors(encode_table(df, spec), spec)
    for name in spec.names:
        assert torch.equal(got[name], want[name]), name


# -- MovieLens' own tables (--item-features auto / --user-features auto) --


def _movielens_100k(root: Path) -> Path:
    rng = np.random.default_rng(3)
    lines = [f"{rng.integers(1, 41)}\t{rng.integers(1, 31)}\t{rng.integers(1, 6)}\t"
             f"{880000000 + i}" for i in range(600)]
    (root / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for i in range(1, 33):  # 31, 32: in the catalogue, never rated
        flags = ["1" if (i + g) % 7 == 0 or g == i % 19 else "0" for g in range(19)]
        date = "" if i == 5 else f"01-Jan-{1970 + i}"
        items.append("|".join([str(i), f"Caf\xe9 {i} ({1970 + i})", date, "",
                               "http://x", *flags]))
    (root / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    users = [f"{u}|{18 + u}|{'MF'[u % 2]}|{['student', 'writer', 'other'][u % 3]}|"
             f"{55100 + u * 7}" for u in range(1, 43)]
    (root / "u.user").write_text("\n".join(users) + "\n")
    return root


def _movielens_1m(root: Path) -> Path:
    rng = np.random.default_rng(4)
    lines = [f"{rng.integers(1, 41)}::{rng.integers(1, 31)}::{rng.integers(1, 6)}::"
             f"{970000000 + i}" for i in range(600)]
    (root / "ratings.dat").write_text("\n".join(lines) + "\n")
    movies = [f"{i}::Title {i} ({1980 + i})::{['Comedy', 'Drama|Romance', 'Action'][i % 3]}"
              for i in range(1, 33)]
    (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    users = [f"{u}::{'MF'[u % 2]}::{[1, 18, 25][u % 3]}::{u % 21}::{10000 + u}"
             for u in range(1, 43)]
    (root / "users.dat").write_text("\n".join(users) + "\n")
    return root


@pytest.mark.parametrize("layout", ["100k", "1m"])
def test_movielens_tables_are_read_with_auto(tmp_path, layout):
    root = (_movielens_100k if layout == "100k" else _movielens_1m)(tmp_path)
    data = build_prepared(PrepareConfig(input=str(root), format="movielens",
                                        item_features="auto", user_features="auto",
                                        cold_items=0.1))
    item_spec, user_spec = data.features["item"].spec, data.features["user"].spec
    assert [(f.name, f.type) for f in item_spec.fields] == [("genres", "multi_hot"),
                                                            ("year", "numeric")]
    assert [(f.name, f.type) for f in user_spec.fields] == [
        ("age", "numeric"), ("gender", "categorical"), ("occupation", "categorical"),
        ("zip3", "categorical")]
    genres = item_spec.field("genres").vocabulary
    assert ("Drama" in genres) if layout == "1m" else ("Action" in genres)
    assert set(user_spec.field("gender").vocabulary) == {"M", "F"}
    # the catalogue is the item table: 31 and 32 were never rated
    assert {"31", "32"} <= set(data.items["item_id"].to_list())
    assert data.manifest["features"]["item"]["catalogue_only"] >= 2
    assert data.manifest["counts"]["cold_items_held_out"] >= 1


def test_auto_features_need_the_movielens_format(tmp_path):
    paths = _inputs(tmp_path)
    with pytest.raises(DataError, match=r"--item-features auto .* needs --format movielens"):
        build_prepared(PrepareConfig(input=str(paths["inter"]), format="csv",
                                     item_features="auto"))


def test_numeric_columns_packed_into_a_vector(tmp_path):
    """--feature emb=vector:emb_* packs emb_0..emb_11 (ordered by number, not text) into one
    vector field; a null component makes the row's vector missing; export-side encoding of a
    table with the raw columns gives the same rows."""
    paths = _inputs(tmp_path)
    items = pl.read_csv(paths["items"], schema_overrides={"item_id": pl.String})
    rng = np.random.default_rng(0)
    comps = {f"emb_{k}": rng.normal(size=items.height) for k in range(12)}
    items = items.with_columns(**{k: pl.Series(v) for k, v in comps.items()})
    items = items.with_columns(pl.when(pl.col("item_id") == "4").then(None)
                               .otherwise(pl.col("emb_3")).alias("emb_3"))
    items.write_parquet(tmp_path / "items.parquet")
    data = build_prepared(PrepareConfig(input=str(paths["inter"]), format="csv",
                                        item_features=str(tmp_path / "items.parquet"),
                                        features=("emb=vector:emb_*",)))
    spec = data.features["item"].spec
    emb = spec.field("emb")
    assert emb.type == "vector" and emb.length == 12
    assert emb.columns == tuple(f"emb_{k}" for k in range(12))
    assert not any(n.startswith("emb_") for n in spec.names)
    table = data.features["item"].table
    idx = data.items.filter(pl.col("item_id").is_in(["4", "9"]))["item_idx"].to_list()
    rows = table.filter(pl.col("item_idx").is_in(idx)).sort("item_idx")
    four = data.items.filter(pl.col("item_id") == "4")["item_idx"][0]
    got = dict(zip(rows["item_idx"].to_list(), rows["emb__missing"].to_list(), strict=True))
    assert got[four] is True and sum(got.values()) == 1
    nine = items.filter(pl.col("item_id") == "9").row(0, named=True)
    nine_idx = data.items.filter(pl.col("item_id") == "9")["item_idx"][0]
    packed = table.filter(pl.col("item_idx") == nine_idx)["emb"][0].to_list()
    assert packed == pytest.approx([nine[f"emb_{k}"] for k in range(12)], rel=1e-6)
    # the same rule from the raw columns (what export --items reads)
    again = encode_table(items.filter(pl.col("item_id") == "9"), spec)
    assert again["emb"][0].to_list() == pytest.approx(packed)
