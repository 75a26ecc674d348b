"""The plan of a `prepare` run, below every engine: its configuration (PrepareConfig), the
choice of split, the emptiness check after each step, and the DATA manifest. The engines
(Polars frames, NumPy codes, DuckDB SQL, out of core) import this; prepare imports them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recsys_ccl.data.readers import Format, RawInteractions
from recsys_ccl.data.schema import FORMAT_VERSION, SPLITS
from recsys_ccl.errors import DataError

__all__ = ["Engine", "PrepareConfig", "SplitMethod", "check_not_emptied", "data_manifest",
           "resolve_split"]

SplitMethod = Literal["temporal", "random", "given"]

Engine = Literal["polars", "duckdb"]


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that determines a DATA directory's content (recorded in its manifest)."""

    input: str
    format: Format
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = None
    rating_col: str | None = None
    min_rating: float | None = None
    k_core: int = 0
    split: Literal["auto", "temporal", "random", "given"] = "auto"
    holdout: int = 1
    test_ratio: float = 0.1
    valid_ratio: float = 0.1
    seed: int = 0
    engine: Engine = "polars"
    memory_limit: str | None = None
    item_features: str | None = None  # feature table keyed by item_id (.csv / .parquet)
    user_features: str | None = None  # keyed by user_id
    features: tuple[str, ...] = ()  # NAME=TYPE overrides of the inferred field types
    feature_min_count: int = 1  # a categorical value needs this many training entities
    cold_items: float = 0.0  # share of items whose every interaction goes to test
    cold_users: float = 0.0
    valid_from_train: float = 0.0  # share of each user's train rows moved to valid
    # keep held-out rows whose user or item has no training row (they join the vocabularies,
    # with train_count 0) instead of dropping them: the published leave-one-out protocol
    # counts every user with a held-out item, a target no model can rank being a miss
    keep_cold_targets: bool = False

    @property
    def has_features(self) -> bool:
        return self.item_features is not None or self.user_features is not None

    def validate(self) -> None:
        if self.holdout < 1:
            raise DataError(f"--holdout must be >= 1, got {self.holdout}")
        if self.k_core < 0:
            raise DataError(f"--k-core must be >= 0, got {self.k_core}")
        for name, v in (("--test-ratio", self.test_ratio), ("--valid-ratio", self.valid_ratio)):
            if not (0.0 <= v < 1.0):
                raise DataError(f"{name} must be in [0, 1), got {v}")
        if self.test_ratio + self.valid_ratio >= 1.0:
            raise DataError(
                f"--test-ratio + --valid-ratio must be < 1, got "
                f"{self.test_ratio + self.valid_ratio}"
            )
        for name, v in (("--cold-items", self.cold_items), ("--cold-users", self.cold_users),
                        ("--valid-from-train", self.valid_from_train)):
            if not (0.0 <= v < 1.0):
                raise DataError(f"{name} must be in [0, 1), got {v}")
        if self.feature_min_count < 1:
            raise DataError(f"--feature-min-count must be >= 1, got {self.feature_min_count}")
        if self.memory_limit is not None and (self.has_features or self.cold_items
                                              or self.cold_users or self.valid_from_train
                                              or self.keep_cold_targets):
            raise DataError("feature tables, cold-start splits, --valid-from-train and "
                            "--keep-cold-targets are not supported with --memory-limit yet "
                            "(they run in memory)")
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise DataError(f"--min-rating must be a finite number, got {self.min_rating}")


def resolve_split(config: PrepareConfig, raw: RawInteractions) -> SplitMethod:
    split = config.split
    if split == "auto":
        if raw.has_given_split:
            return "given"
        return "temporal" if raw.has_time else "random"
    if split == "given" and not raw.has_given_split:
        raise DataError(f"--split given needs a format that carries a split (lightgcn), "
                        f"not {config.format}")
    if split == "temporal" and not raw.has_time:
        raise DataError("--split temporal needs a time column; none found (name it with "
                        "--time-col)")
    if split != "given" and raw.has_given_split:
        raise DataError(f"format {config.format} carries its own split; use --split given")
    return split


_EMPTY_HINT = {
    "null_id": "every row has a missing or unparseable user or item id",
    "null_timestamp": "no row has a usable timestamp (needed by --split temporal)",
    "duplicate": "collapsing duplicates",
    "below_min_rating": "--min-rating {min_rating} removed every interaction",
    "k_core": "--k-core {k_core} removed every interaction",
}


def check_not_emptied(steps: list[tuple[str, int]], n_input: int,
                      config: PrepareConfig) -> None:
    """Raise naming the first step after which no row is left."""
    remaining = n_input
    for reason, dropped in steps:
        remaining -= dropped
        if remaining == 0 and dropped > 0:
            hint = _EMPTY_HINT[reason].format(**dataclasses.asdict(config))
            raise DataError(f"no interactions left after {reason}: {hint} "
                            f"({n_input} input rows)")


def data_manifest(config: PrepareConfig, raw: RawInteractions, split: str,
                  counts: dict[str, int], dropped: dict[str, int], input_sha256: str) -> dict:
    """manifest.json of a DATA directory (without the output files' hashes, added by the
    writer). Checks the row accounting: input == kept + sum(dropped)."""
    kept = sum(counts[f"{name}_rows"] for name in SPLITS)
    if raw.num_rows != kept + sum(dropped.values()):
        raise AssertionError("row accounting does not balance")
    return {
        "format_version": FORMAT_VERSION,
        "kind": "recsys_ccl.data",
        "input": {
            "name": Path(config.input).absolute().name,
            "files": [f.name for f in raw.files],
            "sha256": input_sha256,
        },
        # the input by name and hash: no path of the machine that prepared it
        "parameters": {**dataclasses.asdict(config), "input": Path(config.input).name,
                       "split": split},
        "counts": counts,
        "rows": {"input": raw.num_rows, "kept": kept, "dropped": dropped},
        "has_time": raw.has_time,
    }
