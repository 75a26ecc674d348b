"""contrastive_loss(distributed=True) on 2 gloo processes equals the single-process loss over
the concatenated global batch, and its gradients, averaged as DDP averages, equal the
single-process gradients.

The test launches this file under torchrun (2 processes); each rank computes its share of every
case and writes loss and gradients to safetensors; the test then computes the single-process
values on the global batch in float64 and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (name, per-rank batch sizes, per-rank extra negatives, logQ, item ids, symmetric, impl, dtype)
CASES = [
    ("plain", (6, 6), (0, 0), False, False, False, "torch", torch.float64),
    ("logq_ids_extras", (7, 7), (3, 3), True, True, False, "torch", torch.float64),
    ("symmetric", (5, 5), (2, 2), True, True, True, "torch", torch.float64),
    ("uneven", (7, 3), (4, 1), True, True, True, "torch", torch.float64),
    ("naive", (5, 4), (2, 0), True, True, True, "naive", torch.float64),
    ("triton", (5, 4), (2, 1), True, True, True, "triton", torch.float32),
]
D = 11
TEMPERATURE = 0.3


def global_batch(case: tuple) -> dict[str, torch.Tensor]:
    """The concatenated batch of every rank (positives in rank order, then extras in rank
    order), drawn from a seed that every process shares. Item ids repeat, across ranks too."""
    name, pos, extra, *_ , dtype = case
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    bg, eg = sum(pos), sum(extra)
    return {
        "user": torch.randn(bg, D, generator=g, dtype=torch.float64).to(dtype),
        "item": torch.randn(bg + eg, D, generator=g, dtype=torch.float64).to(dtype),
        "log_q": -torch.rand(bg + eg, generator=g, dtype=torch.float64).to(dtype) * 5,
        "ids": torch.randint(0, max(3, (bg + eg) // 2), (bg + eg,), generator=g),
    }


def local_rows(case: tuple, rank: int) -> tuple[slice, slice]:
    """This rank's rows of the global users/positives and of the global extras."""
    _, pos, extra, *_ = case
    p0, e0 = sum(pos[:rank]), sum(pos) + sum(extra[:rank])
    return slice(p0, p0 + pos[rank]), slice(e0, e0 + extra[rank])


def _loss(case, user, item, log_q, ids, temperature, distributed):
    from recsys_ccl.losses import contrastive_loss

    _, _, _, use_q, use_ids, symmetric, impl, _ = case
    return contrastive_loss(user, item, temperature, log_q if use_q else None,
                            ids if use_ids else None, symmetric=symmetric, impl=impl,
                            distributed=distributed)


def _rank_main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in CASES:
        full = global_batch(case)
        own, extras = local_rows(case, rank)
        user = full["user"][own].clone().requires_grad_()
        item = torch.cat([full["item"][own], full["item"][extras]]).clone().requires_grad_()
        log_q = torch.cat([full["log_q"][own], full["log_q"][extras]])
        ids = torch.cat([full["ids"][own], full["ids"][extras]])
        temperature = torch.tensor(TEMPERATURE, dtype=user.dtype, requires_grad=True)
        loss = _loss(case, user, item, log_q, ids, temperature, distributed=True)
        loss.backward()
        save_file({"loss": loss.detach().reshape(1), "user_grad": user.grad,
                   "item_grad": item.grad, "temperature_grad": temperature.grad.reshape(1)},
                  out / f"{case[0]}_{rank}.safetensors")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "0", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", "127.0.0.1:0", __file__, str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_global_loss_and_ddp_averaged_gradients_equal_single_process(rank_outputs, case):
    from safetensors.torch import load_file

    full = global_batch(case)
    # the single-process reference in float64 (the naive path: materialised logits)
    user = full["user"].double().requires_grad_()
    item = full["item"].double().requires_grad_()
    temperature = torch.tensor(TEMPERATURE, dtype=torch.float64, requires_grad=True)
    ref_case = (*case[:6], "naive", torch.float64)
    ref = _loss(ref_case, user, item, full["log_q"].double(), full["ids"], temperature, False)
    ref.backward()
    tol = 1e-5 if case[-1] == torch.float64 else 2e-5
    t_grads = []
    for rank in range(2):
        got = load_file(rank_outputs / f"{case[0]}_{rank}.safetensors")
        own, extras = local_rows(case, rank)
        assert _rel(got["loss"][0], ref.detach()) <= tol, "each rank returns the global loss"
        # DDP averages gradients over the 2 ranks
        assert _rel(got["user_grad"] / 2, user.grad[own]) <= tol
        want_item = torch.cat([item.grad[own], item.grad[extras]])
        assert _rel(got["item_grad"] / 2, want_item) <= tol
        t_grads.append(got["temperature_grad"][0])
    assert _rel(sum(t_grads) / 2, temperature.grad) <= tol


def test_the_reference_can_fail():
    """A loss over this rank's items only (what distributed=False gives) differs from the
    global one: the comparison above is not vacuous."""
    case = CASES[1]
    full = global_batch(case)
    own, extras = local_rows(case, 0)
    local = _loss(case, full["user"][own], torch.cat([full["item"][own], full["item"][extras]]),
                  torch.cat([full["log_q"][own], full["log_q"][extras]]),
                  torch.cat([full["ids"][own], full["ids"][extras]]), TEMPERATURE, False)
    glob = _loss(case, full["user"], full["item"], full["log_q"], full["ids"], TEMPERATURE, False)
    assert _rel(local, glob) > 1e-3


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
