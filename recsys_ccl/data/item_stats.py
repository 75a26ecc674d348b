"""Per-item statistics of the training split that every engine writes to items.parquet."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["log_q"]


def log_q(train_count: np.ndarray, total: int) -> np.ndarray:
    """log(train_count / total) in float64: the log of each item's share of the training
    interactions, the logQ correction of the in-batch softmax.

    Computed once per distinct count with Python's exact integer division and the C library's
    log (math.log), so the bits depend only on (count, total): not on the engine (Polars,
    DuckDB, NumPy codes), the row order or how the column was chunked. Vectorised logs
    (Polars', NumPy's SIMD paths) can differ from each other in the last bit.
    """
    counts = np.asarray(train_count, dtype=np.int64)
    if total <= 0 or (counts.size and counts.min() <= 0):
        raise ValueError(f"log_q needs positive counts and total, got total = {total}")
    distinct, inverse = np.unique(counts, return_inverse=True)
    logs = np.fromiter((math.log(int(c) / total) for c in distinct), dtype=np.float64,
                       count=distinct.size)
    return logs[inverse.reshape(-1)]
