"""The PyTorch paths of contrastive_loss against the float64 reference, and the other losses
against their formulas."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings
from loss_reference import assert_close_to_reference, make_batch

from recsys_ccl import (
    bpr_loss,
    contrastive_loss,
    cosine_contrastive_loss,
    margin_contrastive_loss,
)
from recsys_ccl.contrastive_torch import (
    MAX_SHIFT_GAP,
    accidental_hit_pairs,
    contrastive_loss_chunked,
    contrastive_loss_naive,
    row_shift_bounds,
)

SHAPES = [(37, 37, 16), (37, 101, 48), (37, 101, 123), (1, 1, 8), (64, 65, 3)]


def chunked(chunk_rows):
    return lambda *a: contrastive_loss_chunked(*a, chunk_rows=chunk_rows)


@pytest.mark.parametrize(("B", "N", "D"), SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("log_q", "dup_ids"), [(False, False), (True, False), (True, True)])
def test_chunked_matches_float64_reference(B, N, D, reduction, symmetric, log_q, dup_ids):
    user, item, lq, ids = make_batch(B, N, D, log_q=log_q, dup_ids=dup_ids, seed=B * N + D)
    assert_close_to_reference(chunked(7), user, item, 0.07, lq, ids, symmetric, reduction,
                              tol=2e-5)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_public_function_dispatch(impl):
    user, item, lq, ids = make_batch(37, 101, 48, log_q=True, dup_ids=True)
    fn = lambda u, v, t, q, i, s, r: contrastive_loss(u, v, t, q, i, s, r, impl=impl)
    assert_close_to_reference(fn, user, item, 0.1, lq, ids, True, "mean", tol=2e-5)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 40), extra=st.integers(0, 40), D=st.integers(2, 70),
       chunk=st.integers(1, 50), symmetric=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 10_000))
# one row whose dL/dτ cancels within the row (measured against its terms' magnitudes)
@example(B=1, extra=17, D=2, chunk=1, symmetric=False, reduction="none", seed=17)
def test_chunked_any_shape(B, extra, D, chunk, symmetric, reduction, seed):
    user, item, lq, ids = make_batch(B, B + extra, D, log_q=True, dup_ids=True, seed=seed)
    assert_close_to_reference(chunked(chunk), user, item, 0.2, lq, ids, symmetric, reduction,
                              tol=2e-5, plus_torch_error=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_loose_bound_takes_the_exact_max(symmetric):
    """Towers of very different norms: the Cauchy-Schwarz bound is far above some rows' logits
    (those blocks must take the exact row max) and close for others; both kinds in one call."""
    B, N, D, chunk = 48, 90, 24, 8
    user, item, lq, ids = make_batch(B, N, D, log_q=True, dup_ids=True, seed=11)
    g = torch.Generator().manual_seed(12)
    user = user * torch.where(torch.arange(B) < B // 2, 0.05, 1.0)[:, None]
    item = item * (0.5 + 2.5 * torch.rand(N, 1, generator=g))
    _, gap = row_shift_bounds(user, item, 1 / 0.05, -lq[None, :])
    per_block = gap.view(-1, chunk).amax(1)
    assert (per_block <= MAX_SHIFT_GAP).any() and (per_block > MAX_SHIFT_GAP).any()
    assert_close_to_reference(chunked(chunk), user, item, 0.05, lq, ids, symmetric, "none",
                              tol=2e-5)


def test_dominant_positive_keeps_its_precision():
    """Rows whose positive outweighs the rest by e^15 have losses near 1e-6: each must still be
    right to a relative 1e-4 (log(1 + 1e-6) in fp32 is not; log1p of the off-diagonal share is)."""
    B, N, D = 40, 101, 32
    user, item, _, _ = make_batch(B, N, D, seed=3)
    item[:B] = user  # cosine 1 for the positive, about ±0.2 for the rest
    ref = contrastive_loss_naive(user.double(), item.double(), 0.05, reduction="none")
    got = contrastive_loss_chunked(user, item, 0.05, reduction="none", chunk_rows=16).double()
    assert float(ref.max()) < 1e-3
    assert float(((got - ref).abs() / ref).max()) < 1e-4


def test_worker_threads_agree_and_keep_the_callers_modes():
    """Blocks run on CPU worker threads: the result matches a single worker, the caller's
    inference mode holds in them (or the in-place writes would fail) and its thread count is
    left as it was."""
    user, item, lq, ids = make_batch(96, 150, 16, log_q=True, dup_ids=True, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            two = contrastive_loss_chunked(user, item, 0.1, lq, ids, reduction="none",
                                           chunk_rows=16)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        one = contrastive_loss_chunked(user, item, 0.1, lq, ids, reduction="none", chunk_rows=16)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_every_negative_masked_gives_zero(impl):
    """All items share one id: only the positive is left, so loss and gradients are 0."""
    user, item, _, _ = make_batch(9, 20, 16)
    ids = torch.full((20,), 5)
    u, v = user.clone().requires_grad_(), item.clone().requires_grad_()
    loss = contrastive_loss(u, v, 0.1, item_ids=ids, reduction="none", impl=impl)
    assert torch.equal(loss, torch.zeros(9))
    loss.sum().backward()
    assert torch.count_nonzero(u.grad) == 0 and torch.count_nonzero(v.grad) == 0


def test_accidental_hit_pairs():
    ids = torch.tensor([3, 1, 3, 2, 1, 3])
    rows, cols = accidental_hit_pairs(ids, num_rows=3)
    got = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == [(0, 2), (0, 5), (1, 4), (2, 0), (2, 5)]
    assert rows.tolist() == sorted(rows.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"reduction": "avg"}, "reduction must be"),
        ({"impl": "cuda"}, "impl must be"),
        ({"item_log_q": torch.zeros(3)}, r"item_log_q must have shape \(12,\)"),
        ({"item_ids": torch.zeros(12)}, "item_ids must be an integer tensor"),
    ],
)
def test_bad_arguments(kwargs, message):
    user, item, _, _ = make_batch(5, 12, 8)
    with pytest.raises(ValueError, match=message):
        contrastive_loss(user, item, **kwargs)


@pytest.mark.parametrize("impl", ["torch", "naive", "auto"])
@pytest.mark.parametrize("where", ["user", "item"])
def test_non_finite_inputs_are_refused(impl, where):
    """Value checks are opt-in (they read device values back: a host sync per step)."""
    user, item, _, _ = make_batch(5, 12, 8)
    (user if where == "user" else item)[2, 3] = float("nan" if where == "user" else "inf")
    with pytest.raises(ValueError, match=f"{where}_emb contains NaN or infinite"):
        contrastive_loss(user, item, impl=impl, check_inputs=True)
    assert not torch.isfinite(contrastive_loss(user, item, impl=impl))


def test_tensor_temperature_is_checked_on_request():
    user, item, _, _ = make_batch(5, 12, 8)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        contrastive_loss(user, item, torch.tensor(-1.0), check_inputs=True)


def test_shape_errors():
    with pytest.raises(ValueError, match="N >= B"):
        contrastive_loss(torch.randn(5, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="embedding sizes differ"):
        contrastive_loss(torch.randn(5, 4), torch.randn(5, 3))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    user, item, _, _ = make_batch(5, 12, 8)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        contrastive_loss(user, item, impl="triton")


def test_learnable_temperature_descends():
    """A gradient step on a tensor temperature lowers the loss."""
    user, item, _, _ = make_batch(30, 60, 16)
    t = torch.tensor(1.0, requires_grad=True)
    loss = contrastive_loss(user, item, t)
    loss.backward()
    with torch.no_grad():
        t2 = (t - 0.05 * t.grad).detach()
    assert contrastive_loss(user, item, t2) < loss


# -- the other losses, against their formulas written out per element --

def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_cosine_contrastive_loss_formula():
    user, item, _, ids = make_batch(6, 10, 5, dup_ids=True, seed=3)
    m, w = 0.2, 3.0
    got = cosine_contrastive_loss(user, item, margin=m, negative_weight=w, item_ids=ids,
                                  reduction="none")
    for i in range(6):
        negs = [j for j in range(10) if j != i and ids[j] != ids[i]]
        hinge = sum(max(0.0, _cos(user[i], item[j]) - m) for j in negs)
        want = (1 - _cos(user[i], item[i])) + (w / len(negs) * hinge if negs else 0.0)
        assert math.isclose(float(got[i]), want, rel_tol=1e-5, abs_tol=1e-6)


def test_margin_contrastive_loss_formula():
    user, item, _, _ = make_batch(6, 9, 5, seed=4)
    got = margin_contrastive_loss(user, item, positive_margin=0.1, negative_margin=0.8,
                                  reduction="none")
    for i in range(6):
        d = lambda j, i=i: 1 - _cos(user[i], item[j])
        negs = [j for j in range(9) if j != i]
        want = max(0.0, d(i) - 0.1) + sum(max(0.0, 0.8 - d(j)) for j in negs) / len(negs)
        assert math.isclose(float(got[i]), want, rel_tol=1e-5, abs_tol=1e-6)


def test_bpr_loss_formula_and_gradient():
    user, item, _, ids = make_batch(5, 8, 4, dup_ids=True, seed=5)
    u = user.clone().requires_grad_()
    got = bpr_loss(u, item, item_ids=ids, reduction="none")
    for i in range(5):
        negs = [j for j in range(8) if j != i and ids[j] != ids[i]]
        s = lambda j, i=i: float(user[i] @ item[j])
        want = (sum(math.log1p(math.exp(-(s(i) - s(j)))) for j in negs) / len(negs)
                if negs else 0.0)
        assert math.isclose(float(got[i]), want, rel_tol=1e-5, abs_tol=1e-6)
    got.sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
