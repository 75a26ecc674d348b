"""The serving bundle's format: its files, format version and model_version hash.

Export writes it and serving reads it; both import this module, so the server process needs
none of the training or export machinery.

BUNDLE layout:
    model.safetensors             the model's weights (the user tower, for users given by
                                  history or features at request time)
    config.json                   the model config
    items.parquet                 item_idx int32, item_id string, rankable bool (false: an
                                  item an id-only model cannot rank, no training interaction:
                                  never returned)
    item_embeddings.safetensors   "item_embeddings": (N, D) float32, the item tower's output
    user_history.parquet          user_idx int32, user_id string, item_ids list[string]: the
                                  items each user interacted with in the splits export was
                                  asked for (manifest "history_splits"), in time order: what
                                  exclude_seen drops and the user tower reads
    user_embeddings.npy           (U, D) float32: each known user's vector, the user tower over
                                  their stored history (NumPy .npy, read memory-mapped: no
                                  pickle, no copy of the whole table at start-up)
    item_index.faiss              (catalogues of ANN_MIN_ITEMS items or more, or when asked)
                                  a faiss HNSW index over item_embeddings; its build
                                  parameters and the recall@10 measured against exact search
                                  are in manifest "index"
    manifest.json                 format_version, model_version (content hash of weights and
                                  config), history_splits, the source RUN and DATA by name and
                                  hash, counts, the sha256 of every other file
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from recsys_ccl.fileio import sha256_tensors

__all__ = ["ANN_INDEX_FILE", "ANN_MIN_ITEMS", "ANN_MIN_RECALL", "BUNDLE_FILES",
           "BUNDLE_FORMAT_VERSION", "BUNDLE_KIND", "model_version"]

# 3: the known users' vectors (user_embeddings.npy), an optional ANN index, no machine paths
BUNDLE_FORMAT_VERSION = 3
BUNDLE_KIND = "recsys_ccl.bundle"
BUNDLE_FILES = ("manifest.json", "config.json", "model.safetensors", "items.parquet",
                "item_embeddings.safetensors", "user_history.parquet", "user_embeddings.npy")
ANN_INDEX_FILE = "item_index.faiss"
# From this many items export builds an HNSW index and serving searches it by default: one
# exact query reads the whole (N, D) item matrix, a cost that grows with the catalogue.
ANN_MIN_ITEMS = 250_000
# export raises the index's search breadth (efSearch) until recall@10 against exact search,
# measured on a sample of the bundle's own user vectors, reaches this
ANN_MIN_RECALL = 0.98


def model_version(weights: Mapping[str, torch.Tensor], model_config: dict) -> str:
    """16 hex digits of sha256 over the model config (canonical JSON) and the weights."""
    prefix = json.dumps(model_config, sort_keys=True).encode()
    return sha256_tensors(weights, prefix)[:16]
