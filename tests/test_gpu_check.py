"""benchmarks/gpu_check.py end to end at a tiny size (on CPU through Triton's interpreter), so
the one prepared GPU run cannot fail on a typo: every step runs and records its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_step(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").open()]
    steps = [r["step"] for r in records]
    assert steps == ["environment", "resources", "accuracy", "degenerate", "determinism",
                     "timing", "scale", "sequential", "plot"], proc.stdout[-3000:]
    assert proc.returncode == 0, [r for r in records if not r["ok"]]
    accuracy = next(r for r in records if r["step"] == "accuracy")
    assert {row["dtype"] for row in accuracy["rows"]} >= {"fp32", "fp16"}
    assert (tmp_path / "gpu_check.png").stat().st_size > 0
