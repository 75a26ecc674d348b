"""`recsys-ccl`: one entry point, one subcommand per pipeline stage. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from recsys_ccl import __version__
from recsys_ccl.errors import RecsysError

__all__ = ["main"]


NO_PROGRESS = "no progress bar or log lines"


def _add_synth(sub: argparse._SubParsersAction) -> None:
    from recsys_ccl.data.synth import SynthConfig

    d = SynthConfig()
    p = sub.add_parser("synth", help="generate the built-in synthetic interaction log")
    p.add_argument("--out", required=True, help="output file, .csv or .parquet")
    p.add_argument("--users", type=int, default=d.users, help="users")
    p.add_argument("--items", type=int, default=d.items, help="items")
    p.add_argument("--interactions", type=int, default=d.interactions,
                   help="interactions (rows) to generate")
    p.add_argument("--clusters", type=int, default=d.clusters, help="latent taste clusters")
    p.add_argument("--zipf", type=float, default=d.zipf, help="item popularity exponent")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--item-features", default=None, metavar="FILE.parquet",
                   help="also write item features tied to the taste clusters (category, "
                        "tags, price, a 16-d embedding) for every item")
    p.add_argument("--user-features", default=None, metavar="FILE",
                   help="also write user features (region, age band), .csv or .parquet")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from recsys_ccl.data.synth import SynthConfig, write_synth

    cfg = SynthConfig(users=args.users, items=args.items, interactions=args.interactions,
                      clusters=args.clusters, zipf=args.zipf, seed=args.seed)
    t0 = time.perf_counter()
    df = write_synth(cfg, args.out, args.item_features, args.user_features)
    print(f"wrote {df.height:,} interactions ({df['user_id'].n_unique():,} users, "
          f"{df['item_id'].n_unique():,} items) to {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from recsys_ccl.data.readers import FORMATS

    p = sub.add_parser("prepare", help="raw interactions -> DATA directory (splits, vocab)")
    p.add_argument("--input", required=True, help="file, or directory for lightgcn/movielens")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="input format (sequences: `user item item ...` lines in time order)")
    p.add_argument("--out", required=True, help="DATA directory to create")
    p.add_argument("--user-col", default="user_id", help="user id column (csv, parquet)")
    p.add_argument("--item-col", default="item_id", help="item id column (csv, parquet)")
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
    p.add_argument("--test-ratio", type=float, default=0.1,
                   help="random split: share of each user's rows to test")
    p.add_argument("--valid-ratio", type=float, default=0.1,
                   help="random split: share of each user's rows to valid")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    p.add_argument("--engine", default="polars", choices=["polars", "duckdb"],
                   help="polars (in memory) or duckdb (the same steps in SQL)")
    p.add_argument("--memory-limit", default=None,
                   help="out of core: stream the input and run DuckDB within this much memory "
                        "(e.g. 512MB), spilling to a temporary directory beside --out")
    p.add_argument("--item-features", default=None, metavar="FILE|auto",
                   help="item feature table (.csv/.parquet) keyed by the item id column; its "
                        "items without interactions join the catalogue as cold items; auto: "
                        "MovieLens' u.item / movies.dat (--format movielens)")
    p.add_argument("--user-features", default=None, metavar="FILE|auto",
                   help="user feature table keyed by the user id column; auto: MovieLens' "
                        "u.user / users.dat")
    p.add_argument("--feature", action="append", default=[], metavar="NAME=TYPE",
                   help="field type instead of the inferred one: categorical, "
                        "multi_hot[:SEP], numeric[:log1p] or vector (repeatable)")
    p.add_argument("--feature-min-count", type=int, default=1,
                   help="categorical values seen in fewer training entities take the "
                        "out-of-vocabulary bucket")
    p.add_argument("--cold-items", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this share of items: all their interactions go to test")
    p.add_argument("--cold-users", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this share of users: all their interactions go to test")
    p.add_argument("--valid-from-train", type=float, default=0.0, metavar="FRACTION",
                   help="move this share of each user's train rows to valid (seeded): a "
                        "validation set for splits that have none, e.g. lightgcn's")
    p.add_argument("--keep-cold-targets", action="store_true",
                   help="keep held-out rows whose user or item has no training row (they "
                        "join the vocabularies, untrained): the published leave-one-out "
                        "protocol, where every user with a held-out item counts and a target "
                        "no model can rank is a miss")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(func=_cmd_prepare)


def _prepare_config(args: argparse.Namespace):
    from recsys_ccl.data.prepare import PrepareConfig

    return PrepareConfig(
        input=args.input, format=args.format, user_col=args.user_col, item_col=args.item_col,
        time_col=args.time_col, rating_col=args.rating_col, min_rating=args.min_rating,
        k_core=args.k_core, split=args.split, holdout=args.holdout,
        test_ratio=args.test_ratio, valid_ratio=args.valid_ratio, seed=args.seed,
        engine=args.engine, memory_limit=args.memory_limit,
        item_features=args.item_features, user_features=args.user_features,
        features=tuple(args.feature), feature_min_count=args.feature_min_count,
        cold_items=args.cold_items, cold_users=args.cold_users,
        valid_from_train=args.valid_from_train, keep_cold_targets=args.keep_cold_targets,
    )


def _cmd_prepare(args: argparse.Namespace) -> int:
    from recsys_ccl.data.prepare import prepare, prepare_summary

    t0 = time.perf_counter()
    manifest = prepare(_prepare_config(args), args.out, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print(f"prepared {args.out} in {time.perf_counter() - t0:.1f} s")
    print(prepare_summary(manifest))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a two-tower model on a DATA directory")
    p.add_argument("--data", required=True, help="DATA directory from prepare")
    p.add_argument("--out", required=True, help="RUN directory")
    p.add_argument("--config", default=None, help="TOML file of TrainConfig keys")
    p.add_argument("--epochs", type=int, default=None, help="config key epochs")
    p.add_argument("--batch-size", type=int, default=None, help="config key batch_size")
    p.add_argument("--lr", type=float, default=None, help="config key lr")
    p.add_argument("--loss", choices=["infonce", "ccl", "margin", "bpr"], default=None,
                   help="config key loss")
    p.add_argument("--seed", type=int, default=None, help="config key seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (value read as TOML), repeatable")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps in all (within an epoch if need be), "
                        "with a checkpoint and a metrics line; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing RUN directory (only a RUN or an empty directory)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else cpu), cpu, cuda or cuda:N; under "
                        "torchrun, CUDA means one GPU per process (LOCAL_RANK) and NCCL, the "
                        "CPU means gloo")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(func=_cmd_train)


def _train_config(args: argparse.Namespace):
    from recsys_ccl.config import TrainConfig, parse_override

    overrides = dict(parse_override(s) for s in args.set)
    for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("loss", "loss"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.config:
        return TrainConfig.from_toml(args.config, overrides)
    return TrainConfig.from_dict(overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from recsys_ccl.distributed import init_from_env, rank_and_world
    from recsys_ccl.train import resolve_device, train

    # under torchrun: one process per rank, global negatives; NCCL between GPUs (each rank
    # on GPU LOCAL_RANK), gloo between CPU processes
    kind = resolve_device(args.device).type
    if kind == "cuda" and ":" in args.device and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecsysError(f"--device {args.device}: under torchrun each process takes GPU "
                          f"LOCAL_RANK; pass --device cuda")
    joined = init_from_env(kind)
    try:
        # resolved again once joined: `cuda` now means this rank's GPU (LOCAL_RANK)
        summary = train(args.data, args.out, _train_config(args), resume=args.resume,
                        overwrite=args.overwrite, progress=not args.no_progress,
                        device=resolve_device(args.device), max_steps=args.max_steps)
        if rank_and_world()[0] == 0:
            print(json.dumps({**summary, "processes": rank_and_world()[1]}))
    finally:
        if joined:
            dist.destroy_process_group()
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="full-ranking metrics (JSON on stdout)")
    p.add_argument("--run", default=None, help="RUN directory (not needed for a baseline)")
    p.add_argument("--data", required=True, help="DATA directory from prepare")
    p.add_argument("--split", default="test", choices=["valid", "test"],
                   help="the held-out split to score")
    p.add_argument("--k", type=int, default=20, help="list length K of the metrics")
    p.add_argument("--baseline", choices=["popularity"], default=None,
                   help="evaluate a baseline instead of a trained model")
    p.add_argument("--sample-users", type=int, default=0, metavar="N",
                   help="evaluate a seeded sample of N of the users with held-out items "
                        "(0: all); the output's users / users_total say how many")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.add_argument("--device", default="cpu",
                   help="where the model scores: cpu, cuda or cuda:N (auto: CUDA if present)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="evaluate what a running server answers (RecommendBatch per user); "
                        "equals the offline figures for a bundle exported with the history "
                        "before the split: --history-splits train,valid for test, train for "
                        "valid")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from recsys_ccl.evaluation import evaluate_run, evaluate_server

    if args.server is not None:
        if args.run is not None or args.baseline is not None:
            raise RecsysError("--server evaluates what the server serves: give it without "
                              "--run or --baseline")
        result = evaluate_server(args.server, args.data, args.split, args.k)
    else:
        from recsys_ccl.train import resolve_device

        result = evaluate_run(args.run, args.data, args.split, args.k, args.baseline,
                              device=resolve_device(args.device),
                              sample_users=args.sample_users, seed=args.seed,
                              progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="RUN + DATA -> serving BUNDLE")
    p.add_argument("--run", required=True, help="RUN directory from train")
    p.add_argument("--data", required=True, help="the DATA directory the RUN was trained on")
    p.add_argument("--out", required=True, help="BUNDLE directory")
    p.add_argument("--history-splits", default="train,valid,test", metavar="SPLITS",
                   help="splits whose interactions become the users' stored histories "
                        "(exclude_seen, the user tower's input): all by default, for "
                        "production; 'train,valid' serves exactly what `evaluate` scores on "
                        "test")
    p.add_argument("--items", default=None, metavar="NEW_ITEMS.parquet",
                   help="feature table of items to add (new ids) or change, embedded from "
                        "their features without retraining (a model with item features)")
    p.add_argument("--index", default="auto", choices=["auto", "hnsw", "exact"],
                   help="auto: build a faiss HNSW index (recall@10 against exact search "
                        "measured and logged) from 250,000 items; hnsw: always; exact: never")
    p.add_argument("--device", default="cpu",
                   help="where the towers run: cpu, cuda or cuda:N (auto: CUDA if present)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing BUNDLE directory")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from recsys_ccl.export import export_bundle
    from recsys_ccl.train import resolve_device

    manifest = export_bundle(args.run, args.data, args.out, overwrite=args.overwrite,
                             history_splits=args.history_splits,
                             device=resolve_device(args.device), new_items=args.items,
                             index=args.index, progress=not args.no_progress)
    print(f"exported {args.out}: model_version {manifest['model_version']}, "
          f"{manifest['counts']['items']:,} items x {manifest['counts']['embedding_dim']}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from recsys_ccl.serving.limits import ServerLimits

    d = ServerLimits()
    p = sub.add_parser("serve", help="serve a BUNDLE over gRPC (SIGHUP reloads, SIGTERM stops)")
    p.add_argument("--bundle", required=True, help="BUNDLE directory (or a symlink to one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=_port, default=50051, help="0 picks a free port")
    p.add_argument("--index", default="auto", choices=["auto", "exact", "hnsw"],
                   help="top-k search: auto (the bundle's HNSW index when export built one, "
                        "else exact), exact, or hnsw (the bundle's, or built at start-up)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--metrics-port", type=_port, default=None,
                   help="serve Prometheus metrics on this port (same host)")
    p.add_argument("--max-k", type=int, default=d.max_k, help="largest k a call may ask")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="most requests in one RecommendBatch")
    p.add_argument("--max-history", type=int, default=d.max_history,
                   help="most history_item_ids in one request")
    p.add_argument("--max-id-list", type=int, default=d.max_id_list,
                   help="longest exclude_item_ids / allow_item_ids")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest request or response")
    p.add_argument("--max-concurrent-calls", type=int, default=d.max_concurrent_calls,
                   help="in flight incl. queued; beyond it calls get RESOURCE_EXHAUSTED")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="threads computing at once (default: available cores - 1, at least 1)")
    p.add_argument("--drain-seconds", type=float, default=d.drain_s,
                   help="on SIGTERM, report NOT_SERVING and keep answering this long before "
                        "refusing new calls (let load balancers notice)")
    p.add_argument("--grace", type=float, default=d.grace_s,
                   help="seconds in-flight calls get to finish on SIGTERM")
    p.add_argument("--access-log", action="store_true", help="log every call (JSON lines)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from recsys_ccl.serving.limits import ServerLimits
    from recsys_ccl.serving.server import JsonLogFormatter, RecommenderServer, serve_until_signalled

    try:
        limits = ServerLimits(
            max_k=args.max_k, max_batch=args.max_batch, max_history=args.max_history,
            max_id_list=args.max_id_list, max_message_bytes=args.max_message_bytes,
            max_concurrent_calls=args.max_concurrent_calls, workers=args.workers,
            grace_s=args.grace, drain_s=args.drain_seconds)
    except ValueError as exc:
        raise RecsysError(str(exc)) from exc
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("recsys_ccl.serving")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        server = RecommenderServer(args.bundle, host=args.host, port=args.port, limits=limits,
                                   index=args.index, tls_cert=args.tls_cert,
                                   tls_key=args.tls_key, metrics_port=args.metrics_port,
                                   access_log=args.access_log)
        serve_until_signalled(server, args.signals)
    finally:  # main() may be called again in the same process (tests, notebooks)
        logger.removeHandler(handler)
        logger.setLevel(level)
    return 0


def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="ask a running server for a user's top-k items")
    p.add_argument("--target", default="127.0.0.1:50051",
                   help="HOST:PORT, or a gRPC target listing replicas")
    p.add_argument("--user", default="", help="user id")
    p.add_argument("--history", nargs="*", default=[],
                   help="item ids the user interacted with, oldest first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--include-seen", action="store_true",
                   help="also return items the user has already interacted with")
    p.add_argument("--exclude", nargs="*", default=[], help="item ids never to return")
    p.add_argument("--allow", nargs="*", default=[], help="return only from these item ids")
    p.add_argument("--similar-to", default=None, help="items similar to this item instead")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate (TLS)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.set_defaults(func=_cmd_recommend)


def _cmd_recommend(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from recsys_ccl.serving.client import RecommenderClient

    with RecommenderClient(args.target, tls_ca=args.tls_ca, timeout_s=args.timeout) as client:
        try:
            if args.similar_to is not None:
                resp = client.similar_items(args.similar_to, args.k, args.exclude)
            else:
                resp = client.recommend(args.user, args.k, history_item_ids=args.history,
                                        exclude_seen=not args.include_seen,
                                        exclude_item_ids=args.exclude,
                                        allow_item_ids=args.allow)
        except grpc.RpcError as exc:
            raise RecsysError(f"{exc.code().name}: {exc.details()}") from exc
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)))
        return 0
    _print_items(resp)
    return 0


def _print_items(resp) -> None:
    print(f"model_version {resp.model_version}")
    from recsys_ccl.serving.client import format_items

    print("\n".join(format_items(resp)))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic data")
    p.add_argument("--workdir", default="demo_out", help="where the demo writes (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from recsys_ccl.demo import run_demo

    run_demo(Path(args.workdir), seed=args.seed, epochs=args.epochs,
             progress=not args.no_progress)
    return 0



def _port(text: str) -> int:
    """argparse type: a TCP port number, 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (expected 0..65535)")
    return port


class _Help(argparse.HelpFormatter):
    """--help shows each option's default (when it has a meaningful one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        meaningful = not (default is None or default is False or default == []
                          or default == "" or default == argparse.SUPPRESS)
        if action.option_strings and "%(default)" not in text and meaningful:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with a usage mistake reported as one line (argparse prints the usage first)
    and each option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="recsys-ccl",
        description="Two-tower retrieval: data pipeline, contrastive training, serving.",
    )
    parser.add_argument("--version", action="version", version=f"recsys-ccl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    _add_synth(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_recommend(sub)
    _add_demo(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every `with` block unwinds
    (temporary outputs removed, nothing half-written)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    signals = None
    previous_term = None
    if argv[:1] == ["serve"]:
        from recsys_ccl.serving.signals import ServerSignals

        # before the parser (which imports Polars), torch and the bundle: a SIGHUP or SIGTERM
        # during start-up must not kill the server with Python's default handlers
        signals = ServerSignals.install()
    elif threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        args = build_parser().parse_args(argv)
        args.signals = signals
        return _run_command(args)
    finally:
        if signals is not None:
            signals.restore()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _run_command(args: argparse.Namespace) -> int:
    from recsys_ccl.progress import interrupted_stage, reset

    reset()  # forget what an earlier command in this process left
    try:
        return int(args.func(args) or 0)
    # OSError/UnicodeError: a path the user named is missing, unreadable or full
    except (RecsysError, OSError, UnicodeError) as exc:
        print(f"recsys-ccl {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        stage = interrupted_stage()
        where = f" during {stage}" if stage else ""
        print(f"recsys-ccl {args.command}: interrupted by {how}{where}; nothing was "
              f"half-written{_after_interrupt(args)}", file=sys.stderr)
        return 130 if how == "SIGINT" else 143


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command left that the user can use."""
    if args.command == "train":
        ckpt = Path(args.out) / "checkpoints" / "last" / "state.json"
        if ckpt.exists():
            try:
                state = json.loads(ckpt.read_text())
                return (f" (the last checkpoint, epoch {state['epoch']}, step "
                        f"{state['step']}, is intact: --resume continues from it)")
            except (OSError, ValueError, KeyError):
                return ""
        return " (no checkpoint was written yet: run it again)"
    return ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

