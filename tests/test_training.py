"""Model, training, evaluation and export end to end on small synthetic data."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from recsys_ccl.checkpoint import load_run
from recsys_ccl.cli import main
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import item_histories, load_data_dir, recent_histories
from recsys_ccl.data.prepare import PrepareConfig, prepare
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.errors import RecsysError
from recsys_ccl.evaluation import evaluate_embeddings, evaluate_run, rank_metrics
from recsys_ccl.export import export_bundle
from recsys_ccl.model import ModelConfig, TwoTower
from recsys_ccl.serving.bundle import load_bundle
from recsys_ccl.train import resolve_device, scheduled_lr, train

FAST = dict(epochs=3, batch_size=512, dim=32, history_len=20, patience=0, lr=1e-2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    write_synth(SynthConfig(users=1000, items=1000, interactions=50_000, clusters=20, seed=3),
                tmp / "log.parquet")
    prepare(PrepareConfig(input=str(tmp / "log.parquet"), format="parquet", k_core=3,
                          split="temporal", holdout=1), tmp / "data")
    return tmp / "data"


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    summary = train(data_dir, run, TrainConfig(**FAST), progress=False)
    return run, summary


# -- metrics on hand-computed cases --

def test_rank_metrics_hand_computed():
    # user 0: 3 held-out items {1, 5, 9}, K = 2, top list [5, 2]: one hit at rank 0
    # user 1: 1 held-out item {2}, top list [7, 2]: hit at rank 1
    topk = torch.tensor([[5, 2], [7, 2]])
    rows, items = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 5, 9, 2])
    m = rank_metrics(topk, rows, items, torch.tensor([3, 1]), num_items=10)
    assert m["recall"].tolist() == pytest.approx([1 / 3, 1.0])  # uncapped denominator
    ideal0 = 1 + 1 / math.log2(3)  # min(K, 3) = 2 ideal positions
    assert m["ndcg"].tolist() == pytest.approx([1 / ideal0, (1 / math.log2(3)) / 1.0])
    assert m["hit"].tolist() == [1.0, 1.0]
    assert m["mrr"].tolist() == pytest.approx([1.0, 0.5])


def test_evaluate_masks_train_and_valid(tmp_path):
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4),
            ("u2", "a", 1), ("u2", "b", 2), ("u2", "c", 3), ("u2", "d", 4),
            ("u3", "c", 1), ("u3", "d", 2), ("u3", "a", 3), ("u3", "b", 4)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(
        tmp_path / "log.csv")
    prepare(PrepareConfig(input=str(tmp_path / "log.csv"), format="csv", split="temporal"),
            tmp_path / "d")
    data = load_data_dir(tmp_path / "d")
    # u1, u2: train a, b; valid c; test d.  u3: train c, d; valid a; test b.
    # Scores rank a > b > c > d for everyone; only the masking can put the held-out item first.
    items = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    users = torch.ones(3, 1)
    m = evaluate_embeddings(users, items, data, split="test", k=1)  # train and valid masked
    assert m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0 and m["users"] == 3
    m = evaluate_embeddings(users, items, data, split="valid", k=1)  # train masked
    assert m["recall@1"] == 1.0 and m["mrr@1"] == 1.0
    assert m["coverage@1"] == 0.5  # {c, a} of 4 items


# -- training end to end --

def test_beats_popularity_by_a_clear_margin(trained, data_dir):
    run, summary = trained
    assert summary["epochs"] == 3
    model = evaluate_run(run, data_dir, "test", 20)
    pop = evaluate_run(None, data_dir, "test", 20, "popularity")
    assert model["recall@20"] > 1.5 * pop["recall@20"], (model, pop)
    assert model["ndcg@20"] > 1.5 * pop["ndcg@20"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert all("valid/recall@20" in json.loads(x) for x in lines)


def test_same_seed_same_weights_and_resume_equals_uninterrupted(data_dir, tmp_path):
    """Both runs in this test, back to back in one process (same threads, same machine)."""
    cfg = TrainConfig(**FAST)
    run_full = tmp_path / "full"
    train(data_dir, run_full, cfg, progress=False)
    # one epoch of the three-epoch schedule (stop_after), then resume: the same weights as
    # three epochs straight (the default cosine schedule spans all cfg.epochs)
    assert cfg.lr_schedule == "cosine"
    part = tmp_path / "part"
    train(data_dir, part, cfg, progress=False, stop_after=1)
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 1
    train(data_dir, part, cfg, resume=True, progress=False)
    a = load_file(run_full / "checkpoints" / "last" / "model.safetensors")
    b = load_file(part / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_a_different_config(data_dir, trained):
    run, _ = trained
    with pytest.raises(RecsysError, match=r"config differs .* lr"):
        train(data_dir, run, TrainConfig(**{**FAST, "lr": 0.5}), resume=True, progress=False)


def test_existing_run_needs_resume(data_dir, trained):
    run, _ = trained
    with pytest.raises(RecsysError, match="already holds a run"):
        train(data_dir, run, TrainConfig(**FAST), progress=False)


@pytest.fixture(scope="module")
def popularity_valid(data_dir) -> float:
    return evaluate_run(None, data_dir, "valid", 20, "popularity")["recall@20"]


@pytest.mark.parametrize("loss", ["ccl", "margin", "bpr"])
def test_other_losses_train(data_dir, tmp_path, loss, popularity_valid):
    """One epoch of each other loss already ranks the held-out items above popularity."""
    # constant: a one-epoch cosine schedule would spend half the epoch near lr 0. CCL's
    # negative weight: SimpleX's 150 goes with 800 negatives; with 64 on 1,000 items it
    # overshoots within the epoch (recall falls back below popularity on some seeds)
    extra = {"ccl_negative_weight": 10.0} if loss == "ccl" else {}
    cfg = TrainConfig(**{**FAST, "epochs": 1, "loss": loss, "extra_negatives": 64,
                         "lr_schedule": "constant", **extra})
    summary = train(data_dir, tmp_path / loss, cfg, progress=False)
    assert summary["best"]["recall@20"] > popularity_valid


def test_history_only_user(trained):
    """A user unknown to training is embedded from a history alone."""
    run, _ = trained
    model, _ = load_run(run)
    history = torch.tensor([[3, 7, 11, -1, -1]])
    with torch.no_grad():
        vec = model.encode_users(None, history)
        pooled = model.tables.lookup("item", torch.tensor([3, 7, 11])).mean(0)
    d = model.config.dim
    assert model.config.item_bias and vec.shape == (1, d)  # the last coordinate: the bias's 1
    assert torch.allclose(vec[0, :-1], pooled / pooled.norm(), atol=1e-6) and vec[0, -1] == 1


def test_model_without_id_embedding():
    model = TwoTower(ModelConfig(num_users=5, num_items=9, dim=8, user_id_embedding=False,
                                 history_len=3, item_bias=False))
    out = model.encode_users(torch.tensor([0, 1]), torch.tensor([[1, 2, -1], [-1, -1, 4]]))
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="history"):
        model.encode_users(torch.tensor([0]))


def test_recent_histories_left_padded_in_order():
    users = torch.tensor([0, 0, 0, 2, 0])
    items = torch.tensor([5, 6, 7, 9, 8])
    h = recent_histories(users, items, num_users=3, length=3)
    assert h.tolist() == [[6, 7, 8], [-1, -1, -1], [-1, -1, 9]]


def test_config_from_toml_with_sections_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\ndim = 16\n[optim]\nlr = 0.01\n")
    cfg = TrainConfig.from_toml(tmp_path / "c.toml", {"lr": 0.02})
    assert cfg.dim == 16 and cfg.lr == 0.02
    (tmp_path / "bad.toml").write_text("dims = 3\n")
    with pytest.raises(RecsysError, match="unknown key 'dims' \\(did you mean 'dim'\\?\\)"):
        TrainConfig.from_toml(tmp_path / "bad.toml")


# -- export --

def test_export_round_trip(trained, data_dir, tmp_path):
    run, _ = trained
    m1 = export_bundle(run, data_dir, tmp_path / "b1")
    m2 = export_bundle(run, data_dir, tmp_path / "b2")
    assert m1["model_version"] == m2["model_version"]  # a content hash
    b = tmp_path / "b1"
    model, _ = load_run(run)
    emb = load_file(b / "item_embeddings.safetensors")["item_embeddings"]
    with torch.no_grad():
        assert torch.equal(emb, model.encode_items(torch.arange(emb.shape[0])))
    items = pl.read_parquet(b / "items.parquet")
    data_items = pl.read_parquet(data_dir / "items.parquet")
    assert items["item_id"].to_list() == data_items["item_id"].to_list()
    hist = pl.read_parquet(b / "user_history.parquet")
    assert hist.columns == ["user_idx", "user_id", "item_ids"]
    n_seen = sum(pl.read_parquet(data_dir / f"{s}.parquet").height
                 for s in ("train", "valid", "test"))
    assert hist["item_ids"].list.len().sum() == n_seen
    weights = load_file(b / "model.safetensors")
    assert torch.equal(weights["tables.item"], model.tables.weight("item").detach())
    with pytest.raises(RecsysError, match="already exists"):
        export_bundle(run, data_dir, b)


def test_cli_train_evaluate_export(data_dir, tmp_path, capsys):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--epochs", "1",
                 "--set", "dim=16", "--set", "history_len=0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", str(data_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"recall@20", "ndcg@20", "hit@20", "mrr@20", "users"} <= metrics.keys()
    assert main(["export", "--run", str(run), "--data", str(data_dir), "--out",
                 str(bundle)]) == 0
    assert (bundle / "manifest.json").exists()
    assert main(["evaluate", "--run", str(tmp_path / "nope"), "--data", str(data_dir)]) == 2
    assert "not a RUN directory" in capsys.readouterr().err


def test_sigkill_mid_run_then_resume_equals_uninterrupted(data_dir, tmp_path):
    """Kill a training process (SIGKILL) right after its first checkpoint; --resume must end
    with the same weights, bit for bit, as an uninterrupted run made under the same conditions:
    both are fresh subprocesses with the same environment and thread settings (an in-process
    run inherits whatever thread counts earlier tests left, and float sums change with them)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    def cmd(run):
        return [sys.executable, "-m", "recsys_ccl.cli", "train", "--data", str(data_dir),
                "--out", str(run), "--no-progress",
                *[a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]]

    run_full, run = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run(cmd(run_full), capture_output=True, env=env).returncode == 0
    proc = subprocess.Popen(cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    state = run / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["epoch"] < FAST["epochs"]
    resumed = subprocess.run([*cmd(run), "--resume"], capture_output=True, env=env)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    a = load_file(run_full / "checkpoints" / "last" / "model.safetensors")
    b = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]


def test_augment_history_views_are_nonempty_subsets():
    from recsys_ccl.objective import augment_history

    gen = torch.Generator().manual_seed(0)
    hist = torch.tensor([[-1, -1, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6], [-1, -1, -1, -1, -1, 9],
                         [-1, -1, -1, -1, -1, -1]])
    for _ in range(50):
        view = augment_history(hist, crop=0.5, mask_prob=0.9, gen=gen)
        for row, orig in zip(view.tolist(), hist.tolist(), strict=True):
            kept = [x for x in row if x >= 0]
            assert set(kept) <= {x for x in orig if x >= 0}
            assert (len(kept) >= 1) == any(x >= 0 for x in orig)
            # a crop of half the items is contiguous in the original order
            idx = [orig.index(x) for x in kept]
            assert idx == sorted(idx) and (not idx or idx[-1] - idx[0] < 3 or len(orig) < 6)


def test_view_contrast_trains_and_is_deterministic(data_dir, tmp_path, popularity_valid):
    cfg = TrainConfig(**{**FAST, "epochs": 1, "ssl_weight": 0.2, "lr_schedule": "constant"})
    a = train(data_dir, tmp_path / "a", cfg, progress=False)
    b = train(data_dir, tmp_path / "b", cfg, progress=False)
    assert a["best"] == b["best"] and a["best"]["recall@20"] > popularity_valid


# -- devices --

def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("tpu", "gpu0", "cuda:x"):
        with pytest.raises(RecsysError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(RecsysError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(RecsysError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")


def test_cli_train_refuses_a_missing_gpu_before_writing(data_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is not an error here")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--epochs", "1",
                 "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_the_cli_default_device_is_cuda_when_present_else_the_cpu(data_dir, tmp_path, capsys):
    """`recsys-ccl train` without --device (auto) against an explicit --device naming what
    auto should pick: the same device in the summary and the same weights."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    sets = [a for k, v in {**FAST, "epochs": 1}.items() for a in ("--set", f"{k}={v}")]
    runs = {}
    for name, extra in (("auto", []), ("explicit", ["--device", expected])):
        assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / name),
                     "--no-progress", *sets, *extra]) == 0
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs["auto"]["device"].split(":")[0] == expected == \
        runs["explicit"]["device"].split(":")[0]
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("auto", "explicit"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu_and_resumes_exactly(data_dir, tmp_path, trained):
    """The same batches on either device (sampling stays on the CPU): after one epoch the GPU
    weights are close to the CPU ones (not equal: other kernels, other summation order); a
    resumed GPU run matches an uninterrupted GPU run (to rounding: CUDA's embedding backward
    may add in any order)."""
    one = {**FAST, "epochs": 1, "loss_impl": "torch"}
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    train(data_dir, cpu, TrainConfig(**one), progress=False, device="cpu")
    summary = train(data_dir, gpu, TrainConfig(**one), progress=False, device="cuda")
    assert summary["device"].startswith("cuda")
    a, b = load_file(cpu / "checkpoints/last/model.safetensors"), load_file(
        gpu / "checkpoints/last/model.safetensors")
    for k in a:
        assert b[k].device.type == "cpu"
        rel = (a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)
        assert rel < 1e-3, (k, float(rel))
    full, part = tmp_path / "full", tmp_path / "part"
    train(data_dir, full, TrainConfig(**{**FAST, "embedding_dropout": 0.1}), progress=False,
          device="cuda")
    train(data_dir, part, TrainConfig(**{**FAST, "epochs": 1, "embedding_dropout": 0.1}),
          progress=False, device="cuda")
    train(data_dir, part, TrainConfig(**{**FAST, "embedding_dropout": 0.1}), resume=True,
          progress=False, device="cuda")
    a, b = (load_file(r / "checkpoints/last/model.safetensors") for r in (full, part))
    for k in a:
        rel = (a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)
        assert rel < 1e-4, (k, float(rel))


# -- learning-rate schedule --

def test_cosine_schedule_runs_from_lr_to_its_final_ratio():
    cfg = TrainConfig(lr=0.02, lr_schedule="cosine", lr_final_ratio=0.1)
    lrs = [scheduled_lr(cfg, t, 37) for t in range(37)]
    assert lrs[0] == pytest.approx(0.02) and lrs[-1] == pytest.approx(0.002)
    assert lrs[18] == pytest.approx(0.011)  # halfway: the mean of the ends
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert scheduled_lr(TrainConfig(lr=0.02, lr_schedule="constant"), 30, 37) == 0.02
    with pytest.raises(RecsysError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()


def test_cosine_schedule_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """A run that stops after its first checkpoint and resumes follows the same schedule (the
    learning rate is a function of the step) and ends with the same weights."""
    import recsys_ccl.train as train_module

    cfg = {**FAST, "dim": 16, "lr_schedule": "cosine", "eval_split": "none"}
    full, part = tmp_path / "full", tmp_path / "part"
    train(data_dir, full, TrainConfig(**cfg), progress=False)
    save = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # stands in for a crash just after the first checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(data_dir, part, TrainConfig(**cfg), progress=False)
    monkeypatch.undo()
    train(data_dir, part, TrainConfig(**cfg), resume=True, progress=False)
    a, b = (load_file(r / "checkpoints/last/model.safetensors") for r in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [json.loads(x)["lr"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] > lrs[1] > lrs[2] >= 0


# -- the item bias --

def test_item_bias_is_a_logit_offset_carried_as_one_coordinate():
    torch.manual_seed(0)
    model = TwoTower(ModelConfig(num_users=7, num_items=11, dim=5, temperature=0.2,
                                 history_len=0, item_bias=True, user_id_embedding=True))
    with torch.no_grad():
        model.tables.weight("item_bias").copy_(torch.randn(11, 1))
        users, items = torch.tensor([0, 3, 6]), torch.arange(11)
        u, v = model.encode_users(users), model.encode_items(items)
        plain = TwoTower(dataclasses.replace(model.config, dim=4, item_bias=False))
        plain.load_state_dict({k: x for k, x in model.state_dict().items()
                               if k != "tables.item_bias"})
        cos = plain.encode_users(users) @ plain.encode_items(items).T
    assert u.shape == (3, 5) and v.shape == (11, 5) and model.config.embedding_dim == 4
    assert model.tables.weight("item").shape == (11, 4)
    bias = model.tables.weight("item_bias")[:, 0]
    torch.testing.assert_close(model.score(u, v) / 0.2, cos / 0.2 + bias[None, :],
                               rtol=1e-5, atol=1e-5)


def test_item_bias_auto_follows_the_loss():
    assert TrainConfig().uses_item_bias and TrainConfig(loss="bpr").uses_item_bias
    assert not TrainConfig(loss="ccl").uses_item_bias
    assert not TrainConfig(loss="margin").uses_item_bias
    assert not TrainConfig(item_bias=False).uses_item_bias
    assert TrainConfig(loss="ccl", item_bias=True).uses_item_bias
    with pytest.raises(RecsysError, match="item_bias"):
        TrainConfig(item_bias="yes").validate()


def test_a_checkpoint_without_todays_config_keys_is_refused_by_name(data_dir, tmp_path):
    """No guessing what an older checkpoint meant: keys its config lacks are named as
    differences, and the run is not resumed."""
    cfg = {**FAST, "dim": 16, "epochs": 1, "eval_split": "none"}
    run = tmp_path / "old"
    train(data_dir, run, TrainConfig(**cfg), progress=False)
    state_path = run / "checkpoints" / "last" / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("item_bias", "lr_schedule"):
        del state["config"][key]
    state_path.write_text(json.dumps(state))
    with pytest.raises(RecsysError, match=r"differs from the checkpoint's in item_bias, "
                                          r"lr_schedule"):
        train(data_dir, run, TrainConfig(**cfg), resume=True, progress=False)


def test_history_pooling_matches_the_masked_mean_and_its_gradient():
    """The pooled history (one weighted embedding_bag) equals the masked mean of the item
    embeddings, leaving out padding and the excluded positive, in values and in gradients; a
    user whose only history item is the excluded one keeps the id embedding alone."""
    torch.manual_seed(1)
    model = TwoTower(ModelConfig(num_users=7, num_items=23, dim=9, history_len=6,
                                 history_weight=0.3, normalize=False, item_bias=False,
                                 user_id_embedding=True))
    history = torch.randint(0, 23, (5, 6))
    history[0, :4] = -1
    history[1, :] = -1
    history[2, :5] = -1
    users, exclude = torch.tensor([0, 1, 2, 3, 4]), history[:, 5].clone()
    exclude[1] = 0
    out = model.encode_users(users, history, exclude_item=exclude)
    out.pow(2).sum().backward()
    got = model.tables.weight("item").grad.to_dense()  # a sparse gradient
    model.zero_grad()
    e, u = model.tables.weight("item").double(), model.tables.weight("user").double()
    rows = []
    for b in range(5):
        keep = [int(i) for i in history[b] if i >= 0 and i != exclude[b]]
        own = u[users[b]]
        rows.append(own if not keep else 0.3 * own + 0.7 * e[keep].mean(0))
    want = torch.stack(rows)
    want.pow(2).sum().backward()
    assert torch.allclose(out.double(), want, atol=1e-6)
    assert torch.allclose(got.double(), model.tables.weight("item").grad.double(), atol=1e-6)


def test_item_neighbourhood_pools_user_embeddings_leaving_out_the_positives_user():
    """Each item mixes its own embedding with the mean user id embedding of its training users
    (h · e_i + (1 - h) · mean e_u); the excluded user leaves the mean, and an item left without
    users keeps its own embedding alone."""
    torch.manual_seed(2)
    model = TwoTower(ModelConfig(num_users=6, num_items=5, dim=7, history_len=2,
                                 item_history_len=3, item_history_weight=0.25,
                                 normalize=False, item_bias=False, user_id_embedding=True))
    hist = torch.tensor([[0, 4, 2], [-1, -1, 3], [-1, -1, -1], [-1, 5, 1], [2, 2, 0]],
                        dtype=torch.int32)
    model.set_item_histories(hist)
    items, exclude = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 3, -1, -1, 0, -1])
    got = model.encode_items(items, exclude_user=exclude)
    e, u = model.tables.weight("item"), model.tables.weight("user")
    want = []
    for i, x in zip(items.tolist(), exclude.tolist(), strict=True):
        users = [w for w in hist[i].tolist() if w >= 0 and w != x]
        want.append(e[i] if not users else 0.25 * e[i] + 0.75 * u[users].mean(0))
    assert torch.allclose(got, torch.stack(want), atol=1e-6)


def test_item_neighbourhood_trains_exports_and_needs_user_ids(data_dir, tmp_path):
    """A run with the item neighbourhood beats popularity; its users per item travel with the
    weights, so the exported item vectors are the ones the run evaluated with."""
    cfg = TrainConfig(**{**FAST, "item_history_len": 10})
    train(data_dir, tmp_path / "run", cfg, progress=False)
    model, _ = load_run(tmp_path / "run")
    want = item_histories(load_data_dir(data_dir), 10)
    assert int((want >= 0).sum()) > 0 and torch.equal(model.item_history, want)
    got = evaluate_run(tmp_path / "run", data_dir, "test", 20)
    pop = evaluate_run(None, data_dir, "test", 20, "popularity")
    assert got["recall@20"] > 1.5 * pop["recall@20"], (got, pop)
    export_bundle(tmp_path / "run", data_dir, tmp_path / "bundle")
    emb = load_file(tmp_path / "bundle" / "item_embeddings.safetensors")["item_embeddings"]
    with torch.no_grad():
        assert torch.equal(emb, model.encode_items(torch.arange(emb.shape[0])))
    served = load_bundle(tmp_path / "bundle")  # the server's loader takes the new buffer
    assert torch.equal(served.model.item_history, want)
    with pytest.raises(RecsysError, match="item_history_len=10 is out of range"):
        TrainConfig(**{**FAST, "item_history_len": 10, "user_id_embedding": False})
