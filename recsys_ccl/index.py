"""Top-k search over item embeddings: exact (default) and optional approximate (faiss HNSW).

Both answer the same question with the same filters:

    search(queries (B, D) float32, k, exclude, allow) -> (scores (B, k), items (B, k))

`exclude[b]` / `allow[b]` are int64 arrays of item indices (or None): excluded items never
appear; a non-empty allow list restricts query b to those items. Rows with fewer than k
candidates are padded with score -inf and item -1. Scores are inner products (cosine when the
embeddings are normalised), the quantity the model was trained to rank.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ApproximateIndex", "ExactIndex", "ItemIndex", "make_index", "merge_top_k", "top_k",
           "top_k_candidates"]

# (B x chunk) float32 scores held at once: 2^24 elements = 64 MiB
_SCORE_BUDGET = 1 << 24


class ExactIndex:
    """Exact maximum inner product search: chunked matmul + top-k, filters applied as -inf."""

    name = "exact"

    def __init__(self, item_embeddings: torch.Tensor, chunk_items: int | None = None,
                 blocked: np.ndarray | None = None):
        """chunk_items: items scored per matmul (default: as many as keep B x chunk scores
        within 64 MiB, at least 4096); blocked: item indices never returned (items the model
        cannot rank)."""
        self.chunk_items = chunk_items
        self.blocked = _blocked(blocked)
        if item_embeddings.ndim != 2 or item_embeddings.dtype != torch.float32:
            raise ValueError(f"item_embeddings must be (N, D) float32, got "
                             f"{tuple(item_embeddings.shape)} {item_embeddings.dtype}")
        self.items = item_embeddings.contiguous()
        # (D, N) row-major copy for scoring: OpenBLAS multiplies a few queries by it faster
        # than by the (N, D) matrix transposed (bench_serving.py's raw top-k rows); costs
        # N x D x 4 bytes
        self._items_t = np.ascontiguousarray(self.items.numpy().T)
        self._spare: list[np.ndarray] = []  # score buffers not in use (one per search)
        self._spare_lock = threading.Lock()

    @property
    def num_items(self) -> int:
        return self.items.shape[0]

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        exclude: Sequence[np.ndarray | None] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = queries.shape[0]
        queries = queries.float().contiguous()
        exclude, allow = _per_query(b, exclude, allow)
        scores = torch.full((b, k), float("-inf"))
        items = torch.full((b, k), -1, dtype=torch.int64)
        full = [i for i in range(b) if allow[i] is None or len(allow[i]) == 0]
        if full:
            s, it = self._search_all(queries[full], k, [exclude[i] for i in full])
            scores[full], items[full] = s, it
        for i in range(b):
            if allow[i] is not None and len(allow[i]) > 0:
                s, it = _search_subset(self.items, queries[i], k, allow[i],
                                       _with_blocked(exclude[i], self.blocked))
                scores[i, : len(s)], items[i, : len(it)] = s, it
        return scores, items

    def _search_all(self, queries: torch.Tensor, k: int,
                    exclude: list[np.ndarray | None]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = queries.shape[0], self.num_items
        rows = np.concatenate([np.full(len(e), i) for i, e in enumerate(exclude)
                               if e is not None and len(e)] or [np.zeros(0, np.int64)])
        cols = np.concatenate([e for e in exclude if e is not None and len(e)]
                              or [np.zeros(0, np.int64)])
        chunk = self.chunk_items or max(4096, _SCORE_BUDGET // max(b, 1))
        best_s, best_i = [], []
        buf = self._take_buffer(b * min(chunk, n))
        try:
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                # numpy's BLAS: for a few queries against many items (memory-bound GEMV/GEMM
                # with small B) it beats torch's on one CPU thread (bench_serving.py)
                scores = buf[: b * (stop - start)].reshape(b, stop - start)  # (b, chunk)
                np.matmul(queries.numpy(), self._items_t[:, start:stop], out=scores)
                s = torch.from_numpy(scores)
                if len(cols):
                    hit = (cols >= start) & (cols < stop)
                    s[torch.from_numpy(rows[hit]),
                      torch.from_numpy(cols[hit] - start)] = float("-inf")
                if self.blocked is not None:
                    never = self.blocked[(self.blocked >= start) & (self.blocked < stop)]
                    s[:, torch.from_numpy(never - start)] = float("-inf")
                top_s, top_i = top_k_candidates(s, k)  # copies out of the buffer
                best_s.append(top_s)
                best_i.append(top_i + start)
        finally:
            self._give_back(buf)
        return merge_top_k(best_s, best_i, k)

    def _take_buffer(self, size: int) -> np.ndarray:
        """A float32 scratch array of at least `size` elements, reused across searches: a fresh
        1-64 MiB array per search is mmap'ed and page-faulted in each time, which costs as much
        as the scoring. As many exist as searches ran at once (the server's compute slots),
        not one per thread."""
        with self._spare_lock:
            buf = self._spare.pop() if self._spare else None
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=np.float32)
        return buf

    def _give_back(self, buf: np.ndarray) -> None:
        with self._spare_lock:
            self._spare.append(buf)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of (B, n) scores, best first: (B, k') values and indices,
    k' = min(k, n). Equal scores are ordered by ascending index, also at the cut-off (the
    server and `evaluate` follow this one rule, so their lists agree exactly)."""
    k = min(k, scores.shape[1])
    vals, idx = scores.topk(k, dim=1)
    if k == 0:
        return vals, idx
    kth = vals[:, -1:]
    # rows whose ties at the k-th score go on past the list: keep the lowest indices of them
    cut = ((scores == kth).sum(1) > (vals == kth).sum(1)).nonzero().flatten()
    if len(cut):
        full = torch.sort(scores[cut], dim=1, descending=True, stable=True)
        vals[cut], idx[cut] = full.values[:, :k], full.indices[:, :k]
    return _order_ties(vals, idx)


# top_k_candidates: columns are pruned by the maxima of groups of this many columns
_GROUP = 16


def _overflows(scores: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows where scores equal to the smallest kept value go on past `vals` (a tie
    at the cut-off that topk may have resolved against the lowest-index rule)."""
    kth = vals.amin(1, keepdim=True)
    return (scores == kth).sum(1) > (vals == kth).sum(1)


def top_k_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of (B, n) scores under `top_k`'s rule (equal scores: lowest
    index first), as an unordered set: (B, k') values and column indices, k' = min(k, n).
    Merge sets of several chunks with `merge_top_k`.

    Exact, and cheaper than topk over every column: the n columns fall in n/16 groups of 16
    (column j in group j mod n/16, so that one elementwise max over 16 rows of the (16, n/16)
    view gives every group's maximum); the k best columns lie in the k groups of the largest
    maxima, which alone are searched. A row whose choice of groups or of columns depends on
    a tie at the cut-off is searched over all its columns."""
    b, n = scores.shape
    k = min(k, n)
    width = n // _GROUP
    if width <= 2 * k:
        vals, idx = scores.topk(k, dim=1, sorted=False)
        tied = _overflows(scores, vals)
    else:
        maxima = scores[:, : width * _GROUP].view(b, _GROUP, width).amax(1)  # (B, width)
        g_vals, groups = maxima.topk(k, dim=1, sorted=False)  # (B, k)
        tied = _overflows(maxima, g_vals)
        cols = (groups[:, None, :] + width * torch.arange(_GROUP)[:, None]).reshape(b, -1)
        if n > width * _GROUP:  # the columns past the last whole group: always candidates
            cols = torch.cat([cols, torch.arange(width * _GROUP, n).expand(b, -1)], 1)
        candidates = scores.gather(1, cols)  # (B, 16k + rest)
        vals, pos = candidates.topk(k, dim=1, sorted=False)
        idx = cols.gather(1, pos)
        tied |= _overflows(candidates, vals)
    rows = tied.nonzero().flatten()
    if len(rows):
        vals[rows], idx[rows] = top_k(scores[rows], k)
    return vals, idx


def _order_ties(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by score descending, then index ascending."""
    by_index = idx.argsort(dim=1, stable=True)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_score = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, by_score), idx.gather(1, by_score)


def merge_top_k(scores: Sequence[torch.Tensor], items: Sequence[torch.Tensor],
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge top-k lists of disjoint parts of a catalogue (chunks here; shards on other
    machines) into the top-k of the whole.

    scores[p], items[p]: (B, k_p) from part p, item indices global, best first or not; -inf
    scores (with any index) are empty slots. Returns (B, k) scores best first (ties by
    ascending item index) and (B, k) int64 indices, -inf / -1 where fewer than k items
    exist. Exact: the global top k of each query is among the union of the parts' top k.
    """
    s, i = torch.cat(list(scores), 1), torch.cat(list(items), 1).to(torch.int64)
    b = s.shape[0]
    s, i = _order_ties(s, i)
    n = min(k, s.shape[1])
    out_s = s.new_full((b, k), float("-inf"))
    out_i = i.new_full((b, k), -1)
    out_s[:, :n], out_i[:, :n] = s[:, :n], i[:, :n]
    out_i[out_s == float("-inf")] = -1
    return out_s, out_i


def _blocked(blocked: np.ndarray | None) -> np.ndarray | None:
    """Sorted distinct int64 indices, or None when there are none."""
    if blocked is None or len(blocked) == 0:
        return None
    return np.unique(np.asarray(blocked, dtype=np.int64))


def _with_blocked(exclude: np.ndarray | None, blocked: np.ndarray | None) -> np.ndarray | None:
    if blocked is None:
        return exclude
    return blocked if exclude is None else np.concatenate([exclude, blocked])


def _per_query(b: int, exclude, allow) -> tuple[list, list]:
    """The optional per-query filters as two lists of length b (None: no filter)."""
    return (list(exclude) if exclude is not None else [None] * b,
            list(allow) if allow is not None else [None] * b)


def _search_subset(items: torch.Tensor, query: torch.Tensor, k: int, allow: np.ndarray,
                   exclude: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of one query over an allow list (deduplicated, minus exclusions)."""
    cand = np.unique(allow)
    if exclude is not None and len(exclude):
        cand = cand[~np.isin(cand, exclude)]
    if len(cand) == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    idx = torch.from_numpy(cand.astype(np.int64))
    s = items[idx] @ query
    top_s, top_i = top_k(s[None], k)  # cand is ascending, so ties stay by item index
    return top_s[0], idx[top_i[0]]


class ApproximateIndex:
    """faiss HNSW over inner product, for catalogues where exact search costs too much per
    call (export builds it from bundle_format.ANN_MIN_ITEMS items, measures its recall@10
    against exact search and stores it in the bundle). Exclusions are honoured by
    over-fetching and filtering (an exact fallback keeps k results when filters remove many);
    allow lists are searched exactly (they are small)."""

    name = "hnsw"

    def __init__(self, item_embeddings: torch.Tensor, m: int = 32, ef_search: int = 128,
                 ef_construction: int = 128, index=None, blocked: np.ndarray | None = None):
        """index: a built faiss index of these embeddings (read from a bundle); else one is
        built with `m` links per node and `ef_construction`. blocked: item indices never
        returned."""
        faiss = _faiss()
        self.items = item_embeddings.contiguous()
        self.blocked = _blocked(blocked)
        if index is None:
            index = faiss.IndexHNSWFlat(self.items.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.add(self.items.numpy())
        if index.ntotal != self.items.shape[0] or index.d != self.items.shape[1]:
            raise ValueError(f"the index holds {index.ntotal} x {index.d} vectors, the items "
                             f"are {tuple(self.items.shape)}")
        self._index = index
        self._index.hnsw.efSearch = ef_search
        self._exact = ExactIndex(self.items, blocked=self.blocked)

    @classmethod
    def read(cls, path, item_embeddings: torch.Tensor, ef_search: int,
             blocked: np.ndarray | None = None) -> ApproximateIndex:
        """The index a bundle holds (faiss's own binary format, not pickle)."""
        return cls(item_embeddings, ef_search=ef_search, index=_faiss().read_index(str(path)),
                   blocked=blocked)

    def write(self, path) -> None:
        _faiss().write_index(self._index, str(path))

    @property
    def params(self) -> dict[str, int]:
        h = self._index.hnsw
        return {"m": int(h.nb_neighbors(1)), "ef_construction": int(h.efConstruction),
                "ef_search": int(h.efSearch)}

    @property
    def num_items(self) -> int:
        return self.items.shape[0]

    def recall(self, queries: torch.Tensor, k: int = 10) -> float:
        """Share of the exact top-k found by this index (mean over queries (B, D))."""
        _, truth = self._exact.search(queries, k)
        _, found = self.search(queries, k)
        hits = sum(len(set(t[t >= 0].tolist()) & set(f[f >= 0].tolist()))
                   for t, f in zip(truth, found, strict=True))
        return hits / max(int((truth >= 0).sum()), 1)

    def tune(self, queries: torch.Tensor, k: int = 10, min_recall: float = 0.98,
             max_ef_search: int = 4096) -> float:
        """Raise efSearch (doubling) until recall@k on `queries` reaches min_recall or
        max_ef_search; returns the recall reached."""
        ef = max(self._index.hnsw.efSearch, k)
        while True:
            self._index.hnsw.efSearch = ef
            r = self.recall(queries, k)
            if r >= min_recall or ef >= max_ef_search:
                return r
            ef = min(2 * ef, max_ef_search)

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        exclude: Sequence[np.ndarray | None] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = queries.shape[0]
        exclude, allow = _per_query(b, exclude, allow)
        exclude = [_with_blocked(e, self.blocked) for e in exclude]
        extra = max((len(e) for e in exclude if e is not None), default=0)
        fetch = min(k + extra, self.num_items)
        d, ids = self._index.search(queries.float().contiguous().numpy(), fetch)
        scores = torch.full((b, k), float("-inf"))
        items = torch.full((b, k), -1, dtype=torch.int64)
        for i in range(b):
            if allow[i] is not None and len(allow[i]) > 0:
                s, it = _search_subset(self.items, queries[i], k, allow[i], exclude[i])
            else:
                keep = ids[i] >= 0
                if exclude[i] is not None and len(exclude[i]):
                    keep &= ~np.isin(ids[i], exclude[i])
                s, it = torch.from_numpy(d[i][keep][:k]), torch.from_numpy(ids[i][keep][:k])
                n_excluded = 0 if exclude[i] is None else len(np.unique(exclude[i]))
                if len(it) < min(k, self.num_items - n_excluded):
                    s, it = self._exact.search(queries[i: i + 1], k, [exclude[i]])
                    s, it = s[0][it[0] >= 0], it[0][it[0] >= 0]
            scores[i, : len(s)], items[i, : len(it)] = s, it.to(torch.int64)
        return scores, items


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the platform's wheel
        raise ImportError("the approximate index needs faiss: pip install faiss-cpu") from exc
    return faiss


ItemIndex = ExactIndex | ApproximateIndex


def make_index(kind: str, item_embeddings: torch.Tensor,
               blocked: np.ndarray | None = None) -> ItemIndex:
    """'exact' or 'hnsw'; `blocked` item indices are never returned."""
    if kind == "exact":
        return ExactIndex(item_embeddings, blocked=blocked)
    if kind == "hnsw":
        return ApproximateIndex(item_embeddings, blocked=blocked)
    raise ValueError(f"unknown index {kind!r}: expected 'exact' or 'hnsw'")
