"""Embedding tables and their row-wise optimisers: a step touches only the rows of its batch.

The sparse updates equal a float64 reference of the same update on the touched rows (to fp32
rounding) and leave every other row, and its optimiser state, bit for bit as it was.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_ccl.config import TrainConfig
from recsys_ccl.embeddings import (
    EmbeddingTables,
    LazyAdam,
    RowWiseAdagrad,
    coalesced_rows,
    pooled_row_gradient,
)

R, E = 53, 7  # odd sizes


def _sparse_grad(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """An uncoalesced sparse gradient (rows may repeat), as F.embedding's backward gives."""
    return torch.sparse_coo_tensor(rows[None], values, (R, E), check_invariants=True)


def _steps(seed: int, n_steps: int = 4):
    """Random sparse gradients over a few steps, each touching a random subset (repeats
    included, one row never touched)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        n = int(torch.randint(1, 40, (), generator=g))
        rows = torch.randint(0, R - 1, (n,), generator=g)  # row R-1 is never touched
        yield rows, torch.randn(n, E, generator=g)


def _lazy_adam_reference(w, grads, lr, b1, b2, eps, wd):
    """Float64 lazy Adam, row by row: the touched rows get Adam with the table's step count;
    the others keep weights and moments."""
    w = w.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, (rows, values) in enumerate(grads, start=1):
        dense = torch.zeros_like(w).index_add_(0, rows, values.double())
        touched = torch.zeros(R, dtype=torch.bool)
        touched[rows] = True
        g = dense + wd * w
        m_new = b1 * m + (1 - b1) * g
        v_new = b2 * v + (1 - b2) * g * g
        step = lr * (m_new / (1 - b1 ** t)) / ((v_new / (1 - b2 ** t)).sqrt() + eps)
        w = torch.where(touched[:, None], w - step, w)
        m = torch.where(touched[:, None], m_new, m)
        v = torch.where(touched[:, None], v_new, v)
    return w, m, v


def _rowwise_adagrad_reference(w, grads, lr, eps, wd):
    w = w.double().clone()
    s = torch.zeros(R, dtype=torch.float64)
    for rows, values in grads:
        dense = torch.zeros_like(w).index_add_(0, rows, values.double())
        touched = torch.zeros(R, dtype=torch.bool)
        touched[rows] = True
        g = dense + wd * w
        s_new = s + (g * g).mean(1)
        w = torch.where(touched[:, None], w - lr * g / (s_new.sqrt()[:, None] + eps), w)
        s = torch.where(touched, s_new, s)
    return w, s


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("seed", [0, 1])
def test_lazy_adam_equals_the_reference_and_leaves_untouched_rows_alone(seed, wd):
    w0 = torch.randn(R, E, generator=torch.Generator().manual_seed(seed + 100))
    p = torch.nn.Parameter(w0.clone())
    opt = LazyAdam([p], lr=0.01, weight_decay=wd)
    grads = list(_steps(seed))
    for rows, values in grads:
        p.grad = _sparse_grad(rows, values)
        opt.step()
    w, m, v = _lazy_adam_reference(w0, grads, 0.01, 0.9, 0.999, 1e-8, wd)
    touched = torch.unique(torch.cat([r for r, _ in grads]))
    state = opt.state[p]
    torch.testing.assert_close(p.detach()[touched].double(), w[touched], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg"][touched].double(), m[touched], rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"][touched].double(), v[touched], rtol=1e-5,
                               atol=1e-9)
    assert torch.equal(p.detach()[R - 1], w0[R - 1])  # bit for bit
    assert not state["exp_avg"][R - 1].any() and not state["exp_avg_sq"][R - 1].any()


def test_lazy_adam_on_a_step_touching_every_row_is_adam():
    """With every row touched, lazy Adam is torch.optim.Adam."""
    w0 = torch.randn(R, E, generator=torch.Generator().manual_seed(3))
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    lazy, adam = LazyAdam([a], lr=0.02), torch.optim.Adam([b], lr=0.02)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        grad = torch.randn(R, E, generator=g)
        a.grad = _sparse_grad(torch.arange(R), grad)
        b.grad = grad.clone()
        lazy.step()
        adam.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_rowwise_adagrad_equals_the_reference_and_leaves_untouched_rows_alone(wd):
    w0 = torch.randn(R, E, generator=torch.Generator().manual_seed(5))
    p = torch.nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=0.05, weight_decay=wd)
    grads = list(_steps(6))
    for rows, values in grads:
        p.grad = _sparse_grad(rows, values)
        opt.step()
    w, s = _rowwise_adagrad_reference(w0, grads, 0.05, 1e-8, wd)
    touched = torch.unique(torch.cat([r for r, _ in grads]))
    torch.testing.assert_close(p.detach()[touched].double(), w[touched], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["sum"].double(), s, rtol=1e-5, atol=1e-9)
    assert torch.equal(p.detach()[R - 1], w0[R - 1]) and opt.state[p]["sum"][R - 1] == 0


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 12), L=st.integers(1, 9), rows=st.integers(1, 30),
       seed=st.integers(0, 10_000))
def test_pooled_row_gradient_equals_embedding_bags(B, L, rows, seed):
    """The coalesced gradient of `pool` equals embedding_bag's dense one on the rows it names,
    names exactly the rows with a nonzero weight, and lists them ascending."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (B, L), generator=g)
    weights = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) < 0.7)
    grad_out = torch.randn(B, E, generator=g)
    table = torch.randn(rows, E, generator=g, dtype=torch.float64, requires_grad=True)
    F.embedding_bag(idx, table, per_sample_weights=weights.double(), mode="sum").backward(
        grad_out.double())
    got_rows, got = pooled_row_gradient(idx, weights, grad_out)
    want_rows = torch.unique(idx[weights != 0])
    assert torch.equal(got_rows, want_rows)
    torch.testing.assert_close(got.double(), table.grad[want_rows], rtol=1e-5, atol=1e-6)


def test_lookups_give_sparse_gradients_naming_only_the_rows_read():
    tables = EmbeddingTables()
    w = tables.add("item", R, E)
    idx = torch.tensor([[3, 5, 5], [40, 0, 3]])
    weights = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    (tables.pool("item", idx, weights).sum() + tables.lookup("item", torch.tensor([7]))
     .sum()).backward()
    assert w.grad.is_sparse
    rows, values = coalesced_rows(w.grad)
    assert rows.tolist() == [3, 5, 7, 40]  # row 0 has weight 0: not touched
    assert torch.allclose(values[:, 0], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_a_training_step_touches_only_the_batchs_rows(tmp_path):
    """One optimiser step of the real model and objective: the user rows outside the batch
    and the item rows outside its positives and histories keep weights and optimiser state
    bit for bit; the touched rows moved."""
    from conftest import synthetic_data_dir

    from recsys_ccl.data.dataset import load_data_dir, train_histories
    from recsys_ccl.objective import batch_loss
    from recsys_ccl.optimization import TrainingOptimizer
    from recsys_ccl.train import new_model

    data = load_data_dir(synthetic_data_dir(tmp_path, 300, 400, 6_000, seed=1))
    cfg = TrainConfig(dim=16, history_len=5, batch_size=64)
    torch.manual_seed(0)
    model = new_model(cfg, data)
    opt = TrainingOptimizer(model, cfg)
    hist = train_histories(data, cfg.history_len)
    users, items = (t[:64] for t in data.splits["train"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = batch_loss(model, cfg, data, hist, users, items, torch.Generator().manual_seed(0))
    opt.zero_grad()
    loss.backward()
    opt.step(cfg.lr)
    read_items = torch.unique(torch.cat([items, hist[users][hist[users] >= 0]]))
    for name, read in (("user", torch.unique(users)), ("item", read_items)):
        w, w0 = model.tables.weight(name).detach(), before[f"tables.{name}"]
        untouched = torch.ones(len(w), dtype=torch.bool)
        untouched[read] = False
        assert untouched.any() and torch.equal(w[untouched], w0[untouched]), name
        assert not torch.equal(w[read], w0[read]), name
        state = opt.table.state[model.tables.weight(name)]
        assert not state["exp_avg"][untouched].any() and not state["exp_avg_sq"][
            untouched].any()
