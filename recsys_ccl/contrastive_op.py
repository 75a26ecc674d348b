"""contrastive_loss as registered PyTorch operators, so that torch.compile keeps a training step
that calls it in one graph (fullgraph=True): the loss is opaque to Dynamo, its backward is
registered with torch.library.register_autograd, and fake implementations give the shapes.

    recsys_ccl::contrastive_rows            (B,) per-row losses + what the backward needs
    recsys_ccl::contrastive_rows_backward   dU, dV, dτ from the per-row weights

`impl` is "triton" (the fused kernel) or "torch" (the chunked path). Eager calls of
`contrastive_loss` keep their autograd.Functions (the chunked one forms the gradients during
the forward for scalar reductions); these operators serve compiled graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recsys_ccl.contrastive_torch import (
    chunk_rows_for,
    chunked_backward,
    chunked_forward,
    compute_dtype,
    prepare_inputs,
)

__all__ = ["contrastive_rows"]

_EMPTY = (0,)


@torch.library.custom_op("recsys_ccl::contrastive_rows", mutates_args=())
def contrastive_rows(
    user: Tensor, item: Tensor, temperature: Tensor, item_log_q: Tensor | None,
    item_ids: Tensor | None, symmetric: bool, impl: str, reduction: str, precision: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss (B,), loss_row, lse_row, loss_col, lse_col): loss = (row + col) / 2 when
    symmetric, else loss_row; the column terms are empty without `symmetric`. Float32 (the
    chunked path on float64 inputs: float64). lse_row/lse_col are in the implementation's own
    units (base 2 for the kernel). `reduction` (applied by the caller) sets the backward's
    16-bit scaling."""
    if impl == "triton":
        from recsys_ccl.kernels.contrastive_forward import contrastive_lse_forward
        from recsys_ccl.kernels.contrastive_function import kernel_inputs

        k = kernel_inputs(user, item, temperature, item_log_q, item_ids, precision)
        lse, loss_row, lse_col, loss_col = contrastive_lse_forward(
            k.user, k.item, k.tau, k.log_q, k.ids, symmetric, k.plan)
    else:
        u, v, neg_log_q, hits = prepare_inputs(user, item, item_log_q, item_ids)
        scale = 1.0 / float(temperature)
        loss_row, lse, loss_col, lse_col, _, _ = chunked_forward(
            u, v, scale, neg_log_q, hits, symmetric, chunk_rows_for(u.shape[0], v.shape[0]))
    if symmetric:
        return (loss_row + loss_col) / 2, loss_row, lse, loss_col, lse_col
    empty = loss_row.new_empty(_EMPTY)
    return loss_row.clone(), loss_row, lse, empty, empty.clone()


@contrastive_rows.register_fake
def _(user, item, temperature, item_log_q, item_ids, symmetric, impl, reduction, precision):
    B = user.shape[0]
    dtype = compute_dtype(user.dtype) if impl != "triton" else torch.float32
    n = B if symmetric else 0
    return (user.new_empty((B,), dtype=dtype), user.new_empty((B,), dtype=dtype),
            user.new_empty((B,), dtype=dtype), user.new_empty((n,), dtype=dtype),
            user.new_empty((n,), dtype=dtype))


@torch.library.custom_op("recsys_ccl::contrastive_rows_backward", mutates_args=())
def contrastive_rows_backward(
    grad: Tensor, user: Tensor, item: Tensor, temperature: Tensor, item_log_q: Tensor | None,
    item_ids: Tensor | None, loss_row: Tensor, lse_row: Tensor, loss_col: Tensor,
    lse_col: Tensor, symmetric: bool, impl: str, reduction: str, precision: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dU (B, D), dV (N, D) in the inputs' dtypes and dτ () from grad (B,), the gradient of
    the per-row losses."""
    half = 0.5 if symmetric else 1.0
    col = (lse_col, loss_col) if symmetric else (None, None)
    if impl == "triton":
        from recsys_ccl.kernels.contrastive_backward import contrastive_backward
        from recsys_ccl.kernels.contrastive_function import (
            ds_scale_for,
            kernel_inputs,
            row_weights,
        )

        k = kernel_inputs(user, item, temperature, item_log_q, item_ids, precision)
        g, diag = row_weights(grad, loss_row, col[1], symmetric)
        du, dtau_row, dv = contrastive_backward(
            k.user, k.item, k.tau, k.log_q, k.ids, lse_row, col[0], g, diag, k.plan,
            ds_scale_for(k.user.dtype, k.user.shape[0], reduction))
        dtau = -dtau_row.sum() / (k.tau * k.tau)
    else:
        u, v, neg_log_q, hits = prepare_inputs(user, item, item_log_q, item_ids)
        scale = 1.0 / float(temperature)
        g = grad.to(u.dtype) * half
        du, dv, dtau = chunked_backward(u, v, scale, neg_log_q, hits, g, lse_row, col[0],
                                        loss_row, col[1], chunk_rows_for(u.shape[0],
                                                                         v.shape[0]))
    return (du.to(user.dtype), dv.to(item.dtype),
            dtau.to(temperature.dtype).reshape(temperature.shape))


@contrastive_rows_backward.register_fake
def _(grad, user, item, temperature, item_log_q, item_ids, loss_row, lse_row, loss_col,
      lse_col, symmetric, impl, reduction, precision):
    return torch.empty_like(user), torch.empty_like(item), torch.empty_like(temperature)


def _setup_context(ctx, inputs, output) -> None:
    user, item, temperature, item_log_q, item_ids, symmetric, impl, reduction, precision = inputs
    _, loss_row, lse_row, loss_col, lse_col = output
    ctx.save_for_backward(user, item, temperature, item_log_q, item_ids, loss_row, lse_row,
                          loss_col, lse_col)
    ctx.symmetric, ctx.impl, ctx.reduction, ctx.precision = symmetric, impl, reduction, precision


def _backward(ctx, grad, *unused):
    user, item, temperature, item_log_q, item_ids, loss_row, lse_row, loss_col, lse_col = \
        ctx.saved_tensors
    du, dv, dtau = contrastive_rows_backward(
        grad, user, item, temperature, item_log_q, item_ids, loss_row, lse_row, loss_col,
        lse_col, ctx.symmetric, ctx.impl, ctx.reduction, ctx.precision)
    return du, dv, dtau, None, None, None, None, None, None


torch.library.register_autograd("recsys_ccl::contrastive_rows", _backward,
                                setup_context=_setup_context)
