"""Every embedding table of a model, its lookups and its row-wise optimisers.

A table is an (R, E) matrix of rows indexed by an id: users, items, a feature's vocabulary,
the per-item bias. A training step reads only the rows its batch names, so the lookups here
give sparse gradients (the rows touched and their gradients, never an (R, E) zero-filled
matrix) and the table optimisers update only those rows, their state included: the cost of a
step follows the batch, not the tables.

`EmbeddingTables` is the one module the towers read rows through (`lookup`, `pool`): the seam
where a sharded backend (TorchRec's EmbeddingCollection with its fused row-wise optimiser) can
replace it when tables outgrow one machine, without touching the towers.

Optimisers (all lazy: a row the batch does not touch keeps its weights and its state bit for
bit):
    LazyAdam        Adam on the touched rows, bias-corrected by the table's step count (TF's
                    LazyAdamOptimizer, torch.optim.SparseAdam); weight decay on those rows
    RowWiseAdagrad  one accumulator per row, the mean of its squared gradient (FBGEMM's and
                    TorchRec's ROWWISE_ADAGRAD): a state of R floats instead of Adam's 2·R·E
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# pooled_row_gradient's CSR matrix is built and multiplied once, on the CPU and CUDA alike
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta",
                        category=UserWarning)

__all__ = ["EmbeddingTables", "LazyAdam", "RowWiseAdagrad", "coalesced_rows", "table_optimizer"]


class EmbeddingTables(nn.Module):
    """Named (R, E) tables with sparse-gradient lookups.

    sparse: lookups give sparse gradients (the default for training); False gives dense ones
    (every row's gradient, zeros included), for optimisers that need them."""

    def __init__(self, sparse: bool = True):
        super().__init__()
        self.sparse = sparse

    def add(self, name: str, rows: int, dim: int, init_std: float = 0.1,
            zero_rows: Iterable[int] = ()) -> nn.Parameter:
        """A new table of `rows` x `dim`, rows drawn from N(0, init_std²) (init_std 0: zeros),
        the `zero_rows` (a padding row) set to zero."""
        weight = torch.empty(rows, dim)
        if init_std > 0:
            nn.init.normal_(weight, std=init_std)
        else:
            weight.zero_()
        for r in zero_rows:
            weight[r] = 0
        param = nn.Parameter(weight)
        self.register_parameter(name, param)
        return param

    def weight(self, name: str) -> torch.Tensor:
        """The whole (R, E) table (for reading all of it at once: evaluation, export)."""
        return self._parameters[name]

    def __contains__(self, name: str) -> bool:
        return name in self._parameters

    def lookup(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """idx (...,) int64 -> (..., E) rows."""
        return F.embedding(idx, self._parameters[name], sparse=self.sparse)

    def pool(self, name: str, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_l weights[b, l] · table[idx[b, l]]: idx, weights (B, L) -> (B, E). One
        embedding_bag, without the (B, L, E) rows; entries of weight 0 (padding) touch no
        row. weights get no gradient."""
        weight = self._parameters[name]
        if self.sparse and torch.is_grad_enabled() and weight.requires_grad:
            return _SparsePool.apply(weight, idx, weights.detach())
        return F.embedding_bag(idx, weight, per_sample_weights=weights.detach(), mode="sum")

    def pool_rows(self, rows: torch.Tensor, idx: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """`pool` over a computed (R', E) matrix (rows derived from a table, e.g. items
        combined with their features) rather than a table itself."""
        return F.embedding_bag(idx, rows, per_sample_weights=weights, mode="sum")


def pooled_row_gradient(idx: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The table gradient of `pool` as (rows (n,) ascending and distinct, values (n, E)):
    row r gets Σ over entries (b, l) with idx[b, l] = r of weights[b, l] · grad_out[b].

    One sort of the entries and a sparse (n x B) @ (B, E) product: embedding_bag's own sparse
    backward writes one (E,) row per entry (B·L of them) and leaves the summing to a
    coalesce."""
    B, L = idx.shape
    flat, w = idx.reshape(-1), weights.reshape(-1)
    bag = torch.arange(B, device=idx.device).repeat_interleave(L)
    used = w != 0
    flat, w, bag = flat[used], w[used], bag[used]
    ordered, order = flat.sort()
    rows, counts = torch.unique_consecutive(ordered, return_counts=True)
    crow = torch.zeros(len(rows) + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    per_row = torch.sparse_csr_tensor(crow, bag[order], w[order].to(grad_out.dtype),
                                      size=(len(rows), B), check_invariants=False)
    return rows, per_row @ grad_out  # (n, B) @ (B, E) -> (n, E)


class _SparsePool(torch.autograd.Function):
    """`EmbeddingTables.pool` with its table gradient formed coalesced (pooled_row_gradient)."""

    @staticmethod
    def forward(ctx, weight, idx, weights):  # type: ignore[override]
        ctx.save_for_backward(idx, weights)
        ctx.table_shape = weight.shape
        return F.embedding_bag(idx, weight, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        idx, weights = ctx.saved_tensors
        rows, values = pooled_row_gradient(idx, weights, grad_out.contiguous())
        grad = torch.sparse_coo_tensor(rows[None], values, ctx.table_shape,
                                       is_coalesced=True, check_invariants=False)
        return grad, None, None


def coalesced_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A table's gradient as (rows (n,) int64 ascending and distinct, values (n, E)): a sparse
    gradient coalesced (duplicate rows summed), a dense one as its nonzero rows."""
    if grad.is_sparse:
        g = grad.coalesce()
        return g.indices()[0], g.values()
    rows = grad.abs().sum(1).nonzero().flatten()
    return rows, grad[rows]


class _RowOptimizer(torch.optim.Optimizer):
    """Shared by the lazy optimisers: per-step learning rate in param_groups, state tensors
    as plain tensors (the checkpoint saves them as safetensors)."""

    def _rows(self, p: torch.Tensor, group: dict, decay: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The touched rows and their gradients; with `decay`, L2 weight decay added (lazy:
        on those rows only)."""
        if p.grad is None:
            return None
        rows, g = coalesced_rows(p.grad)
        if len(rows) == 0:
            return None
        if decay and group["weight_decay"]:
            g = g + group["weight_decay"] * p.detach()[rows]
        return rows, g


class LazyAdam(_RowOptimizer):
    """Adam over the rows a gradient touches: for those rows

        m ← β1·m + (1 - β1)·g      v ← β2·v + (1 - β2)·g²
        w ← w - lr · (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + eps)

    with t the table's step count; untouched rows keep w, m and v. Equal to torch.optim.Adam
    on the rows of a step whose gradient touches every row. The touched rows are gathered,
    updated by PyTorch's fused Adam kernel and scattered back (one pass over them instead of
    a dozen elementwise ones)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                touched = self._rows(p, group, decay=False)
                if touched is None:
                    continue
                rows, g = touched
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = (t.index_select(0, rows) for t in (state["exp_avg"],
                                                         state["exp_avg_sq"]))
                wd = group["weight_decay"]
                # without decay the update does not read w: it is formed on zeros and added
                w = p.detach().index_select(0, rows) if wd else torch.zeros_like(m)
                _adam_rows(w, g.contiguous(), m, v, state["step"], group["lr"], b1, b2,
                           group["eps"], wd)
                if wd:
                    p.index_copy_(0, rows, w)
                else:
                    p.index_add_(0, rows, w)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)


def _adam_rows(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
               step: torch.Tensor, lr: float, b1: float, b2: float, eps: float,
               weight_decay: float) -> None:
    """One Adam update of gathered rows, in place (w, m, v: (n, E)); L2 weight decay."""
    if hasattr(torch, "_fused_adam_"):
        try:
            torch._fused_adam_([w], [g], [m], [v], [], [step.to(w.device)], lr=lr, beta1=b1,
                               beta2=b2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                               maximize=False)
            return
        except (RuntimeError, NotImplementedError):  # no fused kernel for this device
            pass
    t = float(step)
    if weight_decay:
        g = g + weight_decay * w
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
    w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class RowWiseAdagrad(_RowOptimizer):
    """Adagrad with one accumulator per row: for each touched row r with gradient g (E,)

        s[r] ← s[r] + mean(g²)        w[r] ← w[r] - lr · g / (sqrt(s[r]) + eps)

    (FBGEMM's ROWWISE_ADAGRAD); untouched rows keep w and s."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                touched = self._rows(p, group)
                if touched is None:
                    continue
                rows, g = touched
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                state["sum"].index_add_(0, rows, g.square().mean(1))
                denom = state["sum"].index_select(0, rows).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, g / denom[:, None], alpha=-group["lr"])


def table_optimizer(kind: str, params: list[nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """'lazy_adam' or 'rowwise_adagrad' over these tables."""
    if kind == "lazy_adam":
        return LazyAdam(params, lr=lr, weight_decay=weight_decay)
    if kind == "rowwise_adagrad":
        return RowWiseAdagrad(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown table optimizer {kind!r}")

