"""The serving bundle's format: its files, format version and model_version hash.

Export writes it and serving reads it; both import this module, so the server process needs
none of the training or export machinery.

BUNDLE layout:
    model.safetensors             the model's weights (user tower for ids and histories)
    config.json                   the model config
    items.parquet                 item_idx int32, item_id string
    item_embeddings.safetensors   "item_embeddings": (N, D) float32, the item tower's output
    user_history.parquet          user_idx int32, user_id string, item_ids list[string]: the
                                  items each user interacted with in the splits export was
                                  asked for (manifest "history_splits"), in time order: what
                                  exclude_seen drops and history pooling reads
    manifest.json                 format_version, model_version (content hash of weights and
                                  config), history_splits, the source run and data hashes,
                                  counts, the sha256 of every other file
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from recsys_ccl.fileio import sha256_tensors

__all__ = ["BUNDLE_FILES", "BUNDLE_FORMAT_VERSION", "BUNDLE_KIND", "model_version"]

# 2: the manifest records history_splits (which splits user_history.parquet holds)
BUNDLE_FORMAT_VERSION = 2
BUNDLE_KIND = "recsys_ccl.bundle"
BUNDLE_FILES = ("manifest.json", "config.json", "model.safetensors", "items.parquet",
                "item_embeddings.safetensors", "user_history.parquet")


def model_version(weights: Mapping[str, torch.Tensor], model_config: dict) -> str:
    """16 hex digits of sha256 over the model config (canonical JSON) and the weights."""
    prefix = json.dumps(model_config, sort_keys=True).encode()
    return sha256_tensors(weights, prefix)[:16]
