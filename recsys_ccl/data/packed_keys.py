"""Packed integer keys and their sorts: the library under the temporal pipeline.

Columns become order-preserving integer codes (`column_coding`), two codes pack into one
UInt64 whose integer order is their lexicographic order (`pack`, `pack_columns`), and the
packed values sort in place (`stable_sort`, `sort_by_key`), rows that tie are put back in a
given order (`order_ties`) and runs of equal keys are found (`last_of_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

__all__ = ["OFFSET_RANGE_PER_ROW", "Coding", "code_dtype", "column_coding", "last_of_runs",
           "order_ties", "pack", "pack_columns", "sort_by_key", "stable_sort", "tied_rows",
           "unpack"]

# Offset codes index bincount tables: allow them only where a table stays near the data's size.
OFFSET_RANGE_PER_ROW = 4
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Coding:
    """How a column is coded: code r < code s exactly when value r < value s.

    bits:     how many bits the codes take (for packing two columns into one UInt64)
    offset:   codes are `value - offset` (integers), or None when they index `distinct`
    distinct: the sorted distinct values (dense-rank codes), or None
    """

    bits: int
    offset: int | None
    distinct: pl.Series | None

    def encode(self, values: pl.Series) -> np.ndarray:
        """(N,) codes of `values` (no nulls), uint32 where they fit, else uint64; computed a
        slice at a time, so no full-length temporary of the values is made."""
        codes = np.empty(values.len(), dtype=code_dtype(self.bits))
        for start in range(0, values.len(), _CHUNK):
            self.encode_into(values.slice(start, _CHUNK), codes[start:start + _CHUNK])
        return codes

    def encode_into(self, values: pl.Series, out: np.ndarray) -> None:
        """Write the codes of `values` (no nulls) into `out`, an array as long."""
        if self.distinct is not None:
            out[:] = self.distinct.search_sorted(values).to_numpy()
        else:
            np.subtract(values.cast(pl.Int64).to_numpy(), self.offset, out=out,
                        casting="unsafe")

    def decode(self, codes: np.ndarray) -> pl.Series:
        """The values of `codes` (integers as Int64, text as String)."""
        if self.distinct is not None:
            return self.distinct.gather(pl.Series(codes, dtype=pl.UInt64))
        values = codes.astype(np.int64)
        values += self.offset
        return pl.Series(values, dtype=pl.Int64)


def column_coding(values: pl.Series, max_range: int) -> Coding:
    """An order-preserving coding of a column without nulls. Integers whose range is at most
    `max_range` are coded as the offset from their minimum (no sort); anything else by rank
    among the distinct values (one sort of those)."""
    if values.dtype.is_integer() and values.len() > 0:
        lo, hi = int(values.min()), int(values.max())
        if hi - lo <= max_range:
            return Coding(_bits(hi - lo), lo, None)
    distinct = values.unique().sort()
    return Coding(_bits(distinct.len() - 1), None, distinct)


def pack_columns(major: pl.Series, major_coding: Coding, minor: pl.Series,
                 minor_coding: Coding) -> np.ndarray:
    """`pack` of two columns' codes, a slice at a time: neither column's codes are ever held
    in full (2x10^7 rows: 160 MB less at the peak)."""
    key = np.empty(major.len(), dtype=np.uint64)
    for start in range(0, major.len(), _CHUNK):
        out = key[start:start + _CHUNK]
        major_coding.encode_into(major.slice(start, _CHUNK), out)
        out <<= np.uint64(minor_coding.bits)
        out |= minor_coding.encode(minor.slice(start, _CHUNK))
    return key


def _bits(largest: int) -> int:
    return max(int(largest).bit_length(), 1)


def pack(major: np.ndarray, minor: np.ndarray, minor_bits: int) -> np.ndarray:
    """(N,) uint64 that sorts as (major, minor) does. The caller checks the bits fit."""
    key = major.astype(np.uint64)
    key <<= np.uint64(minor_bits)
    key |= minor
    return key


def unpack(key: np.ndarray, major_bits: int, minor_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The (major, minor) of `pack`, each uint32 where it fits in 32 bits, else uint64 (cast
    as they are written: no uint64 temporaries)."""
    major = np.empty(len(key), dtype=code_dtype(major_bits))
    np.right_shift(key, np.uint64(minor_bits), out=major, casting="unsafe")
    minor = np.empty(len(key), dtype=code_dtype(minor_bits))
    np.bitwise_and(key, np.uint64((1 << minor_bits) - 1), out=minor, casting="unsafe")
    return major, minor


def code_dtype(bits: int) -> type[np.unsignedinteger]:
    return np.uint32 if bits <= 32 else np.uint64


def stable_sort(key: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """`key` (N,) uint64 sorted, and the (N,) positions its values came from, input order kept
    among equal keys; `key` is consumed (it may be sorted in place).

    Where key and position fit in 64 bits together, the positions ride in the key's low bits
    and NumPy sorts the packed values in place (x86-simd-sort: several times faster, and no
    memory beyond `key`); else Polars' multithreaded stable sort with the positions as
    payload (a second array of keys at its peak). Grouping rows by the key's top bits first
    (a radix argsort) to make the rest fit is slower, and no lower at its peak."""
    n = len(key)
    position_bits = _bits(n - 1)
    if key_bits + position_bits <= 64:
        return key, _sort_with_positions(key, position_bits)
    return _polars_stable_sort(key, np.arange(n, dtype=code_dtype(position_bits)))


def sort_by_key(key: np.ndarray, key_bits: int,
                *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """`key` and `columns` (each (N,)) sorted by `key`, input order kept among equal keys;
    `key` is consumed. As `stable_sort`, but where Polars sorts, the columns ride along as its
    payload (gathered on its threads) rather than being gathered by NumPy afterwards."""
    if key_bits + _bits(len(key) - 1) <= 64:
        key, position = stable_sort(key, key_bits)
        return (key, *(c[position] for c in columns))
    return _polars_stable_sort(key, *columns)


def _polars_stable_sort(key: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """`key` and `columns` sorted by `key` with Polars (input order kept among equal keys)."""
    names = [f"c{j}" for j in range(len(columns))]
    frame = pl.DataFrame({"key": key, **dict(zip(names, columns, strict=True))})
    frame = frame.sort("key", maintain_order=True)
    return tuple(frame.drop_in_place(c).to_numpy() for c in ["key", *names])


def _sort_with_positions(key: np.ndarray, position_bits: int) -> np.ndarray:
    """Sort `key` in place, input order among equal values; return the positions (uint32
    where they fit) the sorted values came from. Needs key bits + position_bits <= 64."""
    key <<= np.uint64(position_bits)
    _add_positions(key)
    key.sort()
    position = np.empty(len(key), dtype=code_dtype(position_bits))
    np.bitwise_and(key, np.uint64((1 << position_bits) - 1), out=position, casting="unsafe")
    key >>= np.uint64(position_bits)
    return position


def _add_positions(key: np.ndarray) -> None:
    """key[j] += j, a chunk at a time (no (N,) temporary)."""
    for start in range(0, len(key), _CHUNK):
        stop = min(start + _CHUNK, len(key))
        key[start:stop] += np.arange(start, stop, dtype=np.uint64)


def last_of_runs(sorted_key: np.ndarray) -> np.ndarray:
    """(N,) bool: the last row of each run of equal keys in a sorted array."""
    last = np.ones(len(sorted_key), dtype=bool)
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=last[:-1])
    return last


def tied_rows(same: np.ndarray) -> np.ndarray:
    """The rows (ascending) that tie with a neighbour; `same` (N-1,) bool says row j+1 ties
    with row j."""
    tied = np.zeros(len(same) + 1, dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    return np.flatnonzero(tied)


def order_ties(same: np.ndarray, then_by: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each run of tied rows by `then_by`, the runs staying where they are; `same`
    (N-1,) bool says row j+1 ties with row j. Returns (rows, source): apply as
    `a[rows] = a[source]`. Only tied rows are touched: cheap when few rows tie."""
    rows = tied_rows(same)
    starts = np.ones(len(rows), dtype=bool)  # a tied row that starts its run
    inner = rows > 0
    starts[inner] = ~same[rows[inner] - 1]
    return rows, rows[np.lexsort((then_by[rows], np.cumsum(starts)))]
