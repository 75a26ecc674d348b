"""`recsys-ccl demo`: the whole pipeline on the built-in synthetic data, ending in gRPC calls.

synth (with item and user features) -> prepare (min rating 4, 5-core, temporal split, 5 % of
the items held out as cold) -> train (feature towers) -> evaluate against popularity, side by
side, warm and cold items apart -> export -> serve the bundle on a free loopback port, make a
Recommend call for a known user and one for a brand-new user given by features and a history
holding a cold item, print the top items (cold ones marked), shut the server down.
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

DEMO_COLD_ITEMS = 0.05


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
    items, users = work / "item_features.parquet", work / "user_features.parquet"
    print(f"[1/6] synth -> {raw}, {items.name}, {users.name}")
    t0 = time.perf_counter()
    df = write_synth(SynthConfig(seed=seed), raw, items, users)
    print(f"      {df.height:,} interactions in {time.perf_counter() - t0:.1f} s")
    print(f"[2/6] prepare (min rating 4, 5-core, temporal split, {DEMO_COLD_ITEMS:.0%} of items "
          f"held out cold, item and user features) -> {data}")
    manifest = prepare(
        PrepareConfig(input=str(raw), format="parquet", min_rating=4.0, k_core=5,
                      split="temporal", holdout=1, seed=seed, item_features=str(items),
                      user_features=str(users), cold_items=DEMO_COLD_ITEMS),
        data, overwrite=True,
    )
    print("      " + prepare_summary(manifest).replace("\n", "\n      "))
    print(f"[3/6] train (default config, feature towers, id_dropout {config.id_dropout}, "
          f"{epochs} epochs) -> {run}")
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
    for name, seg in model_m.get("segments", {}).items():
        pop = (f" (popularity {seg['popularity']['recall@20']:.4f})" if "popularity" in seg
               else "")
        print(f"      {name:15s} recall@20 {seg['recall@20']:.4f}{pop} over "
              f"{seg['users']:,} users")
    print(f"[5/6] export -> {bundle}")
    m = export_bundle(run, data, bundle, overwrite=True)
    print(f"      model_version {m['model_version']}, {m['counts']['items']:,} items x "
          f"{m['counts']['embedding_dim']}")
    cold = frozenset(pl.read_parquet(data / "items.parquet")
                     .filter(pl.col("train_count") == 0)["item_id"].to_list())
    _serve_once(bundle, cold)


def _serve_once(bundle: Path, cold: frozenset[str] = frozenset()) -> None:
    """Serve the bundle on a free loopback port, make a Recommend call for a known user and,
    when the model has user features, one for a brand-new user by features and a history
    holding a cold item (`cold`: the ids of items without training interactions); stop
    cleanly."""
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
            if client.model_info().user_features:
                _recommend_new_user(client, cold)
    finally:
        server.stop(grace=5)
    print("      server stopped cleanly")


def _recommend_new_user(client: RecommenderClient, cold: frozenset[str]) -> None:
    """Recommend for a user the bundle lacks, from the synthetic user features and a history
    of one cold item; cold items in the answer are marked."""
    first_cold = min(cold) if cold else None
    print(f"      a brand-new user: region r1, age 25-34, history [{first_cold!r}] (a cold "
          "item: no training interaction)")
    new = client.recommend(k=10, history_item_ids=[first_cold] if first_cold else [],
                           user_features={"region": "r1", "age_band": "25-34"},
                           exclude_seen=True, request_id="demo-new-user")
    header, *lines = format_items(new)
    marked = [line + ("   (cold)" if item.item_id in cold else "")
              for line, item in zip(lines, new.items, strict=True)]
    print("      " + "\n      ".join([header, *marked]))
    print(f"      {sum(i.item_id in cold for i in new.items)} of {len(new.items)} are cold "
          "items, recommended from their features")
