"""Benchmark of `recsys-ccl serve`: QPS and latency under load, beside the raw top-k cost.

A bundle of ~10^5 items x 128 (the default width; synth -> prepare -> one epoch of training
-> export; cached in benchmarks/.work/) is served by `recsys-ccl serve` in its own process
with default settings. Load comes from another process: an asyncio gRPC client over 4
connections keeping C calls in flight (C = 1, 8, 16) for --seconds after a warm-up,
Recommend(k=10, exclude_seen) for random known users. Beside it, in this process and on one
thread (what one server worker gets), the raw in-process cost of the same queries: torch
matmul + topk, numpy matmul + argpartition, and faiss IndexFlatIP, so the server's own
overhead shows. Also RecommendBatch of 32 users (ms per user) and the HNSW index's recall@10
against exact on these trained embeddings.

Known users (`--users-sweep`, on by default): two bundles alike but for their number of known
users (10^4 and 10^6; 2 x 10^4 items, a few training steps), each served in turn, p50 and p99
of Recommend by user id with one call in flight: a known user's vector is read from the
bundle's memory-mapped user_embeddings.npy, so the cost should not grow with the users.

    python benchmarks/bench_serving.py                  # a few minutes (first run: + bundles)
    python benchmarks/bench_serving.py --seconds 3      # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, print_table, start_server, write_csv

WORK = Path(__file__).resolve().parent / ".work"
K = 10
CONNECTIONS = 4  # client connections (at most one per call in flight)


def _synth_bundle(name: str, synth, cfg, rebuild: bool, max_steps: int | None = None) -> Path:
    """WORK/name: synth -> prepare (leave-last-out) -> train -> export, built once (cached)."""
    from recsys_ccl.data.prepare import PrepareConfig, prepare
    from recsys_ccl.data.synth import write_synth
    from recsys_ccl.export import export_bundle
    from recsys_ccl.train import train

    bundle = WORK / name
    if bundle.exists() and not rebuild:
        return bundle
    tmp = WORK / f"{name}.build"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    write_synth(synth, tmp / "log.parquet")
    prepare(PrepareConfig(input=str(tmp / "log.parquet"), format="parquet", split="temporal",
                          holdout=1), tmp / "data")
    train(tmp / "data", tmp / "run", cfg, progress=False, max_steps=max_steps)
    export_bundle(tmp / "run", tmp / "data", bundle, overwrite=True)
    shutil.rmtree(tmp)
    print(f"{name} built in {time.perf_counter() - t0:.0f} s")
    return bundle


def build_bundle(rebuild: bool) -> Path:
    """The load test's bundle: ~10^5 items, one epoch of training."""
    from recsys_ccl.config import TrainConfig
    from recsys_ccl.data.synth import SynthConfig

    return _synth_bundle("serving_bundle",
                         SynthConfig(users=20_000, items=102_000, interactions=3_000_000,
                                     clusters=50, seed=0),
                         TrainConfig(epochs=1, batch_size=4096, eval_split="none"), rebuild)


def build_users_bundle(users: int, rebuild: bool) -> Path:
    """A bundle with `users` known users over 2 x 10^4 items (quality does not matter here:
    a few training steps)."""
    from recsys_ccl.config import TrainConfig
    from recsys_ccl.data.synth import SynthConfig

    return _synth_bundle(f"serving_users_{users}",
                         SynthConfig(users=users, items=20_000,
                                     interactions=max(4 * users, 400_000), seed=0),
                         TrainConfig(eval_split="none"), rebuild, max_steps=20)


def users_sweep(sizes: list[int], seconds: float, warmup: float, rebuild: bool) -> list[dict]:
    """p50 / p99 of Recommend by known user id, one call in flight, per number of users."""
    rows = []
    for users in sizes:
        bundle = build_users_bundle(users, rebuild)
        row = serve_and_load(bundle, [1], seconds, warmup, batch_run=False)[0]
        manifest = json.loads((bundle / "manifest.json").read_text())
        row.update(method="Recommend (known user)", known_users=manifest["counts"]["users"],
                   items=manifest["counts"]["items"])
        rows.append(row)
    return rows


def raw_topk_costs(bundle: Path, n_queries: int = 300) -> list[dict]:
    """Per-query cost of top-10 over the item matrix in this process, one thread."""
    import torch
    from threadpoolctl import threadpool_limits

    from recsys_ccl.serving.bundle import load_bundle

    torch.set_num_threads(1)
    threadpool_limits(1)
    b = load_bundle(bundle)
    rng = np.random.default_rng(0)
    users = rng.integers(0, b.num_users, n_queries).tolist()
    q = b.user_vectors(users, [np.zeros(0, np.int64)] * n_queries)
    items_t = b.item_embeddings
    items_np = items_t.numpy()
    qn = q.numpy()
    rows = []

    def timed(name, fn, per_call_queries=1):
        for i in range(5):
            fn(i)
        t0 = time.perf_counter()
        calls = n_queries // per_call_queries
        for i in range(calls):
            fn(i)
        ms = (time.perf_counter() - t0) / (calls * per_call_queries) * 1e3
        rows.append({"what": name, "ms_per_user": ms})

    timed("torch matmul+topk (1 query)", lambda i: (q[i: i + 1] @ items_t.T).topk(K))

    def np_topk(i):
        s = items_np @ qn[i]
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]

    timed("numpy matmul+argpartition (1 query)", np_topk)
    timed("torch matmul+topk (batch of 32)",
          lambda i: (q[(i * 32) % 256: (i * 32) % 256 + 32] @ items_t.T).topk(K), 32)
    timed("exact index incl. exclude_seen (1 query)",
          lambda i: b.index.search(q[i: i + 1], K, [b.seen(users[i])]))
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        flat = faiss.IndexFlatIP(items_np.shape[1])
        flat.add(items_np)
        timed("faiss IndexFlatIP (1 query)", lambda i: flat.search(qn[i: i + 1], K))
        timed("faiss IndexFlatIP (batch of 32)",
              lambda i: flat.search(qn[(i * 32) % 256: (i * 32) % 256 + 32], K), 32)
        from recsys_ccl.index import ApproximateIndex

        hnsw = ApproximateIndex(items_t)
        timed("faiss HNSW M=32 ef=128 (1 query)", lambda i: hnsw.search(q[i: i + 1], K))
        _, exact_ids = b.index.search(q, K)
        _, approx_ids = hnsw.search(q, K)
        recall = np.mean([len(set(a) & set(e)) / K for a, e in
                          zip(approx_ids.tolist(), exact_ids.tolist(), strict=True)])
        rows.append({"what": "HNSW recall@10 vs exact (trained embeddings)",
                     "ms_per_user": None, "recall": float(recall)})
    except ImportError:
        rows.append({"what": "faiss not installed", "ms_per_user": None})
    return rows


# -- the load generator (runs in its own process) --

async def _load(target: str, users: list[str], concurrency: int, seconds: float,
                warmup: float, batch: int) -> dict:
    import grpc

    from recsys_ccl.v1 import recommender_pb2 as pb
    from recsys_ccl.v1 import recommender_pb2_grpc as pb_grpc

    latencies: list[float] = []
    errors: dict[str, int] = {}
    rng = np.random.default_rng(concurrency)
    # several connections, as many independent clients would open; a local subchannel pool
    # keeps grpc from folding the channels into one connection
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(concurrency, CONNECTIONS))]
    stubs = [pb_grpc.RecommenderStub(ch) for ch in channels]
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds

    def request(stub):
        if batch:
            return stub.RecommendBatch(pb.RecommendBatchRequest(requests=[
                pb.RecommendRequest(user_id=users[i], k=K, exclude_seen=True)
                for i in rng.integers(0, len(users), batch)]), timeout=30)
        return stub.Recommend(pb.RecommendRequest(
            user_id=users[rng.integers(len(users))], k=K, exclude_seen=True), timeout=30)

    async def worker(stub):
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                await request(stub)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            t1 = time.perf_counter()
            if t0 >= t_measure:
                if code == "OK":
                    latencies.append(t1 - t0)
                else:
                    errors[code] = errors.get(code, 0) + 1

    await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    lat = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "batch": batch, "calls": len(lat),
            "qps": len(lat) / seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "errors": sum(errors.values()), "error_codes": json.dumps(errors)}


def _client_main(args: argparse.Namespace) -> None:
    users = json.loads(Path(args.users_file).read_text())
    res = asyncio.run(_load(args.target, users, args.concurrency, args.seconds, args.warmup,
                            args.batch))
    print(json.dumps(res))


def serve_and_load(bundle: Path, levels: list[int], seconds: float, warmup: float,
                   batch_run: bool = True) -> list[dict]:
    import polars as pl

    users = pl.read_parquet(bundle / "user_history.parquet")["user_id"].to_list()
    users_file = WORK / f"{bundle.name}_users.json"
    users_file.write_text(json.dumps(users))
    server, target = start_server(bundle)
    try:
        rows = []
        runs = [(c, 0) for c in levels] + ([(1, 32)] if batch_run else [])
        for concurrency, batch in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--client", "--target", target, "--users-file",
                 str(users_file), "--concurrency", str(concurrency), "--seconds", str(seconds),
                 "--warmup", str(warmup), "--batch", str(batch)],
                capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["method"] = "RecommendBatch(32)" if batch else "Recommend"
            if batch:
                row["ms_per_user"] = row["p50_ms"] / batch
            rows.append(row)
            print(f"  {row['method']} c={concurrency}: "
                  f"{row['qps']:.0f} QPS, p99 {row['p99_ms']:.1f} ms, errors {row['errors']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def plot(rows: list[dict], raw: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in rows if r["method"] == "Recommend"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    xs = [str(r["concurrency"]) for r in single]
    axes[0].bar(xs, [r["qps"] for r in single], color="tab:blue")
    axes[0].axhline(2000, color="grey", ls="--", label="target at 16 in flight")
    axes[0].set(title="Recommend throughput", xlabel="calls in flight", ylabel="QPS")
    axes[0].legend()
    width = 0.35
    pos = np.arange(len(single))
    axes[1].bar(pos - width / 2, [r["p50_ms"] for r in single], width, label="p50")
    axes[1].bar(pos + width / 2, [r["p99_ms"] for r in single], width, label="p99")
    axes[1].set_xticks(pos, xs)
    axes[1].set(title="Recommend latency", xlabel="calls in flight", ylabel="ms")
    axes[1].legend()
    timed = [r for r in raw if r.get("ms_per_user") is not None]
    axes[2].barh([r["what"] for r in timed], [r["ms_per_user"] for r in timed],
                 color="tab:green")
    axes[2].set(title="raw top-10 cost in process, 1 thread", xlabel="ms per user")
    axes[2].tick_params(axis="y", labelsize=7)
    n, d = single[0]["items"], single[0]["dim"]
    fig.suptitle(f"recsys-ccl serve, {n:,} items x {d}, k=10, loopback ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--levels", default="1,8,16")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached bundles")
    p.add_argument("--users-sweep", default="10000,1000000",
                   help="numbers of known users to compare (empty: skip)")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--users-file", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        _client_main(args)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(args.rebuild)
    manifest = json.loads((bundle / "manifest.json").read_text())
    n, d = manifest["counts"]["items"], manifest["counts"]["embedding_dim"]
    print(f"bundle: {n:,} items x {d}, {manifest['counts']['users']:,} users; {machine()}")
    raw = raw_topk_costs(bundle)
    print_table(raw, ["what", "ms_per_user", "recall"])
    rows = serve_and_load(bundle, [int(x) for x in args.levels.split(",")], args.seconds,
                          args.warmup)
    for r in rows:
        r.update(items=n, dim=d, k=K, seconds=args.seconds, machine=machine())
    sweep = users_sweep([int(x) for x in args.users_sweep.split(",") if x], args.seconds,
                        args.warmup, args.rebuild)
    for r in sweep:
        r.update(dim=d, k=K, seconds=args.seconds, machine=machine())
    print_table(rows + sweep, ["method", "concurrency", "known_users", "calls", "qps", "p50_ms",
                               "p99_ms", "max_ms", "errors", "ms_per_user"])
    if len(sweep) == 2:
        print(f"p50 at {sweep[1]['known_users']:,} known users / at "
              f"{sweep[0]['known_users']:,}: {sweep[1]['p50_ms'] / sweep[0]['p50_ms']:.2f}")
    if shutil.which("h2load") is None:
        print("h2load (Debian nghttp2-client) not installed: asyncio client only")
    write_csv(rows, RESULTS / "bench_serving.csv")
    if sweep:
        write_csv(sweep, RESULTS / "bench_serving_users.csv")
    write_csv(raw, RESULTS / "bench_serving_raw_topk.csv")
    plot(rows, raw, RESULTS / "bench_serving.png")
    print(f"wrote {RESULTS / 'bench_serving.csv'}, bench_serving_raw_topk.csv, "
          "bench_serving_users.csv, bench_serving.png")


if __name__ == "__main__":
    main()
