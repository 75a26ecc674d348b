"""Shared fixtures: paths to the shared data sets and small synthetic inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a CUDA device the Triton kernels run through Triton's interpreter, which must be
# selected before triton is first imported; with one, the "cuda" tests compile the real kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GOWALLA = SHARED_DATA / "gowalla"


@pytest.fixture(scope="session")
def gowalla_dir() -> Path:
    if not (GOWALLA / "train.txt").exists():
        pytest.skip(f"Gowalla split not found at {GOWALLA} (../shared/data is absent)")
    return GOWALLA


def synthetic_data_dir(root: Path, users: int, items: int, interactions: int, seed: int,
                       clusters: int = 4, k_core: int = 0) -> Path:
    """A small DATA directory made by the real pipeline: synth -> prepare (temporal split)."""
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth

    write_synth(SynthConfig(users=users, items=items, interactions=interactions,
                            clusters=clusters, seed=seed), root / "log.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet", k_core=k_core,
                          split="temporal"), root / "data")
    return root / "data"


# -- serving: small real bundles made by the real pipeline (synth -> prepare -> train -> export)

def _make_bundle(root: Path, data: Path, name: str, **train_overrides) -> Path:
    from recsys_ccl.config import TrainConfig
    from recsys_ccl.export import export_bundle
    from recsys_ccl.train import train

    cfg = dict(epochs=1, batch_size=512, dim=16, history_len=10, patience=0, lr=1e-2,
               eval_split="none")
    cfg.update(train_overrides)
    train(data, root / f"run-{name}", TrainConfig(**cfg), progress=False)
    export_bundle(root / f"run-{name}", data, root / f"bundle-{name}")
    return root / f"bundle-{name}"


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """'a' and 'b': history-pooling models of different seeds (different model_version);
    'ids': a model that embeds users by id only, without the item bias. ~600 items, ~500
    users."""
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("bundles")
    write_synth(SynthConfig(users=500, items=600, interactions=20_000, clusters=10, seed=7),
                root / "log.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet", k_core=2,
                          split="temporal", holdout=1), root / "data")
    return {
        "a": _make_bundle(root, root / "data", "a", seed=1),
        "b": _make_bundle(root, root / "data", "b", seed=2),
        "ids": _make_bundle(root, root / "data", "ids", seed=3, history_len=0, item_bias=False),
    }


# -- test order: the suite must pass in any order (`pytest --reverse` runs it backwards) --

def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the tests in reverse order (to show they do not depend on it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()
