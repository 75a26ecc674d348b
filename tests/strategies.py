"""Hypothesis strategies shared by the data tests."""

from __future__ import annotations

import hypothesis.strategies as st


def sometimes_none(lo: int, hi: int) -> st.SearchStrategy[int | None]:
    """An integer in [lo, hi], or (one time in hi - lo + 2) None: most rows stay usable (with
    `one_of(none(), ...)` half of each field was None, and few rows reached the steps worth
    testing)."""
    return st.integers(lo - 1, hi).map(lambda v: None if v < lo else v)
