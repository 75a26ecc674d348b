"""Cost at scale: a training step against table size, and the whole pipeline at a million users.

Part 1, step time against table size (`--phase sweep`): one training step (the batch objective,
backward, the optimiser step) of the default model and batch (2048 pairs, 50-item histories,
128-d) with U = 10^4 .. 10^7 users and I = min(U, 2 x 10^5) items. Every size draws the same
batch: users uniform and items (positives, histories) by a Zipf law over 10^4 ranks, each rank
a row spread across the table, so a step reads the same number of distinct rows at every size
and only the tables grow. (How many distinct rows real batches touch is the pipeline's
business, part 2.) Side by side: the default sparse tables with the lazy row-wise Adam,
row-wise Adagrad, and dense tables with Adam (every row and its state updated every step, as
before the embedding tables existed; not run where it would not fit in memory). Each point
runs in its own process (median step time, peak RSS).

Part 2, the whole pipeline (`--phase pipeline`) at 10^6 users x 2 x 10^5 items x 2 x 10^7
interactions, each stage a `recsys-ccl` command with its output redirected to a log file, as a
scheduler runs it: synth, prepare, train (one epoch, defaults: validation on a seeded sample
of users), evaluate (full test split), export, serve start-up and Recommend latency. Wall time
and peak RSS per stage; the RUN and bundle sizes; full-ranking scoring in GFLOP/s measured in
this process beside a bare chunked matmul of the same shapes.

Part 3, a large catalogue (`--phase catalogue`: synth's 10^6 items, of which the bundle holds
those with an interaction): export builds its HNSW index (recall@10 against exact search
measured and logged), then serve start-up and Recommend latency.

Writes bench_scale_steps.csv, bench_scale_pipeline.csv, bench_scale.png and bench_scale.md to
benchmarks/results/.

    python benchmarks/bench_scale.py                     # all parts: about an hour on 2 cores
    python benchmarks/bench_scale.py --phase sweep --sizes 10000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, free_port, machine, print_table, write_csv  # noqa: E402

BATCH = 2048
RANKS = 10_000  # distinct ids a batch draws from, the smallest table's rows
ITEMS_MAX = 200_000
GiB = 2**30
OPTIMIZERS = ("lazy_adam", "rowwise_adagrad", "dense")
TARGETS = {"step_ratio_1e6_vs_1e4": 1.5, "epoch_interactions_per_s": 15_000,
           "peak_rss_gb": 8.0, "scoring_gflops": 100.0}


# -- part 1: one training step against table size (each point in its own process) --

def _step_worker(users: int, items: int, optimizer: str, steps: int, warmup: int) -> dict:
    """Median seconds of one training step with tables of `users` x `items` rows."""
    import torch

    from recsys_ccl.config import TrainConfig
    from recsys_ccl.data.dataset import InteractionData
    from recsys_ccl.objective import batch_loss
    from recsys_ccl.optimization import TrainingOptimizer
    from recsys_ccl.train import new_model

    cfg = TrainConfig(table_optimizer=optimizer)
    g = torch.Generator().manual_seed(0)
    # the batch: ids drawn over RANKS ranks (users uniform, items by a Zipf law), each rank
    # mapped to a row spread across the table: every size reads the same number of distinct
    # rows from the same draws, so only the tables grow
    zipf = 1.0 / torch.arange(1, RANKS + 1, dtype=torch.float64) ** 0.9
    zipf /= zipf.sum()
    user_row = torch.arange(RANKS) * (users // RANKS)
    item_row = torch.arange(RANKS) * (items // RANKS)
    popularity = torch.full((items,), 1e-12, dtype=torch.float64)
    popularity[item_row] = zipf
    popularity /= popularity.sum()
    count = (popularity * 1e7).round().long().clamp_min(1)
    empty = (torch.zeros(0, dtype=torch.int64),) * 2
    data = InteractionData(path=Path("."), manifest={}, manifest_sha256="", num_users=users,
                           num_items=items, splits={"train": empty, "valid": empty,
                                                    "test": empty},
                           item_count=count, item_log_q=popularity.log().float(),
                           users=None, items=None)
    batches = []
    for _ in range(warmup + steps):  # drawn before timing: the same for every table size
        u = user_row[torch.randint(0, RANKS, (BATCH,), generator=g)]
        i = item_row[torch.multinomial(zipf, BATCH, replacement=True, generator=g)]
        h = item_row[torch.multinomial(zipf, BATCH * cfg.history_len, replacement=True,
                                       generator=g)].view(BATCH, -1)
        batches.append((u, i, h))

    class _Histories:  # batch_loss reads histories[users] once per step
        current = None

        def __getitem__(self, users):
            return self.current

    hist = _Histories()
    torch.manual_seed(0)
    model = new_model(cfg, data)
    opt = TrainingOptimizer(model, cfg)
    times = []
    for n, (u, i, h) in enumerate(batches):
        hist.current = h
        t0 = time.perf_counter()
        loss = batch_loss(model, cfg, data, hist, u, i, g)
        opt.zero_grad()
        loss.backward()
        opt.step(cfg.lr)
        if n >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_ms": 1e3 * statistics.median(times)}


def _table_bytes(users: int, items: int, optimizer: str) -> int:
    """Tables, their optimiser state and (dense) gradients: what a point needs at least."""
    rows = (users + 2 * items) * 128 * 4  # user, item and bias tables (the bias rounded up)
    return rows * {"lazy_adam": 3, "rowwise_adagrad": 1, "dense": 4}[optimizer]


def sweep(sizes: list[int], steps: int, warmup: int) -> list[dict]:
    import psutil
    from common import EXACT_RSS_ENV  # noqa: F401 (peak RSS is read from wait4 below)

    budget = psutil.virtual_memory().total * 0.8
    rows = []
    for users in sizes:
        items = min(users, ITEMS_MAX)
        for optimizer in OPTIMIZERS:
            row = {"users": users, "items": items, "optimizer": optimizer, "batch": BATCH}
            need = _table_bytes(users, items, optimizer)
            if need > budget:
                rows.append({**row, "note": f"not run: needs about {need / GiB:.0f} GiB"})
                print(f"skip {users:,} users, {optimizer}: needs {need / GiB:.0f} GiB",
                      flush=True)
                continue
            args = json.dumps([users, items, optimizer, steps, warmup])
            proc = subprocess.Popen([sys.executable, __file__, "--_step", args],
                                    stdout=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            out = proc.stdout.read()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"step worker failed for {row}")
            row.update(json.loads(out.strip().splitlines()[-1]))
            row["peak_rss_gb"] = round(usage.ru_maxrss * 1024 / GiB, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- part 2: the pipeline, each stage a command with its output in a log file --

def _run(name: str, argv: list[str], logs: Path, env: dict | None = None) -> dict:
    """Run one stage to completion, output to logs/<name>.log; wall time and peak RSS."""
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {logs / (name + '.log')}")
    row = {"stage": name, "wall_s": round(wall, 1),
           "peak_rss_gb": round(usage.ru_maxrss * 1024 / GiB, 2)}
    print(json.dumps(row), flush=True)
    return row


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "recsys_ccl.cli", *args]


def _dir_bytes(path: Path) -> int:
    """Bytes on disk, hard links counted once."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _serve(bundle: Path, logs: Path, name: str, calls: int, users: list[str]) -> dict:
    """Serve start-up (spawn to SERVING) and sequential Recommend latency for known users."""
    import numpy as np
    import psutil

    from recsys_ccl.serving.client import RecommenderClient

    port = free_port()
    log_path = logs / f"{name}.log"
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(_cli("serve", "--bundle", str(bundle), "--port", str(port)),
                                stdout=log, stderr=subprocess.STDOUT)
        while '"event": "serving"' not in log_path.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"serve exited; see {log_path}")
            time.sleep(0.05)
        startup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    lat = []
    try:
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            for _ in range(50):  # warm-up
                client.recommend(users[int(rng.integers(len(users)))], 10, exclude_seen=True)
            for _ in range(calls):
                user = users[int(rng.integers(len(users)))]
                t = time.perf_counter()
                client.recommend(user, 10, exclude_seen=True)
                lat.append(time.perf_counter() - t)
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lat.sort()
    row = {"stage": name, "wall_s": round(startup, 1), "peak_rss_gb": round(rss / GiB, 2),
           "p50_ms": round(1e3 * lat[len(lat) // 2], 2),
           "p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 2), "calls": calls}
    print(json.dumps(row), flush=True)
    return row


def scoring_rates(run: Path, data_dir: Path, users: int, split: str = "test") -> dict:
    """Full-ranking evaluation in GFLOP/s of scoring (masking and top-k included) on `users`
    users of `split`, beside a bare chunked matmul of the same shapes, in this process."""
    import torch

    from recsys_ccl.checkpoint import load_run
    from recsys_ccl.data.dataset import load_data_dir, train_histories
    from recsys_ccl.evaluation import evaluate_model

    data = load_data_dir(data_dir)
    model, _ = load_run(run)
    hist = train_histories(data, model.config.history_len)
    items = model.encode_all_items()
    n_items, dim = items.shape
    t0 = time.perf_counter()
    m = evaluate_model(model, data, hist, split, 20, sample_users=users, seed=0)
    eval_s = time.perf_counter() - t0
    u = torch.nn.functional.normalize(torch.randn(1024, dim), dim=1)
    chunk = 1 << 15
    buf = torch.empty(1024 * chunk)
    batches = max(1, m["users"] // 1024)
    t0 = time.perf_counter()
    for _ in range(batches):
        for c0 in range(0, n_items, chunk):
            c1 = min(c0 + chunk, n_items)
            torch.matmul(u, items[c0:c1].T, out=buf[: 1024 * (c1 - c0)].view(1024, c1 - c0))
    mm_s = time.perf_counter() - t0
    flop = 2.0 * dim * n_items
    return {"users_scored": m["users"], "evaluate_s": round(eval_s, 1),
            "scoring_gflops": round(flop * m["users"] / eval_s / 1e9, 1),
            "matmul_gflops": round(flop * 1024 * batches / mm_s / 1e9, 1)}


def pipeline(work: Path, users: int, items: int, interactions: int) -> tuple[list[dict], dict]:
    import polars as pl

    logs = work / "logs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log, data, run, bundle = work / "log.parquet", work / "data", work / "run", work / "bundle"
    rows = [
        _run("synth", _cli("synth", "--out", str(log), "--users", str(users), "--items",
                           str(items), "--interactions", str(interactions)), logs),
        _run("prepare", _cli("prepare", "--input", str(log), "--format", "parquet", "--out",
                             str(data)), logs),
        _run("train", _cli("train", "--data", str(data), "--out", str(run), "--epochs", "1"),
             logs),
    ]
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    manifest = json.loads((data / "manifest.json").read_text())
    train_rows = manifest["counts"]["train_rows"]
    rows[-1].update({"interactions_per_s": round(epoch["interactions_per_s"]),
                     "validation_s": round(epoch["validation_seconds"], 1),
                     "valid_users": epoch.get("valid/users"),
                     "with_validation_per_s": round(train_rows / (
                         epoch["seconds"] + epoch["validation_seconds"])),
                     "run_dir_gb": round(_dir_bytes(run) / GiB, 2)})
    rows.append(_run("evaluate", _cli("evaluate", "--run", str(run), "--data", str(data)),
                     logs))
    result = json.loads((logs / "evaluate.log").read_text().strip().splitlines()[-1])
    rows[-1].update({"users": result["users"], "recall@20": round(result["recall@20"], 4),
                     "gflops_wall": round(2.0 * 128 * manifest["counts"]["items"]
                                          * result["users"] / rows[-1]["wall_s"] / 1e9, 1)})
    rows.append(_run("export", _cli("export", "--run", str(run), "--data", str(data), "--out",
                                    str(bundle)), logs))
    rows[-1]["bundle_gb"] = round(_dir_bytes(bundle) / GiB, 2)
    known = pl.read_parquet(data / "users.parquet")["user_id"].to_list()
    rows.append(_serve(bundle, logs, "serve", 2000, known))
    rates = scoring_rates(run, data, 50_000)
    print(json.dumps(rates), flush=True)
    return rows, {**rates, "train_rows": train_rows}


def catalogue(work: Path, items: int) -> list[dict]:
    """A 10^6-item bundle: export's HNSW build (recall logged), serve start-up, latency."""
    import polars as pl

    logs = work / "logs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log, data, run, bundle = work / "log.parquet", work / "data", work / "run", work / "bundle"
    rows = [
        _run("synth (catalogue)", _cli("synth", "--out", str(log), "--users", "100000",
                                       "--items", str(items), "--interactions", "3000000"),
             logs),
        _run("prepare (catalogue)", _cli("prepare", "--input", str(log), "--format",
                                         "parquet", "--out", str(data)), logs),
        _run("train (catalogue, 200 steps)", _cli("train", "--data", str(data), "--out",
                                                  str(run), "--max-steps", "200"), logs),
        _run("export (catalogue, HNSW)", _cli("export", "--run", str(run), "--data", str(data),
                                              "--out", str(bundle)), logs),
    ]
    manifest = json.loads((bundle / "manifest.json").read_text())
    index = manifest.get("index", {})
    rows[-1].update({"bundle_items": manifest["counts"]["items"],
                     "hnsw_recall@10": index.get("recall@10"),
                     "ef_search": index.get("ef_search"),
                     "hnsw_build_s": index.get("build_seconds"),
                     "bundle_gb": round(_dir_bytes(bundle) / GiB, 2)})
    known = pl.read_parquet(data / "users.parquet")["user_id"].to_list()
    rows.append(_serve(bundle, logs, "serve (catalogue, HNSW)", 2000, known))
    return rows


# -- report --

def plot(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for opt, style in zip(OPTIMIZERS, ("o-", "s--", "^:"), strict=True):
        pts = [r for r in steps if r["optimizer"] == opt and "step_ms" in r]
        if pts:
            label = {"lazy_adam": "sparse tables, lazy Adam (default)",
                     "rowwise_adagrad": "sparse tables, row-wise Adagrad",
                     "dense": "dense tables, Adam (every row every step)"}[opt]
            ax.plot([r["users"] for r in pts], [r["step_ms"] for r in pts], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users (table rows); items = min(users, 200,000)")
    ax.set_ylabel("ms per training step (batch 2048)")
    ax.set_title(f"Training step against table size, {machine()}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(steps: list[dict], stages: list[dict], rates: dict, out: Path) -> None:
    lines = ["# Scale: cost follows the work (benchmarks/bench_scale.py)", ""]
    if steps:
        lines += ["## Training step against table size", "",
                  "`python benchmarks/bench_scale.py --phase sweep`; bench_scale_steps.csv, "
                  "bench_scale.png. Batch 2048, default model (128-d, 50-item histories); "
                  "median of timed steps, each point in its own process.", "",
                  "| users | items | tables | ms / step | peak RSS (GB) |",
                  "|---:|---:|---|---:|---:|"]
        for r in steps:
            ms = f"{r['step_ms']:.1f}" if "step_ms" in r else r.get("note", "-")
            lines.append(f"| {r['users']:,} | {r['items']:,} | {r['optimizer']} | {ms} | "
                         f"{r.get('peak_rss_gb', '-')} |")
        by = {(r["users"], r["optimizer"]): r.get("step_ms") for r in steps}
        if by.get((10**6, "lazy_adam")) and by.get((10**4, "lazy_adam")):
            ratio = by[(10**6, "lazy_adam")] / by[(10**4, "lazy_adam")]
            lines += ["", f"10^6-user step / 10^4-user step (default): {ratio:.2f} "
                      f"(target <= {TARGETS['step_ratio_1e6_vs_1e4']})."]
    if stages:
        lines += ["", "## Pipeline", "",
                  "`python benchmarks/bench_scale.py --phase pipeline` (and `--phase "
                  "catalogue`); bench_scale_pipeline.csv. Each stage a `recsys-ccl` command, "
                  "output redirected to a log file; wall time and peak RSS of the process.", "",
                  "| stage | wall (s) | peak RSS (GB) | notes |", "|---|---:|---:|---|"]
        for r in stages:
            notes = ", ".join(f"{k} {v}" for k, v in r.items()
                              if k not in ("stage", "wall_s", "peak_rss_gb", "machine"))
            lines.append(f"| {r['stage']} | {r['wall_s']} | {r['peak_rss_gb']} | {notes} |")
    if rates:
        lines += ["", f"Full-ranking scoring (masking and top-k included) on "
                  f"{rates['users_scored']:,} users: {rates['scoring_gflops']} GFLOP/s; a bare "
                  f"chunked matmul of the same shapes in the same process: "
                  f"{rates['matmul_gflops']} GFLOP/s."]
    verdicts = targets(steps, stages, rates)
    if verdicts:
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in verdicts]
    (out / "bench_scale.md").write_text("\n".join(lines) + "\n")


def targets(steps: list[dict], stages: list[dict], rates: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for what this run measured."""
    out = []
    by = {(r["users"], r["optimizer"]): r.get("step_ms") for r in steps}
    small, large = by.get((10**4, "lazy_adam")), by.get((10**6, "lazy_adam"))
    if small and large:
        out.append((f"10^6-user step <= {TARGETS['step_ratio_1e6_vs_1e4']}x the 10^4-user step",
                    f"{large / small:.2f}x", large / small <= TARGETS["step_ratio_1e6_vs_1e4"]))
    train = next((r for r in stages if r["stage"] == "train"), None)
    if train and train.get("with_validation_per_s"):
        rate = float(train["with_validation_per_s"])
        out.append((f"one epoch >= {TARGETS['epoch_interactions_per_s']:,} interactions/s "
                    "including its validation", f"{rate:,.0f}/s",
                    rate >= TARGETS["epoch_interactions_per_s"]))
    rss = [(r["stage"], float(r["peak_rss_gb"])) for r in stages
           if r.get("peak_rss_gb") not in (None, "-", "")]
    if rss:
        worst = max(rss, key=lambda x: x[1])
        out.append((f"every stage < {TARGETS['peak_rss_gb']:.0f} GB peak RSS",
                    f"{worst[1]:.2f} GB ({worst[0]})", worst[1] < TARGETS["peak_rss_gb"]))
    if rates:
        g = float(rates["scoring_gflops"])
        out.append((f"scoring >= {TARGETS['scoring_gflops']:.0f} GFLOP/s incl. masking and "
                    "top-k", f"{g:.0f} GFLOP/s (matmul alone {float(rates['matmul_gflops']):.0f})",
                    g >= TARGETS["scoring_gflops"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["all", "sweep", "pipeline", "catalogue"], default="all")
    p.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--catalogue-items", type=int, default=1_000_000)
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".work" / "scale")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--_step", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._step is not None:
        print(json.dumps(_step_worker(*json.loads(args._step))))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    steps_csv = args.out / "bench_scale_steps.csv"
    stages_csv = args.out / "bench_scale_pipeline.csv"
    steps, stages, rates = _read(steps_csv), _read(stages_csv), {}
    if args.phase in ("all", "sweep"):
        steps = sweep(args.sizes, args.steps, args.warmup)
        for r in steps:
            r["machine"] = machine()
        write_csv(steps, steps_csv)
        plot(steps, args.out / "bench_scale.png")
        print_table(steps, ["users", "items", "optimizer", "step_ms", "peak_rss_gb"])
    if args.phase in ("all", "pipeline"):
        stages, rates = pipeline(args.work / "pipeline", args.users, args.items,
                                 args.interactions)
        stages.append({"stage": "scoring (in process)", "wall_s": rates["evaluate_s"],
                       "peak_rss_gb": "-", **{k: v for k, v in rates.items()
                                              if k != "evaluate_s"}})
    if args.phase in ("all", "catalogue"):
        kept = [r for r in stages if "catalogue" not in r["stage"]]
        stages = kept + catalogue(args.work / "catalogue", args.catalogue_items)
    if args.phase != "sweep":
        for r in stages:
            r["machine"] = machine()
        write_csv(stages, stages_csv)
        print_table(stages, ["stage", "wall_s", "peak_rss_gb"])
    if not rates:
        rates = next(({k: _num(v) for k, v in r.items()} for r in stages
                      if r["stage"] == "scoring (in process)"), {})
        if rates:
            rates["users_scored"] = int(rates["users_scored"])
    report(steps, stages, rates, args.out)
    return 0


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _read(path: Path) -> list[dict]:
    """Rows of an earlier run's CSV (so one phase can be measured again alone)."""
    import csv

    if not path.exists():
        return []
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k, v in r.items():
            if k in ("users", "items", "batch") and v:
                r[k] = int(v)
            elif k in ("step_ms",) and v:
                r[k] = float(v)
    return [{k: v for k, v in r.items() if v != ""} for r in rows]


if __name__ == "__main__":
    sys.exit(main())
