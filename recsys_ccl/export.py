"""`recsys-ccl export`: a RUN directory (+ its DATA) -> a serving BUNDLE.

BUNDLE layout (what the server loads; it needs no training code):
    model.safetensors             the model's weights (user tower for ids and histories)
    config.json                   the model config
    items.parquet                 item_idx int32, item_id string
    item_embeddings.safetensors   "item_embeddings": (N, D) float32, the item tower's output
    user_history.parquet          user_idx int32, user_id string, item_ids list[string]: the items
                                  each user interacted with (train, valid and test), in time
                                  order: what exclude_seen drops and history pooling reads
    manifest.json                 model_version (content hash of weights and config), the
                                  source run and data hashes, counts
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.fileio import atomic_directory, sha256_file, write_json_atomic
from recsys_ccl.train import load_run, require_same_data

__all__ = ["BUNDLE_FILES", "BUNDLE_FORMAT_VERSION", "export_bundle", "model_version"]

BUNDLE_FORMAT_VERSION = 1
BUNDLE_FILES = ("manifest.json", "config.json", "model.safetensors", "items.parquet",
                "item_embeddings.safetensors", "user_history.parquet")


def model_version(weights: dict[str, torch.Tensor], model_config: dict) -> str:
    """16 hex digits of sha256 over the model config (canonical JSON) and the weights."""
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_bundle(run_dir: str | Path, data_dir: str | Path, out: str | Path, *,
                  overwrite: bool = False) -> dict:
    """Write the bundle atomically; return its manifest."""
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    data = load_data_dir(data_dir)
    require_same_data(config, data, run_dir)
    with torch.no_grad():
        item_emb = model.encode_items(torch.arange(data.num_items)).float().contiguous()

    # every known interaction, in time order within each user
    seen = pl.concat([pl.read_parquet(data.path / f"{s}.parquet") for s in
                      ("train", "valid", "test")])
    history = (
        seen.sort(["user_idx", "ts"], nulls_last=False, maintain_order=True)
        .join(data.items.select("item_idx", "item_id"), on="item_idx")
        .group_by("user_idx", maintain_order=True).agg(pl.col("item_id").alias("item_ids"))
    )
    history = (data.users.join(history, on="user_idx", how="left")
               .with_columns(pl.col("item_ids").fill_null(pl.lit([], pl.List(pl.String))))
               .sort("user_idx"))

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": "recsys_ccl.bundle",
        "model_version": model_version(weights, config["model"]),
        "created_unix": int(time.time()),
        "source": {"run": str(run_dir.absolute()),
                   "run_config_sha256": sha256_file(run_dir / "config.json"),
                   "data": str(data.path.absolute()),
                   "data_manifest_sha256": data.manifest_sha256},
        "counts": {"users": data.num_users, "items": data.num_items,
                   "embedding_dim": int(item_emb.shape[1])},
        "similarity": _similarity(model.config),
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(weights, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"model": config["model"]}, indent=2,
                                                    sort_keys=True) + "\n")
        data.items.select("item_idx", "item_id").write_parquet(tmp / "items.parquet")
        save_file({"item_embeddings": item_emb}, tmp / "item_embeddings.safetensors")
        history.write_parquet(tmp / "user_history.parquet")
        manifest["files"] = {name: sha256_file(tmp / name) for name in BUNDLE_FILES
                             if name != "manifest.json"}
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _similarity(config) -> str:
    """What the score is: the dot product of the two towers' vectors in every case."""
    base = "cosine" if config.normalize else "dot"
    return f"{base}+item_bias" if config.item_bias else base
