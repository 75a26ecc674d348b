"""Pieces shared by the forward and backward kernels: loads and the logits tile.

All kernels work in the base-2 log domain: a logit x is carried as x · log2(e), so that the
softmax uses `exp2` (one instruction on GPUs) and log2(e) is folded into the scale.

Constants used inside @triton.jit code are `tl.constexpr` globals: the compiler refuses plain
module-level Python values (the interpreter does not, so only a compile test sees it).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634  # 1/ln(2), for host code
LN2_F = 0.6931471805599453  # ln(2), for host code
LOG2E: tl.constexpr = tl.constexpr(LOG2E_F)
LN2: tl.constexpr = tl.constexpr(LN2_F)


@triton.jit
def load_rows(PTR, offs, n, offs_d, D, stride):
    """Rows `offs` of a row-major (n, D) matrix as a (len(offs), BLOCK_D) tile, zero beyond
    n rows and D columns (zeros leave the dot products unchanged)."""
    return tl.load(PTR + offs[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=(offs[:, None] < n) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def load_rows_t(PTR, offs, n, offs_d, D, stride):
    """The same rows loaded transposed, (BLOCK_D, len(offs)), straight from memory (the
    FlashAttention-2 backward layout) rather than transposed in registers."""
    return tl.load(PTR + offs[None, :].to(tl.int64) * stride + offs_d[:, None],
                   mask=(offs[None, :] < n) & (offs_d[:, None] < D), other=0.0)


@triton.jit
def load_ids(IDS, offs, n, pad, HAS_IDS: tl.constexpr):
    """Item ids at `offs` (`pad` beyond n); without ids, the offsets themselves (unused)."""
    ids = offs
    if HAS_IDS:
        ids = tl.load(IDS + offs, mask=offs < n, other=pad)
    return ids


@triton.jit
def scaled_logits(s, LOG_Q, offs_n, N, scale_log2e, HAS_LOG_Q: tl.constexpr,
                  ITEMS_ON_ROWS: tl.constexpr):
    """Base-2 logits x = (s / τ - log_q[j]) · log2(e) from a tile of raw dots s (fp32).

    ITEMS_ON_ROWS: the tile is (items, users) (column-direction kernels), else (users, items).
    """
    x = s * scale_log2e
    if HAS_LOG_Q:
        log_q2 = tl.load(LOG_Q + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) * LOG2E
        if ITEMS_ON_ROWS:
            x = x - log_q2[:, None]
        else:
            x = x - log_q2[None, :]
    return x


@triton.jit
def mask_logits(x, offs_b, offs_n, B, n_cols, ids_row, ids_col, HAS_IDS: tl.constexpr,
                ITEMS_ON_ROWS: tl.constexpr):
    """-inf where a logit does not take part: user rows >= B, item columns >= n_cols, and
    accidental hits (same item id, j != i). The positive (j == i) always stays."""
    if ITEMS_ON_ROWS:
        b = offs_b[None, :]
        n = offs_n[:, None]
    else:
        b = offs_b[:, None]
        n = offs_n[None, :]
    valid = (b < B) & (n < n_cols)
    if HAS_IDS:
        if ITEMS_ON_ROWS:
            same = ids_col[:, None] == ids_row[None, :]
        else:
            same = ids_row[:, None] == ids_col[None, :]
        valid = valid & ((same == 0) | (b == n))
    return tl.where(valid, x, float("-inf"))


@triton.jit
def diagonal(x, offs_rows, offs_cols):
    """x[k, k] of a tile summed into its row (owner) axis: (BLOCK_ROWS,), 0 in rows whose
    diagonal entry falls outside this tile."""
    return tl.sum(tl.where(offs_rows[:, None] == offs_cols[None, :], x, 0.0), axis=1)



@triton.jit
def row_tile_logits(u, V, LOG_Q, IDS, ids_row, offs_b, n0, N, B, offs_d, D, stride_v,
                    scale_log2e, BLOCK_N: tl.constexpr, HAS_LOG_Q: tl.constexpr,
                    HAS_IDS: tl.constexpr, PRECISION: tl.constexpr):
    """The base-2 logits x of one (users, items) tile, masked: the resident users u
    (BLOCK_B, BLOCK_D) against items n0 .. n0 + BLOCK_N, loaded transposed; ids compared only
    with HAS_IDS, bounds only on the tail tile. Returns (x (BLOCK_B, BLOCK_N), the raw dot
    products s (BLOCK_B, BLOCK_N), the item tile v_t (BLOCK_D, BLOCK_N), offs_n); what a
    caller leaves unused the compiler drops."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    v_t = load_rows_t(V, offs_n, N, offs_d, D, stride_v)  # (BLOCK_D, BLOCK_N)
    # (BLOCK_B, BLOCK_D) @ (BLOCK_D, BLOCK_N) -> (BLOCK_B, BLOCK_N), fp32 accumulate
    s = tl.dot(u, v_t, input_precision=PRECISION)
    x = scaled_logits(s, LOG_Q, offs_n, N, scale_log2e, HAS_LOG_Q, False)
    if HAS_IDS:
        ids_col = load_ids(IDS, offs_n, N, -2, HAS_IDS)
        x = mask_logits(x, offs_b, offs_n, B, N, ids_row, ids_col, HAS_IDS, False)
    elif n0 + BLOCK_N > N:
        x = mask_logits(x, offs_b, offs_n, B, N, ids_row, ids_row, False, False)
    return x, s, v_t, offs_n


@triton.jit
def online_lse(m, l, x):
    """One step of the running base-2 logsumexp along axis 1: (max, Σ 2^(x - max)) updated
    with the tile x; a row with nothing unmasked yet keeps max -inf (shifted by 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
    return m_new, l_new
