"""Reproduce the Gowalla table (LightGCN split) with a 64-dimensional two-tower model.

    python benchmarks/reproduce_gowalla.py [--epochs N] [--config benchmarks/configs/gowalla.toml]

prepares ../shared/data/gowalla (lightgcn format, the given split), trains with the config,
evaluates Recall@20 / NDCG@20 on test.txt by the protocol of the data's README after every epoch
(a learning curve; nothing is selected on test: the reported figures are the last epoch's),
prints the final metrics as one JSON line, and writes to benchmarks/results/:
gowalla_curve.png, gowalla.md (our row beside the published ones) and gowalla_metrics.csv.
It also measures training throughput with the naive loss against the chunked one at the same
batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, machine, write_csv  # noqa: E402

from recsys_ccl.config import TrainConfig  # noqa: E402
from recsys_ccl.data.dataset import load_data_dir, recent_histories  # noqa: E402
from recsys_ccl.data.prepare import PrepareConfig, prepare  # noqa: E402
from recsys_ccl.model import TwoTower  # noqa: E402
from recsys_ccl.objective import batch_loss  # noqa: E402
from recsys_ccl.train import _make_optimizer, train  # noqa: E402

PUBLISHED = [  # (model, Recall@20, NDCG@20, source): ../shared/data/gowalla/README.md
    ("MF-BPR (tuned)", 0.1627, 0.1378, "BARS benchmark"),
    ("NGCF", 0.1570, 0.1327, "NGCF / LightGCN papers"),
    ("YouTubeDNN (two-tower, sampled softmax)", 0.1754, 0.1473, "BARS benchmark"),
    ("LightGCN", 0.1830, 0.1554, "LightGCN paper"),
    ("MF-CCL (MF + cosine contrastive loss)", 0.1837, 0.1493, "SimpleX paper"),
    ("GF-CF (no training)", 0.1849, 0.1518, "Shen et al., CIKM 2021"),
    ("UltraGCN", 0.1862, 0.1580, "UltraGCN paper"),
    ("SimpleX", 0.1872, 0.1557, "SimpleX paper"),
]


def throughput(data_dir: Path, cfg: TrainConfig, impl: str, batches: int) -> float:
    """Interactions/s of `batches` training steps with contrastive_loss impl `impl`."""
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "loss_impl": impl})
    data = load_data_dir(data_dir)
    torch.manual_seed(0)
    model = TwoTower(cfg.model_config(data.num_users, data.num_items))
    opt = _make_optimizer(model, cfg)
    users, items = data.splits["train"]
    hist = (recent_histories(users, items, data.num_users, cfg.history_len)
            if cfg.history_len else None)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(users), generator=gen)
    t0 = time.perf_counter()
    for b in range(batches):
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        loss = batch_loss(model, cfg, data, hist, users[idx], items[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batches * cfg.batch_size / (time.perf_counter() - t0)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, col in ((axes[0], "test/recall@20", 1), (axes[1], "test/ndcg@20", 2)):
        ax.plot(epochs, [r[key] for r in records], marker="o", lw=2, label="recsys_ccl (ours)")
        for i, row in enumerate(PUBLISHED):
            if row[0].startswith(("YouTubeDNN", "LightGCN", "SimpleX")):
                ax.axhline(row[col], ls="--", lw=1, color=f"C{i + 1}", label=row[0])
        ax.set_xlabel("epoch")
        ax.set_ylabel(key.split("/")[1])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Gowalla (LightGCN split), full ranking on test, 64-d two-tower")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_gowalla_arguments(p: argparse.ArgumentParser) -> None:
    """--gowalla (the LightGCN split's directory) and --config (the committed TrainConfig)."""
    p.add_argument("--gowalla", type=Path, default=REPO.parent / "shared" / "data" / "gowalla")
    p.add_argument("--config", type=Path, default=REPO / "benchmarks" / "configs" / "gowalla.toml")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_gowalla_arguments(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--work", type=Path, default=REPO / "gowalla_work")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--throughput-batches", type=int, default=20)
    args = p.parse_args(argv)

    overrides = {"eval_split": "test", "patience": 0}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    cfg = TrainConfig.from_toml(args.config, overrides)
    data_dir, run_dir = args.work / "data", args.work / "run"
    t_start = time.perf_counter()
    prepare(PrepareConfig(input=str(args.gowalla), format="lightgcn"), data_dir, overwrite=True)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    summary = train(data_dir, run_dir, cfg, progress=sys.stderr.isatty())
    train_seconds = time.perf_counter() - t_start
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]

    rates = {impl: throughput(data_dir, cfg, impl, args.throughput_batches)
             for impl in ("naive", "torch")}
    result = {
        "recall@20": last["test/recall@20"], "ndcg@20": last["test/ndcg@20"],
        "hit@20": last["test/hit@20"], "epochs": summary["epochs"],
        "wall_seconds": round(train_seconds, 1),
        "train_interactions_per_s": round(summary["interactions_per_s"]),
        "throughput_naive": round(rates["naive"]), "throughput_chunked": round(rates["torch"]),
        "chunked_vs_naive": round(rates["torch"] / rates["naive"], 2),
        "batch_size": cfg.batch_size, "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(records, args.out / "gowalla_metrics.csv")
    plot(records, args.out / "gowalla_curve.png")
    ours = ("**recsys_ccl two-tower (this run)**", result["recall@20"], result["ndcg@20"],
            f"{result['epochs']} epochs, {result['wall_seconds'] / 60:.0f} min on {machine()}")
    rows = sorted([*PUBLISHED, ours], key=lambda r: r[1])
    table = ["| model | Recall@20 | NDCG@20 | source |", "|---|---|---|---|"]
    table += [f"| {m} | {r:.4f} | {n:.4f} | {s} |" for m, r, n, s in rows]
    (args.out / "gowalla.md").write_text(
        "# Gowalla, full ranking, embedding size 64\n\n" + "\n".join(table) + "\n\n"
        f"Config: `benchmarks/configs/gowalla.toml`. Figures of the last epoch (no selection "
        f"on test). Training throughput at batch {cfg.batch_size}: chunked loss "
        f"{result['throughput_chunked']:,} interactions/s, naive "
        f"{result['throughput_naive']:,} ({result['chunked_vs_naive']}x).\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
