"""The batch objective: a batch of (user, positive item) pairs -> the training loss.

Negatives are the batch's other positives plus optional extra items (uniform or by
popularity), with the logQ correction of each column's sampling probability; the loss is one
of contrastive_loss (InfoNCE), SimpleX's CCL, the margin loss or BPR, plus an optional
self-supervised contrast of two augmented views of each user's history.
"""

from __future__ import annotations

import torch

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import Histories, InteractionData
from recsys_ccl.losses import (
    bpr_loss,
    contrastive_loss,
    cosine_contrastive_loss,
    margin_contrastive_loss,
)
from recsys_ccl.model import TwoTower

__all__ = ["augment_history", "batch_loss", "sequence_batch_loss", "view_contrast_loss"]


def _column_log_q(data: InteractionData, items: torch.Tensor, batch: int, extra: int,
                  sampling: str) -> torch.Tensor:
    """log of each column's expected count among the batch's candidates: in-batch positives
    arrive in proportion to popularity (batch · p_j), extra negatives uniformly (extra / I) or
    by popularity (extra · p_j). Constant offsets cancel in the softmax."""
    p = data.item_log_q[items].exp()
    if extra == 0:
        return data.item_log_q[items]
    if sampling == "popularity":
        return torch.log((batch + extra) * p)
    return torch.log(batch * p + extra / data.num_items)


def _sample_negatives(data: InteractionData, n: int, sampling: str,
                      gen: torch.Generator) -> torch.Tensor:
    if sampling == "popularity":
        return torch.multinomial(data.item_count.float(), n, replacement=True, generator=gen)
    return torch.randint(0, data.num_items, (n,), generator=gen)


def augment_history(history: torch.Tensor, crop: float, mask_prob: float,
                    gen: torch.Generator) -> torch.Tensor:
    """One augmented view of left-padded histories (B, L) (-1 = padding): a random contiguous
    crop keeping ceil(crop · n) of each user's n items, then each kept item masked with
    probability mask_prob, never masking all of them. (Reordering, the third augmentation of
    sequence SSL, is a no-op for the mean pooling used here, so it is not applied.)"""
    B, L = history.shape
    valid = history >= 0
    n = valid.sum(1)  # (B,)
    keep = torch.ceil(n * crop).long().clamp(min=1)
    start = (torch.rand(B, generator=gen) * (n - keep + 1).clamp(min=1)).long()  # in [0, n-keep]
    pos = torch.arange(L)[None, :] - (L - n)[:, None]  # 0..n-1 over the valid tail
    in_crop = valid & (pos >= start[:, None]) & (pos < (start + keep)[:, None])
    masked = in_crop & (torch.rand(B, L, generator=gen) < mask_prob)
    # keep the crop's first item whenever the mask would empty the view
    first = in_crop & (pos == start[:, None])
    emptied = (in_crop & ~masked).sum(1) == 0
    kept = (in_crop & ~masked) | (first & emptied[:, None])
    return torch.where(kept, history, torch.full_like(history, -1))


def view_contrast_loss(model: TwoTower, cfg: TrainConfig, users: torch.Tensor,
                       hist: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SimCLR-style auxiliary loss: two augmented views of each user's history, embedded by
    the history branch alone, contrasted with the symmetric in-batch softmax (a user appearing
    twice in the batch is an accidental hit, masked).

    users, hist: on the CPU, where the views are drawn (the generator is a CPU one, so a seed
    gives the same views on any device); the views move to the model's device."""
    dev = model.device
    views = [augment_history(hist, cfg.ssl_crop, cfg.ssl_mask_prob, gen).to(dev)
             for _ in range(2)]
    v1, v2 = (model.encode_users(None, view) for view in views)
    return contrastive_loss(v1, v2, cfg.ssl_temperature, item_ids=users.to(dev),
                            symmetric=True, impl=cfg.loss_impl)


def _pair_loss(model: TwoTower, cfg: TrainConfig, u: torch.Tensor, v: torch.Tensor,
               log_q: torch.Tensor | None, ids: torch.Tensor | None) -> torch.Tensor:
    """The configured loss of queries u (Q, D) against columns v (N, D), column i < Q being
    query i's positive (the rest negatives shared by every query)."""
    if cfg.loss == "infonce":
        # global negatives under torchrun (a no-op in a single process)
        return contrastive_loss(u, v, model.temperature, log_q, ids, symmetric=cfg.symmetric,
                                impl=cfg.loss_impl, distributed=True)
    if cfg.loss == "ccl":
        return cosine_contrastive_loss(u, v, cfg.ccl_margin, cfg.ccl_negative_weight, ids)
    if cfg.loss == "margin":
        return margin_contrastive_loss(u, v, cfg.margin_positive, cfg.margin_negative, ids)
    return bpr_loss(u, v, ids)


def _columns(data: InteractionData, cfg: TrainConfig, positives: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's columns (its positives, then the extra negatives) and their logQ
    correction (None when not used); on the CPU."""
    cols = positives
    if cfg.extra_negatives > 0:
        cols = torch.cat([positives, _sample_negatives(data, cfg.extra_negatives,
                                                       cfg.negative_sampling, gen)])
    log_q = (cfg.logq_weight * _column_log_q(data, cols, len(positives), cfg.extra_negatives,
                                             cfg.negative_sampling)
             if cfg.loss == "infonce" and cfg.logq else None)
    return cols, log_q


def batch_loss(model: TwoTower, cfg: TrainConfig, data: InteractionData,
               histories: Histories | None, users: torch.Tensor, items: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    """The configured loss on one batch of (user, positive item) pairs (B,): the pooled user
    tower's objective.

    Ids, histories and sampling live on the CPU (so a run draws the same batches on any
    device); what the model computes with moves to the model's device."""
    B = len(users)
    dev = model.device
    cols, log_q = _columns(data, cfg, items, gen)
    hist_cpu = histories[users] if histories is not None else None
    hist = hist_cpu.to(dev) if hist_cpu is not None else None
    users_cpu = users
    users, items, cols = users.to(dev), items.to(dev), cols.to(dev)
    u = model.encode_users(users, hist, exclude_item=items if hist is not None else None)
    # each positive's own user is left out of its item's pooled neighbourhood
    not_own = torch.full((len(cols) - B,), -1, dtype=users.dtype, device=dev)
    v = model.encode_items(cols, exclude_user=torch.cat([users, not_own]))  # (N, D)
    loss = _pair_loss(model, cfg, u, v, log_q.to(dev) if log_q is not None else None,
                      cols if cfg.mask_hits else None)
    if cfg.ssl_weight > 0 and hist_cpu is not None:
        loss = loss + cfg.ssl_weight * view_contrast_loss(model, cfg, users_cpu, hist_cpu, gen)
    return loss


def sequence_batch_loss(model: TwoTower, cfg: TrainConfig, data: InteractionData,
                        sequences: Histories, users: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
    """The transformer tower's objective on a batch of users (b,): every position of each
    user's window (the most recent max_len + 1 training items, `sequences[users]`) predicts
    the item after it. All positions of the batch are the queries of one loss: their targets
    are the columns (logQ-corrected), then the extra negatives shared by the batch, accidental
    hits masked; padding positions are not queries at all."""
    dev = model.device
    window = sequences[users]  # (b, T + 1), oldest first, left-padded with -1
    used = torch.nonzero((window >= 0).any(0)).flatten()
    window = window[:, int(used[0]) if len(used) else 0:]  # no column of padding only
    inputs, targets = window[:, :-1], window[:, 1:]
    query = (inputs >= 0) & (targets >= 0)  # (b, T): positions with a next item
    cols, log_q = _columns(data, cfg, targets[query], gen)  # (Q + K,)
    out = model.encode_positions(inputs.to(dev))  # (b, T, D)
    u = out[query.to(dev)]  # (Q, D)
    cols = cols.to(dev)
    v = model.encode_items(cols)  # (Q + K, D)
    loss = _pair_loss(model, cfg, u, v, log_q.to(dev) if log_q is not None else None,
                      cols if cfg.mask_hits else None)
    if cfg.ssl_weight > 0:
        loss = loss + cfg.ssl_weight * view_contrast_loss(model, cfg, users, inputs, gen)
    return loss
