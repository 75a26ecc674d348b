"""The transformer user tower: causal, blind to padding, trained on every position with one
loss call that a float64 reference reproduces, served as evaluated, resumable bit for bit, and
the same under two processes as in one with the global batch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import Histories, load_data_dir
from recsys_ccl.errors import RecsysError
from recsys_ccl.model import TwoTower
from recsys_ccl.objective import sequence_batch_loss
from recsys_ccl.train import train

TINY = dict(user_tower="transformer", dim=16, max_len=8, layers=2, heads=3, item_bias=True)
FAST = dict(**{**TINY, "max_len": 12}, epochs=2, batch_size=256, patience=0,
            extra_negatives=32, lr=3e-3)


def _model(seed: int = 0, **over) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(TrainConfig(**{**TINY, **over}).model_config(7, 40)).eval()


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory) -> Path:
    """A sequences file (`user item item ...`, time order) through prepare's leave-one-out."""
    from recsys_ccl.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("seq")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(300):  # each user walks a cyclic chain of items, with noise
        n, start = int(rng.integers(4, 20)), int(rng.integers(0, 60))
        items = [(start + 3 * k + int(rng.integers(0, 2))) % 60 for k in range(n)]
        lines.append(" ".join(map(str, [f"u{u}", *(f"i{i}" for i in items)])))
    (root / "seq.txt").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(input=str(root / "seq.txt"), format="sequences", split="temporal",
                          holdout=1), root / "data")
    return root / "data"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 8), t=st.integers(0, 7),
       item=st.integers(0, 39))
def test_a_later_item_never_changes_an_earlier_position(seed, n, t, item):
    model = _model(seed % 3)
    g = torch.Generator().manual_seed(seed)
    seq = torch.full((1, 8), -1)
    seq[0, 8 - n:] = torch.randint(0, 40, (n,), generator=g)
    t = min(t, 7)
    changed = seq.clone()
    if changed[0, t] >= 0:
        changed[0, t] = item
    with torch.no_grad():
        a, b = model.encode_positions(seq), model.encode_positions(changed)
    assert torch.equal(a[0, 8 - n: t], b[0, 8 - n: t])  # every position before t


@pytest.mark.parametrize("pad", [1, 3, 5])
def test_left_padding_changes_nothing(pad):
    model = _model(1)
    items = torch.tensor([[5, 9, 2]])
    padded = torch.cat([torch.full((1, pad), -1), items], 1)
    with torch.no_grad():
        a = model.encode_positions(items)
        b = model.encode_positions(padded)[:, pad:]
        u1, u2 = model.encode_users(None, items), model.encode_users(None, padded)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(u1, u2, rtol=0, atol=1e-6)


def test_each_position_is_the_prefix_it_ends():
    """Position t's output is the user vector of the prefix ending at t: training on every
    position trains what serving computes for a user with that history."""
    model = _model(2)
    seq = torch.tensor([[3, 14, 15, 9, 26, 5]])
    with torch.no_grad():
        every = model.encode_positions(seq)
        for t in range(6):
            torch.testing.assert_close(every[0, t], model.encode_users(None, seq[:, :t + 1])[0],
                                       rtol=0, atol=1e-6)


def test_the_per_position_loss_equals_a_float64_reference(seq_data):
    """One call: every non-padding position of the batch is a query, its next item the
    positive; the batch's targets (logQ-corrected) and K shared uniform negatives are the
    columns; accidental hits masked. Recomputed in float64 from the model's own vectors."""
    data = load_data_dir(seq_data)
    cfg = TrainConfig(**{**TINY, "extra_negatives": 11, "loss_impl": "torch", "dropout": 0.0})
    torch.manual_seed(3)
    model = TwoTower(cfg.model_config(data.num_users, data.num_items))
    seqs = Histories.from_pairs(*data.splits["train"], data.num_users, cfg.max_len + 1)
    users = torch.arange(0, 60, 3)
    loss = sequence_batch_loss(model, cfg, data, seqs, users, torch.Generator().manual_seed(9))

    window = seqs[users]
    inputs, targets = window[:, :-1], window[:, 1:]
    query = (inputs >= 0) & (targets >= 0)
    negatives = torch.randint(0, data.num_items, (11,),
                              generator=torch.Generator().manual_seed(9))
    cols = torch.cat([targets[query], negatives])
    Q, n = int(query.sum()), data.num_items
    assert 40 < Q <= int((inputs >= 0).sum())  # padding is no query
    m = model.double()
    with torch.no_grad():
        u = m.encode_positions(inputs)[query]
        v = m.encode_items(cols)
        p = data.item_log_q[cols].double().exp()
        log_q = torch.log(Q * p + 11 / n)
        logits = u @ v.T / m.temperature - log_q
        hit = (cols[:Q, None] == cols[None, :]) & ~torch.eye(Q, len(cols), dtype=torch.bool)
        want = F.cross_entropy(logits.masked_fill(hit, -torch.inf), torch.arange(Q))
    assert abs(float(loss.detach()) - float(want)) / float(want) < 2e-5


def test_transformer_config_rules():
    with pytest.raises(RecsysError, match="user_id_embedding=True is out of range"):
        TrainConfig(user_tower="transformer", user_id_embedding=True)
    with pytest.raises(RecsysError, match="heads=2 is out of range"):
        TrainConfig(user_tower="transformer", dim=128, heads=2)  # 127 wide with the bias
    cfg = TrainConfig(user_tower="transformer")
    assert not cfg.uses_user_ids and cfg.sequence_length == cfg.max_len
    assert not cfg.model_config(3, 4).user_id_embedding


def test_trains_beyond_popularity_and_serves_what_it_evaluates(seq_data, tmp_path):
    """The transformer learns the chains (far above popularity); a bundle exported with the
    history before the test split serves exactly what offline evaluation scores, and a
    request history (oldest first) gives the vector of that sequence."""
    from recsys_ccl.evaluation import evaluate_run, evaluate_server
    from recsys_ccl.export import export_bundle
    from recsys_ccl.serving.bundle import load_bundle
    from recsys_ccl.serving.server import RecommenderServer

    run = tmp_path / "run"
    train(seq_data, run, TrainConfig(**{**FAST, "epochs": 6}), progress=False)
    got = evaluate_run(run, seq_data, "test", 10)
    pop = evaluate_run(None, seq_data, "test", 10, "popularity")
    assert got["hit@10"] > 2 * pop["hit@10"], (got, pop)
    export_bundle(run, seq_data, tmp_path / "bundle", history_splits="train,valid")
    with RecommenderServer(tmp_path / "bundle", port=0) as srv:
        served = evaluate_server(srv.target, seq_data, "test", 10)
    for key in ("recall@10", "ndcg@10", "hit@10", "mrr@10", "users"):
        assert served[key] == pytest.approx(got[key], abs=1e-6), key
    b = load_bundle(tmp_path / "bundle")
    ids = b.item_ids[[3, 17, 8]].tolist()
    with torch.no_grad():
        want = b.model.encode_users(None, torch.tensor([[3, 17, 8]]))
    assert torch.allclose(b.user_vectors([None], [np.array([3, 17, 8])]), want, atol=1e-6)
    assert ids  # the ids the request would name, oldest first


def test_resume_is_bit_identical(seq_data, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 2})
    train(seq_data, tmp_path / "whole", cfg, progress=False)
    train(seq_data, tmp_path / "cut", cfg, progress=False, max_steps=3)
    train(seq_data, tmp_path / "cut", cfg, progress=False, resume=True)
    a = load_file(tmp_path / "whole" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one_with_the_global_batch(seq_data, tmp_path):
    def run(out: Path, processes: int, batch: int) -> dict[str, torch.Tensor]:
        sets = {**FAST, "epochs": 1, "batch_size": batch, "extra_negatives": 0,
                "dropout": 0.0, "eval_split": "none"}
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(processes), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                    "127.0.0.1:0"] if processes > 1 else [sys.executable]
        r = subprocess.run([*launcher, "-m", "recsys_ccl.cli", "train", "--data",
                            str(seq_data), "--out", str(out), "--no-progress", *args],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return load_file(out / "checkpoints" / "last" / "model.safetensors")

    # the same global batches: 2 x 128 positions per step, or 256 in one process
    a, b = run(tmp_path / "two", 2, 128), run(tmp_path / "one", 1, 256)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-3), k


def test_the_published_protocol_counts_untrainable_targets_as_misses(seq_data, tmp_path):
    """--keep-cold-targets keeps every held-out row: a target first seen in valid or test
    joins the catalogue untrained, is never ranked (offline or served), and its user counts
    with a miss."""
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.evaluation import evaluate_run, evaluate_server
    from recsys_ccl.export import export_bundle
    from recsys_ccl.serving.server import RecommenderServer

    lines = (seq_data.parent / "seq.txt").read_text().splitlines()
    lines = [ln + (f" new{k}" if k % 10 == 0 else "") for k, ln in enumerate(lines)]
    (tmp_path / "seq.txt").write_text("\n".join(lines) + "\n")
    config = PrepareConfig(input=str(tmp_path / "seq.txt"), format="sequences",
                           split="temporal", holdout=1)
    prepare(config, tmp_path / "dropped")
    prepare(dataclasses.replace(config, keep_cold_targets=True), tmp_path / "kept")
    dropped, kept = load_data_dir(tmp_path / "dropped"), load_data_dir(tmp_path / "kept")
    untrained = kept.items.filter(pl.col("train_count") == 0)["item_id"].to_list()
    assert sorted(untrained) == sorted(f"new{k}" for k in range(0, 300, 10))
    assert len(kept.splits["test"][0]) == 300 == len(dropped.splits["test"][0]) + 30

    run = tmp_path / "run"
    train(tmp_path / "kept", run, TrainConfig(**{**FAST, "epochs": 3}), progress=False)
    every = evaluate_run(run, tmp_path / "kept", "test", 10)
    assert every["users"] == 300
    export_bundle(run, tmp_path / "kept", tmp_path / "bundle", history_splits="train,valid")
    with RecommenderServer(tmp_path / "bundle", port=0) as srv:
        served = evaluate_server(srv.target, tmp_path / "kept", "test", 10)
        from recsys_ccl.serving.client import RecommenderClient

        with RecommenderClient(srv.target) as client:
            got = client.recommend("u0", 60, exclude_seen=False)
    assert not {x.item_id for x in got.items} & set(untrained)  # never ranked
    for key in ("hit@10", "ndcg@10", "users"):
        assert served[key] == pytest.approx(every[key], abs=1e-6), key
