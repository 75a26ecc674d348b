"""Training throughput on CPU against an earlier revision of this repository, side by side.

The same training steps (Gowalla, batch 2048, the model the baseline also has: the committed
config at 64-d without the item neighbourhood; the user tower, the item tower, the loss,
backward and the optimiser step) timed with this checkout's code and with the code of a
baseline revision (extracted with `git archive` into a scratch directory), each in
its own process, rounds alternating so that both see the same machine state. Reports
interactions/s per revision and their ratio (plus, for information, this checkout with the
committed config as it is); writes bench_train_speed.csv and .png.

    python benchmarks/bench_train_speed.py                     # baseline: BASELINE below
    python benchmarks/bench_train_speed.py --baseline HEAD~3 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import RESULTS, machine, print_table, write_csv  # noqa: E402

# the last commit before the training-speed work of issue 17 (interactions/s "today")
BASELINE = "cb8f60f"

# run in a fresh interpreter with the revision's source first on sys.path; uses only names
# both revisions have
_MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import load_data_dir, train_histories
from recsys_ccl.objective import batch_loss
from recsys_ccl.train import new_model
try:  # this checkout: dense weights and embedding tables, each with their optimiser
    from recsys_ccl.optimization import TrainingOptimizer
    make_opt, step = TrainingOptimizer, lambda opt: opt.step(cfg.lr)
except ImportError:  # revisions before the embedding tables: one torch optimiser
    from recsys_ccl.train import _make_optimizer as make_opt
    step = lambda opt: opt.step()
import recsys_ccl
assert recsys_ccl.__file__.startswith(sys.argv[1]), recsys_ccl.__file__
import dataclasses
known = {f.name for f in dataclasses.fields(TrainConfig)}
raw = json.loads(sys.argv[3])
dropped = sorted(set(raw) - known)  # keys newer than the revision: reported, not hidden
cfg = TrainConfig.from_dict({k: v for k, v in raw.items() if k in known})
data = load_data_dir(sys.argv[2])
steps, warmup = int(sys.argv[4]), 5
torch.manual_seed(0)
model = new_model(cfg, data)
opt = make_opt(model, cfg)
hist = train_histories(data, cfg.history_len)
users, items = data.splits["train"]
gen = torch.Generator().manual_seed(0)
perm = torch.randperm(len(users), generator=gen)
B = cfg.batch_size
for b in range(warmup + steps):
    if b == warmup:
        t0 = time.perf_counter()
    idx = perm[(b * B) % (len(users) - B):][:B]
    loss = batch_loss(model, cfg, data, hist, users[idx], items[idx], gen)
    opt.zero_grad()
    loss.backward()
    step(opt)
print(json.dumps({"interactions_per_s": steps * B / (time.perf_counter() - t0),
                  "dropped_keys": dropped}))
"""


# what the baseline's model was: the committed config's other choices are the same code paths
LIKE_FOR_LIKE = {"dim": 64, "item_history_len": 0}


def measure(tree: Path, data: Path, cfg: dict, steps: int) -> float:
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(tree), str(data), json.dumps(cfg),
                        str(steps)], capture_output=True, text=True, cwd=tree,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    if r.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    from recsys_ccl.config import TrainConfig

    off = TrainConfig().to_dict()
    live = [k for k in out["dropped_keys"] if cfg[k] != off[k]]
    if live:  # a key the revision lacks, set to something that does work: not like for like
        raise SystemExit(f"{tree} does not know config keys {live}, set to non-default values")
    return out["interactions_per_s"]


def extract(rev: str, into: Path) -> Path:
    """The source tree of revision `rev`, written under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "recsys_ccl"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [r["code"] for r in rows]
    rates = [r["interactions_per_s"] / 1e3 for r in rows]
    ax.bar(range(len(names)), rates, color=["C7", "C0", "C2"][: len(rows)])
    ax.set_xticks(range(len(names)), [f"{r['code']}\n{r['dim']}-d" for r in rows], fontsize=8)
    for i, r in enumerate(rows):
        ax.text(i, rates[i], f"{rates[i]:.1f}k/s ({r['ratio']:.2f}x)", ha="center",
                va="bottom")
    ax.set_ylabel("interactions / s (thousands)")
    ax.set_title(f"Gowalla training, batch {rows[0]['batch_size']}, {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from reproduce_gowalla import add_gowalla_arguments

    from recsys_ccl.config import TrainConfig
    from recsys_ccl.data.prepare import PrepareConfig, prepare

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gowalla_arguments(p)
    p.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="timed steps per round")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    cfg = TrainConfig.from_toml(args.config, LIKE_FOR_LIKE).to_dict()
    committed = TrainConfig.from_toml(args.config).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        prepare(PrepareConfig(input=str(args.gowalla), format="lightgcn", seed=0,
                              valid_from_train=0.1), data)
        old = extract(args.baseline, (tmp / "baseline").resolve())
        runs = {f"baseline {args.baseline}": (old, cfg), "this checkout": (REPO, cfg),
                "this checkout, committed config": (REPO, committed)}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (tree, config) in runs.items():
                rates[name].append(measure(tree, data, config, args.steps))
    base = statistics.median(rates[f"baseline {args.baseline}"])
    rows = [{"code": name, "dim": runs[name][1]["dim"],
             "item_history_len": runs[name][1]["item_history_len"],
             "interactions_per_s": round(statistics.median(r)),
             "ratio": round(statistics.median(r) / base, 2), "rounds": len(r),
             "steps": args.steps, "batch_size": cfg["batch_size"], "machine": machine()}
            for name, r in rates.items()]
    print_table(rows, ["code", "dim", "item_history_len", "interactions_per_s", "ratio",
                       "rounds", "steps"])
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "bench_train_speed.csv")
    plot(rows, args.out / "bench_train_speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
