"""RUN directories and checkpoints: save, verify, load and resume.

RUN layout:
    config.json          model and training config, data path and manifest sha256
    model.safetensors    the best weights so far (by valid NDCG@K; the last ones without a valid
                         split or validation); its header holds the sha256 of its tensors
    metrics.jsonl        one JSON object per epoch: loss, interactions/s, validation metrics
    checkpoints/last/    model.safetensors, optimizer.safetensors, state.json (epoch, step,
                         config, best, torch RNG state, file hashes): everything --resume needs
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import (
    InteractionData,
)
from recsys_ccl.errors import RecsysError
from recsys_ccl.fileio import (
    atomic_directory,
    atomic_file,
    sha256_file,
    sha256_tensors,
    write_json_atomic,
)
from recsys_ccl.model import ModelConfig, TwoTower

__all__ = ["load_checkpoint", "load_run", "require_same_data", "run_config", "save_checkpoint",
           "save_model"]


def require_same_data(config: dict, data: InteractionData, run: str | Path) -> None:
    """Refuse a DATA directory other than the one the run was trained on."""
    if config["data"]["manifest_sha256"] != data.manifest_sha256:
        raise RecsysError(f"{data.path} is not the DATA directory {run} was trained on (the "
                          f"sha256 of {data.path / 'manifest.json'} differs from the one in "
                          f"{Path(run) / 'config.json'})")


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


def save_checkpoint(run: Path, model: TwoTower, opt, state: dict) -> None:
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


def config_changes(cfg: TrainConfig, saved: dict) -> list[str]:
    """Config keys that differ from the checkpoint's (only `epochs` may change on resume, to
    train a finished run further)."""
    return sorted(k for k, v in cfg.to_dict().items()
                  if k != "epochs" and saved.get(k) != v)


def load_checkpoint(run: Path, model: TwoTower, opt, cfg: TrainConfig) -> dict:
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
    changed = config_changes(cfg, state.get("config", {}))
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
                _load_optimizer(opt, tensors, state["optimizer"])
        except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
            raise RecsysError(f"cannot resume from {ckpt / name}: "
                              f"{str(exc).splitlines()[0]}") from exc
    torch.set_rng_state(_decode_rng(state["torch_rng"]))
    dev = model.item_embedding.weight.device
    if dev.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(_decode_rng(state["cuda_rng"]), dev)
    return state


def save_model(run: Path, model: TwoTower) -> None:
    """The best weights so far (config.json, written once at the start, does not change)."""
    weights = _cpu_weights(model)
    with atomic_file(run / "model.safetensors") as tmp:
        save_file(weights, tmp, metadata={"content_sha256": _content_sha256(weights)})


def _content_sha256(weights: dict[str, torch.Tensor]) -> str:
    """Kept in the weights file's own header, it catches damage to the tensor data that the
    safetensors parser cannot see."""
    return sha256_tensors(weights)


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
