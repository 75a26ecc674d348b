"""A serving BUNDLE loaded, checked, indexed and ready to answer queries.

Loading reads every file of the bundle (recsys_ccl/bundle_format.py), verifies that they agree
(every file's sha256, model_version recomputed from the weights, item embeddings recomputed
from the item tower, a sample of the known users' vectors recomputed from the user tower,
history ids in the catalogue) and raises BundleError naming the file at fault otherwise, so a
broken bundle is refused before it can serve. The known users' vectors are memory-mapped: the
operating system reads the rows that calls ask for, so start-up does not grow with the users.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from recsys_ccl.bundle_format import (
    ANN_INDEX_FILE,
    BUNDLE_FILES,
    BUNDLE_FORMAT_VERSION,
    BUNDLE_KIND,
    model_version,
)
from recsys_ccl.errors import RecsysError
from recsys_ccl.features import encode_values
from recsys_ccl.fileio import sha256_file
from recsys_ccl.index import ApproximateIndex, ExactIndex, ItemIndex, make_index
from recsys_ccl.model import ModelConfig, TwoTower

__all__ = ["BundleError", "LoadedBundle", "load_bundle"]

# stored vectors must match the towers to this (float32 recomputation noise is ~1e-7)
_EMBEDDING_ATOL = 1e-4
# known users whose stored vectors are recomputed from the user tower at load
_USER_CHECKS = 256


class BundleError(RecsysError):
    """A bundle that cannot be served: missing, truncated, corrupted or inconsistent files."""


@dataclass(frozen=True, eq=False)
class LoadedBundle:
    path: Path  # the resolved directory read (a symlinked --bundle resolves at load time)
    manifest: dict
    model: TwoTower  # eval mode
    item_ids: np.ndarray  # (N,) object: item_idx -> item_id
    item_index: dict[str, int]  # item_id -> item_idx
    user_index: dict[str, int]  # user_id -> user_idx
    seen_offsets: np.ndarray  # (U + 1,) int64: user u's items are seen_items[off[u]:off[u+1]]
    seen_items: np.ndarray  # int64 item indices, time order within each user
    item_embeddings: torch.Tensor  # (N, D) float32
    index: ItemIndex
    # (U, D) float32, memory-mapped: each known user's vector from its stored history alone
    # (computed at export): most calls name a known user and add no history. None: computed
    # per call (a test's way to compare the two)
    user_table: torch.Tensor | None = None
    loaded_unix: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.seen_offsets) - 1

    @property
    def dim(self) -> int:
        return self.item_embeddings.shape[1]

    @property
    def pools_history(self) -> bool:
        return self.model.config.sequence_length > 0

    @property
    def embeds_user_ids(self) -> bool:
        return self.model.config.user_id_embedding

    def seen(self, user_idx: int) -> np.ndarray:
        """Item indices the user interacted with (time order)."""
        return self.seen_items[self.seen_offsets[user_idx]: self.seen_offsets[user_idx + 1]]

    def recent_seen(self, users: np.ndarray, length: int) -> torch.Tensor:
        """(len(users), length) int64: each user's last `length` seen items, oldest first,
        left-padded with -1 (the stored history that history pooling sees)."""
        ends = self.seen_offsets[users + 1]
        pos = ends[:, None] - length + np.arange(length)[None, :]  # (n, length)
        valid = pos >= self.seen_offsets[users][:, None]
        items = self.seen_items[np.clip(pos, 0, None)] if len(self.seen_items) else \
            np.zeros(pos.shape, np.int64)
        return torch.from_numpy(np.where(valid, items, -1).astype(np.int64))

    def user_vectors(self, user_idx: list[int | None], histories: list[np.ndarray],
                     features: list[dict | None] | None = None) -> torch.Tensor:
        """(B, D) user-tower outputs.

        user_idx[b]: a known user's index or None (a user known by history and/or features);
        histories[b]: extra item indices (oldest first) appended after the user's stored
        history, of which the user tower reads the most recent sequence_length; features[b]: a
        new user's checked feature values (queries.parse_user_features) or None. Callers
        guarantee each row is embeddable.
        """
        if features is None:
            features = [None] * len(user_idx)
        if self.user_table is not None and all(
                u is not None and not len(h) for u, h in zip(user_idx, histories, strict=True)):
            return self.user_table[torch.tensor(user_idx, dtype=torch.int64)]
        b, cfg = len(user_idx), self.model.config
        hist = None
        length = cfg.sequence_length
        if length > 0:
            hist = torch.full((b, length), -1, dtype=torch.int64)
            stored_only = [i for i, (u, h) in enumerate(zip(user_idx, histories, strict=True))
                           if u is not None and not len(h)]
            if stored_only:
                hist[stored_only] = self.recent_seen(
                    np.array([user_idx[i] for i in stored_only]), length)
            for i, (u, h) in enumerate(zip(user_idx, histories, strict=True)):
                if u is not None and not len(h):
                    continue
                full = h if u is None else np.concatenate([self.seen(u), h])
                recent = full[-length:]
                if len(recent):
                    hist[i, -len(recent):] = torch.from_numpy(recent.astype(np.int64))
        # three kinds of rows, one user-tower call each: known users (by index: their id
        # embedding and catalogue features), new users with features, new users by history
        known = [i for i, u in enumerate(user_idx) if u is not None]
        with_features = [i for i, u in enumerate(user_idx) if u is None and features[i]]
        by_history = [i for i, u in enumerate(user_idx) if u is None and not features[i]]
        pick = (lambda rows: hist[rows]) if hist is not None else (lambda rows: None)
        with torch.inference_mode():
            out = torch.empty(b, self.dim)
            if known:
                by_index = cfg.user_id_embedding or self.model.user_fields is not None
                ids = torch.tensor([user_idx[i] for i in known]) if by_index else None
                out[known] = self.model.encode_users(ids, pick(known))
            if with_features:
                rows = encode_values(self.model.user_fields.spec,
                                     [features[i] for i in with_features])
                out[with_features] = self.model.encode_users(None, pick(with_features),
                                                             user_rows=rows)
            if by_history:
                out[by_history] = self.model.encode_users(None, pick(by_history))
            return out


def _read_model_config(path: Path) -> tuple[dict, ModelConfig]:
    """config.json's model dict as written, and the ModelConfig it describes."""
    raw = json.loads(path.read_text())["model"]
    return raw, ModelConfig.from_dict(raw)


def _read(path: Path, what: str, reader):
    if not path.is_file():
        raise BundleError(f"{path}: missing ({what})")
    try:
        return reader(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, json.JSONDecodeError,
            pl.exceptions.PolarsError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: unreadable {what} ({first})") from exc


def load_bundle(path: str | Path, index: str = "auto") -> LoadedBundle:
    """Read, verify and index a bundle directory (a symlink to one is resolved now). index:
    "auto" (the bundle's HNSW index when it has one, else exact), "exact" or "hnsw"."""
    given = Path(path)
    if not given.exists():
        raise BundleError(f"{given}: no such bundle directory")
    root = given.resolve()
    if not root.is_dir():
        raise BundleError(f"{given}: not a directory")
    where = str(root) if given.absolute() == root else f"{given} -> {root}"
    if not (root / "manifest.json").is_file():
        raise BundleError(f"{where}: not a bundle (no manifest.json)")
    manifest = _read(root / "manifest.json", "manifest", lambda p: json.loads(p.read_text()))
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{root / 'manifest.json'}: not a recsys_ccl bundle manifest")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{root / 'manifest.json'}: bundle format "
                          f"{manifest.get('format_version')}, this server reads "
                          f"{BUNDLE_FORMAT_VERSION}: export the RUN again with this version")
    missing = [f for f in BUNDLE_FILES if not (root / f).is_file()]
    if missing:
        raise BundleError(f"{where}: not a complete bundle, missing {', '.join(missing)}")
    hashes = manifest.get("files")
    expected_files = set(BUNDLE_FILES) - {"manifest.json"}
    if "index" in manifest:
        expected_files.add(ANN_INDEX_FILE)
    if not isinstance(hashes, dict) or set(hashes) != expected_files:
        raise BundleError(f"{root / 'manifest.json'}: 'files' must map every bundle file to "
                          f"its sha256")
    for name, expected in hashes.items():
        if not (root / name).is_file():
            raise BundleError(f"{root / name}: missing (listed in manifest.json)")
        if sha256_file(root / name) != expected:
            raise BundleError(f"{root / name}: does not match its sha256 in manifest.json "
                              "(truncated, corrupted or replaced)")
    # the hash covers config.json's model dict as written (a field added to ModelConfig later
    # must not change the version of bundles exported before it)
    raw_config, config = _read(root / "config.json", "model config", _read_model_config)
    weights = _read(root / "model.safetensors", "weights", load_file)
    model = TwoTower(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise BundleError(f"{root / 'model.safetensors'}: weights do not fit config.json "
                          f"({str(exc).splitlines()[0]})") from exc
    model.eval()
    version = model_version(weights, raw_config)
    if version != manifest.get("model_version"):
        raise BundleError(f"{root / 'model.safetensors'}: content hash {version} differs from "
                          f"manifest model_version {manifest.get('model_version')} "
                          "(corrupted or replaced weights)")

    items = _read(root / "items.parquet", "item vocabulary",
                  lambda p: pl.read_parquet(p, columns=["item_idx", "item_id", "rankable"]))
    if items.height != config.num_items or not items["item_idx"].equals(
            pl.Series("item_idx", np.arange(items.height), dtype=items["item_idx"].dtype)):
        raise BundleError(f"{root / 'items.parquet'}: expected item_idx 0..{config.num_items - 1}"
                          f" in order, got {items.height} rows")
    emb = _read(root / "item_embeddings.safetensors", "item embeddings",
                lambda p: load_file(p)["item_embeddings"])
    if emb.dtype != torch.float32 or tuple(emb.shape) != (config.num_items, config.dim):
        raise BundleError(f"{root / 'item_embeddings.safetensors'}: expected "
                          f"({config.num_items}, {config.dim}) float32, got "
                          f"{tuple(emb.shape)} {emb.dtype}")
    expected = model.encode_all_items()
    if not torch.isfinite(emb).all() or (emb - expected).abs().max() > _EMBEDDING_ATOL:
        raise BundleError(f"{root / 'item_embeddings.safetensors'}: does not match the item "
                          "tower of model.safetensors")
    item_ids = items["item_id"].cast(pl.String).to_numpy().astype(object)
    item_index = {s: i for i, s in enumerate(item_ids)}
    blocked = np.flatnonzero(~items["rankable"].fill_null(False).to_numpy())

    history = _read(root / "user_history.parquet", "user history",
                    lambda p: pl.read_parquet(p, columns=["user_idx", "user_id", "item_ids"]))
    if history.height != config.num_users:
        raise BundleError(f"{root / 'user_history.parquet'}: {history.height} users, the model "
                          f"has {config.num_users}")
    history = history.sort("user_idx")
    lengths = history["item_ids"].list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = history["item_ids"].explode().drop_nulls()
    mapped = (pl.DataFrame({"item_id": flat})
              .join(items.select("item_idx", pl.col("item_id").cast(pl.String)), on="item_id",
                    how="left", maintain_order="left")["item_idx"])
    if mapped.null_count():
        raise BundleError(f"{root / 'user_history.parquet'}: {mapped.null_count()} item ids "
                          "not in items.parquet")
    offsets = np.zeros(config.num_users + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    user_index = {s: i for i, s in enumerate(history["user_id"].cast(pl.String).to_list())}
    users = _read(root / "user_embeddings.npy", "user vectors", _map_user_vectors)
    if tuple(users.shape) != (config.num_users, config.dim):
        raise BundleError(f"{root / 'user_embeddings.npy'}: expected ({config.num_users}, "
                          f"{config.dim}) float32, got {tuple(users.shape)}")

    emb = emb.contiguous()
    bundle = LoadedBundle(
        path=root, manifest=manifest, model=model, item_ids=item_ids, item_index=item_index,
        user_index=user_index, seen_offsets=offsets,
        seen_items=mapped.to_numpy().astype(np.int64), item_embeddings=emb,
        index=_make_index(root, manifest, index, emb, blocked), user_table=users,
    )
    _check_user_vectors(bundle, root / "user_embeddings.npy")
    _warm(bundle)
    return bundle


def _map_user_vectors(path: Path) -> torch.Tensor:
    """user_embeddings.npy memory-mapped (copy-on-write: pages are read on first use and the
    file is never written); pickled objects are refused."""
    arr = np.load(path, mmap_mode="c", allow_pickle=False)
    if arr.dtype != np.float32 or arr.ndim != 2:
        raise ValueError(f"expected a 2-d float32 array, got {arr.ndim}-d {arr.dtype}")
    return torch.from_numpy(arr)


def _check_user_vectors(bundle: LoadedBundle, path: Path) -> None:
    """A seeded sample of the stored user vectors against the user tower over the stored
    histories (what they were computed as at export)."""
    n = bundle.num_users
    if n == 0:
        return
    rng = np.random.default_rng(0)
    users = np.unique(rng.integers(0, n, size=min(_USER_CHECKS, n)))
    stored = bundle.user_table[torch.from_numpy(users)]
    live = dataclasses.replace(bundle, user_table=None).user_vectors(
        users.tolist(), [np.zeros(0, np.int64)] * len(users))
    if not torch.isfinite(stored).all() or (stored - live).abs().max() > _EMBEDDING_ATOL:
        raise BundleError(f"{path}: does not match the user tower of model.safetensors over "
                          "user_history.parquet")


def _make_index(root: Path, manifest: dict, kind: str, emb: torch.Tensor,
                blocked: np.ndarray) -> ItemIndex:
    """The item index to search: "auto" the bundle's HNSW index when it has one, else exact;
    "exact"; "hnsw" the bundle's, or one built now. `blocked` items are never returned."""
    stored = manifest.get("index")
    if kind == "exact" or (kind == "auto" and stored is None):
        return ExactIndex(emb, blocked=blocked)
    if stored is not None:
        return _read(root / ANN_INDEX_FILE, "HNSW index",
                     lambda p: ApproximateIndex.read(p, emb, stored["ef_search"], blocked))
    return make_index(kind, emb, blocked)


def _warm(bundle: LoadedBundle) -> None:
    """One query through every path, so the first real call pays no first-use costs."""
    users = [0] if bundle.embeds_user_ids and bundle.num_users else [None]
    q = bundle.user_vectors(users, [np.arange(min(2, bundle.num_items))])
    bundle.index.search(q, min(10, bundle.num_items))
