"""TwoTower: a user tower and an item tower whose similarity scores user-item pairs.

    item tower:  h · e_item[i] + (1 - h) · mean(e_user[w] for w in users_i)
                 (-> MLP) (-> L2-normalise) (, τ · b[i])                        (N, D)
    user tower:  g · e_user[u] + (1 - g) · mean(e_item[h] for h in history_u)
                 (-> MLP) (-> L2-normalise) (, 1)                               (B, D)
    score:       <user, item> / τ   (cosine when normalised; τ fixed or learnable)

With `item_bias` each item has a learned scalar b[i] added to its logits (score/τ = cos/τ +
b[i]): the item's overall appeal, which a cosine alone cannot express (unit vectors have no
magnitude to carry it; see Wu et al., "On the Effectiveness of Sampled Softmax Loss for Item
Recommendation", TOIS 2023). It is carried as the last coordinate (τ · b[i] on the item side, 1
on the user side; the embeddings are then D - 1 wide), so vectors stay D long and every consumer
of them (evaluation, the bundle, the server's inner-product search, the Triton kernel's block
sizes) sees the same D and ranks by the same dot product.

The history branch (SimpleX's aggregation, Mao et al. CIKM 2021) pools the item tower's id
embeddings of the user's most recent L items, so that a user unseen in training can be embedded
from a history alone (the id branch is then left out). The item tower's neighbourhood branch
(item_history_len > 0) is its mirror image: each item pools the user id embeddings of up to M
of its training users (a model buffer, `item_history`, so exported item vectors carry it), so
that a score holds the two-hop term <mean of u's items, mean of i's users> of graph models such
as LightGCN while serving stays one inner-product search. Without it, h = 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FieldEncoders", "ModelConfig", "TwoTower"]


@dataclass(frozen=True)
class ModelConfig:
    num_users: int
    num_items: int
    dim: int = 64  # D: the length of the vectors both towers return
    user_id_embedding: bool = True
    history_len: int = 0  # L most recent items pooled into the user tower; 0 = off
    history_weight: float = 0.5  # g: share of the id embedding when both are on
    # the item tower's neighbourhood: the user id embeddings of up to this many of the item's
    # training users, pooled as the user tower pools items; 0 = off (needs user ids)
    item_history_len: int = 0
    item_history_weight: float = 0.5  # share of the item's own representation
    mlp_hidden: tuple[int, ...] = ()  # hidden sizes of an optional MLP on both towers
    normalize: bool = True  # L2-normalise outputs (cosine similarity)
    temperature: float = 0.1
    learn_temperature: bool = False
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    embedding_dropout: float = 0.0
    init_std: float = 0.1
    item_bias: bool = False  # a learned per-item logit offset, as one extra coordinate
    # content features: {"spec": FeatureSpec dict, "shapes": {field: per-row tensor shape}};
    # the catalogue's encoded rows are buffers of the model (they travel with its weights)
    item_features: dict | None = None
    user_features: dict | None = None
    feature_combine: str = "sum"  # id and feature embeddings: "sum" or "concat" (+ a linear map)
    id_dropout: float = 0.0  # training: drop a row's id embedding with this probability

    def __post_init__(self) -> None:
        if not (self.user_id_embedding or self.history_len > 0):
            raise ValueError("the user tower needs user_id_embedding or history_len > 0")
        if self.item_history_len > 0 and not self.user_id_embedding:
            raise ValueError("item_history_len pools user id embeddings: it needs "
                             "user_id_embedding")
        if self.embedding_dim < 1:
            raise ValueError(f"dim {self.dim} leaves no room for embeddings (item_bias takes "
                             "one coordinate)")
        if self.feature_combine not in ("sum", "concat"):
            raise ValueError(f"feature_combine must be 'sum' or 'concat', got "
                             f"{self.feature_combine!r}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if not 0 < self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(f"temperature {self.temperature} outside "
                             f"[{self.temperature_min}, {self.temperature_max}]")

    @property
    def embedding_dim(self) -> int:
        """Width of the id embeddings: D, less the coordinate the item bias takes."""
        return self.dim - (1 if self.item_bias else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @property
    def has_features(self) -> bool:
        return self.item_features is not None or self.user_features is not None

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{**d, "mlp_hidden": tuple(d.get("mlp_hidden", ()))})


def _mlp(dim: int, hidden: tuple[int, ...]) -> nn.Module:
    if not hidden:
        return nn.Identity()
    layers: list[nn.Module] = []
    width = dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, dim))
    return nn.Sequential(*layers)


class FieldEncoders(nn.Module):
    """The content half of a tower: one encoder per feature field, summed to (n, E).

    categorical -> Embedding; multi_hot -> EmbeddingBag (mean, padding excluded); numeric
    (value, missing) -> Linear(2, E); vector (L floats, missing) -> Linear(L + 1, E). The
    catalogue's encoded rows (features.feature_tensors) are buffers `rows_<k>`, gathered by
    index; rows of entities the catalogue lacks (a new user at serving time) go to
    `encode_rows`."""

    def __init__(self, features: dict, num_rows: int, dim: int, init_std: float):
        super().__init__()
        from recsys_ccl.features import FeatureSpec

        self.spec = FeatureSpec.from_dict(features["spec"])
        shapes = features["shapes"]
        self.encoders = nn.ModuleList()
        for k, f in enumerate(self.spec.fields):
            shape = shapes[f.name]
            if f.type == "categorical":
                enc: nn.Module = nn.Embedding(f.cardinality, dim)
                nn.init.normal_(enc.weight, std=init_std)
                dtype = torch.int64
            elif f.type == "multi_hot":
                enc = nn.EmbeddingBag(f.cardinality + 1, dim, mode="mean",
                                      padding_idx=f.cardinality)
                nn.init.normal_(enc.weight, std=init_std)
                with torch.no_grad():
                    enc.weight[f.cardinality].zero_()
                dtype = torch.int64
            else:
                enc = nn.Linear(shape[0], dim)
                dtype = torch.float32
            self.encoders.append(enc)
            self.register_buffer(f"rows_{k}", torch.zeros(num_rows, *shape, dtype=dtype))

    def set_rows(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the catalogue's encoded rows (feature_tensors of the DATA tables)."""
        for k, f in enumerate(self.spec.fields):
            buf = getattr(self, f"rows_{k}")
            t = tensors[f.name]
            if t.shape != buf.shape:
                raise ValueError(f"feature {f.name!r}: rows of shape {tuple(t.shape)}, the "
                                 f"model expects {tuple(buf.shape)}")
            buf.copy_(t)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (...,) int64 catalogue rows -> (..., E)."""
        flat = idx.reshape(-1)
        rows = {f.name: getattr(self, f"rows_{k}")[flat] for k, f in enumerate(self.spec.fields)}
        return self.encode_rows(rows).reshape(*idx.shape, -1)

    def encode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encoded rows given directly ({field: (n, ...)}, as feature_tensors makes) -> (n, E)."""
        out = None
        for f, enc in zip(self.spec.fields, self.encoders, strict=True):
            x = enc(rows[f.name])
            out = x if out is None else out + x
        return out


class TwoTower(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.item_embedding = nn.Embedding(c.num_items, c.embedding_dim)
        nn.init.normal_(self.item_embedding.weight, std=c.init_std)
        self.user_embedding = None
        if c.user_id_embedding:
            self.user_embedding = nn.Embedding(c.num_users, c.embedding_dim)
            nn.init.normal_(self.user_embedding.weight, std=c.init_std)
        self.user_mlp = _mlp(c.embedding_dim, c.mlp_hidden)
        self.item_mlp = _mlp(c.embedding_dim, c.mlp_hidden)
        self.dropout = nn.Dropout(c.embedding_dropout)
        # τ = exp(log_tau), clamped to [τ_min, τ_max]; a parameter only when learnable
        log_tau = torch.tensor(math.log(c.temperature))
        if c.learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        self.item_bias = nn.Parameter(torch.zeros(c.num_items)) if c.item_bias else None
        # content features (none for an id-only model, whose weights stay as they were)
        E = c.embedding_dim
        self.item_fields = (FieldEncoders(c.item_features, c.num_items, E, c.init_std)
                            if c.item_features else None)
        self.user_fields = (FieldEncoders(c.user_features, c.num_users, E, c.init_std)
                            if c.user_features else None)
        concat = c.feature_combine == "concat"
        self.item_combine = nn.Linear(2 * E, E) if concat and self.item_fields else None
        self.user_combine = nn.Linear(2 * E, E) if concat and self.user_fields else None
        self.item_bias_head = None
        if c.item_bias and self.item_fields is not None:
            # a cold item's logit offset comes from its features, not from an untrained b[i]
            # no intercept: a constant added to every item's logit cancels in the softmax, so
            # it would only drift on rounding noise (Adam scales that noise up to lr steps)
            self.item_bias_head = nn.Linear(E, 1, bias=False)
            nn.init.zeros_(self.item_bias_head.weight)
        if c.item_history_len > 0:
            # each item's training users (-1: none), loaded by set_item_histories
            self.register_buffer("item_history", torch.full(
                (c.num_items, c.item_history_len), -1, dtype=torch.int32))
        if c.has_features:
            # entities without a training interaction: their id embedding is never used
            self.register_buffer("item_cold", torch.zeros(c.num_items, dtype=torch.bool))
            self.register_buffer("user_cold", torch.zeros(c.num_users, dtype=torch.bool))

    @property
    def temperature(self) -> torch.Tensor:
        """0-d tensor τ (differentiable when learnable)."""
        c = self.config
        return self.log_temperature.exp().clamp(c.temperature_min, c.temperature_max)

    def _finish(self, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        x = mlp(x)
        return F.normalize(x, dim=-1) if self.config.normalize else x

    def _id_kept(self, idx: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
        """(...,) bool: whether each row's id embedding is used: never for a cold entity, and
        in training dropped with probability id_dropout (the feature path learns alone)."""
        keep = ~cold[idx]
        p = self.config.id_dropout
        if self.training and p > 0:
            keep = keep & (torch.rand(idx.shape, device=idx.device) >= p)
        return keep

    @staticmethod
    def _combine(ids: torch.Tensor, feats: torch.Tensor, keep: torch.Tensor,
                 combine: nn.Module | None) -> torch.Tensor:
        ids = ids * keep[..., None].to(ids.dtype)
        if combine is None:
            return ids + feats
        return combine(torch.cat([ids, feats], -1))

    def _item_base(self, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor | None]:
        """item_idx (...,) -> (representation (..., E), feature part, id kept (...,)): the id
        embedding, with features their sum (or concat + linear map)."""
        ids = self.item_embedding(item_idx)
        if self.item_fields is None:
            return ids, None, None
        feats = self.item_fields(item_idx)
        keep = self._id_kept(item_idx, self.item_cold)
        return self._combine(ids, feats, keep, self.item_combine), feats, keep

    def _pool_history(self, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of the item representations of each row's valid entries: history (B, L) item
        indices (any value where not valid), valid (B, L) bool -> (B, E); zeros for a row with
        none. One embedding_bag with weights valid / n: the (B, L, E) gather, its masking and
        its backward scatter were a third of a training step. With item features each distinct
        item is encoded once per call (a batch's histories repeat items many times)."""
        n = valid.sum(1, keepdim=True)
        weights = valid.to(self.item_embedding.weight.dtype) / n.clamp_min(1)
        if self.item_fields is None:
            table, idx = self.item_embedding.weight, history
        else:
            distinct, idx = torch.unique(history, return_inverse=True)
            table = self._item_base(distinct)[0]
        if self.dropout.p > 0 and self.training:  # per-entry dropout needs the (B, L, E) rows
            return (self.dropout(table[idx]) * weights[..., None]).sum(1)
        return F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")

    def _with_item_history(self, x: torch.Tensor, item_idx: torch.Tensor,
                           exclude_user: torch.Tensor | None) -> torch.Tensor:
        """x (N, E) items' own representations -> h · x + (1 - h) · the mean user id embedding
        of each item's training users (leaving out exclude_user (N,), -1 = none); x alone for
        an item without any."""
        users = self.item_history[item_idx].long()  # (N, M)
        valid = users >= 0
        if exclude_user is not None:
            valid &= users != exclude_user[:, None]
        n = valid.sum(1, keepdim=True)
        weights = valid.to(x.dtype) / n.clamp_min(1)
        pooled = F.embedding_bag(users.clamp_min(0), self.user_embedding.weight,
                                 per_sample_weights=weights, mode="sum")
        h = self.config.item_history_weight
        return torch.where(n > 0, h * x + (1 - h) * pooled, x)

    def set_item_histories(self, item_history: torch.Tensor) -> None:
        """Load each item's training users (num_items, M) int, -1 padded (a model with
        item_history_len = M, before training)."""
        self.item_history.copy_(item_history)

    def encode_items(self, item_idx: torch.Tensor,
                     exclude_user: torch.Tensor | None = None) -> torch.Tensor:
        """item_idx (N,) int64 -> (N, D) item vectors. exclude_user (N,) int64: a user left out
        of each item's pooled neighbourhood (in training, the user whose positive the item is,
        which would otherwise be given away; -1 = none)."""
        x, feats, keep = self._item_base(item_idx)
        if self.config.item_history_len > 0:
            x = self._with_item_history(x, item_idx, exclude_user)
        v = self._finish(self.dropout(x), self.item_mlp)
        if self.item_bias is None:
            return v
        b = self.item_bias[item_idx]
        if self.item_bias_head is not None:
            b = b * keep.to(b.dtype) + self.item_bias_head(feats).squeeze(-1)
        # τ · b: the loss divides every score by τ, leaving b itself as the logit offset
        return torch.cat([v, (self.temperature * b)[:, None]], 1)

    def encode_users(
        self,
        user_idx: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        exclude_item: torch.Tensor | None = None,
        user_rows: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """User vectors (B, D).

        user_idx (B,) int64, or None for users known only by their history (and features);
        history (B, L) int64 item indices padded with -1 (needed when history_len > 0);
        exclude_item (B,) int64: an item left out of each user's pooled history (in training,
        the positive being predicted, which would otherwise be given away);
        user_rows: encoded feature rows of users the catalogue lacks ({field: (B, ...)}, as
        features.feature_tensors makes), used when user_idx is None.
        """
        c = self.config
        parts = []
        if c.history_len > 0:
            if history is None:
                raise ValueError("this model pools histories: pass history (B, L)")
            valid = history >= 0  # (B, L)
            if exclude_item is not None:
                valid &= history != exclude_item[:, None]
            pooled = self._pool_history(history.clamp_min(0), valid)  # (B, E)
            has_history = valid.any(1, keepdim=True)  # (B, 1)
        own = self._user_own(user_idx, user_rows)
        if own is not None:
            ids = self.dropout(own)  # (B, D)
            if c.history_len > 0:
                g = c.history_weight
                # a user with no history at all keeps the id embedding alone
                x = torch.where(has_history, g * ids + (1 - g) * pooled, ids)
            else:
                x = ids
            parts.append(x)
        elif c.history_len > 0:
            parts.append(pooled)
        else:
            raise ValueError("this model embeds users by id: pass user_idx")
        u = self._finish(parts[0], self.user_mlp)
        if self.item_bias is None:
            return u
        return torch.cat([u, u.new_ones(u.shape[0], 1)], 1)

    def _user_own(self, user_idx: torch.Tensor | None,
                  user_rows: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """What a user is apart from their history (B, E): the id embedding (none for a cold
        user), plus the user features when the model has them; None when neither applies."""
        if self.user_fields is None:
            if user_idx is None or self.user_embedding is None:
                return None
            return self.user_embedding(user_idx)
        if user_idx is not None:
            feats = self.user_fields(user_idx)
            keep = self._id_kept(user_idx, self.user_cold)
        elif user_rows is not None:
            feats = self.user_fields.encode_rows(user_rows)
            keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
        else:
            return None
        if self.user_embedding is None:
            return feats if self.user_combine is None else self.user_combine(
                torch.cat([torch.zeros_like(feats), feats], -1))
        ids = (self.user_embedding(user_idx) if user_idx is not None
               else feats.new_zeros(feats.shape))
        return self._combine(ids, feats, keep, self.user_combine)

    def set_catalogue(self, item_rows: dict[str, torch.Tensor] | None,
                      user_rows: dict[str, torch.Tensor] | None, item_cold: torch.Tensor,
                      user_cold: torch.Tensor) -> None:
        """Load the encoded feature rows of every item and user and which of them are cold
        (no training interaction). For a model with features, before training."""
        if self.item_fields is not None and item_rows is not None:
            self.item_fields.set_rows(item_rows)
        if self.user_fields is not None and user_rows is not None:
            self.user_fields.set_rows(user_rows)
        self.item_cold.copy_(item_cold)
        self.user_cold.copy_(user_cold)

    def score(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """(B, D) x (N, D) -> (B, N) similarity, the quantity ranked (τ does not change it)."""
        return user_vec @ item_vec.T
