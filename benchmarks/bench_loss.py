"""Benchmark of the in-batch contrastive loss: ours against naive PyTorch and the best peers.

Implementations, side by side in one run:
  naive          materialised (B, N) logits + F.cross_entropy (contrastive_loss impl="naive")
  compiled       torch.compile of the naive function
  ours           contrastive_loss impl="auto": the chunked PyTorch path on CPU, Triton on CUDA
  torch_lce      F.linear_cross_entropy(user / τ, item, arange(B),
                                        options=LinearCrossEntropyOptions())
  cce            Apple's cut-cross-entropy linear_cross_entropy (impl "torch_compile" on CPU,
                 "cce" on CUDA; its default gradient filtering left on, as users run it)

Modes: forward (under no_grad) and forward+backward (the training step). Reported: median time
and extra peak memory over the inputs (CPU: the RSS high-water mark, reset before each run;
CUDA: max_memory_allocated). Writes results/bench_loss_<device>.csv and a PNG per D.

    python benchmarks/bench_loss.py                      # CPU sweep (about 10 minutes)
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --out benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    EXACT_RSS_ENV,
    RESULTS,
    machine,
    median_time,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    rss_bytes,
    write_csv,
)

from recsys_ccl import contrastive_loss
from recsys_ccl.contrastive_torch import contrastive_loss_naive

TEMPERATURE = 0.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(B: int, D: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Unit-norm towers with a planted positive, as a cosine two-tower model produces."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    user = F.normalize(torch.randn(B, D, generator=g), dim=1)
    item = F.normalize(torch.randn(B, D, generator=g) + user, dim=1)
    return user.to(device, dtype), item.to(device, dtype)


def implementations(device: str) -> dict[str, Callable]:
    def naive(u, v):
        return contrastive_loss_naive(u, v, TEMPERATURE)

    def ours(u, v):
        return contrastive_loss(u, v, TEMPERATURE, impl="auto")

    def torch_lce(u, v):
        target = torch.arange(u.shape[0], device=u.device)
        return F.linear_cross_entropy(u / TEMPERATURE, v, target,
                                      options=torch.nn.LinearCrossEntropyOptions())

    impls: dict[str, Callable] = {"naive": naive, "compiled": torch.compile(naive),
                                  "ours": ours, "torch_lce": torch_lce}
    try:
        from cut_cross_entropy import linear_cross_entropy

        cce_impl = "cce" if device == "cuda" else "torch_compile"

        def cce(u, v):
            target = torch.arange(u.shape[0], device=u.device)
            return linear_cross_entropy(u / TEMPERATURE, v, target, impl=cce_impl)

        impls["cce"] = cce
    except ImportError:
        print("cut-cross-entropy not installed: its column stays empty", file=sys.stderr)
    return impls


def measure(fn, user, item, mode: str, reps: int, device: str,
            phase: str) -> tuple[float | None, float | None]:
    """(median seconds, extra peak MiB) of one implementation in one mode; on the CPU the time
    phase leaves memory out and the memory phase (another process) leaves time out."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        if mode == "forward":
            with torch.no_grad():
                fn(user, item)
        else:
            u = user.detach().requires_grad_()
            v = item.detach().requires_grad_()
            fn(u, v).backward()

    step()  # warm-up (and compilation)
    if device == "cpu" and phase == "time":
        return median_time(step, reps, sync), None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    seconds = median_time(step, reps, sync) if cuda else None
    return seconds, max(peak, 0) / 2**20


def run(args) -> list[dict]:
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per shape; no fallback
    impls = implementations(args.device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    dtype = DTYPES[args.dtype]
    rows = []
    for D in args.dims:
        for B in args.batch_sizes:
            user, item = make_inputs(B, D, args.device, dtype)
            for mode in ("forward", "forward+backward"):
                for name, fn in impls.items():
                    row = dict(device=args.device, dtype=args.dtype, torch=torch.__version__,
                               machine=machine(), impl=name, mode=mode, B=B, D=D)
                    try:
                        sec, mib = measure(fn, user, item, mode, args.reps, args.device,
                                           args.phase)
                        row.update(ms=None if sec is None else sec * 1e3, peak_mib=mib,
                                   error="")
                    except (RuntimeError, torch.OutOfMemoryError) as exc:
                        row.update(ms=None, peak_mib=None, error=str(exc).splitlines()[0][:120])
                    rows.append(row)
                    print(f"{mode:17s} B={B:6d} D={D:4d} {name:10s} "
                          f"{_f(row['ms'])} ms  {_f(row['peak_mib'])} MiB {row['error']}",
                          flush=True)
            del user, item
    return rows


def merge_cpu_memory(rows: list[dict], argv) -> list[dict]:
    """Measure peak memory in a child process with exact RSS accounting; merge into rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--phase", "memory", "--rows-json", str(out)]
        print("\nmemory phase (separate process, exact RSS accounting)", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, **EXACT_RSS_ENV})
        mem = {(r["impl"], r["mode"], r["B"], r["D"]): r for r in json.loads(out.read_text())}
    for r in rows:
        m = mem.get((r["impl"], r["mode"], r["B"], r["D"]))
        r["peak_mib"] = m["peak_mib"] if m else None
        if m and m["error"] and not r["error"]:
            r["error"] = m["error"]
    return rows


def _f(x):
    return "   -   " if x is None else f"{x:9.1f}"


def ratios(rows: list[dict]) -> list[dict]:
    """Per (mode, B, D): ours against naive and against the best peer, time and memory."""
    table = []
    keys = sorted({(r["mode"], r["D"], r["B"]) for r in rows})
    for mode, D, B in keys:
        group = {r["impl"]: r for r in rows if (r["mode"], r["D"], r["B"]) == (mode, D, B)}
        ours, naive = group.get("ours"), group.get("naive")
        peers = [group[p] for p in ("compiled", "torch_lce", "cce")
                 if p in group and group[p]["ms"] is not None]
        if not ours or ours["ms"] is None:
            continue
        best = min(peers, key=lambda r: r["ms"]) if peers else None
        table.append(dict(
            mode=mode, D=D, B=B, ours_ms=ours["ms"],
            naive_ms=naive["ms"] if naive else None,
            time_vs_naive=ours["ms"] / naive["ms"] if naive and naive["ms"] else None,
            best_peer=best["impl"] if best else None,
            time_vs_best_peer=ours["ms"] / best["ms"] if best else None,
            mem_vs_naive=(ours["peak_mib"] / naive["peak_mib"]
                          if naive and naive["peak_mib"] else None),
            ours_mib=ours["peak_mib"], naive_mib=naive["peak_mib"] if naive else None,
        ))
    return table


def plot(rows: list[dict], out: Path, device: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for D in sorted({r["D"] for r in rows}):
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
        for i, mode in enumerate(("forward", "forward+backward")):
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = sorted((r["B"], r["ms"], r["peak_mib"]) for r in rows
                             if r["D"] == D and r["mode"] == mode and r["impl"] == impl
                             and r["ms"] is not None)
                if not pts:
                    continue
                style = dict(marker="o", lw=2.5 if impl == "ours" else 1.2, label=impl)
                axes[i, 0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
                axes[i, 1].plot([p[0] for p in pts], [max(p[2], 1e-2) for p in pts], **style)
            axes[i, 0].set_ylabel(f"{mode}: median time (ms)")
            axes[i, 1].set_ylabel(f"{mode}: extra peak memory (MiB)")
        for ax in axes.flat:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("batch size B (= N)")
        axes[0, 0].legend()
        fig.suptitle(f"contrastive loss, {device}, D = {D}")
        fig.tight_layout()
        path = out / f"bench_loss_{device}_D{D}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--impls", nargs="+", default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--phase", default="all", choices=["all", "time", "memory"],
                   help=argparse.SUPPRESS)
    p.add_argument("--rows-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = ([1024, 4096, 16384, 65536] if args.device == "cuda"
                            else [1024, 2048, 4096, 8192, 16384])
    if args.phase == "memory":  # the child process of a CPU run
        args.rows_json.write_text(json.dumps(run(args)))
        return 0
    if args.device == "cpu":
        args.phase = "time"
        rows = run(args)
        rows = merge_cpu_memory(rows, argv)
    else:
        rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / f"bench_loss_{args.device}.csv")
    table = ratios(rows)
    write_csv(table, args.out / f"bench_loss_{args.device}_ratios.csv")
    print()
    print_table(table, ["mode", "D", "B", "ours_ms", "naive_ms", "time_vs_naive", "best_peer",
                        "time_vs_best_peer", "ours_mib", "naive_mib", "mem_vs_naive"])
    for path in plot(rows, args.out, args.device):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
