"""The server's life cycle and its house rules, on real servers on loopback: probes under load,
drain on stop, no filesystem in GetModelInfo, metrics of a replaced model removed, signals
during start-up, and a server process that imports no training code."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys_ccl.serving.client import RecommenderClient
from recsys_ccl.serving.limits import ServerLimits
from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_user(bundle):
    import polars as pl

    row = pl.read_parquet(bundle / "user_history.parquet").row(0, named=True)
    return row["user_id"], row["item_ids"]


def test_health_and_reflection_are_not_refused_under_load(bundles):
    """Recommender calls beyond max_concurrent_calls get RESOURCE_EXHAUSTED; health checks and
    reflection made at the same time are answered."""
    user, seen = _first_user(bundles["a"])
    heavy = pb.RecommendBatchRequest(requests=[
        pb.RecommendRequest(user_id=user, k=100, history_item_ids=(seen * 1000)[:1000])] * 32)
    limits = ServerLimits(max_concurrent_calls=2, workers=1)
    with RecommenderServer(bundles["a"], port=0, limits=limits) as srv, \
            RecommenderClient(srv.target) as client:
        client.wait_ready(10)
        health = health_pb2_grpc.HealthStub(client.channel)
        stop = threading.Event()

        def load():
            codes = []
            while not stop.is_set():
                try:
                    client.stub.RecommendBatch(heavy, timeout=30)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            return codes

        with futures.ThreadPoolExecutor(12) as pool:
            loads = [pool.submit(load) for _ in range(10)]
            time.sleep(0.5)
            probes = []
            for _ in range(20):
                try:
                    probes.append(health.Check(health_pb2.HealthCheckRequest(service=""),
                                               timeout=5).status)
                except grpc.RpcError as e:
                    probes.append(e.code().name)
            stop.set()
            codes = [c for f in loads for c in f.result()]
    assert "RESOURCE_EXHAUSTED" in codes, "the load never reached the limit"
    assert probes == [health_pb2.HealthCheckResponse.SERVING] * 20, probes


def test_stop_drains_not_serving_while_still_answering(bundles):
    user, _ = _first_user(bundles["a"])
    srv = RecommenderServer(bundles["a"], port=0, limits=ServerLimits(drain_s=1.5))
    srv.start()
    with RecommenderClient(srv.target) as client:
        client.wait_ready(10)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.5)
        assert client.health() == "NOT_SERVING"
        reply = client.recommend(user, k=3)  # still answered while draining
        assert len(reply.items) == 3
        stopper.join(10)
    assert not srv.started


def test_model_info_reveals_no_path_and_replaced_versions_leave_the_metrics(bundles, tmp_path):
    import urllib.request

    link = tmp_path / "current"
    link.symlink_to(bundles["a"])
    with RecommenderServer(link, port=0, metrics_port=0) as srv, \
            RecommenderClient(srv.target) as client:
        client.wait_ready(10)
        info = client.model_info()
        assert info.bundle_path == ""
        assert str(tmp_path) not in str(info) and str(bundles["a"]) not in str(info)
        url = f"http://127.0.0.1:{srv.metrics_bound_port}/metrics"
        old = info.model_version
        assert old in urllib.request.urlopen(url).read().decode()
        link.unlink()
        link.symlink_to(bundles["b"])
        assert srv.reload()
        text = urllib.request.urlopen(url).read().decode()
        new = client.model_info().model_version
        assert new != old and new in text and old not in text


def test_sighups_during_start_up_do_not_kill_the_server(bundles):
    """SIGHUPs every 50 ms from 0.5 s after launch (while torch imports and the bundle
    loads) until the server serves: Python's default action for SIGHUP would end it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_ccl.cli", "serve", "--bundle", str(bundles["a"]),
         "--port", str(port)], stderr=subprocess.PIPE, text=True)
    lines, serving = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if '"event": "serving"' in line:
                serving.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        time.sleep(0.5)
        sent = 0
        while not serving.is_set() and proc.poll() is None and sent < 400:
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.05)
        assert serving.is_set() and proc.poll() is None, "".join(lines)
        assert sent >= 3, "the server started before the signals could test anything"
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(10)
            assert client.health() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_server_process_imports_no_training_code(bundles, tmp_path):
    """`recsys-ccl serve` loads a bundle with bundle_format and the model (with its
    configuration) alone: not the training loop, its optimisers, export or DuckDB. (tqdm is
    not checked: torch itself imports it, in torch.hub, whenever it is installed.)"""
    port = _free_port()
    out = tmp_path / "modules.json"
    script = textwrap.dedent(f"""
        import json, os, signal, sys, threading
        from recsys_ccl.cli import main
        from recsys_ccl.serving.client import RecommenderClient

        def probe():
            with RecommenderClient("127.0.0.1:{port}") as c:
                c.wait_ready(60)
                c.model_info()
            names = ("recsys_ccl.train", "recsys_ccl.export", "recsys_ccl.objective",
                     "recsys_ccl.checkpoint", "recsys_ccl.optimization",
                     "recsys_ccl.evaluation", "recsys_ccl.data.prepare", "duckdb")
            with open({str(out)!r}, "w") as f:
                json.dump({{n: n in sys.modules for n in names}}, f)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=probe, daemon=True).start()
        sys.exit(main(["serve", "--bundle", {str(bundles["a"])!r}, "--port", "{port}"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads(out.read_text())
    assert not any(imported.values()), imported
