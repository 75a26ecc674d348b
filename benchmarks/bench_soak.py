"""Soak of `recsys-ccl serve`: sustained load with bad requests mixed in, memory watched.

A clean run (good calls only) and then the soak (the same load with a share of bad requests)
against one `recsys-ccl serve` process with default settings. An asyncio client in this
process keeps C calls in flight over 4 connections; the server's RSS is sampled every 0.5 s.

Good call: Recommend(k=10, exclude_seen) for a random known user; it must answer OK with 10
items. Bad calls, in turn: k = 0, k = 10^6, NaN min_score, an empty request, an unknown user,
unknown history items, 20,000 excluded ids, undecodable bytes, a message over the 4 MiB limit,
an unknown item for SimilarItems, a RecommendBatch over the batch limit, a unicode id. Each must
get its documented code (INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED); anything else
(UNKNOWN, INTERNAL, UNAVAILABLE, a failed good call) is counted as unexpected.

Targets (issue 7): no crash, no unexpected answer, server RSS growth at most 10% after the
warm-up, good-call p99 within 1.2x of the clean run's.

    python benchmarks/bench_soak.py                        # 60 s soak + 20 s clean (~2 min)
    python benchmarks/bench_soak.py --seconds 10 --clean-seconds 5   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, print_table, start_server, write_csv

K = 10
CONNECTIONS = 4
SERVICE = "/recsys_ccl.v1.Recommender/"


def bad_requests(users: list[str], items: list[str]) -> list[tuple[str, str, bytes, set[str]]]:
    """(name, method, serialised request, accepted status codes) for each kind of bad call."""
    from recsys_ccl.v1 import recommender_pb2 as pb

    user = users[0]
    invalid, not_found = {"INVALID_ARGUMENT"}, {"NOT_FOUND"}
    nan = pb.RecommendRequest(user_id=user, k=K)
    nan.min_score = math.nan
    return [
        ("k=0", "Recommend", pb.RecommendRequest(user_id=user, k=0), invalid),
        ("k=10^6", "Recommend", pb.RecommendRequest(user_id=user, k=10**6), invalid),
        ("NaN min_score", "Recommend", nan, invalid),
        ("empty request", "Recommend", pb.RecommendRequest(), invalid),
        ("unknown user", "Recommend", pb.RecommendRequest(user_id="no-such-user\u2603", k=K),
         not_found),
        ("unknown history items", "Recommend",
         pb.RecommendRequest(history_item_ids=["nope-1", "nope-2"], k=K), not_found | invalid),
        ("20,000 excluded ids", "Recommend",
         pb.RecommendRequest(user_id=user, k=K, exclude_item_ids=items[:1] * 20_000),
         invalid | {"RESOURCE_EXHAUSTED"}),
        ("undecodable bytes", "Recommend", b"\x0a\xff\xff\xff\xff\x0f" + bytes(range(40)),
         invalid),
        ("over 4 MiB", "Recommend",
         pb.RecommendRequest(user_id="x" * (5 * 1024 * 1024), k=K), {"RESOURCE_EXHAUSTED"}),
        ("unknown similar item", "SimilarItems", pb.SimilarItemsRequest(item_id="\x00nope", k=K),
         not_found),
        ("batch of 300", "RecommendBatch", pb.RecommendBatchRequest(
            requests=[pb.RecommendRequest(user_id=user, k=K)] * 300),
         invalid | {"RESOURCE_EXHAUSTED"}),
        ("negative k in a batch", "RecommendBatch", pb.RecommendBatchRequest(
            requests=[pb.RecommendRequest(user_id=user, k=-5)]), invalid),
    ]


@dataclass
class LoadResult:
    seconds: float
    good_latencies_ms: list[float] = field(default_factory=list)
    bad_calls: int = 0
    unexpected: dict[str, int] = field(default_factory=dict)  # "what: code" -> count
    codes: dict[str, int] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (t since start, bytes)

    def summary(self) -> dict:
        lat = np.array(self.good_latencies_ms) if self.good_latencies_ms else np.array([math.nan])
        return {"good_calls": len(self.good_latencies_ms), "bad_calls": self.bad_calls,
                "good_qps": len(self.good_latencies_ms) / self.seconds,
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
                "unexpected": sum(self.unexpected.values()),
                "unexpected_detail": json.dumps(self.unexpected),
                "codes": json.dumps(self.codes, sort_keys=True)}


async def run_load(target: str, server_pid: int, users: list[str], items: list[str], *,
                   concurrency: int, seconds: float, warmup: float, bad_fraction: float,
                   seed: int = 0) -> LoadResult:
    """Keep `concurrency` calls in flight for warmup + seconds; measure after the warm-up."""
    import grpc
    import psutil

    from recsys_ccl.v1 import recommender_pb2 as pb

    rng = np.random.default_rng(seed)
    good = [pb.RecommendRequest(user_id=users[i], k=K, exclude_seen=True).SerializeToString()
            for i in rng.integers(0, len(users), 2000)]
    bad = [(n, m, r if isinstance(r, bytes) else r.SerializeToString(), ok)
           for n, m, r, ok in bad_requests(users, items)]
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_send_message_length", 16 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(target, options=options)
                for _ in range(min(concurrency, CONNECTIONS))]
    calls = [{m: ch.unary_unary(SERVICE + m) for m in ("Recommend", "SimilarItems",
                                                      "RecommendBatch")} for ch in channels]
    result = LoadResult(seconds=seconds)
    proc = psutil.Process(server_pid)
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds

    def count(bucket: dict[str, int], key: str) -> None:
        bucket[key] = bucket.get(key, 0) + 1

    async def worker(i: int) -> None:
        stubs, local = calls[i % len(calls)], np.random.default_rng(seed * 1000 + i)
        while (t0 := time.perf_counter()) < t_end:
            is_bad = local.random() < bad_fraction
            if is_bad:
                name, method, payload, accepted = bad[int(local.integers(len(bad)))]
            else:
                name, method, payload, accepted = ("good", "Recommend",
                                                   good[int(local.integers(len(good)))], {"OK"})
            try:
                raw = await stubs[method](payload, timeout=30)
                code = "OK"
                if not is_bad:
                    resp = pb.RecommendResponse.FromString(raw)
                    if len(resp.items) != K or not resp.model_version:
                        code = "OK but malformed"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            latency = (time.perf_counter() - t0) * 1e3
            if t0 < t_measure:
                continue
            count(result.codes, code)
            if code not in accepted:
                count(result.unexpected, f"{name}: {code}")
            elif is_bad:
                result.bad_calls += 1
            else:
                result.good_latencies_ms.append(latency)

    async def sample_rss() -> None:
        while time.perf_counter() < t_end:
            result.rss.append((time.perf_counter() - t_start, proc.memory_info().rss))
            await asyncio.sleep(0.5)

    await asyncio.gather(sample_rss(), *(worker(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    return result


def rss_growth(rss: list[tuple[float, int]], warmup: float) -> tuple[int, int, float]:
    """(RSS at the end of the warm-up, peak RSS after it, growth as a fraction)."""
    after = [r for t, r in rss if t >= warmup]
    base = after[0]
    return base, max(after), max(after) / base - 1


def soak(bundle: Path, *, seconds: float, clean_seconds: float, warmup: float,
         concurrency: int, bad_fraction: float) -> dict:
    """Clean run, then the soak, against one server; returns the figures and the RSS trace."""
    import polars as pl

    from recsys_ccl.serving.client import RecommenderClient

    users = pl.read_parquet(bundle / "user_history.parquet")["user_id"].to_list()
    items = pl.read_parquet(bundle / "items.parquet")["item_id"].to_list()
    server, target = start_server(bundle)
    try:
        clean = asyncio.run(run_load(target, server.pid, users, items, concurrency=concurrency,
                                     seconds=clean_seconds, warmup=warmup, bad_fraction=0.0))
        loaded = asyncio.run(run_load(target, server.pid, users, items,
                                      concurrency=concurrency, seconds=seconds, warmup=warmup,
                                      bad_fraction=bad_fraction, seed=1))
        alive = server.poll() is None
        with RecommenderClient(target) as client:
            healthy = client.health() == "SERVING"
            still_answers = len(client.recommend(users[0], K).items) == K
    finally:
        server.terminate()
        exit_code = server.wait(timeout=30)
    base, peak, growth = rss_growth(loaded.rss, warmup)
    return {"clean": clean.summary(), "soak": loaded.summary(), "rss": loaded.rss,
            "rss_base": base, "rss_peak": peak, "rss_growth": growth,
            "alive": alive, "healthy_after": healthy, "answers_after": still_answers,
            "exit_code": exit_code, "warmup": warmup}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    t = [x for x, _ in res["rss"]]
    axes[0].plot(t, [r / 2**20 for _, r in res["rss"]], color="tab:blue")
    axes[0].axvline(res["warmup"], color="grey", ls=":", label="end of warm-up")
    axes[0].axhline(res["rss_base"] * 1.1 / 2**20, color="tab:red", ls="--",
                    label="+10% limit")
    axes[0].set(title="server RSS during the soak", xlabel="s", ylabel="MiB")
    axes[0].legend()
    names = ["p50_ms", "p99_ms"]
    pos = np.arange(len(names))
    axes[1].bar(pos - 0.2, [res["clean"][n] for n in names], 0.4, label="clean")
    axes[1].bar(pos + 0.2, [res["soak"][n] for n in names], 0.4, label="soak (10% bad)")
    axes[1].set_xticks(pos, names)
    axes[1].set(title="good-call latency", ylabel="ms")
    axes[1].legend()
    fig.suptitle(f"recsys-ccl serve soak ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="soak length after warm-up")
    p.add_argument("--clean-seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad", type=float, default=0.10, help="share of bad requests")
    p.add_argument("--bundle", type=Path, help="default: the bench_serving bundle (built once)")
    args = p.parse_args()
    if args.bundle is None:
        from bench_serving import WORK, build_bundle

        WORK.mkdir(parents=True, exist_ok=True)
        args.bundle = build_bundle(rebuild=False)
    res = soak(args.bundle, seconds=args.seconds, clean_seconds=args.clean_seconds,
               warmup=args.warmup, concurrency=args.concurrency, bad_fraction=args.bad)
    rows = []
    for name in ("clean", "soak"):
        rows.append({"run": name, "seconds": args.clean_seconds if name == "clean"
                     else args.seconds, "concurrency": args.concurrency,
                     "bad_share": 0.0 if name == "clean" else args.bad, **res[name],
                     "machine": machine()})
    rows[1].update(rss_base_mib=res["rss_base"] / 2**20, rss_peak_mib=res["rss_peak"] / 2**20,
                   rss_growth_pct=100 * res["rss_growth"],
                   p99_vs_clean=res["soak"]["p99_ms"] / res["clean"]["p99_ms"],
                   alive=res["alive"], healthy_after=res["healthy_after"])
    print_table(rows, ["run", "good_calls", "bad_calls", "good_qps", "p50_ms", "p99_ms",
                       "max_ms", "unexpected", "rss_growth_pct", "p99_vs_clean"])
    print(f"codes during the soak: {res['soak']['codes']}")
    verdict = {
        "no crash": res["alive"] and res["healthy_after"] and res["answers_after"],
        "no unexpected answer": res["soak"]["unexpected"] == 0 and res["clean"]["unexpected"] == 0,
        "RSS growth <= 10%": res["rss_growth"] <= 0.10,
        "p99 <= 1.2x clean": rows[1]["p99_vs_clean"] <= 1.2,
    }
    for what, ok in verdict.items():
        print(f"  {'PASS' if ok else 'MISS'}  {what}")
    write_csv(rows, RESULTS / "bench_soak.csv")
    write_csv([{"t_s": t, "rss_mib": r / 2**20} for t, r in res["rss"]],
              RESULTS / "bench_soak_rss.csv")
    plot(res, RESULTS / "bench_soak.png")
    print(f"wrote {RESULTS / 'bench_soak.csv'}, bench_soak_rss.csv, bench_soak.png")


if __name__ == "__main__":
    main()
