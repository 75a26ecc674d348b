"""Shared fixtures: paths to the shared data sets and small synthetic inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The Triton interpreter must be selected before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GOWALLA = SHARED_DATA / "gowalla"


@pytest.fixture(scope="session")
def gowalla_dir() -> Path:
    if not (GOWALLA / "train.txt").exists():
        pytest.skip(f"Gowalla split not found at {GOWALLA} (../shared/data is absent)")
    return GOWALLA
