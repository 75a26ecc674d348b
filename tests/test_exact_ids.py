"""Ids are kept exactly as written, from the raw log to the served answer, on every engine.

"007" and "7" are two users; " b" is not "b"; unicode, signs and long ids survive prepare
(Polars, DuckDB, out of core) -> train -> export -> a real gRPC server on loopback, where
Recommend and GetUserEmbedding answer each user by the id the log gave it.
"""

from __future__ import annotations

import hypothesis.strategies as st
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.prepare import PrepareConfig, prepare
from recsys_ccl.export import export_bundle
from recsys_ccl.serving.client import RecommenderClient
from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.train import train

pytestmark = pytest.mark.slow

# ids that a lossy reader would merge or mangle: leading zeros, signs, spaces outside and
# inside, numbers that look like floats, unicode, long strings
TRICKY = ["007", "7", "+7", "-7", "07", " 7", "7 ", "1e3", "1.0", "a b", "ünï©ødé", "x" * 200,
          "0", "-0", "00", "9223372036854775808", "  "]
ids = st.lists(st.one_of(st.sampled_from(TRICKY),
                         st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                                 max_size=12)),
               min_size=4, max_size=9, unique=True)


def _log(users: list[str], items: list[str]) -> pl.DataFrame:
    """Every user interacts with every item, in an order rotated per user, so that the items
    each user holds out for valid and test differ and every item keeps training rows."""
    n = len(items)
    rows = [(u, it, 1_700_000_000 + 97 * ui + (it_i + ui) % n)
            for ui, u in enumerate(users) for it_i, it in enumerate(items)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=ids, items=ids)
@example(users=["007", "7", "+7", "  ", " 7"], items=["007", "7", "-7", " ", "ünï"])
def test_ids_round_trip_through_every_engine_and_the_server(tmp_path_factory, users, items):
    root = tmp_path_factory.mktemp("ids")
    log = root / "log.csv"
    _log(users, items).write_csv(log)
    engines = {"polars": {}, "duckdb": {"engine": "duckdb"},
               "out_of_core": {"memory_limit": "320MB"}}
    for name, extra in engines.items():
        data = root / f"data-{name}"
        prepare(PrepareConfig(input=str(log), format="csv", split="temporal", **extra), data)
        assert sorted(pl.read_parquet(data / "users.parquet")["user_id"]) == sorted(users)
        assert sorted(pl.read_parquet(data / "items.parquet")["item_id"]) == sorted(items)
        run, bundle = root / f"run-{name}", root / f"bundle-{name}"
        train(data, run, TrainConfig(epochs=1, batch_size=64, dim=8, history_len=4,
                                     patience=0, eval_split="none"), progress=False)
        export_bundle(run, data, bundle)
        with RecommenderServer(bundle, port=0) as server, \
                RecommenderClient(server.target) as client:
            client.wait_ready(10)
            for user in users:
                reply = client.recommend(user, k=len(items), exclude_seen=False)
                assert sorted(x.item_id for x in reply.items) == sorted(items), (name, user)
                assert len(client.user_embedding(user).embedding) == 8
