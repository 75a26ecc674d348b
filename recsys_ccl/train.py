"""`recsys-ccl train`: fit a TwoTower model on a DATA directory; write a RUN directory.

The RUN directory and its checkpoints: recsys_ccl/checkpoint.py; the configuration:
recsys_ccl/config.py; the batch objective: recsys_ccl/objective.py.

Determinism: each epoch's shuffle and extra negatives come from a generator seeded by
(seed, epoch), and the checkpoint restores weights, optimiser and the global RNG, so a resumed
run ends with the same weights as an uninterrupted one (same machine and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from recsys_ccl.checkpoint import (
    load_checkpoint,
    run_config,
    save_checkpoint,
    save_model,
)
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import (
    InteractionData,
    item_histories,
    load_data_dir,
    train_histories,
)
from recsys_ccl.distributed import barrier, broadcast_json, rank_and_world
from recsys_ccl.errors import RecsysError
from recsys_ccl.evaluation import evaluate_model
from recsys_ccl.fileio import (
    atomic_file,
    check_replaceable,
    write_json_atomic,
)
from recsys_ccl.model import TwoTower
from recsys_ccl.objective import BatchLoss

__all__ = ["new_model", "resolve_device", "scheduled_lr", "train"]


# -- the loop --

def _make_optimizer(model: TwoTower, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    embeddings = [p for n, p in model.named_parameters() if "embedding" in n]
    others = [p for n, p in model.named_parameters() if "embedding" not in n]
    groups = [{"params": embeddings, "weight_decay": cfg.weight_decay}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    # fused: one pass over each parameter per step instead of a dozen elementwise kernels
    # (the dense embedding tables make the optimiser a large share of a CPU step)
    try:
        return cls(groups, lr=cfg.lr, fused=True)
    except RuntimeError:  # torch < 2.4 fuses Adam on CUDA only: the same update, unfused
        return cls(groups, lr=cfg.lr)


def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total_steps`: constant, or a
    half cosine from lr down to lr · lr_final_ratio at the last step. A function of the step
    alone, so a resumed run follows the same schedule."""
    if cfg.lr_schedule == "constant" or total_steps <= 1:
        return cfg.lr
    progress = min(step / (total_steps - 1), 1.0)
    r = cfg.lr_final_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, *,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          device: str | torch.device = "cpu", stop_after: int | None = None) -> dict:
    """Train; return a summary: epochs run, best epoch and metrics, interactions/s.

    `stop_after`: run only the first this many epochs of the configured ones (the learning
    rate follows the schedule of all cfg.epochs): a refit on more data for the number of
    epochs a validation run selected, with the same schedule.

    `device`: where the model and the loss compute (see `resolve_device`); the data, the
    shuffles and negative sampling stay on the CPU, so a seed draws the same batches on any
    device. Weights, checkpoints and metrics are written from CPU copies."""
    cfg.validate()
    if stop_after is not None and stop_after < 1:
        raise RecsysError(f"stop_after={stop_after}: expected at least 1 epoch")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    run = Path(run_dir)
    data = load_data_dir(data_dir)
    if cfg.eval_split != "none" and len(data.splits[cfg.eval_split][0]) == 0:
        print(f"note: the {cfg.eval_split} split is empty: no validation, no early stopping",
              file=sys.stderr)
        cfg = dataclasses.replace(cfg, eval_split="none")
    rank, world = rank_and_world()
    lead = rank == 0  # writes the run directory; every rank reads it
    if resume and overwrite:
        raise RecsysError("--resume continues a run and --overwrite replaces it: pass one")
    checkpoint = run / "checkpoints" / "last"
    if resume and not checkpoint.is_dir():  # a damaged one is named by load_checkpoint
        raise RecsysError(f"--resume: {run} holds no checkpoint ({checkpoint}) to continue; "
                          f"run without --resume to start it")
    if run.exists() and not resume and (not run.is_dir() or any(run.iterdir())):
        if not overwrite:
            raise RecsysError(f"{run} already holds a run; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        check_replaceable(run, "config.json")
    barrier()  # every rank has looked before the lead writes
    if lead:
        if overwrite and run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model = new_model(cfg, data).to(dev)
    opt = _make_optimizer(model, cfg)
    train_users, train_items = data.splits["train"]
    histories = train_histories(data, cfg.history_len)

    start_epoch, step, best = 0, 0, {"epoch": None, "metric": -math.inf, "metrics": None}
    if resume:
        state = load_checkpoint(run, model, opt, cfg)
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if state.get("world_size", 1) != world and lead:
            print(f"note: the checkpoint was written by {state.get('world_size', 1)} "
                  f"process(es), this run has {world}: it continues, but not bit for bit as "
                  f"the original would have", file=sys.stderr)
        if lead:
            _truncate_metrics(run / "metrics.jsonl", start_epoch)
    elif not resume and lead:
        (run / "metrics.jsonl").unlink(missing_ok=True)
    if lead:
        write_json_atomic(run / "config.json", run_config(model, cfg, data))
    step_loss = BatchLoss(model, cfg, data, histories)
    if world > 1:
        # DDP averages the gradients; the loss itself gathers the other ranks' items. Only
        # InfoNCE uses the temperature: with another loss a learnable one gets no gradient.
        step_loss = DistributedDataParallel(
            step_loss, device_ids=[dev.index] if dev.type == "cuda" else None,
            forward_sync_buffers=False, find_unused_parameters=cfg.loss != "infonce")

    n = len(train_users)
    key = f"ndcg@{cfg.eval_k}"
    epochs_run, rate = start_epoch, 0.0
    window = cfg.batch_size * world  # one step of every rank together
    total_steps = cfg.epochs * sum(1 for s in range(0, n, window) if n - s >= 2 * world)
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)  # the same on every rank
        # each rank samples its own extra negatives and augmentations
        step_gen = gen if world == 1 else torch.Generator().manual_seed(
            (cfg.seed * 1_000_003 + epoch) * 1_009 + rank)
        t0 = time.perf_counter()
        total, batches = 0.0, 0
        # None: tqdm draws the bar only on a terminal (in a log file, the per-epoch line below
        # says the same without thousands of carriage-return frames)
        bar = tqdm(range(0, n, window), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if progress and lead else True, leave=False, unit="batch")
        model.train()
        for s in bar:
            idx = perm[s:s + window]
            if len(idx) < 2 * world:
                continue
            if world > 1:
                idx = torch.tensor_split(idx, world)[rank]  # this rank's shard of the step
            loss = step_loss(train_users[idx], train_items[idx], step_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(cfg, step, total_steps)
            opt.step()
            step += 1
            total += float(loss.detach())
            batches += 1
            done = min(s + window, n)
            bar.set_postfix(loss=f"{total / batches:.4f}",
                            ips=f"{done / (time.perf_counter() - t0):,.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        rate = n / seconds
        record = {"epoch": epoch + 1, "step": step, "loss": total / max(batches, 1),
                  "seconds": seconds, "interactions_per_s": rate,
                  "temperature": float(model.temperature), "lr": opt.param_groups[0]["lr"]}
        if cfg.eval_split != "none":
            # the lead validates; every rank takes its figures, so all stop together
            metrics = broadcast_json(evaluate_model(model, data, histories, cfg.eval_split,
                                                    cfg.eval_k) if lead else None)
            record.update({f"{cfg.eval_split}/{k}": v for k, v in metrics.items()})
            if metrics[key] > best["metric"]:
                best = {"epoch": epoch + 1, "metric": metrics[key], "metrics": metrics}
                if lead:
                    save_model(run, model)
        else:
            best = {"epoch": epoch + 1, "metric": None, "metrics": None}
            if lead:
                save_model(run, model)
        if lead:
            # the metrics line first, durably: a kill before the checkpoint re-runs the epoch
            # (the resume drops lines past the checkpoint), a kill after it loses nothing
            _append_metrics(run / "metrics.jsonl", record)
            save_checkpoint(run, model, opt, {"epoch": epoch + 1, "step": step,
                                              "config": cfg.to_dict(), "best": best,
                                              "world_size": world})
        barrier()  # the checkpoint is complete before any rank goes on (or stops)
        epochs_run = epoch + 1
        if progress and lead:
            shown = " ".join(f"{k}={v:.4f}" for k, v in record.items()
                             if isinstance(v, float) and k not in ("seconds",))
            print(f"epoch {epoch + 1}: {shown}", file=sys.stderr)
        if (cfg.eval_split != "none" and cfg.patience > 0 and best["epoch"] is not None
                and epoch + 1 - best["epoch"] >= cfg.patience):
            if progress and lead:
                print(f"early stop: no better {key} for {cfg.patience} epochs",
                      file=sys.stderr)
            break
    return {"epochs": epochs_run, "best_epoch": best["epoch"], "best": best["metrics"],
            "interactions_per_s": rate, "run": str(run), "device": str(dev)}


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Keep the metric lines of the epochs the checkpoint holds; drop later ones (their epochs
    run again) and a line torn by a kill mid-write."""
    if not path.exists():
        return
    lines = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["epoch"] <= epochs:
                lines.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with atomic_file(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))
