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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "MAX_SHIFT_GAP",
    "accidental_hit_pairs",
    "block_workers",
    "chunk_rows_for",
    "chunked_backward",
    "chunked_forward",
    "compute_dtype",
    "contrastive_loss_chunked",
    "contrastive_loss_naive",
    "prepare_inputs",
    "reduce_loss",
    "row_shift_bounds",
    "run_blocks",
]

# Rows per chunk are chosen so that one chunk of logits holds about this many elements
# (2 Mi fp32 = 8 MiB): large enough for efficient matmuls, small enough to stay near the cache
# and far below the (B, N) matrix (benchmarks/bench_loss.py: 1-4 Mi are close).
DEFAULT_CHUNK_ELEMENTS = 1 << 21

# A block may be shifted by a bound on its row's logits rather than the row max when the bound
# is at most this far above the positive logit: then the row max is within it too, exp(logit -
# bound) of every entry within 30 of the max stays a normal fp32 number (> e^-87), and what is
# lost below is < N·e^-30 of the row sum. Unit-norm towers at τ >= 0.05 stay well inside.
MAX_SHIFT_GAP = 50.0


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


def row_shift_bounds(
    u_all: torch.Tensor, v_all: torch.Tensor, scale: float, neg_log_q: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound, gap), each (B,): bound[i] >= every logit of row i (Cauchy-Schwarz:
    scale·|u_i|·max_j |v_j| + max_j -log_q[j]), and gap[i] = bound[i] - logit[i, i], the positive
    taken from a row dot (used only to decide whether the bound is tight enough)."""
    v_norm = torch.linalg.vector_norm(v_all, dim=1).amax() if v_all.shape[0] else 0.0
    bound = torch.linalg.vector_norm(u_all, dim=1) * (v_norm * scale)
    pos = (u_all * v_all[: u_all.shape[0]]).sum(1) * scale
    if neg_log_q is not None:
        bound = bound + neg_log_q.amax()
        pos = pos + neg_log_q[0, : u_all.shape[0]]
    return bound, bound - pos


def _exp_block(u, v_aug, scale, neg_log_q, hits, r0, r1, shift, col=None):
    """One block of rows, exponentiated in place: (e, shift, pos, e_pos).

    e (C, N) = exp(logit[r0 + i, j] - shift[i]), 0 where masked and on the diagonal; pos (C,)
    = logit[i, i] - shift[i] and e_pos = exp(pos). The shift rides in the matmul as an extra
    column (u_aug = [scale·u, -shift], v_aug = [v, 1]), so the only pass over the block besides
    the matmul is the exp. `shift` None: the exact row max (an amax and a subtraction more),
    for rows whose bound is too loose; then `col`, a list [col_max, col_sum] over the first B
    columns, is updated from the unshifted logits (the symmetric term)."""
    C, D = u.shape
    rows = torch.arange(C, device=u.device)
    u_aug = torch.empty(C, D + 1, dtype=u.dtype, device=u.device)
    torch.mul(u, scale, out=u_aug[:, :D])
    u_aug[:, D] = 0.0 if shift is None else -shift
    s = (torch.mm(u_aug, v_aug.T) if neg_log_q is None
         else torch.addmm(neg_log_q, u_aug, v_aug.T))
    _mask_hits(s, hits, r0, r1)
    if shift is None:
        if col is not None:
            col[:] = _update_column_lse(col[0], col[1], s[:, : col[0].shape[0]])
        shift = s.amax(1)
        s.sub_(shift[:, None])
    pos = s[rows, rows + r0]
    s.exp_()
    e_pos = s[rows, rows + r0]
    s[rows, rows + r0] = 0.0
    return s, shift, pos, e_pos


def _row_loss(z_off, pos, e_pos):
    """-log softmax of the positive, from the off-diagonal sum z_off = Σ_{j≠i} exp(logit - shift):
    log1p(z_off / e_pos) keeps its precision when the positive dominates (and is exactly 0 for
    a row whose negatives are all masked); log(z) - pos where e_pos underflowed."""
    z = z_off + e_pos
    tiny = torch.finfo(z.dtype).tiny
    return torch.where(e_pos > tiny, torch.log1p(z_off / e_pos.clamp_min(tiny)), z.log() - pos)


def _update_column_lse(col_m, col_s, blk):
    """Online column logsumexp: running (max, sum of exp(x - max)) (B,) updated with blk (C, B)."""
    blk_m = blk.amax(0)
    blk_s = torch.exp(blk - _finite_or_zero(blk_m)).sum(0)
    return _merge_lse(col_m, col_s, blk_m, blk_s)


def _finite_or_zero(m):
    # a column with every entry masked so far keeps max -inf: shift by 0 there
    return torch.where(m == -math.inf, 0.0, m)


def _merge_lse(m1, s1, m2, s2):
    """Two (max, sum of exp(x - max)) pairs -> the pair of their union."""
    m = torch.maximum(m1, m2)
    safe = _finite_or_zero(m)
    return m, s1 * torch.exp(m1 - safe) + s2 * torch.exp(m2 - safe)


def block_workers(num_blocks: int, device: torch.device) -> int:
    """How many workers run_blocks uses (accumulators are allocated per worker), at least 1."""
    return max(1, min(torch.get_num_threads(), num_blocks)) if device.type == "cpu" else 1


def run_blocks(work: Callable[[int, int], None], num_blocks: int, device: torch.device) -> int:
    """Call work(block, worker) for block in range(num_blocks), on W workers, and return W.

    On the CPU, worker w is a thread that takes blocks w, w + W, ... in order and runs its torch
    ops single-threaded, W = torch.get_num_threads(): the GEMMs of a block of rows are too thin
    to split well across cores, so whole blocks in parallel beat each op on every core
    (bench_loss.py). Which blocks a worker gets
    and the order it takes them in are fixed, so per-worker accumulators are deterministic for
    a given W. Elsewhere (CUDA) one worker runs every block in order."""
    workers = block_workers(num_blocks, device)
    if workers <= 1:
        for k in range(num_blocks):
            work(k, 0)
        return 1

    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def worker(w: int) -> None:
        torch.set_num_threads(1)  # this thread's ops only (OpenMP: a per-thread setting)
        # grad and inference mode are thread-local: the caller's hold here too
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for k in range(w, num_blocks, workers):
                work(k, w)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="contrastive") as pool:
            for future in [pool.submit(worker, w) for w in range(workers)]:
                future.result()
    finally:
        if torch.get_num_threads() != threads:  # a build whose setting is process-wide
            torch.set_num_threads(threads)
    return workers


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

    u_all (B, D), v_all (N, D); neg_log_q (1, N) or None; hits: accidental_hit_pairs.

    Each block is shifted by a per-row bound on its logits instead of the row max where the
    bound is within MAX_SHIFT_GAP of the positive (unit-norm towers: always), which saves two
    passes over the block; the row sums and Σ_j e_ij v_j come out of one matmul against
    [v, 1]; the softmax normalisation and the diagonal's -1 are applied to (C, D) results, not
    to the (C, N) block. Other rows, and every row when symmetric, use the exact row max."""
    B, D = u_all.shape
    cdtype, dev = u_all.dtype, u_all.device
    eager = eager_weight is not None
    grad_u = torch.empty_like(u_all) if eager else None
    lse = torch.empty(B, dtype=cdtype, device=dev)
    loss = torch.empty(B, dtype=cdtype, device=dev)
    pos_all = torch.empty(B, dtype=cdtype, device=dev)  # logit[i, i]
    v_aug = torch.ones(v_all.shape[0], D + 1, dtype=cdtype, device=dev)
    v_aug[:, :D] = v_all
    bound, gap = row_shift_bounds(u_all, v_all, scale, neg_log_q)
    starts = list(range(0, B, chunk_rows))
    # one host read per call: which blocks may use the bound (the symmetric column statistics
    # need the unshifted logits, so those blocks take the exact max)
    bound_ok = ([False] * len(starts) if symmetric
                else _chunk_max(gap, chunk_rows).le(MAX_SHIFT_GAP).tolist())
    # per-worker accumulators: grad_v (N, D) and the running column (max, sum), (B,) each
    grad_vs: list[torch.Tensor] = []
    cols: list[list[torch.Tensor]] = []
    for _ in range(block_workers(len(starts), dev)):
        if eager:
            grad_vs.append(torch.zeros_like(v_all))
        if symmetric:
            cols.append([torch.full((B,), -math.inf, dtype=cdtype, device=dev),
                         torch.zeros(B, dtype=cdtype, device=dev)])

    def block(k: int, w: int) -> None:
        r0 = starts[k]
        r1 = min(r0 + chunk_rows, B)
        u = u_all[r0:r1]
        e, shift, pos, e_pos = _exp_block(u, v_aug, scale, neg_log_q, hits, r0, r1,
                                          bound[r0:r1] if bound_ok[k] else None,
                                          cols[w] if symmetric else None)
        if eager:
            r = torch.mm(e, v_aug)  # (C, D + 1): Σ_{j≠i} e_ij v_j and z_off
            z_off = r[:, D]
        else:
            z_off = e.sum(1)
        z = z_off + e_pos
        pos_all[r0:r1] = pos + shift
        lse[r0:r1] = shift + z.log()
        loss[r0:r1] = _row_loss(z_off, pos, e_pos)
        if eager:
            # dS_ij = g·e_ij / z_i off the diagonal, and dS_ii = g·(p_ii - 1) = -g·z_off_i / z_i
            wt = (eager_weight * scale) / z  # (C,)
            gu = grad_u[r0:r1]
            torch.addcmul(r[:, :D], v_all[r0:r1], z_off[:, None], value=-1.0, out=gu)
            gu.mul_(wt[:, None])
            uw = u * wt[:, None]
            grad_vs[w].addmm_(e.T, uw)  # (N, C) @ (C, D)
            grad_vs[w][r0:r1].addcmul_(uw, z_off[:, None], value=-1.0)

    run_blocks(block, len(starts), dev)
    grad_v = _sum_in_order(grad_vs) if eager else None
    lse_col = loss_col = None
    if symmetric:
        col_m, col_s = _merge_column_lse(cols)
        lse_col = col_m + col_s.log()
        loss_col = (col_m - pos_all) + col_s.log()
    return loss, lse, loss_col, lse_col, grad_u, grad_v


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for p in parts[1:]:
        total += p
    return total


def _merge_column_lse(cols: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-worker running column (max, sum) pairs, in worker order."""
    col_m, col_s = cols[0]
    for m, s in cols[1:]:
        col_m, col_s = _merge_lse(col_m, col_s, m, s)
    return col_m, col_s


def _chunk_max(x: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Max of x (B,) over consecutive blocks of chunk_rows: (ceil(B / chunk_rows),)."""
    pad = (-x.shape[0]) % chunk_rows
    if pad:
        x = torch.cat([x, x.new_full((pad,), -math.inf)])
    return x.view(-1, chunk_rows).amax(1)


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
    starts = list(range(0, B, chunk_rows))
    grad_vs = [torch.zeros_like(v_all)
               for _ in range(block_workers(len(starts), u_all.device))]

    def block(k: int, w: int) -> None:
        r0 = starts[k]
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
        grad_vs[w].addmm_(s.T, u, alpha=scale)

    run_blocks(block, len(starts), u_all.device)
    grad_v = _sum_in_order(grad_vs)
    grad_tau = -(u_all * grad_u).sum() * scale
    return grad_u, grad_v, grad_tau


def prepare_inputs(user: torch.Tensor, item: torch.Tensor, item_log_q: torch.Tensor | None,
                   item_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """What the chunked loops take: (u_all, v_all) in the compute dtype, neg_log_q (1, N) or
    None, and the accidental-hit pairs or None."""
    cdtype = compute_dtype(user.dtype)
    neg_log_q = None if item_log_q is None else (-item_log_q.to(cdtype))[None, :]
    hits = None if item_ids is None else accidental_hit_pairs(item_ids, user.shape[0])
    return user.to(cdtype), item.to(cdtype), neg_log_q, hits


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
        u_all, v_all, neg_log_q, hits = prepare_inputs(user, item, item_log_q, item_ids)
        scale = 1.0 / float(temperature)
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
    _mask_hits(s, hits, r0, r1)
    return s


def _mask_hits(s, hits, r0, r1):
    """Set the accidental hits of rows r0:r1 to -inf in their logits block s (C, N)."""
    if hits is not None and hits[0].numel():
        lo, hi = torch.searchsorted(hits[0], torch.tensor([r0, r1], device=s.device)).tolist()
        if hi > lo:
            s[hits[0][lo:hi] - r0, hits[1][lo:hi]] = -math.inf


def chunk_rows_for(B: int, N: int) -> int:
    """Rows per block. Up to 2 x DEFAULT_CHUNK_ELEMENTS logits in all: one block (the worker
    threads' start-up and the extra op calls cost more than they save there). Beyond: about
    DEFAULT_CHUNK_ELEMENTS logits per block and at least two blocks per CPU worker thread; a
    multiple of 16, at least 16."""
    if B * N <= 2 * DEFAULT_CHUNK_ELEMENTS:
        return max(B, 1)
    rows = min(DEFAULT_CHUNK_ELEMENTS // max(N, 1), B // (2 * torch.get_num_threads()))
    return max(16, rows // 16 * 16)


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
