"""Cold start: how well items nobody interacted with in training are recommended, and what the
feature path costs on warm items.

    python benchmarks/bench_cold_start.py                      # synthetic data with features
    python benchmarks/bench_cold_start.py --data DATA          # a DATA directory of yours,
                                                               # prepared with --item-features
                                                               # and --cold-items

Trains the feature model (TrainConfig features="auto", id_dropout) and the id-only model
(features="none") on the same DATA directory with the same seed and epochs, then reports
Recall@K and NDCG@K on the test rows of cold items and of warm items for both, and for
baselines that need no training:

- popularity: an item's training count (0 for every cold item, so no yardstick there);
- category popularity: a warm item's count, a cold item the mean count of the warm items that
  share its categorical and multi-hot values (its category, its tags);
- category/tag affinity: the user's training profile over the items' categorical and
  multi-hot values (the share of the user's items with each value) scored against the item's
  values, ties broken by popularity: the heuristic to beat on data with genre-like features;
- random scores.

The last line is a JSON summary with the feature model's cold-item Recall@K over the best
baseline's. Writes bench_cold_start.csv and bench_cold_start.png to benchmarks/results/ (or
--out).
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
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.evaluation import (
    cold_segments,
    evaluate_embeddings,
    evaluate_run,
    popularity_scores,
)
from recsys_ccl.train import train


def synthetic_data(root: Path, args) -> Path:
    """synth with features -> prepare with --cold-items (temporal split)."""
    cfg = SynthConfig(users=args.users, items=args.items, interactions=args.interactions,
                      seed=args.seed)
    write_synth(cfg, root / "log.parquet", root / "items.parquet", root / "users.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet",
                          item_features=str(root / "items.parquet"),
                          user_features=str(root / "users.parquet"),
                          cold_items=args.cold_items, seed=args.seed), root / "data")
    return root / "data"


def item_values(data) -> torch.Tensor | None:
    """(I, V) float32: each item's values of its categorical and multi-hot fields, one column
    per value (the out-of-vocabulary code left out), each field's part of a row summing to 1
    (0 for an item without a value); None when the items have no such field."""
    if "item" not in data.features:
        return None
    spec, _ = data.features["item"]
    rows = data.feature_rows("item")
    blocks = []
    for f in spec.fields:
        if f.type not in ("categorical", "multi_hot"):
            continue
        codes = rows[f.name] if f.type == "multi_hot" else rows[f.name][:, None]
        m = torch.zeros(data.num_items, f.cardinality + 1)  # + the multi-hot padding code
        m.scatter_add_(1, codes, torch.ones(codes.shape))
        m = m[:, 1:f.cardinality]
        blocks.append(m / m.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(blocks, 1) if blocks else None


def category_popularity(data, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item vectors: score = a warm item's training count; a cold item's, the mean
    count of the warm items sharing its values (weighted as in `values`)."""
    count = data.item_count.float()
    warm = count > 0
    per_value = (values[warm] * count[warm, None]).sum(0) / values[warm].sum(0).clamp_min(1e-9)
    fields = values.sum(1).clamp_min(1)
    score = torch.where(warm, count, values @ per_value / fields)
    return torch.ones(data.num_users, 1), score[:, None]


def value_affinity(data, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item vectors: score = <the user's share of training items with each value, the
    item's values> + 1e-3 log(1 + the item's count) (ties broken by popularity)."""
    users, items = data.splits["train"]
    profile = torch.zeros(data.num_users, values.shape[1])
    profile.index_add_(0, users, values[items])
    profile /= torch.bincount(users, minlength=data.num_users).clamp_min(1)[:, None]
    user_vec = torch.cat([profile, torch.full((data.num_users, 1), 1e-3)], 1)
    item_vec = torch.cat([values, torch.log1p(data.item_count.float())[:, None]], 1)
    return user_vec, item_vec


def baseline_rows(data_dir: Path, k: int, seed: int) -> list[dict]:
    """The baselines that need no training, on the same segments as the models."""
    data = load_data_dir(data_dir)
    segments = cold_segments(data, "test")
    g = torch.Generator().manual_seed(seed)
    baselines = {"popularity": popularity_scores(data)}
    values = item_values(data)
    if values is not None:
        baselines["category_popularity"] = category_popularity(data, values)
        baselines["category_tag_affinity"] = value_affinity(data, values)
    baselines["random"] = (torch.randn(data.num_users, 32, generator=g),
                           torch.randn(data.num_items, 32, generator=g))
    rows = []
    for name, (users, items) in baselines.items():
        for seg, (item_mask, user_mask) in segments.items():
            m = evaluate_embeddings(users, items, data, "test", k, item_mask=item_mask,
                                    user_mask=user_mask)
            rows.append(_row(name, seg, m, k))
    return rows


def _row(model: str, segment: str, m: dict, k: int) -> dict:
    return {"model": model, "segment": segment, f"recall@{k}": m[f"recall@{k}"],
            f"ndcg@{k}": m[f"ndcg@{k}"], "users": m["users"]}


def plot(rows: list[dict], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments = list(dict.fromkeys(r["segment"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(models)
    for ax, metric in zip(axes, (f"recall@{k}", f"ndcg@{k}"), strict=True):
        for m_i, model in enumerate(models):
            values = [next((r[metric] for r in rows if r["model"] == model
                            and r["segment"] == s), 0.0) for s in segments]
            ax.bar([s_i + m_i * width for s_i in range(len(segments))], values, width,
                   label=model)
        ax.set_xticks([s_i + 0.4 - width / 2 for s_i in range(len(segments))], segments)
        ax.set_ylabel(metric)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("cold start: test rows of cold and warm items")
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
    p.add_argument("--id-dropout", type=float, default=0.3)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more TrainConfig keys for both models")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from recsys_ccl.config import parse_override

    extra = dict(parse_override(s) for s in args.set)
    k = args.k
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = args.data if args.data is not None else synthetic_data(root, args)
        if not cold_segments(load_data_dir(data_dir), "test"):
            print(f"{data_dir} has no test rows of cold items or users: prepare it with "
                  "--item-features and --cold-items", file=sys.stderr)
            return 2
        for name, overrides in (("features", {"id_dropout": args.id_dropout}),
                                ("id_only", {"features": "none"})):
            cfg = TrainConfig.from_dict({"epochs": args.epochs, "seed": args.seed,
                                         "eval_split": "none", "patience": 0,
                                         **extra, **overrides})
            t0 = time.perf_counter()
            train(data_dir, root / f"run-{name}", cfg, progress=False)
            seconds = time.perf_counter() - t0
            result = evaluate_run(root / f"run-{name}", data_dir, "test", k)
            for seg, m in result["segments"].items():
                rows.append({**_row(name, seg, m, k), "train_s": seconds})
            print(f"{name}: trained in {seconds:.0f} s", flush=True)
        rows += baseline_rows(data_dir, k, args.seed)
    for r in rows:
        r["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "bench_cold_start.csv")
    plot(rows, k, args.out / "bench_cold_start.png")
    print_table(rows, ["model", "segment", f"recall@{k}", f"ndcg@{k}", "users"])
    get = {(r["model"], r["segment"]): r[f"recall@{k}"] for r in rows}
    trained = ("features", "id_only")
    best = max((r for r in rows if r["segment"] == "cold_items" and r["model"] not in trained),
               key=lambda r: r[f"recall@{k}"])
    cold_f = get[("features", "cold_items")]
    warm_f, warm_i = get[("features", "warm_items")], get[("id_only", "warm_items")]
    summary = {
        "cold_recall_features": cold_f, "best_baseline": best["model"],
        "cold_recall_best_baseline": best[f"recall@{k}"],
        "cold_recall_features_over_best_baseline": (cold_f / best[f"recall@{k}"]
                                                    if best[f"recall@{k}"] else None),
        "warm_recall_features_over_id_only": warm_f / warm_i if warm_i else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
