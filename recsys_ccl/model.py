"""TwoTower: a user tower and an item tower whose similarity scores user-item pairs.

    item tower:  e_item[i] (-> MLP) (-> L2-normalise) (, τ · b[i])            (N, D)
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
from a history alone (the id branch is then left out).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "TwoTower"]


@dataclass(frozen=True)
class ModelConfig:
    num_users: int
    num_items: int
    dim: int = 64  # D: the length of the vectors both towers return
    user_id_embedding: bool = True
    history_len: int = 0  # L most recent items pooled into the user tower; 0 = off
    history_weight: float = 0.5  # g: share of the id embedding when both are on
    mlp_hidden: tuple[int, ...] = ()  # hidden sizes of an optional MLP on both towers
    normalize: bool = True  # L2-normalise outputs (cosine similarity)
    temperature: float = 0.1
    learn_temperature: bool = False
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    embedding_dropout: float = 0.0
    init_std: float = 0.1
    item_bias: bool = False  # a learned per-item logit offset, as one extra coordinate

    def __post_init__(self) -> None:
        if not (self.user_id_embedding or self.history_len > 0):
            raise ValueError("the user tower needs user_id_embedding or history_len > 0")
        if self.embedding_dim < 1:
            raise ValueError(f"dim {self.dim} leaves no room for embeddings (item_bias takes "
                             "one coordinate)")
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

    @property
    def temperature(self) -> torch.Tensor:
        """0-d tensor τ (differentiable when learnable)."""
        c = self.config
        return self.log_temperature.exp().clamp(c.temperature_min, c.temperature_max)

    def _finish(self, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        x = mlp(x)
        return F.normalize(x, dim=-1) if self.config.normalize else x

    def encode_items(self, item_idx: torch.Tensor) -> torch.Tensor:
        """item_idx (N,) int64 -> (N, D) item vectors."""
        v = self._finish(self.dropout(self.item_embedding(item_idx)), self.item_mlp)
        if self.item_bias is None:
            return v
        # τ · b: the loss divides every score by τ, leaving b itself as the logit offset
        return torch.cat([v, (self.temperature * self.item_bias[item_idx])[:, None]], 1)

    def encode_users(
        self,
        user_idx: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        exclude_item: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User vectors (B, D).

        user_idx (B,) int64, or None for users known only by their history;
        history (B, L) int64 item indices padded with -1 (needed when history_len > 0);
        exclude_item (B,) int64: an item left out of each user's pooled history (in training,
        the positive being predicted, which would otherwise be given away).
        """
        c = self.config
        parts = []
        if c.history_len > 0:
            if history is None:
                raise ValueError("this model pools histories: pass history (B, L)")
            valid = history >= 0  # (B, L)
            if exclude_item is not None:
                valid &= history != exclude_item[:, None]
            emb = self.item_embedding(history.clamp_min(0))  # (B, L, D)
            emb = self.dropout(emb) * valid[..., None]
            n = valid.sum(1, keepdim=True)  # (B, 1)
            pooled = emb.sum(1) / n.clamp_min(1)  # (B, D)
            has_history = n > 0
        if user_idx is not None and self.user_embedding is not None:
            ids = self.dropout(self.user_embedding(user_idx))  # (B, D)
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

    def score(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """(B, D) x (N, D) -> (B, N) similarity, the quantity ranked (τ does not change it)."""
        return user_vec @ item_vec.T
