"""Prometheus metrics of the server: calls and latency by method and status code."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["ServerMetrics"]

# latency buckets in seconds: sub-millisecond to the 1 s tail the benchmarks watch
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    """One registry per server, so several servers in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("recsys_ccl_calls", "RPCs answered", ["method", "code"],
                             registry=self.registry)
        self.latency = Histogram("recsys_ccl_call_seconds", "RPC handling time",
                                 ["method", "code"], buckets=_BUCKETS, registry=self.registry)
        self.reloads = Counter("recsys_ccl_reloads", "bundle reloads", ["outcome"],
                               registry=self.registry)
        self.model_info = Gauge("recsys_ccl_model_loaded_unix", "when the serving model loaded",
                                ["model_version"], registry=self.registry)
        self._http = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.calls.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def serve_http(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
