"""Interaction data: readers per format, cleaning, splits, vocabularies, synthetic data."""

from recsys_ccl.data.prepare import PrepareConfig, PreparedData, build_prepared, prepare
from recsys_ccl.data.readers import FORMATS, ColumnMap, read_interactions
from recsys_ccl.data.synth import SynthConfig, generate_interactions, write_synth

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
