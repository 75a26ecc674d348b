"""What keeps cost proportional to the work at scale: sampled evaluation that a seed
reproduces, and a bundle of a million known users whose vectors are memory-mapped, not read
in whole at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_data_dir

from recsys_ccl.cli import main
from recsys_ccl.config import TrainConfig
from recsys_ccl.evaluation import evaluate_run
from recsys_ccl.train import train


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scale")
    data = synthetic_data_dir(root, 600, 300, 15_000, seed=6)
    train(data, root / "run", TrainConfig(epochs=1, dim=16, history_len=5,
                                           eval_split="none"), progress=False)
    return root / "run", data


def test_sampled_evaluation_is_reproducible_and_says_how_many_users(run_and_data, capsys):
    run, data = run_and_data
    full = evaluate_run(run, data, "test", 20)
    a = evaluate_run(run, data, "test", 20, sample_users=100, seed=3)
    b = evaluate_run(run, data, "test", 20, sample_users=100, seed=3)
    c = evaluate_run(run, data, "test", 20, sample_users=100, seed=4)
    assert a == b  # the same users, the same figures
    assert a["users"] == 100 and a["users_total"] == full["users"] > 100
    assert "users_total" not in full and a["recall@20"] != c["recall@20"]
    assert evaluate_run(run, data, "test", 20, sample_users=full["users"]) == full
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--sample-users", "50",
                 "--seed", "1", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["users"] == 50 and out["users_total"] == full["users"]


def test_per_epoch_validation_samples_users_above_the_threshold(run_and_data, tmp_path):
    """eval_sample_users caps per-epoch validation; the sample is the same every epoch."""
    _, data = run_and_data
    cfg = TrainConfig(epochs=2, dim=16, history_len=5, eval_sample_users=80, patience=0)
    train(data, tmp_path / "run", cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [r["valid/users"] for r in lines] == [80, 80]
    assert all(r["valid/users_total"] > 80 for r in lines)


@pytest.mark.slow
def test_a_million_known_users_are_memory_mapped(tmp_path):
    """A bundle of 10^6 known users: their vectors are computed at export and mapped from
    user_embeddings.npy at load (the file is a mapping of the server process), and a known
    user's vector is the stored row."""
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth
    from recsys_ccl.export import export_bundle
    from recsys_ccl.serving.bundle import load_bundle

    write_synth(SynthConfig(users=1_000_000, items=2_000, interactions=3_000_000, seed=1),
                tmp_path / "log.parquet")
    prepare(PrepareConfig(input=str(tmp_path / "log.parquet"), format="parquet",
                          split="random"), tmp_path / "data")
    train(tmp_path / "data", tmp_path / "run", TrainConfig(dim=8, history_len=5,
                                                           eval_split="none"),
          progress=False, max_steps=2)
    manifest = export_bundle(tmp_path / "run", tmp_path / "data", tmp_path / "bundle")
    users = manifest["counts"]["users"]
    assert users > 900_000
    b = load_bundle(tmp_path / "bundle")
    path = str((tmp_path / "bundle" / "user_embeddings.npy").resolve())
    assert path in Path("/proc/self/maps").read_text()  # mapped, not read into the heap
    stored = np.load(path, mmap_mode="r")
    who = [0, users // 2, users - 1]
    assert torch.equal(b.user_vectors(who, [np.zeros(0, np.int64)] * 3),
                       torch.from_numpy(np.array(stored[who])))


def test_export_builds_an_hnsw_index_whose_recall_is_measured_and_served(run_and_data,
                                                                         tmp_path, capsys):
    """Forced here (`--index hnsw`; `auto` builds it from ANN_MIN_ITEMS items): the recall@10
    against exact search is measured at build, logged and recorded, and the server loads the
    index from the bundle and answers with it."""
    from recsys_ccl.bundle_format import ANN_INDEX_FILE, ANN_MIN_RECALL
    from recsys_ccl.serving.bundle import load_bundle

    run, data = run_and_data
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(run), "--data", str(data), "--out", str(bundle),
                 "--index", "hnsw"]) == 0
    assert "HNSW index: recall@10" in capsys.readouterr().err
    index = json.loads((bundle / "manifest.json").read_text())["index"]
    assert index["kind"] == "hnsw" and index["recall@10"] >= ANN_MIN_RECALL
    assert (bundle / ANN_INDEX_FILE).exists()
    loaded = load_bundle(bundle)
    assert loaded.index.name == "hnsw"
    users = list(range(20))
    queries = loaded.user_vectors(users, [np.zeros(0, np.int64)] * len(users))
    approx = loaded.index.search(queries, 10)[1]
    exact = load_bundle(bundle, "exact").index.search(queries, 10)[1]
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact,
                                                                      strict=True))
    assert hits / exact.numel() >= 0.9
