"""Cold start: how well items nobody interacted with in training are recommended, and what the
feature path costs on warm items.

    python benchmarks/bench_cold_start.py                      # synthetic data with features
    python benchmarks/bench_cold_start.py --data DATA          # a DATA directory of yours,
                                                               # prepared with --item-features
                                                               # and --cold-items
    (real ratings with genres: benchmarks/movielens_from_recbole.py makes MovieLens 100K)

Trains the feature model (TrainConfig features="auto", its id_dropout) and the id-only model
(features="none") on the same DATA directory with the same seed and epochs, then reports
Recall@K and NDCG@K on the test rows of three segments:

- warm_items: rows of items with training interactions, every item ranked;
- cold_items: rows of items without any, every item ranked (new items compete with the
  catalogue, as they do when served);
- cold_among_cold: the same rows, only the cold items ranked (the usual cold-start protocol:
  how well new items are ordered among themselves).

Beside the models, baselines that need no training (ties broken at random for each user,
seeded, never by item index: ids often follow the catalogue's age, which would leak
popularity):

- popularity: an item's training count (0 for every cold item: a random order there);
- category_popularity: a warm item's count, a cold item the mean count of the warm items that
  share its categorical and multi-hot values (its category, its tags);
- category_tag_affinity: the user's training profile over those values (the share of the
  user's items with each value) scored against the item's values, ties broken by popularity;
- affinity_x_category_popularity: that affinity times the item's category popularity (a
  cold item in the user's genres, as popular as such items are);
- each of the three again, `_with_numeric`, when the items have numeric fields: their deciles
  count as values too (a release year's decile, a price band);
- random scores;
- on the synthetic data, the generator's own tastes: taste_oracle (P(the item's cluster |
  user): what perfect features could tell, the ceiling on cold items ranked among
  themselves) and oracle (P(item | user), within-cluster popularity included). Not
  baselines: the ratio to the best baseline leaves them out.

The last line is a JSON summary with the feature model's cold-item Recall@K over the best
baseline's, for both cold segments. Writes bench_cold_start.csv and bench_cold_start.png (or
--name's) to benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, print_table, write_csv

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.data.prepare import PrepareConfig, prepare
from recsys_ccl.data.synth import SynthConfig, latent_tastes, write_synth
from recsys_ccl.evaluation import (
    cold_segments,
    evaluate_embeddings,
    evaluate_run,
    popularity_scores,
)
from recsys_ccl.model import numeric_bin, quantile_edges
from recsys_ccl.train import train


def synth_config(args) -> SynthConfig:
    return SynthConfig(users=args.users, items=args.items, interactions=args.interactions,
                       seed=args.seed)


def synthetic_data(root: Path, args) -> Path:
    """synth with features -> prepare with --cold-items (temporal split)."""
    cfg = synth_config(args)
    write_synth(cfg, root / "log.parquet", root / "items.parquet", root / "users.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet",
                          item_features=str(root / "items.parquet"),
                          user_features=str(root / "users.parquet"),
                          cold_items=args.cold_items, seed=args.seed), root / "data")
    return root / "data"


def item_values(data, numeric: bool, bins: int = 10) -> torch.Tensor | None:
    """(I, V) float32: each item's values of its categorical and multi-hot fields, one column
    per value (the out-of-vocabulary code left out), and with `numeric` of its numeric fields,
    one column per quantile bin (`bins` of them: a release year's decile, a price band); each
    field's part of a row sums to 1 (0 for an item without a value). None when the items have
    no such field (vector fields have no values to share)."""
    if "item" not in data.features:
        return None
    spec, _ = data.features["item"]
    rows = data.feature_rows("item")
    blocks = []
    for f in spec.fields:
        if f.type in ("categorical", "multi_hot"):
            codes = rows[f.name] if f.type == "multi_hot" else rows[f.name][:, None]
            m = torch.zeros(data.num_items, f.cardinality + 1)  # + the multi-hot padding code
            m.scatter_add_(1, codes, torch.ones(codes.shape))
            m = m[:, 1:f.cardinality]
        elif f.type == "numeric" and numeric:
            m = numeric_bins(rows[f.name], bins)
        else:
            continue
        blocks.append(m / m.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(blocks, 1) if blocks else None


def numeric_bins(column: torch.Tensor, bins: int) -> torch.Tensor:
    """column (I, 2) (value, missing) -> (I, bins) one-hot of the value's quantile bin among
    the present values, as the model's numeric_bins draws them (a zero row where missing)."""
    edges = quantile_edges(column, bins)
    return torch.nn.functional.one_hot(numeric_bin(column, edges), bins + 1)[:, :bins].float()


def category_prior(data, values: torch.Tensor) -> torch.Tensor:
    """(I,) a warm item's training count; a cold item's, the mean count of the warm items
    sharing its values (weighted as in `values`)."""
    count = data.item_count.float()
    warm = count > 0
    per_value = (values[warm] * count[warm, None]).sum(0) / values[warm].sum(0).clamp_min(1e-9)
    fields = values.sum(1).clamp_min(1)
    return torch.where(warm, count, values @ per_value / fields)


def category_popularity(data, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item vectors: score = category_prior."""
    return torch.ones(data.num_users, 1), category_prior(data, values)[:, None]


def user_profiles(data, values: torch.Tensor) -> torch.Tensor:
    """(U, V) each user's share of training items with each value."""
    users, items = data.splits["train"]
    profile = torch.zeros(data.num_users, values.shape[1])
    profile.index_add_(0, users, values[items])
    return profile / torch.bincount(users, minlength=data.num_users).clamp_min(1)[:, None]


def value_affinity(data, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item vectors: score = <the user's profile, the item's values> + 1e-3 log(1 +
    the item's count) (ties broken by popularity)."""
    user_vec = torch.cat([user_profiles(data, values),
                          torch.full((data.num_users, 1), 1e-3)], 1)
    item_vec = torch.cat([values, torch.log1p(data.item_count.float())[:, None]], 1)
    return user_vec, item_vec


def affinity_times_prior(data, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item vectors: score = <the user's profile, the item's values> x the item's
    category_prior."""
    return user_profiles(data, values), values * category_prior(data, values)[:, None]


def with_random_ties(users: torch.Tensor, items: torch.Tensor, generator: torch.Generator,
                     width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ranking with ties broken at random for each user apart: `width` more
    coordinates add a seeded random product per (user, item) pair, a millionth of the
    largest score in size (below the smallest gap the baselines make, above float32
    rounding). One order shared by every user would not do: where a few cold items hold most
    test rows, that one draw decides the segment."""
    scale = float((users[:1024] @ items.T).abs().max().clamp_min(1e-30))
    u = torch.randn(users.shape[0], width, generator=generator) * (1e-6 * scale / width)
    v = torch.randn(items.shape[0], width, generator=generator)
    return torch.cat([users, u], 1), torch.cat([items, v], 1)


def oracle_vectors(data_dir: Path, cfg: SynthConfig
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic data only: the scores of the generator's own tastes. taste_oracle = P(the
    item's cluster | user), what perfect item features could tell (no feature carries an
    item's popularity within its cluster: the ceiling on cold items ranked among
    themselves); oracle = P(item | user), popularity included."""
    import polars as pl

    latent = latent_tastes(cfg)
    C = int(latent.item_cluster.max()) + 1
    item_ids = pl.read_parquet(data_dir / "items.parquet").sort("item_idx")["item_id"]
    user_ids = pl.read_parquet(data_dir / "users.parquet").sort("user_idx")["user_id"]
    item_pos = item_ids.cast(pl.Int64).to_numpy()
    cluster = torch.from_numpy(latent.item_cluster[item_pos])
    weight = torch.from_numpy(latent.popularity[item_pos]).float()
    user_pos = user_ids.cast(pl.Int64).to_numpy()
    primary = torch.from_numpy(latent.primary[user_pos])
    secondary = torch.from_numpy(latent.secondary[user_pos])
    p_cluster = torch.full((len(user_pos), C), (1 - cfg.p_primary - cfg.p_secondary) / C)
    rows = torch.arange(len(user_pos))
    p_cluster[rows, primary] += cfg.p_primary
    p_cluster[rows, secondary] += cfg.p_secondary
    one_hot = torch.nn.functional.one_hot(cluster, C).float()
    all_weight = torch.from_numpy(latent.popularity).float()
    mass = torch.zeros(C).index_add_(0, torch.from_numpy(latent.item_cluster), all_weight)
    return {"taste_oracle": (p_cluster, one_hot),
            "oracle": (p_cluster, one_hot * (weight / mass[cluster])[:, None])}


SEGMENTS = ("warm_items", "cold_items", "cold_among_cold")


def segment_masks(data) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{segment: (the items whose test rows count, the items ranked (None: all))}, as
    evaluate_run's segments of the same names."""
    cold, _ = data.cold_masks()
    return {"warm_items": (~cold, None), "cold_items": (cold, None),
            "cold_among_cold": (cold, cold)}


HEURISTICS = ("category_popularity", "category_tag_affinity", "affinity_x_category_popularity")
BASELINES = ("popularity", *HEURISTICS, *(f"{h}_with_numeric" for h in HEURISTICS), "random")


def baseline_rows(data, k: int, seed: int, synth: SynthConfig | None = None) -> list[dict]:
    """The baselines that need no training on `data` (a loaded DATA directory), on the same
    segments as the models; with `synth` (the data is that synthetic set) the oracles too."""
    g = torch.Generator().manual_seed(seed)
    baselines = {"popularity": popularity_scores(data)}
    variants = {"": item_values(data, numeric=False)}
    if "item" in data.features and any(f.type == "numeric"
                                       for f in data.features["item"][0].fields):
        variants["_with_numeric"] = item_values(data, numeric=True)
    for suffix, values in variants.items():
        if values is None:
            continue
        baselines[f"category_popularity{suffix}"] = category_popularity(data, values)
        baselines[f"category_tag_affinity{suffix}"] = value_affinity(data, values)
        baselines[f"affinity_x_category_popularity{suffix}"] = affinity_times_prior(data,
                                                                                  values)
    if synth is not None:
        baselines.update(oracle_vectors(data.path, synth))
    baselines = {name: with_random_ties(*vectors, g) for name, vectors in baselines.items()}
    baselines["random"] = (torch.randn(data.num_users, 32, generator=g),
                           torch.randn(data.num_items, 32, generator=g))
    rows = []
    for name, (users, items) in baselines.items():
        for seg, (item_mask, ranked) in segment_masks(data).items():
            m = evaluate_embeddings(users, items, data, "test", k, item_mask=item_mask,
                                    rankable=ranked)
            rows.append(_row(name, seg, m, k))
    return rows


def model_rows(run: Path, data_dir: Path, k: int) -> list[dict]:
    """A trained RUN on the segments, as `recsys-ccl evaluate` reports them."""
    result = evaluate_run(run, data_dir, "test", k)
    return [_row(run.name, seg, result["segments"][seg], k) for seg in SEGMENTS]


def _row(model: str, segment: str, m: dict, k: int) -> dict:
    return {"model": model, "segment": segment, f"recall@{k}": m[f"recall@{k}"],
            f"ndcg@{k}": m[f"ndcg@{k}"], "users": m["users"]}


def plot(rows: list[dict], k: int, path: Path, title: str) -> None:
    """One panel per segment: Recall@K of every model and baseline as horizontal bars (the
    trained models in colour, the oracles hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"recall@{k}"
    segments = list(dict.fromkeys(r["segment"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))[::-1]  # first on top
    colour = {"features": "tab:blue", "id_only": "tab:orange"}
    fig, axes = plt.subplots(1, len(segments), figsize=(4 * len(segments) + 3, 0.32 * len(models)
                                                        + 1.6), sharey=True)
    for ax, seg in zip(axes, segments, strict=True):
        values = [next((r[metric] for r in rows if r["model"] == m and r["segment"] == seg),
                       0.0) for m in models]
        ax.barh(range(len(models)), values, color=[colour.get(m, "0.6") for m in models],
                hatch=["//" if "oracle" in m else "" for m in models])
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
        ax.set_title(seg, fontsize=10)
        ax.set_xlabel(metric)
        ax.set_xlim(0, max([*values, 1e-9]) * 1.25)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(models)), models, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="a DATA directory with item features and cold test items (default: "
                        "synthetic data made here)")
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--interactions", type=int, default=150_000)
    p.add_argument("--cold-items", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--id-dropout", type=float, default=None,
                   help="the feature model's id_dropout (default: TrainConfig's)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more TrainConfig keys for both models")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="bench_cold_start",
                   help="file name stem of the CSV and PNG written to --out")
    args = p.parse_args(argv)
    from recsys_ccl.config import parse_override

    extra = dict(parse_override(s) for s in args.set)
    k = args.k
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = args.data if args.data is not None else synthetic_data(root, args)
        data = load_data_dir(data_dir)
        if "cold_items" not in cold_segments(data, "test"):
            print(f"{data_dir} has no test rows of cold items: prepare it with "
                  "--item-features and --cold-items", file=sys.stderr)
            return 2
        features = {} if args.id_dropout is None else {"id_dropout": args.id_dropout}
        for name, overrides in (("features", features),
                                ("id_only", {"features": "none"})):
            cfg = TrainConfig.from_dict({"epochs": args.epochs, "seed": args.seed,
                                         "eval_split": "none", "patience": 0,
                                         **extra, **overrides})
            run = root / name
            t0 = time.perf_counter()
            train(data_dir, run, cfg, progress=False)
            seconds = time.perf_counter() - t0
            rows += [{**r, "train_s": seconds} for r in model_rows(run, data_dir, k)]
            print(f"{name}: trained in {seconds:.0f} s", flush=True)
        rows += baseline_rows(data, k, args.seed,
                              synth_config(args) if args.data is None else None)
    for r in rows:
        r["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / f"{args.name}.csv")
    plot(rows, k, args.out / f"{args.name}.png",
         f"cold start: test rows of warm and cold items "
         f"({args.data.name if args.data else 'synthetic data'})")
    print_table(rows, ["model", "segment", f"recall@{k}", f"ndcg@{k}", "users"])
    print(json.dumps(summary(rows, k)))
    return 0


def summary(rows: list[dict], k: int) -> dict:
    """The feature model's cold-item Recall@K over the best baseline's, per cold segment, and
    its warm-item Recall@K over the id-only model's."""
    metric = f"recall@{k}"
    get = {(r["model"], r["segment"]): r[metric] for r in rows}
    out: dict = {}
    for seg in ("cold_items", "cold_among_cold"):
        best = max((r for r in rows if r["segment"] == seg and r["model"] in BASELINES),
                   key=lambda r: r[metric])
        ours = get[("features", seg)]
        out[seg] = {"features": ours, "best_baseline": best["model"],
                    "best_baseline_recall": best[metric],
                    "features_over_best_baseline": ours / best[metric] if best[metric] else None}
    if ("taste_oracle", "cold_among_cold") in get:
        out["cold_among_cold"]["features_over_taste_oracle"] = (
            get[("features", "cold_among_cold")] / get[("taste_oracle", "cold_among_cold")])
    warm_f, warm_i = get[("features", "warm_items")], get[("id_only", "warm_items")]
    out["warm_recall_features_over_id_only"] = warm_f / warm_i if warm_i else None
    return out


if __name__ == "__main__":
    sys.exit(main())
