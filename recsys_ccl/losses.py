"""Losses for two-tower retrieval.

`contrastive_loss` is the in-batch sampled softmax (InfoNCE) with temperature, logQ correction,
accidental-hit masking, extra negatives and an optional symmetric term; it dispatches to the
fused Triton kernel (CUDA), the chunked PyTorch path (CPU) or the naive baseline. The other
losses (SimpleX's cosine contrastive loss, the pairwise margin loss, BPR) share its batch
convention: row i of `item_emb` is user i's positive for i < B, every other row a negative.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from recsys_ccl.contrastive_torch import (
    contrastive_loss_chunked,
    contrastive_loss_naive,
    reduce_loss,
)
from recsys_ccl.distributed import gather_rows, gather_sizes, is_distributed, rank_and_world

__all__ = [
    "bpr_loss",
    "contrastive_loss",
    "cosine_contrastive_loss",
    "margin_contrastive_loss",
]

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "triton", "torch", "naive"]
Precision = Literal["ieee", "tf32x3", "tf32"]


def _check_batch(user_emb: torch.Tensor, item_emb: torch.Tensor, item_ids: torch.Tensor | None,
                 check_finite: bool = True) -> None:
    if user_emb.ndim != 2 or item_emb.ndim != 2:
        raise ValueError(f"user_emb and item_emb must be 2-D (B, D) and (N, D), got shapes "
                         f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}")
    B, D = user_emb.shape
    N, D_item = item_emb.shape
    if B == 0:
        raise ValueError("user_emb is empty (B = 0)")
    if D_item != D:
        raise ValueError(f"embedding sizes differ: user_emb has D = {D}, item_emb has {D_item}")
    if N < B:
        raise ValueError(f"item_emb must have N >= B rows (row i < B is user i's positive), "
                         f"got N = {N} < B = {B}")
    if user_emb.device != item_emb.device:
        raise ValueError(f"user_emb is on {user_emb.device}, item_emb on {item_emb.device}")
    if item_ids is not None:
        if item_ids.shape != (N,):
            raise ValueError(f"item_ids must have shape ({N},), got {tuple(item_ids.shape)}")
        if item_ids.dtype.is_floating_point or item_ids.dtype == torch.bool:
            raise ValueError(f"item_ids must be an integer tensor, got {item_ids.dtype}")
    if check_finite and user_emb.device.type != "meta":  # meta tensors carry no values
        for name, t in (("user_emb", user_emb), ("item_emb", item_emb)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")


def _triton_usable(t: torch.Tensor) -> bool:
    from recsys_ccl.kernels.launch_plan import interpreting

    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def contrastive_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    item_log_q: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    distributed: bool = False,
    precision: Precision | None = None,
    check_inputs: bool = False,
) -> torch.Tensor:
    """In-batch sampled-softmax (InfoNCE) loss of a two-tower model.

    Shapes: user_emb (B, D); item_emb (N, D) with N >= B, row i < B being user i's positive and
    rows B..N-1 extra negatives shared by every user; item_log_q (N,) natural-log sampling
    probabilities; item_ids (N,) integers. Returns a scalar, or (B,) with reduction="none".

        logit[i, j] = <user_emb[i], item_emb[j]> / temperature - item_log_q[j]
        logit[i, j] = -inf  if item_ids[j] == item_ids[i] and j != i   (accidental hits)
        loss[i]     = logsumexp_j logit[i, j] - logit[i, i]

    The logQ correction (Yi et al., RecSys 2019) removes the popularity bias of in-batch
    negatives, which are sampled in proportion to item popularity. With `symmetric`, the
    item->user direction over the first B columns is added: loss[i] = (row_i + col_i) / 2
    (logQ is constant down a column, so it cancels there). A row whose every negative is
    masked has loss 0 and zero gradient: only its positive is left in the softmax.

    temperature: a positive float, or a 0-d tensor that may require grad (learnable).
    impl: "triton" (fused kernel: CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked,
    memory O(chunk × N)), "naive" (materialised logits + F.cross_entropy), "auto" (Triton for
    CUDA tensors, torch otherwise). All agree to floating-point rounding; gradients reach
    user_emb, item_emb and a tensor temperature (not item_log_q).
    distributed: when torch.distributed is initialised, every rank's items (positives and
    extra negatives, with their logQ and ids) are negatives for every rank's users, and with
    `symmetric` every rank's users for every rank's items: the loss of the concatenated global
    batch. The value returned on every rank is that global loss ("none": this rank's rows of
    it); the gradient is scaled so that DDP's average over ranks equals the single-process
    gradient. Batches may differ in size between ranks. Without torch.distributed initialised
    it is ignored.
    precision: the fused kernel's fp32 matmuls. None follows
    torch.get_float32_matmul_precision() ("highest" -> "ieee", exact fp32; "high" ->
    "tf32x3", about fp32 accuracy at tensor-core speed; "medium" -> "tf32", ~1e-3 relative).
    16-bit inputs (also those autocast produces) are multiplied exactly with fp32
    accumulation whatever is asked; the other implementations follow PyTorch's own setting.
    check_inputs: also check values (finite embeddings and log_q, a tensor temperature > 0).
    Shapes, dtypes and devices are always checked; values only on request, since reading a
    device value back is a host synchronisation in every training step (a float temperature
    is always checked: it costs nothing).
    """
    _check_batch(user_emb, item_emb, item_ids, check_finite=check_inputs)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(temperature, torch.Tensor) or check_inputs:
        tau = float(temperature.detach() if isinstance(temperature, torch.Tensor)
                    else temperature)
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {tau}")
    if item_log_q is not None:
        if item_log_q.shape != (item_emb.shape[0],):
            raise ValueError(f"item_log_q must have shape ({item_emb.shape[0]},), got "
                             f"{tuple(item_log_q.shape)}")
        if check_inputs and not bool(torch.isfinite(item_log_q).all()):
            raise ValueError("item_log_q contains NaN or infinite values")
        item_log_q = item_log_q.detach()
    if distributed and is_distributed():
        return _contrastive_loss_global(user_emb, item_emb, temperature, item_log_q, item_ids,
                                        symmetric, reduction, impl, precision)
    if impl == "auto":
        # float64 has no tensor-core path: it takes the chunked PyTorch implementation
        impl = "triton" if user_emb.is_cuda and user_emb.dtype != torch.float64 else "torch"
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(float(temperature), dtype=torch.float32,
                                   device=user_emb.device)
    if impl in ("triton", "torch") and torch.compiler.is_compiling():
        # a registered operator: one opaque node with a registered backward, so a compiled
        # training step keeps the loss in its graph (fullgraph=True)
        from recsys_ccl.contrastive_op import contrastive_rows

        rows = contrastive_rows(user_emb, item_emb, temperature, item_log_q, item_ids,
                                symmetric, impl, reduction, precision)[0]
        return reduce_loss(rows, reduction).to(user_emb.dtype)
    if impl == "triton":
        if not _triton_usable(user_emb):
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                             "triton is imported, to run the kernels on the CPU)")
        from recsys_ccl.kernels.contrastive_function import triton_contrastive_loss

        return triton_contrastive_loss(user_emb, item_emb, temperature, item_log_q, item_ids,
                                       symmetric, reduction, precision)
    if impl == "torch":
        return contrastive_loss_chunked(user_emb, item_emb, temperature, item_log_q, item_ids,
                                        symmetric, reduction)
    if impl == "naive":
        return contrastive_loss_naive(user_emb, item_emb, temperature, item_log_q, item_ids,
                                      symmetric, reduction)
    raise ValueError(f"impl must be 'auto', 'triton', 'torch' or 'naive', got {impl!r}")


def _contrastive_loss_global(user_emb, item_emb, temperature, item_log_q, item_ids, symmetric,
                             reduction, impl, precision) -> torch.Tensor:
    """contrastive_loss over the global batch (see `distributed` there)."""
    rank, world = rank_and_world()
    B, N = user_emb.shape[0], item_emb.shape[0]
    pos_sizes = gather_sizes(B, user_emb.device)
    extra_sizes = gather_sizes(N - B, user_emb.device)
    start = sum(pos_sizes[:rank])

    def global_columns(local: torch.Tensor | None, extras: bool = True) -> torch.Tensor | None:
        """This rank's positives first (so that row i's positive stays column i: softmax and
        masking do not depend on column order), then the other ranks' positives, then every
        rank's extra negatives. Own rows come from `local`, not from the gathered copy, so
        their gradient arrives once."""
        if local is None:
            return None
        pos = gather_rows(local[:B], pos_sizes)
        parts = [local[:B], pos[:start], pos[start + B:]]
        if extras and sum(extra_sizes):
            parts.append(gather_rows(local[B:], extra_sizes))
        return torch.cat(parts)

    items = global_columns(item_emb)
    ids = global_columns(item_ids)
    per_row = contrastive_loss(user_emb, items, temperature, global_columns(item_log_q), ids,
                               reduction="none", impl=impl, precision=precision)
    if symmetric:
        users = global_columns(user_emb, extras=False)  # (global B, D), own users first
        n_pos = sum(pos_sizes)
        per_col = contrastive_loss(item_emb[:B], users, temperature, None,
                                   None if ids is None else ids[:n_pos], reduction="none",
                                   impl=impl, precision=precision)
        per_row = (per_row + per_col) / 2
    if reduction == "none":
        return per_row
    scale = 1.0 / sum(pos_sizes) if reduction == "mean" else 1.0
    local = per_row.sum() * scale
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    # value: the global loss; gradient: world x this rank's share, which DDP divides by world
    return local * world + (total - (local * world).detach())


def _negative_mask(B: int, N: int, item_ids: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """(B, N) bool: True where column j is a negative for row i (j != i, not a hit)."""
    neg = torch.ones(B, N, dtype=torch.bool, device=device)
    idx = torch.arange(B, device=device)
    neg[idx, idx] = False
    if item_ids is not None:
        neg &= item_ids[:B, None] != item_ids[None, :]
    return neg


def _cosine_pairs(user_emb: torch.Tensor, item_emb: torch.Tensor,
                  item_ids: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos (B, N), the positives' cosines cos[i, i] (B,), and the negative mask (B, N)."""
    B, N = user_emb.shape[0], item_emb.shape[0]
    cos = F.normalize(user_emb, dim=-1) @ F.normalize(item_emb, dim=-1).T  # (B, N)
    pos = cos[torch.arange(B), torch.arange(B)]
    return cos, pos, _negative_mask(B, N, item_ids, user_emb.device)


def cosine_contrastive_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    margin: float = 0.9,
    negative_weight: float = 150.0,
    item_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """SimpleX's cosine contrastive loss (CCL; Mao et al., CIKM 2021).

        loss[i] = (1 - cos(u_i, v_i)) + w / |neg_i| · Σ_{j ∈ neg_i} max(0, cos(u_i, v_j) - m)

    neg_i: every column j != i of item_emb (in-batch and extra negatives) that is not an
    accidental hit. Shapes as in `contrastive_loss`; cosines are unitless in [-1, 1].
    Defaults (m = 0.9, w = 150) are SimpleX's Gowalla settings.
    """
    _check_batch(user_emb, item_emb, item_ids)
    cos, pos, neg = _cosine_pairs(user_emb, item_emb, item_ids)
    hinge = torch.relu(cos - margin) * neg
    n_neg = neg.sum(1).clamp_min(1)
    loss = (1 - pos) + negative_weight * hinge.sum(1) / n_neg
    return reduce_loss(loss, reduction)


def margin_contrastive_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    positive_margin: float = 0.0,
    negative_margin: float = 1.0,
    item_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Pairwise margin contrastive loss on the cosine distance d = 1 - cos (in [0, 2]):

        loss[i] = max(0, d(u_i, v_i) - m+) + mean_{j ∈ neg_i} max(0, m- - d(u_i, v_j))

    The positive's distance is pulled below m+, negatives' distances pushed beyond m-
    (Hadsell et al., CVPR 2006, in its cosine form). Shapes as in `contrastive_loss`.
    """
    _check_batch(user_emb, item_emb, item_ids)
    cos, pos_cos, neg = _cosine_pairs(user_emb, item_emb, item_ids)
    dist = 1 - cos  # (B, N)
    pos = torch.relu((1 - pos_cos) - positive_margin)
    push = (torch.relu(negative_margin - dist) * neg).sum(1) / neg.sum(1).clamp_min(1)
    return reduce_loss(pos + push, reduction)


def bpr_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Bayesian personalised ranking (Rendle et al., UAI 2009) with in-batch negatives:

        loss[i] = mean_{j ∈ neg_i} -log σ(<u_i, v_i> - <u_i, v_j>)

    Scores are raw dot products. Shapes as in `contrastive_loss`; a row without negatives
    contributes 0.
    """
    _check_batch(user_emb, item_emb, item_ids)
    B, N = user_emb.shape[0], item_emb.shape[0]
    scores = user_emb @ item_emb.T  # (B, D) @ (D, N) -> (B, N)
    pos = scores[torch.arange(B), torch.arange(B)]
    neg = _negative_mask(B, N, item_ids, user_emb.device)
    pair = F.softplus(scores - pos[:, None]) * neg  # -log σ(x) = softplus(-x)
    return reduce_loss(pair.sum(1) / neg.sum(1).clamp_min(1), reduction)
