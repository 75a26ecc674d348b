"""Crashes leave nothing half-written: prepare and export killed (SIGKILL) at many points."""

from __future__ import annotations

import json
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


def _kill_at(args: list[str], seconds: float) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "recsys_ccl.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _check_each_kill(args: list[str], out: Path, verify) -> None:
    """Kill the command at fractions of its full run time; each time `out` must be a complete
    output (the previous one or the new one), which `verify` loads."""
    full = _run(args)  # a complete run (replaces out): the time scale for the kills
    for fraction in (0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        _kill_at(args, full * fraction)
        assert out.is_dir(), f"killed at {fraction:.0%}: {out} is gone"
        json.loads((out / "manifest.json").read_text())
        verify(out)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.old")]
    assert leftovers == [], "the previous output is only ever set aside during the final rename"


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
