"""Backward kernels: recompute the logit tiles and form the gradients without a (B, N) buffer.

With weights g[i] = dL/dloss_row[i] (and, symmetric, the same g for the column losses):

    dS[i, j] = g[i] · (p[i, j] - δ_ij) + [j < B] g[j] · (pc[i, j] - δ_ij)
    p[i, j]  = 2^(x[i, j] - lse2_row[i]),   pc[i, j] = 2^(x[i, j] - lse2_col[j])
    dS[i, i] = g[i] · expm1(-loss_row[i]) (+ g[i] · expm1(-loss_col[i]))   given as DIAG (B,)

The diagonal comes precomputed from the losses: p_ii - 1 evaluated as such loses every digit
when the positive dominates (p_ii ≈ 1), expm1(-loss) does not.
    dU = dS @ V / τ              _grad_user_kernel: one program owns a block of rows
    dV = dSᵀ @ U / τ             _grad_item_kernel: one program owns a block of columns

Each program writes only its own rows, so the result is deterministic (no atomics); the price is
that both kernels recompute the tiles. The temperature's gradient is formed by the launcher from
dU: dL/d(1/τ) = Σ_i <u_i, dU_i> · τ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys_ccl.kernels.launches import count_launch
from recsys_ccl.kernels.tiles import (
    LOG2E,
    block_sizes,
    load_ids,
    load_rows,
    masked_logits_tile,
)

__all__ = ["contrastive_backward"]


@triton.jit
def _dlogits_tile(x, offs_b, offs_n, lse2_row, g_row, lse2_col, g_col, diag_row,
                  SYMMETRIC: tl.constexpr):
    """dS for one tile from its base-2 logits x (BLOCK_B, BLOCK_N); diag_row (BLOCK_B,)."""
    ds = tl.exp2(x - lse2_row[:, None]) * g_row[:, None]
    if SYMMETRIC:
        # lse2_col is +inf beyond column B, which zeroes those columns' item->user term
        ds += tl.exp2(x - lse2_col[None, :]) * g_col[None, :]
    return tl.where(offs_b[:, None] == offs_n[None, :], diag_row[:, None], ds)


@triton.jit
def _grad_user_kernel(
    U, V, LOG_Q, IDS, LSE2, LSE2_COL, G, DIAG, DU, B, N, D, stride_u, stride_v, stride_du,
    scale_log2e, scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_b < B
    d_ok = offs_d < D
    u = load_rows(U, offs_b, B, offs_d, D, stride_u)
    lse2_row = tl.load(LSE2 + offs_b, mask=row_ok, other=0.0)
    g_row = tl.load(G + offs_b, mask=row_ok, other=0.0)
    diag_row = tl.load(DIAG + offs_b, mask=row_ok, other=0.0)
    ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        v = load_rows(V, offs_n, N, offs_d, D, stride_v)
        ids_col = load_ids(IDS, offs_n, N, -2, HAS_IDS)
        lse2_col = lse2_row  # unused unless SYMMETRIC
        g_col = g_row
        if SYMMETRIC:
            lse2_col = tl.load(LSE2_COL + offs_n, mask=offs_n < B, other=float("inf"))
            g_col = tl.load(G + offs_n, mask=offs_n < B, other=0.0)
        # -- recompute the tile, then dS --
        x = masked_logits_tile(u, v, offs_b, offs_n, B, N, LOG_Q, ids_row, ids_col,
                               scale_log2e, HAS_LOG_Q, HAS_IDS, False, PRECISION)
        ds = _dlogits_tile(x, offs_b, offs_n, lse2_row, g_row, lse2_col, g_col, diag_row,
                           SYMMETRIC)
        # -- (BLOCK_B, BLOCK_N) @ (BLOCK_N, BLOCK_D) -> (BLOCK_B, BLOCK_D) --
        acc = tl.dot(ds.to(v.dtype), v, acc, input_precision=PRECISION)
    tl.store(DU + offs_b[:, None].to(tl.int64) * stride_du + offs_d[None, :], acc * scale,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_item_kernel(
    U, V, LOG_Q, IDS, LSE2, LSE2_COL, G, DIAG, DV, B, N, D, stride_u, stride_v, stride_dv,
    scale_log2e, scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    d_ok = offs_d < D
    v = load_rows(V, offs_n, N, offs_d, D, stride_v)
    ids_col = load_ids(IDS, offs_n, N, -2, HAS_IDS)
    lse2_col = tl.zeros([BLOCK_N], dtype=tl.float32)  # unused unless SYMMETRIC
    g_col = lse2_col
    if SYMMETRIC:
        lse2_col = tl.load(LSE2_COL + offs_n, mask=offs_n < B, other=float("inf"))
        g_col = tl.load(G + offs_n, mask=offs_n < B, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        row_ok = offs_b < B
        u = load_rows(U, offs_b, B, offs_d, D, stride_u)
        lse2_row = tl.load(LSE2 + offs_b, mask=row_ok, other=0.0)
        g_row = tl.load(G + offs_b, mask=row_ok, other=0.0)
        diag_row = tl.load(DIAG + offs_b, mask=row_ok, other=0.0)
        ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)
        x = masked_logits_tile(u, v, offs_b, offs_n, B, N, LOG_Q, ids_row, ids_col,
                               scale_log2e, HAS_LOG_Q, HAS_IDS, False, PRECISION)
        ds = _dlogits_tile(x, offs_b, offs_n, lse2_row, g_row, lse2_col, g_col, diag_row,
                           SYMMETRIC)
        # -- (BLOCK_N, BLOCK_B) @ (BLOCK_B, BLOCK_D) -> (BLOCK_N, BLOCK_D) --
        acc = tl.dot(tl.trans(ds).to(u.dtype), u, acc, input_precision=PRECISION)
    tl.store(DV + offs_n[:, None].to(tl.int64) * stride_dv + offs_d[None, :], acc * scale,
             mask=col_ok[:, None] & d_ok[None, :])


def contrastive_backward(
    user: torch.Tensor,
    item: torch.Tensor,
    scale: float,
    item_log_q: torch.Tensor | None,
    item_ids: torch.Tensor | None,
    lse2_row: torch.Tensor,
    lse2_col: torch.Tensor | None,
    g: torch.Tensor,
    diag: torch.Tensor,
    precision: str = "tf32",
    blocks: tuple[int, int] | None = None,
    need_user: bool = True,
    need_item: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels; returns dU (B, D) and dV (N, D) in fp32 (or None where not
    needed). g (B,) fp32: the weight of each row's loss (and column's, when symmetric);
    diag (B,) fp32: dS[i, i]."""
    B, D = user.shape
    N = item.shape[0]
    block_b, block_n, block_d, num_warps = block_sizes(B, N, D)
    if blocks is not None:
        block_b, block_n = blocks
    log_q = item_log_q if item_log_q is not None else lse2_row
    ids = item_ids if item_ids is not None else lse2_row
    lse_col = lse2_col if lse2_col is not None else lse2_row
    common = dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d,
                  HAS_LOG_Q=item_log_q is not None, HAS_IDS=item_ids is not None,
                  SYMMETRIC=lse2_col is not None, PRECISION=precision, num_warps=num_warps)
    scale_log2e = scale * LOG2E
    du = dv = None
    if need_user:
        du = torch.empty((B, D), dtype=torch.float32, device=user.device)
        _grad_user_kernel[(triton.cdiv(B, block_b),)](
            user, item, log_q, ids, lse2_row, lse_col, g, diag, du, B, N, D,
            user.stride(0), item.stride(0), du.stride(0), scale_log2e, scale, **common)
        count_launch("grad_user")
    if need_item:
        dv = torch.empty((N, D), dtype=torch.float32, device=user.device)
        _grad_item_kernel[(triton.cdiv(N, block_n),)](
            user, item, log_q, ids, lse2_row, lse_col, g, diag, dv, B, N, D,
            user.stride(0), item.stride(0), dv.stride(0), scale_log2e, scale, **common)
        count_launch("grad_item")
    return du, dv
