"""Gowalla ablation: each ingredient's share of the gain, one row each, by the reproduction's
own protocol (benchmarks/reproduce_gowalla.py: validation carved from train, early stopping and
epoch selection on it, the test set read once).

    python benchmarks/gowalla_ablation.py [--seeds 0] [--variants start,schedule,...]

Rows, in order (each one the row above plus one ingredient; the last two, not run unless
asked, take one ingredient away from the committed configuration):
    start             the configuration as issue 17 found it: 64-d, 40-epoch cosine schedule,
                      no item neighbourhood (the selected epoch's model is tested)
    schedule          + a schedule as long as the validation curve needs (15 epochs), so early
                      stopping no longer cuts the cosine decay off halfway
    item_neighbourhood + the item tower's neighbourhood (item_history_len 50)
    dim_128           + 128-d vectors = the committed configuration, selected model tested
    refit             + the selected number of epochs refitted on all of train (the
                      validation share included), that model tested
    no_item_bias      the committed configuration without the per-item logit offset
    no_history        ... without the user tower's history pooling
Writes gowalla_ablation.csv, gowalla_ablation.md (mean per row over the seeds and the change
from the row it builds on) and gowalla_ablation.png to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, machine, print_table, write_csv  # noqa: E402
from reproduce_gowalla import PUBLISHED, add_gowalla_arguments, run_seed  # noqa: E402

# name -> (config overrides on the committed config, refit, the row it is compared with)
VARIANTS: dict[str, tuple[dict, bool, str | None]] = {
    "start": ({"dim": 64, "epochs": 40, "item_history_len": 0}, False, None),
    "schedule": ({"dim": 64, "item_history_len": 0}, False, "start"),
    "item_neighbourhood": ({"dim": 64}, False, "schedule"),
    "dim_128": ({}, False, "item_neighbourhood"),
    "refit": ({}, True, "dim_128"),
    "no_item_bias": ({"item_bias": False}, False, "dim_128"),
    "no_history": ({"history_len": 0}, False, "dim_128"),
}
DEFAULT_VARIANTS = "start,schedule,item_neighbourhood,dim_128,refit"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    names = [s["variant"] for s in summary]
    for ax, key, col in ((axes[0], "recall@20", 1), (axes[1], "ndcg@20", 2)):
        vals = [s[key] for s in summary]
        errs = [s[f"{key}_sd"] for s in summary]
        ax.bar(range(len(names)), vals, yerr=errs, color="C0", capsize=3)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=7)
        for i, row in enumerate(PUBLISHED):
            if row[0].startswith(("LightGCN", "SimpleX", "BSPM", "NESCL")):
                ax.axhline(row[col], ls="--", lw=1, color=f"C{i + 1}", label=row[0])
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        lo = min(vals) * 0.9
        ax.set_ylim(lo, max(max(vals), 0.1920 if col == 1 else 0.1620) * 1.03)
        ax.set_ylabel(f"test {key}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Gowalla ablation: selected on a validation set, test read once ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _minutes(m: float) -> str:
    return "(within refit's)" if math.isnan(m) else f"{m:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_gowalla_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="of " + ", ".join(VARIANTS))
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "gowalla_ablation")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.protocol, args.epochs, args.refit = "honest", None, False  # run_seed's arguments

    # the refit's own first run is the dim_128 row: one training, both rows
    shared = "refit" in names and "dim_128" in names
    rows = []
    for name in names:
        if shared and name == "dim_128":
            continue
        overrides, refit, _ = VARIANTS[name]
        for seed in args.seeds:
            t0 = time.perf_counter()
            result, *_ = run_seed(args, seed, overrides, refit)
            minutes = round((time.perf_counter() - t0) / 60, 1)
            if shared and name == "refit":
                rows.append({"variant": "dim_128", **result,
                             "recall@20": result["selected_model_recall@20"],
                             "ndcg@20": result["selected_model_ndcg@20"],
                             "minutes": None, "machine": machine()})
            rows.append({"variant": name, **result, "minutes": minutes,
                         "machine": machine()})
            print(json.dumps(rows[-1]), flush=True)

    def stat(name: str, key: str) -> tuple[float, float]:
        import statistics

        x = [r[key] for r in rows if r["variant"] == name and r[key] is not None]
        if not x:
            return math.nan, math.nan
        return statistics.fmean(x), statistics.stdev(x) if len(x) > 1 else 0.0

    summary = []
    for name in names:
        (rec, rec_sd), (ndcg, ndcg_sd) = stat(name, "recall@20"), stat(name, "ndcg@20")
        base = VARIANTS[name][2]
        delta = ""
        if base in names:
            delta = (f"{rec - stat(base, 'recall@20')[0]:+.4f} / "
                     f"{ndcg - stat(base, 'ndcg@20')[0]:+.4f} vs {base}")
        summary.append({"variant": name, "recall@20": round(rec, 4), "recall@20_sd": rec_sd,
                        "ndcg@20": round(ndcg, 4), "ndcg@20_sd": ndcg_sd, "change": delta,
                        "epoch": stat(name, "selected_epoch")[0],
                        "minutes": stat(name, "minutes")[0]})
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "gowalla_ablation.csv")
    plot(summary, args.out / "gowalla_ablation.png")
    print_table(summary, ["variant", "recall@20", "ndcg@20", "change", "epoch", "minutes"])
    table = ["| variant | Recall@20 | NDCG@20 | change (Recall / NDCG) | selected epoch | "
             "minutes per seed |", "|---|---|---|---|---|---|"]
    table += [f"| {s['variant']} | {s['recall@20']:.4f} ± {s['recall@20_sd']:.4f} | "
              f"{s['ndcg@20']:.4f} ± {s['ndcg@20_sd']:.4f} | {s['change']} | "
              f"{s['epoch']:.1f} | {_minutes(s['minutes'])} |" for s in summary]
    (args.out / "gowalla_ablation.md").write_text(
        f"# Gowalla ablation (seeds {args.seeds}; mean ± sd; {machine()})\n\n"
        "Protocol of benchmarks/reproduce_gowalla.py: a validation set carved from train "
        "(10 % per user), early stopping and epoch selection on it, the test set read once.\n\n"
        + "\n".join(table) + "\n\nRows (overrides of `benchmarks/configs/gowalla.toml`): "
        + "; ".join(f"`{n}` = {json.dumps(VARIANTS[n][0]) if VARIANTS[n][0] else 'as committed'}"
                    f"{' + refit' if VARIANTS[n][1] else ''}" for n in names) + ".\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
