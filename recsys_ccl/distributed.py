"""torch.distributed helpers: gathering a batch from every rank, with gradient.

`gather_rows` is what global in-batch negatives need: every rank's rows concatenated in rank
order, batches of different sizes allowed (the last batch of an epoch), and a backward pass
that sends each rank the gradient of its own rows summed over every rank's loss. With the loss
of rank r scaled so that the mean over ranks is the global loss (what `contrastive_loss` does),
averaging the gradients over ranks (`average_gradients`, what DDP does) then yields exactly the
single-process gradients.

`average_gradients` averages dense gradients with one all-reduce and the embedding tables'
sparse gradients by gathering every rank's (row, gradient) pairs: all_gather works on gloo and
NCCL alike (NCCL has no sparse all-reduce), and only the rows the batches touched travel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["average_gradients", "barrier", "broadcast_json", "gather_rows", "gather_sizes",
           "init_from_env", "is_distributed", "rank_and_world"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL
    for tensors on CUDA (each rank takes GPU LOCAL_RANK), gloo for tensors on the CPU. Returns
    whether this call initialised it (the caller then destroys it)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return False
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_json(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (JSON over the wire: no pickle)."""
    import json

    if not is_distributed():
        return obj
    rank, _ = rank_and_world()
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    payload = json.dumps(obj).encode() if rank == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buf = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if rank == src:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


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
        ctx.sizes, ctx.rank = sizes, rank_and_world()[0]
        return _all_gather_rows(x, sizes)

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
    return _all_gather_rows(x, sizes)


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of rows when ranks hold different counts: pad to the longest, gather, trim."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def average_gradients(dense: list[torch.nn.Parameter], sparse: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks (a no-op in one process).

    dense: parameters with dense gradients, averaged in one flat all-reduce (a rank without a
    gradient for one contributes zeros); sparse: the embedding tables, whose sparse gradients
    travel as every rank's (row, value) pairs, gathered and coalesced (a rank whose batch did
    not touch a table contributes none). Every rank passes the same parameters in the same
    order."""
    if not is_distributed():
        return
    _, world = rank_and_world()
    if dense:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in dense])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in dense:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).clone()
            offset += n
    for p in sparse:
        if p.grad is None:
            rows = torch.zeros(0, dtype=torch.int64, device=p.device)
            values = p.new_zeros((0, *p.shape[1:]))
        else:
            g = p.grad.coalesce()
            rows, values = g.indices()[0], g.values()
        sizes = gather_sizes(len(rows), p.device)
        if max(sizes) == 0:
            continue
        all_rows = _all_gather_rows(rows, sizes)
        all_values = _all_gather_rows(values, sizes) / world
        p.grad = torch.sparse_coo_tensor(all_rows[None], all_values, p.shape).coalesce()
