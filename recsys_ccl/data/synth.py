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
from typing import NamedTuple

import numpy as np
import polars as pl

from recsys_ccl.errors import DataError
from recsys_ccl.fileio import atomic_file

__all__ = ["LatentTastes", "SynthConfig", "generate_features", "generate_interactions",
           "latent_tastes", "write_synth"]


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
    return _generate(cfg)[0]


class LatentTastes(NamedTuple):
    """What the generator drew before any interaction: item_cluster (I,) and popularity (I,)
    (the within-cluster weight), each user's primary and secondary cluster (U,)."""

    item_cluster: np.ndarray
    popularity: np.ndarray
    primary: np.ndarray
    secondary: np.ndarray


def latent_tastes(cfg: SynthConfig) -> LatentTastes:
    """The latent clusters and popularity behind `cfg`'s data (ids are array positions), e.g.
    for the scores an oracle would give: P(item | user) = (p_primary [c = primary] +
    p_secondary [c = secondary] + (1 - p_primary - p_secondary) / C) x popularity / the
    cluster's popularity mass."""
    return _generate(cfg)[1]


def _generate(cfg: SynthConfig) -> tuple[pl.DataFrame, LatentTastes]:
    """(interactions, the latent tastes they were drawn from)."""
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

    df = pl.DataFrame(
        {"user_id": user.astype(np.int64), "item_id": item.astype(np.int64),
         "timestamp": ts.astype(np.int64), "rating": rating}
    ).sort(["timestamp", "user_id", "item_id"])
    return df, LatentTastes(item_cluster, popularity, primary, secondary)


def generate_features(cfg: SynthConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(item features, user features) tied to the latent taste clusters, from their own random
    stream (the interactions are the same with or without them).

    Items: `category` (the item's cluster, 80 % of the time, else any), `tags` (two of the
    cluster's four tags and one of any cluster's, "|"-separated), `price` (log-normal, its
    median by cluster), `embedding` (16 floats: the cluster's centroid plus unit noise), for
    every item id, including items nobody interacted with (the catalogue). Users: `region`
    (the primary cluster's region, 70 % of the time), `age_band` (weakly tied to taste)."""
    latent = latent_tastes(cfg)
    item_cluster, primary = latent.item_cluster, latent.primary
    rng = np.random.default_rng([cfg.seed, 0xFEA7])
    n_items, n_users = cfg.items, cfg.users
    n_clusters = int(item_cluster.max()) + 1 if n_items else 1
    category = np.where(rng.random(n_items) < 0.8, item_cluster,
                        rng.integers(0, n_clusters, n_items))
    pools = rng.integers(0, 4 * n_clusters, (n_clusters, 4))  # each cluster's four tags
    own = pools[item_cluster[:, None], rng.integers(0, 4, (n_items, 2))]  # (I, 2)
    noise = rng.integers(0, 4 * n_clusters, n_items)
    tags = [f"t{a}|t{b}|t{c}" for a, b, c in zip(own[:, 0], own[:, 1], noise, strict=True)]
    price_median = rng.uniform(5, 50, n_clusters)
    price = price_median[item_cluster] * rng.lognormal(0.0, 0.5, n_items)
    centroids = rng.normal(0.0, 1.0, (n_clusters, 16))
    vectors = (centroids[item_cluster] + rng.normal(0.0, 1.0, (n_items, 16))).astype(np.float32)
    items = pl.DataFrame({
        "item_id": np.arange(n_items, dtype=np.int64),
        "category": [f"c{k}" for k in category],
        "tags": tags,
        "price": np.round(price, 2),
        "embedding": pl.Series(vectors.tolist(), dtype=pl.List(pl.Float32)),
    })
    n_regions = max(1, min(8, n_clusters // 3))
    region = np.where(rng.random(n_users) < 0.7, primary % n_regions,
                      rng.integers(0, n_regions, n_users))
    age = np.clip(primary % 5 + rng.integers(-2, 3, n_users), 0, 4)
    users = pl.DataFrame({
        "user_id": np.arange(n_users, dtype=np.int64),
        "region": [f"r{k}" for k in region],
        "age_band": [["18-24", "25-34", "35-44", "45-54", "55+"][k] for k in age],
    })
    return items, users


def write_synth(cfg: SynthConfig, out: str | Path, item_features: str | Path | None = None,
                user_features: str | Path | None = None) -> pl.DataFrame:
    """Generate and write to `out` (.csv or .parquet, by suffix), atomically; with
    `item_features` / `user_features` also the feature tables (generate_features; a .csv
    writes the item embedding as 16 columns is not supported: use .parquet there)."""
    paths = [Path(p) for p in (out, item_features, user_features) if p is not None]
    for p in paths:
        if p.suffix.lower() not in (".csv", ".parquet"):
            raise DataError(f"output files must end in .csv or .parquet, got {p.name!r}")
    df = generate_interactions(cfg)
    _write(df, Path(out))
    if item_features is not None or user_features is not None:
        items, users = generate_features(cfg)
        if item_features is not None:
            if Path(item_features).suffix.lower() == ".csv":
                raise DataError("--item-features must be .parquet (its embedding column is "
                                "a list of floats, which CSV cannot hold)")
            _write(items, Path(item_features))
        if user_features is not None:
            _write(users, Path(user_features))
    return df


def _write(df: pl.DataFrame, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        if out.suffix.lower() == ".csv":
            df.write_csv(tmp)
        else:
            df.write_parquet(tmp)


def _physical_memory() -> int:
    """Bytes of physical memory (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
