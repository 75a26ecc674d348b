"""The Recommender service: gRPC method handlers over the current LoadedBundle.

Compute runs through a CallCombiner: concurrent Recommend calls are scored together in one
matmul by `workers` compute threads. Handlers take the raw request bytes
and parse them themselves, so a request that is not valid
protobuf (bad UTF-8 in a string, a truncated message) gets INVALID_ARGUMENT with the reason
rather than the library's generic INTERNAL. Each call reads the current bundle once, so a
reload that swaps it mid-call cannot mix two models in one answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from recsys_ccl.serving.batching import CallCombiner
from recsys_ccl.serving.bundle import LoadedBundle
from recsys_ccl.serving.limits import ServerLimits
from recsys_ccl.serving.metrics import ServerMetrics
from recsys_ccl.serving.queries import (
    EXHAUSTED,
    INVALID,
    RecommendQuery,
    RequestError,
    answer_recommend,
    answer_similar,
    parse_recommend,
    parse_similar,
    parse_user,
)
from recsys_ccl.v1 import recommender_pb2 as pb

__all__ = ["SERVICE_NAME", "RecommenderServicer"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
log = logging.getLogger("recsys_ccl.serving")


def _response(items: list[tuple[str, float]], version: str, request_id: str):
    resp = pb.RecommendResponse(model_version=version, request_id=request_id)
    for item_id, score in items:
        resp.items.add(item_id=item_id, score=score)
    return resp


def _ascii(s: str) -> str:
    """Metadata values must be printable ASCII."""
    return ascii(s[:128])[1:-1]  # escapes control and non-ASCII characters


def _answer_grouped(jobs: list[tuple[LoadedBundle, RecommendQuery]]) -> list:
    """Answers of concurrent Recommend queries, one pass per bundle (a reload may leave
    queries parsed against the old bundle and the new one in the same queue)."""
    out: list = [None] * len(jobs)
    for bundle in {id(b): b for b, _ in jobs}.values():
        idx = [i for i, (b, _) in enumerate(jobs) if b is bundle]
        for i, answer in zip(idx, answer_recommend(bundle, [jobs[i][1] for i in idx]),
                             strict=True):
            out[i] = answer
    return out


class RecommenderServicer:
    def __init__(self, current_bundle: Callable[[], LoadedBundle], limits: ServerLimits,
                 metrics: ServerMetrics | None = None, access_log: bool = False):
        self._bundle = current_bundle
        self.limits = limits
        self.metrics = metrics
        self.access_log = access_log
        self._compute = CallCombiner(_answer_grouped, slots=limits.worker_threads,
                                     max_batch=limits.max_batch)
        # Recommender calls in flight; health and reflection are not counted (probes must
        # get through under load), so the limit is ours rather than gRPC's server-wide one
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def close(self) -> None:
        """End the compute threads (after the server has stopped taking calls)."""
        self._compute.close()

    # -- the RPCs: request message + bundle -> response message --

    def recommend(self, req, bundle: LoadedBundle):
        q = parse_recommend(bundle, self.limits, req)
        items = self._compute.answer((bundle, q))
        return _response(items, bundle.model_version, req.request_id)

    def recommend_batch(self, req, bundle: LoadedBundle):
        n = len(req.requests)
        if n == 0:
            raise RequestError(INVALID, "requests is empty: send 1.."
                                        f"{self.limits.max_batch} RecommendRequests")
        if n > self.limits.max_batch:
            raise RequestError(EXHAUSTED, f"requests has {n} entries, the limit is "
                                          f"{self.limits.max_batch}")
        queries = [parse_recommend(bundle, self.limits, r, prefix=f"requests[{i}].")
                   for i, r in enumerate(req.requests)]
        answers = self._compute.run(lambda: answer_recommend(bundle, queries))
        out = pb.RecommendBatchResponse(model_version=bundle.model_version)
        out.responses.extend(_response(items, bundle.model_version, r.request_id)
                             for items, r in zip(answers, req.requests, strict=True))
        return out

    def get_user_embedding(self, req, bundle: LoadedBundle):
        user = parse_user(bundle, self.limits, req.user_id, req.history_item_ids,
                          features=req.user_features)
        vec = self._compute.run(lambda: bundle.user_vectors([user.user_idx], [user.history],
                                                            [user.features])[0])
        return pb.GetUserEmbeddingResponse(embedding=vec.tolist(),
                                           model_version=bundle.model_version,
                                           request_id=req.request_id)

    def similar_items(self, req, bundle: LoadedBundle):
        item, k, exclude = parse_similar(bundle, self.limits, req)
        items = self._compute.run(lambda: answer_similar(bundle, item, k, exclude))
        return _response(items, bundle.model_version, req.request_id)

    def get_model_info(self, req, bundle: LoadedBundle):
        lim, cfg = self.limits, bundle.model.config
        return pb.ModelInfo(
            model_version=bundle.model_version, embedding_dim=bundle.dim,
            num_users=bundle.num_users, num_items=bundle.num_items,
            similarity=bundle.manifest.get("similarity", "dot"),
            pools_history=bundle.pools_history, history_len=cfg.sequence_length,
            max_k=lim.max_k, max_batch=lim.max_batch, max_history=lim.max_history,
            max_id_list=lim.max_id_list, loaded_unix=bundle.loaded_unix,
            index=bundle.index.name,
            user_features=[f"{f.name}:{f.type}" for f in bundle.model.user_fields.spec.fields]
            if bundle.model.user_fields is not None else [],
            user_tower=cfg.user_tower,
        )

    # -- plumbing --

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Recommend": (pb.RecommendRequest, pb.RecommendResponse, self.recommend),
            "RecommendBatch": (pb.RecommendBatchRequest, pb.RecommendBatchResponse,
                               self.recommend_batch),
            "GetUserEmbedding": (pb.GetUserEmbeddingRequest, pb.GetUserEmbeddingResponse,
                                 self.get_user_embedding),
            "SimilarItems": (pb.SimilarItemsRequest, pb.RecommendResponse, self.similar_items),
            "GetModelInfo": (pb.GetModelInfoRequest, pb.ModelInfo, self.get_model_info),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            name: grpc.unary_unary_rpc_method_handler(
                self._behaviour(name, req_cls, fn),
                request_deserializer=None,  # raw bytes: parsed in _behaviour
                response_serializer=resp_cls.SerializeToString)
            for name, (req_cls, resp_cls, fn) in methods.items()
        })

    def _behaviour(self, name: str, req_cls, fn):
        full_name = req_cls.DESCRIPTOR.full_name

        def behaviour(raw: bytes, context: grpc.ServicerContext):
            t0 = time.perf_counter()
            code, detail, request_id = grpc.StatusCode.OK, "", ""
            bundle = self._bundle()
            if bundle is None:  # the server binds and answers health checks before it loads
                code, detail = grpc.StatusCode.UNAVAILABLE, "the bundle is still loading"
                context.abort(code, detail)
            with self._in_flight_lock:
                admitted = self._in_flight < self.limits.max_concurrent_calls
                self._in_flight += admitted
            try:
                if not admitted:
                    raise RequestError(EXHAUSTED, f"more than "
                                                  f"{self.limits.max_concurrent_calls} calls "
                                                  f"in flight: retry later")
                try:
                    req = req_cls.FromString(raw)
                except DecodeError as exc:
                    raise RequestError(INVALID, f"not a valid {full_name}: {exc}") from exc
                request_id = getattr(req, "request_id", "")
                return fn(req, bundle)
            except RequestError as exc:
                code, detail = exc.code, exc.detail
                # errors carry no response message: the version that judged them rides along
                # as trailing metadata, with the request_id
                context.set_trailing_metadata((("model-version", bundle.model_version),
                                               ("request-id", _ascii(request_id))))
                context.abort(code, detail)
            except Exception:
                code, detail = grpc.StatusCode.INTERNAL, "internal error (see the server log)"
                log.exception("call failed: %s", name)
                context.abort(code, detail)
            finally:
                if admitted:
                    with self._in_flight_lock:
                        self._in_flight -= 1
                seconds = time.perf_counter() - t0
                if self.metrics is not None:
                    self.metrics.observe(name, code.name, seconds)
                if self.access_log:
                    log.info(json.dumps({"event": "call", "method": name, "code": code.name,
                                         "ms": round(seconds * 1e3, 3), "detail": detail,
                                         "request_id": request_id, "peer": context.peer()}))

        return behaviour
