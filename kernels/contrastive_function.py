"""The autograd.Function over the fused Triton kernels (forward: LSE; backward: recompute)."""

from __future__ import annotations

import torch

from recsys_ccl.contrastive_torch import reduce_loss
from recsys_ccl.kernels.contrastive_backward import contrastive_backward
from recsys_ccl.kernels.contrastive_forward import contrastive_lse_forward

__all__ = ["TritonContrastiveLoss", "triton_contrastive_loss"]


class TritonContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user, item, temperature, item_log_q, item_ids, symmetric, reduction,
                precision, blocks):
        scale = 1.0 / float(temperature)
        user = user.contiguous()
        item = item.to(user.dtype).contiguous()
        log_q = None if item_log_q is None else item_log_q.to(torch.float32).contiguous()
        ids = None if item_ids is None else item_ids.to(torch.int64).contiguous()
        lse2, loss, lse2_col, loss_col = contrastive_lse_forward(
            user, item, scale, log_q, ids, symmetric, precision, blocks)  # (B,) fp32 each
        ctx.save_for_backward(user, item, log_q, ids, lse2, lse2_col, loss, loss_col)
        if symmetric:
            loss = (loss + loss_col) / 2
        ctx.scale, ctx.symmetric, ctx.reduction = scale, symmetric, reduction
        ctx.precision, ctx.blocks = precision, blocks
        ctx.item_dtype = item.dtype
        return reduce_loss(loss, reduction).to(user.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        user, item, log_q, ids, lse2, lse2_col, loss_row, loss_col = ctx.saved_tensors
        B = user.shape[0]
        half = 0.5 if ctx.symmetric else 1.0
        go = grad_out.to(torch.float32)
        if ctx.reduction == "mean":
            g = (go * (half / B)).expand(B)
        elif ctx.reduction == "sum":
            g = (go * half).expand(B)
        else:
            g = go * half
        # dS[i, i] = g_i (p_ii - 1) (+ the column term), exact through expm1 of the losses
        diag = g * torch.expm1(-loss_row)
        if ctx.symmetric:
            diag = diag + g * torch.expm1(-loss_col)
        need_tau = ctx.needs_input_grad[2]
        du, dv = contrastive_backward(
            user, item, ctx.scale, log_q, ids, lse2, lse2_col, g.contiguous(),
            diag.contiguous(), ctx.precision,
            ctx.blocks, need_user=ctx.needs_input_grad[0] or need_tau,
            need_item=ctx.needs_input_grad[1])
        grad_tau = None
        if need_tau:
            # dL/d(1/τ) = Σ_i <u_i, dU_i> · τ, and d(1/τ)/dτ = -1/τ²
            grad_tau = -(user.to(torch.float32) * du).sum() * ctx.scale
        grad_u = du.to(user.dtype) if ctx.needs_input_grad[0] else None
        grad_v = dv.to(ctx.item_dtype) if dv is not None else None
        return grad_u, grad_v, grad_tau, None, None, None, None, None, None


def triton_contrastive_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    temperature: torch.Tensor,
    item_log_q: torch.Tensor | None,
    item_ids: torch.Tensor | None,
    symmetric: bool,
    reduction: str,
    precision: str = "tf32",
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    return TritonContrastiveLoss.apply(user, item, temperature, item_log_q, item_ids,
                                       symmetric, reduction, precision, blocks)
