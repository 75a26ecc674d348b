"""The prepared GPU check of the fused contrastive-loss kernel: one run, about 5 minutes on one
H200, every step on its own, each result appended as a JSON line the moment it exists.

    python benchmarks/gpu_check.py                       # on a GPU machine
    python benchmarks/gpu_check.py --smoke --out /tmp/g  # tiny sizes; on CPU via the interpreter

Steps (a failing step records its error and the next one runs):
  environment    versions, device, and the host synchronisations of one training step
  resources      registers, spills and shared memory of every kernel the launcher picks
                 (benchmarks/compile_matrix.py --quick), or the compiler's error
  accuracy       loss, dU, dV, dτ against float64: fp32-ieee (2e-5), fp32-tf32x3 (1e-4),
                 bf16 and fp16 (1e-2); B = 4096, N = 8192, D in {64, 128}
  degenerate     every id equal (loss and gradients exactly 0); τ = 0.01 with log_q to -30
  determinism    bf16, B = 16384, N = 32768, D = 128: two runs, bitwise equal
  timing         forward and forward+backward by CUDA events: ours, naive, torch.compile(naive),
                 F.linear_cross_entropy, cut-cross-entropy (where importable); bf16 D in
                 {64, 128, 256} x B = N in {4096, 16384, 65536}, and fp32 D = 64, B = 16384
  scale          B = N = 2^20, D = 128, bf16 forward+backward: time and peak memory
  sequential     the transformer tower's shapes: Q = 65,536 queries against N = Q + 16,384
                 columns, D = 128, fp32 / fp16 / bf16 against the chunked path in float64,
                 and the forward+backward time
  plot           gpu_check.png from the timing rows
Output: OUT/gpu_check.jsonl (one line per step), OUT/gpu_check.png. Exit code 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from recsys_ccl import contrastive_loss  # noqa: E402
from recsys_ccl.contrastive_torch import contrastive_loss_naive  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batch(B: int, N: int, D: int, seed: int = 0, log_q_min: float | None = None):
    """Unit-norm users and items with planted positives, a log_q and duplicate ids (fp32)."""
    g = torch.Generator().manual_seed(seed)
    user = F.normalize(torch.randn(B, D, generator=g), dim=1)
    item = torch.randn(N, D, generator=g)
    item[:B] += 0.5 * user
    item = F.normalize(item, dim=1)
    log_q = torch.log_softmax(torch.randn(N, generator=g), 0)
    if log_q_min is not None:
        log_q = torch.linspace(log_q_min, -1.0, N)[torch.randperm(N, generator=g)]
    ids = torch.randint(0, max(2, N // 3), (N,), generator=g)
    return user, item, log_q, ids


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    denom = ref.norm()
    return float((a - ref).norm() / denom) if denom > 0 else float((a - ref).norm())


def loss_and_grads(fn, user, item, tau, log_q, ids, dtype, **kw):
    u = user.detach().to(DEVICE, dtype).clone().requires_grad_()
    v = item.detach().to(DEVICE, dtype).clone().requires_grad_()
    t = torch.tensor(tau, device=DEVICE, dtype=torch.float64 if dtype == torch.float64
                     else torch.float32, requires_grad=True)
    loss = fn(u, v, t, log_q.to(DEVICE, torch.float64 if dtype == torch.float64 else
                                torch.float32), ids.to(DEVICE), True, "mean", **kw)
    loss.backward()
    return loss.detach(), u.grad, v.grad, t.grad


def ours(u, v, t, lq, ids, sym, red, precision=None):
    return contrastive_loss(u, v, t, lq, ids, sym, red, impl="triton", precision=precision)


def compare(user, item, tau, log_q, ids, dtype, precision, tol) -> dict:
    """Errors of our kernel against float64 evaluated on the same (rounded) inputs."""
    rounded_u, rounded_v = user.to(dtype).double(), item.to(dtype).double()
    ref = loss_and_grads(contrastive_loss_naive, rounded_u, rounded_v, tau, log_q.double(),
                         ids, torch.float64)
    out = loss_and_grads(ours, rounded_u, rounded_v, tau, log_q, ids, dtype,
                         precision=precision)
    errs = {name: rel_err(a, b) for name, a, b in zip(("loss", "d_user", "d_item", "d_tau"),
                                                      out, ref, strict=True)}
    return {**errs, "tol": tol, "ok": all(e <= tol for e in errs.values())}


# -- steps ------------------------------------------------------------------------------------

def step_environment(smoke: bool) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "device": DEVICE,
            "name": torch.cuda.get_device_name() if CUDA else platform.processor(),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if not CUDA:
        return {**info, "host_syncs_per_step": None, "ok": True}
    user, item, log_q, ids = make_batch(4096, 8192, 64)
    u = user.cuda().bfloat16().requires_grad_()
    v = item.cuda().bfloat16().requires_grad_()
    t = torch.tensor(0.05, device="cuda", requires_grad=True)
    lq, ids = log_q.cuda(), ids.cuda()
    ours(u, v, t, lq, ids, False, "mean").backward()  # compile first
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ours(u, v, t, lq, ids, False, "mean").backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message).lower()]
    return {**info, "host_syncs_per_step": len(syncs), "sync_sites": syncs[:6], "ok": True}


def step_resources(smoke: bool, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "compile_matrix.py"), "--no-write",
           "--json", str(out / "compile_matrix.json")]
    cmd += ["--only", "bf16:64"] if smoke else ["--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    rows = json.loads((out / "compile_matrix.json").read_text())
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    return {"compiles": len(rows), "spilling": sum(1 for r in rows if r.get("spill")),
            "max_shared": max((r["shared"] or 0) for r in rows), "failures": fails,
            "ok": proc.returncode == 0}


def step_accuracy(smoke: bool) -> dict:
    B, N, dims = (37, 83, (16, 40)) if smoke else (4096, 8192, (64, 128))
    cases = [("fp32", "ieee", 2e-5), ("fp32", "tf32x3", 1e-4), ("fp16", None, 1e-2)]
    if CUDA:  # bf16 is broken in Triton's interpreter (upstream issue 11584)
        cases.append(("bf16", None, 1e-2))
    rows = []
    for D in dims:
        user, item, log_q, ids = make_batch(B, N, D, seed=D)
        for dtype, precision, tol in cases:
            r = compare(user, item, 0.05, log_q, ids, DTYPES[dtype], precision, tol)
            rows.append({"D": D, "dtype": dtype, "precision": precision, **r})
    return {"B": B, "N": N, "rows": rows, "ok": all(r["ok"] for r in rows)}


def step_degenerate(smoke: bool) -> dict:
    B, N, D = (19, 40, 16) if smoke else (4096, 8192, 128)
    user, item, _, _ = make_batch(B, N, D, seed=1)
    same = torch.full((N,), 7)
    results = {}
    for dtype in ("fp32", "fp16") + (("bf16",) if CUDA else ()):
        loss, du, dv, dt = loss_and_grads(
            lambda u, v, t, lq, i, s, r: contrastive_loss(u, v, t, None, i, s, "none",
                                                          impl="triton").sum(),
            user, item, 0.1, torch.zeros(N), same, DTYPES[dtype])
        results[f"all_ids_equal_{dtype}"] = bool(
            float(loss) == 0 and not du.any() and not dv.any() and float(dt) == 0)
    user, item, log_q, ids = make_batch(B, N, D, seed=2, log_q_min=-30.0)
    hard = compare(user, item, 0.01, log_q, ids, torch.float32, "ieee", 1e-4)
    return {**results, "tau_0.01_log_q_-30": hard,
            "ok": all(results.values()) and hard["ok"]}


def step_determinism(smoke: bool) -> dict:
    B, N, D, dtype = (40, 70, 16, "fp32") if smoke else (16384, 32768, 128, "bf16")
    user, item, log_q, ids = make_batch(B, N, D, seed=3)
    runs = [loss_and_grads(ours, user, item, 0.05, log_q, ids, DTYPES[dtype])
            for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    return {"B": B, "N": N, "D": D, "dtype": dtype, "bitwise_equal": same, "ok": same}


def _timer(fn, reps: int) -> float:
    """Median seconds of fn() (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _peers(smoke: bool) -> dict:
    tau = 0.05

    def naive(u, v):
        return contrastive_loss_naive(u, v, tau)

    def lce(u, v):
        return F.linear_cross_entropy(u / tau, v, torch.arange(u.shape[0], device=u.device),
                                      options=torch.nn.LinearCrossEntropyOptions())

    impls = {"ours": lambda u, v: contrastive_loss(u, v, tau, impl="triton"), "naive": naive}
    if smoke:
        return impls
    impls["compiled"] = torch.compile(naive, dynamic=False)
    impls["torch_lce"] = lce
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cce"] = lambda u, v: linear_cross_entropy(
            u / tau, v, torch.arange(u.shape[0], device=u.device), impl="cce")
    except ImportError:
        pass
    return impls


def step_timing(smoke: bool) -> dict:
    torch._dynamo.config.cache_size_limit = 64
    configs = [("fp32", 64, 64)] if smoke else (
        [("bf16", D, B) for D in (64, 128, 256) for B in (4096, 16384, 65536)]
        + [("fp32", 64, 16384)])
    rows = []
    for dtype, D, B in configs:
        user, item, _, _ = make_batch(B, B, D, seed=4)
        u0, v0 = user.to(DEVICE, DTYPES[dtype]), item.to(DEVICE, DTYPES[dtype])
        for name, fn in _peers(smoke).items():
            row = {"dtype": dtype, "D": D, "B": B, "impl": name}
            try:
                with torch.no_grad():
                    row["fwd_s"] = _timer(lambda fn=fn, u0=u0, v0=v0: fn(u0, v0),
                                          3 if smoke else 10)

                def train_step(fn=fn, u0=u0, v0=v0):
                    u, v = u0.detach().requires_grad_(), v0.detach().requires_grad_()
                    fn(u, v).backward()

                if CUDA:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                row["fwd_bwd_s"] = _timer(train_step, 3 if smoke else 10)
                if CUDA:
                    row["extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            except Exception as e:  # a peer that cannot run this size (memory) is a finding
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if CUDA:
                torch.cuda.empty_cache()
            rows.append(row)
    by_cfg: dict[tuple, dict] = {}
    for r in rows:
        by_cfg.setdefault((r["dtype"], r["D"], r["B"]), {})[r["impl"]] = r.get("fwd_bwd_s")
    for r in rows:
        base = by_cfg[(r["dtype"], r["D"], r["B"])]
        if r["impl"] == "ours" and r.get("fwd_bwd_s"):
            r["vs"] = {k: v / r["fwd_bwd_s"] for k, v in base.items() if v and k != "ours"}
    return {"rows": rows, "ok": all("error" not in r for r in rows if r["impl"] == "ours")}


def step_scale(smoke: bool) -> dict:
    B, D = (256, 16) if smoke else (1 << 20, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    user, item, _, _ = make_batch(B, B, D, seed=5)
    u = user.to(DEVICE, dtype).requires_grad_()
    v = item.to(DEVICE, dtype).requires_grad_()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def run():
        contrastive_loss(u, v, 0.05, impl="triton").backward()

    seconds = _timer(run, 1)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else None
    finite = bool(torch.isfinite(u.grad).all() and torch.isfinite(v.grad).all())
    return {"B": B, "D": D, "seconds": seconds, "extra_mib": extra, "ok": finite}


def step_sequential(smoke: bool) -> dict:
    """The transformer tower's shapes: every position of a batch a query (Q up to 65,536),
    its targets plus 16,384 shared negatives the columns (N = Q + 16,384), D = 128. Loss and
    gradients of bf16 and fp32 against the chunked path in float64 (the naive one would hold
    Q x N float64 logits), and the time of a forward+backward."""
    Q, K, D = (53, 17, 16) if smoke else (65536, 16384, 128)
    user, item, log_q, ids = make_batch(Q, Q + K, D, seed=11)
    cases = [("fp32", "ieee", 2e-5), ("fp16", None, 1e-2)]
    if CUDA:
        cases.append(("bf16", None, 1e-2))
    rows = []
    for dtype, precision, tol in cases:
        rounded_u, rounded_v = user.to(DTYPES[dtype]).double(), item.to(DTYPES[dtype]).double()
        ref = loss_and_grads(lambda *a, **k: contrastive_loss(*a, impl="torch", **k),
                             rounded_u, rounded_v, 0.05, log_q.double(), ids, torch.float64)
        got = loss_and_grads(ours, rounded_u, rounded_v, 0.05, log_q, ids, DTYPES[dtype],
                             precision=precision)
        errs = {name: rel_err(a, b) for name, a, b in
                zip(("loss", "d_user", "d_item", "d_tau"), got, ref, strict=True)}
        u = user.to(DEVICE, DTYPES[dtype]).requires_grad_()
        v = item.to(DEVICE, DTYPES[dtype]).requires_grad_()
        lq, i = log_q.to(DEVICE), ids.to(DEVICE)
        seconds = _timer(lambda u=u, v=v, lq=lq, i=i, p=precision: contrastive_loss(
            u, v, 0.05, lq, i, impl="triton", precision=p).backward(), 1 if smoke else 5)
        rows.append({"dtype": dtype, "precision": precision, **errs, "tol": tol,
                     "fwd_bwd_ms": 1e3 * seconds,
                     "ok": all(e <= tol for e in errs.values())})
    return {"Q": Q, "N": Q + K, "D": D, "rows": rows, "ok": all(r["ok"] for r in rows)}


def step_plot(out: Path, records: list[dict]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = next((r for r in records if r["step"] == "timing" and "rows" in r), None)
    if timing is None:
        return {"ok": False, "error": "no timing rows to plot"}
    rows = [r for r in timing["rows"] if r.get("fwd_bwd_s")]
    labels = sorted({(r["dtype"], r["D"], r["B"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        ys = [next((r["fwd_bwd_s"] * 1e3 for r in rows if r["impl"] == impl
                    and (r["dtype"], r["D"], r["B"]) == lab), math.nan) for lab in labels]
        ax.bar([i + k * width for i in range(len(labels))], ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{d} D={D}\nB=N={B}" for d, D, B in labels], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward, ms (log)")
    ax.set_title(f"contrastive loss on {records[0].get('name', DEVICE)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gpu_check.png", dpi=120)
    return {"png": str(out / "gpu_check.png"), "ok": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI, interpreter)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.jsonl"
    steps = [
        ("environment", lambda: step_environment(args.smoke)),
        ("resources", lambda: step_resources(args.smoke, out)),
        ("accuracy", lambda: step_accuracy(args.smoke)),
        ("degenerate", lambda: step_degenerate(args.smoke)),
        ("determinism", lambda: step_determinism(args.smoke)),
        ("timing", lambda: step_timing(args.smoke)),
        ("scale", lambda: step_scale(args.smoke)),
        ("sequential", lambda: step_sequential(args.smoke)),
    ]
    records: list[dict] = []
    for name, fn in [*steps, ("plot", lambda: step_plot(out, records))]:
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # one failing step must not lose the others' figures
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        record = {"step": name, "smoke": args.smoke, "seconds": time.perf_counter() - t0,
                  **result}
        records.append(record)
        with open(log, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(f"[{name}] {'ok' if record.get('ok') else 'FAILED'} "
              f"({record['seconds']:.1f} s)", flush=True)
        if not record.get("ok"):
            print(json.dumps(record, indent=1, default=str)[:3000], flush=True)
    failed = [r["step"] for r in records if not r.get("ok")]
    print(f"{len(records) - len(failed)}/{len(records)} steps ok; results in {log}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
