"""The server's limits: what one call may ask for, so that no request can blow up memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["PROBE_THREADS", "ServerLimits", "available_cores"]

# handler threads (and gRPC-level call slots) beyond max_concurrent_calls, for health checks,
# reflection and the quick RESOURCE_EXHAUSTED answers to calls over the limit
PROBE_THREADS = 8


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServerLimits:
    max_k: int = 1000  # k in Recommend / SimilarItems: 1..max_k
    max_batch: int = 256  # requests in one RecommendBatch
    max_history: int = 1000  # history_item_ids per request
    max_id_list: int = 10_000  # exclude_item_ids / allow_item_ids per request
    max_message_bytes: int = 4 * 1024 * 1024  # received and sent gRPC messages
    max_concurrent_calls: int = 64  # in flight, queued included; more get RESOURCE_EXHAUSTED
    workers: int = 0  # threads computing at once; 0 = available cores - 1 (at least 1)
    grace_s: float = 10.0  # on SIGTERM, in-flight calls get this long to finish
    # on SIGTERM, health says NOT_SERVING while calls are still answered for this long, so
    # that load balancers stop sending before the server stops taking calls
    drain_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_k", "max_batch", "max_history", "max_id_list", "max_message_bytes",
                     "max_concurrent_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or self.grace_s < 0 or self.drain_s < 0:
            raise ValueError("workers, grace_s and drain_s must be >= 0")

    @property
    def worker_threads(self) -> int:
        # One core is left to gRPC's own threads (polling, (de)serialising, the handlers'
        # Python), which hold the GIL.
        return self.workers or max(1, available_cores() - 1)

    @property
    def handler_threads(self) -> int:
        """gRPC handler threads: one per admitted call (they mostly wait for compute), plus a
        few that health checks and reflection find free when the Recommender calls are at
        their limit."""
        return self.max_concurrent_calls + PROBE_THREADS

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per compute slot, so that workers x threads stays within the
        cores less the one left to gRPC: a scoring thread on gRPC's core delays every call's
        network work behind the matmul (docs/benchmarks.md, Serving)."""
        return max(1, (available_cores() - 1) // self.worker_threads)
