"""`recsys-ccl synth`: the built-in interaction generator (the embedded default data set).

Generative story, all vectorised in NumPy:
- every item belongs to one of C latent taste clusters and has a power-law popularity
  (weight ∝ rank^-zipf, ranks shuffled across clusters);
- every user has a primary and a secondary taste cluster and a log-normal activity level;
- each interaction picks its cluster (primary with `p_primary`, secondary with `p_secondary`,
  otherwise any cluster), then an item within the cluster in proportion to popularity;
- timestamps are spread over a window that starts at a per-user time; ratings are higher
  for items from the user's own clusters.
So a model that learns users' tastes beats global popularity by a wide margin, while popularity
itself remains a meaningful baseline (the skew is real).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_ccl.errors import DataError
from recsys_ccl.fileio import atomic_file

__all__ = ["SynthConfig", "generate_interactions", "write_synth"]


@dataclass(frozen=True)
class SynthConfig:
    users: int = 6_000
    items: int = 3_000
    interactions: int = 300_000
    clusters: int = 24
    zipf: float = 0.9
    p_primary: float = 0.6
    p_secondary: float = 0.25
    activity_sigma: float = 0.8  # log-normal spread of per-user activity
    seed: int = 0
    start_ts: int = 1_600_000_000  # seconds since the epoch
    span_s: int = 365 * 24 * 3600

    def memory_bytes(self) -> int:
        """Peak bytes of generating (a measured bound per interaction, user and item)."""
        return 112 * self.interactions + 48 * self.users + 32 * self.items

    def validate(self) -> None:
        for name in ("users", "items", "interactions", "clusters"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name} must be >= 1, got {getattr(self, name)}")
        # the generator holds a few arrays per interaction, per user and per item: refuse what
        # cannot fit rather than let a typo take the machine's memory
        need, have = self.memory_bytes(), _physical_memory()
        if have and need > have:
            raise DataError(f"--users {self.users:,} --items {self.items:,} --interactions "
                            f"{self.interactions:,} need about {need / 2**30:,.1f} GiB while "
                            f"generating; this machine has {have / 2**30:,.1f} GiB")
        if not 0 <= self.p_primary + self.p_secondary <= 1:
            raise DataError("p_primary + p_secondary must be in [0, 1]")


def generate_interactions(cfg: SynthConfig) -> pl.DataFrame:
    """Return `cfg.interactions` rows (user_id, item_id, timestamp, rating), sorted by time.

    Deterministic for a given config. Users get at least one interaction each while
    interactions >= users.
    """
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n, n_users, n_items = cfg.interactions, cfg.users, cfg.items
    n_clusters = min(cfg.clusters, n_items)

    # -- items: cluster and power-law popularity --
    item_cluster = rng.permutation(np.arange(n_items) % n_clusters)
    popularity = (rng.permutation(n_items) + 1.0) ** -cfg.zipf  # (I,)
    by_cluster = np.argsort(item_cluster, kind="stable")  # item ids grouped by cluster
    cum = np.cumsum(popularity[by_cluster])  # (I,)
    first = np.searchsorted(item_cluster[by_cluster], np.arange(n_clusters), side="left")
    last = np.searchsorted(item_cluster[by_cluster], np.arange(n_clusters), side="right") - 1
    cum_before = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)  # (C,)
    cluster_mass = cum[last] - cum_before  # (C,)

    # -- users: tastes and activity --
    primary = rng.integers(0, n_clusters, n_users)
    secondary = (primary + rng.integers(1, max(n_clusters, 2), n_users)) % n_clusters
    activity = rng.lognormal(0.0, cfg.activity_sigma, n_users)
    base = 1 if n >= n_users else 0
    counts = base + rng.multinomial(n - base * n_users, activity / activity.sum())
    user = np.repeat(np.arange(n_users), counts)  # (n,)

    # -- interactions: cluster, then item within the cluster by popularity --
    r = rng.random(n)
    random_cluster = rng.integers(0, n_clusters, n)
    cluster = np.where(
        r < cfg.p_primary,
        primary[user],
        np.where(r < cfg.p_primary + cfg.p_secondary, secondary[user], random_cluster),
    )
    target = cum_before[cluster] + rng.random(n) * cluster_mass[cluster]
    pos = np.minimum(np.searchsorted(cum, target, side="right"), last[cluster])
    item = by_cluster[pos]

    # -- time and rating --
    user_start = cfg.start_ts + rng.integers(0, cfg.span_s // 2, n_users)
    ts = user_start[user] + rng.integers(0, cfg.span_s // 2, n)
    affinity = np.where(cluster == primary[user], 1.2, np.where(cluster == secondary[user],
                                                                0.6, 0.0))
    rating = np.clip(np.rint(2.9 + affinity + rng.normal(0.0, 0.8, n)), 1, 5).astype(np.int8)

    return pl.DataFrame(
        {"user_id": user.astype(np.int64), "item_id": item.astype(np.int64),
         "timestamp": ts.astype(np.int64), "rating": rating}
    ).sort(["timestamp", "user_id", "item_id"])


def write_synth(cfg: SynthConfig, out: str | Path) -> pl.DataFrame:
    """Generate and write to `out` (.csv or .parquet, by suffix), atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise DataError(f"--out must end in .csv or .parquet, got {out.name!r}")
    df = generate_interactions(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        if suffix == ".csv":
            df.write_csv(tmp)
        else:
            df.write_parquet(tmp)
    return df


def _physical_memory() -> int:
    """Bytes of physical memory (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
