"""`recsys-ccl export`: a RUN directory (+ its DATA) -> a serving BUNDLE (layout and hash in
recsys_ccl/bundle_format.py).

`history_splits` chooses which interactions the bundle's user_history holds: all of them by
default (production: what a user has done is "seen", and histories are as long as they can
be), or those before an evaluated split ("train,valid" for test) to serve exactly what
`evaluate` scores on it (its held-out items are not seen, and the user tower reads what it
read offline).

`new_items` (a feature table keyed by item_id, for a model with item features) adds items to
the catalogue, or changes the features of items it has, without retraining: they are encoded
by the training spec (extra columns ignored, unseen values in the out-of-vocabulary bucket, a
missing field column an error), new items are cold (feature path only), and the bundle gets a
new model_version.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file

from recsys_ccl.bundle_format import (
    ANN_INDEX_FILE,
    ANN_MIN_ITEMS,
    ANN_MIN_RECALL,
    BUNDLE_FILES,
    BUNDLE_FORMAT_VERSION,
    BUNDLE_KIND,
    model_version,
)
from recsys_ccl.checkpoint import load_run, require_same_data
from recsys_ccl.data.dataset import Histories, load_data_dir
from recsys_ccl.data.schema import SPLITS
from recsys_ccl.errors import RecsysError
from recsys_ccl.fileio import atomic_directory, sha256_file, write_json_atomic
from recsys_ccl.index import ApproximateIndex
from recsys_ccl.model import TwoTower
from recsys_ccl.progress import Progress, heartbeat

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
                  new_items: str | Path | None = None,
                  index: str = "auto", progress: bool = False) -> dict:
    """Write the bundle atomically; return its manifest. history_splits: the splits whose
    interactions become the users' stored histories (default all); device: where the towers
    run over the catalogue and the users; new_items: a feature table of items to add or
    change; index: "auto" (an HNSW index from ANN_MIN_ITEMS items), "hnsw" or "exact"."""
    if index not in ("auto", "hnsw", "exact"):
        raise RecsysError(f"--index must be auto, hnsw or exact, got {index!r}")
    splits = parse_history_splits(history_splits)
    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    data = load_data_dir(data_dir)
    require_same_data(config, data, run_dir)
    # an id-only model cannot rank an item without training interactions (its embedding was
    # never trained): the server never returns one, as evaluation never ranks one
    catalogue = data.items.select(
        "item_idx", "item_id",
        ((pl.col("train_count") > 0) | (model.item_fields is not None)).alias("rankable"))
    added = {"added": 0, "changed": 0}
    if new_items is not None:
        model, catalogue, added = with_items(model, catalogue, new_items)
        config = {**config, "model": model.config.to_dict()}
    num_items = catalogue.height
    dev = torch.device(device)
    model = model.to(dev)
    with heartbeat("export: item vectors", enabled=progress):
        item_emb = model.encode_all_items().float().cpu().contiguous()

    # the chosen splits' interactions, in time order within each user
    seen = pl.concat([pl.read_parquet(data.path / f"{s}.parquet") for s in splits])
    seen = seen.sort(["user_idx", "ts"], nulls_last=False, maintain_order=True)
    history = (
        seen.join(data.items.select("item_idx", "item_id"), on="item_idx")
        .group_by("user_idx", maintain_order=True).agg(pl.col("item_id").alias("item_ids"))
    )
    history = (data.users.join(history, on="user_idx", how="left")
               .with_columns(pl.col("item_ids").fill_null(pl.lit([], pl.List(pl.String))))
               .sort("user_idx"))
    user_emb = known_user_vectors(model, seen, data.num_users, progress=progress)
    model = model.cpu()
    ann = None
    if index == "hnsw" or (index == "auto" and num_items >= ANN_MIN_ITEMS):
        ann = _build_ann(item_emb, user_emb, progress)

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": BUNDLE_KIND,
        "model_version": model_version(weights, config["model"]),
        "created_unix": int(time.time()),
        "source": {"run": run_dir.absolute().name,
                   "run_config_sha256": sha256_file(run_dir / "config.json"),
                   "data": data.path.absolute().name,
                   "data_manifest_sha256": data.manifest_sha256},
        "counts": {"users": data.num_users, "items": num_items,
                   "embedding_dim": int(item_emb.shape[1])},
        "similarity": _similarity(model.config),
        "history_splits": list(splits),
    }
    if new_items is not None:
        manifest["new_items"] = {"name": Path(new_items).name,
                                 "sha256": sha256_file(new_items), **added}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(weights, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"model": config["model"]}, indent=2,
                                                    sort_keys=True) + "\n")
        catalogue.write_parquet(tmp / "items.parquet")
        save_file({"item_embeddings": item_emb}, tmp / "item_embeddings.safetensors")
        history.write_parquet(tmp / "user_history.parquet")
        np.save(tmp / "user_embeddings.npy", user_emb.numpy(), allow_pickle=False)
        files = list(BUNDLE_FILES)
        if ann is not None:
            index_doc, built = ann
            built.write(tmp / ANN_INDEX_FILE)
            manifest["index"] = index_doc
            files.append(ANN_INDEX_FILE)
        manifest["files"] = {name: sha256_file(tmp / name) for name in files
                             if name != "manifest.json"}
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def known_user_vectors(model: TwoTower, seen: pl.DataFrame, num_users: int,
                       batch: int = 8192, progress: bool = False) -> torch.Tensor:
    """(U, D) float32 on the CPU: each known user's vector from the user tower over their
    stored history (`seen`: user_idx, item_idx in time order within each user), exactly what
    the server computes for a user named by id with no request history."""
    cfg, dev = model.config, model.device
    histories = None
    if cfg.sequence_length > 0:
        users = torch.from_numpy(seen["user_idx"].to_numpy().astype(np.int64))
        items = torch.from_numpy(seen["item_idx"].to_numpy().astype(np.int64))
        histories = Histories.from_pairs(users, items, num_users, cfg.sequence_length)
    by_index = cfg.user_id_embedding or model.user_fields is not None
    out = torch.empty(num_users, cfg.dim)
    was_training = model.training
    model.eval()
    with torch.no_grad(), Progress("export: user vectors", num_users, "users",
                                   enabled=progress) as bar:
        for s in range(0, num_users, batch):
            users = torch.arange(s, min(s + batch, num_users))
            hist = histories[users].to(dev) if histories is not None else None
            out[users] = model.encode_users(users.to(dev) if by_index else None,
                                            hist).float().cpu()
            bar.update(len(users))
    model.train(was_training)
    return out


def _build_ann(item_emb: torch.Tensor, user_emb: torch.Tensor, progress: bool,
               queries: int = 1000, seed: int = 0) -> tuple[dict, ApproximateIndex]:
    """An HNSW index over the item vectors, its efSearch raised until recall@10 against
    exact search reaches ANN_MIN_RECALL on a seeded sample of the known users' vectors."""
    t0 = time.perf_counter()
    with heartbeat(f"export: HNSW index over {item_emb.shape[0]:,} items", enabled=progress):
        ann = ApproximateIndex(item_emb)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    sample = user_emb[torch.randperm(len(user_emb), generator=g)[:queries]]
    recall = ann.tune(sample, k=10, min_recall=ANN_MIN_RECALL)
    doc = {"kind": "hnsw", **ann.params, "recall@10": round(recall, 4),
           "recall_queries": len(sample), "build_seconds": round(build_s, 1)}
    print(f"export: HNSW index: recall@10 {recall:.4f} against exact search on "
          f"{len(sample):,} user vectors at efSearch {doc['ef_search']} (built in "
          f"{build_s:.0f} s)", file=sys.stderr)
    if recall < ANN_MIN_RECALL:
        print(f"warning: the HNSW index's recall@10 {recall:.4f} is below "
              f"{ANN_MIN_RECALL}: serve it with --index exact for exact answers",
              file=sys.stderr)
    return doc, ann


def with_items(model: TwoTower, catalogue: pl.DataFrame, path: str | Path
               ) -> tuple[TwoTower, pl.DataFrame, dict[str, int]]:
    """The model and catalogue (item_idx, item_id, rankable) with the items of the feature table at
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
         "item_id": pl.Series(new_ids, dtype=pl.String),
         "rankable": pl.Series([True] * len(new_ids), dtype=pl.Boolean)})])
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
