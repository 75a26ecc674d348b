"""How the fused contrastive-loss kernels are launched: tile sizes, warps, pipeline stages and
the matmul precision, for given shapes and dtype.

One pure function, `launch_plan`, decides everything the launchers pass to Triton, so tests
and tools (the ahead-of-time compile check, benchmarks/compile_matrix.py) can enumerate the
configurations a GPU run would compile without a GPU. Every configuration it can return is
compiled for sm_80 and sm_90 in tests/test_kernel_compile.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "DEFAULT_SMS",
    "MAX_D",
    "KernelConfig",
    "LaunchPlan",
    "Precision",
    "interpreting",
    "launch_plan",
    "resolve_precision",
    "split_for",
]

Precision = Literal["ieee", "tf32x3", "tf32"]

# The whole embedding sits in one BLOCK_D tile (one tl.dot per logits tile); beyond 256 the
# resident (BLOCK, D) operand no longer fits shared memory next to the streamed one.
MAX_D = 256

# the device size the split of N is planned for when no GPU is at hand (an H100/H200 has 132)
DEFAULT_SMS = 132
# programs per SM the split aims at, and the fewest column tiles a split range may hold
_PROGRAMS_PER_SM = 2
_MIN_TILES_PER_SPLIT = 4

# torch.get_float32_matmul_precision() -> Triton's input_precision for fp32 dots
_TORCH_TO_TRITON_PRECISION: dict[str, Precision] = {
    "highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_precision(dtype: torch.dtype, precision: str | None) -> Precision:
    """The input_precision of the kernels' fp32 dots: `precision` when given, else the one
    torch.get_float32_matmul_precision() asks for ("highest" -> "ieee", "high" -> "tf32x3",
    "medium" -> "tf32"). 16-bit inputs multiply exactly into fp32 accumulators whatever is
    asked, so they always get "ieee" (one compiled specialisation instead of three)."""
    if precision is not None and precision not in ("ieee", "tf32x3", "tf32"):
        raise ValueError(f"precision must be 'ieee', 'tf32x3' or 'tf32', got {precision!r}")
    if dtype != torch.float32:
        return "ieee"
    if precision is None:
        return _TORCH_TO_TRITON_PRECISION[torch.get_float32_matmul_precision()]
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class KernelConfig:
    """One kernel's launch: a (block_b, block_n) logits tile, warps and software-pipeline
    stages of its streamed operand."""

    block_b: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the four kernels of one loss call are launched with.

    n_split: the row-direction kernels (row_lse, grad_user) cut the N columns into this many
    tile-aligned ranges, one program each, when the row blocks alone would leave most of the
    device idle (flash-decoding); their partial results are combined in a fixed order, so
    the result stays deterministic."""

    block_d: int
    precision: Precision
    row_lse: KernelConfig
    col_lse: KernelConfig
    grad_user: KernelConfig
    grad_item: KernelConfig
    n_split: int = 1

    def columns_per_split(self, N: int, block_n: int) -> int:
        """Columns of each split range, a multiple of block_n."""
        tiles = -(-N // block_n)
        return -(-tiles // self.n_split) * block_n


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _gpu_configs(block_d: int, dtype: torch.dtype, precision: Precision
                 ) -> tuple[KernelConfig, KernelConfig, KernelConfig, KernelConfig]:
    """(row_lse, col_lse, grad_user, grad_item) for a GPU.

    A kernel keeps one (BLOCK, block_d) operand resident and streams `stages` copies of the
    other through shared memory; the backward also holds a (BLOCK, block_d) fp32 accumulator
    in registers. 16-bit and tf32 dots run on tensor cores and take large tiles; fp32 "ieee"
    dots run as FMAs, whose operands each thread holds along all of D, so they get small
    tiles. Each entry is the largest tile found without spills on both targets at the
    training defaults (TrainConfig's dim, in fp32 and the 16-bit types);
    benchmarks/compile_matrix.py (tests/test_kernel_compile.py in CI) holds every entry to
    that.
    """
    if dtype != torch.float32:
        if block_d <= 64:
            row, grad_u, grad_v = (128, 128, 8, 3), (128, 32, 8, 2), (32, 128, 8, 2)
        elif block_d <= 128:
            row, grad_u, grad_v = (128, 64, 8, 3), (32, 64, 8, 2), (64, 64, 8, 2)
        else:
            row, grad_u, grad_v = (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)
    elif precision == "ieee":
        # from D = 128 the 64x32 row tile spills on sm_90 and the 32x32 item-gradient tile on
        # sm_80 (symmetric): the FMA layouts hold more of each operand per thread there
        if block_d <= 64:
            row, grad_u, grad_v = (64, 32, 8, 2), (32, 16, 8, 2), (32, 32, 8, 2)
        else:
            row, grad_u, grad_v = (64, 16, 8, 1), (32, 16, 8, 2), (32, 16, 8, 2)
    elif block_d <= 64:
        row, grad_u, grad_v = (128, 64, 8, 3), (32, 32, 8, 2), (32, 32, 4, 2)
    else:
        row, grad_u, grad_v = (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2)
    row_cfg = KernelConfig(*row)
    # the column-direction kernel streams users past resident items: the same tile, transposed
    col_cfg = KernelConfig(row_cfg.block_n, row_cfg.block_b, row_cfg.num_warps,
                           row_cfg.num_stages)
    return row_cfg, col_cfg, KernelConfig(*grad_u), KernelConfig(*grad_v)


def launch_plan(
    B: int,
    N: int,
    D: int,
    dtype: torch.dtype,
    precision: str | None = None,
    blocks: tuple[int, int] | None = None,
    interpreter: bool | None = None,
    num_sms: int | None = None,
    n_split: int | None = None,
) -> LaunchPlan:
    """The launch configuration of a (B, D) x (N, D) loss in `dtype`.

    blocks: force (block_b, block_n) for every kernel (tests use small tiles so that odd shapes
    span several tiles). interpreter: plan for Triton's CPU interpreter, which pays per
    operation rather than per element and so gets the largest tiles the shapes allow (default:
    whether TRITON_INTERPRET is set). num_sms: the device's multiprocessors (default
    DEFAULT_SMS); n_split: force the split of N (tests).
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernel takes float32, float16 or bfloat16 embeddings, got "
                         f"{dtype}; cast float64 to float32 first, or use impl='torch'")
    if not 1 <= D <= MAX_D:
        raise ValueError(f"the Triton kernel supports embedding sizes 1..{MAX_D}, got D = {D}; "
                         f"use impl='torch' for wider embeddings")
    block_d = max(16, _next_power_of_2(D))
    prec = resolve_precision(dtype, precision)
    if interpreter is None:
        interpreter = interpreting()
    if blocks is not None:
        cfg = KernelConfig(blocks[0], blocks[1], 4, 1)
        return LaunchPlan(block_d, prec, cfg, cfg, cfg, cfg, n_split or 1)
    if interpreter:
        cap = 64
        cfg = KernelConfig(min(cap, max(16, _next_power_of_2(B))),
                           min(cap, max(16, _next_power_of_2(N))), 4, 1)
        return LaunchPlan(block_d, prec, cfg, cfg, cfg, cfg, n_split or 1)
    row, col, grad_u, grad_v = _gpu_configs(block_d, dtype, prec)
    if n_split is None:
        n_split = split_for(B, N, row, num_sms or DEFAULT_SMS)
    return LaunchPlan(block_d, prec, row, col, grad_u, grad_v, n_split)


def split_for(B: int, N: int, row: KernelConfig, num_sms: int) -> int:
    """How many column ranges the row-direction kernels cut N into: enough programs for
    about two per SM, each range holding at least a few column tiles (a power of two)."""
    row_blocks = -(-B // row.block_b)
    want = -(-_PROGRAMS_PER_SM * num_sms // row_blocks)
    most = max(1, -(-N // row.block_n) // _MIN_TILES_PER_SPLIT)
    split = 1
    while split * 2 <= min(want, most):
        split *= 2
    return split
