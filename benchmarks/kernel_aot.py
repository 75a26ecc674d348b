"""Ahead-of-time compilation of the loss kernels for real GPU targets, on any machine (a
benchmark tool beside compile_matrix.py and gpu_check.py; not part of the installed package).

Triton compiles for a CUDA target without a GPU: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))` returns the PTX, the cubin and the dynamic shared memory,
and the `cuobjdump` bundled with Triton reads registers and local memory (spills) from the
cubin. The kernels and the configuration come from `launch_plan`, exactly as the launchers
use them, so what compiles here is what a GPU run compiles.

Import this module with TRITON_INTERPRET unset (or 0): under the interpreter @triton.jit
functions cannot be compiled. benchmarks/compile_matrix.py and tests/test_kernel_compile.py
run it in a child process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from recsys_ccl.kernels.contrastive_backward import _grad_item_kernel, _grad_user_kernel
from recsys_ccl.kernels.contrastive_forward import _col_lse_kernel, _row_lse_kernel
from recsys_ccl.kernels.launch_plan import KernelConfig, launch_plan

__all__ = ["SHARED_LIMIT", "CompileReport", "KernelLaunch", "compile_launch", "plan_launches"]

# dynamic shared memory one block may use, bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel specialisation a loss call launches."""

    kernel: str
    dtype: str
    D: int
    symmetric: bool
    has_log_q: bool
    has_ids: bool
    precision: str
    config: KernelConfig
    block_d: int
    n_split: int = 1


@dataclass
class CompileReport:
    """What the compiler made of one launch for one target."""

    launch: KernelLaunch
    sm: int
    ok: bool
    shared: int | None = None  # bytes of dynamic shared memory
    regs: int | None = None  # registers per thread
    spill: int | None = None  # bytes of local memory per thread (spills and stack)
    tf32_mma: bool | None = None  # the PTX holds a tf32 matrix instruction
    error: str | None = None

    def row(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "launch"}
        launch = asdict(self.launch)
        cfg = launch.pop("config")
        return {**launch, **{f"cfg_{k}": v for k, v in cfg.items()}, **out}


_KERNELS = {
    "row_lse": _row_lse_kernel,
    "col_lse": _col_lse_kernel,
    "grad_user": _grad_user_kernel,
    "grad_item": _grad_item_kernel,
}


def plan_launches(
    D: int,
    dtype: torch.dtype,
    symmetric: bool,
    has_log_q: bool = True,
    has_ids: bool = True,
    precision: str | None = None,
    B: int = 4096,
    N: int = 8192,
) -> list[KernelLaunch]:
    """The kernels a forward+backward of this configuration launches (GPU plan)."""
    plan = launch_plan(B, N, D, dtype, precision, interpreter=False)
    names = ["row_lse", "col_lse", "grad_user", "grad_item"] if symmetric else \
        ["row_lse", "grad_user", "grad_item"]
    launches = [KernelLaunch(name, _DTYPE[dtype], D, symmetric, has_log_q, has_ids,
                             plan.precision, getattr(plan, name), plan.block_d)
                for name in names]
    # row_lse specialises on whether N is split (small B) or not (large B): both ship
    return [*launches, dataclasses.replace(launches[0], n_split=max(2, plan.n_split))]


def _source(launch: KernelLaunch) -> ASTSource:
    fn = _KERNELS[launch.kernel]
    emb = "*" + launch.dtype
    sig: dict[str, str] = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("B", "N", "D", "n_per_split") or name.startswith("stride"):
            sig[name] = "i32"
        elif name in ("U", "V"):
            sig[name] = emb
        elif name == "IDS":
            sig[name] = "*i64" if launch.has_ids else "*fp32"
        elif name == "ds_scale":
            sig[name] = "fp32"
        else:  # every other argument is an fp32 buffer: LOG_Q, TAU, LSE2, G, DU, ...
            sig[name] = "*fp32"
    constexprs = {
        "BLOCK_B": launch.config.block_b, "BLOCK_N": launch.config.block_n,
        "BLOCK_D": launch.block_d, "HAS_LOG_Q": launch.has_log_q, "HAS_IDS": launch.has_ids,
        "PRECISION": launch.precision,
    }
    if "SYMMETRIC" in sig:
        constexprs["SYMMETRIC"] = launch.symmetric
    if "SPLIT" in sig:
        constexprs["SPLIT"] = launch.n_split > 1
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _innermost_error(e: BaseException) -> str:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
    msg = next((ln for ln in reversed(lines) if "Error" in ln or "Resources" in ln),
               lines[-1] if lines else "")
    return f"{type(e).__name__}: {msg}"[:300]


def compile_launch(launch: KernelLaunch, sm: int) -> CompileReport:
    """Compile one launch for sm_80 or sm_90 and read its resources."""
    options = {"num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages}
    try:
        kernel = triton.compile(_source(launch), target=GPUTarget("cuda", sm, 32),
                                options=options)
    except Exception as e:  # the compiler's own error is the finding
        return CompileReport(launch, sm, ok=False, error=_innermost_error(e))
    usage = _resource_usage(kernel.asm["cubin"])
    shared = int(kernel.metadata.shared)
    return CompileReport(
        launch, sm, ok=shared <= SHARED_LIMIT[sm], shared=shared, regs=usage.get("REG"),
        spill=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        tf32_mma=bool(re.search(r"(mma|wgmma)[^\n]*tf32", kernel.asm["ptx"])),
        error=None if shared <= SHARED_LIMIT[sm] else
        f"shared memory {shared} B over the sm_{sm} limit {SHARED_LIMIT[sm]} B")
