"""Does the default training configuration (`recsys-ccl train` without --config) carry to data it
was not tuned on? Side by side, one run each, same seed, the test set read once with the model
selected on validation:

    default     TrainConfig()'s defaults
    tuned       benchmarks/configs/gowalla.toml (tuned on Gowalla's validation set)
    previous    the defaults before issue 17 (64-d, Adam 3e-3, constant)
    popularity  the floor

on Gowalla (the reproduction's protocol) and on the synthetic generator at two densities
(sparse: ~17 interactions per user over 20,000 items; dense: ~150 per user over 3,000 items;
temporal leave-last-out split with a validation set). Reports Recall@20 / NDCG@20 and the
default's Recall@20 relative to the tuned configuration's; writes check_defaults.csv and
check_defaults.md to benchmarks/results/.

    python benchmarks/check_defaults.py [--datasets gowalla,synth_sparse,synth_dense]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, machine, print_table, write_csv  # noqa: E402
from reproduce_gowalla import add_gowalla_arguments, load_config, run_seed  # noqa: E402

from recsys_ccl.data.prepare import PrepareConfig, prepare  # noqa: E402
from recsys_ccl.data.synth import SynthConfig, write_synth  # noqa: E402
from recsys_ccl.evaluation import evaluate_run  # noqa: E402
from recsys_ccl.train import train  # noqa: E402

PREVIOUS_DEFAULTS = {"dim": 64, "lr": 3e-3, "lr_schedule": "constant"}
CONFIGS = ("default", "tuned", "previous", "popularity")

SYNTH = {
    "synth_sparse": SynthConfig(users=30_000, items=20_000, interactions=500_000, clusters=60,
                                seed=11),
    "synth_dense": SynthConfig(users=4_000, items=3_000, interactions=600_000, clusters=24,
                               seed=12),
}


def synth_row(name: str, config: str, args) -> dict:
    work = args.work / name
    data = work / "data"
    if not (data / "manifest.json").exists():
        write_synth(SYNTH[name], work / "log.parquet")
        prepare(PrepareConfig(input=str(work / "log.parquet"), format="parquet", k_core=3,
                              split="temporal", holdout=1), data, overwrite=True)
    if config == "popularity":
        return evaluate_run(None, data, "test", 20, "popularity")
    base = {"seed": args.seed, "eval_split": "valid"}
    if config == "previous":
        base.update(PREVIOUS_DEFAULTS)
    cfg = load_config(args.config if config == "tuned" else Path("defaults"), base)
    run = work / f"run-{config}"
    summary = train(data, run, cfg, overwrite=True, progress=False)
    return {**evaluate_run(run, data, "test", 20), "selected_epoch": summary["best_epoch"]}


def gowalla_row(config: str, args) -> dict:
    if config == "tuned" and args.tuned_from is not None:
        # the reproduction's run of this seed (same protocol); its selected model, not a
        # refit, as the other rows here are not refitted
        for r in csv.DictReader(args.tuned_from.open()):
            if int(r["seed"]) == args.seed:
                refit = r.get("refit") == "True"
                key = "selected_model_" if refit else ""
                return {"recall@20": float(r[f"{key}recall@20"]),
                        "ndcg@20": float(r[f"{key}ndcg@20"]),
                        "selected_epoch": int(r["selected_epoch"])}
        raise SystemExit(f"{args.tuned_from} has no row for seed {args.seed}")
    if config == "popularity":
        data = args.work / f"data-{args.seed}"  # run_seed's, prepared by an earlier row
        return evaluate_run(None, data, "test", 20, "popularity")
    chosen = argparse.Namespace(**{**vars(args), "config": args.tuned if config == "tuned"
                                   else Path("defaults")})
    result, *_ = run_seed(chosen, args.seed, PREVIOUS_DEFAULTS if config == "previous" else None)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_gowalla_arguments(p)
    p.add_argument("--datasets", default="gowalla,synth_sparse,synth_dense")
    p.add_argument("--configs", default=",".join(CONFIGS), help="of " + ", ".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tuned-from", type=Path, default=None,
                   help="gowalla_seeds.csv of a reproduce_gowalla.py run with the tuned "
                        "config: its row for --seed stands for the tuned Gowalla run")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "check_defaults")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.tuned = args.config
    if "tuned" not in args.configs.split(",") or set(args.configs.split(",")) - set(CONFIGS):
        p.error(f"--configs: a comma-separated subset of {', '.join(CONFIGS)} with tuned")

    rows = []
    for name in args.datasets.split(","):
        if name != "gowalla" and name not in SYNTH:
            p.error(f"unknown dataset {name!r}; known: gowalla, {', '.join(SYNTH)}")
        for config in args.configs.split(","):
            t0 = time.perf_counter()
            if name == "gowalla":
                gw = argparse.Namespace(**{**vars(args), "work": args.work / "gowalla",
                                           "protocol": "honest", "epochs": None,
                                           "refit": False})
                r = gowalla_row(config, gw)
            else:
                r = synth_row(name, config, argparse.Namespace(**{**vars(args),
                                                                  "config": args.tuned}))
            rows.append({"dataset": name, "config": config, "recall@20": r["recall@20"],
                         "ndcg@20": r["ndcg@20"], "selected_epoch": r.get("selected_epoch"),
                         "minutes": round((time.perf_counter() - t0) / 60, 1),
                         "machine": machine()})
            print(json.dumps(rows[-1]), flush=True)
        tuned = next(r for r in rows if r["dataset"] == name and r["config"] == "tuned")
        for r in rows:
            if r["dataset"] == name:
                r["recall_vs_tuned"] = round(r["recall@20"] / tuned["recall@20"] - 1, 4)
    args.out.mkdir(parents=True, exist_ok=True)
    # the datasets of earlier invocations stay (one run per dataset, merged)
    done = {r["dataset"] for r in rows}
    path = args.out / "check_defaults.csv"
    if path.exists():
        kept = [r for r in csv.DictReader(path.open()) if r["dataset"] not in done]
        for r in kept:
            for k in ("recall@20", "ndcg@20", "recall_vs_tuned"):
                r[k] = float(r[k])
            r["selected_epoch"] = int(r["selected_epoch"]) if r["selected_epoch"] else None
        rows = kept + rows
    write_csv(rows, path)
    cols = ["dataset", "config", "recall@20", "ndcg@20", "recall_vs_tuned", "selected_epoch",
            "minutes"]
    print_table(rows, cols)
    table = ["| dataset | config | Recall@20 | NDCG@20 | Recall@20 vs tuned | selected epoch |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['dataset']} | {r['config']} | {r['recall@20']:.4f} | {r['ndcg@20']:.4f} | "
              f"{r['recall_vs_tuned']:+.1%} | {r['selected_epoch'] or ''} |" for r in rows]
    (args.out / "check_defaults.md").write_text(
        f"# The default training configuration against the Gowalla-tuned one (seed "
        f"{args.seed}, {machine()})\n\nEach run: model selected on validation, test read "
        "once. Synthetic data: " + "; ".join(
            f"{n} = {s.users:,} users, {s.items:,} items, {s.interactions:,} interactions"
            for n, s in SYNTH.items()) + " (k-core 3, leave-last-out). Gowalla: the "
        "reproduction's protocol without refit; its tuned row, when --tuned-from is given, is the "
        "selected model of that reproduction's run of the same seed.\n\n"
        + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
