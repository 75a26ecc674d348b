"""contrastive_loss inside torch.compile(fullgraph=True): a registered operator with a
registered backward, so the step compiles as one graph and matches eager values and
gradients (CPU here: the chunked path; on a GPU the same operator runs the fused kernel)."""

from __future__ import annotations

import pytest
import torch
from loss_reference import make_batch, rel_err

from recsys_ccl import contrastive_loss

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("symmetric", "reduction"), [(False, "mean"), (True, "sum"),
                                                      (True, "none")])
@pytest.mark.parametrize("impl", ["torch", "triton"])  # triton: the interpreter, on CPU
def test_a_compiled_training_step_keeps_the_loss_in_one_graph(symmetric, reduction, impl):
    torch._dynamo.reset()
    user, item, lq, ids = make_batch(37, 83, 24, log_q=True, dup_ids=True, seed=4)
    tower = torch.nn.Linear(24, 24)

    def step(u, v, tau):
        loss = contrastive_loss(tower(u), v, tau, lq, ids, symmetric=symmetric,
                                reduction=reduction, impl=impl, precision="ieee")
        return loss if reduction != "none" else loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        tower.zero_grad()
        u, v = user.clone().requires_grad_(), item.clone().requires_grad_()
        tau = torch.tensor(0.1, requires_grad=True)
        loss = fn(u, v, tau)
        loss.backward()
        grads.append((loss.detach(), u.grad, v.grad, tau.grad, tower.weight.grad.clone()))
    for eager, comp in zip(*grads, strict=True):
        assert rel_err(comp, eager) < 1e-5


def test_the_operators_are_registered_and_pass_their_checks():
    user, item, lq, ids = make_batch(19, 40, 16, log_q=True, dup_ids=True, seed=2)
    tau = torch.tensor(0.2)
    args = (user.requires_grad_(), item.requires_grad_(), tau.requires_grad_(), lq, ids, True,
            "torch", "mean", None)
    from recsys_ccl.contrastive_op import contrastive_rows  # registers the operators

    torch.library.opcheck(contrastive_rows, args)
