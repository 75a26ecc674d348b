"""`recsys-ccl train`: fit a TwoTower model on a DATA directory; write a RUN directory.

    train()                 the run: configuration and data checked, the RUN directory opened
                            (recsys_ccl/checkpoint.py), the model and optimisers built
                            (recsys_ccl/optimization.py), a checkpoint restored, then epochs
    _Trainer.run_epoch      one epoch of batches (its remainder after a resume; up to
                            --max-steps), the batch objective from recsys_ccl/objective.py
    _Trainer.validate       full-ranking metrics on the validation split (a seeded sample of
                            users on large splits)
    _Trainer.end_of_epoch   the metrics line, the checkpoint and the best model
    _Trainer.should_stop    early stopping

Determinism: each epoch's shuffle and extra negatives come from a generator seeded by (seed,
epoch), and a checkpoint restores weights, optimiser state, the global RNG and, for a stop
within an epoch, that generator's state; so a resumed run ends with the same weights as an
uninterrupted one (same machine and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recsys_ccl.checkpoint import (
    check_run,
    create_run,
    decode_rng,
    encode_rng,
    load_checkpoint,
    run_config,
    save_checkpoint,
)
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import (
    Histories,
    InteractionData,
    histories_before,
    item_histories,
    load_data_dir,
    train_histories,
)
from recsys_ccl.distributed import barrier, broadcast_json, rank_and_world
from recsys_ccl.errors import RecsysError
from recsys_ccl.evaluation import evaluate_model
from recsys_ccl.fileio import atomic_file, write_json_atomic
from recsys_ccl.model import TwoTower
from recsys_ccl.objective import batch_loss, sequence_batch_loss
from recsys_ccl.optimization import TrainingOptimizer, scheduled_lr
from recsys_ccl.progress import Progress

__all__ = ["RunState", "new_model", "resolve_device", "scheduled_lr", "train"]


def new_model(cfg: TrainConfig, data: InteractionData) -> TwoTower:
    """A fresh model for `data`: with its feature tables (unless cfg.features is "none")
    loaded as the catalogue's encoded rows, and which items and users are cold."""
    from recsys_ccl.features import model_features

    sides = ("item", "user")
    rows = {side: data.feature_rows(side) if cfg.features != "none" else None
            for side in sides}
    conf = {side: model_features(data.features[side][0], rows[side])
            if rows[side] is not None else None for side in sides}
    model = TwoTower(cfg.model_config(data.num_users, data.num_items, conf["item"],
                                      conf["user"]))
    if model.config.has_features:
        model.set_catalogue(rows["item"], rows["user"], *data.cold_masks())
    if cfg.item_history_len > 0:
        model.set_item_histories(item_histories(data, cfg.item_history_len))
    return model


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`. Under torchrun
    with CUDA each rank takes GPU LOCAL_RANK (`init_from_env` made it the current one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise RecsysError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N"
                          ) from exc
    if dev.type not in ("cpu", "cuda"):
        raise RecsysError(f"unsupported device {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecsysError(f"device {name!r} asked for, but this torch build sees no CUDA "
                              f"GPU (torch {torch.__version__}); use --device cpu")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RecsysError(f"device {name!r} asked for, but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
        dev = torch.device("cuda", index)
    return dev


@dataclass
class RunState:
    """Where a run stands: what a checkpoint's state.json holds besides tensors and RNGs."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    epoch_batches: int = 0  # batches done in the epoch in progress (a stop within an epoch)
    epoch_loss: float = 0.0  # their summed loss
    epoch_seconds: float = 0.0
    epoch_rng: str | None = None  # the epoch's sampling generator after those batches
    # the best validation so far (epoch and step it was reached at, its metric and metrics)
    best: dict = field(default_factory=lambda: {"epoch": None, "step": None, "metric": None,
                                                "metrics": None})
    world_size: int = 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _Trainer:
    """One run's model, optimisers, data and state, and the steps of its loop.

    An epoch is a list of global batches (one step of every rank together), each split
    between the ranks: for the pooled tower, batch_size (user, item) pairs in a seeded
    permutation; for the transformer, users in a seeded permutation packed until their
    windows hold batch_size positions (the queries of a step)."""

    def __init__(self, run: Path, cfg: TrainConfig, data: InteractionData, model: TwoTower,
                 opt: TrainingOptimizer, state: RunState, progress: bool,
                 max_steps: int | None):
        self.run, self.cfg, self.data, self.model, self.opt = run, cfg, data, model, opt
        self.state = state
        self.rank, self.world = rank_and_world()
        self.lead = self.rank == 0  # writes the run directory; every rank reads it
        self.progress = progress and self.lead
        self.max_steps = max_steps
        self.users, self.items = data.splits["train"]
        self.window = cfg.batch_size * self.world  # one step of every rank together
        self.sequential = cfg.user_tower == "transformer"
        self.histories = None if self.sequential else train_histories(data, cfg.history_len)
        self.eval_histories = None  # built at the first validation
        if self.sequential:
            # each user's most recent max_len + 1 training items: max_len queries at most
            self.sequences = Histories.from_pairs(self.users, self.items, data.num_users,
                                                  cfg.max_len + 1)
            counts = self.sequences.indptr[1:] - self.sequences.indptr[:-1]
            self.positions = (counts.clamp(max=cfg.max_len + 1) - 1).clamp_min(0)  # (U,)
            self.units, self.unit = int(self.positions.sum()), "positions"
        else:
            self.units, self.unit = len(self.users), "interactions"
        self.total_steps = cfg.epochs * len(self._epoch_batches(0)[0])
        self.key = f"ndcg@{cfg.eval_k}"

    # -- one epoch --

    def _epoch_batches(self, epoch: int) -> tuple[list[torch.Tensor], torch.Generator]:
        """The epoch's global batches (indices of pairs, or of users for the transformer; the
        same on every rank) and the generator this rank draws extra negatives and
        augmentations from."""
        cfg, world = self.cfg, self.world
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        if self.sequential:
            batches = self._sequence_batches(gen)
        else:
            n = len(self.users)
            perm = torch.randperm(n, generator=gen)
            batches = [perm[s:s + self.window] for s in range(0, n, self.window)
                       if n - s >= 2 * world]
        if world > 1:
            gen = torch.Generator().manual_seed(
                (cfg.seed * 1_000_003 + epoch) * 1_009 + self.rank)
        return batches, gen

    def _sequence_batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        """Users in a seeded permutation, cut into runs of about 32 batches' worth of
        positions; within a run sorted by length (so a batch's windows are of similar length:
        little padding to compute) and packed into batches of batch_size positions (a user's
        batch: where the last of its positions falls in the run's running count); the
        batches of all runs then in a seeded order."""
        active = torch.nonzero(self.positions > 0).flatten()
        order = active[torch.randperm(len(active), generator=gen)]
        run_of = (torch.cumsum(self.positions[order], 0) - 1) // (32 * self.window)
        runs = order.split(torch.unique_consecutive(run_of, return_counts=True)[1].tolist())
        batches = []
        for run in runs:
            run = run[torch.argsort(self.positions[run], stable=True)]
            batch_of = (torch.cumsum(self.positions[run], 0) - 1) // self.window
            sizes = torch.unique_consecutive(batch_of, return_counts=True)[1].tolist()
            batches += [b for b in run.split(sizes) if len(b) >= 2 * self.world]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def _units(self, batch: torch.Tensor) -> int:
        return int(self.positions[batch].sum()) if self.sequential else len(batch)

    def _loss(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """This rank's share of a global batch, through the tower's objective (under bf16
        autocast when configured)."""
        if self.world > 1:
            batch = torch.tensor_split(batch, self.world)[self.rank]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16"):
            if self.sequential:
                return sequence_batch_loss(self.model, self.cfg, self.data, self.sequences,
                                           batch, gen)
            return batch_loss(self.model, self.cfg, self.data, self.histories,
                              self.users[batch], self.items[batch], gen)

    def run_epoch(self, epoch: int) -> tuple[dict, bool]:
        """Train epoch `epoch` (0-based) from where the state says it stands; returns its
        metrics record (before validation) and whether it ran to its end."""
        cfg, st = self.cfg, self.state
        batches, gen = self._epoch_batches(epoch)
        first = st.epoch_batches  # batches of this epoch done before a resume
        if first and st.epoch_rng is not None:
            gen.set_state(decode_rng(st.epoch_rng))
        # the loss summed on the device: read back (a sync on a GPU) only when a line is drawn
        acc = {"loss": torch.full((), st.epoch_loss, dtype=torch.float64,
                                  device=self.model.device), "batches": first}

        def mean_loss() -> float:
            return float(acc["loss"]) / max(acc["batches"], 1)

        done_before = sum(self._units(b) for b in batches[:first])
        done = done_before
        self.model.train()
        t0 = time.perf_counter()
        with Progress(f"train epoch {epoch + 1}/{cfg.epochs}", self.units, self.unit,
                      enabled=self.progress, initial=done_before) as bar:
            for batch in batches[first:]:
                if self.max_steps is not None and st.step >= self.max_steps:
                    break
                loss = self._loss(batch, gen)
                self.opt.zero_grad()
                loss.backward()
                self.opt.average_gradients()
                self.opt.step(scheduled_lr(cfg, st.step, self.total_steps))
                st.step += 1
                acc["batches"] += 1
                acc["loss"] += loss.detach()
                units = self._units(batch)
                done += units
                bar.update(units, loss=mean_loss)
        seconds = st.epoch_seconds + time.perf_counter() - t0
        batches_done = acc["batches"]
        complete = batches_done == len(batches)
        epoch_loss = mean_loss()
        st.epoch_batches = 0 if complete else batches_done
        st.epoch_loss = 0.0 if complete else float(acc["loss"])
        st.epoch_seconds = 0.0 if complete else seconds
        st.epoch_rng = None if complete else encode_rng(gen.get_state())
        rate = done / seconds if seconds > 0 else 0.0
        record = {"epoch": epoch + 1, "step": st.step, "loss": epoch_loss, "seconds": seconds,
                  "interactions_per_s": rate,
                  "temperature": float(self.model.temperature.detach()), "lr": self.opt.lr}
        if self.sequential:
            record["positions_per_s"] = rate  # each position is one predicted interaction
        if not complete:
            record["partial"] = True
        return record, complete

    # -- validation, checkpoint, stopping --

    def validate(self) -> dict:
        """The validation split's metrics (every rank gets the lead's figures, so all stop
        together)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.eval_histories is None and cfg.sequence_length > 0:
            self.eval_histories = histories_before(self.data, cfg.eval_split,
                                                   cfg.sequence_length)
        metrics = evaluate_model(self.model, self.data, self.eval_histories, cfg.eval_split,
                                 cfg.eval_k, sample_users=cfg.eval_sample_users,
                                 seed=cfg.seed, progress=self.progress,
                                 stage=f"validate ({cfg.eval_split})") if self.lead else None
        metrics = broadcast_json(metrics)
        metrics["seconds"] = time.perf_counter() - t0
        return metrics

    def end_of_epoch(self, record: dict, epoch: int) -> None:
        """Validate, write the metrics line and the checkpoint (with the best weights when
        they are)."""
        cfg, st = self.cfg, self.state
        best = False
        if cfg.eval_split != "none":
            metrics = self.validate()
            record["validation_seconds"] = metrics.pop("seconds")
            record.update({f"{cfg.eval_split}/{k}": v for k, v in metrics.items()})
            if st.best["metric"] is None or metrics[self.key] > st.best["metric"]:
                st.best = {"epoch": epoch + 1, "step": st.step, "metric": metrics[self.key],
                           "metrics": metrics}
                best = True
        else:
            st.best = {"epoch": epoch + 1, "step": st.step, "metric": None, "metrics": None}
            best = True
        if record.get("partial"):
            st.epoch = epoch
        else:
            st.epoch = epoch + 1
        if self.lead:
            # the metrics line first, durably: a kill before the checkpoint re-runs the epoch
            # (the resume drops lines past the checkpoint), a kill after it loses nothing
            _append_metrics(self.run / "metrics.jsonl", record)
            save_checkpoint(self.run, self.model, self.opt,
                            {**st.to_json(), "config": cfg.to_dict()}, best=best)
        barrier()  # the checkpoint is complete before any rank goes on (or stops)
        if self.progress:
            shown = " ".join(f"{k}={v:.4f}" for k, v in record.items()
                             if isinstance(v, float) and k not in ("seconds",
                                                                   "validation_seconds"))
            print(f"epoch {epoch + 1}{' (partial)' if record.get('partial') else ''}: "
                  f"{shown}", file=sys.stderr, flush=True)

    def should_stop(self, epoch: int) -> bool:
        """Early stopping: no better validation metric for `patience` epochs."""
        cfg, best = self.cfg, self.state.best
        stop = (cfg.eval_split != "none" and cfg.patience > 0 and best["epoch"] is not None
                and epoch + 1 - best["epoch"] >= cfg.patience)
        if stop and self.progress:
            print(f"early stop: no better {self.key} for {cfg.patience} epochs",
                  file=sys.stderr, flush=True)
        return stop


def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, *,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          device: str | torch.device = "cpu", stop_after: int | None = None,
          max_steps: int | None = None) -> dict:
    """Train; return a summary: epochs and steps run, best epoch and metrics,
    interactions/s.

    stop_after: run only the first this many epochs of the configured ones (the learning
    rate follows the schedule of all cfg.epochs): a refit on more data for the number of
    epochs a validation run selected, with the same schedule.
    max_steps: stop once this many optimiser steps have been taken in all (within an epoch if
    need be), with a checkpoint and a metrics line; a later --resume continues from there.
    device: where the model and the loss compute (see `resolve_device`); the data, the
    shuffles and negative sampling stay on the CPU, so a seed draws the same batches on any
    device. Weights, checkpoints and metrics are written from CPU copies."""
    cfg.validate()
    if stop_after is not None and stop_after < 1:
        raise RecsysError(f"stop_after={stop_after}: expected at least 1 epoch")
    if max_steps is not None and max_steps < 1:
        raise RecsysError(f"--max-steps must be >= 1, got {max_steps}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if cfg.autocast == "bf16" and dev.type != "cuda":
        raise RecsysError(f"autocast = 'bf16' needs a CUDA device (training runs on {dev}); "
                          f"use --device cuda or autocast = 'none'")
    run = Path(run_dir)
    data = load_data_dir(data_dir)
    if cfg.eval_split != "none" and len(data.splits[cfg.eval_split][0]) == 0:
        print(f"note: the {cfg.eval_split} split is empty: no validation, no early stopping",
              file=sys.stderr)
        cfg = dataclasses.replace(cfg, eval_split="none")
    rank, world = rank_and_world()
    lead = rank == 0
    replace = check_run(run, resume=resume, overwrite=overwrite)  # every rank, nothing written
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, data).to(dev)  # before the run directory: a bad config writes nothing
    opt = TrainingOptimizer(model, cfg)
    barrier()  # every rank has looked before the lead writes
    if lead and not resume:
        create_run(run, replace)
    state = RunState(world_size=world)
    if resume:
        saved = load_checkpoint(run, model, opt, cfg)
        state = RunState.from_json(saved)
        if state.world_size != world and lead:
            print(f"note: the checkpoint was written by {state.world_size} process(es), this "
                  f"run has {world}: it continues, but not bit for bit as the original would "
                  f"have", file=sys.stderr)
        state.world_size = world
        if lead:
            _truncate_metrics(run / "metrics.jsonl", state.step)
    elif lead:
        (run / "metrics.jsonl").unlink(missing_ok=True)
    if lead:
        write_json_atomic(run / "config.json", run_config(model, cfg, data))
    barrier()

    trainer = _Trainer(run, cfg, data, model, opt, state, progress, max_steps)
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    rate, epochs_run = 0.0, 0
    for epoch in range(state.epoch, last_epoch):
        if max_steps is not None and state.step >= max_steps:
            break
        record, complete = trainer.run_epoch(epoch)
        trainer.end_of_epoch(record, epoch)
        rate = record["interactions_per_s"]
        epochs_run += 1
        if not complete or trainer.should_stop(epoch):
            break
    return {"epochs": state.epoch, "epochs_run": epochs_run, "steps": state.step,
            "best_epoch": state.best["epoch"], "best": state.best["metrics"],
            "interactions_per_s": rate, "run": str(run), "device": str(dev)}


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of the steps the checkpoint holds; drop later ones (their epochs
    run again) and a line torn by a kill mid-write."""
    if not path.exists():
        return
    lines = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                lines.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with atomic_file(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))

