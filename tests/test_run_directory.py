"""The RUN directory's contract: an existing run is continued or replaced only when asked, a
resume needs a checkpoint, a kill between a checkpoint and its metrics line loses no line,
and what a killed run leaves behind is cleaned up (or named) by the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import synthetic_data_dir

from recsys_ccl.cli import main
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.errors import RecsysError
from recsys_ccl.train import train

FAST = dict(epochs=3, batch_size=256, dim=8, history_len=5, patience=0, lr=1e-2,
            eval_split="none")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data_dir(tmp_path_factory.mktemp("rundir"), 120, 90, 3_000, seed=2)


def _epochs(run):
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_existing_run_needs_resume_or_overwrite(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(data_dir, run, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    args = ["train", "--data", str(data_dir), "--out", str(run), "--no-progress",
            "--set", "epochs=1", "--set", "dim=8", "--set", "history_len=5",
            "--set", "batch_size=256", "--set", 'eval_split="none"']
    assert main(args) == 2
    assert "--resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    before = (run / "model.safetensors").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0
    assert (run / "model.safetensors").stat().st_mtime_ns != before
    assert _epochs(run) == [1]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(RecsysError, match="not an output of this tool"):
        train(data_dir, stranger, TrainConfig(**FAST), overwrite=True, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint_is_an_error(data_dir, tmp_path):
    with pytest.raises(RecsysError, match="does not exist; run without --resume"):
        train(data_dir, tmp_path / "new", TrainConfig(**FAST), resume=True, progress=False)
    assert not (tmp_path / "new").exists()


def _killed_before_its_first_checkpoint(data_dir, run, monkeypatch):
    import recsys_ccl.train as train_module

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the kill, before the first checkpoint is written

    monkeypatch.setattr(train_module, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        train(data_dir, run, TrainConfig(**FAST), progress=False)
    monkeypatch.undo()
    assert (run / "config.json").exists() and not (run / "checkpoints").exists()


def test_a_run_without_a_checkpoint_is_not_a_run(data_dir, tmp_path, monkeypatch, capsys):
    """A run killed before its first checkpoint: a plain rerun replaces it (saying so), and
    --resume says what it found instead of resuming."""
    run = tmp_path / "run"
    _killed_before_its_first_checkpoint(data_dir, run, monkeypatch)
    with pytest.raises(RecsysError, match=r"holds no checkpoint .*\(it holds config\.json, "
                                          r"metrics\.jsonl: a run stopped before its first"):
        train(data_dir, run, TrainConfig(**FAST), resume=True, progress=False)
    summary = train(data_dir, run, TrainConfig(**FAST), progress=False)
    assert summary["epochs"] == 3 and _epochs(run) == [1, 2, 3]
    assert "replacing" in capsys.readouterr().err


def test_max_steps_stops_within_an_epoch_and_resumes_bit_for_bit(data_dir, tmp_path):
    """--max-steps 5 stops inside the first epoch with a checkpoint and a metrics line; the
    resumed run ends with the weights of an uninterrupted one."""
    from safetensors.torch import load_file

    cfg = TrainConfig(**{**FAST, "eval_split": "valid", "extra_negatives": 7, "batch_size": 128})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(data_dir, whole, cfg, progress=False)
    summary = train(data_dir, cut, cfg, progress=False, max_steps=5)
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 5 and summary["epochs"] == 0
    assert [(r["epoch"], r["step"], r.get("partial")) for r in lines] == [(1, 5, True)]
    assert "valid/ndcg@20" in lines[0]
    state = json.loads((cut / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 5 and state["epoch_batches"] == 5
    per_epoch = json.loads((whole / "metrics.jsonl").read_text().splitlines()[0])["step"]
    assert per_epoch >= 7
    train(data_dir, cut, cfg, progress=False, resume=True, max_steps=per_epoch - 1)
    train(data_dir, cut, cfg, progress=False, resume=True)
    a = load_file(whole / "checkpoints" / "last" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [(r["epoch"], r.get("partial", False)) for r in
              map(json.loads, (cut / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [(1, True), (1, True), (1, False), (2, False), (3, False)]


def test_resume_with_other_epochs_follows_the_schedule_rule(data_dir, tmp_path):
    """A cosine schedule spans the epochs a run started with: resuming with another total is
    refused by name; with a constant rate the run may be trained further."""
    run = tmp_path / "run"
    train(data_dir, run, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    with pytest.raises(RecsysError, match="cosine learning-rate schedule spans the 1 epochs"):
        train(data_dir, run, TrainConfig(**{**FAST, "epochs": 2}), resume=True,
              progress=False)
    flat = tmp_path / "flat"
    cfg = {**FAST, "lr_schedule": "constant"}
    train(data_dir, flat, TrainConfig(**{**cfg, "epochs": 1}), progress=False)
    summary = train(data_dir, flat, TrainConfig(**{**cfg, "epochs": 2}), resume=True,
                    progress=False)
    assert summary["epochs"] == 2 and _epochs(flat) == [1, 2]


def test_a_kill_after_a_checkpoint_loses_no_metrics_line(data_dir, tmp_path, monkeypatch):
    """The process dies right after the first checkpoint is complete: its epoch's metrics
    line must already be on disk."""
    import recsys_ccl.train as train_module

    run = tmp_path / "run"
    save = train_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # the kill, just after the checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(data_dir, run, TrainConfig(**FAST), progress=False)
    monkeypatch.undo()
    assert _epochs(run) == [1]
    train(data_dir, run, TrainConfig(**FAST), resume=True, progress=False)
    assert _epochs(run) == [1, 2, 3]


def test_a_torn_metrics_line_and_lines_past_the_checkpoint_are_dropped(data_dir, tmp_path):
    run = tmp_path / "run"
    flat = {**FAST, "lr_schedule": "constant"}  # a constant rate: the run may be extended
    train(data_dir, run, TrainConfig(**{**flat, "epochs": 1}), progress=False)
    with (run / "metrics.jsonl").open("a") as fh:  # epoch 2 finished, its checkpoint did not
        fh.write(json.dumps({"epoch": 2, "step": 99, "loss": 1.0}) + "\n" + '{"epoch": 3, "lo')
    train(data_dir, run, TrainConfig(**flat), resume=True, progress=False)
    assert _epochs(run) == [1, 2, 3]


def test_leftovers_of_a_killed_run_are_removed_and_named(data_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a pid that ended
    out = tmp_path / "data2"
    stale = tmp_path / f".data2.tmp-{dead}-deadbeef"
    stale.mkdir()
    (stale / "train.parquet").write_bytes(b"partial")
    live = tmp_path / f".data2.tmp-{os.getpid()}-cafecafe"  # a run still going: kept
    live.mkdir()
    log = tmp_path / "log.parquet"
    write_synth(SynthConfig(users=50, items=40, interactions=600, clusters=4, seed=1), log)
    proc = subprocess.run([sys.executable, "-m", "recsys_ccl.cli", "prepare", "--input",
                           str(log), "--format", "parquet", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.exists()
    assert f"removed {stale}" in proc.stderr


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_directory_replaces_by_exchange_or_by_two_renames(tmp_path, monkeypatch,
                                                                 exchange):
    """An existing output is replaced whole: by one atomic exchange where the platform has it
    (the output exists at every instant), else by renaming the old one aside first."""
    from recsys_ccl import fileio

    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for version in ("1", "2"):
        with fileio.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text(version)
    assert (out / "manifest.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
