"""Crashes leave nothing half-written: prepare and export killed (SIGKILL) at each step of writing
their output, and damaged files named in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.fileio import FAULT_ENV
from recsys_ccl.serving.bundle import load_bundle


def _run(args: list[str], fault: str | None = None) -> int:
    """The command's exit code; with `fault`, it dies (SIGKILL) at that point of writing its
    output (recsys_ccl.fileio.fault_point)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "recsys_ccl.cli", *args], env=env,
                          capture_output=True).returncode


FAULTS = ("directory.begin", "directory.written", "directory.synced", "directory.swapped")


def _check_each_kill(args: list[str], out: Path, verify) -> None:
    """Kill the command at each step of writing its output (an existing one being replaced);
    each time `out` must be a complete output, the previous one or the new one, which
    `verify` loads; the next run removes what the killed one left."""
    assert _run(args) == 0  # a complete run (replaces out)
    for fault in FAULTS:
        before = out.stat().st_ino
        assert _run(args, fault) == -signal.SIGKILL, f"{fault} was never reached"
        assert out.is_dir(), f"killed at {fault}: {out} is gone"
        replaced = out.stat().st_ino != before
        assert replaced == (fault == "directory.swapped"), fault
        json.loads((out / "manifest.json").read_text())
        verify(out)
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert left, f"killed at {fault}: nothing left to clean, so nothing was tested"
        assert _run(args) == 0
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert left == [], f"a completed run leaves nothing beside its output: {left}"


@pytest.mark.slow
def test_export_killed_midway_leaves_a_complete_bundle(bundles, tmp_path):
    root = bundles["a"].parent
    out = tmp_path / "bundle"
    args = ["export", "--run", str(root / "run-b"), "--data", str(root / "data"), "--out",
            str(out), "--overwrite"]
    assert _run(args[:-1]) == 0
    _check_each_kill(args, out, lambda p: load_bundle(p))


@pytest.mark.slow
def test_prepare_killed_midway_leaves_a_complete_data_dir(bundles, tmp_path):
    root = bundles["a"].parent
    out = tmp_path / "data"
    args = ["prepare", "--input", str(root / "log.parquet"), "--format", "parquet", "--out",
            str(out), "--k-core", "2", "--overwrite"]
    assert _run(args[:-1]) == 0
    _check_each_kill(args, out, lambda p: load_data_dir(p))


# -- damaged files: a one-line error naming the file, never a library traceback --

def _missing(p: Path) -> None:
    p.unlink()


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _corrupted(p: Path) -> None:
    """Flip bits in the middle: the file still parses as far as its format can tell."""
    raw = bytearray(p.read_bytes())
    for i in range(len(raw) // 2, min(len(raw) // 2 + 16, len(raw))):
        raw[i] ^= 0x5A
    p.write_bytes(bytes(raw))


DAMAGES = {"missing": _missing, "truncated": _truncated, "corrupted": _corrupted}
# a constant rate: the resume below trains the one-epoch run further
TRAIN_SETS = ["epochs=1", "batch_size=512", "dim=8", "history_len=5", "patience=0",
              'eval_split="none"', 'lr_schedule="constant"']


@pytest.fixture(scope="module")
def pipeline(bundles, tmp_path_factory) -> Path:
    """data/, run/ (one epoch, with its checkpoint) and bundle/, made through the CLI."""
    from recsys_ccl.cli import main

    root = tmp_path_factory.mktemp("damage")
    shutil.copytree(bundles["a"].parent / "data", root / "data")
    sets = [a for s in TRAIN_SETS for a in ("--set", s)]
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"),
                 "--no-progress", *sets]) == 0
    assert main(["export", "--run", str(root / "run"), "--data", str(root / "data"),
                 "--out", str(root / "bundle")]) == 0
    return root


def _evaluate(root: Path) -> list[str]:
    return ["evaluate", "--run", str(root / "run"), "--data", str(root / "data")]


def _resume(root: Path) -> list[str]:
    sets = [a for s in [*TRAIN_SETS, "epochs=2"] for a in ("--set", s)]
    return ["train", "--data", str(root / "data"), "--out", str(root / "run"), "--resume",
            "--no-progress", *sets]


def _serve(root: Path) -> list[str]:
    return ["serve", "--bundle", str(root / "bundle"), "--port", "0"]


TARGETS = [
    *[(f"data/{f}", _evaluate) for f in ("manifest.json", "train.parquet", "valid.parquet",
                                         "test.parquet", "users.parquet", "items.parquet")],
    *[(f"run/{f}", _evaluate) for f in ("config.json", "model.safetensors")],
    *[(f"run/checkpoints/last/{f}", _resume) for f in ("model.safetensors",
                                                       "optimizer.safetensors", "state.json")],
    *[(f"bundle/{f}", _serve) for f in ("manifest.json", "config.json", "model.safetensors",
                                        "items.parquet", "item_embeddings.safetensors",
                                        "user_history.parquet", "user_embeddings.npy")],
]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize(("target", "command"), TARGETS, ids=[t[0] for t in TARGETS])
def test_a_damaged_file_is_named_in_a_one_line_error(pipeline, tmp_path, capsys, target,
                                                     command, damage):
    from recsys_ccl.cli import main

    root = tmp_path / "copy"
    shutil.copytree(pipeline, root, symlinks=True)
    victim = root / target
    DAMAGES[damage](victim)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    code = main(command(root))
    err = capsys.readouterr().err.strip()
    assert code != 0, f"{damage} {target} was accepted"
    assert "Traceback" not in err and err.count("\n") == 0, err
    # the file, or for a missing one its directory and name
    assert str(victim) in err or (victim.name in err and str(victim.parent) in err), err
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before, "a failed command changed files"
