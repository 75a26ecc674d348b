"""Pieces shared by the forward and backward kernels: the masked logits tile and block sizes.

All kernels work in the base-2 log domain: a logit x is carried as x · log2(e), so that the
softmax uses `exp2` (one instruction on GPUs) and log2(e) is folded into the scale.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # 1/ln(2)
LN2 = 0.6931471805599453  # ln(2)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_sizes(B: int, N: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, num_warps), heuristic.

    BLOCK_D covers the whole embedding (next power of two, at least 16 for tl.dot), so a tile's
    logits come from one dot. On a GPU the tile area shrinks as D grows to keep the operand
    tiles and the (BLOCK_*, BLOCK_D) accumulators of the backward in registers. The interpreter
    pays per operation, not per element, so it gets the largest tiles the shapes allow.
    """
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting():
        cap = 64
        return (min(cap, max(16, triton.next_power_of_2(B))),
                min(cap, max(16, triton.next_power_of_2(N))), block_d, 4)
    if block_d <= 64:
        return 128, 128, block_d, 8
    if block_d <= 128:
        return 128, 64, block_d, 8
    return 64, 64, block_d, 8


@triton.jit
def load_rows(PTR, offs, n, offs_d, D, stride):
    """Rows `offs` of a row-major (n, D) matrix as a (len(offs), BLOCK_D) tile, zero beyond
    n rows and D columns (zeros leave the dot products unchanged)."""
    return tl.load(PTR + offs[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=(offs[:, None] < n) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def load_ids(IDS, offs, n, pad, HAS_IDS: tl.constexpr):
    """Item ids at `offs` (`pad` beyond n); without ids, the offsets themselves (unused)."""
    ids = offs
    if HAS_IDS:
        ids = tl.load(IDS + offs, mask=offs < n, other=pad)
    return ids


@triton.jit
def masked_logits_tile(
    u, v, offs_b, offs_n, B, N, LOG_Q, ids_row, ids_col, scale_log2e,
    HAS_LOG_Q: tl.constexpr, HAS_IDS: tl.constexpr, NUM_VALID_COLS_IS_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits of one (BLOCK_B, BLOCK_N) tile in base-2 units, -inf where masked.

    x[i, j] = (<u_i, v_j> / τ - log_q[j]) · log2(e); masked: padding rows/columns, accidental
    hits (same item id, j != i), and with NUM_VALID_COLS_IS_B the columns j >= B (the
    item->user direction only sees the batch's own items).
    """
    # -- (BLOCK_B, BLOCK_D) @ (BLOCK_D, BLOCK_N) -> (BLOCK_B, BLOCK_N), fp32 accumulate --
    x = tl.dot(u, tl.trans(v), input_precision=PRECISION) * scale_log2e
    if HAS_LOG_Q:
        log_q = tl.load(LOG_Q + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        x = x - (log_q * LOG2E)[None, :]
    n_cols = B if NUM_VALID_COLS_IS_B else N
    valid = (offs_b[:, None] < B) & (offs_n[None, :] < n_cols)
    if HAS_IDS:
        hit = (ids_row[:, None] == ids_col[None, :]) & (offs_b[:, None] != offs_n[None, :])
        valid = valid & (hit == 0)
    return tl.where(valid, x, float("-inf"))
