"""`recsys-ccl export`: a RUN directory (+ its DATA) -> a serving BUNDLE (layout and hash in
recsys_ccl/bundle_format.py).

`history_splits` chooses which interactions the bundle's user_history holds: all of them by
default (production: what a user has done is "seen", and histories are as long as they can
be), or only "train" to serve exactly what `evaluate` scores (its test items are not seen).

`new_items` (a feature table keyed by item_id, for a model with item features) adds items to
the catalogue, or changes the features of items it has, without retraining: they are encoded
by the training spec (extra columns ignored, unseen values in the out-of-vocabulary bucket, a
missing field column an error), new items are cold (feature path only), and the bundle gets a
new model_version.
"""

from __future__ import annotations

import dataclasses
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
from recsys_ccl.model import TwoTower

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
                  device: str | torch.device = "cpu",
                  new_items: str | Path | None = None) -> dict:
    """Write the bundle atomically; return its manifest. history_splits: the splits whose
    interactions become the users' stored histories (default all); device: where the item
    tower runs over the catalogue; new_items: a feature table of items to add or change."""
    splits = parse_history_splits(history_splits)
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    data = load_data_dir(data_dir)
    require_same_data(config, data, run_dir)
    catalogue = data.items.select("item_idx", "item_id")
    added = {"added": 0, "changed": 0}
    if new_items is not None:
        model, catalogue, added = with_items(model, catalogue, new_items)
        config = {**config, "model": model.config.to_dict()}
    num_items = catalogue.height
    dev = torch.device(device)
    with torch.no_grad():
        item_emb = (model.to(dev).encode_items(torch.arange(num_items, device=dev))
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
        "counts": {"users": data.num_users, "items": num_items,
                   "embedding_dim": int(item_emb.shape[1])},
        "similarity": _similarity(model.config),
        "history_splits": list(splits),
    }
    if new_items is not None:
        manifest["new_items"] = {"path": str(Path(new_items).absolute()),
                                 "sha256": sha256_file(new_items), **added}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(weights, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"model": config["model"]}, indent=2,
                                                    sort_keys=True) + "\n")
        catalogue.write_parquet(tmp / "items.parquet")
        save_file({"item_embeddings": item_emb}, tmp / "item_embeddings.safetensors")
        history.write_parquet(tmp / "user_history.parquet")
        manifest["files"] = {name: sha256_file(tmp / name) for name in BUNDLE_FILES
                             if name != "manifest.json"}
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def with_items(model: TwoTower, catalogue: pl.DataFrame, path: str | Path
               ) -> tuple[TwoTower, pl.DataFrame, dict[str, int]]:
    """The model and catalogue (item_idx, item_id) with the items of the feature table at
    `path` added (new ids, after the existing indices, in table order; cold) or changed
    (their encoded feature rows replaced). Returns the counts too."""
    from recsys_ccl.data.feature_tables import read_feature_table
    from recsys_ccl.features import encode_table, feature_tensors

    if model.item_fields is None:
        raise RecsysError("--items needs a model trained with item features (this one has "
                          "none): new items are embedded from their features")
    spec = model.item_fields.spec
    table = read_feature_table(path, "item_id")
    table = table.filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
    table = table.unique(subset="item_id", keep="last", maintain_order=True)
    index = dict(zip(catalogue["item_id"].to_list(), catalogue["item_idx"].to_list(),
                     strict=True))
    new_ids = [i for i in table["item_id"].to_list() if i not in index]
    old_n = catalogue.height
    catalogue = pl.concat([catalogue, pl.DataFrame(
        {"item_idx": pl.Series(range(old_n, old_n + len(new_ids)), dtype=pl.Int32),
         "item_id": pl.Series(new_ids, dtype=pl.String)})])
    index.update({i: old_n + k for k, i in enumerate(new_ids)})
    rows = feature_tensors(encode_table(table, spec), spec)
    target = torch.tensor([index[i] for i in table["item_id"].to_list()], dtype=torch.int64)
    grown = _grown(model, catalogue.height, rows)
    with torch.no_grad():
        for k, f in enumerate(spec.fields):
            buf = getattr(grown.item_fields, f"rows_{k}")
            r = rows[f.name]
            if f.type == "multi_hot":  # pad to the (possibly wider) buffer
                r = torch.nn.functional.pad(r, (0, buf.shape[1] - r.shape[1]),
                                            value=f.cardinality)
            buf[target] = r
    grown.eval()
    return grown, catalogue, {"added": len(new_ids), "changed": table.height - len(new_ids)}


def _grown(model: TwoTower, num_items: int, rows: dict[str, torch.Tensor]) -> TwoTower:
    """A copy of `model` over num_items items: per-item tensors extended (zero id
    embeddings and biases, padded feature rows, new items cold), multi_hot buffers widened
    to hold `rows`."""
    cfg = model.config
    shapes = dict(cfg.item_features["shapes"])
    for f in model.item_fields.spec.fields:
        if f.type == "multi_hot":
            shapes[f.name] = [max(shapes[f.name][0], rows[f.name].shape[1])]
    new_cfg = dataclasses.replace(cfg, num_items=num_items,
                                  item_features={**cfg.item_features, "shapes": shapes})
    grown = TwoTower(new_cfg)
    state = model.state_dict()
    pads = {f"item_fields.rows_{k}": f.cardinality if f.type == "multi_hot" else 0
            for k, f in enumerate(model.item_fields.spec.fields)}
    new_state = {}
    for name, t in grown.state_dict().items():
        old = state[name]
        if old.shape == t.shape:
            new_state[name] = old
            continue
        fill = torch.full_like(t, pads.get(name, 0))
        if name == "item_cold":
            fill = torch.ones_like(t)
        elif name == "item_history":  # new items: no training users yet
            fill = torch.full_like(t, -1)
        fill[tuple(slice(0, n) for n in old.shape)] = old
        new_state[name] = fill
    grown.load_state_dict(new_state)
    return grown


def _similarity(config) -> str:
    """What the score is: the dot product of the two towers' vectors in every case."""
    base = "cosine" if config.normalize else "dot"
    return f"{base}+item_bias" if config.item_bias else base
