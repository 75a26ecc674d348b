"""Backward kernels: recompute the logit tiles and form the gradients without a (B, N) buffer.

With weights g[i] = dL/dloss_row[i] (and, symmetric, the same g for the column losses):

    dS[i, j] = g[i] · (p[i, j] - δ_ij) + [j < B] g[j] · (pc[i, j] - δ_ij)
    p[i, j]  = 2^(x[i, j] - lse2_row[i]),   pc[i, j] = 2^(x[i, j] - lse2_col[j])
    dS[i, i] = g[i] · expm1(-loss_row[i]) (+ g[i] · expm1(-loss_col[i]))   given as DIAG (B,)

The diagonal comes precomputed from the losses: p_ii - 1 evaluated as such loses every digit
when the positive dominates (p_ii ≈ 1), expm1(-loss) does not.

    dU = dS @ V / τ              _grad_user_kernel: one program owns a block of rows
    dV = dSᵀ @ U / τ             _grad_item_kernel: one program owns a block of columns,
                                 on transposed (items, users) tiles: no transpose of dS
    dL/d(1/τ) = Σ_ij dS[i, j] · <u_i, v_j>     per row in _grad_user_kernel, in fp32

Each program writes only its own rows, so the result is deterministic (no atomics); the price is
that both kernels recompute the tiles. For 16-bit inputs dS is multiplied by DS_SCALE (a power
of two, so exact) before it is rounded to the operand dtype and divided out after the dot:
with g = 1/B and p ~ 1/N, dS itself sits below fp16's smallest subnormal at B = N = 4096.
The symmetric term is evaluated only on tiles that hold columns j < B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys_ccl.kernels.launch_plan import LaunchPlan
from recsys_ccl.kernels.tiles import (
    LOG2E,
    load_ids,
    load_rows,
    load_rows_t,
    mask_logits,
    row_tile_logits,
    scaled_logits,
)

__all__ = ["contrastive_backward"]


@triton.jit
def _grad_user_kernel(
    U, V, LOG_Q, IDS, TAU, LSE2, LSE2_COL, G, DIAG, DU, DTAU_ROW, B, N, D,
    stride_u, stride_v, stride_du, stride_split, n_per_split, ds_scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DU[s, i] = Σ_j dS[i, j] v_j / τ (fp32, (n_split, B, D)) and DTAU_ROW[s, i] =
    Σ_j dS[i, j] <u_i, v_j> (fp32, (n_split, B)) for one block of user rows, over the column
    range s of program (pid, s); the ranges' sums are added by the launcher."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    row0 = pid * BLOCK_B
    offs_b = row0 + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_b < B
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    scale_log2e = LOG2E * inv_tau
    u = load_rows(U, offs_b, B, offs_d, D, stride_u)  # (BLOCK_B, BLOCK_D), resident
    lse2_row = tl.load(LSE2 + offs_b, mask=row_ok, other=0.0)
    g_row = tl.load(G + offs_b, mask=row_ok, other=0.0)
    diag_row = tl.load(DIAG + offs_b, mask=row_ok, other=0.0)
    ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    dtau = tl.zeros([BLOCK_B], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        # -- recompute the tile --
        x, s, v_t, offs_n = row_tile_logits(
            u, V, LOG_Q, IDS, ids_row, offs_b, n0, N, B, offs_d, D, stride_v, scale_log2e,
            BLOCK_N, HAS_LOG_Q, HAS_IDS, PRECISION)
        # -- dS --
        ds = tl.exp2(x - lse2_row[:, None]) * g_row[:, None]
        if SYMMETRIC:
            if n0 < B:
                # lse2_col is +inf beyond column B, which zeroes those columns' term
                lse2_col = tl.load(LSE2_COL + offs_n, mask=offs_n < B, other=float("inf"))
                g_col = tl.load(G + offs_n, mask=offs_n < B, other=0.0)
                ds += tl.exp2(x - lse2_col[None, :]) * g_col[None, :]
        if n0 < row0 + BLOCK_B:
            if n0 + BLOCK_N > row0:
                ds = tl.where(offs_b[:, None] == offs_n[None, :], diag_row[:, None], ds)
        dtau += tl.sum(ds * s, axis=1)
        # -- (BLOCK_B, BLOCK_N) @ (BLOCK_N, BLOCK_D) -> (BLOCK_B, BLOCK_D) --
        acc = tl.dot((ds * ds_scale).to(v_t.dtype), tl.trans(v_t), acc,
                     input_precision=PRECISION)
    DU += split.to(tl.int64) * stride_split
    tl.store(DU + offs_b[:, None].to(tl.int64) * stride_du + offs_d[None, :],
             acc * (inv_tau / ds_scale), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DTAU_ROW + split.to(tl.int64) * B + offs_b, dtau, mask=row_ok)


@triton.jit
def _grad_item_kernel(
    U, V, LOG_Q, IDS, TAU, LSE2, LSE2_COL, G, DIAG, DV, B, N, D,
    stride_u, stride_v, stride_dv, ds_scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DV[j] = Σ_i dS[i, j] u_i / τ (fp32, (N, D)) for one block of item columns, from
    (BLOCK_N, BLOCK_B) tiles dSᵀ."""
    pid = tl.program_id(0)
    col0 = pid * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    inv_tau = 1.0 / tl.load(TAU).to(tl.float32)
    scale_log2e = LOG2E * inv_tau
    v = load_rows(V, offs_n, N, offs_d, D, stride_v)  # (BLOCK_N, BLOCK_D), resident
    ids_col = load_ids(IDS, offs_n, N, -2, HAS_IDS)
    lse2_col = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    g_col = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SYMMETRIC:
        lse2_col = tl.load(LSE2_COL + offs_n, mask=offs_n < B, other=float("inf"))
        g_col = tl.load(G + offs_n, mask=offs_n < B, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        row_ok = offs_b < B
        u_t = load_rows_t(U, offs_b, B, offs_d, D, stride_u)  # (BLOCK_D, BLOCK_B)
        lse2_row = tl.load(LSE2 + offs_b, mask=row_ok, other=0.0)
        g_row = tl.load(G + offs_b, mask=row_ok, other=0.0)
        ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)
        # -- (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_B) -> (BLOCK_N, BLOCK_B) --
        s = tl.dot(v, u_t, input_precision=PRECISION)
        x = scaled_logits(s, LOG_Q, offs_n, N, scale_log2e, HAS_LOG_Q, True)
        if HAS_IDS:
            x = mask_logits(x, offs_b, offs_n, B, N, ids_row, ids_col, HAS_IDS, True)
        elif b0 + BLOCK_B > B:
            # padding users: their u is 0, but an overflowing term times 0 would be NaN
            x = mask_logits(x, offs_b, offs_n, B, N, ids_row, ids_col, False, True)
        ds_t = tl.exp2(x - lse2_row[None, :]) * g_row[None, :]
        if SYMMETRIC:
            if col0 < B:
                ds_t += tl.exp2(x - lse2_col[:, None]) * g_col[:, None]
        if b0 < col0 + BLOCK_N:
            if b0 + BLOCK_B > col0:
                diag_row = tl.load(DIAG + offs_b, mask=row_ok, other=0.0)
                ds_t = tl.where(offs_n[:, None] == offs_b[None, :], diag_row[None, :], ds_t)
        # -- (BLOCK_N, BLOCK_B) @ (BLOCK_B, BLOCK_D) -> (BLOCK_N, BLOCK_D) --
        acc = tl.dot((ds_t * ds_scale).to(u_t.dtype), tl.trans(u_t), acc,
                     input_precision=PRECISION)
    tl.store(DV + offs_n[:, None].to(tl.int64) * stride_dv + offs_d[None, :],
             acc * (inv_tau / ds_scale), mask=col_ok[:, None] & (offs_d[None, :] < D))


def contrastive_backward(
    user: torch.Tensor,
    item: torch.Tensor,
    tau: torch.Tensor,
    item_log_q: torch.Tensor | None,
    item_ids: torch.Tensor | None,
    lse2_row: torch.Tensor,
    lse2_col: torch.Tensor | None,
    g: torch.Tensor,
    diag: torch.Tensor,
    plan: LaunchPlan,
    ds_scale: float = 1.0,
    need_user: bool = True,
    need_item: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels; returns dU (B, D) fp32 with dL/d(1/τ) per row (B,) fp32,
    and dV (N, D) fp32 (None where not needed). g (B,) fp32: the weight of each row's loss
    (and column's, when symmetric); diag (B,) fp32: dS[i, i]; ds_scale: a power of two that
    keeps 16-bit dS above underflow."""
    B, D = user.shape
    N = item.shape[0]
    log_q = item_log_q if item_log_q is not None else lse2_row
    ids = item_ids if item_ids is not None else lse2_row
    lse_col = lse2_col if lse2_col is not None else lse2_row
    flags = dict(BLOCK_D=plan.block_d, HAS_LOG_Q=item_log_q is not None,
                 HAS_IDS=item_ids is not None, SYMMETRIC=lse2_col is not None,
                 PRECISION=plan.precision)
    du = dtau_row = dv = None
    if need_user:
        S = plan.n_split
        du = torch.empty((S, B, D), dtype=torch.float32, device=user.device)
        dtau_row = torch.empty((S, B), dtype=torch.float32, device=user.device)
        cfg = plan.grad_user
        _grad_user_kernel[(triton.cdiv(B, cfg.block_b), S)](
            user, item, log_q, ids, tau, lse2_row, lse_col, g, diag, du, dtau_row, B, N, D,
            user.stride(0), item.stride(0), du.stride(1), du.stride(0),
            plan.columns_per_split(N, cfg.block_n), ds_scale,
            BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **flags)
        # the column ranges' partial sums, added in a fixed order (deterministic)
        du, dtau_row = (du[0], dtau_row[0]) if S == 1 else (du.sum(0), dtau_row.sum(0))
    if need_item:
        dv = torch.empty((N, D), dtype=torch.float32, device=user.device)
        cfg = plan.grad_item
        _grad_item_kernel[(triton.cdiv(N, cfg.block_n),)](
            user, item, log_q, ids, tau, lse2_row, lse_col, g, diag, dv, B, N, D,
            user.stride(0), item.stride(0), dv.stride(0), ds_scale,
            BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **flags)
    return du, dtau_row, dv
