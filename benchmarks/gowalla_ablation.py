"""Gowalla ablations: what the item bias and the self-supervised view contrast each bring.

    python benchmarks/gowalla_ablation.py [--epochs 6] [--variants base,no_item_bias,ssl]

Trains each variant for the same few epochs from benchmarks/configs/gowalla.toml (constant
learning rate, so that short runs compare fairly), evaluates Recall@20 / NDCG@20 on test after
every epoch, and writes gowalla_ablation.csv, gowalla_ablation.md and gowalla_ablation.png to
benchmarks/results/. Variants:
    base          the committed config (item bias on, no view contrast)
    no_item_bias  the same without the per-item logit offset
    ssl           base + the SimCLR-style view contrast of user histories (ssl_weight 0.1)
Runs in one process, one variant after another, on the LightGCN split prepared as
reproduce_gowalla.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, machine, print_table, write_csv  # noqa: E402
from reproduce_gowalla import add_gowalla_arguments  # noqa: E402

from recsys_ccl.config import TrainConfig  # noqa: E402
from recsys_ccl.data.prepare import PrepareConfig, prepare  # noqa: E402
from recsys_ccl.train import train  # noqa: E402

VARIANTS = {
    "base": {},
    "no_item_bias": {"item_bias": False},
    "ssl": {"ssl_weight": 0.1},
}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        for ax, key in zip(axes, ("recall@20", "ndcg@20"), strict=True):
            ax.plot([r["epoch"] for r in mine], [r[key] for r in mine], marker="o", label=name)
    for ax, key, floor in zip(axes, ("recall@20", "ndcg@20"), (0.1754, 0.1473), strict=True):
        ax.axhline(floor, ls="--", color="grey", lw=1, label="YouTubeDNN (floor)")
        ax.set(xlabel="epoch", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Gowalla ablations, test split ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_gowalla_arguments(p)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "gowalla_ablation")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    data_dir = args.work / "data"
    prepare(PrepareConfig(input=str(args.gowalla), format="lightgcn"), data_dir, overwrite=True)
    rows, summary = [], []
    for name in names:
        run = args.work / f"run-{name}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        cfg = TrainConfig.from_toml(args.config, {
            "eval_split": "test", "patience": 0, "epochs": args.epochs,
            "lr_schedule": "constant", **VARIANTS[name]})
        t0 = time.perf_counter()
        train(data_dir, run, cfg, progress=False)
        seconds = time.perf_counter() - t0
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            rows.append({"variant": name, "epoch": r["epoch"],
                         "recall@20": r["test/recall@20"], "ndcg@20": r["test/ndcg@20"],
                         "seconds": r["seconds"], "machine": machine()})
        last = records[-1]
        summary.append({"variant": name, "epochs": last["epoch"],
                        "recall@20": round(last["test/recall@20"], 4),
                        "ndcg@20": round(last["test/ndcg@20"], 4),
                        "minutes": round(seconds / 60, 1)})
        print(json.dumps(summary[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "gowalla_ablation.csv")
    plot(rows, args.out / "gowalla_ablation.png")
    print_table(summary, ["variant", "epochs", "recall@20", "ndcg@20", "minutes"])
    table = ["| variant | epochs | Recall@20 | NDCG@20 | minutes |", "|---|---|---|---|---|"]
    table += [f"| {s['variant']} | {s['epochs']} | {s['recall@20']:.4f} | {s['ndcg@20']:.4f} | "
              f"{s['minutes']} |" for s in summary]
    (args.out / "gowalla_ablation.md").write_text(
        f"# Gowalla ablations ({args.epochs} epochs each, constant learning rate, {machine()})"
        "\n\n" + "\n".join(table) + "\n\nVariants: " + "; ".join(
            f"`{n}` = {json.dumps(VARIANTS[n]) if VARIANTS[n] else 'the committed config'}"
            for n in names) + ".\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
