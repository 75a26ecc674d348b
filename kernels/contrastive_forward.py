"""Forward kernels: per-row (and, for the symmetric loss, per-column) logsumexp of the logits
by an online softmax over tiles, never holding the (B, N) logits.

    lse_row[i]  = logsumexp_{j<N} logit[i, j]          _row_lse_kernel, one program per row block
    loss_row[i] = lse_row[i] - logit[i, i]             same kernel; logit[i, i] by a row-wise dot
    lse_col[j]  = logsumexp_{i<B} logit[i, j], j < B   _col_lse_kernel, one program per col block
    loss_col[j] = lse_col[j] - logit[j, j]             same kernel

Losses are formed as (m - pos) + log Σ 2^(x - m), not lse - pos: when the positive dominates,
m - pos is (nearly) exact and the small log term keeps its precision.

Saved for backward: lse_row and lse_col, O(B) each (stored in base-2 units).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys_ccl.kernels.launches import count_launch
from recsys_ccl.kernels.tiles import (
    LN2,
    LOG2E,
    block_sizes,
    load_ids,
    load_rows,
    masked_logits_tile,
)

__all__ = ["contrastive_lse_forward"]


@triton.jit
def _row_lse_kernel(
    U, V, LOG_Q, IDS, LSE2, LOSS, B, N, D, stride_u, stride_v, scale_log2e,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """LSE2[i] = log2 Σ_j 2^x[i, j] (base 2) and LOSS[i] = lse_row[i] - logit[i, i] (natural
    units) for one row block."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_b < B
    u = load_rows(U, offs_b, B, offs_d, D, stride_u)
    ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)

    # -- the positive logit: row i's own item is column i --
    v_pos = load_rows(V, offs_b, B, offs_d, D, stride_v)
    pos2 = tl.sum(u.to(tl.float32) * v_pos.to(tl.float32), axis=1) * scale_log2e
    if HAS_LOG_Q:
        pos2 -= tl.load(LOG_Q + offs_b, mask=row_ok, other=0.0).to(tl.float32) * LOG2E

    m_i = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)  # running Σ 2^(x - m_i)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        v = load_rows(V, offs_n, N, offs_d, D, stride_v)
        ids_col = load_ids(IDS, offs_n, N, -2, HAS_IDS)
        # -- compute the tile's logits --
        x = masked_logits_tile(u, v, offs_b, offs_n, B, N, LOG_Q, ids_row, ids_col,
                               scale_log2e, HAS_LOG_Q, HAS_IDS, False, PRECISION)
        # -- online softmax update --
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
        m_i = m_new
    log2_l = tl.log2(tl.where(row_ok, l_i, 1.0))
    tl.store(LSE2 + offs_b, m_i + log2_l, mask=row_ok)
    tl.store(LOSS + offs_b, ((m_i - pos2) + log2_l) * LN2, mask=row_ok)


@triton.jit
def _col_lse_kernel(
    U, V, LOG_Q, IDS, LSE2_COL, LOSS_COL, B, N, D, stride_u, stride_v, scale_log2e,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """LSE2_COL[j] = log2 Σ_{i<B} 2^x[i, j] and LOSS_COL[j] = lse_col[j] - logit[j, j] for one
    block of the first B columns."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < B
    v = load_rows(V, offs_n, N, offs_d, D, stride_v)
    ids_col = load_ids(IDS, offs_n, N, -2, HAS_IDS)
    u_pos = load_rows(U, offs_n, B, offs_d, D, stride_u)
    pos2 = tl.sum(u_pos.to(tl.float32) * v.to(tl.float32), axis=1) * scale_log2e
    if HAS_LOG_Q:
        pos2 -= tl.load(LOG_Q + offs_n, mask=col_ok, other=0.0).to(tl.float32) * LOG2E
    m_j = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_j = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        u = load_rows(U, offs_b, B, offs_d, D, stride_u)
        ids_row = load_ids(IDS, offs_b, B, -1, HAS_IDS)
        x = masked_logits_tile(u, v, offs_b, offs_n, B, N, LOG_Q, ids_row, ids_col,
                               scale_log2e, HAS_LOG_Q, HAS_IDS, True, PRECISION)
        m_new = tl.maximum(m_j, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_j - m_safe)
        l_j = l_j * alpha + tl.sum(tl.exp2(x - m_safe[None, :]), axis=0)
        m_j = m_new
    log2_l = tl.log2(tl.where(col_ok, l_j, 1.0))
    tl.store(LSE2_COL + offs_n, m_j + log2_l, mask=col_ok)
    tl.store(LOSS_COL + offs_n, ((m_j - pos2) + log2_l) * LN2, mask=col_ok)


def contrastive_lse_forward(
    user: torch.Tensor,
    item: torch.Tensor,
    scale: float,
    item_log_q: torch.Tensor | None,
    item_ids: torch.Tensor | None,
    symmetric: bool,
    precision: str = "tf32",
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernels.

    user (B, D), item (N, D) contiguous, same dtype (fp32/fp16/bf16); scale = 1/τ;
    item_log_q (N,) fp32 or None; item_ids (N,) int64 or None.
    Returns lse2_row (B,) fp32 in base-2 units, loss_row (B,) fp32 in nats, and for the
    symmetric loss lse2_col (B,) and loss_col (B,) (else None, None).
    """
    B, D = user.shape
    N = item.shape[0]
    block_b, block_n, block_d, num_warps = block_sizes(B, N, D)
    if blocks is not None:
        block_b, block_n = blocks
    lse2 = torch.empty(B, dtype=torch.float32, device=user.device)
    loss = torch.empty(B, dtype=torch.float32, device=user.device)
    log_q = item_log_q if item_log_q is not None else lse2  # placeholder, never read
    ids = item_ids if item_ids is not None else lse2
    common = dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d,
                  HAS_LOG_Q=item_log_q is not None, HAS_IDS=item_ids is not None,
                  PRECISION=precision, num_warps=num_warps)
    scale_log2e = scale * LOG2E
    _row_lse_kernel[(triton.cdiv(B, block_b),)](
        user, item, log_q, ids, lse2, loss, B, N, D, user.stride(0), item.stride(0),
        scale_log2e, **common)
    count_launch("row_lse")
    lse2_col = loss_col = None
    if symmetric:
        lse2_col = torch.empty(B, dtype=torch.float32, device=user.device)
        loss_col = torch.empty(B, dtype=torch.float32, device=user.device)
        _col_lse_kernel[(triton.cdiv(B, block_n),)](
            user, item, log_q, ids, lse2_col, loss_col, B, N, D, user.stride(0),
            item.stride(0), scale_log2e, **common)
        count_launch("col_lse")
    return lse2, loss, lse2_col, loss_col
