"""The integer-code temporal path: its building blocks against NumPy and Polars, and the whole
path against the DuckDB engine on ids of every kind (small and huge integers, text)."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from polars.testing import assert_frame_equal
from strategies import rarely_none

from recsys_ccl.data.packed_keys import (
    column_coding,
    order_ties,
    pack_columns,
    sort_by_key,
    stable_sort,
)
from recsys_ccl.data.prepare import PrepareConfig, build_prepared
from recsys_ccl.data.schema import SPLITS
from recsys_ccl.data.temporal_codes import _sort_by_user_time, _split_last
from recsys_ccl.errors import DataError


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 40), min_size=1, max_size=300),
       key_bits=st.sampled_from([6, 40, 62, 64]))
def test_stable_sort_equals_numpy_stable_argsort(values, key_bits):
    # 62 and 64 bits leave no room for the positions: the Polars path runs
    key = np.array(values, dtype=np.uint64) << np.uint64(key_bits - 6)
    expected = np.argsort(key, kind="stable")
    sorted_key, position = stable_sort(key.copy(), key_bits)
    np.testing.assert_array_equal(position, expected)
    np.testing.assert_array_equal(sorted_key, key[expected])


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 1000)), min_size=1,
                     max_size=300),
       key_bits=st.sampled_from([5, 64]))
def test_sort_by_key_carries_columns_in_stable_order(rows, key_bits):
    key = np.array([k for k, _ in rows], dtype=np.uint64) << np.uint64(key_bits - 5)
    column = np.array([v for _, v in rows], dtype=np.uint32)
    rating = np.array([v / 7 for _, v in rows])
    expected = np.argsort(key, kind="stable")
    sorted_key, sorted_column, sorted_rating = sort_by_key(key.copy(), key_bits, column, rating)
    np.testing.assert_array_equal(sorted_key, key[expected])
    np.testing.assert_array_equal(sorted_column, column[expected])
    np.testing.assert_array_equal(sorted_rating, rating[expected])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 20)), min_size=1, max_size=300))
def test_sort_by_user_time_keeps_input_order_among_ties(rows):
    # many rows tie in the key; the value sort orders them by item, and they must come back
    # in input order
    key = np.array([k for k, _ in rows], dtype=np.uint64)
    item = np.array([i for _, i in rows], dtype=np.uint32)
    expected = np.argsort(key, kind="stable")
    sorted_key, sorted_item = _sort_by_user_time(key, 4, item, 5)
    np.testing.assert_array_equal(sorted_key, key[expected])
    np.testing.assert_array_equal(sorted_item, item[expected])


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), min_size=1, max_size=200))
def test_order_ties_orders_each_run_by_the_second_key(rows):
    key = np.sort(np.array([k for k, _ in rows]))
    then_by = np.array([v for _, v in rows])
    tied, source = order_ties(key[1:] == key[:-1], then_by)
    reordered = then_by.copy()
    reordered[tied] = then_by[source]
    expected = then_by[np.lexsort((then_by, key))]
    np.testing.assert_array_equal(reordered, expected)


ids = st.one_of(
    st.lists(st.integers(-5, 60), min_size=1, max_size=80),  # offset codes
    st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=80),  # ranks: range too wide
    st.lists(st.text("ab9 ", min_size=1, max_size=4), min_size=1, max_size=80),  # text
)


@given(ids)
def test_coding_preserves_order_and_round_trips(values):
    s = pl.Series(values)
    coding = column_coding(s, max_range=4 * len(values))
    codes = coding.encode(s)
    assert int(codes.max()) < 2**coding.bits
    for a in range(len(values)):
        for b in range(len(values)):
            assert (codes[a] < codes[b]) == (values[a] < values[b])
    assert coding.decode(codes).to_list() == values


def test_pack_columns_packs_codes_slice_by_slice(monkeypatch):
    import recsys_ccl.data.packed_keys as pk

    monkeypatch.setattr(pk, "_CHUNK", 7)  # several slices, the last one short
    users, times = pl.Series([5, 3, 9, 3, 4] * 5), pl.Series(list(range(100, 125)))
    u, t = column_coding(users, 100), column_coding(times, 100)
    key = pack_columns(users, u, times, t)
    expected = (u.encode(users).astype(np.uint64) << np.uint64(t.bits)) | t.encode(times)
    np.testing.assert_array_equal(key, expected)


def test_split_last_takes_the_last_rows_of_each_user():
    user = np.array([1, 1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 4, 4], dtype=np.uint32)
    names = [SPLITS[j] for j in _split_last(user, holdout=1)]
    assert names == ["train", "train", "valid", "test", "train", "test", "train",
                     "train", "train", "train", "train", "valid", "test"]
    names = [SPLITS[j] for j in _split_last(user, holdout=2)]
    assert names == ["train", "valid", "test", "test", "train", "test", "train",
                     "train", "train", "valid", "valid", "test", "test"]


# -- the whole path against the DuckDB engine, on ids of every kind --

ID_KINDS = {
    "small": lambda v: v,
    "huge": lambda v: v * 10**16 - 4 * 10**17,  # wider than the offset-code range
    "text": lambda v: f"id{v % 7}-{v}",  # text order differs from numeric order
}


logs = st.lists(
    st.tuples(rarely_none(st.integers(0, 3)), rarely_none(st.integers(0, 12)),
              rarely_none(st.integers(0, 6)),  # few users and times: many rows tie in (user, time)
              rarely_none(st.integers(1, 5))),
    min_size=20, max_size=150,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=logs, kind=st.sampled_from(sorted(ID_KINDS)), holdout=st.integers(1, 2),
       k=st.integers(0, 3), min_rating=st.one_of(st.none(), st.integers(1, 5)),
       wide_time=st.booleans())
def test_temporal_path_equals_duckdb(tmp_path, data, kind, holdout, k, min_rating, wide_time):
    to_id = ID_KINDS[kind]
    rows = [(None if u is None else to_id(u), None if i is None else to_id(i),
             None if t is None else (t * 10**17 if wide_time else t), r)
            for u, i, t, r in data]
    path = tmp_path / "log.csv"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "rating"],
                 orient="row").write_csv(path)
    config = PrepareConfig(input=str(path), format="csv", split="temporal", holdout=holdout,
                           k_core=k, min_rating=min_rating)
    try:
        ours = build_prepared(config)
    except DataError as exc:
        assert "no interactions left" in str(exc)
        return
    duck = build_prepared(PrepareConfig(**{**config.__dict__, "engine": "duckdb"}))
    for name in SPLITS:
        assert_frame_equal(ours.splits[name], duck.splits[name])
    assert_frame_equal(ours.users, duck.users)
    assert_frame_equal(ours.items, duck.items, check_exact=True)
    assert ours.manifest["rows"] == duck.manifest["rows"]
