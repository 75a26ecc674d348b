"""`recsys-ccl`: one entry point, one subcommand per pipeline stage. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from recsys_ccl.errors import RecsysError

__all__ = ["main"]


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from recsys_ccl.data.synth import SynthConfig

    d = SynthConfig()
    p = sub.add_parser("synth", help="generate the built-in synthetic interaction log")
    p.add_argument("--out", required=True, help="output file, .csv or .parquet")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--interactions", type=int, default=d.interactions)
    p.add_argument("--clusters", type=int, default=d.clusters, help="latent taste clusters")
    p.add_argument("--zipf", type=float, default=d.zipf, help="item popularity exponent")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from recsys_ccl.data.synth import SynthConfig, write_synth

    cfg = SynthConfig(users=args.users, items=args.items, interactions=args.interactions,
                      clusters=args.clusters, zipf=args.zipf, seed=args.seed)
    t0 = time.perf_counter()
    df = write_synth(cfg, args.out)
    print(f"wrote {df.height:,} interactions ({df['user_id'].n_unique():,} users, "
          f"{df['item_id'].n_unique():,} items) to {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from recsys_ccl.data.readers import FORMATS

    p = sub.add_parser("prepare", help="raw interactions -> DATA directory (splits, vocab)")
    p.add_argument("--input", required=True, help="file, or directory for lightgcn/movielens")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="DATA directory to create")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default=None,
                   help="time column (default: 'timestamp' if present)")
    p.add_argument("--rating-col", default=None,
                   help="rating column (default: 'rating' if present)")
    p.add_argument("--min-rating", type=float, default=None,
                   help="keep ratings >= this (implicit feedback)")
    p.add_argument("--k-core", type=int, default=0,
                   help="iteratively keep users and items with >= N interactions")
    p.add_argument("--split", default="auto", choices=["auto", "temporal", "random", "given"],
                   help="auto: given for lightgcn, temporal with a time column, else random")
    p.add_argument("--holdout", type=int, default=1,
                   help="temporal: last N per user to test, N before them to valid")
    p.add_argument("--test-ratio", type=float, default=0.1)
    p.add_argument("--valid-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="polars", choices=["polars", "duckdb"])
    p.add_argument("--memory-limit", default=None, help="DuckDB memory limit, e.g. 512MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_prepare)


def _prepare_config(args: argparse.Namespace):
    from recsys_ccl.data.prepare import PrepareConfig

    return PrepareConfig(
        input=args.input, format=args.format, user_col=args.user_col, item_col=args.item_col,
        time_col=args.time_col, rating_col=args.rating_col, min_rating=args.min_rating,
        k_core=args.k_core, split=args.split, holdout=args.holdout,
        test_ratio=args.test_ratio, valid_ratio=args.valid_ratio, seed=args.seed,
        engine=args.engine, memory_limit=args.memory_limit,
    )


def _summary(manifest: dict) -> str:
    c, rows = manifest["counts"], manifest["rows"]
    dropped = ", ".join(f"{k} {v:,}" for k, v in rows["dropped"].items() if v) or "none"
    return (
        f"users {c['users']:,}  items {c['items']:,}  "
        f"train {c['train_rows']:,}  valid {c['valid_rows']:,}  test {c['test_rows']:,}\n"
        f"rows: input {rows['input']:,} = kept {rows['kept']:,} + dropped "
        f"{sum(rows['dropped'].values()):,} ({dropped})\n"
        f"split: {manifest['parameters']['split']}"
    )


def _cmd_prepare(args: argparse.Namespace) -> int:
    from recsys_ccl.data.prepare import prepare

    t0 = time.perf_counter()
    manifest = prepare(_prepare_config(args), args.out, overwrite=args.overwrite)
    print(f"prepared {args.out} in {time.perf_counter() - t0:.1f} s")
    print(_summary(manifest))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic data")
    p.add_argument("--workdir", default="demo_out", help="where the demo writes (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import SynthConfig, write_synth

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "interactions.parquet"
    print(f"[1/2] synth -> {raw}")
    t0 = time.perf_counter()
    df = write_synth(SynthConfig(seed=args.seed), raw)
    print(f"      {df.height:,} interactions in {time.perf_counter() - t0:.1f} s")
    data = work / "data"
    print(f"[2/2] prepare (min rating 4, 5-core, temporal split) -> {data}")
    manifest = prepare(
        PrepareConfig(input=str(raw), format="parquet", min_rating=4.0, k_core=5,
                      split="temporal", holdout=1, seed=args.seed),
        data, overwrite=True,
    )
    print("      " + _summary(manifest).replace("\n", "\n      "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-ccl",
        description="Two-tower retrieval: data pipeline, contrastive training, serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    _add_prepare(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RecsysError as exc:
        print(f"recsys-ccl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recsys-ccl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

