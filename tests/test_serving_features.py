"""Serving a model with features, for real, on loopback: a brand-new user from features alone
or with a history (one holding a cold item), cold items recommended and found by
SimilarItems, user_features errors naming the field, and a client built from the .proto before
user_features (its generated stubs kept in tests/compat) working against the new server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import polars as pl
import pytest
import torch

from recsys_ccl.cli import main
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.data.prepare import PrepareConfig, prepare
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.export import export_bundle
from recsys_ccl.features import encode_values, feature_tensors
from recsys_ccl.serving.bundle import load_bundle
from recsys_ccl.serving.client import RecommenderClient
from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.train import train
from recsys_ccl.v1 import recommender_pb2 as pb

COMPAT = Path(__file__).resolve().parent / "compat" / "v1_before_features"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def feature_bundle(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("served-features")
    write_synth(SynthConfig(users=300, items=150, interactions=6000, clusters=6, seed=4),
                root / "log.parquet", root / "items.parquet", root / "users.parquet")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet",
                          item_features=str(root / "items.parquet"),
                          user_features=str(root / "users.parquet"), cold_items=0.15,
                          cold_users=0.05, seed=2), root / "data")
    train(root / "data", root / "run",
          TrainConfig(epochs=3, batch_size=256, dim=16, history_len=5, id_dropout=0.3, lr=1e-2,
                      eval_split="none", patience=0), progress=False)
    export_bundle(root / "run", root / "data", root / "bundle")
    data = load_data_dir(root / "data")
    return {"bundle": root / "bundle", "data": data, "root": root,
            "raw_users": pl.read_parquet(root / "users.parquet"),
            "raw_items": pl.read_parquet(root / "items.parquet")}


@pytest.fixture(scope="module")
def client(feature_bundle):
    with RecommenderServer(feature_bundle["bundle"], port=0) as srv, \
            RecommenderClient(srv.target) as c:
        c.wait_ready(10)
        c.server_target = srv.target
        yield c


def _features(region: str, age: str) -> dict:
    return {"region": pb.FeatureValue(text=region), "age_band": pb.FeatureValue(text=age)}


def test_model_info_lists_the_user_features(client):
    info = client.model_info()
    assert list(info.user_features) == ["region:categorical", "age_band:categorical"]


def test_request_values_encode_as_prepare_did(feature_bundle):
    """encode_values (serving) against the DATA directory's encoded rows (prepare), user by
    user, on the raw values of the synthetic feature table."""
    data = feature_bundle["data"]
    spec, table = data.features["user"]
    raw = feature_bundle["raw_users"].with_columns(pl.col("user_id").cast(pl.String))
    ids = data.users.join(raw, on="user_id").sort("user_idx").head(40)
    got = encode_values(spec, [{"region": r, "age_band": a}
                               for r, a in zip(ids["region"], ids["age_band"], strict=True)])
    want = feature_tensors(table.filter(pl.col("user_idx").is_in(ids["user_idx"].implode())),
                           spec)
    for name in spec.names:
        assert torch.equal(got[name], want[name]), name


def test_a_brand_new_user_from_features_equals_the_model(client, feature_bundle):
    """GetUserEmbedding for a user the bundle lacks, from features only, is the user tower on
    those features; Recommend ranks by it."""
    bundle = load_bundle(feature_bundle["bundle"])
    rows = encode_values(bundle.model.user_fields.spec, [{"region": "r1", "age_band": "25-34"}])
    with torch.no_grad():
        hist = torch.full((1, bundle.model.config.history_len), -1)
        want = bundle.model.encode_users(None, hist, user_rows=rows)[0]
    emb = client.stub.GetUserEmbedding(pb.GetUserEmbeddingRequest(
        user_id="someone-new", user_features=_features("r1", "25-34")))
    torch.testing.assert_close(torch.tensor(list(emb.embedding)), want, rtol=1e-6, atol=1e-6)
    resp = client.stub.Recommend(pb.RecommendRequest(
        user_id="someone-new", k=10, user_features=_features("r1", "25-34")))
    scores = torch.tensor([s.score for s in resp.items])
    assert len(resp.items) == 10 and torch.all(scores[:-1] >= scores[1:])
    # a different profile gets a different list
    other = client.stub.Recommend(pb.RecommendRequest(k=10, user_features=_features("r3",
                                                                                    "55+")))
    assert [i.item_id for i in other.items] != [i.item_id for i in resp.items]


def test_the_client_takes_plain_feature_values(client):
    """RecommenderClient turns plain values into the request's FeatureValue map: the same
    answers as the raw stub."""
    from recsys_ccl.serving.client import feature_values

    assert feature_values({"a": "x", "b": 2, "c": ["p", "q"], "d": [0.5, 1]}) == {
        "a": pb.FeatureValue(text="x"), "b": pb.FeatureValue(number=2.0),
        "c": pb.FeatureValue(texts=pb.StringList(values=["p", "q"])),
        "d": pb.FeatureValue(floats=pb.FloatList(values=[0.5, 1.0]))}
    raw = client.stub.Recommend(pb.RecommendRequest(k=5, user_features=_features("r1",
                                                                                  "25-34")))
    typed = client.recommend(k=5, user_features={"region": "r1", "age_band": "25-34"})
    assert isinstance(typed, pb.RecommendResponse) and typed.items == raw.items
    emb = client.user_embedding(user_features={"region": "r1", "age_band": "25-34"})
    assert isinstance(emb, pb.GetUserEmbeddingResponse) and len(emb.embedding) > 0


def test_unseen_categorical_value_takes_the_oov_bucket(client):
    a = client.stub.GetUserEmbedding(pb.GetUserEmbeddingRequest(
        user_features={"region": pb.FeatureValue(text="never-seen-region")}))
    b = client.stub.GetUserEmbedding(pb.GetUserEmbeddingRequest(
        user_features={"region": pb.FeatureValue(text="another-unseen")}))
    assert list(a.embedding) == list(b.embedding)


def test_history_with_a_cold_item_and_cold_items_served(client, feature_bundle):
    """A new user whose history holds a cold item (no training interaction) is embedded from
    that item's features; cold items come back from Recommend and SimilarItems."""
    data = feature_bundle["data"]
    cold_items, _ = data.cold_masks()
    cold_ids = set(data.items.filter(pl.Series(cold_items.numpy()))["item_id"].to_list())
    cold = sorted(cold_ids)[0]
    resp = client.stub.Recommend(pb.RecommendRequest(k=50, history_item_ids=[cold],
                                                     user_features=_features("r0", "18-24")))
    without = client.stub.Recommend(pb.RecommendRequest(k=50,
                                                        user_features=_features("r0", "18-24")))
    assert [i.item_id for i in resp.items] != [i.item_id for i in without.items]
    served = {i.item_id for i in client.stub.Recommend(
        pb.RecommendRequest(k=150, user_features=_features("r2", "35-44"))).items}
    assert served & cold_ids  # the whole catalogue ranks, cold items included
    similar = client.stub.SimilarItems(pb.SimilarItemsRequest(item_id=cold, k=10))
    assert len(similar.items) == 10 and cold not in {i.item_id for i in similar.items}


@pytest.mark.parametrize(("features", "words"), [
    ({"colour": pb.FeatureValue(text="red")}, 'user_features[\'colour\']: the model has no such'),
    ({"region": pb.FeatureValue(number=3.0)}, "a categorical feature takes text, got number"),
    ({"region": pb.FeatureValue()}, "got nothing"),
])
def test_bad_user_features_are_invalid_argument_naming_the_field(client, features, words):
    for call, req in (
        (client.stub.Recommend, pb.RecommendRequest(k=5, user_features=features)),
        (client.stub.GetUserEmbedding, pb.GetUserEmbeddingRequest(user_features=features)),
        (client.stub.RecommendBatch, pb.RecommendBatchRequest(requests=[
            pb.RecommendRequest(k=5, user_id="x", history_item_ids=["0"]),
            pb.RecommendRequest(k=5, user_features=features)])),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == INVALID, err.value.details()
        assert words in err.value.details(), err.value.details()
    batch_detail = err.value.details()
    assert batch_detail.startswith("requests[1].user_features")


def test_a_client_from_the_previous_proto_still_works(client, feature_bundle):
    """Stubs generated from the .proto before user_features existed, in their own process (two
    versions of one .proto cannot share a descriptor pool): every call they make still works."""
    data = feature_bundle["data"]
    warm_user = data.users["user_id"][0]
    script = textwrap.dedent(f"""
        import json, grpc
        from recsys_ccl.v1 import recommender_pb2 as pb, recommender_pb2_grpc as rpc
        assert "user_features" not in pb.RecommendRequest.DESCRIPTOR.fields_by_name
        with grpc.insecure_channel({client.server_target!r}) as ch:
            stub = rpc.RecommenderStub(ch)
            rec = stub.Recommend(pb.RecommendRequest(user_id={warm_user!r}, k=5))
            emb = stub.GetUserEmbedding(pb.GetUserEmbeddingRequest(user_id={warm_user!r}))
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            print(json.dumps({{"items": [i.item_id for i in rec.items],
                               "dim": len(emb.embedding), "num_items": info.num_items}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(COMPAT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=COMPAT, capture_output=True,
                         text=True, timeout=60, check=True)
    old = json.loads(out.stdout)
    new = client.stub.Recommend(pb.RecommendRequest(user_id=warm_user, k=5))
    assert old["items"] == [i.item_id for i in new.items]
    assert old["num_items"] == client.model_info().num_items


def test_export_items_adds_and_changes_items_without_retraining(feature_bundle, tmp_path):
    """export --items: two brand-new items (one with a tag never seen in training, one with
    an extra column) and one changed item; the new bundle serves them (a history holding a
    new item, SimilarItems of a new item) and its model_version is new."""
    root = feature_bundle["root"]
    raw = feature_bundle["raw_items"]
    changed = raw.filter(pl.col("item_id") == 5).with_columns(pl.lit("c0").alias("category"))
    new = raw.filter(pl.col("item_id").is_in([10, 11])).with_columns(
        pl.Series("item_id", [100_001, 100_002]),
        pl.Series("tags", ["t1|never-seen-tag", "t2"]))
    table = pl.concat([changed, new]).with_columns(pl.col("item_id").cast(pl.String),
                                                   pl.lit("x").alias("unused_column"))
    table.write_parquet(tmp_path / "new_items.parquet")
    rc = main(["export", "--run", str(root / "run"), "--data", str(root / "data"),
               "--out", str(tmp_path / "bundle2"), "--items", str(tmp_path / "new_items.parquet")])
    assert rc == 0
    old_b, new_b = load_bundle(feature_bundle["bundle"]), load_bundle(tmp_path / "bundle2")
    assert new_b.num_items == old_b.num_items + 2
    assert new_b.model_version != old_b.model_version
    manifest = json.loads((tmp_path / "bundle2" / "manifest.json").read_text())
    assert (manifest["new_items"]["added"], manifest["new_items"]["changed"]) == (2, 1)
    # untouched items keep their vectors; the changed one moves; the new ones are cold
    same = [i for i in range(old_b.num_items) if old_b.item_ids[i] != "5"]
    torch.testing.assert_close(new_b.item_embeddings[same], old_b.item_embeddings[same])
    five = old_b.item_index["5"]
    assert not torch.equal(new_b.item_embeddings[five], old_b.item_embeddings[five])
    assert new_b.model.item_cold[-2:].all()
    with RecommenderServer(tmp_path / "bundle2", port=0) as srv, \
            RecommenderClient(srv.target) as c:
        c.wait_ready(10)
        resp = c.stub.Recommend(pb.RecommendRequest(
            k=10, history_item_ids=["100001"], user_features=_features("r2", "18-24"),
            exclude_seen=True))
        assert len(resp.items) == 10 and "100001" not in {i.item_id for i in resp.items}
        similar = c.stub.SimilarItems(pb.SimilarItemsRequest(item_id="100002", k=5))
        assert len(similar.items) == 5


def test_export_items_needs_item_features(tmp_path, feature_bundle):
    """An id-only model cannot embed new items: a one-line error, no bundle written."""
    from recsys_ccl.errors import RecsysError
    from recsys_ccl.export import export_bundle

    root = feature_bundle["root"]
    feature_bundle["raw_items"].head(2).write_parquet(tmp_path / "new.parquet")
    train(root / "data", tmp_path / "run-ids",
          TrainConfig(epochs=1, batch_size=256, dim=16, history_len=5, features="none",
                      eval_split="none", patience=0), progress=False)
    with pytest.raises(RecsysError, match="--items needs a model trained with item features"):
        export_bundle(tmp_path / "run-ids", root / "data", tmp_path / "b",
                      new_items=tmp_path / "new.parquet")
    assert not (tmp_path / "b").exists()


def test_demo_serving_step_with_features(feature_bundle, capsys):
    """The demo's last step on a feature bundle: a brand-new user by features and a cold
    item's history, cold items marked."""
    from recsys_ccl.demo import _serve_once

    data = feature_bundle["data"]
    cold = frozenset(data.items.filter(pl.col("train_count") == 0)["item_id"].to_list())
    _serve_once(feature_bundle["bundle"], cold)
    out = capsys.readouterr().out
    assert "a brand-new user" in out and "are cold items, recommended from their features" \
        in out and "server stopped cleanly" in out
    ranked = [line for line in out.splitlines()
              if re.match(r"\s+\d+\s+\S+\s+-?\d+\.\d{4}( +\(cold\))?$", line)]
    assert len(ranked) == 20  # two lists of 10
