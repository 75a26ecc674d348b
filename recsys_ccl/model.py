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

The history branch (SimpleX's aggregation, Mao et al. CIKM 2021) pools the item
representations of the user's most recent L items (their id embeddings, combined with their
features when the model has item features), so that a user unseen in training can be embedded
from a history alone (the id branch is then left out). The item tower's neighbourhood branch
(item_history_len > 0) is its mirror image: each item pools the user id embeddings of up to M
of its training users (a model buffer, `item_history`, so exported item vectors carry it), so
that a score holds the two-hop term <mean of u's items, mean of i's users> of graph models such
as LightGCN while serving stays one inner-product search. Without it, h = 1.

Every id-indexed table (e_item, e_user, b, the feature vocabularies) lives in one
EmbeddingTables (recsys_ccl/embeddings.py) and is read only through its lookups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys_ccl.config import ModelConfig
from recsys_ccl.embeddings import EmbeddingTables

__all__ = ["FieldEncoders", "ModelConfig", "TwoTower", "upgrade_state_dict"]


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


def quantile_edges(column: torch.Tensor, bins: int) -> torch.Tensor:
    """column (n, 2) numeric rows (value, missing) -> (bins - 1,) edges splitting the present
    values into `bins` equally filled bins (zeros when none is present). torch.quantile takes
    at most 2^24 values: a larger column (a table of 10^7 users) gives its edges from an even
    stride through its sorted values."""
    present = column[column[:, 1] == 0, 0].float()
    if len(present) == 0:
        return torch.zeros(bins - 1)
    limit = 1 << 24
    if len(present) > limit:
        present = torch.sort(present).values[::-(-len(present) // limit)]
    return torch.quantile(present, torch.linspace(0, 1, bins + 1)[1:-1])


def numeric_bin(column: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """column (n, 2) (value, missing), edges (B - 1,) -> (n,) int64 bin of each value, B (the
    zero row) where missing."""
    b = torch.bucketize(column[:, 0].contiguous(), edges)
    return torch.where(column[:, 1] == 0, b, len(edges) + 1)


class FieldEncoders(nn.Module):
    """The content half of a tower: one encoder per feature field, summed to (n, E); in
    training each row's field is left out of the sum with probability field_dropout.

    categorical -> a table row; multi_hot -> the mean of its tokens' rows (padding excluded);
    the tables live in the model's EmbeddingTables as `<side>_field<k>`. numeric (value,
    missing) -> Linear(2, E), plus with numeric_bins B the row of the value's quantile bin
    among the catalogue's values (a table `<side>_field<k>` of B rows and a zero row for a
    missing value; the B - 1 edges are a buffer `edges_<k>` fixed when the catalogue is
    loaded): a score can then depend on a year or a price band in any shape, not only
    linearly. vector (L floats, missing) -> Linear(L + 1, E). The catalogue's encoded rows
    (features.feature_tensors) are buffers `rows_<k>`, gathered by index; rows of entities the
    catalogue lacks (a new user at serving time) go to `encode_rows`."""

    def __init__(self, features: dict, side: str, num_rows: int, dim: int, init_std: float,
                 tables: EmbeddingTables, field_dropout: float = 0.0, numeric_bins: int = 0):
        super().__init__()
        self.field_dropout = field_dropout
        self.numeric_bins = numeric_bins
        from recsys_ccl.features import FeatureSpec

        self.spec = FeatureSpec.from_dict(features["spec"])
        shapes = features["shapes"]
        self.dense = nn.ModuleDict()
        self.table_names: dict[int, str] = {}
        for k, f in enumerate(self.spec.fields):
            shape = shapes[f.name]
            if f.type == "categorical":
                tables.add(f"{side}_field{k}", f.cardinality, dim, init_std)
                self.table_names[k] = f"{side}_field{k}"
                dtype = torch.int64
            elif f.type == "multi_hot":
                # the last row pads token lists to one width; it weighs nothing in the mean
                tables.add(f"{side}_field{k}", f.cardinality + 1, dim, init_std,
                           zero_rows=(f.cardinality,))
                self.table_names[k] = f"{side}_field{k}"
                dtype = torch.int64
            else:
                self.dense[str(k)] = nn.Linear(shape[0], dim)
                dtype = torch.float32
                if f.type == "numeric" and numeric_bins > 0:
                    tables.add(f"{side}_field{k}", numeric_bins + 1, dim, init_std,
                               zero_rows=(numeric_bins,))
                    self.table_names[k] = f"{side}_field{k}"
                    self.register_buffer(f"edges_{k}", torch.zeros(numeric_bins - 1))
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
            if k in self.table_names and f.type == "numeric":
                getattr(self, f"edges_{k}").copy_(quantile_edges(t, self.numeric_bins))

    def forward(self, idx: torch.Tensor, tables: EmbeddingTables) -> torch.Tensor:
        """idx (...,) int64 catalogue rows -> (..., E)."""
        flat = idx.reshape(-1)
        rows = {f.name: getattr(self, f"rows_{k}")[flat] for k, f in enumerate(self.spec.fields)}
        return self.encode_rows(rows, tables).reshape(*idx.shape, -1)

    def encode_rows(self, rows: dict[str, torch.Tensor],
                    tables: EmbeddingTables) -> torch.Tensor:
        """Encoded rows given directly ({field: (n, ...)}, as feature_tensors makes) -> (n, E)."""
        out = None
        for k, f in enumerate(self.spec.fields):
            x = rows[f.name]
            if f.type == "categorical":
                x = tables.lookup(self.table_names[k], x)
            elif f.type == "multi_hot":  # (n, T) codes, padded with `cardinality`
                present = (x != f.cardinality).to(torch.float32)
                weights = present / present.sum(1, keepdim=True).clamp_min(1)
                x = tables.pool(self.table_names[k], x, weights)
            elif k in self.table_names:  # numeric, with its bin's row
                x = self.dense[str(k)](x) + tables.lookup(
                    self.table_names[k], numeric_bin(x, getattr(self, f"edges_{k}")))
            else:
                x = self.dense[str(k)](x)
            if self.training and self.field_dropout > 0:
                x = x * (torch.rand(x.shape[0], 1, device=x.device) >= self.field_dropout)
            out = x if out is None else out + x
        return out


class _Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attention(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # no bias: a key bias adds q·b_k to every logit of a query, which the softmax
        # cancels, so its gradient would be rounding noise that Adam scales to lr-sized steps
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, E), mask (B, 1, T, T) bool (True: may attend) -> (B, T, E)."""
        B, T, E = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(E, dim=2)  # 3 x (B, T, E)
        q, k, v = (t.view(B, T, self.heads, E // self.heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, E/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, E)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """Causal self-attention over a left-padded sequence of item representations (SASRec,
    Kang & McAuley ICDM 2018, with pre-LayerNorm blocks): position t sees positions <= t of
    the same sequence and no padding. Positions are counted from the sequence's first item,
    so left padding changes nothing, and the output at t is the output for the prefix ending
    at t (what the prefix alone would give), so every position trains as a next-item query."""

    def __init__(self, width: int, max_len: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, T, E) item representations, valid (B, T) bool, True on a suffix of each row
        (left padding) -> (B, T, E); rows of padding positions are not meaningful."""
        T = x.shape[1]
        n = valid.sum(1, keepdim=True)  # (B, 1)
        pos = (torch.arange(T, device=x.device) - (T - n)).clamp_min(0)  # (B, T)
        x = self.drop(x * valid[..., None] + self.positions[pos])
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # a position attends to itself and to the items before it; a padding position to
        # itself only (no row is empty), and no item position ever to a padding one
        mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)
        mask = mask[:, None]  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class TwoTower(nn.Module):
    """The two towers over one EmbeddingTables (tables "item", "user", "item_bias" and the
    feature fields' `<side>_field<k>`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        E = c.embedding_dim
        self.tables = EmbeddingTables()
        self.tables.add("item", c.num_items, E, c.init_std)
        if c.user_id_embedding:
            self.tables.add("user", c.num_users, E, c.init_std)
        if c.item_bias:
            self.tables.add("item_bias", c.num_items, 1, init_std=0.0)
        self.sequence = (SequenceEncoder(E, c.max_len, c.layers, c.heads, c.dropout)
                         if c.user_tower == "transformer" else None)
        self.user_mlp = _mlp(E, c.mlp_hidden)
        self.item_mlp = _mlp(E, c.mlp_hidden)
        self.dropout = nn.Dropout(c.embedding_dropout)
        # τ = exp(log_tau), clamped to [τ_min, τ_max]; a parameter only when learnable
        log_tau = torch.tensor(math.log(c.temperature))
        if c.learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        # content features (none for an id-only model)
        self.item_fields = (FieldEncoders(c.item_features, "item", c.num_items, E, c.init_std,
                                          self.tables, c.feature_dropout, c.numeric_bins)
                            if c.item_features else None)
        self.user_fields = (FieldEncoders(c.user_features, "user", c.num_users, E, c.init_std,
                                          self.tables, c.feature_dropout, c.numeric_bins)
                            if c.user_features else None)
        concat = c.feature_combine == "concat"
        self.item_combine = nn.Linear(2 * E, E) if concat and self.item_fields else None
        self.user_combine = nn.Linear(2 * E, E) if concat and self.user_fields else None
        self.item_bias_head = None
        if c.item_bias and self.item_fields is not None:
            # a cold item's logit offset comes from its features, not from an untrained b[i];
            # no intercept: a constant added to every item's logit cancels in the softmax, so
            # it would only drift on rounding noise
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
    def device(self) -> torch.device:
        return self.tables.weight("item").device

    @property
    def temperature(self) -> torch.Tensor:
        """0-d tensor τ (differentiable when learnable)."""
        c = self.config
        return self.log_temperature.exp().clamp(c.temperature_min, c.temperature_max)

    def _finish(self, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        x = mlp(x)
        return F.normalize(x, dim=-1) if self.config.normalize else x

    def _id_kept(self, idx: torch.Tensor, cold: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """(...,) bool: whether each row's id embedding is used: never for a cold entity, and
        in training (when `drop`) dropped with probability id_dropout (the feature path learns
        alone)."""
        keep = ~cold[idx]
        p = self.config.id_dropout
        if drop and self.training and p > 0:
            keep = keep & (torch.rand(idx.shape, device=idx.device) >= p)
        return keep

    @staticmethod
    def _combine(ids: torch.Tensor, feats: torch.Tensor, keep: torch.Tensor,
                 combine: nn.Module | None) -> torch.Tensor:
        ids = ids * keep[..., None].to(ids.dtype)
        if combine is None:
            return ids + feats
        return combine(torch.cat([ids, feats], -1))

    def _item_base(self, item_idx: torch.Tensor, drop_ids: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """item_idx (...,) -> (representation (..., E), feature part, id kept (...,)): the id
        embedding, with features their sum (or concat + linear map)."""
        ids = self.tables.lookup("item", item_idx)
        if self.item_fields is None:
            return ids, None, None
        feats = self.item_fields(item_idx, self.tables)
        keep = self._id_kept(item_idx, self.item_cold, drop_ids)
        return self._combine(ids, feats, keep, self.item_combine), feats, keep

    def _pool_history(self, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of the item representations (_item_base: id embeddings, with features their
        combination) of each row's valid entries: history (B, L) item indices (any value where
        not valid), valid (B, L) bool -> (B, E); zeros for a row with none. With item features
        each distinct item is encoded once per call (a batch's histories repeat items)."""
        n = valid.sum(1, keepdim=True)
        weights = valid.to(torch.float32) / n.clamp_min(1)
        drop = self.dropout.p > 0 and self.training  # per-entry dropout needs (B, L, E) rows
        if self.item_fields is None:
            if drop:
                rows = self.dropout(self.tables.lookup("item", history))  # (B, L, E)
                return (rows * weights[..., None]).sum(1)
            return self.tables.pool("item", history, weights)
        distinct, idx = torch.unique(history, return_inverse=True)
        # ids are dropped from candidates only: an evaluated history keeps its warm items' ids
        rows = self._item_base(distinct, drop_ids=False)[0]  # (n distinct, E)
        if drop:
            return (self.dropout(rows[idx]) * weights[..., None]).sum(1)
        return self.tables.pool_rows(rows, idx, weights)

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
        pooled = self.tables.pool("user", users.clamp_min(0), weights)  # (N, E)
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
        if not self.config.item_bias:
            return v
        b = self.tables.lookup("item_bias", item_idx).squeeze(-1)  # (N,)
        if self.item_bias_head is not None:
            b = b * keep.to(b.dtype) + self.item_bias_head(feats).squeeze(-1)
        # τ · b: the loss divides every score by τ, leaving b itself as the logit offset
        return torch.cat([v, (self.temperature * b)[:, None]], 1)

    def encode_all_items(self, batch: int = 1 << 16) -> torch.Tensor:
        """(num_items, D) every item's vector, in batches of `batch` items (no gradient)."""
        n, dev = self.config.num_items, self.device
        with torch.no_grad():
            return torch.cat([self.encode_items(torch.arange(s, min(s + batch, n), device=dev))
                              for s in range(0, n, batch)])

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
        if self.sequence is not None:
            if history is None:
                raise ValueError("this model reads ordered histories: pass history (B, T)")
            used = torch.nonzero((history >= 0).any(0)).flatten()
            history = history[:, int(used[0]) if len(used) else -1:]  # no all-padding column
            out = self.encode_positions(history)[:, -1]  # the last position: (B, D)
            # a user without any history: zeros (with the bias coordinate, a popularity rank)
            has = (history[:, -1] >= 0)[:, None].to(out.dtype)
            if c.item_bias:
                return torch.cat([out[:, :-1] * has, out[:, -1:]], 1)
            return out * has
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
            ids = self.dropout(own)  # (B, E)
            if c.history_len > 0:
                g = c.history_weight
                # a user with no history at all keeps the id embedding alone
                x = torch.where(has_history, g * ids + (1 - g) * pooled, ids)
            else:
                x = ids
        elif c.history_len > 0:
            x = pooled
        else:
            raise ValueError("this model embeds users by id: pass user_idx")
        u = self._finish(x, self.user_mlp)
        if not c.item_bias:
            return u
        return torch.cat([u, u.new_ones(u.shape[0], 1)], 1)

    def encode_positions(self, history: torch.Tensor) -> torch.Tensor:
        """The transformer tower at every position: history (B, T) int64 item indices, oldest
        first, left-padded with -1 (at most max_len) -> (B, T, D), the user vector after each
        prefix (rows of padding positions are not meaningful)."""
        if self.sequence is None:
            raise ValueError("encode_positions needs user_tower = 'transformer'")
        valid = history >= 0  # (B, T)
        x = self._item_base(history.clamp_min(0), drop_ids=False)[0]  # (B, T, E)
        h = self._finish(self.sequence(x, valid), self.user_mlp)  # (B, T, E)
        if not self.config.item_bias:
            return h
        return torch.cat([h, h.new_ones(*h.shape[:2], 1)], 2)

    def _user_own(self, user_idx: torch.Tensor | None,
                  user_rows: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """What a user is apart from their history (B, E): the id embedding (none for a cold
        user), plus the user features when the model has them; None when neither applies."""
        has_ids = self.config.user_id_embedding
        if self.user_fields is None:
            if user_idx is None or not has_ids:
                return None
            return self.tables.lookup("user", user_idx)
        if user_idx is not None:
            feats = self.user_fields(user_idx, self.tables)
            keep = self._id_kept(user_idx, self.user_cold)
        elif user_rows is not None:
            feats = self.user_fields.encode_rows(user_rows, self.tables)
            keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
        else:
            return None
        if not has_ids:
            return feats if self.user_combine is None else self.user_combine(
                torch.cat([torch.zeros_like(feats), feats], -1))
        ids = (self.tables.lookup("user", user_idx) if user_idx is not None
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


def upgrade_state_dict(weights: dict[str, torch.Tensor], config: ModelConfig
                       ) -> dict[str, torch.Tensor]:
    """Weights saved before the tables moved into EmbeddingTables, under today's names
    (item_embedding.weight -> tables.item, the (I,) item_bias -> tables.item_bias (I, 1), a
    feature field's nn.Embedding -> tables.<side>_field<k>, its Linear -> <side>_fields.dense.k);
    today's weights unchanged."""
    if "tables.item" in weights or "item_embedding.weight" not in weights:
        return weights
    out = {}
    for name, t in weights.items():
        if name == "item_embedding.weight":
            name = "tables.item"
        elif name == "user_embedding.weight":
            name = "tables.user"
        elif name == "item_bias":
            name, t = "tables.item_bias", t[:, None]
        elif ".encoders." in name:
            side, rest = name.split("_fields.encoders.", 1)
            k, param = rest.split(".", 1)
            spec = (config.item_features if side == "item" else config.user_features)["spec"]
            ftype = spec["fields"][int(k)]["type"]
            name = (f"tables.{side}_field{k}" if ftype in ("categorical", "multi_hot")
                    else f"{side}_fields.dense.{k}.{param}")
        out[name] = t
    return out
