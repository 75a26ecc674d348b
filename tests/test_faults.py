"""Crashes leave nothing half-written: prepare and export killed (SIGKILL) at many points."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.serving.bundle import load_bundle


def _run(args: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "recsys_ccl.cli", *args], check=True,
                   capture_output=True)
    return time.monotonic() - t0


def _kill_while_writing(args: list[str], out: Path, delay: float) -> bool:
    """Start the command, wait until its temporary output holds a file, SIGKILL it `delay`
    seconds later; True when the kill landed mid-write (the temporary output was left)."""
    proc = subprocess.Popen([sys.executable, "-m", "recsys_ccl.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(any(p.iterdir()) for p in out.parent.glob(f".{out.name}.tmp-*")):
            break
        time.sleep(0.0005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(out.parent.glob(f".{out.name}.tmp-*"))
    for p in partial:  # what the next run would remove (its pid is dead)
        shutil.rmtree(p)
    return bool(partial)


def _check_each_kill(args: list[str], out: Path, verify) -> None:
    """Kill the command at several points while it writes its output; each time `out` must be
    a complete output (the previous one or the new one), which `verify` loads. Most kills
    must land mid-write: one before the writing starts or after it ends proves nothing (the
    run time is mostly start-up, so fractions of it rarely hit the write)."""
    _run(args)  # a complete run (replaces out)
    mid_write = []
    for delay in (0.0, 0.0, 0.002, 0.005, 0.01, 0.02):
        if _kill_while_writing(args, out, delay):
            mid_write.append(delay)
        assert out.is_dir(), f"killed {delay} s into the write: {out} is gone"
        json.loads((out / "manifest.json").read_text())
        verify(out)
    assert len(mid_write) >= 3, f"only the kills at {mid_write} s landed mid-write"
    # a kill between the final rename and the removal of the output set aside for it leaves
    # that one (`out` is complete, checked above); the next run removes it
    _run(args)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], "a completed run leaves nothing beside its output"


@pytest.mark.slow
def test_export_killed_midway_leaves_a_complete_bundle(bundles, tmp_path):
    root = bundles["a"].parent
    out = tmp_path / "bundle"
    args = ["export", "--run", str(root / "run-b"), "--data", str(root / "data"), "--out",
            str(out), "--overwrite"]
    _run(args[:-1])
    _check_each_kill(args, out, lambda p: load_bundle(p))


@pytest.mark.slow
def test_prepare_killed_midway_leaves_a_complete_data_dir(bundles, tmp_path):
    root = bundles["a"].parent
    out = tmp_path / "data"
    args = ["prepare", "--input", str(root / "log.parquet"), "--format", "parquet", "--out",
            str(out), "--k-core", "2", "--overwrite"]
    _run(args[:-1])
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
