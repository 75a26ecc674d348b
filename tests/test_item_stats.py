"""log_q, the one computation every engine writes to items.parquet."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
from hypothesis import given

from recsys_ccl.data.item_stats import log_q


@given(st.lists(st.integers(1, 10**7), min_size=1, max_size=300), st.randoms())
def test_log_q_bits_depend_only_on_count_and_total(counts, rnd):
    """The same bits whatever the order or chunking of the column (vectorised logs can differ
    in the last bit between positions, engines and chunk boundaries)."""
    arr = np.array(counts, dtype=np.int64)
    total = int(arr.sum())
    whole = log_q(arr, total)
    perm = np.array(rnd.sample(range(len(arr)), len(arr)))
    assert np.array_equal(log_q(arr[perm], total), whole[perm])
    cut = rnd.randrange(len(arr) + 1)
    assert np.array_equal(np.concatenate([log_q(arr[:cut], total), log_q(arr[cut:], total)]),
                          whole)
    assert [math.log(c / total) for c in counts] == whole.tolist()
