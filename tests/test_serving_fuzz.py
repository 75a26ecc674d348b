"""Property-based fuzzing of every RPC against a real server: whatever arrives, the answer is OK
or a client-error code with a detail, never UNKNOWN or INTERNAL, and good calls keep working."""

from __future__ import annotations

import math

import grpc
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.v1 import recommender_pb2 as pb
from recsys_ccl.v1 import recommender_pb2_grpc as pb_grpc

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED}
CALLS = {"count": 0}


@pytest.fixture(scope="module")
def fuzz_target(bundles):
    users = pl.read_parquet(bundles["a"] / "user_history.parquet")["user_id"].to_list()
    items = pl.read_parquet(bundles["a"] / "items.parquet")["item_id"].to_list()
    with RecommenderServer(bundles["a"], port=0) as srv:
        # no client-side size limits: the server's own limits are under test
        ch = grpc.insecure_channel(srv.target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        yield pb_grpc.RecommenderStub(ch), users, items, ch
        ch.close()
    print(f"fuzzed {CALLS['count']} calls")


def _ids(known: list[str]) -> st.SearchStrategy[list[str]]:
    one = st.sampled_from(known) | st.text(max_size=40) | st.just("")
    return st.lists(one, max_size=30) | st.lists(one, min_size=1, max_size=3).map(
        lambda xs: xs * 4000)  # duplicated and enormous


K = st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 1002)
SCORES = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _check(call, request) -> None:
    CALLS["count"] += 1
    try:
        resp = call(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in CLIENT_ERRORS, (err.code(), err.details(), request)
        assert err.details(), "every error carries a detail"
        return
    if hasattr(resp, "items"):
        scores = [it.score for it in resp.items]
        assert scores == sorted(scores, reverse=True)
        assert all(math.isfinite(s) for s in scores)
    if hasattr(resp, "model_version"):
        assert resp.model_version


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_fuzz_recommend_and_batch(fuzz_target, data):
    stub, users, items, _ = fuzz_target
    req_strategy = st.builds(
        pb.RecommendRequest,
        user_id=st.sampled_from(users) | st.text(max_size=40),
        history_item_ids=_ids(items), k=K, exclude_seen=st.booleans(),
        exclude_item_ids=_ids(items), allow_item_ids=_ids(items) | st.just([]),
        request_id=st.text(max_size=20))
    req = data.draw(req_strategy)
    if data.draw(st.booleans()):
        req.min_score = data.draw(SCORES)
    _check(stub.Recommend, req)
    batch = data.draw(st.lists(req_strategy, max_size=4) | st.just([req] * 300))
    _check(stub.RecommendBatch, pb.RecommendBatchRequest(requests=batch))


@FUZZ
@given(data=st.data())
def test_fuzz_other_rpcs(fuzz_target, data):
    stub, users, items, _ = fuzz_target
    _check(stub.GetUserEmbedding, pb.GetUserEmbeddingRequest(
        user_id=data.draw(st.sampled_from(users) | st.text(max_size=40)),
        history_item_ids=data.draw(_ids(items))))
    _check(stub.SimilarItems, pb.SimilarItemsRequest(
        item_id=data.draw(st.sampled_from(items) | st.text(max_size=40)), k=data.draw(K),
        exclude_item_ids=data.draw(_ids(items))))
    _check(stub.GetModelInfo, pb.GetModelInfoRequest())
    raw = data.draw(st.binary(max_size=200))  # not necessarily a protobuf message at all
    channel = fuzz_target[3]
    for method in ("Recommend", "RecommendBatch", "GetUserEmbedding", "SimilarItems"):
        _check(channel.unary_unary(f"/recsys_ccl.v1.Recommender/{method}"), raw)


def test_good_calls_still_work_after_fuzzing(fuzz_target):
    stub, users, _, _ = fuzz_target
    resp = stub.Recommend(pb.RecommendRequest(user_id=users[0], k=5), timeout=10)
    assert len(resp.items) == 5
