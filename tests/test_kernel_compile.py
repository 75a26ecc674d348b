"""The loss kernels compiled for real GPU targets (sm_80, sm_90) on this CPU-only machine.

The interpreter accepts code the compiler refuses (module-level Python values inside @jit
code, shared memory beyond a block's limit), so interpreter tests alone cannot show that the
kernel runs on a GPU. This compiles every kernel in the configurations the launcher picks for
the training defaults and the worst cases (largest D per dtype), in a child process without
TRITON_INTERPRET, and holds them to: compiles, shared memory within the target's limit, no
spills at the training defaults, and fp32 "ieee" dots free of tf32 matrix instructions.
The full matrix is benchmarks/compile_matrix.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_matrix(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compile_matrix.py"), "--quick",
         "--no-write", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stdout.splitlines() if line.startswith("FAIL"))
    return rows


def test_every_kernel_compiles_for_both_targets(quick_matrix):
    kernels = {r["kernel"] for r in quick_matrix}
    assert kernels == {"row_lse", "col_lse", "grad_user", "grad_item"}
    assert {r["sm"] for r in quick_matrix} == {80, 90}
    assert {r["dtype"] for r in quick_matrix} == {"fp32", "bf16", "fp16"}
    from recsys_ccl.config import TrainConfig

    assert {r["D"] for r in quick_matrix} >= {TrainConfig().dim, 256}
    failing = [r for r in quick_matrix if not r["ok"]]
    assert not failing, failing


def test_shared_memory_within_each_targets_limit(quick_matrix):
    limit = {80: 163 * 1024, 90: 227 * 1024}
    assert all(0 < r["shared"] <= limit[r["sm"]] for r in quick_matrix)


def test_no_spills_at_the_training_defaults(quick_matrix):
    """TrainConfig's dim, in fp32 (the default) and the 16-bit types (autocast)."""
    from recsys_ccl.config import TrainConfig

    defaults = [r for r in quick_matrix if r["training_default"]]
    dim = TrainConfig().dim
    assert {(r["dtype"], r["D"]) for r in defaults} == {("fp32", dim), ("bf16", dim),
                                                         ("fp16", dim)}
    assert [r for r in defaults if r["spill"]] == []


def test_fp32_precision_reaches_the_matrix_instructions(quick_matrix):
    """"ieee" must not become tf32 on the way to the PTX, and "tf32" must (which shows that
    the check can see it)."""
    fp32 = [r for r in quick_matrix if r["dtype"] == "fp32"]
    assert {r["precision"] for r in fp32} >= {"ieee", "tf32"}
    assert not any(r["tf32_mma"] for r in fp32 if r["precision"] == "ieee")
    assert all(r["tf32_mma"] for r in fp32 if r["precision"] == "tf32")
