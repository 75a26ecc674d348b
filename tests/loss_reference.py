"""Helpers for loss tests: random batches with planted structure, and error measures against
the float64 reference (the naive implementation evaluated in float64)."""

from __future__ import annotations

import torch

from recsys_ccl.contrastive_torch import contrastive_loss_naive


def make_batch(B, N, D, dtype=torch.float32, log_q=False, dup_ids=False, seed=0):
    """Users and items where item i (< B) really is similar to user i; optional log_q and
    planted duplicate ids (accidental hits) among both positives and extra negatives."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(B, D, generator=g)
    item = torch.randn(N, D, generator=g)
    item[:B] += 0.5 * user
    # unit rows (as with cosine towers): with τ ≈ 0.1 the logits stay within about ±10, so
    # the softmax is neither saturated nor flat and the loss is well conditioned
    user = user / user.norm(dim=1, keepdim=True)
    item = item / item.norm(dim=1, keepdim=True)
    lq = torch.log_softmax(torch.randn(N, generator=g), 0) if log_q else None
    ids = None
    if dup_ids:
        ids = torch.randint(0, max(2, N // 3), (N,), generator=g)
    return user.to(dtype), item.to(dtype), lq, ids


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    denom = ref.norm()
    return float((a - ref).norm() / denom) if denom > 0 else float((a - ref).norm())


def _tau_term_scale(u, v, tau, lq64, ids, symmetric, row_w):
    """Σ_i |w_i| Σ_j |p_ij - δ_ij| |s_ij| / τ²: the sum of the magnitudes of the terms that
    make up dL/dτ = -Σ_i w_i Σ_j (p_ij - δ_ij) s_ij / τ² (s = <u_i, v_j>; per direction when
    symmetric). The derivative cancels within each row as well as across rows, so its
    rounding error is relative to this, not to |dL/dτ|."""
    B = u.shape[0]
    s = u @ v.T  # (B, N)
    logits = s / tau - (lq64 if lq64 is not None else 0)
    if ids is not None:
        hit = ids[:B, None] == ids[None, :]
        hit[torch.arange(B), torch.arange(B)] = False
        logits = logits.masked_fill(hit, float("-inf"))
    eye = torch.zeros_like(s)
    eye[torch.arange(B), torch.arange(B)] = 1
    rows = ((logits.softmax(1) - eye).abs() * s.abs()).sum(1)  # (B,)
    if symmetric:
        cols = ((logits[:, :B].softmax(0) - eye[:, :B]).abs() * s[:, :B].abs()).sum(0)
        rows = (rows + cols) / 2
    return float((row_w.abs() * rows).sum()) / tau ** 2


def reference(user, item, tau, lq, ids, symmetric, reduction, weights):
    """Value and gradients in float64 from the (rounded) inputs, and for the temperature also
    the scale its error is measured against (`_tau_term_scale`: dL/dτ cancels)."""
    u = user.detach().double().requires_grad_()
    v = item.detach().double().requires_grad_()
    t = torch.tensor(float(tau), dtype=torch.float64, requires_grad=True)
    lq64 = None if lq is None else lq.double()
    per_row = contrastive_loss_naive(u, v, t, lq64, ids, symmetric, "none")
    loss = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    (loss * weights.double()).sum().backward()
    row_w = weights.double() * (1.0 / u.shape[0] if reduction == "mean" else 1.0)
    tau_scale = _tau_term_scale(u.detach(), v.detach(), float(tau), lq64, ids, symmetric,
                                row_w.expand(u.shape[0]))
    return loss.detach(), u.grad, v.grad, t.grad, tau_scale


def run(fn, user, item, tau, lq, ids, symmetric, reduction, weights):
    u = user.detach().clone().requires_grad_()
    v = item.detach().clone().requires_grad_()
    t = torch.tensor(float(tau), dtype=torch.float32, requires_grad=True)
    loss = fn(u, v, t, None if lq is None else lq.to(torch.float32), ids, symmetric, reduction)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), u.grad, v.grad, t.grad


def _errors(out, ref):
    return {
        "loss": rel_err(out[0], ref[0]),
        "d_user": rel_err(out[1], ref[1]),
        "d_item": rel_err(out[2], ref[2]),
        "d_tau": abs(float(out[3]) - float(ref[3])) / max(ref[4], 1e-30),
    }


def assert_close_to_reference(fn, user, item, tau, lq, ids, symmetric, reduction, tol, seed=0,
                              plus_torch_error=False):
    """Relative errors against float64 at most `tol`. With `plus_torch_error` (for degenerate
    random shapes, e.g. a loss of 1e-4 made of logits of 5, where no fp32 code reaches 2e-5),
    at most `tol` plus twice PyTorch's own error in the same dtype (the naive path), in the
    spirit of cut-cross-entropy's tests."""
    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(user.shape[0] if reduction == "none" else (), generator=g) + 0.5
    ref = reference(user, item, tau, lq, ids, symmetric, reduction, weights)
    errs = _errors(run(fn, user, item, tau, lq, ids, symmetric, reduction, weights), ref)
    allowed = dict.fromkeys(errs, tol)
    if plus_torch_error:
        base = _errors(run(contrastive_loss_naive, user, item, tau, lq, ids, symmetric,
                           reduction, weights), ref)
        allowed = {k: tol + 2 * base[k] for k in errs}
    bad = {k: v for k, v in errs.items() if not v <= allowed[k]}
    assert not bad, f"relative errors over {allowed}: {bad} (all: {errs})"
    return errs
