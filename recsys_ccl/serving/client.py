"""A small Python client of the Recommender service.

    with RecommenderClient("127.0.0.1:50051") as client:
        resp = client.recommend(user_id="u42", k=10, exclude_seen=True)
        for item in resp.items: print(item.item_id, item.score)

`target` is any gRPC target: "host:port", or a list of replicas such as
"ipv4:127.0.0.1:50051,127.0.0.1:50052" which is spread over with the round_robin policy.
Errors arrive as grpc.RpcError (code() and details() say what was wrong).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys_ccl.v1 import recommender_pb2 as pb
from recsys_ccl.v1 import recommender_pb2_grpc as pb_grpc

__all__ = ["FeatureInput", "RecommenderClient", "feature_values", "format_items"]


FeatureInput = str | Sequence[str] | float | Sequence[float]


def feature_values(features: Mapping[str, FeatureInput] | None
                   ) -> dict[str, pb.FeatureValue]:
    """Plain user feature values -> the request's map: a str is `text`, a number `number`, a
    list of str `texts` (multi_hot), a list of numbers `floats` (vector)."""
    out = {}
    for name, value in (features or {}).items():
        if isinstance(value, str):
            out[name] = pb.FeatureValue(text=value)
        elif isinstance(value, int | float):
            out[name] = pb.FeatureValue(number=float(value))
        elif all(isinstance(v, str) for v in value):
            out[name] = pb.FeatureValue(texts=pb.StringList(values=list(value)))
        else:
            out[name] = pb.FeatureValue(floats=pb.FloatList(values=[float(v) for v in value]))
    return out


class RecommenderClient:
    def __init__(self, target: str, *, tls_ca: str | Path | None = None,
                 tls_server_name: str | None = None, timeout_s: float = 10.0,
                 max_message_bytes: int = 4 * 1024 * 1024, load_balancing: str = "round_robin"):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.lb_policy_name", load_balancing)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s

    def recommend(self, user_id: str = "", k: int = 10, *,
                  history_item_ids: Sequence[str] = (), exclude_seen: bool = False,
                  exclude_item_ids: Sequence[str] = (), allow_item_ids: Sequence[str] = (),
                  min_score: float | None = None, request_id: str = "",
                  user_features: Mapping[str, FeatureInput] | None = None
                  ) -> pb.RecommendResponse:
        """Top k items for a user given by id and/or history (oldest first) and/or features
        (a user the bundle lacks; see `feature_values`)."""
        req = pb.RecommendRequest(user_id=user_id, k=k, history_item_ids=history_item_ids,
                                  exclude_seen=exclude_seen, exclude_item_ids=exclude_item_ids,
                                  allow_item_ids=allow_item_ids, request_id=request_id,
                                  user_features=feature_values(user_features))
        if min_score is not None:
            req.min_score = min_score
        return self.stub.Recommend(req, timeout=self.timeout_s)

    def recommend_batch(self, requests: Sequence[pb.RecommendRequest]
                        ) -> pb.RecommendBatchResponse:
        return self.stub.RecommendBatch(pb.RecommendBatchRequest(requests=requests),
                                        timeout=self.timeout_s)

    def user_embedding(self, user_id: str = "", history_item_ids: Sequence[str] = (), *,
                       user_features: Mapping[str, FeatureInput] | None = None
                       ) -> pb.GetUserEmbeddingResponse:
        return self.stub.GetUserEmbedding(
            pb.GetUserEmbeddingRequest(user_id=user_id, history_item_ids=history_item_ids,
                                       user_features=feature_values(user_features)),
            timeout=self.timeout_s)

    def similar_items(self, item_id: str, k: int = 10, exclude_item_ids: Sequence[str] = ()
                      ) -> pb.RecommendResponse:
        return self.stub.SimilarItems(
            pb.SimilarItemsRequest(item_id=item_id, k=k, exclude_item_ids=exclude_item_ids),
            timeout=self.timeout_s)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s)

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... for the whole server ('') or one service."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects; grpc.FutureTimeoutError after timeout_s."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_items(resp: pb.RecommendResponse) -> list[str]:
    """A response's items as aligned lines: rank, item_id, score."""
    lines = [f"{'rank':>4s}  {'item_id':20s} {'score':>8s}"]
    lines += [f"{rank:4d}  {item.item_id:20s} {item.score:8.4f}"
              for rank, item in enumerate(resp.items, 1)]
    return lines
