"""A launch counter, so tests can assert that the Triton path ran rather than a fallback."""

from __future__ import annotations

from collections import Counter

LAUNCHES: Counter[str] = Counter()


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1
