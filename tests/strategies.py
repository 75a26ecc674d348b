"""Hypothesis strategies shared by the data tests."""

from __future__ import annotations

import hypothesis.strategies as st


def rarely_none(values: st.SearchStrategy) -> st.SearchStrategy:
    """`values`, or (one time in eight) None. `one_of(none(), values)` gives None about half
    the time, and with several such fields few rows reach the steps worth testing."""
    return st.tuples(st.integers(0, 7), values).map(lambda t: None if t[0] == 0 else t[1])
