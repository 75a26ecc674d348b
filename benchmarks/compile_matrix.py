"""Compile every loss kernel in every configuration the launcher can choose, for sm_80 (A100)
and sm_90 (H100/H200), on this machine (no GPU needed), and report shared memory, registers
and spills per kernel and target.

    python benchmarks/compile_matrix.py            # the full matrix -> results/compile_matrix.*
    python benchmarks/compile_matrix.py --quick    # the training defaults and the worst cases

The matrix: fp32 / bf16 / fp16 x D in {32, 64, 96, 128, 192, 256} x symmetric on/off x
(logQ and ids) on/off, and for fp32 each matmul precision (ieee, tf32x3, tf32). Exit code 1
when a kernel fails to compile, exceeds shared memory, or spills at a training default
(TrainConfig's dim in every dtype); spills elsewhere are listed, not failed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, do not interpret
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="compile-matrix-"))

import torch
import triton

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# powers of two first: D = 96 and 192 compile exactly as the 128 and 256 blocks (D itself is a
# runtime argument), so their rows are the power-of-two rows
DIMS = (32, 64, 128, 256, 96, 192)
PRECISIONS = ("ieee", "tf32x3", "tf32")


def training_defaults() -> set[tuple[str, int]]:
    """(dtype, D) of a default training run: TrainConfig's dim in fp32 (the default) and in
    the 16-bit types (autocast)."""
    from recsys_ccl.config import TrainConfig

    return {(dtype, TrainConfig().dim) for dtype in DTYPES}


TRAINING_DEFAULTS = training_defaults()


def matrix(quick: bool, only: tuple[str, int] | None = None
           ) -> list[tuple[str, int, bool, bool, str]]:
    """(dtype, D, symmetric, with logQ and ids, precision) rows to compile."""
    if only is not None:  # one dtype and D, non-symmetric, with logQ and ids (a smoke check)
        return [(only[0], only[1], False, True, "ieee")]
    rows = []
    for dtype, D, sym, flags in itertools.product(DTYPES, DIMS, (False, True), (True, False)):
        precisions = PRECISIONS if dtype == "fp32" else ("ieee",)
        for prec in precisions:
            worst = max(DIMS) == D and sym and flags
            default = (dtype, D) in TRAINING_DEFAULTS and flags and prec != "tf32x3"
            if quick and not (worst or default):
                continue
            rows.append((dtype, D, sym, flags, prec))
    return rows


def _compile(job):
    from kernel_aot import compile_launch

    launch, sm = job
    return compile_launch(launch, sm).row()


def run(quick: bool, workers: int, only: tuple[str, int] | None = None) -> list[dict]:
    from kernel_aot import plan_launches

    jobs, seen = [], set()
    for dtype, D, sym, flags, prec in matrix(quick, only):
        for launch in plan_launches(D, DTYPES[dtype], sym, flags, flags, prec):
            for sm in (80, 90):
                key = (launch.kernel, launch.dtype, launch.block_d, launch.has_log_q,
                       launch.has_ids, launch.precision, launch.config,
                       launch.symmetric if launch.kernel.startswith("grad") else None,
                       launch.n_split > 1, sm)
                if key not in seen:
                    seen.add(key)
                    jobs.append((launch, sm))
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(_compile, jobs))
    for r in rows:
        r["training_default"] = (r["dtype"], r["D"]) in TRAINING_DEFAULTS and \
            r["has_ids"] and r["precision"] != "tf32x3"
    return rows


def verdict(rows: list[dict]) -> list[str]:
    """What fails the check: compile errors, shared memory over the limit, spills at a
    training default."""
    bad = []
    for r in rows:
        where = (f"{r['kernel']} {r['dtype']} D={r['D']} sym={r['symmetric']} "
                 f"ids/logQ={r['has_ids']} {r['precision']} sm_{r['sm']}")
        if not r["ok"]:
            bad.append(f"{where}: {r['error']}")
        elif r["training_default"] and r["spill"]:
            bad.append(f"{where}: spills {r['spill']} B per thread at a training default")
    return bad


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':<10} {'dtype':<5} {'D':>4} {'sym':<5} {'ids':<5} {'prec':<7} {'tile':>9} "
          f"{'w/s':>4} {'sm':>3} {'shared KB':>9} {'regs':>4} {'spill B':>7} tf32 status")
    for r in rows:
        shared = f"{r['shared'] / 1024:.0f}" if r["shared"] is not None else "-"
        status = "ok" if r["ok"] else r["error"]
        print(f"{r['kernel']:<10} {r['dtype']:<5} {r['D']:>4} {r['symmetric']!s:<5} "
              f"{r['has_ids']!s:<5} {r['precision']:<7} "
              f"{r['cfg_block_b']:>4}x{r['cfg_block_n']:<4} "
              f"{r['cfg_num_warps']}/{r['cfg_num_stages']:<2} {r['sm']:>3} {shared:>9} "
              f"{r['regs'] if r['regs'] is not None else '-'!s:>4} "
              f"{r['spill'] if r['spill'] is not None else '-'!s:>7} "
              f"{'yes' if r['tf32_mma'] else 'no':<4} {status}")


def write_results(rows: list[dict], stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spills = [r for r in rows if r["ok"] and r["spill"]]
    lines = [
        "# Loss kernels compiled for sm_80 and sm_90 (no GPU needed)", "",
        f"Triton {triton.__version__}, torch {torch.__version__}; "
        f"{len(rows)} compiles, {sum(not r['ok'] for r in rows)} failing, "
        f"{len(spills)} with spills. Written by `python benchmarks/compile_matrix.py`. "
        "D = 96 and 192 pad to the 128 and 256 blocks and compile as those rows (D is a "
        "runtime argument). "
        f"Training defaults ({', '.join(f'{t} D={d}' for t, d in sorted(TRAINING_DEFAULTS))}: "
        "TrainConfig's dim in each dtype) must not spill; "
        "the spills listed elsewhere are at sizes where the resident operand and the "
        "backward's (BLOCK, D) fp32 accumulator exceed the register file at the tiles that "
        "still fit shared memory.", "",
        "| kernel | dtype | D | symmetric | ids+logQ | precision | tile | warps/stages | sm "
        "| shared KB | regs | spill B | tf32 mma | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shared = f"{r['shared'] / 1024:.0f}" if r["shared"] is not None else "-"
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['D']} | {r['symmetric']} | {r['has_ids']} "
            f"| {r['precision']} | {r['cfg_block_b']}x{r['cfg_block_n']} "
            f"| {r['cfg_num_warps']}/{r['cfg_num_stages']} | {r['sm']} | {shared} "
            f"| {r['regs']} | {r['spill']} | {'yes' if r['tf32_mma'] else 'no'} "
            f"| {'ok' if r['ok'] else r['error']} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only the training defaults and the largest D per dtype")
    ap.add_argument("--only", metavar="DTYPE:D",
                    help="one configuration, e.g. bf16:64 (a smoke check)")
    ap.add_argument("--json", help="also write the rows as JSON to this path")
    ap.add_argument("--no-write", action="store_true", help="do not write results/")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    only = None
    if args.only:
        dtype, _, dim = args.only.partition(":")
        if dtype not in DTYPES or not dim.isdigit():
            ap.error(f"--only takes DTYPE:D with DTYPE in {sorted(DTYPES)}, got {args.only!r}")
        only = (dtype, int(dim))
    rows = run(args.quick, args.workers, only)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.no_write and only is None:
        write_results(rows, "compile_matrix_quick" if args.quick else "compile_matrix")
    bad = verdict(rows)
    spills = sum(1 for r in rows if r["ok"] and r["spill"])
    print(f"\n{len(rows)} compiles in {time.perf_counter() - start:.0f} s: {len(bad)} failing, "
          f"{spills} with spills (listed above)")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
