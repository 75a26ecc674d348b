"""Benchmark of `prepare`: our Polars path and DuckDB path against the pandas code users would
otherwise write, side by side in one run on the same synthetic CSV.

Engines: the Polars path, the DuckDB path, the out-of-core path (`--memory-limit 512MB`:
Polars streaming + DuckDB spilling to disk; its output is checked identical to the Polars
path's) and pandas. Steps (the same in all four): read the CSV, drop null ids, collapse
duplicate (user, item) pairs to the latest, 5-core, temporal split (last interaction per user
to test, the one before to valid), drop cold valid/test rows, build the vocabularies, write
Parquet. Each engine runs in its own process so that its peak RSS (VmHWM) is its own.

    python benchmarks/bench_prepare.py                 # 2 x 10^7 interactions
    python benchmarks/bench_prepare.py --interactions 2000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, peak_rss_bytes, print_table, write_csv

WORK = Path(__file__).resolve().parent / ".work"  # gitignored scratch space

ENGINES = ("polars", "duckdb", "out-of-core", "pandas")
OUT_OF_CORE_LIMIT = "512MB"


def prepare_pandas(csv: Path, out: Path, k: int = 5, holdout: int = 1) -> dict:
    """The straightforward pandas version of the same steps."""
    import numpy as np
    import pandas as pd

    df = pd.read_csv(csv)
    n_input = len(df)
    df = df.dropna(subset=["user_id", "item_id"])
    df = df.sort_values(["user_id", "timestamp"], kind="stable")
    df = df.drop_duplicates(["user_id", "item_id"], keep="last")
    while True:
        u = df.groupby("user_id")["item_id"].transform("size")
        i = df.groupby("item_id")["user_id"].transform("size")
        keep = (u >= k) & (i >= k)
        if keep.all():
            break
        df = df[keep]
    df = df.sort_values(["user_id", "timestamp"], kind="stable")
    from_end = df.groupby("user_id").cumcount(ascending=False)
    n = df.groupby("user_id")["item_id"].transform("size")
    n_test = np.minimum(holdout, n - 1)
    n_valid = np.minimum(holdout, n - 1 - n_test)
    df["split"] = np.where(from_end < n_test, "test",
                           np.where(from_end < n_test + n_valid, "valid", "train"))
    train = df[df["split"] == "train"]
    df = df[(df["split"] == "train") | (df["user_id"].isin(train["user_id"])
                                        & df["item_id"].isin(train["item_id"]))]
    users = np.sort(train["user_id"].unique())
    items = train.groupby("item_id").size().sort_index()
    df["user_idx"] = np.searchsorted(users, df["user_id"]).astype("int32")
    df["item_idx"] = np.searchsorted(items.index.to_numpy(), df["item_id"]).astype("int32")
    out.mkdir(parents=True)
    for name in ("train", "valid", "test"):
        part = df[df["split"] == name][["user_idx", "item_idx", "timestamp"]]
        part.rename(columns={"timestamp": "ts"}).sort_values(["user_idx", "ts"]).to_parquet(
            out / f"{name}.parquet", index=False)
    pd.DataFrame({"user_idx": np.arange(len(users), dtype="int32"),
                  "user_id": users.astype(str)}).to_parquet(out / "users.parquet", index=False)
    pd.DataFrame({"item_idx": np.arange(len(items), dtype="int32"),
                  "item_id": items.index.astype(str), "train_count": items.to_numpy(),
                  "log_q": np.log(items.to_numpy() / items.sum())}).to_parquet(
        out / "items.parquet", index=False)
    return {"input": n_input, "train": int((df["split"] == "train").sum())}


def run_one(engine: str, csv: Path, out: Path) -> dict:
    """Child process: run one engine and report wall time and peak RSS."""
    t0 = time.perf_counter()
    if engine == "pandas":
        counts = prepare_pandas(csv, out)
    else:
        from recsys_ccl.data.prepare import PrepareConfig, prepare

        extra = ({"engine": "duckdb", "memory_limit": OUT_OF_CORE_LIMIT}
                 if engine == "out-of-core" else {"engine": engine})
        m = prepare(PrepareConfig(input=str(csv), format="csv", k_core=5, split="temporal",
                                  holdout=1, **extra), out)
        counts = {"input": m["rows"]["input"], "train": m["counts"]["train_rows"]}
    seconds = time.perf_counter() - t0
    # the out-of-core path parses in a child process: its peak counts too
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"engine": engine, "seconds": seconds,
            "peak_rss_mib": max(peak_rss_bytes(), child) / 2**20, **counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--csv", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dest", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        print(json.dumps(run_one(args.run_one, args.csv, args.dest)))
        return 0

    from recsys_ccl.data.synth import SynthConfig, write_synth

    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        csv = Path(tmp) / "interactions.csv"
        t0 = time.perf_counter()
        df = write_synth(SynthConfig(users=args.users, items=args.items,
                                     interactions=args.interactions), csv)
        arrow_mib = df.to_arrow().nbytes / 2**20
        print(f"synth: {df.height:,} rows in {time.perf_counter() - t0:.1f} s; "
              f"in-memory Arrow size {arrow_mib:,.0f} MiB; CSV "
              f"{csv.stat().st_size / 2**20:,.0f} MiB", flush=True)
        del df
        rows = []
        for engine in args.engines:
            r = subprocess.run(
                [sys.executable, __file__, "--run-one", engine, "--csv", str(csv),
                 "--dest", str(Path(tmp) / f"out-{engine}")],
                capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res.update(rows_per_s=res["input"] / res["seconds"],
                       rss_vs_arrow=res["peak_rss_mib"] / arrow_mib, arrow_mib=arrow_mib,
                       machine=machine())
            rows.append(res)
            print(f"{engine:7s} {res['seconds']:7.1f} s  peak RSS {res['peak_rss_mib']:7,.0f} MiB",
                  flush=True)
        if {"polars", "out-of-core"} <= set(args.engines):
            same = _same_output(Path(tmp) / "out-polars", Path(tmp) / "out-out-of-core")
            print(f"out-of-core output identical to the Polars path: {same}")
            for r in rows:
                r["same_as_polars"] = same if r["engine"] == "out-of-core" else None
    by = {r["engine"]: r for r in rows}
    if "pandas" in by:
        for r in rows:
            r["speedup_vs_pandas"] = by["pandas"]["seconds"] / r["seconds"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "bench_prepare.csv")
    print()
    print_table(rows, ["engine", "input", "seconds", "rows_per_s", "speedup_vs_pandas",
                       "peak_rss_mib", "rss_vs_arrow", "same_as_polars"])
    plot(rows, args.out / "bench_prepare.png", args.interactions)
    print(f"wrote {args.out / 'bench_prepare.csv'} and bench_prepare.png")
    return 0


def _same_output(a: Path, b: Path) -> bool:
    import polars as pl

    return all(pl.read_parquet(a / f"{n}.parquet").equals(pl.read_parquet(b / f"{n}.parquet"))
               for n in ("train", "valid", "test", "users", "items"))


def plot(rows: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["C0", "C1", "C2", "C7"][: len(rows)]
    axes[0].bar(names, [r["seconds"] for r in rows], color=colors)
    pandas = [r["seconds"] for r in rows if r["engine"] == "pandas"]
    if pandas:
        axes[0].axhline(pandas[0] / 5, ls="--", c="k", lw=1, label="5x pandas throughput")
        axes[0].legend()
    axes[0].set_ylabel("wall time (s)")
    axes[1].bar(names, [r["peak_rss_mib"] for r in rows], color=colors)
    axes[1].axhline(3 * rows[0]["arrow_mib"], ls="--", c="k", lw=1, label="3x input Arrow size")
    axes[1].axhline(512e6 / 2**20, ls=":", c="C2", lw=1,
                    label=f"--memory-limit {OUT_OF_CORE_LIMIT}")
    axes[1].set_ylabel("peak RSS (MiB)")
    axes[1].legend()
    fig.suptitle(f"prepare: {n:,} interactions, 5-core, temporal split ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
