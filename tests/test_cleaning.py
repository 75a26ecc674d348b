from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from recsys_ccl.data import cleaning


def frame(rows):
    return pl.DataFrame(
        rows, schema={"row_nr": pl.UInt64, "user_id": pl.Int64, "item_id": pl.Int64,
                      "ts": pl.Int64},
        orient="row",
    )


def test_collapse_duplicates_keeps_latest_then_last_in_input():
    df = frame([(0, 1, 10, 5), (1, 1, 10, 9), (2, 1, 10, 7), (3, 2, 20, 1), (4, 2, 20, 1),
                (5, 3, 30, None), (6, 3, 30, None)])
    out = cleaning.collapse_duplicates(df.lazy()).collect()
    assert sorted(out["row_nr"].to_list()) == [1, 4, 6]
    key = cleaning.pair_key(df)
    assert key is not None
    fast = cleaning.collapse_duplicates(df.lazy(), key).collect()
    assert_frame_equal(fast, out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-(2**40), -(2**40) + 4),
                          st.one_of(st.none(), st.integers(0, 3))), min_size=1, max_size=60))
def test_collapse_duplicates_integer_key_equals_the_sort(rows):
    """The one-integer-key path keeps exactly the rows (and order) of the four-column sort:
    negative and large ids, missing times, ties in time."""
    df = frame([(i, u, it, t) for i, (u, it, t) in enumerate(rows)])
    key = cleaning.pair_key(df)
    assert key is not None
    assert_frame_equal(cleaning.collapse_duplicates(df.lazy(), key).collect(),
                       cleaning.collapse_duplicates(df.lazy()).collect())


def test_pair_key_only_when_it_fits():
    assert cleaning.pair_key(frame([(0, -(2**62), 0, 1), (1, 2**62, 2, 1)])) is None
    strings = pl.DataFrame({"user_id": ["a"], "item_id": ["b"], "ts": [1], "row_nr": [0]})
    assert cleaning.pair_key(strings) is None


def test_k_core_is_iterative():
    # user 3 has one interaction; removing it leaves item 12 with one, which then goes, and
    # with it user 2 drops below 2.
    df = frame([(0, 1, 10, 0), (1, 1, 11, 0), (2, 4, 10, 0), (3, 4, 11, 0),
                (4, 2, 10, 0), (5, 2, 12, 0), (6, 3, 12, 0)])
    out = cleaning.k_core(df, 2)
    assert sorted(out["row_nr"].to_list()) == [0, 1, 2, 3]
    assert (out.group_by("user_id").len()["len"] >= 2).all()
    assert (out.group_by("item_id").len()["len"] >= 2).all()


def test_split_random_is_seeded_and_keeps_a_train_row():
    df = frame([(i, i % 7, i, i) for i in range(200)])
    a = cleaning.split_random(df, 0.2, 0.1, seed=3)
    b = cleaning.split_random(df.sample(fraction=1.0, shuffle=True, seed=1), 0.2, 0.1, seed=3)
    assert_frame_equal(a.sort("row_nr"), b.sort("row_nr"))
    assert (a.filter(pl.col("split") == "train").group_by("user_id").len().height == 7)
    c = cleaning.split_random(df, 0.2, 0.1, seed=4)
    assert not a.sort("row_nr")["split"].equals(c.sort("row_nr")["split"])


def test_drop_cold_counts_users_then_items():
    df = pl.DataFrame({"user_id": [1, 1, 2, 3], "item_id": [10, 11, 10, 99],
                       "split": ["train", "test", "train", "test"]})
    kept, cold_users, cold_items = cleaning.drop_cold(df)
    assert (cold_users, cold_items) == (1, 1)
    assert kept.height == 2
