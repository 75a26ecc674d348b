"""Training throughput with 1 and 2 processes (torchrun, gloo) on the CPU, side by side.

One synthetic DATA directory; `recsys-ccl train` for one epoch (no validation) as
  1 process,  batch 2048            (the reference)
  2 processes, batch 1024 per rank  (the same global batch and negatives: same result)
  2 processes, batch 2048 per rank  (twice the global batch)
each with OMP_NUM_THREADS = cores / processes, so that both use the machine's cores. Reports
interactions/s and the ratio to one process, and checks that the 2 x 1024 run ends with the
weights of the 1 x 2048 run.

    python benchmarks/bench_train_ddp.py                      # ~3 min on 2 cores
    python benchmarks/bench_train_ddp.py --interactions 500000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, print_table, write_csv

WORK = Path(__file__).resolve().parent / ".work"  # gitignored scratch space


def train(data: Path, out: Path, processes: int, batch: int, threads: int) -> dict:
    cmd = ["-m", "recsys_ccl.cli", "train", "--data", str(data), "--out", str(out),
           "--no-progress", "--set", "epochs=1", "--set", f"batch_size={batch}",
           "--set", 'eval_split="none"']
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                 str(processes), "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]
                if processes > 1 else [sys.executable])
    r = subprocess.run([*launcher, *cmd], capture_output=True, text=True, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, default=2_000_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--items", type=int, default=20_000)
    args = p.parse_args()
    from safetensors.torch import load_file

    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth

    cores = os.cpu_count() or 1
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        root = Path(tmp)
        write_synth(SynthConfig(users=args.users, items=args.items,
                                interactions=args.interactions), root / "log.parquet")
        prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet", k_core=5,
                              split="temporal"), root / "data")
        rows = []
        for processes, batch in ((1, 2048), (2, 1024), (2, 2048)):
            threads = max(1, cores // processes)
            s = train(root / "data", root / f"run-{processes}-{batch}", processes, batch,
                      threads)
            rows.append({"processes": processes, "batch_per_rank": batch,
                         "global_batch": processes * batch, "threads_per_rank": threads,
                         "interactions_per_s": s["interactions_per_s"], "machine": machine()})
            print(f"  {processes} x {batch}: {s['interactions_per_s']:,.0f} interactions/s",
                  flush=True)
        a = load_file(root / "run-1-2048" / "model.safetensors")
        b = load_file(root / "run-2-1024" / "model.safetensors")
        max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    base = rows[0]["interactions_per_s"]
    for r in rows:
        r["ratio_vs_1_process"] = r["interactions_per_s"] / base
    rows[1]["max_weight_diff_vs_1x2048"] = max_diff
    print_table(rows, ["processes", "batch_per_rank", "global_batch", "threads_per_rank",
                       "interactions_per_s", "ratio_vs_1_process"])
    print(f"2 x 1024 against 1 x 2048 after one epoch: max |weight difference| {max_diff:.2e}")
    write_csv(rows, RESULTS / "bench_train_ddp.csv")
    plot(rows, RESULTS / "bench_train_ddp.png")
    print(f"wrote {RESULTS / 'bench_train_ddp.csv'} and bench_train_ddp.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [f"{r['processes']} proc x {r['batch_per_rank']}" for r in rows]
    ax.bar(names, [r["interactions_per_s"] for r in rows], color=["C0", "C1", "C2"])
    for i, r in enumerate(rows):
        ax.text(i, r["interactions_per_s"], f"{r['ratio_vs_1_process']:.2f}x", ha="center",
                va="bottom")
    ax.set(ylabel="interactions / s", title=f"train, one epoch, CPU (gloo) ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
