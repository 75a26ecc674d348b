"""PyTorch implementations of the in-batch contrastive loss: naive (the baseline and, in float64,
the reference) and chunked (the CPU default: memory O(chunk × N), never the (B, N) logits).

Definition (shared with the Triton kernel, see `recsys_ccl.losses.contrastive_loss`):

    logit[i, j] = <u_i, v_j> / τ - log_q[j]         i < B, j < N
    logit[i, j] = -inf   where item_ids[j] == item_ids[i] and j != i   (accidental hits)
    row_loss[i] = logsumexp_j logit[i, j] - logit[i, i]
    col_loss[j] = logsumexp_{i<B} logit[i, j] - logit[j, j]             j < B (symmetric)
    loss[i]     = row_loss[i]  or  (row_loss[i] + col_loss[i]) / 2  when symmetric

log_q[j] is constant down a column, so it cancels in col_loss; it is kept there only so that both
directions read the same logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "accidental_hit_pairs",
    "chunk_rows_for",
    "chunked_backward",
    "chunked_forward",
    "compute_dtype",
    "contrastive_loss_chunked",
    "contrastive_loss_naive",
    "reduce_loss",
]

# Rows per chunk are chosen so that one chunk of logits holds about this many elements
# (4 Mi fp32 = 16 MiB): large enough for efficient matmuls, small enough to stay in cache-ish
# memory and far below the (B, N) matrix.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (B,) -> their mean, sum, or themselves ("none")."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def contrastive_loss_naive(
    user: torch.Tensor,
    item: torch.Tensor,
    temperature: float | torch.Tensor,
    item_log_q: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Materialise the (B, N) logits and use F.cross_entropy. Autograd does the rest."""
    B = user.shape[0]
    logits = (user @ item.T) / temperature  # (B, D) @ (D, N) -> (B, N)
    if item_log_q is not None:
        logits = logits - item_log_q.to(logits.dtype)
    if item_ids is not None:
        hit = item_ids[:B, None] == item_ids[None, :]  # (B, N)
        hit[torch.arange(B), torch.arange(B)] = False
        logits = logits.masked_fill(hit, float("-inf"))
    target = torch.arange(B, device=user.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        col = F.cross_entropy(logits[:, :B].T, target, reduction="none")
        loss = (loss + col) / 2
    return reduce_loss(loss, reduction)


def accidental_hit_pairs(
    item_ids: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) pairs masked as accidental hits, rows ascending: every (i, j) with
    i < num_rows, item_ids[j] == item_ids[i] and j != i. Sparse, so the cost is the number of
    duplicates, not B × N."""
    _, inv, counts = torch.unique(item_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)  # positions grouped by id
    starts = torch.cumsum(counts, 0) - counts  # group start within `order`
    rows = torch.nonzero(counts[inv[:num_rows]] > 1).flatten()  # rows that have a duplicate
    c = counts[inv[rows]]
    rr = rows.repeat_interleave(c)
    offsets = torch.arange(int(c.sum()), device=item_ids.device) - (
        torch.cumsum(c, 0) - c
    ).repeat_interleave(c)
    cols = order[starts[inv[rows]].repeat_interleave(c) + offsets]
    keep = cols != rr
    return rr[keep], cols[keep]


def chunked_forward(
    u_all: torch.Tensor, v_all: torch.Tensor, scale: float, neg_log_q: torch.Tensor | None,
    hits: tuple[torch.Tensor, torch.Tensor] | None, symmetric: bool, chunk_rows: int,
    eager_weight: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row losses by blocks of rows: (loss_row, lse_row, loss_col, lse_col, grad_u,
    grad_v), each (B,) or (B, D) / (N, D) in the compute dtype; the column terms are None
    without `symmetric`. With `eager_weight` g (a scalar reduction, not symmetric) the
    gradients of Σ g·loss_i are formed on the fly from the block's softmax, saving the
    backward's recompute; else grad_u and grad_v are None.

    u_all (B, D), v_all (N, D); neg_log_q (1, N) or None; hits: accidental_hit_pairs."""
    B = u_all.shape[0]
    cdtype, dev = u_all.dtype, u_all.device
    eager = eager_weight is not None
    g = eager_weight if eager else 0.0
    grad_u = torch.empty_like(u_all) if eager else None
    grad_v = torch.zeros_like(v_all) if eager else None
    lse = torch.empty(B, dtype=cdtype, device=dev)
    loss = torch.empty(B, dtype=cdtype, device=dev)
    pos = torch.empty(B, dtype=cdtype, device=dev)  # logit[i, i]
    col_m = col_s = None
    if symmetric:
        col_m = torch.full((B,), -math.inf, dtype=cdtype, device=dev)
        col_s = torch.zeros(B, dtype=cdtype, device=dev)
    for r0 in range(0, B, chunk_rows):
        r1 = min(r0 + chunk_rows, B)
        u = u_all[r0:r1]
        rows = torch.arange(r1 - r0, device=dev)
        s = _chunk_logits(u, v_all, scale, neg_log_q, hits, r0, r1)  # (C, N)
        pos[r0:r1] = s[rows, rows + r0]
        if symmetric:
            blk = s[:, :B]
            new_m = torch.maximum(col_m, blk.amax(0))
            # a column with every entry masked so far keeps max -inf: shift by 0 there
            safe_m = torch.where(new_m == -math.inf, 0.0, new_m)
            col_s = col_s * torch.exp(col_m - safe_m) + torch.exp(blk - safe_m).sum(0)
            col_m = new_m
        m = s.amax(1, keepdim=True)
        s.sub_(m).exp_()
        z = s.sum(1, keepdim=True)
        log_z = z.log().squeeze(1)
        lse[r0:r1] = m.squeeze(1) + log_z
        # (m - pos) + log z, not lse - pos: when the positive dominates, m - pos is exact
        # and log z is small, so no precision is lost to the cancellation
        loss[r0:r1] = (m.squeeze(1) - pos[r0:r1]) + log_z
        if eager:
            s.mul_(g / z)  # g · softmax
            # the diagonal g · (p_ii - 1) = g · expm1(-loss_i): exact even when p_ii ≈ 1
            s[rows, rows + r0] = g * torch.expm1(-loss[r0:r1])
            torch.mm(s, v_all, out=grad_u[r0:r1]).mul_(scale)  # (C, N) @ (N, D)
            grad_v.addmm_(s.T, u, alpha=scale)  # (N, C) @ (C, D)
    lse_col = loss_col = None
    if symmetric:
        lse_col = col_m + col_s.log()
        loss_col = (col_m - pos) + col_s.log()
    return loss, lse, loss_col, lse_col, grad_u, grad_v


def chunked_backward(
    u_all: torch.Tensor, v_all: torch.Tensor, scale: float, neg_log_q: torch.Tensor | None,
    hits: tuple[torch.Tensor, torch.Tensor] | None, g: torch.Tensor, lse: torch.Tensor,
    lse_col: torch.Tensor | None, loss_row: torch.Tensor, loss_col: torch.Tensor | None,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ_i g_i · loss_i (g (B,) per-row weights, the same for the column term
    when symmetric) by recomputing each block's logits: (grad_u, grad_v, grad_tau)."""
    B = u_all.shape[0]
    symmetric = lse_col is not None
    # dS on the diagonal, g·(p_ii - 1) (+ the column term), via expm1 of the losses
    diag = g * torch.expm1(-loss_row)
    if symmetric:
        diag = diag + g * torch.expm1(-loss_col)
    grad_u = torch.empty_like(u_all)
    grad_v = torch.zeros_like(v_all)
    for r0 in range(0, B, chunk_rows):
        r1 = min(r0 + chunk_rows, B)
        u = u_all[r0:r1]
        s = _chunk_logits(u, v_all, scale, neg_log_q, hits, r0, r1)  # (C, N)
        col_part = None
        if symmetric:
            col_part = torch.exp(s[:, :B] - lse_col[None, :]).mul_(g[None, :])  # (C, B)
        s.sub_(lse[r0:r1, None]).exp_().mul_(g[r0:r1, None])
        if symmetric:
            s[:, :B] += col_part
        rows = torch.arange(r1 - r0, device=u.device)
        s[rows, rows + r0] = diag[r0:r1]
        torch.mm(s, v_all, out=grad_u[r0:r1]).mul_(scale)
        grad_v.addmm_(s.T, u, alpha=scale)
    grad_tau = -(u_all * grad_u).sum() * scale
    return grad_u, grad_v, grad_tau


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedContrastive(torch.autograd.Function):
    """Blocks of rows; the logits of a block are recomputed in backward.

    For a scalar reduction without `symmetric`, the gradients are computed in the forward pass
    (the per-row weights are known then up to the scalar grad_output), which saves the
    recompute: forward+backward then costs three matmuls per block, the same as the naive
    path, without its (B, N) buffers."""

    @staticmethod
    def forward(ctx, user, item, temperature, item_log_q, item_ids, symmetric, reduction,
                chunk_rows):
        B = user.shape[0]
        cdtype = compute_dtype(user.dtype)
        u_all, v_all = user.to(cdtype), item.to(cdtype)
        scale = 1.0 / float(temperature)
        neg_log_q = None if item_log_q is None else (-item_log_q.to(cdtype))[None, :]  # (1, N)
        hits = None if item_ids is None else accidental_hit_pairs(item_ids, B)
        wants_grad = any(ctx.needs_input_grad[:3])
        eager = wants_grad and reduction != "none" and not symmetric
        weight = (1.0 / B if reduction == "mean" else 1.0) if eager else None
        loss_row, lse, loss_col, lse_col, grad_u, grad_v = chunked_forward(
            u_all, v_all, scale, neg_log_q, hits, symmetric, chunk_rows, weight)
        loss = (loss_row + loss_col) / 2 if symmetric else loss_row
        ctx.symmetric, ctx.reduction, ctx.chunk_rows, ctx.scale = (
            symmetric, reduction, chunk_rows, scale)
        ctx.eager = eager
        ctx.hits = hits
        if eager:
            # dL/dscale = Σ_i <u_i, dL/du_i> / scale;  dτ = -dscale · scale²
            grad_tau = -(u_all * grad_u).sum() * scale
            ctx.save_for_backward(grad_u, grad_v, grad_tau)
        else:
            ctx.save_for_backward(u_all, v_all, neg_log_q, lse, lse_col, loss_row, loss_col)
        ctx.in_dtypes = (user.dtype, item.dtype)
        return reduce_loss(loss, reduction).to(user.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        u_dtype, v_dtype = ctx.in_dtypes
        if ctx.eager:
            grad_u, grad_v, grad_tau = ctx.saved_tensors
            go = grad_out.to(grad_u.dtype)
            return ((grad_u * go).to(u_dtype), (grad_v * go).to(v_dtype),
                    grad_tau * go, None, None, None, None, None)

        u_all, v_all, neg_log_q, lse, lse_col, loss_row, loss_col = ctx.saved_tensors
        B = u_all.shape[0]
        half = 0.5 if ctx.symmetric else 1.0
        go = grad_out.to(u_all.dtype)
        if ctx.reduction == "mean":
            g = (go * half / B).expand(B)
        elif ctx.reduction == "sum":
            g = (go * half).expand(B)
        else:
            g = go * half
        grad_u, grad_v, grad_tau = chunked_backward(
            u_all, v_all, ctx.scale, neg_log_q, ctx.hits, g, lse, lse_col, loss_row, loss_col,
            ctx.chunk_rows)
        return (grad_u.to(u_dtype), grad_v.to(v_dtype), grad_tau, None, None, None, None, None)


def _chunk_logits(u, v_all, scale, neg_log_q, hits, r0, r1):
    """Logits of rows r0:r1, masked: (C, D) @ (D, N) -> (C, N), one fused addmm."""
    if neg_log_q is None:
        s = torch.mm(u, v_all.T).mul_(scale)
    else:
        s = torch.addmm(neg_log_q, u, v_all.T, alpha=scale)
    if hits is not None and hits[0].numel():
        lo, hi = torch.searchsorted(hits[0], torch.tensor([r0, r1], device=u.device)).tolist()
        if hi > lo:
            s[hits[0][lo:hi] - r0, hits[1][lo:hi]] = -math.inf
    return s


def chunk_rows_for(B: int, N: int) -> int:
    """Rows per block: about DEFAULT_CHUNK_ELEMENTS logits at once, at least 16."""
    return max(16, min(B, DEFAULT_CHUNK_ELEMENTS // max(N, 1)))


def contrastive_loss_chunked(
    user: torch.Tensor,
    item: torch.Tensor,
    temperature: float | torch.Tensor,
    item_log_q: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Chunked PyTorch loss: same value and gradients as the naive path, memory O(chunk × N)."""
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(user.shape[0], item.shape[0])
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(float(temperature), dtype=torch.float64)
    return _ChunkedContrastive.apply(user, item, temperature, item_log_q, item_ids, symmetric,
                                     reduction, chunk_rows)
