"""RUN directories and checkpoints: open, save, verify, load and resume.

RUN layout:
    config.json          model and training config, the DATA directory's name and manifest
                         sha256
    model.safetensors    the best weights so far (by valid NDCG@K; the last ones without a valid
                         split or validation); its header holds the sha256 of its tensors. A
                         hard link to the checkpoint's weights of the epoch that was best, so
                         a run holds one copy of a model when its best is its last
    metrics.jsonl        one JSON object per epoch (and per stop within one, "partial"): loss,
                         interactions/s, validation metrics
    checkpoints/last/    model.safetensors, optimizer.safetensors, state.json (epoch, step,
                         position within an epoch, config, best, RNG states, file hashes):
                         everything --resume needs

A directory holding no checkpoint (a run stopped before its first one) is not a run: a plain
rerun replaces it, and --resume says so.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from recsys_ccl.config import ModelConfig, TrainConfig
from recsys_ccl.data.dataset import InteractionData
from recsys_ccl.errors import RecsysError
from recsys_ccl.fileio import (
    atomic_directory,
    atomic_file,
    check_replaceable,
    sha256_file,
    sha256_tensors,
    write_json_atomic,
)
from recsys_ccl.model import TwoTower, upgrade_state_dict
from recsys_ccl.optimization import TrainingOptimizer

__all__ = ["check_run", "config_changes", "create_run", "decode_rng", "encode_rng",
           "load_checkpoint", "load_run", "require_same_data", "run_config", "save_checkpoint"]

CHECKPOINT = Path("checkpoints") / "last"
_CHECKPOINT_TENSORS = ("model.safetensors", "optimizer.safetensors")


def require_same_data(config: dict, data: InteractionData, run: str | Path) -> None:
    """Refuse a DATA directory other than the one the run was trained on."""
    if config["data"]["manifest_sha256"] != data.manifest_sha256:
        raise RecsysError(f"{data.path} is not the DATA directory {run} was trained on (the "
                          f"sha256 of {data.path / 'manifest.json'} differs from the one in "
                          f"{Path(run) / 'config.json'})")


# -- the run's life cycle --

def check_run(run: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check that `run` can be written as asked, writing nothing (every rank of a torchrun job
    checks the same directory before any of them writes). Returns whether an existing
    directory is to be replaced. resume: it must hold a checkpoint; overwrite: any earlier
    run is replaced; else it must be new, empty, or a run stopped before its first checkpoint
    (replaced)."""
    if resume and overwrite:
        raise RecsysError("--resume continues a run and --overwrite replaces it: pass one")
    checkpoint = run / CHECKPOINT
    exists = run.exists() and (not run.is_dir() or any(run.iterdir()))
    if resume:
        if not run.exists():
            raise RecsysError(f"--resume: {run} does not exist; run without --resume to "
                              f"start it")
        if not checkpoint.is_dir():  # a damaged one is named by load_checkpoint
            found = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
            raise RecsysError(f"--resume: {run} holds no checkpoint ({CHECKPOINT}), so there "
                              f"is nothing to continue (it holds "
                              f"{', '.join(found) if found else 'nothing'}: a run stopped "
                              f"before its first checkpoint); run without --resume to start "
                              f"it again")
        return False
    if exists:
        if not overwrite and checkpoint.is_dir():
            raise RecsysError(f"{run} already holds a run; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        check_replaceable(run, "config.json")
        return True
    return False


def create_run(run: Path, replace: bool) -> None:
    """Make the RUN directory (the lead process, after check_run), replacing an earlier one
    when check_run said so."""
    if replace and run.exists():
        if not (run / CHECKPOINT).is_dir():
            print(f"note: replacing {run}: a run stopped before its first checkpoint",
                  file=sys.stderr)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)


def config_changes(cfg: TrainConfig, saved: dict) -> list[str]:
    """Config keys that differ from the checkpoint's. Only `epochs` may change on resume, and
    only with a constant learning rate: a cosine schedule spans the epochs the run started
    with, so a new total would change the rate of the steps already taken."""
    changed = sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v)
    if changed == ["epochs"] and cfg.lr_schedule == "constant":
        return []
    return changed


# -- checkpoints --

def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """A weights file whose header holds the sha256 of its tensors (damage that a parser
    cannot see, flipped bytes inside a tensor, is caught at load)."""
    save_file(weights, path, metadata={"content_sha256": sha256_tensors(weights)})
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _publish_best(weights_file: Path, run: Path) -> None:
    """run/model.safetensors becomes `weights_file` (a hard link: no second copy; a copy where
    the file system has no links), replaced atomically."""
    with atomic_file(run / "model.safetensors") as tmp:
        try:
            os.link(weights_file, tmp)
        except OSError:
            shutil.copyfile(weights_file, tmp)


def save_checkpoint(run: Path, model: TwoTower, opt: TrainingOptimizer, state: dict,
                    best: bool) -> None:
    """Write run/checkpoints/last (weights, optimiser state, `state` + RNG states + hashes) in
    one atomic step; with `best`, these weights become run/model.safetensors first (a kill
    between the two leaves the best weights one epoch ahead of the checkpoint, which the
    resumed run recomputes bit for bit)."""
    tensors, meta = opt.state_tensors()
    rng = {"torch_rng": encode_rng(torch.get_rng_state())}
    if model.device.type == "cuda":  # dropout on the GPU draws from the device's generator
        rng["cuda_rng"] = encode_rng(torch.cuda.get_rng_state(model.device))
    with atomic_directory(run / CHECKPOINT, overwrite=True, marker="state.json") as tmp:
        _save_weights(_cpu_weights(model), tmp / "model.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        hashes = {name: sha256_file(tmp / name) for name in _CHECKPOINT_TENSORS}
        write_json_atomic(tmp / "state.json", {**state, "optimizer": meta, **rng,
                                               "sha256": hashes})
        if best:
            _publish_best(tmp / "model.safetensors", run)


def load_checkpoint(run: Path, model: TwoTower, opt: TrainingOptimizer,
                    cfg: TrainConfig) -> dict:
    """Restore model, optimisers and RNG from run/checkpoints/last, after checking that `cfg`
    is the checkpoint's (before any weights are loaded, so a mismatch says what differs)."""
    ckpt = run / CHECKPOINT
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
    saved = state.get("config", {})
    changed = config_changes(cfg, saved)
    if changed == ["epochs"]:
        raise RecsysError(f"cannot resume with epochs={cfg.epochs}: the run's cosine "
                          f"learning-rate schedule spans the {saved.get('epochs')} epochs it "
                          f"started with (a new total would change the rate of the steps "
                          f"already taken); resume with epochs={saved.get('epochs')}, or "
                          f"start a new run")
    if changed:
        raise RecsysError(f"cannot resume: config differs from the checkpoint's in "
                          f"{', '.join(changed)} ({ckpt})")
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
                opt.load_state_tensors(tensors, state["optimizer"])
        except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
            raise RecsysError(f"cannot resume from {ckpt / name}: "
                              f"{str(exc).splitlines()[0]}") from exc
    torch.set_rng_state(decode_rng(state["torch_rng"]))
    if model.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(decode_rng(state["cuda_rng"]), model.device)
    return state


# -- the model of a run --

def _load_verified(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as fh:
        expected = (fh.metadata() or {}).get("content_sha256")
        weights = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    if expected is not None and sha256_tensors(weights) != expected:
        raise ValueError("the tensor data does not match the hash in its header (corrupted)")
    return weights


def run_config(model: TwoTower, cfg: TrainConfig, data: InteractionData) -> dict:
    """config.json: the model's and the run's configuration, and which DATA it was trained on
    (by name and manifest hash: no path of the training machine)."""
    return {"model": model.config.to_dict(), "train": cfg.to_dict(),
            "data": {"name": data.path.absolute().name,
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
            AttributeError, RecsysError) as exc:
        raise RecsysError(f"cannot load {run / 'config.json'}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from exc
    try:
        weights = upgrade_state_dict(_load_verified(run / "model.safetensors"), model.config)
        model.load_state_dict(weights)
    except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as exc:
        raise RecsysError(f"cannot load {run / 'model.safetensors'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    return model.eval(), config
