"""Steps on the split after any engine: --valid-from-train (a validation set carved from train,
e.g. for the LightGCN benchmark split, which has none), checked as properties on generated
data in the LightGCN format, on both engines."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings

from recsys_ccl.data.prepare import PrepareConfig, build_prepared


def _lightgcn(root: Path, seed: int, users: int = 60, items: int = 80) -> Path:
    """train.txt / test.txt: one line per user, `user item item ...`."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for u in range(users):
        picked = rng.choice(items, size=int(rng.integers(2, 25)), replace=False)
        cut = max(1, len(picked) * 4 // 5)
        train.append(" ".join(map(str, [u, *picked[:cut]])))
        test.append(" ".join(map(str, [u, *picked[cut:]])))
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root


def _pairs(df: pl.DataFrame) -> set[tuple[int, int]]:
    return set(zip(df["user_idx"].to_list(), df["item_idx"].to_list(), strict=True))


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.01, 0.6), seed=st.integers(0, 10_000),
       data_seed=st.integers(0, 5))
def test_valid_from_train_moves_rows_and_loses_none(tmp_path_factory, fraction, seed,
                                                    data_seed):
    root = _lightgcn(tmp_path_factory.mktemp("lgcn"), data_seed)
    base = build_prepared(PrepareConfig(input=str(root), format="lightgcn", seed=seed))
    data = build_prepared(PrepareConfig(input=str(root), format="lightgcn", seed=seed,
                                        valid_from_train=fraction))
    assert base.splits["valid"].height == 0  # the LightGCN split has none
    # rows move from train to valid only: their union is the old train, test is untouched
    assert _pairs(data.splits["train"]) | _pairs(data.splits["valid"]) == \
        _pairs(base.splits["train"])
    assert not _pairs(data.splits["train"]) & _pairs(data.splits["valid"])
    assert data.splits["test"].equals(base.splits["test"])
    assert data.manifest["counts"]["valid_from_train"] == data.splits["valid"].height
    assert data.manifest["rows"] == base.manifest["rows"]
    # per user: round(n · fraction) rows, and at least one row left in train
    n = base.splits["train"].group_by("user_idx").len("n")
    v = data.splits["valid"].group_by("user_idx").len("v")
    t = data.splits["train"].group_by("user_idx").len("t")
    per_user = n.join(v, on="user_idx", how="left").join(t, on="user_idx", how="left").fill_null(0)
    for row in per_user.iter_rows(named=True):
        assert row["t"] >= 1
        assert row["v"] == min(round(row["n"] * fraction), row["n"] - 1)
    # the items' counts follow the new train split
    counts = dict(data.splits["train"].group_by("item_idx").len("c").iter_rows())
    assert all(c == counts.get(i, 0) for i, c in
               zip(data.items["item_idx"], data.items["train_count"], strict=True))


def test_valid_from_train_is_seeded_and_engine_independent(tmp_path):
    root = _lightgcn(tmp_path, 1)
    runs = {(engine, seed): build_prepared(PrepareConfig(
        input=str(root), format="lightgcn", seed=seed, engine=engine, valid_from_train=0.2))
        for engine in ("polars", "duckdb") for seed in (0, 1)}
    for name in ("train", "valid", "test"):
        assert runs[("polars", 0)].splits[name].equals(runs[("duckdb", 0)].splits[name])
    again = build_prepared(PrepareConfig(input=str(root), format="lightgcn", seed=0,
                                         valid_from_train=0.2))
    assert runs[("polars", 0)].splits["valid"].equals(again.splits["valid"])
    assert not runs[("polars", 0)].splits["valid"].equals(runs[("polars", 1)].splits["valid"])
