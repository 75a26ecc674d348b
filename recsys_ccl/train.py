"""`recsys-ccl train`: fit a TwoTower model on a DATA directory; write a RUN directory.

RUN layout:
    config.json          model and training config, data path and manifest sha256
    model.safetensors    the best weights so far (by valid NDCG@K; the last ones without a valid
                         split or validation)
    metrics.jsonl        one JSON object per epoch: loss, interactions/s, validation metrics
    checkpoints/last/    model.safetensors, optimizer.safetensors, state.json (epoch, step,
                         config, best, torch RNG state): everything --resume needs

Determinism: each epoch's shuffle and extra negatives come from a generator seeded by
(seed, epoch), and the checkpoint restores weights, optimiser and the global RNG, so a resumed
run ends with the same weights as an uninterrupted one (same machine and thread count).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import InteractionData, load_data_dir, recent_histories
from recsys_ccl.distributed import barrier, broadcast_json, rank_and_world
from recsys_ccl.errors import RecsysError
from recsys_ccl.evaluation import evaluate_embeddings
from recsys_ccl.fileio import atomic_directory, sha256_file, write_json_atomic
from recsys_ccl.losses import (
    bpr_loss,
    contrastive_loss,
    cosine_contrastive_loss,
    margin_contrastive_loss,
)
from recsys_ccl.model import ModelConfig, TwoTower

__all__ = [
    "TrainConfig",
    "evaluate_model",
    "load_run",
    "require_same_data",
    "resolve_device",
    "train",
    "train_histories",
]


# -- batches and the loss --

def _column_log_q(data: InteractionData, items: torch.Tensor, batch: int, extra: int,
                  sampling: str) -> torch.Tensor:
    """log of each column's expected count among the batch's candidates: in-batch positives
    arrive in proportion to popularity (batch · p_j), extra negatives uniformly (extra / I) or
    by popularity (extra · p_j). Constant offsets cancel in the softmax."""
    p = data.item_log_q[items].exp()
    if extra == 0:
        return data.item_log_q[items]
    if sampling == "popularity":
        return torch.log((batch + extra) * p)
    return torch.log(batch * p + extra / data.num_items)


def _sample_negatives(data: InteractionData, n: int, sampling: str,
                      gen: torch.Generator) -> torch.Tensor:
    if sampling == "popularity":
        return torch.multinomial(data.item_count.float(), n, replacement=True, generator=gen)
    return torch.randint(0, data.num_items, (n,), generator=gen)


def augment_history(history: torch.Tensor, crop: float, mask_prob: float,
                    gen: torch.Generator) -> torch.Tensor:
    """One augmented view of left-padded histories (B, L) (-1 = padding): a random contiguous
    crop keeping ceil(crop · n) of each user's n items, then each kept item masked with
    probability mask_prob, never masking all of them. (Reordering, the third augmentation of
    sequence SSL, is a no-op for the mean pooling used here, so it is not applied.)"""
    B, L = history.shape
    valid = history >= 0
    n = valid.sum(1)  # (B,)
    keep = torch.ceil(n * crop).long().clamp(min=1)
    start = (torch.rand(B, generator=gen) * (n - keep + 1).clamp(min=1)).long()  # in [0, n-keep]
    pos = torch.arange(L)[None, :] - (L - n)[:, None]  # 0..n-1 over the valid tail
    in_crop = valid & (pos >= start[:, None]) & (pos < (start + keep)[:, None])
    masked = in_crop & (torch.rand(B, L, generator=gen) < mask_prob)
    # keep the crop's first item whenever the mask would empty the view
    first = in_crop & (pos == start[:, None])
    emptied = (in_crop & ~masked).sum(1) == 0
    kept = (in_crop & ~masked) | (first & emptied[:, None])
    return torch.where(kept, history, torch.full_like(history, -1))


def view_contrast_loss(model: TwoTower, cfg: TrainConfig, users: torch.Tensor,
                       hist: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SimCLR-style auxiliary loss: two augmented views of each user's history, embedded by
    the history branch alone, contrasted with the symmetric in-batch softmax (a user appearing
    twice in the batch is an accidental hit, masked)."""
    v1 = model.encode_users(None, augment_history(hist, cfg.ssl_crop, cfg.ssl_mask_prob, gen))
    v2 = model.encode_users(None, augment_history(hist, cfg.ssl_crop, cfg.ssl_mask_prob, gen))
    return contrastive_loss(v1, v2, cfg.ssl_temperature, item_ids=users, symmetric=True,
                            impl=cfg.loss_impl)


def batch_loss(model: TwoTower, cfg: TrainConfig, data: InteractionData,
               histories: torch.Tensor | None, users: torch.Tensor, items: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    """The configured loss on one batch of (user, positive item) pairs (B,).

    Ids, histories and sampling live on the CPU (so a run draws the same batches on any
    device); what the model computes with moves to the model's device."""
    B = len(users)
    dev = model.item_embedding.weight.device
    cols = items
    if cfg.extra_negatives > 0:
        cols = torch.cat([items, _sample_negatives(data, cfg.extra_negatives,
                                                   cfg.negative_sampling, gen)])
    log_q = (cfg.logq_weight * _column_log_q(data, cols, B, cfg.extra_negatives,
                                             cfg.negative_sampling)
             if cfg.loss == "infonce" and cfg.logq else None)
    hist = histories[users].to(dev) if histories is not None else None
    users, items, cols = users.to(dev), items.to(dev), cols.to(dev)
    u = model.encode_users(users, hist, exclude_item=items if hist is not None else None)
    v = model.encode_items(cols)  # (N, D)
    ids = cols if cfg.mask_hits else None
    if cfg.loss == "infonce":
        log_q = log_q.to(dev) if log_q is not None else None
        # global negatives under torchrun (a no-op in a single process)
        loss = contrastive_loss(u, v, model.temperature, log_q, ids, symmetric=cfg.symmetric,
                                impl=cfg.loss_impl, distributed=True)
    elif cfg.loss == "ccl":
        loss = cosine_contrastive_loss(u, v, cfg.ccl_margin, cfg.ccl_negative_weight, ids)
    elif cfg.loss == "margin":
        loss = margin_contrastive_loss(u, v, cfg.margin_positive, cfg.margin_negative, ids)
    else:
        loss = bpr_loss(u, v, ids)
    if cfg.ssl_weight > 0 and hist is not None:
        loss = loss + cfg.ssl_weight * view_contrast_loss(model, cfg, users, hist, gen)
    return loss


class _BatchLoss(torch.nn.Module):
    """The model with `batch_loss` as its forward, so that DistributedDataParallel can wrap
    it (DDP synchronises gradients of what runs inside its forward)."""

    def __init__(self, model: TwoTower, cfg: TrainConfig, data: InteractionData,
                 histories: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.cfg, self.data, self.histories = cfg, data, histories

    def forward(self, users: torch.Tensor, items: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
        return batch_loss(self.model, self.cfg, self.data, self.histories, users, items, gen)


# -- encoding all users / items (evaluation, export) --

def train_histories(data: InteractionData, length: int) -> torch.Tensor | None:
    """(U, L) most recent train items per user for history pooling; None when L = 0."""
    if length <= 0:
        return None
    return recent_histories(*data.splits["train"], data.num_users, length)


def evaluate_model(model: TwoTower, data: InteractionData, histories: torch.Tensor | None,
                   split: str, k: int) -> dict:
    """Full-ranking metrics of `model` on `split` (users embedded with their train
    histories); leaves the model in the mode it was in."""
    dev = model.item_embedding.weight.device

    def encode_users(users: torch.Tensor) -> torch.Tensor:
        hist = histories[users].to(dev) if histories is not None else None
        ids = users.to(dev) if model.config.user_id_embedding else None
        return model.encode_users(ids, hist).cpu()

    was_training = model.training
    model.eval()
    with torch.no_grad():
        items = model.encode_items(torch.arange(data.num_items, device=dev)).cpu()
        metrics = evaluate_embeddings(encode_users, items, data, split=split, k=k)
    model.train(was_training)
    return metrics


def require_same_data(config: dict, data: InteractionData, run: str | Path) -> None:
    """Refuse a DATA directory other than the one the run was trained on."""
    if config["data"]["manifest_sha256"] != data.manifest_sha256:
        raise RecsysError(f"{data.path} is not the DATA directory {run} was trained on (the "
                          f"sha256 of {data.path / 'manifest.json'} differs from the one in "
                          f"{Path(run) / 'config.json'})")


# -- checkpoints --

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{idx}.{key}"] = (value if isinstance(value, torch.Tensor)
                                             else torch.tensor(value)).cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


_CHECKPOINT_TENSORS = ("model.safetensors", "optimizer.safetensors")


def _cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _save_checkpoint(run: Path, model: TwoTower, opt, state: dict) -> None:
    tensors, meta = _optimizer_tensors(opt)
    rng = {"torch_rng": _encode_rng(torch.get_rng_state())}
    dev = model.item_embedding.weight.device
    if dev.type == "cuda":  # dropout on the GPU draws from the device's generator
        rng["cuda_rng"] = _encode_rng(torch.cuda.get_rng_state(dev))
    with atomic_directory(run / "checkpoints" / "last", overwrite=True,
                          marker="state.json") as tmp:
        save_file(_cpu_weights(model), tmp / "model.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        # The hashes catch damage a parser cannot see (flipped bytes inside a tensor).
        hashes = {name: sha256_file(tmp / name) for name in _CHECKPOINT_TENSORS}
        write_json_atomic(tmp / "state.json", {**state, "optimizer": meta, **rng,
                                               "sha256": hashes})


# Config fields added after checkpoints were first written, with the value that runs from before
# them had in effect: a checkpoint without the key resumes under that value.
_BEFORE_FIELD_EXISTED = {"item_bias": False, "lr_schedule": "constant", "lr_final_ratio": 0.0}


def _config_changes(cfg: TrainConfig, saved: dict) -> list[str]:
    """Config keys that differ from the checkpoint's (only `epochs` may change on resume, to
    train a finished run further)."""
    return sorted(k for k, v in cfg.to_dict().items()
                  if k != "epochs" and saved.get(k, _BEFORE_FIELD_EXISTED.get(k)) != v)


def _load_checkpoint(run: Path, model: TwoTower, opt, cfg: TrainConfig) -> dict:
    """Restore model, optimiser and RNG from run/checkpoints/last, after checking that `cfg`
    is the checkpoint's (before any weights are loaded, so a mismatch says what differs)."""
    ckpt = run / "checkpoints" / "last"
    for name in (*_CHECKPOINT_TENSORS, "state.json"):
        if not (ckpt / name).exists():
            raise RecsysError(f"cannot resume: missing {ckpt / name}")
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("state.json does not hold an object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RecsysError(f"cannot resume: {ckpt / 'state.json'} is corrupt: "
                          f"{str(exc).splitlines()[0]}") from exc
    changed = _config_changes(cfg, state.get("config", {}))
    if changed:
        hint = (" (this checkpoint predates the item bias: add --set item_bias=false)"
                if changed == ["item_bias"] and "item_bias" not in state.get("config", {})
                else "")
        raise RecsysError(f"cannot resume: config differs from the checkpoint's in "
                          f"{', '.join(changed)} ({ckpt}){hint}")
    for name, expected in state.get("sha256", {}).items():
        if sha256_file(ckpt / name) != expected:
            raise RecsysError(f"cannot resume: {ckpt / name} does not match the hash in "
                              f"state.json (truncated or corrupted)")
    for name in _CHECKPOINT_TENSORS:
        try:
            tensors = load_file(ckpt / name)
            if name == "model.safetensors":
                model.load_state_dict(tensors)
            else:
                _load_optimizer(opt, tensors, state["optimizer"])
        except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
            raise RecsysError(f"cannot resume from {ckpt / name}: "
                              f"{str(exc).splitlines()[0]}") from exc
    torch.set_rng_state(_decode_rng(state["torch_rng"]))
    dev = model.item_embedding.weight.device
    if dev.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(_decode_rng(state["cuda_rng"]), dev)
    return state


def _save_model(run: Path, model: TwoTower) -> None:
    """The best weights so far (config.json, written once at the start, does not change)."""
    tmp = run / ".model.safetensors.tmp"
    weights = _cpu_weights(model)
    save_file(weights, tmp, metadata={"content_sha256": _content_sha256(weights)})
    tmp.replace(run / "model.safetensors")


def _content_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A hash of names and tensor bytes: kept in the file's own header, it catches damage to
    the tensor data that the safetensors parser cannot see."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_verified(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as fh:
        expected = (fh.metadata() or {}).get("content_sha256")
        weights = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    if expected is not None and _content_sha256(weights) != expected:
        raise ValueError("the tensor data does not match the hash in its header (corrupted)")
    return weights


def run_config(model: TwoTower, cfg: TrainConfig, data: InteractionData) -> dict:
    return {"model": model.config.to_dict(), "train": cfg.to_dict(),
            "data": {"path": str(data.path.absolute()),
                     "manifest_sha256": data.manifest_sha256}}


def load_run(run: str | Path) -> tuple[TwoTower, dict]:
    """The best model of a RUN directory (eval mode) and its config.json."""
    run = Path(run)
    for name in ("config.json", "model.safetensors"):
        if not (run / name).exists():
            raise RecsysError(f"not a RUN directory (no {name}): {run}")
    try:
        config = json.loads((run / "config.json").read_text())
        model = TwoTower(ModelConfig.from_dict(config["model"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as exc:
        raise RecsysError(f"cannot load {run / 'config.json'}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from exc
    try:
        model.load_state_dict(_load_verified(run / "model.safetensors"))
    except (RuntimeError, OSError, ValueError, SafetensorError) as exc:
        raise RecsysError(f"cannot load {run / 'model.safetensors'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    return model.eval(), config


# -- the loop --

def _make_optimizer(model: TwoTower, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    embeddings = [p for n, p in model.named_parameters() if "embedding" in n]
    others = [p for n, p in model.named_parameters() if "embedding" not in n]
    groups = [{"params": embeddings, "weight_decay": cfg.weight_decay}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
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
          resume: bool = False, progress: bool = True,
          device: str | torch.device = "cpu") -> dict:
    """Train; return a summary: epochs run, best epoch and metrics, interactions/s.

    `device`: where the model and the loss compute (see `resolve_device`); the data, the
    shuffles and negative sampling stay on the CPU, so a seed draws the same batches on any
    device. Weights, checkpoints and metrics are written from CPU copies."""
    cfg.validate()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    run = Path(run_dir)
    data = load_data_dir(data_dir)
    if cfg.eval_split != "none" and len(data.splits[cfg.eval_split][0]) == 0:
        print(f"note: the {cfg.eval_split} split is empty: no validation, no early stopping",
              file=sys.stderr)
        cfg = dataclasses.replace(cfg, eval_split="none")
    rank, world = rank_and_world()
    lead = rank == 0  # writes the run directory; every rank reads it
    if run.exists() and not resume and any(run.iterdir()):
        raise RecsysError(f"{run} already holds a run; pass --resume to continue it or choose "
                          f"another --out")
    barrier()  # every rank has looked before the lead writes
    if lead:
        run.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model = TwoTower(cfg.model_config(data.num_users, data.num_items)).to(dev)
    opt = _make_optimizer(model, cfg)
    train_users, train_items = data.splits["train"]
    histories = train_histories(data, cfg.history_len)

    start_epoch, step, best = 0, 0, {"epoch": None, "metric": -math.inf, "metrics": None}
    if resume and (run / "checkpoints" / "last").exists():
        state = _load_checkpoint(run, model, opt, cfg)
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
    step_loss = _BatchLoss(model, cfg, data, histories)
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
    for epoch in range(start_epoch, cfg.epochs):
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
                    _save_model(run, model)
        else:
            best = {"epoch": epoch + 1, "metric": None, "metrics": None}
            if lead:
                _save_model(run, model)
        if lead:
            _save_checkpoint(run, model, opt, {"epoch": epoch + 1, "step": step,
                                               "config": cfg.to_dict(), "best": best,
                                               "world_size": world})
            with (run / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
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


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Drop metric lines of epochs after the checkpoint (written before a crash)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines()
             if ln.strip() and json.loads(ln)["epoch"] <= epochs]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(path)
