"""Requests -> validated queries -> answers, independent of gRPC plumbing.

Validation raises RequestError carrying the gRPC status and a detail that names the field
(with its position in a batch: `requests[3].k`) and the expected range, so a client can fix the
call without reading our code:

    INVALID_ARGUMENT    k outside 1..max_k, no user at all, empty ids, non-finite min_score
    NOT_FOUND           unknown user without a usable history, unknown item, allow list of
                        unknown items only
    RESOURCE_EXHAUSTED  a list or batch longer than the server's limit
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from recsys_ccl.features import FeatureValue
from recsys_ccl.serving.bundle import LoadedBundle
from recsys_ccl.serving.limits import ServerLimits

__all__ = [
    "RecommendQuery",
    "RequestError",
    "UserQuery",
    "answer_recommend",
    "answer_similar",
    "parse_recommend",
    "parse_similar",
    "parse_user",
    "parse_user_features",
]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _show(s: str) -> str:
    """An id as it may appear in a detail: ASCII-escaped and cut to 64 characters."""
    return ascii(s[:64]) + ("..." if len(s) > 64 else "")


@dataclass(frozen=True)
class UserQuery:
    user_idx: int | None  # None: a user known only by the request's history (and features)
    history: np.ndarray  # int64 item indices from history_item_ids (catalogue ids only)
    features: dict[str, FeatureValue] | None = None  # a new user's features, checked


@dataclass(frozen=True)
class RecommendQuery:
    user: UserQuery
    k: int
    exclude: np.ndarray | None  # int64 item indices never to return
    allow: np.ndarray | None  # int64 item indices to choose from (None: all)
    min_score: float | None
    request_id: str


def _check_k(k: int, limits: ServerLimits, field: str) -> int:
    if not 1 <= k <= limits.max_k:
        raise RequestError(INVALID, f"{field} must be in 1..{limits.max_k}, got {k} (k is "
                                    "required: 0 is not a default)")
    return k


def _item_indices(bundle: LoadedBundle, ids: Sequence[str], limit: int,
                  field: str) -> tuple[np.ndarray, int]:
    """Known item indices of `ids` in order, and how many were unknown."""
    if len(ids) > limit:
        raise RequestError(EXHAUSTED, f"{field} has {len(ids)} ids, the limit is {limit}")
    out, unknown = [], 0
    lookup = bundle.item_index
    for j, s in enumerate(ids):
        if not s:  # ids are exact text: only the empty string is no id (" " may be one)
            raise RequestError(INVALID, f"{field}[{j}] is empty: item ids are non-empty strings")
        i = lookup.get(s)
        if i is None:
            unknown += 1
        else:
            out.append(i)
    return np.asarray(out, dtype=np.int64), unknown


def parse_user(bundle: LoadedBundle, limits: ServerLimits, user_id: str,
               history_ids: Sequence[str], prefix: str = "", features=None) -> UserQuery:
    """Resolve a user given by id and/or history and/or features (the request's
    user_features map) into something the user tower can embed. A user the bundle knows is
    embedded from the bundle (request features are for users it lacks)."""
    history, _ = _item_indices(bundle, history_ids, limits.max_history,
                               f"{prefix}history_item_ids")
    feats = parse_user_features(bundle, limits, features, prefix)
    if not user_id and not len(history_ids) and feats is None:
        ways = [f"{prefix}user_id", f"{prefix}history_item_ids"]
        if bundle.model.user_fields is not None:
            ways.append(f"{prefix}user_features")
        raise RequestError(INVALID, f"{', '.join(ways[:-1])} or {ways[-1]} is required (the "
                                    "request names no user)")
    if user_id and user_id in bundle.user_index:
        return UserQuery(bundle.user_index[user_id], history)
    if feats is not None:
        return UserQuery(None, history, feats)
    if not bundle.pools_history:
        if not user_id:
            raise RequestError(INVALID, f"{prefix}user_id is required: this model embeds users "
                                        "by id only, so a history cannot stand in for one")
        raise RequestError(NOT_FOUND, f"{prefix}user_id {_show(user_id)} is not one of the "
                                      f"bundle's {bundle.num_users} users (this model embeds "
                                      "users by id only)")
    if len(history):
        return UserQuery(None, history)
    if not len(history_ids):
        raise RequestError(NOT_FOUND, f"{prefix}user_id {_show(user_id)} is not one of the "
                                      f"bundle's {bundle.num_users} users (pass "
                                      "history_item_ids to embed a new user)")
    who = f"user_id {_show(user_id)} is unknown and " if user_id else ""
    raise RequestError(NOT_FOUND, f"{prefix}{who}none of the {len(history_ids)} "
                                  f"{prefix}history_item_ids is in the catalogue")


_KINDS = {"categorical": ("text",), "multi_hot": ("text", "texts"), "numeric": ("number",),
          "vector": ("floats",)}


def parse_user_features(bundle: LoadedBundle, limits: ServerLimits, features,
                        prefix: str = "") -> dict[str, FeatureValue] | None:
    """A request's user_features map (name -> FeatureValue) -> {name: plain value} checked
    against the model's user feature spec; None when the map is empty."""
    if not features:
        return None
    fields = bundle.model.user_fields
    if fields is None:
        raise RequestError(INVALID, f"{prefix}user_features: this model has no user features "
                                    "(ModelInfo.user_features is empty)")
    spec = fields.spec
    out: dict[str, FeatureValue] = {}
    for name in sorted(features):
        where = f"{prefix}user_features[{_show(name)}]"
        if name not in spec.names:
            raise RequestError(INVALID, f"{where}: the model has no such user feature; it has "
                                        f"{', '.join(spec.names)}")
        f = spec.field(name)
        value = features[name]
        kind = value.WhichOneof("kind")
        if kind not in _KINDS[f.type]:
            raise RequestError(INVALID, f"{where}: a {f.type} feature takes "
                                        f"{' or '.join(_KINDS[f.type])}, got {kind or 'nothing'}")
        if kind == "text":
            out[name] = value.text
        elif kind == "texts":
            if len(value.texts.values) > limits.max_id_list:
                raise RequestError(EXHAUSTED, f"{where} has {len(value.texts.values)} values, "
                                              f"the limit is {limits.max_id_list}")
            out[name] = list(value.texts.values)
        elif kind == "number":
            if not math.isfinite(value.number):
                raise RequestError(INVALID, f"{where} must be finite, got {value.number}")
            out[name] = float(value.number)
        else:
            floats = list(value.floats.values)
            if len(floats) != f.length:
                raise RequestError(INVALID, f"{where}: a vector of {f.length} floats, got "
                                            f"{len(floats)}")
            if not all(math.isfinite(x) for x in floats):
                raise RequestError(INVALID, f"{where}: every float must be finite")
            out[name] = floats
    return out


def parse_recommend(bundle: LoadedBundle, limits: ServerLimits, req,
                    prefix: str = "") -> RecommendQuery:
    """A RecommendRequest -> RecommendQuery, or RequestError."""
    k = _check_k(req.k, limits, f"{prefix}k")
    user = parse_user(bundle, limits, req.user_id, req.history_item_ids, prefix,
                      req.user_features)
    exclude, _ = _item_indices(bundle, req.exclude_item_ids, limits.max_id_list,
                               f"{prefix}exclude_item_ids")
    allow = None
    if len(req.allow_item_ids):
        allow, unknown = _item_indices(bundle, req.allow_item_ids, limits.max_id_list,
                                       f"{prefix}allow_item_ids")
        if not len(allow):
            raise RequestError(NOT_FOUND, f"{prefix}allow_item_ids: none of the {unknown} ids "
                                          "is in the catalogue")
    min_score = None
    if req.HasField("min_score"):
        min_score = float(req.min_score)
        if not math.isfinite(min_score):
            raise RequestError(INVALID, f"{prefix}min_score must be finite, got {min_score}")
    if req.exclude_seen:
        seen = [bundle.seen(user.user_idx)] if user.user_idx is not None else []
        exclude = np.concatenate([exclude, user.history, *seen])
    return RecommendQuery(user=user, k=k, exclude=exclude if len(exclude) else None,
                          allow=allow, min_score=min_score, request_id=req.request_id)


def answer_recommend(bundle: LoadedBundle,
                     queries: Sequence[RecommendQuery]) -> list[list[tuple[str, float]]]:
    """Top items per query, best first: one user-tower pass and one index search for all."""
    vectors = bundle.user_vectors([q.user.user_idx for q in queries],
                                  [q.user.history for q in queries],
                                  [q.user.features for q in queries])
    k = max(q.k for q in queries)
    scores, items = bundle.index.search(vectors, k, [q.exclude for q in queries],
                                        [q.allow for q in queries])
    return [_ranked(bundle, s[: q.k], i[: q.k], q.min_score)
            for q, s, i in zip(queries, scores.tolist(), items.tolist(), strict=True)]


def _ranked(bundle: LoadedBundle, scores: list[float], items: list[int],
            min_score: float | None) -> list[tuple[str, float]]:
    floor = -math.inf if min_score is None else min_score
    return [(bundle.item_ids[i], s) for s, i in zip(scores, items, strict=True)
            if i >= 0 and s >= floor]


def parse_similar(bundle: LoadedBundle, limits: ServerLimits, req) -> tuple[int, int, np.ndarray]:
    """A SimilarItemsRequest -> (item index, k, excluded indices incl. the item itself)."""
    k = _check_k(req.k, limits, "k")
    if not req.item_id:
        raise RequestError(INVALID, "item_id is required (a catalogue item id)")
    item = bundle.item_index.get(req.item_id)
    if item is None:
        raise RequestError(NOT_FOUND, f"item_id {_show(req.item_id)} is not one of the "
                                      f"bundle's {bundle.num_items} items")
    exclude, _ = _item_indices(bundle, req.exclude_item_ids, limits.max_id_list,
                               "exclude_item_ids")
    return item, k, np.concatenate([exclude, [item]]).astype(np.int64)


def answer_similar(bundle: LoadedBundle, item: int, k: int,
                   exclude: np.ndarray) -> list[tuple[str, float]]:
    query = bundle.item_embeddings[item: item + 1]
    if bundle.model.config.item_bias:
        # item to item: the learned vectors alone; the bias coordinate (τ · b) would add
        # τ² · b_query · b_other, a popularity term that is not similarity
        query = query.clone()
        query[0, -1] = 0.0
    scores, items = bundle.index.search(query, k, [exclude])
    return _ranked(bundle, scores[0].tolist(), items[0].tolist(), None)
