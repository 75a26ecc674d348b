"""The fused kernels' inputs prepared once, and their autograd.Function (forward: LSE;
backward: recompute).

`kernel_inputs` and `row_weights` are the whole glue between a loss call and the kernels: the
eager Function below and the registered operator (recsys_ccl/contrastive_op.py) both call
them, so the two paths cannot prepare the plan, τ, log_q, ids or the backward's row weights
differently. Nothing here reads a device value on the host: the temperature travels as a
device tensor into the kernels and its gradient is reduced on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys_ccl.kernels.contrastive_backward import contrastive_backward
from recsys_ccl.kernels.contrastive_forward import contrastive_lse_forward
from recsys_ccl.kernels.launch_plan import LaunchPlan, launch_plan

__all__ = ["KernelInputs", "TritonContrastiveLoss", "ds_scale_for", "kernel_inputs",
           "row_weights", "triton_contrastive_loss"]


@dataclass(frozen=True)
class KernelInputs:
    """What the kernels take: contiguous embeddings of one dtype, τ as a 0-d fp32 device
    tensor, fp32 log_q, int32/int64 ids, and the launch plan."""

    user: torch.Tensor  # (B, D)
    item: torch.Tensor  # (N, D), the user's dtype
    tau: torch.Tensor  # () fp32
    log_q: torch.Tensor | None  # (N,) fp32
    ids: torch.Tensor | None  # (N,) int32 or int64
    plan: LaunchPlan


def kernel_inputs(user: torch.Tensor, item: torch.Tensor, temperature: torch.Tensor,
                  item_log_q: torch.Tensor | None, item_ids: torch.Tensor | None,
                  precision: str | None, blocks: tuple[int, int] | None = None,
                  n_split: int | None = None) -> KernelInputs:
    """The kernels' inputs and plan for one loss call (see recsys_ccl.contrastive_loss)."""
    user = user.contiguous()
    item = item.to(user.dtype).contiguous()
    B, D = user.shape
    plan = launch_plan(B, item.shape[0], D, user.dtype, precision, blocks,
                       num_sms=_num_sms(user.device), n_split=n_split)
    tau = temperature.detach().to(device=user.device, dtype=torch.float32).reshape(())
    log_q = None if item_log_q is None else item_log_q.to(torch.float32).contiguous()
    ids = None
    if item_ids is not None:
        ids = item_ids if item_ids.dtype in (torch.int32, torch.int64) else \
            item_ids.to(torch.int64)
        ids = ids.contiguous()
    return KernelInputs(user, item, tau, log_q, ids, plan)


def row_weights(grad_rows: torch.Tensor, loss_row: torch.Tensor,
                loss_col: torch.Tensor | None, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's per-row weights g (B,) and the diagonal of dS (B,): g_i is the gradient
    of the per-row loss i (halved when symmetric: each direction is half of it), and
    dS[i, i] = g_i (p_ii - 1) (+ the column term), exact through expm1 of the losses."""
    g = grad_rows.to(torch.float32) * (0.5 if symmetric else 1.0)
    diag = g * torch.expm1(-loss_row)
    if symmetric:
        diag = diag + g * torch.expm1(-loss_col)
    return g.contiguous(), diag.contiguous()


def ds_scale_for(dtype: torch.dtype, B: int, reduction: str) -> float:
    """The power of two dS is multiplied by before it is rounded to a 16-bit operand: about
    1/g for the mean's weights g = 1/B (1 for fp32, whose range needs none)."""
    if dtype == torch.float32 or reduction != "mean":
        return 1.0
    return float(1 << max(0, B - 1).bit_length())


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class TritonContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user, item, temperature, item_log_q, item_ids, symmetric, reduction,
                precision, blocks, n_split):
        k = kernel_inputs(user, item, temperature, item_log_q, item_ids, precision, blocks,
                          n_split)
        lse2, loss, lse2_col, loss_col = contrastive_lse_forward(
            k.user, k.item, k.tau, k.log_q, k.ids, symmetric, k.plan)  # (B,) fp32 each
        ctx.save_for_backward(k.user, k.item, k.tau, k.log_q, k.ids, lse2, lse2_col, loss,
                              loss_col)
        if symmetric:
            loss = (loss + loss_col) / 2
        ctx.plan, ctx.symmetric, ctx.reduction = k.plan, symmetric, reduction
        ctx.item_dtype = item.dtype
        ctx.tau_dtype, ctx.tau_shape = temperature.dtype, temperature.shape
        return _reduce(loss, reduction).to(user.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        user, item, tau, log_q, ids, lse2, lse2_col, loss_row, loss_col = ctx.saved_tensors
        B = user.shape[0]
        go = grad_out.to(torch.float32)
        if ctx.reduction == "mean":
            grad_rows = (go / B).expand(B)
        elif ctx.reduction == "sum":
            grad_rows = go.expand(B)
        else:
            grad_rows = go
        g, diag = row_weights(grad_rows, loss_row, loss_col, ctx.symmetric)
        need_tau = ctx.needs_input_grad[2]
        du, dtau_row, dv = contrastive_backward(
            user, item, tau, log_q, ids, lse2, lse2_col, g, diag, ctx.plan,
            ds_scale_for(user.dtype, B, ctx.reduction),
            need_user=ctx.needs_input_grad[0] or need_tau,
            need_item=ctx.needs_input_grad[1])
        grad_tau = None
        if need_tau:
            # dL/dτ = dL/d(1/τ) · -1/τ², with dL/d(1/τ) = Σ_ij dS_ij <u_i, v_j> summed in fp32
            grad_tau = (-dtau_row.sum() / (tau * tau)).to(ctx.tau_dtype).reshape(ctx.tau_shape)
        grad_u = du.to(user.dtype) if ctx.needs_input_grad[0] else None
        grad_v = dv.to(ctx.item_dtype) if dv is not None else None
        return grad_u, grad_v, grad_tau, None, None, None, None, None, None, None


def triton_contrastive_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    temperature: torch.Tensor,
    item_log_q: torch.Tensor | None,
    item_ids: torch.Tensor | None,
    symmetric: bool,
    reduction: str,
    precision: str | None = None,
    blocks: tuple[int, int] | None = None,
    n_split: int | None = None,
) -> torch.Tensor:
    """The fused kernel's loss (see recsys_ccl.contrastive_loss). precision: fp32 dots, None
    follows torch.get_float32_matmul_precision(); blocks: force (block_b, block_n); n_split:
    force the number of column ranges of the row-direction kernels."""
    return TritonContrastiveLoss.apply(user, item, temperature, item_log_q, item_ids,
                                       symmetric, reduction, precision, blocks, n_split)


def _num_sms(device: torch.device) -> int | None:
    """The GPU's multiprocessor count (the split of N is planned for it); None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count
