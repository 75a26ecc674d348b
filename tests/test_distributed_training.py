"""`recsys-ccl train` under torchrun with 2 gloo processes: trains, checkpoints once (rank 0),
resumes to the same weights as an uninterrupted run, and equals one process with the
2-process global batch (global in-batch negatives and DDP's gradient average)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SETS = ["batch_size=256", "dim=16", "history_len=10", 'eval_split="valid"', "patience=0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("ddp")
    write_synth(SynthConfig(users=300, items=250, interactions=12_000, clusters=6, seed=3),
                root / "log.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet", k_core=2,
                          split="temporal", holdout=1), root / "data")
    return root / "data"


def _train(data: Path, out: Path, sets: list[str], processes: int, *extra: str) -> dict:
    args = ["-m", "recsys_ccl.cli", "train", "--data", str(data), "--out", str(out),
            "--no-progress", *[a for s in sets for a in ("--set", s)], *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                str(processes), "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"] \
        if processes > 1 else [sys.executable]
    r = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, "only rank 0 prints the summary"
    return json.loads(lines[0])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def test_two_processes_train_checkpoint_once_and_resume(data_dir, tmp_path):
    # a constant rate: a run of epochs=1 then resumed to 2 follows the 2-epoch run's schedule
    # (the default cosine spans cfg.epochs, so its first epoch would differ)
    sets = [*SETS, 'lr_schedule="constant"']
    full = _train(data_dir, tmp_path / "full", [*sets, "epochs=2"], 2)
    assert full["processes"] == 2 and full["epochs"] == 2

    part = tmp_path / "part"
    _train(data_dir, part, [*sets, "epochs=1"], 2)
    state = json.loads((part / "checkpoints" / "last" / "state.json").read_text())
    assert state["epoch"] == 1 and state["world_size"] == 2
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["last"], \
        "one writer: no second checkpoint, no temporary left by another rank"
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 1
    resumed = _train(data_dir, part, [*sets, "epochs=2"], 2, "--resume")
    assert resumed["epochs"] == 2
    a, b = _weights(tmp_path / "full"), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed != uninterrupted"
    assert [json.loads(x)["epoch"] for x in (part / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]


def test_two_processes_equal_one_process_with_the_global_batch(data_dir, tmp_path):
    two = _train(data_dir, tmp_path / "two", [*SETS, "epochs=1"], 2)
    one = _train(data_dir, tmp_path / "one", [*SETS[1:], "batch_size=512", "epochs=1"], 1)
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert two["best"]["ndcg@20"] == pytest.approx(one["best"]["ndcg@20"], abs=1e-3)
    # and it is not the per-rank batch: one process with 256 trains differently
    _train(data_dir, tmp_path / "half", [*SETS, "epochs=1"], 1)
    c = _weights(tmp_path / "half")
    assert not all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-5) for k in a)


def test_a_loss_that_leaves_a_parameter_unused_trains_under_ddp(data_dir, tmp_path):
    """BPR does not use the (here learnable) temperature: DDP must be told to expect
    parameters without a gradient, or the second step fails."""
    s = _train(data_dir, tmp_path / "bpr", [*SETS, "epochs=1", 'loss="bpr"',
                                            "learn_temperature=true"], 2)
    assert s["epochs"] == 1 and s["processes"] == 2


@pytest.fixture(scope="module")
def feature_data_dir(tmp_path_factory) -> Path:
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("ddp-features")
    write_synth(SynthConfig(users=300, items=250, interactions=12_000, clusters=6, seed=3),
                root / "log.parquet", root / "items.parquet", root / "users.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet", k_core=2,
                          split="temporal", holdout=1, item_features=str(root / "items.parquet"),
                          user_features=str(root / "users.parquet"), cold_items=0.1),
            root / "data")
    return root / "data"


def test_feature_towers_under_ddp_equal_one_process(feature_data_dir, tmp_path):
    """Feature towers change nothing in DDP's contract: two processes equal one process with
    the global batch (without id dropout, whose draws are per rank)."""
    no_drop = "id_dropout=0.0"  # the default draws per rank
    two = _train(feature_data_dir, tmp_path / "two", [*SETS, "epochs=1", no_drop], 2)
    _train(feature_data_dir, tmp_path / "one",
           [*SETS[1:], "batch_size=512", "epochs=1", no_drop], 1)
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert any(k.startswith("item_fields.") for k in a)
    # the optimisers' moments are linear in the gradients: equal to rounding. The weights are
    # Adam's m / sqrt(v) steps, which magnify the rounding of a coordinate's tiny gradient (a
    # few rows differ by ~1e-4 where others agree to 1e-7); a wrong average or a missing
    # rank's rows would move whole rows by ~lr = 1e-2
    sa, sb = (load_file(tmp_path / r / "checkpoints" / "last" / "optimizer.safetensors")
              for r in ("two", "one"))
    assert sa.keys() == sb.keys() and any(k.startswith("table.") for k in sa)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), k
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-3), k
    assert two["processes"] == 2
    dropped = _train(feature_data_dir, tmp_path / "dropout", [*SETS, "epochs=1",
                                                               "id_dropout=0.3"], 2)
    assert dropped["epochs"] == 1
