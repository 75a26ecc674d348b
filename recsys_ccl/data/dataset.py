"""Loading a DATA directory (written by `prepare`) into tensors for training and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from recsys_ccl.data.schema import FORMAT_VERSION, ITEMS_SCHEMA, SPLIT_SCHEMA, SPLITS, USERS_SCHEMA
from recsys_ccl.errors import DataError
from recsys_ccl.fileio import sha256_file

__all__ = ["Histories", "InteractionData", "csr_from_pairs", "histories_before",
           "item_histories", "load_data_dir", "recent_histories", "train_histories"]


@dataclass(frozen=True)
class InteractionData:
    """A DATA directory in memory. Pairs are int64 tensors (user_idx, item_idx), ordered by user
    then time (as written by prepare)."""

    path: Path
    manifest: dict
    manifest_sha256: str
    num_users: int
    num_items: int
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (users (n,), items (n,))
    item_count: torch.Tensor  # (I,) int64 train interactions per item
    item_log_q: torch.Tensor  # (I,) float32 log share of train interactions
    users: pl.DataFrame  # user_idx, user_id
    items: pl.DataFrame  # item_idx, item_id, train_count, log_q
    # "item" / "user" -> (FeatureSpec, encoded table in index order), when prepared with them
    features: dict = field(default_factory=dict)

    def feature_rows(self, side: str) -> dict | None:
        """One side's encoded rows as tensors (features.feature_tensors), or None."""
        if side not in self.features:
            return None
        from recsys_ccl.features import feature_tensors

        spec, table = self.features[side]
        return feature_tensors(table, spec)

    def cold_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(items (I,), users (U,)) bool: no training interaction."""
        users, _ = self.splits["train"]
        warm_users = torch.zeros(self.num_users, dtype=torch.bool)
        warm_users[users] = True
        return self.item_count == 0, ~warm_users


def _read(path: Path, schema: pl.Schema | None, expected_sha256: str | None) -> pl.DataFrame:
    """A Parquet file of the DATA directory, hash-checked; its `schema` columns (all: None)."""
    if not path.exists():
        raise DataError(f"missing {path.name} in {path.parent} (not a complete DATA directory)")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise DataError(f"{path} does not match the hash in manifest.json (truncated, "
                        f"corrupted or replaced)")
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {path}: {first}") from exc
    if schema is None:
        return df
    missing = [c for c in schema.names() if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}; found {df.columns}")
    return df.select(schema.names())


def load_data_dir(path: str | Path) -> InteractionData:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"DATA directory not found: {path}")
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"not a DATA directory (no manifest.json): {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        hashes = manifest.get("files")
        if not isinstance(hashes, dict):
            raise ValueError("no 'files' mapping of sha256s")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"corrupt {manifest_path}: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: DATA format {manifest.get('format_version')}, this "
                        f"version reads {FORMAT_VERSION}: run `recsys-ccl prepare` again")
    users = _read(path / "users.parquet", USERS_SCHEMA, hashes.get("users.parquet"))
    items = _read(path / "items.parquet", ITEMS_SCHEMA, hashes.get("items.parquet"))
    items = items.sort("item_idx")
    splits = {}
    for name in SPLITS:
        df = _read(path / f"{name}.parquet", SPLIT_SCHEMA, hashes.get(f"{name}.parquet"))
        splits[name] = (torch.from_numpy(df["user_idx"].to_numpy().astype("int64")),
                        torch.from_numpy(df["item_idx"].to_numpy().astype("int64")))
    count = torch.from_numpy(items["train_count"].to_numpy().astype("int64"))
    features = _read_features(path, hashes, users.height, items.height)
    return InteractionData(
        features=features,
        path=path, manifest=manifest, manifest_sha256=sha256_file(manifest_path),
        num_users=users.height, num_items=items.height, splits=splits, item_count=count,
        item_log_q=torch.tensor(items["log_q"].to_numpy(), dtype=torch.float32), users=users,
        items=items,
    )


def _read_features(path: Path, hashes: dict, num_users: int, num_items: int) -> dict:
    """The DATA directory's feature specs and encoded tables, {} when it has none."""
    from recsys_ccl.data.schema import FEATURES_FORMAT_VERSION, FEATURES_JSON
    from recsys_ccl.features import FeatureSpec

    spec_path = path / FEATURES_JSON
    if not spec_path.exists():
        return {}
    if hashes.get(FEATURES_JSON) is not None and sha256_file(spec_path) != hashes[FEATURES_JSON]:
        raise DataError(f"{spec_path} does not match the hash in manifest.json")
    doc = json.loads(spec_path.read_text())
    if doc.get("format_version") != FEATURES_FORMAT_VERSION:
        raise DataError(f"{spec_path}: features format {doc.get('format_version')}, this "
                        f"version reads {FEATURES_FORMAT_VERSION}: run `recsys-ccl prepare` again")
    out = {}
    for side, rows in (("item", num_items), ("user", num_users)):
        if side not in doc:
            continue
        spec = FeatureSpec.from_dict(doc[side])
        file = path / f"{side}_features.parquet"
        idx = f"{side}_idx"
        table = _read(file, None, hashes.get(file.name)).sort(idx)
        if table.height != rows or table[idx].to_list() != list(range(rows)):
            raise DataError(f"{file} does not hold one row per {side} index")
        out[side] = (spec, table)
    return out


def csr_from_pairs(users: torch.Tensor, items: torch.Tensor,
                   num_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr (U+1,), indices) with each user's items in their given order."""
    order = torch.argsort(users, stable=True)
    counts = torch.bincount(users, minlength=num_users)
    indptr = torch.zeros(num_users + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, items[order]


class Histories:
    """Each row's items in their given (time) order, compactly (CSR), and for a batch of rows
    their most recent `length` as a left-padded matrix on demand: `histories[rows]` is
    (B, length) int64, -1 where a row has fewer items. Memory grows with the interactions,
    not with rows x length."""

    def __init__(self, indptr: torch.Tensor, items: torch.Tensor, length: int):
        self.indptr = indptr  # (R + 1,) int64
        self.items = items  # (nnz,) int32 or int64
        self.length = length

    @classmethod
    def from_pairs(cls, rows: torch.Tensor, items: torch.Tensor, num_rows: int,
                   length: int) -> Histories:
        indptr, indices = csr_from_pairs(rows, items, num_rows)
        small = indices.numel() == 0 or int(indices.max()) < 2**31
        return cls(indptr, indices.to(torch.int32) if small else indices, length)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B,) int64 -> (B, length) int64: each row's last `length` items, oldest
        first, padded with -1 on the left."""
        start, end = self.indptr[rows], self.indptr[rows + 1]
        pos = end[:, None] - self.length + torch.arange(self.length)  # (B, L)
        valid = pos >= start[:, None]
        if self.items.numel() == 0:
            return torch.full(pos.shape, -1, dtype=torch.int64)
        picked = self.items[pos.clamp_min(0)].to(torch.int64)
        return torch.where(valid, picked, -1)


def recent_histories(users: torch.Tensor, items: torch.Tensor, num_users: int,
                     length: int) -> torch.Tensor:
    """(U, L) int64: each user's last `length` items in the given (time) order, padded with -1
    on the left; a user without items gets a row of -1."""
    return Histories.from_pairs(users, items, num_users, length)[torch.arange(num_users)]


def item_histories(data: InteractionData, length: int) -> torch.Tensor:
    """(I, M) int32: each item's last `length` train users in the train split's order, -1
    padded on the left (the item tower's neighbourhood, recsys_ccl/model.py)."""
    users, items = data.splits["train"]
    return recent_histories(items, users, data.num_items, length).to(torch.int32)


def histories_before(data: InteractionData, split: str, length: int) -> Histories | None:
    """What each user had done before `split` (the model's input when it is evaluated on it):
    train for "valid", train then valid for "test"; None when length = 0. The published
    leave-one-out protocol: the validation item joins the history for the test."""
    if length <= 0:
        return None
    parts = ["train"] + (["valid"] if split == "test" else [])
    users = torch.cat([data.splits[p][0] for p in parts])
    items = torch.cat([data.splits[p][1] for p in parts])
    return Histories.from_pairs(users, items, data.num_users, length)


def train_histories(data: InteractionData, length: int) -> Histories | None:
    """Each user's train items for history pooling (`histories[users]`: the most recent L,
    (B, L)); None when L = 0."""
    if length <= 0:
        return None
    return Histories.from_pairs(*data.splits["train"], data.num_users, length)
