"""`recsys-ccl serve`: a grpcio server for one bundle, with health, reflection, reload, metrics.

Life cycle:
    start()    load + verify + warm the bundle, bind, health SERVING
    reload()   (SIGHUP) re-read the bundle path (a symlink is resolved again), load and warm
               it off the request path, swap one reference; a broken bundle is logged and the
               old model keeps serving
    stop()     (SIGTERM/SIGINT) health NOT_SERVING while calls are still answered for the
               drain period, then refuse new calls and let in-flight ones finish within the
               grace period
Threads: one gRPC handler thread per admitted call (max_concurrent_calls); they parse, queue
their query and wait, while `workers` compute threads score what is queued, each with
`torch_threads` BLAS threads, so workers x threads stays within the cores less one for gRPC
(oversubscription collapses throughput on small machines).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from recsys_ccl.errors import RecsysError
from recsys_ccl.serving.bundle import BundleError, LoadedBundle, load_bundle
from recsys_ccl.serving.limits import ServerLimits
from recsys_ccl.serving.metrics import ServerMetrics
from recsys_ccl.serving.servicer import SERVICE_NAME, RecommenderServicer
from recsys_ccl.serving.signals import ServerSignals

__all__ = ["JsonLogFormatter", "RecommenderServer", "serve_until_signalled"]

log = logging.getLogger("recsys_ccl.serving")


def _event(event: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, json.dumps({"event": event, **fields}, default=str))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        try:
            body = json.loads(msg)
            if not isinstance(body, dict):
                body = {"message": msg}
        except json.JSONDecodeError:
            body = {"message": msg}
        out = {"time": round(record.created, 3), "level": record.levelname.lower(), **body}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RecommenderServer:
    def __init__(self, bundle: str | Path, *, host: str = "127.0.0.1", port: int = 50051,
                 limits: ServerLimits | None = None, index: str = "auto",
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 metrics_port: int | None = None, access_log: bool = False):
        if (tls_cert is None) != (tls_key is None):
            raise RecsysError("TLS needs both --tls-cert and --tls-key")
        self.bundle_path = Path(bundle)
        self.host, self.requested_port = host, port
        self.limits = limits or ServerLimits()
        self.index_kind = index
        self.tls = (Path(tls_cert), Path(tls_key)) if tls_cert is not None else None
        self.metrics_port = metrics_port
        self.metrics = ServerMetrics()
        self.access_log = access_log
        self.port: int | None = None
        self.metrics_bound_port: int | None = None
        self._bundle: LoadedBundle | None = None
        self._reload_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._servicer: RecommenderServicer | None = None
        self._health: health.HealthServicer | None = None
        self._restore_threads: Callable[[], None] | None = None

    @property
    def bundle(self) -> LoadedBundle:
        if self._bundle is None:
            raise RuntimeError("the server has not been started")
        return self._bundle

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def target(self) -> str:
        return f"{_host_for_target(self.host)}:{self.port}"

    def start(self) -> int:
        """Bind, start answering health checks (NOT_SERVING), load the bundle, then serve
        (SERVING); returns the bound port. The address is bound first, so a port in use
        fails at once rather than after a long load; Recommender calls that arrive while the
        bundle loads get UNAVAILABLE."""
        self._restore_threads = _limit_compute_threads(self.limits.torch_threads)
        lim = self.limits
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=lim.handler_threads,
                                       thread_name_prefix="recsys-ccl-rpc"),
            # the Recommender limit is the servicer's; this bound keeps slots for probes
            maximum_concurrent_rpcs=lim.handler_threads,
            options=[
                ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
                ("grpc.max_receive_message_length", lim.max_message_bytes),
                ("grpc.max_send_message_length", lim.max_message_bytes),
            ],
        )
        try:
            port = self._bind(server)
        except BaseException:
            self._put_threads_back()
            raise
        servicer = RecommenderServicer(lambda: self._bundle, lim, self.metrics, self.access_log)
        server.add_generic_rpc_handlers((servicer.handler(),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.start()
        self._server, self._servicer, self.port = server, servicer, port
        t0 = time.perf_counter()
        try:
            self._bundle = load_bundle(self.bundle_path, self.index_kind)
        except BaseException:
            self._server = None
            server.stop(0).wait()
            servicer.close()
            self._put_threads_back()
            raise
        self.metrics.model_info.labels(self._bundle.model_version).set(self._bundle.loaded_unix)
        _event("bundle_loaded", path=str(self._bundle.path),
               model_version=self._bundle.model_version, items=self._bundle.num_items,
               users=self._bundle.num_users, index=self._bundle.index.name,
               seconds=round(time.perf_counter() - t0, 3))
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port is not None:
            self.metrics_bound_port = self.metrics.serve_http(self.metrics_port, self.host)
        _event("serving", address=f"{_host_for_target(self.host)}:{port}",
               tls=self.tls is not None, workers=lim.worker_threads,
               torch_threads=lim.torch_threads, metrics_port=self.metrics_bound_port,
               model_version=self._bundle.model_version)
        return port

    def _bind(self, server: grpc.Server) -> int:
        """Add the listening port (the socket is bound now); RecsysError when it cannot be."""
        address = f"{_host_for_target(self.host)}:{self.requested_port}"
        probe_address(self.host, self.requested_port)
        try:
            if self.tls is not None:
                cert, key = (_read_pem(p) for p in self.tls)
                creds = grpc.ssl_server_credentials([(key, cert)])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RecsysError(f"cannot listen on {address}: {exc}") from exc
        if not port:
            raise RecsysError(f"cannot listen on {address}")
        return port

    def reload(self) -> bool:
        """Load the bundle path again and swap it in; False (old model kept) when it fails."""
        with self._reload_lock:
            old = self.bundle
            t0 = time.perf_counter()
            try:
                new = load_bundle(self.bundle_path, self.index_kind)
            except Exception as exc:
                # a BundleError says what is wrong; anything else is a bug: keep its traceback
                self.metrics.reloads.labels("failed").inc()
                log.error(json.dumps({"event": "reload_failed", "path": str(self.bundle_path),
                                      "reason": str(exc) if isinstance(exc, BundleError)
                                      else repr(exc), "serving": old.model_version}),
                          exc_info=not isinstance(exc, BundleError))
                return False
            self._bundle = new  # one reference swap: calls read it once at their start
            self.metrics.reloads.labels("ok").inc()
            if old.model_version != new.model_version:
                self.metrics.model_info.remove(old.model_version)
            self.metrics.model_info.labels(new.model_version).set(new.loaded_unix)
            _event("reloaded", path=str(new.path), old_version=old.model_version,
                   model_version=new.model_version,
                   seconds=round(time.perf_counter() - t0, 3))
            return True

    def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """NOT_SERVING, keep answering for `drain` s (load balancers see health change and
        stop sending), then refuse new calls and wait up to `grace` s for in-flight ones."""
        if self._server is None:
            return
        grace = self.limits.grace_s if grace is None else grace
        drain = self.limits.drain_s if drain is None else drain
        _event("stopping", grace_s=grace, drain_s=drain)
        if self._health is not None:
            for name in ("", SERVICE_NAME):
                self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if drain > 0:
                time.sleep(drain)
            self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        if self._servicer is not None:
            self._servicer.close()  # the compute threads finish what is queued and end
        self.metrics.close()
        self._server = None
        self._put_threads_back()
        _event("stopped")

    def _put_threads_back(self) -> None:
        """An in-process server leaves its caller's thread counts as it found them."""
        if self._restore_threads is not None:
            self._restore_threads()
            self._restore_threads = None

    def __enter__(self) -> RecommenderServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def _limit_compute_threads(n: int) -> Callable[[], None]:
    """torch's and numpy's BLAS pools to n threads each (workers x n stays within the cores);
    returns what puts them back."""
    before = torch.get_num_threads()
    limiter = threadpool_limits(n)  # first: it records the pools' counts to restore
    torch.set_num_threads(n)

    def restore() -> None:
        limiter.restore_original_limits()
        torch.set_num_threads(before)

    return restore


def probe_address(host: str, port: int) -> None:
    """RecsysError naming the reason when `host:port` cannot be listened on: a port out of
    range, a host that does not resolve, an address not on this machine, a port taken (gRPC's
    own bind error says only that it failed)."""
    if not 0 <= port <= 65535:
        raise RecsysError(f"port {port} is out of range (expected 0..65535)")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise RecsysError(f"cannot listen on {host}:{port}: the host does not resolve "
                          f"({exc})") from None
    if port == 0:
        return
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            reason = ("the port is in use" if exc.errno == errno.EADDRINUSE
                      else exc.strerror or str(exc))
            raise RecsysError(f"cannot listen on {host}:{port}: {reason}") from None


def _host_for_target(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RecsysError(f"{path}: cannot read ({exc.strerror})") from exc


def serve_until_signalled(server: RecommenderServer,
                          signals: ServerSignals | None = None) -> None:
    """Start, then block: SIGHUP reloads, SIGTERM/SIGINT stop gracefully.

    `signals`: handlers installed earlier (the serve command installs them before it imports
    this module); without them they are installed here, still before the bundle loads."""
    own = signals is None
    signals = ServerSignals.install() if own else signals
    try:
        server.start()
        if signals.reload.is_set():  # asked while starting: the bundle just loaded is current
            signals.reload.clear()
            _event("reload_ignored", reason="SIGHUP during start-up")
        while not signals.stop.wait(0.2):
            if signals.reload.is_set():
                signals.reload.clear()
                threading.Thread(target=server.reload, name="recsys-ccl-reload",
                                 daemon=True).start()
    finally:
        server.stop()
        if own:
            signals.restore()
