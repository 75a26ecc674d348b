"""Long stages report progress where no terminal is attached (a pipe, a log file), and an
interrupted command says what it interrupted and leaves nothing half-written."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import synthetic_data_dir

from recsys_ccl.progress import Progress, current_stage, heartbeat


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic_data_dir(tmp_path_factory.mktemp("progress"), 400, 300, 12_000, seed=4)


def _cli(*args: str, every: str = "0") -> subprocess.CompletedProcess:
    """The command with stderr a pipe (no terminal), progress lines every `every` seconds."""
    return subprocess.run([sys.executable, "-m", "recsys_ccl.cli", *args], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "RECSYS_CCL_PROGRESS_SECONDS": every})


def test_progress_lines_say_stage_count_rate_and_eta():
    stream = io.StringIO()
    with Progress("train epoch 1/3", 1000, "interactions", stream=stream, interval=0) as bar:
        assert current_stage() == "train epoch 1/3: 0/1,000 interactions"
        for _ in range(4):
            bar.update(200, loss=lambda: 1.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6  # the start, one per update, the end
    assert lines[0].startswith("train epoch 1/3: 0/1,000 interactions (0.0%)")
    assert re.match(r"train epoch 1/3: 800/1,000 interactions \(80\.0%\), [\d,.]+/s, "
                    r"ETA \d+:\d\d:\d\d, elapsed \d+:\d\d:\d\d, loss 1\.5000$", lines[4])
    assert current_stage() is None


def test_progress_lines_are_spaced_by_the_interval():
    stream = io.StringIO()
    with Progress("evaluate", 100, "users", stream=stream, interval=3600) as bar:
        for _ in range(100):
            bar.update(1)
    assert len(stream.getvalue().splitlines()) == 2  # start and end only


def test_a_heartbeat_reports_while_a_call_holds_the_main_thread():
    stream = io.StringIO()
    with heartbeat("prepare: splitting", stream=stream, interval=0.05):
        time.sleep(0.3)  # one long call
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("prepare: splitting (running 0:00:00)")
    assert lines[-1].startswith("prepare: splitting: done")
    quiet = io.StringIO()
    with heartbeat("prepare: splitting", stream=quiet, interval=3600):
        pass  # shorter than the interval: nothing to report
    assert quiet.getvalue() == ""


def test_train_evaluate_export_report_progress_on_a_pipe(data_dir, tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    r = _cli("train", "--data", str(data_dir), "--out", str(run), "--epochs", "2",
             "--set", "dim=16", "--set", "batch_size=256")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^train epoch 1/2: [\d,]+/[\d,]+ interactions \(\d+\.\d%\), .*/s",
                     r.stderr, re.M)
    assert re.search(r"^train epoch 2/2: .*ETA", r.stderr, re.M)
    assert re.search(r"^validate \(valid\): [\d,]+/[\d,]+ users", r.stderr, re.M)
    r = _cli("evaluate", "--run", str(run), "--data", str(data_dir))
    assert r.returncode == 0 and re.search(r"^evaluate \(test\): .* users", r.stderr, re.M)
    r = _cli("export", "--run", str(run), "--data", str(data_dir), "--out", str(bundle))
    assert r.returncode == 0 and re.search(r"^export: user vectors: .* users", r.stderr, re.M)
    # the default interval: still a line when each stage starts and ends
    r = _cli("evaluate", "--run", str(run), "--data", str(data_dir), every="30")
    assert len(re.findall(r"^evaluate \(test\): ", r.stderr, re.M)) >= 2


def test_prepare_reports_its_steps(tmp_path):
    from recsys_ccl.data.synth import SynthConfig, write_synth

    write_synth(SynthConfig(users=200, items=100, interactions=3_000, seed=1),
                tmp_path / "log.parquet")
    r = _cli("prepare", "--input", str(tmp_path / "log.parquet"), "--format", "parquet",
             "--out", str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^prepare 1/2: read, clean, split and index .*log.parquet$", r.stderr, re.M)
    assert re.search(r"^prepare 2/2: write .*: done in \d+:\d\d:\d\d$", r.stderr, re.M)


def test_sigterm_names_the_stage_and_leaves_the_last_checkpoint(data_dir, tmp_path):
    """SIGTERM during training: one line naming the epoch and the checkpoint to resume from,
    exit code 143, no temporary file left, and --resume continues."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "recsys_ccl.cli", "train", "--data",
                             str(data_dir), "--out", str(run), "--epochs", "200", "--set",
                             "dim=16", "--set", "batch_size=64", "--set",
                             'lr_schedule="constant"'],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RECSYS_CCL_PROGRESS_SECONDS": "0"})
    for line in proc.stderr:  # the second epoch has started: a checkpoint exists
        if line.startswith("train epoch 2/200:"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    last = rest.strip().splitlines()[-1]
    assert re.match(r"recsys-ccl train: interrupted by SIGTERM during train epoch \d+/200: "
                    r".*nothing was half-written \(the last checkpoint, epoch \d+, step \d+, "
                    r"is intact: --resume continues from it\)$", last), last
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    r = _cli("train", "--data", str(data_dir), "--out", str(run), "--epochs", "200", "--set",
             "dim=16", "--set", "batch_size=64", "--set", 'lr_schedule="constant"',
             "--resume", "--max-steps", "1")  # already past step 1: nothing more to do
    assert r.returncode == 0, r.stderr
