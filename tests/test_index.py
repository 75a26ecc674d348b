"""Top-k indexes against brute force: sorted, exact, excluding and allowing what was asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_ccl.index import ExactIndex, make_index


def _brute(items: torch.Tensor, q: torch.Tensor, k: int, exclude, allow) -> list[int]:
    """Reference: float64 scores, filters applied as sets, top-k by (score desc)."""
    s = (items.double() @ q.double()).numpy()
    cand = set(range(len(items))) if allow is None or len(allow) == 0 else set(allow.tolist())
    cand -= set([] if exclude is None else exclude.tolist())
    return sorted(cand, key=lambda i: -s[i])[:k]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 97), d=st.integers(1, 9), b=st.integers(1, 5), k=st.integers(1, 120),
       seed=st.integers(0, 2**31 - 1), small_chunks=st.booleans(), data=st.data())
def test_exact_index_matches_brute_force(n, d, b, k, seed, small_chunks, data):
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n, d, generator=g)
    queries = torch.randn(b, d, generator=g)
    ids = st.lists(st.integers(0, n - 1), max_size=2 * n).map(lambda x: np.array(x, np.int64))
    exclude = [data.draw(st.none() | ids) for _ in range(b)]
    allow = [data.draw(st.none() | ids) for _ in range(b)]
    # small chunks force several matmuls and the merge across them
    index = ExactIndex(items, chunk_items=7 if small_chunks else None)
    scores, found = index.search(queries, k, exclude, allow)
    assert scores.shape == found.shape == (b, k)
    for r in range(b):
        got = found[r][found[r] >= 0].tolist()
        want = _brute(items, queries[r], k, exclude[r], allow[r])
        assert len(got) == len(want)
        s = scores[r][: len(got)]
        assert torch.all(s[:-1] >= s[1:]), "scores must be sorted best first"
        assert not set(got) & set([] if exclude[r] is None else exclude[r].tolist())
        if allow[r] is not None and len(allow[r]):
            assert set(got) <= set(allow[r].tolist())
        assert len(set(got)) == len(got), "no item twice"
        # equal as score multisets (ties may order differently)
        ref = (items.double() @ queries[r].double()).numpy()
        np.testing.assert_allclose(np.sort(ref[got]), np.sort(ref[want]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s.numpy(), ref[got], rtol=1e-5, atol=1e-5)
        assert torch.all(scores[r][len(got):] == float("-inf"))


def test_hnsw_recall_and_filters():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    exact = make_index("exact", items)
    approx = make_index("hnsw", items)
    _, want = exact.search(queries, 10)
    _, got = approx.search(queries, 10)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10
                      for a, b in zip(got, want, strict=True)])
    assert recall >= 0.9
    excl = [want[i, :5].numpy() for i in range(50)]
    _, got = approx.search(queries, 10, excl)
    for i in range(50):
        assert not set(got[i].tolist()) & set(excl[i].tolist())
        assert (got[i] >= 0).all()


def test_make_index_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown index"):
        make_index("ivf", torch.randn(3, 2))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 120), d=st.integers(1, 8), b=st.integers(1, 4), k=st.integers(1, 40),
       shards=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_sharded_search_merged_equals_one_index(n, d, b, k, shards, seed, data):
    """Items split across shards (sizes random, some possibly empty), each searched on its
    own with exclusions, the lists merged: the same top-k scores as one index over all."""
    from recsys_ccl.index import merge_top_k

    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n, d, generator=g)
    queries = torch.randn(b, d, generator=g)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=shards - 1,
                                     max_size=shards - 1)))
    bounds = list(zip([0, *cuts], [*cuts, n], strict=True))
    exclude = [np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n // 2))),
                        dtype=np.int64) for _ in range(b)]
    want_s, _ = ExactIndex(items).search(queries, k, exclude=exclude)
    part_s, part_i = [], []
    for lo, hi in bounds:
        if hi == lo:
            continue
        local = [e[(e >= lo) & (e < hi)] - lo for e in exclude]
        s, i = ExactIndex(items[lo:hi]).search(queries, k, exclude=local)
        part_s.append(s)
        part_i.append(torch.where(i >= 0, i + lo, i))
    got_s, got_i = merge_top_k(part_s, part_i, k)
    assert torch.allclose(got_s, want_s, rtol=1e-6, atol=1e-5)  # BLAS blocks differ by shard
    for q in range(b):
        valid = got_i[q][got_i[q] >= 0]
        assert not set(valid.tolist()) & set(exclude[q].tolist())
        assert len(set(valid.tolist())) == len(valid)
        assert torch.allclose(items[valid] @ queries[q], got_s[q][: len(valid)], atol=1e-5)
