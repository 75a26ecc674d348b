"""The RUN directory's contract: an existing run is continued or replaced only when asked, a
resume needs a checkpoint, a kill between a checkpoint and its metrics line loses no line,
and what a killed run leaves behind is cleaned up (or named) by the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
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
    with pytest.raises(RecsysError, match="holds no checkpoint"):
        train(data_dir, tmp_path / "new", TrainConfig(**FAST), resume=True, progress=False)
    assert not (tmp_path / "new").exists()


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
    train(data_dir, run, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    with (run / "metrics.jsonl").open("a") as fh:  # epoch 2 finished, its checkpoint did not
        fh.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n" + '{"epoch": 3, "lo')
    train(data_dir, run, TrainConfig(**FAST), resume=True, progress=False)
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
