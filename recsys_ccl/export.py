"""`recsys-ccl export`: a RUN directory (+ its DATA) -> a serving BUNDLE (layout and hash in
recsys_ccl/bundle_format.py).

`history_splits` chooses which interactions the bundle's user_history holds: all of them by
default (production: what a user has done is "seen", and histories are as long as they can
be), or only "train" to serve exactly what `evaluate` scores (its test items are not seen).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from recsys_ccl.bundle_format import (
    BUNDLE_FILES,
    BUNDLE_FORMAT_VERSION,
    BUNDLE_KIND,
    model_version,
)
from recsys_ccl.checkpoint import load_run, require_same_data
from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.data.schema import SPLITS
from recsys_ccl.errors import RecsysError
from recsys_ccl.fileio import atomic_directory, sha256_file, write_json_atomic

__all__ = ["export_bundle", "parse_history_splits"]


def parse_history_splits(text: str | Sequence[str]) -> tuple[str, ...]:
    """"train,valid,test" (or a sequence of names) -> the splits in canonical order."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    unknown = [n for n in names if n not in SPLITS]
    if unknown or not names:
        raise RecsysError(f"--history-splits takes a comma-separated subset of "
                          f"{','.join(SPLITS)}, got {','.join(names) or 'nothing'!r}")
    return tuple(s for s in SPLITS if s in names)


def export_bundle(run_dir: str | Path, data_dir: str | Path, out: str | Path, *,
                  overwrite: bool = False,
                  history_splits: str | Sequence[str] = SPLITS,
                  device: str | torch.device = "cpu") -> dict:
    """Write the bundle atomically; return its manifest. history_splits: the splits whose
    interactions become the users' stored histories (default all); device: where the item
    tower runs over the catalogue."""
    splits = parse_history_splits(history_splits)
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    data = load_data_dir(data_dir)
    require_same_data(config, data, run_dir)
    dev = torch.device(device)
    with torch.no_grad():
        item_emb = (model.to(dev).encode_items(torch.arange(data.num_items, device=dev))
                    .float().cpu().contiguous())
    model = model.cpu()

    # the chosen splits' interactions, in time order within each user
    seen = pl.concat([pl.read_parquet(data.path / f"{s}.parquet") for s in splits])
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
        "kind": BUNDLE_KIND,
        "model_version": model_version(weights, config["model"]),
        "created_unix": int(time.time()),
        "source": {"run": str(run_dir.absolute()),
                   "run_config_sha256": sha256_file(run_dir / "config.json"),
                   "data": str(data.path.absolute()),
                   "data_manifest_sha256": data.manifest_sha256},
        "counts": {"users": data.num_users, "items": data.num_items,
                   "embedding_dim": int(item_emb.shape[1])},
        "similarity": _similarity(model.config),
        "history_splits": list(splits),
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
