"""Forward kernels: per-row (and, for the symmetric loss, per-column) logsumexp of the logits
by an online softmax over tiles, never holding the (B, N) logits.

    lse_row[i]  = logsumexp_{j<N} logit[i, j]          _row_lse_kernel, one program per row block
    loss_row[i] = lse_row[i] - logit[i, i]             same kernel
    lse_col[j]  = logsumexp_{i<B} logit[i, j], j < B   _col_lse_kernel, one program per col block
    loss_col[j] = lse_col[j] - logit[j, j]             same kernel

The positive logit[i, i] is read off the diagonal of the same tile that feeds the running max,
so a row whose negatives are all masked has m = logit[i, i] exactly and loss exactly 0 in
every precision (a separate row-wise dot would round differently from a TF32 tile). Losses are
formed as (m - pos) + log Σ 2^(x - m), not lse - pos: when the positive dominates, m - pos is
(nearly) exact and the small log term keeps its precision.

Only the last tile of a row (padding columns) and, with item ids, every tile (accidental hits)
pay for masks; interior tiles go from the dot straight to the softmax.

The temperature is read from a device pointer (no host synchronisation).
Saved for backward: lse_row and lse_col, O(B) each (stored in base-2 units).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys_ccl.kernels.launch_plan import LaunchPlan
from recsys_ccl.kernels.tiles import (
    LN2,
    LN2_F,
    LOG2E,
    diagonal,
    load_ids,
    load_rows,
    load_rows_t,
    mask_logits,
    online_lse,
    row_tile_logits,
    scaled_logits,
)

__all__ = ["contrastive_lse_forward"]


@triton.jit
def _row_lse_kernel(
    U, V, LOG_Q, IDS, TAU, LSE2, LOSS, M_PART, L_PART, POS_PART, B, N, D, stride_u, stride_v,
    n_per_split,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """LSE2[i] = log2 Σ_j 2^x[i, j] (base 2) and LOSS[i] = lse_row[i] - logit[i, i] (natural
    units) for one block of user rows; U (B, D), V (N, D), TAU () fp32. With SPLIT, program
    (pid, s) covers columns [s·n_per_split, (s+1)·n_per_split) and stores its partial running
    max, sum and positive to M_PART, L_PART, POS_PART (n_split, B) instead."""
    pid = tl.program_id(0)
    n_start = tl.program_id(1) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    row0 = pid * BLOCK_B
    offs_b = row0 + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_b < B
    scale_log2e = LOG2E / tl.load(TAU).to(tl.float32)
    u = load_rows(U, offs_b, B, offs_d, D, stride_u)  # (BLOCK_B, BLOCK_D), resident
    ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)

    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)  # running Σ 2^(x - m_i)
    pos2 = tl.zeros([BLOCK_B], dtype=tl.float32)  # x[i, i]
    for n0 in range(n_start, n_end, BLOCK_N):
        x, _, _, offs_n = row_tile_logits(
            u, V, LOG_Q, IDS, ids_row, offs_b, n0, N, B, offs_d, D, stride_v, scale_log2e,
            BLOCK_N, HAS_LOG_Q, HAS_IDS, PRECISION)
        # -- the positive, where this tile crosses the diagonal --
        if n0 < row0 + BLOCK_B:
            if n0 + BLOCK_N > row0:
                pos2 += diagonal(x, offs_b, offs_n)
        m_i, l_i = online_lse(m_i, l_i, x)
    if SPLIT:
        part = tl.program_id(1).to(tl.int64) * B + offs_b
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        tl.store(POS_PART + part, pos2, mask=row_ok)
    else:
        log2_l = tl.log2(tl.where(row_ok, l_i, 1.0))
        tl.store(LSE2 + offs_b, m_i + log2_l, mask=row_ok)
        tl.store(LOSS + offs_b, ((m_i - pos2) + log2_l) * LN2, mask=row_ok)


@triton.jit
def _col_lse_kernel(
    U, V, LOG_Q, IDS, TAU, LSE2_COL, LOSS_COL, B, N, D, stride_u, stride_v,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """LSE2_COL[j] = log2 Σ_{i<B} 2^x[i, j] and LOSS_COL[j] = lse_col[j] - logit[j, j] for one
    block of the first B item columns, computed on transposed (items, users) tiles so that the
    reduction runs along the tile's rows."""
    pid = tl.program_id(0)
    col0 = pid * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < B
    scale_log2e = LOG2E / tl.load(TAU).to(tl.float32)
    v = load_rows(V, offs_n, B, offs_d, D, stride_v)  # (BLOCK_N, BLOCK_D), resident
    ids_col = load_ids(IDS, offs_n, B, -2, HAS_IDS)

    m_j = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_j = tl.zeros([BLOCK_N], dtype=tl.float32)
    pos2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        u_t = load_rows_t(U, offs_b, B, offs_d, D, stride_u)  # (BLOCK_D, BLOCK_B)
        ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)
        # -- (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_B) -> (BLOCK_N, BLOCK_B) --
        s = tl.dot(v, u_t, input_precision=PRECISION)
        x = scaled_logits(s, LOG_Q, offs_n, N, scale_log2e, HAS_LOG_Q, True)
        if HAS_IDS:
            x = mask_logits(x, offs_b, offs_n, B, B, ids_row, ids_col, HAS_IDS, True)
        elif b0 + BLOCK_B > B:
            x = mask_logits(x, offs_b, offs_n, B, B, ids_row, ids_col, False, True)
        if b0 < col0 + BLOCK_N:
            if b0 + BLOCK_B > col0:
                pos2 += diagonal(x, offs_n, offs_b)
        m_j, l_j = online_lse(m_j, l_j, x)
    log2_l = tl.log2(tl.where(col_ok, l_j, 1.0))
    tl.store(LSE2_COL + offs_n, m_j + log2_l, mask=col_ok)
    tl.store(LOSS_COL + offs_n, ((m_j - pos2) + log2_l) * LN2, mask=col_ok)


def _combine_splits(m_part: torch.Tensor, l_part: torch.Tensor, pos_part: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The column ranges' partial (max, sum, positive), each (n_split, B), merged in a fixed
    order (deterministic): base-2 LSE (B,) and the loss in nats (B,)."""
    m = m_part.amax(0)  # every row has a finite max: its positive
    log2_l = torch.log2((l_part * torch.exp2(m_part - m)).sum(0))
    return m + log2_l, ((m - pos_part.sum(0)) + log2_l) * LN2_F


def contrastive_lse_forward(
    user: torch.Tensor,
    item: torch.Tensor,
    tau: torch.Tensor,
    item_log_q: torch.Tensor | None,
    item_ids: torch.Tensor | None,
    symmetric: bool,
    plan: LaunchPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernels.

    user (B, D), item (N, D) contiguous, same dtype (fp32/fp16/bf16); tau () fp32 on the same
    device; item_log_q (N,) fp32 or None; item_ids (N,) int32/int64 or None.
    Returns lse2_row (B,) fp32 in base-2 units, loss_row (B,) fp32 in nats, and for the
    symmetric loss lse2_col (B,) and loss_col (B,) (else None, None).
    """
    B, D = user.shape
    N = item.shape[0]
    lse2 = torch.empty(B, dtype=torch.float32, device=user.device)
    loss = torch.empty(B, dtype=torch.float32, device=user.device)
    log_q = item_log_q if item_log_q is not None else lse2  # placeholder, never read
    ids = item_ids if item_ids is not None else lse2
    flags = dict(BLOCK_D=plan.block_d, HAS_LOG_Q=item_log_q is not None,
                 HAS_IDS=item_ids is not None, PRECISION=plan.precision)
    cfg = plan.row_lse
    split = plan.n_split > 1
    parts = [torch.empty((plan.n_split, B), dtype=torch.float32, device=user.device)
             for _ in range(3)] if split else [lse2] * 3  # placeholders, never written
    _row_lse_kernel[(triton.cdiv(B, cfg.block_b), plan.n_split)](
        user, item, log_q, ids, tau, lse2, loss, *parts, B, N, D, user.stride(0),
        item.stride(0), plan.columns_per_split(N, cfg.block_n), BLOCK_B=cfg.block_b,
        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, SPLIT=split,
        **flags)
    if split:
        lse2, loss = _combine_splits(*parts)
    lse2_col = loss_col = None
    if symmetric:
        lse2_col = torch.empty(B, dtype=torch.float32, device=user.device)
        loss_col = torch.empty(B, dtype=torch.float32, device=user.device)
        cfg = plan.col_lse
        _col_lse_kernel[(triton.cdiv(B, cfg.block_n),)](
            user, item, log_q, ids, tau, lse2_col, loss_col, B, N, D, user.stride(0),
            item.stride(0), BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
    return lse2, loss, lse2_col, loss_col
