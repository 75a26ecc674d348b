"""Next-item recommendation on an ordered-sequence file (default: the Amazon Beauty file of
../shared/data/amazon-beauty), by the published full-ranking leave-one-out protocol, beside the
published table.

    python benchmarks/reproduce_sequential.py [--data FILE] [--seeds 0 1 2] [--work DIR]
        [--out DIR] [--config benchmarks/configs/sequential.toml] [--set KEY=VALUE ...]
        [--rows transformer,pool,...] [--ablation-seeds 0] [--jobs 2]

Protocol: `prepare --format sequences --split temporal --holdout 1 --keep-cold-targets`: each
user's last item is the test target, the one before it the validation target, the rest the
training sequence; every user with a held-out item counts, and a target never seen in training
(which no model here can rank) counts as a miss. Training selects its epoch on the validation
target (NDCG@10, early stopping); the test targets are then scored once with the selected
model, the validation item joining the history. Mean and standard deviation over the seeds.

Rows: the transformer tower (the committed config; every seed), the pooled tower on the same
split (the defaults of `recsys-ccl train`), and an ablation on the first seed: two layers
instead of one, and at two layers no uniform negatives, no logQ correction, a shorter window.

Writes to --out: sequential.md (our rows beside the published ones), sequential_seeds.csv,
sequential_ablation.csv and sequential_curve.png (the validation curves). Prints one JSON line
last: hr@10, ndcg@10, hr@20, ndcg@20 (the transformer's means), wall_seconds, per_seed.
Any file of the same format works with the same defaults (--data). --jobs N trains N runs at
once, each in its own process with cores / N threads (the figures do not depend on it; the
throughput column then says what one run got while N shared the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, machine, print_table, write_csv  # noqa: E402

from recsys_ccl.config import TrainConfig, parse_override  # noqa: E402
from recsys_ccl.data.prepare import PrepareConfig, prepare  # noqa: E402
from recsys_ccl.evaluation import evaluate_run  # noqa: E402
from recsys_ccl.train import train  # noqa: E402

BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"
CONFIG = REPO / "benchmarks" / "configs" / "sequential.toml"
PATIENCE = 10  # epochs without a better valid NDCG@10 before stopping

PUBLISHED = [  # (model, HR@10, NDCG@10, HR@20, NDCG@20): ../shared/data/amazon-beauty/README.md
    ("BERT4Rec", 0.0601, 0.0300, None, None),
    ("SASRec (binary cross-entropy, 1 negative)", 0.0605, 0.0318, 0.0902, 0.0394),
    ("CL4SRec", 0.0642, 0.0345, 0.0974, 0.0428),
    ("ICLRec", 0.0744, 0.0403, 0.1058, 0.0483),
    ("DuoRec", 0.0825, 0.0425, 0.1193, 0.0518),
    ("MCLRec", 0.0871, 0.0446, 0.1243, 0.0539),
    ("SASRec, sampled softmax (256 negatives)", 0.0921, 0.0531, None, None),
    ("eSASRec", 0.0928, 0.0523, None, None),
    ("ICSRec", 0.0959, 0.0578, 0.1298, 0.0663),
    ("BSARec", 0.1008, 0.0611, 0.1373, 0.0703),
]

# row -> overrides of the committed transformer config (None: the pooled tower's defaults).
# The ablation started from two layers; one layer was better on valid and became the config,
# so the other rows vary the two-layer model.
ROWS: dict[str, dict | None] = {
    "transformer": {},
    "pool": None,
    "two_layers": {"layers": 2},
    "two_layers_no_uniform_negatives": {"layers": 2, "extra_negatives": 0},
    "two_layers_no_logq": {"layers": 2, "logq": False},
    "two_layers_max_len_20": {"layers": 2, "max_len": 20},
}


def prepare_split(data_file: Path, out: Path) -> Path:
    prepare(PrepareConfig(input=str(data_file), format="sequences", split="temporal",
                          holdout=1, keep_cold_targets=True), out, overwrite=True)
    return out


def row_config(args, row: str, seed: int) -> TrainConfig:
    """The TrainConfig of a row: the committed config with the row's and --set overrides."""
    overrides = ROWS[row]
    base = {"eval_split": "valid", "eval_k": 10, "patience": PATIENCE, "seed": seed}
    if overrides is None:  # the pooled tower: `recsys-ccl train`'s defaults
        return TrainConfig.from_dict(base)
    sets = dict(parse_override(s) for s in args.set)
    return TrainConfig.from_toml(args.config, {**overrides, **sets, **base})


def run_row(args, data_dir: Path, row: str, seed: int) -> tuple[dict, list[dict]]:
    """Train, select on valid, test once; returns the result and the per-epoch records."""
    cfg = row_config(args, row, seed)
    run_dir = args.work / f"run-{row}-{seed}"
    t0 = time.perf_counter()
    summary = finished_run(run_dir, cfg) if args.reuse else None
    if summary is None:
        summary = train(data_dir, run_dir, cfg, overwrite=True, progress=sys.stderr.isatty())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = {k: evaluate_run(run_dir, data_dir, "test", k) for k in (10, 20)}
    selected = next(r for r in records if r["epoch"] == summary["best_epoch"])
    rate_key = "positions_per_s" if cfg.user_tower == "transformer" else "interactions_per_s"
    result = {"row": row, "seed": seed, "hr@10": test[10]["hit@10"],
              "ndcg@10": test[10]["ndcg@10"], "hr@20": test[20]["hit@20"],
              "ndcg@20": test[20]["ndcg@20"], "users": test[10]["users"],
              "valid_ndcg@10": selected.get("valid/ndcg@10"),
              "selected_epoch": summary["best_epoch"], "epochs": summary["epochs"],
              "train_per_s": round(statistics.median(r[rate_key] for r in records)),
              "unit": "positions" if cfg.user_tower == "transformer" else "interactions",
              "wall_seconds": round(summary.get("wall_seconds", time.perf_counter() - t0), 1),
              "reused": "wall_seconds" in summary}
    print(json.dumps(result), flush=True)
    return result, records


def finished_run(run_dir: Path, cfg: TrainConfig) -> dict | None:
    """--reuse: the summary of a finished RUN in run_dir trained with exactly `cfg` (its best
    epoch by valid NDCG@K, as training selects; its wall time from metrics.jsonl), or None."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())["train"]
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError, KeyError):
        return None
    if saved != cfg.to_dict() or not (run_dir / "model.safetensors").exists() or not records:
        return None
    key = f"valid/ndcg@{cfg.eval_k}"
    best = max(records, key=lambda r: r.get(key, float("-inf")))  # the first of equals
    last = records[-1]["epoch"]
    if last < cfg.epochs and last - best["epoch"] < cfg.patience:
        return None  # stopped before its end: not a finished run
    return {"best_epoch": best["epoch"], "epochs": last,
            "wall_seconds": sum(r["seconds"] + r.get("validation_seconds", 0)
                                for r in records)}


def _run_task(args, data_dir: Path, row: str, seed: int, threads: int
              ) -> tuple[dict, list[dict]]:
    """run_row in a worker process with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    result, records = run_row(args, data_dir, row, seed)
    return {**result, "threads": threads}, records


def run_all(args, data_dir: Path, tasks: list[tuple[str, int]]
            ) -> list[tuple[dict, list[dict]]]:
    """Every (row, seed) task, in order, --jobs at a time."""
    if args.jobs <= 1:
        return [run_row(args, data_dir, row, seed) for row, seed in tasks]
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_task, args, data_dir, row, seed, threads)
                   for row, seed in tasks]
        return [f.result() for f in futures]


def _mean_sd(rows: list[dict], key: str) -> tuple[float, float]:
    xs = [r[key] for r in rows]
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, records in curves.items():
        ax.plot([r["epoch"] for r in records], [r["valid/ndcg@10"] for r in records],
                lw=1.5, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@10 (full ranking)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Validation curves (epoch selection)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, seeds_rows: list[dict], ablation: list[dict]) -> str:
    lines = [f"# Next-item recommendation, {args.data.name}: full ranking, leave-one-out", "",
             "`python benchmarks/reproduce_sequential.py` (sequential_seeds.csv, "
             "sequential_ablation.csv, sequential_curve.png). Every user with a held-out "
             "item counts; a target unseen in training counts as a miss. Epoch chosen on the "
             "validation target, test read once per reported model; mean ± sd over seeds "
             f"{args.seeds}; {machine()}"
             + (f"; {args.jobs} runs at a time, each with cores / {args.jobs} threads (the "
                "throughput column is one run's share)" if args.jobs > 1 else "") + "."
             + (" Runs marked reused in the CSVs were trained by an earlier invocation with "
                "the same config (--reuse); their wall time and throughput are that "
                "invocation's, under whatever shared the machine then."
                if any(r.get("reused") for r in seeds_rows + ablation) else ""), "",
             "| model | HR@10 | NDCG@10 | HR@20 | NDCG@20 | source |", "|---|---|---|---|---|---|"]
    rows = []
    for name in ("transformer", "pool"):
        got = [r for r in seeds_rows if r["row"] == name]
        if not got:
            continue
        ms = {k: _mean_sd(got, k) for k in ("hr@10", "ndcg@10", "hr@20", "ndcg@20")}
        label = {"transformer": "**recsys_ccl, transformer tower**",
                 "pool": "recsys_ccl, pooled tower (defaults)"}[name]
        rate = statistics.fmean(r["train_per_s"] for r in got)
        rows.append((label, *(ms[k] for k in ("hr@10", "ndcg@10", "hr@20", "ndcg@20")),
                     f"this run, {len(got)} seed(s), {rate:,.0f} {got[0]['unit']}/s"))
    show = lambda v: "" if v is None else (f"{v[0]:.4f} ± {v[1]:.4f}" if isinstance(v, tuple)
                                           else f"{v:.4f}")
    for name, *vals, src in sorted(
            [*[(m, *v, "published") for m, *v in PUBLISHED], *rows],
            key=lambda r: r[1][0] if isinstance(r[1], tuple) else r[1]):
        lines.append(f"| {name} | " + " | ".join(show(v) for v in vals) + f" | {src} |")
    if ablation:
        lines += ["", "## Ablation (first seed; the rows' config changes in "
                  "reproduce_sequential.py's ROWS)", "",
                  "| row | test HR@10 | test NDCG@10 | valid NDCG@10 (selected) | selected epoch |",
                  "|---|---|---|---|---|"]
        base = [r for r in seeds_rows if r["row"] == "transformer"][:1]
        lines += [f"| {r['row']}{' (the committed config)' if r in base else ''} | "
                  f"{r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['valid_ndcg@10']:.4f} | "
                  f"{r['selected_epoch']} |" for r in base + ablation]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=BEAUTY, help="a `user item item ...` file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "sequential")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the transformer's config (all its rows)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"rows to run, of {','.join(ROWS)}")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None,
                   help="seeds of the rows other than transformer and pool (default: the "
                        "first of --seeds)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a finished RUN in --work trained with exactly the row's config "
                        "(its test is still read once here)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (default 1)")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_split(args.data, args.work / "data")
    main_rows = [(row, seed) for seed in args.seeds for row in ("transformer", "pool")
                 if row in rows]
    ablation_rows = [(row, seed) for seed in args.ablation_seeds or args.seeds[:1]
                     for row in rows if row not in ("transformer", "pool")]
    done = run_all(args, data_dir, main_rows + ablation_rows)
    per_seed, ablation, curves = [], [], {}
    for (row, seed), (result, records) in zip(main_rows + ablation_rows, done, strict=True):
        (per_seed if (row, seed) in main_rows else ablation).append(result)
        curves[f"{row}, seed {seed}"] = records
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv([{**r, "data": args.data.name, "machine": machine()} for r in per_seed],
              args.out / "sequential_seeds.csv")
    if ablation:
        base = [r for r in per_seed if r["row"] == "transformer"][:1]
        write_csv([{**r, "data": args.data.name} for r in base + ablation],
                  args.out / "sequential_ablation.csv")
    plot(curves, args.out / "sequential_curve.png")
    (args.out / "sequential.md").write_text(report(args, per_seed, ablation))
    print_table(per_seed + ablation, ["row", "seed", "hr@10", "ndcg@10", "hr@20", "ndcg@20",
                                      "selected_epoch", "train_per_s", "wall_seconds"])
    ours = [r for r in per_seed if r["row"] == "transformer"] or per_seed or ablation
    means = {k: statistics.fmean(r[k] for r in ours)
             for k in ("hr@10", "ndcg@10", "hr@20", "ndcg@20")}
    print(json.dumps({**means, "wall_seconds": round(time.perf_counter() - t_start, 1),
                      "per_seed": per_seed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
