"""Interaction data: readers per format, cleaning, splits, vocabularies, synthetic data.

Names are imported on first use, so that `import recsys_ccl.data.<module>` (the server reads
DATA-free bundles; the CLI builds its parser) loads neither DuckDB nor the whole pipeline.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__all__ = [
    "FORMATS",
    "ColumnMap",
    "PrepareConfig",
    "PreparedData",
    "SynthConfig",
    "build_prepared",
    "generate_interactions",
    "prepare",
    "read_interactions",
    "write_synth",
]

_HOME = {
    "FORMATS": "readers", "ColumnMap": "readers", "read_interactions": "readers",
    "PrepareConfig": "plan", "PreparedData": "prepare", "build_prepared": "prepare",
    "prepare": "prepare", "SynthConfig": "synth", "generate_interactions": "synth",
    "write_synth": "synth",
}

if TYPE_CHECKING:
    from recsys_ccl.data.plan import PrepareConfig
    from recsys_ccl.data.prepare import PreparedData, build_prepared, prepare
    from recsys_ccl.data.readers import FORMATS, ColumnMap, read_interactions
    from recsys_ccl.data.synth import SynthConfig, generate_interactions, write_synth


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f"recsys_ccl.data.{_HOME[name]}"), name)
    raise AttributeError(f"module 'recsys_ccl.data' has no attribute {name!r}")
