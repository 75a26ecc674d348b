"""The soak's short form (benchmarks/bench_soak.py): 16 callers, 10% bad requests, a real
server process. Latency and memory growth are the benchmark's business (they depend on the
machine and on what else runs on it); here: no crash, every answer the right code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_soak import bad_requests, soak


@pytest.mark.slow
def test_short_soak_with_bad_requests(bundles):
    res = soak(bundles["a"], seconds=8, clean_seconds=2, warmup=3, concurrency=16,
               bad_fraction=0.1)
    assert res["alive"] and res["healthy_after"] and res["answers_after"]
    assert res["exit_code"] == 0, "SIGTERM after the soak stops the server cleanly"
    for run in ("clean", "soak"):
        assert res[run]["unexpected"] == 0, res[run]["unexpected_detail"]
        assert res[run]["good_calls"] > 0
    assert res["soak"]["bad_calls"] > 0


def test_every_bad_request_kind_is_distinct_and_expects_no_success():
    kinds = bad_requests(["u1"], ["i1"])
    assert len({name for name, *_ in kinds}) == len(kinds) >= 12
    assert all("OK" not in accepted and "UNKNOWN" not in accepted and "INTERNAL" not in accepted
               for *_, accepted in kinds)
