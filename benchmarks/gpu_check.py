"""One prepared GPU check of the fused kernel (run by gpu_check.sh; about 3-4 minutes on an H200).

1. correctness against float64 at realistic sizes: fp32 (tf32 dots, tolerance 5e-4; ieee
   dots, 2e-5) and bf16 (1e-2), with logQ, planted duplicate ids and the symmetric term;
2. bitwise determinism: three forward+backward runs give identical bits;
3. scale: B = 1,048,576, D = 128, bf16 forward+backward runs on one GPU, peak memory reported;
writes gpu_check.json to the output folder; non-zero exit if a check fails.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loss_reference import make_batch, rel_err

from recsys_ccl.contrastive_torch import contrastive_loss_naive
from recsys_ccl.kernels.contrastive_function import triton_contrastive_loss


def check_accuracy(dtype, precision, tol, B=8192, N=16384, D=128):
    user, item, lq, ids = make_batch(B, N, D, log_q=True, dup_ids=True)
    u64, v64 = user.to(dtype).double().cuda().requires_grad_(), item.to(dtype).double().cuda()
    v64.requires_grad_()
    ref = contrastive_loss_naive(u64, v64, 0.05, lq.double().cuda(), ids.cuda(), True, "mean")
    ref.backward()
    u = user.to(dtype).cuda().requires_grad_()
    v = item.to(dtype).cuda().requires_grad_()
    loss = triton_contrastive_loss(u, v, torch.tensor(0.05), lq.cuda(), ids.cuda(), True,
                                   "mean", precision=precision)
    loss.backward()
    errs = {"loss": rel_err(loss.detach().float().cpu(), ref.detach().cpu()),
            "d_user": rel_err(u.grad.float().cpu(), u64.grad.cpu()),
            "d_item": rel_err(v.grad.float().cpu(), v64.grad.cpu())}
    return {"dtype": str(dtype), "precision": precision, "tol": tol, **errs,
            "ok": all(e <= tol for e in errs.values())}


def check_determinism(B=16384, N=32768, D=128):
    user, item, lq, ids = make_batch(B, N, D, log_q=True, dup_ids=True)
    runs = []
    for _ in range(3):
        u = user.bfloat16().cuda().requires_grad_()
        v = item.bfloat16().cuda().requires_grad_()
        loss = triton_contrastive_loss(u, v, torch.tensor(0.05), lq.cuda(), ids.cuda(), True,
                                       "mean")
        loss.backward()
        runs.append((loss.detach(), u.grad, v.grad))
    same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r, strict=True))
    return {"bitwise_identical": same, "ok": same}


def check_scale(B=1 << 20, D=128):
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(B, D, device="cuda", generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(B, D, device="cuda", generator=g) + u, dim=1)
    u, v = u.bfloat16().requires_grad_(), v.bfloat16().requires_grad_()
    base = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = triton_contrastive_loss(u, v, torch.tensor(0.05), None, None, False, "mean")
    loss.backward()
    torch.cuda.synchronize()
    return {"B": B, "D": D, "seconds": time.perf_counter() - t0,
            "extra_peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "loss": float(loss), "ok": bool(torch.isfinite(loss))}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(),
        "accuracy": [check_accuracy(torch.float32, "tf32", 5e-4),
                     check_accuracy(torch.float32, "ieee", 2e-5),
                     check_accuracy(torch.bfloat16, "tf32", 1e-2)],
        "determinism": check_determinism(),
        "scale": check_scale(),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = all(r["ok"] for r in report["accuracy"]) and report["determinism"]["ok"]
    return 0 if ok and report["scale"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
