"""Full-ranking evaluation: every item scored for every evaluated user (no sampled negatives).

Protocol (as in the LightGCN/NGCF papers' full-ranking evaluation on their Gowalla split): for each
user with at least one held-out item, score all items, set the user's train items (and, when
testing, valid items) to -inf, take the top K.

    Recall@K = hits / |held-out items|        (not capped at K)
    NDCG@K   = DCG@K / IDCG over min(K, |held-out items|),  DCG = Σ_hits 1 / log2(rank + 2)
    Hit@K    = 1 if any hit;  MRR@K = 1 / (rank of the first hit + 1), 0 without one
averaged over users; coverage@K = distinct items in all top-K lists / number of items.

Memory stays bounded: users in batches, items in chunks with a running top-K merge, exclusions
applied per chunk from CSR lists, hits found by key lookup, never a (users, items) matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from recsys_ccl.data.dataset import (
    Histories,
    InteractionData,
    csr_from_pairs,
    histories_before,
    load_data_dir,
)
from recsys_ccl.errors import RecsysError
from recsys_ccl.index import merge_top_k, top_k_candidates
from recsys_ccl.progress import Progress

if TYPE_CHECKING:
    from recsys_ccl.model import TwoTower

__all__ = ["cold_segments", "evaluate_embeddings", "evaluate_model", "evaluate_run",
           "evaluate_server", "popularity_scores", "rank_metrics", "rankable_items"]


def _rows_of(indptr: torch.Tensor, indices: torch.Tensor,
             users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row position in `users`, item) pairs of the CSR lists of `users`."""
    start, end = indptr[users], indptr[users + 1]
    n = end - start
    rows = torch.repeat_interleave(torch.arange(len(users)), n)
    offsets = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return rows, indices[torch.repeat_interleave(start, n) + offsets]


def rank_metrics(topk: torch.Tensor, truth_rows: torch.Tensor, truth_items: torch.Tensor,
                 n_truth: torch.Tensor, num_items: int) -> dict[str, torch.Tensor]:
    """Per-user metrics from top-K lists (b, K) and the held-out (row, item) pairs."""
    b, K = topk.shape
    keys = torch.arange(b)[:, None] * num_items + topk  # (b, K)
    # (b, K) bool; -1 marks an empty slot (fewer than K candidates), never a hit
    hits = torch.isin(keys, truth_rows * num_items + truth_items) & (topk >= 0)
    discount = 1.0 / torch.log2(torch.arange(K, dtype=torch.float64) + 2)  # (K,)
    dcg = (hits * discount).sum(1)
    ideal = torch.cumsum(discount, 0)[(n_truth.clamp(max=K) - 1)]
    first = torch.where(hits.any(1), hits.float().argmax(1), -1)
    return {
        "recall": hits.sum(1) / n_truth,
        "ndcg": dcg / ideal,
        "hit": hits.any(1).double(),
        "mrr": torch.where(first >= 0, 1.0 / (first + 1).double(), 0.0),
    }


def _sample(users: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded sample of n of `users` (all of them when n is 0 or not smaller), ascending."""
    if n <= 0 or len(users) <= n:
        return users
    g = torch.Generator().manual_seed(seed)
    return users[torch.randperm(len(users), generator=g)[:n]].sort().values


def evaluate_embeddings(
    user_vectors: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    item_vectors: torch.Tensor,
    data: InteractionData,
    split: str = "test",
    k: int = 20,
    user_batch: int = 1024,
    item_chunk: int = 1 << 15,
    item_mask: torch.Tensor | None = None,
    user_mask: torch.Tensor | None = None,
    sample_users: int = 0,
    seed: int = 0,
    progress: bool = False,
    stage: str = "evaluate",
    rankable: torch.Tensor | None = None,
    user_order: torch.Tensor | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of user · item scores on `split` ("valid" or "test").

    user_vectors: (U, D) tensor, or a function mapping user indices (b,) to (b, D);
    item_vectors: (I, D), on the device the scores are computed on (a GPU for a model
    trained there). Returns {"recall@K", "ndcg@K", "hit@K", "mrr@K", "coverage@K",
    "users"} where users is the number of users evaluated, and "users_total" (the users with
    held-out items) when a sample was drawn. item_mask (I,) / user_mask (U,) bool keep only
    the held-out pairs of those items / users (e.g. the cold ones): ranking is still over
    every item. sample_users: evaluate a seeded sample of this many users when more have
    held-out items (0: all). progress: a bar on a terminal, log lines elsewhere, named
    `stage`. rankable (I,) bool: items the model can rank (None: all); the others are never
    in a list, so a held-out item among them is a miss. user_order (U,): users are scored in
    batches in the order of this key (e.g. history length, so that a sequential tower's
    batches hold windows of similar length); the metrics do not depend on it.

    Scores are computed in (user_batch x item_chunk) blocks written into one buffer, each
    block's k best found by `top_k_candidates` and merged once per user batch.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    U, num_items = data.num_users, data.num_items
    exclude = [data.splits["train"]] + ([data.splits["valid"]] if split == "test" else [])
    excl_u = torch.cat([p[0] for p in exclude])
    excl_i = torch.cat([p[1] for p in exclude])
    ex_ptr, ex_idx = csr_from_pairs(excl_u, excl_i, U)
    split_u, split_i = data.splits[split]
    keep = torch.ones(split_u.shape, dtype=torch.bool)
    if item_mask is not None:
        keep &= item_mask[split_i]
    if user_mask is not None:
        keep &= user_mask[split_u]
    tr_ptr, tr_idx = csr_from_pairs(split_u[keep], split_i[keep], U)
    n_truth_all = tr_ptr[1:] - tr_ptr[:-1]
    all_users = torch.nonzero(n_truth_all > 0).flatten()
    if len(all_users) == 0:
        raise ValueError(f"the {split} split is empty: nothing to evaluate")
    eval_users = _sample(all_users, sample_users, seed)
    if user_order is not None:
        eval_users = eval_users[torch.argsort(user_order[eval_users], stable=True)]
    k = min(k, num_items)
    sums = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0, "mrr": 0.0}
    covered = torch.zeros(num_items, dtype=torch.bool)
    item_vectors = item_vectors.float().contiguous()
    dev = item_vectors.device  # scores are computed where the item vectors are
    chunk = min(item_chunk, num_items)
    buf = torch.empty(min(user_batch, len(eval_users)) * chunk, device=dev)
    unrankable = (torch.nonzero(~rankable).flatten().to(dev) if rankable is not None
                  else torch.zeros(0, dtype=torch.int64, device=dev))
    with torch.no_grad(), Progress(stage, len(eval_users), "users", enabled=progress) as bar:
        for s in range(0, len(eval_users), user_batch):
            users = eval_users[s:s + user_batch]
            b = len(users)
            uv = (user_vectors(users) if callable(user_vectors)
                  else user_vectors[users]).float().to(dev).contiguous()  # (b, D)
            ex_rows, ex_items = (t.to(dev) for t in _rows_of(ex_ptr, ex_idx, users))
            cand_s, cand_i = [], []
            for c0 in range(0, num_items, chunk):
                c1 = min(c0 + chunk, num_items)
                scores = buf[: b * (c1 - c0)].view(b, c1 - c0)
                torch.matmul(uv, item_vectors[c0:c1].T, out=scores)  # (b, D) @ (D, C)
                inside = (ex_items >= c0) & (ex_items < c1)
                scores[ex_rows[inside], ex_items[inside] - c0] = -math.inf
                never = unrankable[(unrankable >= c0) & (unrankable < c1)] - c0
                if len(never):
                    scores[:, never] = -math.inf
                top_s, top_i = top_k_candidates(scores, k)
                cand_s.append(top_s)
                cand_i.append(top_i + c0)
            # ties by item index, as the server
            best_s, best_i = (t.cpu() for t in merge_top_k(cand_s, cand_i, k))
            t_rows, t_items = _rows_of(tr_ptr, tr_idx, users)
            m = rank_metrics(best_i, t_rows, t_items, n_truth_all[users], num_items)
            for name in sums:
                sums[name] += float(m[name].sum())
            covered[best_i[torch.isfinite(best_s)]] = True
            bar.update(b)
    n = len(eval_users)
    out = {f"{name}@{k}": value / n for name, value in sums.items()}
    out[f"coverage@{k}"] = float(covered.sum()) / num_items
    out["users"] = n
    if n < len(all_users):
        out["users_total"] = len(all_users)
    return out


def _history_lengths(model: TwoTower, histories: Histories | None) -> torch.Tensor | None:
    """(U,) items each user's history holds, for a sequential tower (which computes over its
    batch's longest window); None otherwise."""
    if model.sequence is None or histories is None:
        return None
    return histories.indptr[1:] - histories.indptr[:-1]


def rankable_items(model: TwoTower, data: InteractionData) -> torch.Tensor | None:
    """(I,) bool: the items `model` can rank. A model with item features ranks every item; an
    id-only model only those with training interactions (the others' embeddings were never
    trained). None when that is every item."""
    if model.item_fields is not None or bool((data.item_count > 0).all()):
        return None
    return data.item_count > 0


def popularity_scores(data: InteractionData) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item vectors for the popularity baseline: score = the item's train count."""
    return (torch.ones(data.num_users, 1),
            data.item_count.float().unsqueeze(1))


def evaluate_model(model: TwoTower, data: InteractionData, histories: Histories | None,
                   split: str, k: int, item_mask: torch.Tensor | None = None,
                   user_mask: torch.Tensor | None = None, sample_users: int = 0,
                   seed: int = 0, progress: bool = False, stage: str = "evaluate",
                   rank_only: torch.Tensor | None = None) -> dict:
    """Full-ranking metrics of `model` on `split`, users embedded with `histories`
    (data.dataset.histories_before: what they had done before the split); leaves the model in
    the mode it was in. rank_only (I,) bool: rank these items alone (e.g. the cold ones, the
    cold-start protocol that ranks new items among themselves); None: every item the model
    can rank. The other arguments: see `evaluate_embeddings`."""
    dev = model.device
    by_index = model.config.user_id_embedding or model.user_fields is not None

    def encode_users(users: torch.Tensor) -> torch.Tensor:
        hist = histories[users].to(dev) if histories is not None else None
        return model.encode_users(users.to(dev) if by_index else None, hist)

    rankable = rankable_items(model, data)
    if rank_only is not None:
        rankable = rank_only if rankable is None else rankable & rank_only
    was_training = model.training
    model.eval()
    with torch.no_grad():
        items = model.encode_all_items()
        metrics = evaluate_embeddings(encode_users, items, data, split=split, k=k,
                                      item_mask=item_mask, user_mask=user_mask,
                                      sample_users=sample_users, seed=seed,
                                      progress=progress, stage=stage,
                                      rankable=rankable,
                                      user_order=_history_lengths(model, histories))
    model.train(was_training)
    return metrics


def _check_split(data: InteractionData, split: str) -> None:
    if split not in ("valid", "test"):
        raise RecsysError(f"--split must be 'valid' or 'test', got {split!r}")
    if len(data.splits[split][0]) == 0:
        raise RecsysError(f"the {split} split of {data.path} is empty: nothing to evaluate"
                          + (" (prepare made no validation split: pass --valid-from-train F "
                             "or --valid-ratio to prepare, or evaluate --split test)"
                             if split == "valid" else ""))


def evaluate_run(run: str | Path | None, data_dir: str | Path, split: str = "test",
                 k: int = 20, baseline: str | None = None,
                 device: str | torch.device = "cpu", sample_users: int = 0, seed: int = 0,
                 progress: bool = False) -> dict:
    """`recsys-ccl evaluate --run`: a RUN's model (or a baseline) on a DATA directory's split,
    scored on `device`; on a seeded sample of `sample_users` users when given (0: all)."""
    from recsys_ccl.checkpoint import load_run, require_same_data

    if k < 1:
        raise RecsysError(f"--k must be >= 1, got {k}")
    if sample_users < 0:
        raise RecsysError(f"--sample-users must be >= 0, got {sample_users}")
    data = load_data_dir(data_dir)
    _check_split(data, split)
    opts = {"sample_users": sample_users, "seed": seed}
    if baseline == "popularity":
        users, items = popularity_scores(data)
        return {"model": "popularity", "split": split,
                **evaluate_embeddings(users, items, data, split=split, k=k, **opts,
                                      progress=progress, stage=f"evaluate popularity ({split})")}
    if run is None:
        raise RecsysError("--run is required unless --baseline or --server is given")
    model, config = load_run(run)
    require_same_data(config, data, run)
    histories = histories_before(data, split, model.config.sequence_length)
    model = model.to(device)
    out = {"model": str(run), "split": split,
           **evaluate_model(model, data, histories, split, k, **opts, progress=progress,
                            stage=f"evaluate ({split})")}
    segments = cold_segments(data, split)
    if segments:
        out["segments"] = {}
        pop_users, pop_items = popularity_scores(data)
        for name, (items, users) in segments.items():
            seg = evaluate_model(model, data, histories, split, k, items, users, **opts,
                                 progress=progress, stage=f"evaluate {name} ({split})")
            seg["popularity"] = evaluate_embeddings(pop_users, pop_items, data, split, k,
                                                    item_mask=items, user_mask=users, **opts)
            out["segments"][name] = seg
        if "cold_items" in segments:
            # the cold-start protocol: cold items ranked among themselves (popularity has no
            # count for any of them, so no baseline here)
            cold = segments["cold_items"][0]
            out["segments"]["cold_among_cold"] = evaluate_model(
                model, data, histories, split, k, cold, rank_only=cold, **opts,
                progress=progress, stage=f"evaluate cold_among_cold ({split})")
    return out


def cold_segments(data: InteractionData, split: str
                  ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """{name: (item_mask, user_mask)} of the held-out rows worth reporting apart: warm_items
    and cold_items when `split` has rows of items without training interactions, cold_users
    when it has rows of such users; {} otherwise."""
    cold_items, cold_users = data.cold_masks()
    users, items = data.splits[split]
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    if cold_items[items].any():
        out["warm_items"] = (~cold_items, None)
        out["cold_items"] = (cold_items, None)
    if cold_users[users].any():
        out["cold_users"] = (None, cold_users)
    return out


def evaluate_server(target: str, data_dir: str | Path, split: str = "test", k: int = 20,
                    batch: int = 64) -> dict:
    """`recsys-ccl evaluate --server`: the same metrics, from the lists a running server
    returns. Every evaluated user is asked by user id through RecommendBatch with
    exclude_seen (the bundle's stored history) and, for the test split, the user's valid items
    as exclude_item_ids, exactly what offline evaluation masks. Served metrics equal offline
    `evaluate` for a bundle exported with the history before the split (`--history-splits
    train,valid` for test, `train` for valid: what the model reads offline; ties are ordered
    by item index on both sides); a bundle holding all splits marks the test items seen."""
    import grpc

    from recsys_ccl.serving.client import RecommenderClient
    from recsys_ccl.v1 import recommender_pb2 as pb

    if k < 1:
        raise RecsysError(f"--k must be >= 1, got {k}")
    if split not in ("valid", "test"):
        raise RecsysError(f"--split must be 'valid' or 'test', got {split!r}")
    data = load_data_dir(data_dir)
    U, num_items = data.num_users, data.num_items
    tr_ptr, tr_idx = csr_from_pairs(*data.splits[split], U)
    va_ptr, va_idx = csr_from_pairs(*data.splits["valid"], U)
    n_truth_all = tr_ptr[1:] - tr_ptr[:-1]
    eval_users = torch.nonzero(n_truth_all > 0).flatten()
    if len(eval_users) == 0:
        raise RecsysError(f"the {split} split is empty: nothing to evaluate")
    k = min(k, num_items)
    user_ids = data.users.sort("user_idx")["user_id"].to_list()
    item_ids = data.items.sort("item_idx")["item_id"].to_list()
    item_index = {item: i for i, item in enumerate(item_ids)}
    sums = {"recall": 0.0, "ndcg": 0.0, "hit": 0.0, "mrr": 0.0}
    covered = torch.zeros(num_items, dtype=torch.bool)
    with RecommenderClient(target) as client:
        try:
            client.wait_ready(10)
        except grpc.FutureTimeoutError as exc:
            raise RecsysError(f"no server answers at {target} (waited 10 s): is "
                              f"`recsys-ccl serve` running there?") from exc
        try:
            for s in range(0, len(eval_users), batch):
                users = eval_users[s:s + batch]
                requests = []
                for u in users.tolist():
                    exclude = ([item_ids[i] for i in va_idx[va_ptr[u]:va_ptr[u + 1]].tolist()]
                               if split == "test" else [])
                    requests.append(pb.RecommendRequest(user_id=user_ids[u], k=k,
                                                        exclude_seen=True,
                                                        exclude_item_ids=exclude))
                replies = client.recommend_batch(requests).responses
                topk = torch.full((len(users), k), -1, dtype=torch.int64)
                for row, reply in enumerate(replies):
                    got = [item_index.get(x.item_id, -1) for x in reply.items][:k]
                    topk[row, :len(got)] = torch.tensor(got, dtype=torch.int64)
                t_rows, t_items = _rows_of(tr_ptr, tr_idx, users)
                m = rank_metrics(topk, t_rows, t_items, n_truth_all[users], num_items)
                for name in sums:
                    sums[name] += float(m[name].sum())
                covered[topk[topk >= 0]] = True
        except grpc.RpcError as exc:
            raise RecsysError(f"{target}: {exc.code().name}: {exc.details()}") from exc
    n = len(eval_users)
    out = {f"{name}@{k}": value / n for name, value in sums.items()}
    out[f"coverage@{k}"] = float(covered.sum()) / num_items
    out["users"] = n
    return {"model": f"server {target}", "split": split, **out}
