"""The optimisers of a run and their schedule.

A model's parameters fall in two kinds, each with its own optimiser:
    tables   the EmbeddingTables (ids of users, items, feature values): sparse gradients,
             updated row by row (recsys_ccl/embeddings.py: lazy Adam or row-wise Adagrad), or
             with table_optimizer = "dense" dense gradients in the dense optimiser
    dense    everything else (MLPs, feature encoders' linear maps, a learnt τ): Adam / AdamW
Both follow one learning-rate schedule, a function of the step alone (so a resumed run follows
the same one), and their state is saved as named tensors (safetensors) with a JSON header.
"""

from __future__ import annotations

import math

import torch

from recsys_ccl.config import TrainConfig
from recsys_ccl.distributed import average_gradients
from recsys_ccl.embeddings import table_optimizer
from recsys_ccl.model import TwoTower

__all__ = ["TrainingOptimizer", "scheduled_lr"]


def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total_steps`: constant, or a
    half cosine from lr down to lr · lr_final_ratio at the last step."""
    if cfg.lr_schedule == "constant" or total_steps <= 1:
        return cfg.lr
    progress = min(step / (total_steps - 1), 1.0)
    r = cfg.lr_final_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def _dense_optimizer(cfg: TrainConfig, params: list, table_params: list
                     ) -> torch.optim.Optimizer | None:
    groups = []
    if table_params:  # table_optimizer = "dense": the tables decay, the other weights do not
        groups.append({"params": table_params, "weight_decay": cfg.weight_decay,
                       "lr_scale": cfg.table_lr_scale})
    if params:
        groups.append({"params": params, "weight_decay": 0.0, "lr_scale": 1.0})
    if not groups:
        return None
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one pass over each parameter per step instead of a dozen elementwise kernels
    try:
        return cls(groups, lr=cfg.lr, fused=True)
    except RuntimeError:  # torch < 2.4 fuses Adam on CUDA only: the same update, unfused
        return cls(groups, lr=cfg.lr)


class TrainingOptimizer:
    """The tables' optimiser and the dense weights' optimiser, stepped together."""

    def __init__(self, model: TwoTower, cfg: TrainConfig):
        self.cfg = cfg
        sparse = cfg.table_optimizer != "dense"
        model.tables.sparse = sparse
        tables = [p for p in model.tables.parameters() if p.requires_grad]
        table_ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
        # what average_gradients reduces as dense gradients, and as sparse (row, value) pairs
        self.dense_params = dense + ([] if sparse else tables)
        self.sparse_params = tables if sparse else []
        self.table = None
        if sparse and tables:
            self.table = table_optimizer(cfg.table_optimizer, tables,
                                         lr=cfg.lr * cfg.table_lr_scale,
                                         weight_decay=cfg.weight_decay)
            for g in self.table.param_groups:
                g["lr_scale"] = cfg.table_lr_scale
        self.dense = _dense_optimizer(cfg, dense, [] if sparse else tables)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: o for name, o in (("table", self.table), ("dense", self.dense))
                if o is not None}

    def average_gradients(self) -> None:
        """Every gradient averaged over the ranks of a torchrun job (a no-op in one process)."""
        average_gradients(self.dense_params, self.sparse_params)

    def zero_grad(self) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)

    def step(self, lr: float) -> None:
        """One update of every parameter that has a gradient, at learning rate `lr` (times
        each group's lr_scale)."""
        for o in self.optimizers.values():
            for g in o.param_groups:
                g["lr"] = lr * g["lr_scale"]
            o.step()

    @property
    def lr(self) -> float:
        """The current base learning rate."""
        o = next(iter(self.optimizers.values()))
        return o.param_groups[0]["lr"] / o.param_groups[0]["lr_scale"]

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every optimiser's state as named CPU tensors, and its param groups as JSON."""
        tensors, meta = {}, {}
        for name, o in self.optimizers.items():
            sd = o.state_dict()
            for idx, state in sd["state"].items():
                for key, value in state.items():
                    t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                    tensors[f"{name}.{idx}.{key}"] = t.detach().cpu().contiguous()
            meta[name] = sd["param_groups"]
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what state_tensors saved (KeyError / ValueError when it does not fit)."""
        if set(meta) != set(self.optimizers):
            raise ValueError(f"optimizer state for {sorted(meta)}, this run has "
                             f"{sorted(self.optimizers)}")
        for name, o in self.optimizers.items():
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                owner, idx, field = key.split(".", 2)
                if owner == name:
                    state.setdefault(int(idx), {})[field] = value
            o.load_state_dict({"state": state, "param_groups": meta[name]})
