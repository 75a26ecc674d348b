"""torch.distributed helpers: gathering a batch from every rank, with gradient.

`gather_rows` is what global in-batch negatives need: every rank's rows concatenated in rank
order, batches of different sizes allowed (the last batch of an epoch), and a backward pass
that sends each rank the gradient of its own rows summed over every rank's loss. With the loss
of rank r scaled so that the mean over ranks is the global loss (what `contrastive_loss` does),
DDP's averaging then yields exactly the single-process gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_rows", "is_distributed", "rank_and_world"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's row count, in rank order."""
    _, world = rank_and_world()
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


class _GatherRows(torch.autograd.Function):
    """all_gather of (n_r, ...) tensors of different n_r; backward all-reduces (sums) the
    gradient of the whole gathered tensor and keeps this rank's rows. (all_reduce rather than
    reduce_scatter: gloo has no reduce_scatter.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank, _ = rank_and_world()
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `x` (n_r, ...) from every rank in rank order: (sum n_r, ...).

    Differentiable when `x` requires grad (see the module docstring for the gradient); integer
    tensors (ids) are gathered the same way without one. `sizes` (every rank's n_r, from
    `gather_sizes`) saves a collective when known.
    """
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    if x.requires_grad:
        return _GatherRows.apply(x, sizes)
    with torch.no_grad():
        return _GatherRows.forward(_NoCtx(), x, sizes)


class _NoCtx:
    """Stands in for autograd's ctx when gathering without a gradient."""
