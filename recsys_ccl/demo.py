"""`recsys-ccl demo`: the whole pipeline on the built-in synthetic data, ending in a gRPC call.

synth -> prepare (min rating 4, 5-core, temporal split) -> train -> evaluate against
popularity, side by side -> export -> serve the bundle on a free loopback port, make a
Recommend call through the client, print the top items, shut the server down.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import polars as pl

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.prepare import PrepareConfig, prepare, prepare_summary
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.errors import RecsysError
from recsys_ccl.evaluation import evaluate_run
from recsys_ccl.export import export_bundle
from recsys_ccl.serving.client import RecommenderClient, format_items
from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.train import train

__all__ = ["run_demo"]


def run_demo(work: Path, seed: int = 0, epochs: int = 10, progress: bool = True) -> None:
    """synth -> prepare -> train -> evaluate against popularity -> export -> serve -> one
    Recommend call, all under `work` (which it replaces only if the demo made it)."""
    config = TrainConfig(epochs=epochs, seed=seed)  # a bad --epochs fails before any work
    marker = work / ".recsys-ccl-demo"  # the demo replaces what it wrote before, nothing else
    if work.exists() and any(work.iterdir()) and not marker.exists():
        raise RecsysError(f"--workdir {work} is not empty and was not made by the demo; "
                          f"choose a new directory")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raw, data, run, bundle = (work / "interactions.parquet", work / "data", work / "run",
                              work / "bundle")
    print(f"[1/6] synth -> {raw}")
    t0 = time.perf_counter()
    df = write_synth(SynthConfig(seed=seed), raw)
    print(f"      {df.height:,} interactions in {time.perf_counter() - t0:.1f} s")
    print(f"[2/6] prepare (min rating 4, 5-core, temporal split) -> {data}")
    manifest = prepare(
        PrepareConfig(input=str(raw), format="parquet", min_rating=4.0, k_core=5,
                      split="temporal", holdout=1, seed=seed),
        data, overwrite=True,
    )
    print("      " + prepare_summary(manifest).replace("\n", "\n      "))
    print(f"[3/6] train (default config, {epochs} epochs) -> {run}")
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(data, run, config,
                    progress=progress)
    print(f"      {summary['epochs']} epochs in {time.perf_counter() - t0:.0f} s, "
          f"{summary['interactions_per_s']:,.0f} interactions/s; best epoch "
          f"{summary['best_epoch']}")
    print("[4/6] evaluate on test (full ranking, train and valid items masked)")
    model_m = evaluate_run(run, data, "test", 20)
    pop_m = evaluate_run(None, data, "test", 20, "popularity")
    print(f"      {'metric':12s} {'two-tower':>10s} {'popularity':>11s} {'ratio':>7s}")
    for key in ("recall@20", "ndcg@20", "hit@20", "mrr@20", "coverage@20"):
        ratio = model_m[key] / pop_m[key] if pop_m[key] else float("inf")
        print(f"      {key:12s} {model_m[key]:10.4f} {pop_m[key]:11.4f} {ratio:6.2f}x")
    print(f"[5/6] export -> {bundle}")
    m = export_bundle(run, data, bundle, overwrite=True)
    print(f"      model_version {m['model_version']}, {m['counts']['items']:,} items x "
          f"{m['counts']['embedding_dim']}")
    _serve_once(bundle)


def _serve_once(bundle: Path) -> None:
    """Serve the bundle on a free loopback port, make one Recommend call, stop cleanly."""
    history = pl.read_parquet(bundle / "user_history.parquet").row(0, named=True)
    server = RecommenderServer(bundle, port=0)
    server.start()
    print(f"[6/6] serve -> {server.target}; Recommend(user_id={history['user_id']!r}, k=10, "
          "exclude_seen=True)")
    try:
        with RecommenderClient(server.target) as client:
            client.wait_ready(10)
            t0 = time.perf_counter()
            resp = client.recommend(history["user_id"], 10, exclude_seen=True,
                                    request_id="demo")
            ms = (time.perf_counter() - t0) * 1e3
            print(f"      the user's last items: {', '.join(history['item_ids'][-5:])}")
            print(f"      answered in {ms:.1f} ms by {resp.model_version}, health "
                  f"{client.health()}")
            print("      " + "\n      ".join(format_items(resp)))
    finally:
        server.stop(grace=5)
    print("      server stopped cleanly")
