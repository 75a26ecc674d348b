"""The Polars path's temporal split, run on order-preserving integer codes.

Ids and times become integer codes that sort as the values do (the offset from the minimum
where the range is small, ranks among the distinct values otherwise). Then (user, time,
item) and (user, item, position) each pack into one UInt64, and the whole of clean -> k-core
-> split -> drop cold -> vocabularies -> encode is two in-place NumPy sorts of packed values
plus linear passes (bincounts, cumsums, gathers). The generic steps in `cleaning` sort three
or four columns at a time and group by hashing; this gives the same frames (tested against
the DuckDB engine) faster and in less memory (benchmarks/bench_prepare.py; the sorts and codes
are in `packed_keys`):

    drop null ids/times -> codes -> sort by (user, time) -> collapse duplicates
    -> [min rating] -> [k-core] -> split -> drop cold -> vocabularies -> encode

Ties in time are broken by input position (the sorts are stable over the input order), as in
the generic steps. Array arithmetic is done in place where it can: allocating (and
page-faulting) a fresh temporary of a column's size can cost more than the arithmetic in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys_ccl.data.item_stats import log_q
from recsys_ccl.data.packed_keys import (
    OFFSET_RANGE_PER_ROW,
    Coding,
    code_dtype,
    column_coding,
    last_of_runs,
    order_ties,
    pack,
    pack_columns,
    sort_by_key,
    stable_sort,
    tied_rows,
    unpack,
)
from recsys_ccl.data.plan import PrepareConfig, check_not_emptied
from recsys_ccl.data.readers import RawInteractions
from recsys_ccl.data.schema import ITEMS_SCHEMA, SPLIT_SCHEMA, SPLITS, USERS_SCHEMA
from recsys_ccl.errors import DataError

__all__ = ["prepare_temporal"]

_TRAIN, _VALID, _TEST = (SPLITS.index(s) for s in ("train", "valid", "test"))


@dataclass
class _Rows:
    """The interactions kept so far, in (user, time, input position) order."""

    user: np.ndarray  # (N,) uint32 codes
    item: np.ndarray  # (N,) uint32 codes
    time: np.ndarray  # (N,) uint32 codes (uint64 where they need more than 32 bits)
    rating: np.ndarray | None = None  # (N,) float64, NaN where missing

    def __len__(self) -> int:
        return len(self.user)

    def keep(self, mask: np.ndarray) -> _Rows:
        return _Rows(self.user[mask], self.item[mask], self.time[mask],
                     None if self.rating is None else self.rating[mask])


def prepare_temporal(
    raw: RawInteractions, config: PrepareConfig
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, pl.DataFrame, list[tuple[str, int]]]:
    """Clean, split (temporal) and index the normalised frame of `raw` (see `readers`), which
    is taken from it so that its columns can be let go one by one.

    Returns the split frames (SPLIT_SCHEMA, in (user_idx, ts, item_idx) order), users
    (USERS_SCHEMA), items (ITEMS_SCHEMA) and the dropped-row steps, exactly as the generic
    steps build them."""
    frame = raw.take_frame()
    n_input = frame.height
    steps: list[tuple[str, int]] = []

    def step(reason: str, before: int, after: int) -> None:
        steps.append((reason, before - after))
        check_not_emptied(steps, n_input, config)

    has_id = frame.get_column("user_id").is_not_null() & frame.get_column("item_id").is_not_null()
    usable = has_id & frame.get_column("ts").is_not_null()
    n_ids, n = int(has_id.sum()), int(usable.sum())
    step("null_id", n_input, n_ids)
    step("null_timestamp", n_ids, n)
    frame = frame.select("user_id", "item_id", "ts",
                         *(["rating"] if config.min_rating is not None else []))
    if n < n_input:
        frame = frame.filter(usable)
    del has_id, usable

    # Column by column, each let go as soon as it is coded.
    max_range = OFFSET_RANGE_PER_ROW * n + 1024
    user_id, time_id = frame.drop_in_place("user_id"), frame.drop_in_place("ts")
    users = column_coding(user_id, max_range)
    times = column_coding(time_id, 2 ** (64 - users.bits) - 1)
    key = pack_columns(user_id, users, time_id, times)
    del user_id, time_id
    item_id = frame.drop_in_place("item_id")
    items = column_coding(item_id, max_range)
    item = items.encode(item_id)
    del item_id
    rating = [frame.drop_in_place("rating").to_numpy()] if config.min_rating is not None else []
    del frame
    if users.bits + items.bits > 64:  # only past 2^30 distinct users and items
        raise DataError(f"too many distinct users and items ({users.bits} + {items.bits} bits) "
                        f"to pack a (user, item) key; use --engine duckdb")

    # Sort by (user, time); input order breaks ties, so a later row comes later.
    if not rating and users.bits + times.bits + items.bits <= 64:
        key, item = _sort_by_user_time(key, users.bits + times.bits, item, items.bits)
    else:
        key, item, *rating = sort_by_key(key, users.bits + times.bits, item, *rating)
    user, time = unpack(key, users.bits, times.bits)
    rows = _Rows(user, item, time, rating[0] if rating else None)
    del key, user, item, time, rating

    # The filters below only clear `alive`; the rows are compacted once, after them.
    alive = _latest_of_pairs(rows, users.bits, items.bits)
    kept = int(alive.sum())
    step("duplicate", n, kept)
    if config.min_rating is not None:
        alive &= rows.rating >= config.min_rating  # NaN (a missing rating) fails
        kept, before = int(alive.sum()), kept
        step("below_min_rating", before, kept)
    if config.k_core > 1:
        _k_core(rows, alive, config.k_core)
        kept, before = int(alive.sum()), kept
        step("k_core", before, kept)
    rows = rows.keep(alive)
    del alive

    split = _split_last(rows.user, config.holdout)
    if not config.keep_cold_targets:
        rows, split, cold_users, cold_items = _drop_cold(rows, split)
        steps += [("cold_user", cold_users), ("cold_item", cold_items)]
    return (*_index(rows, split, users, items, times, config.keep_cold_targets), steps)


def _sort_by_user_time(key: np.ndarray, key_bits: int, item: np.ndarray,
                       item_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """`sort_by_key(key, key_bits, item)` for a (user, time) key, by one in-place value sort.

    (user, time, item) fits in 64 bits where (user, time, input position) rarely does, so
    the rows are sorted by (user, time, item) and then only the rows that tie in (user, time)
    (few, in logs with second resolution) are put back in input order: they are found in the
    input by their key (a hash lookup), ordered by position there, and their items written
    over the tied slots: an in-place sort instead of a stable sort with a payload, faster and
    without the payload's memory."""
    packed = key.astype(np.uint64)
    packed <<= np.uint64(item_bits)
    packed |= item
    packed.sort()
    sorted_item = np.empty(len(packed), dtype=code_dtype(item_bits))
    np.bitwise_and(packed, np.uint64((1 << item_bits) - 1), out=sorted_item, casting="unsafe")
    packed >>= np.uint64(item_bits)  # now the sorted (user, time) keys
    same = packed[1:] == packed[:-1]
    if same.any():
        slots = tied_rows(same)  # groups in key order, each group contiguous
        tied_keys = pl.Series(np.unique(packed[slots]))
        rows = np.flatnonzero(pl.Series(key).is_in(tied_keys.implode()).to_numpy())
        sorted_item[slots] = item[rows[np.argsort(key[rows], kind="stable")]]
    return packed, sorted_item


def _latest_of_pairs(rows: _Rows, user_bits: int, item_bits: int) -> np.ndarray:
    """(N,) bool: the row of each (user, item) pair that is its last in (time, input
    position) order. A stable sort by the pair keeps that order within each pair, so the
    pair's last row is the one to keep."""
    pair, position = stable_sort(pack(rows.user, rows.item, item_bits), user_bits + item_bits)
    latest = np.empty(len(rows), dtype=bool)
    latest[position] = last_of_runs(pair)
    return latest


def _k_core(rows: _Rows, alive: np.ndarray, k: int) -> None:
    """Clear `alive` (N,) bool, iteratively, for rows of users and items with fewer than k
    alive rows. Counts are updated by the rows each round removes (few after the first)."""
    user_count = np.bincount(rows.user[alive], minlength=int(rows.user.max()) + 1)
    item_count = np.bincount(rows.item[alive], minlength=int(rows.item.max()) + 1)
    while True:
        removed = (user_count < k)[rows.user]
        removed |= (item_count < k)[rows.item]
        removed &= alive
        if not removed.any():
            return
        alive &= ~removed
        user_count -= np.bincount(rows.user[removed], minlength=len(user_count))
        item_count -= np.bincount(rows.item[removed], minlength=len(item_count))


def _split_last(user: np.ndarray, holdout: int) -> np.ndarray:
    """(N,) int8 split index (SPLITS order) of rows grouped by user, in time order: the last
    `holdout` of each user go to test, the `holdout` before them to valid, and at least one
    stays in train."""
    split = np.full(len(user), _TRAIN, dtype=np.int8)
    if len(user) == 0:
        return split
    end = np.append(np.flatnonzero(user[1:] != user[:-1]) + 1, len(user))  # each user's run
    size = np.diff(end, prepend=0)
    n_test = np.minimum(holdout, size - 1)
    n_valid = np.minimum(holdout, size - 1 - n_test)
    for j in range(holdout):  # the j-th row from the end of each user's run
        split[(end - 1 - j)[j < n_test]] = _TEST
        split[(end - 1 - n_test - j)[j < n_valid]] = _VALID
    return split


def _drop_cold(rows: _Rows, split: np.ndarray) -> tuple[_Rows, np.ndarray, int, int]:
    """Drop held-out rows whose user, then item, has no train row. Returns the kept rows,
    their splits and the counts dropped for users and items."""
    train = split == _TRAIN
    held = ~train
    known_user = np.bincount(rows.user[train], minlength=int(rows.user.max()) + 1) > 0
    cold_user = held & ~known_user[rows.user]
    known_item = np.bincount(rows.item[train], minlength=int(rows.item.max()) + 1) > 0
    cold_item = held & ~cold_user & ~known_item[rows.item]
    n_user, n_item = int(cold_user.sum()), int(cold_item.sum())
    if n_user + n_item == 0:
        return rows, split, 0, 0
    keep = ~(cold_user | cold_item)
    return rows.keep(keep), split[keep], n_user, n_item


def _index(rows: _Rows, split: np.ndarray, users: Coding, items: Coding, times: Coding,
           keep_cold: bool = False) -> tuple[dict[str, pl.DataFrame], pl.DataFrame,
                                             pl.DataFrame]:
    """Vocabularies over the train rows (over every row with `keep_cold`; in id order, as
    codes sort as ids do) and the encoded splits, each in (user_idx, ts, item_idx) order."""
    train = split == _TRAIN
    seen = slice(None) if keep_cold else train
    user_present = np.bincount(rows.user[seen]) > 0
    item_present = np.bincount(rows.item[seen]) > 0
    item_count = np.bincount(rows.item[train], minlength=len(item_present))
    user_idx = (np.cumsum(user_present) - 1).astype(np.int32)[rows.user]
    item_idx = (np.cumsum(item_present) - 1).astype(np.int32)[rows.item]

    # Rows are in (user, time, input position) order; the output breaks time ties by item.
    same = rows.user[1:] == rows.user[:-1]
    same &= rows.time[1:] == rows.time[:-1]
    tied, source = order_ties(same, item_idx)
    time = np.require(rows.time, requirements="W")  # copied only if read-only
    for column in (user_idx, item_idx, time, split):
        column[tied] = column[source]
    encoded = pl.DataFrame({"user_idx": user_idx, "item_idx": item_idx, "ts": times.decode(time)})
    splits = {name: encoded.filter(pl.Series(split == j)).match_to_schema(SPLIT_SCHEMA)
              for j, name in enumerate(SPLITS)}

    user_table = pl.DataFrame({
        "user_idx": np.arange(int(user_present.sum()), dtype=np.int32),
        "user_id": users.decode(np.flatnonzero(user_present)).cast(pl.String),
    }).match_to_schema(USERS_SCHEMA)
    counts = item_count[item_present].astype(np.int64)
    lq = np.full(counts.shape, -np.inf)  # an item without training rows: share 0
    lq[counts > 0] = log_q(counts[counts > 0], int(train.sum()))
    item_table = pl.DataFrame({
        "item_idx": np.arange(len(counts), dtype=np.int32),
        "item_id": items.decode(np.flatnonzero(item_present)).cast(pl.String),
        "train_count": counts,
        "log_q": lq,
    }).match_to_schema(ITEMS_SCHEMA)
    return splits, user_table, item_table
