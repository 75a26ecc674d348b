"""Feature towers: per-field encoders in both towers, cold items and users on the feature path
only, id dropout, the cold item's bias from its features, and a model with features trained,
saved and loaded through the real pipeline (synth with features -> prepare -> train)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from recsys_ccl.checkpoint import load_run
from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import load_data_dir
from recsys_ccl.data.prepare import PrepareConfig, prepare
from recsys_ccl.data.synth import SynthConfig, write_synth
from recsys_ccl.model import TwoTower, numeric_bin, quantile_edges
from recsys_ccl.train import new_model, train


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    write_synth(SynthConfig(users=300, items=150, interactions=6000, clusters=6, seed=3),
                root / "log.parquet", root / "items.parquet", root / "users.csv")
    prepare(PrepareConfig(input=str(root / "log.parquet"), format="parquet",
                          item_features=str(root / "items.parquet"),
                          user_features=str(root / "users.csv"), cold_items=0.1,
                          cold_users=0.05, seed=1), root / "data")
    return load_data_dir(root / "data")


def _model(data, **overrides) -> TwoTower:
    return new_model(TrainConfig(dim=16, history_len=5, **overrides), data).eval()


def test_data_has_cold_items_and_users(feature_data):
    cold_items, cold_users = feature_data.cold_masks()
    assert cold_items.sum() >= 15 and cold_users.sum() >= 15
    assert set(feature_data.features) == {"item", "user"}
    names = feature_data.features["item"][0].names
    assert names == ("category", "tags", "price", "embedding")


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_cold_items_and_users_use_the_feature_path_only(feature_data, combine):
    model = _model(feature_data, feature_combine=combine)
    cold_items, cold_users = feature_data.cold_masks()
    items = torch.arange(feature_data.num_items)
    users = torch.arange(feature_data.num_users)
    hist = torch.full((feature_data.num_users, 5), -1)
    before_i, before_u = model.encode_items(items), model.encode_users(users, hist)
    with torch.no_grad():
        model.tables.weight("item").add_(torch.randn_like(model.tables.weight("item")))
        model.tables.weight("user").add_(torch.randn_like(model.tables.weight("user")))
    after_i, after_u = model.encode_items(items), model.encode_users(users, hist)
    assert torch.equal(before_i[cold_items], after_i[cold_items])
    assert not torch.isclose(before_i[~cold_items], after_i[~cold_items]).all(1).any()
    assert torch.equal(before_u[cold_users], after_u[cold_users])
    assert not torch.isclose(before_u[~cold_users], after_u[~cold_users]).all(1).any()


def test_a_new_user_from_feature_rows_equals_a_cold_user(feature_data):
    """Serving path: a user the catalogue lacks, given by encoded feature rows, is embedded
    exactly as a cold catalogue user with the same features."""
    model = _model(feature_data)
    _, cold_users = feature_data.cold_masks()
    u = int(torch.nonzero(cold_users)[0])
    rows = {k: v[u:u + 1] for k, v in feature_data.feature_rows("user").items()}
    hist = torch.tensor([[3, 7, -1, -1, -1]])
    by_idx = model.encode_users(torch.tensor([u]), hist)
    by_rows = model.encode_users(None, hist, user_rows=rows)
    torch.testing.assert_close(by_rows, by_idx, rtol=0, atol=0)


def test_id_dropout_applies_in_training_only(feature_data):
    model = _model(feature_data, id_dropout=0.5)
    items = torch.arange(feature_data.num_items)
    warm = ~feature_data.cold_masks()[0]
    model.eval()
    assert torch.equal(model.encode_items(items), model.encode_items(items))
    model.train()
    torch.manual_seed(0)
    a = model.encode_items(items)
    b = model.encode_items(items)
    differs = ~torch.isclose(a, b).all(1)
    assert 0.2 < differs[warm].float().mean() < 0.8  # about 2 p (1 - p) of warm rows
    assert not differs[~warm].any()


def test_feature_dropout_leaves_whole_fields_out_in_training_only(feature_data):
    model = _model(feature_data, feature_dropout=0.4, numeric_bins=0)  # parts: see below
    enc = model.item_fields
    items = torch.arange(feature_data.num_items)
    model.eval()
    full = enc(items, model.tables)
    assert torch.equal(full, enc(items, model.tables))
    # each field's own part, to tell which ones a training row kept
    rows = {f.name: getattr(enc, f"rows_{k}")[items] for k, f in enumerate(enc.spec.fields)}
    parts = [_field_part(enc, model.tables, rows, k) for k in range(len(enc.spec.fields))]
    torch.testing.assert_close(sum(parts), full)
    model.train()
    torch.manual_seed(0)
    dropped = enc(items, model.tables)
    # every training row is the sum of a subset of its fields' parts
    best = None
    for mask in range(1 << len(parts)):
        candidate = sum((parts[k] for k in range(len(parts)) if mask >> k & 1),
                        torch.zeros_like(full))
        hit = torch.isclose(dropped, candidate, atol=1e-6).all(1)
        best = hit if best is None else best | hit
        if mask == (1 << len(parts)) - 1:
            kept_all = hit
    assert best.all()
    assert 0.05 < kept_all.float().mean() < 0.3  # 0.6^4 = 0.13 of rows keep all four fields


def _field_part(enc, tables, rows: dict, k: int) -> torch.Tensor:
    """Field k's part of FieldEncoders' sum, computed apart (eval mode)."""
    f = enc.spec.fields[k]
    x = rows[f.name]
    if f.type == "categorical":
        return tables.lookup(enc.table_names[k], x)
    if f.type == "multi_hot":
        present = (x != f.cardinality).to(torch.float32)
        weights = present / present.sum(1, keepdim=True).clamp_min(1)
        return tables.pool(enc.table_names[k], x, weights)
    return enc.dense[str(k)](x)


@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200),
       missing=st.lists(st.booleans(), min_size=200, max_size=200),
       bins=st.integers(2, 12))
def test_numeric_bins_are_equally_filled_and_missing_takes_the_zero_row(values, missing, bins):
    n = len(values)
    column = torch.tensor([[v, float(m)] for v, m in zip(values, missing[:n], strict=True)])
    edges = quantile_edges(column, bins)
    b = numeric_bin(column, edges)
    present = column[:, 1] == 0
    assert torch.equal(b[~present], torch.full_like(b[~present], bins))
    assert ((b[present] >= 0) & (b[present] < bins)).all()
    # ordered: a larger value never falls in a lower bin
    order = torch.argsort(column[present, 0])
    assert (torch.diff(b[present][order]) >= 0).all()
    # equally filled up to ties: no bin holds more than its share plus the largest tie group
    if present.any():
        counts = torch.bincount(b[present], minlength=bins)
        ties = torch.unique(column[present, 0], return_counts=True)[1].max()
        assert counts.max() <= -(-int(present.sum()) // bins) + int(ties)


def test_numeric_bin_edges_of_a_column_over_torch_quantiles_limit():
    n = (1 << 24) + 1001  # torch.quantile refuses more than 2^24 values
    g = torch.Generator().manual_seed(3)
    column = torch.stack([torch.rand(n, generator=g), torch.zeros(n)], 1)
    edges = quantile_edges(column, 4)
    torch.testing.assert_close(edges, torch.tensor([0.25, 0.5, 0.75]), atol=2e-3, rtol=0)


def test_numeric_bins_give_a_numeric_field_a_row_per_bin(feature_data):
    model = _model(feature_data, numeric_bins=4)
    enc = model.item_fields
    k = next(k for k, f in enumerate(enc.spec.fields) if f.type == "numeric")
    name = enc.spec.fields[k].name
    catalogue = getattr(enc, f"rows_{k}")
    edges = getattr(enc, f"edges_{k}")
    assert torch.equal(edges, quantile_edges(catalogue, 4))  # fixed when the catalogue loaded
    with torch.no_grad():
        table = model.tables.weight(enc.table_names[k])
        table[:4].normal_()
    linear = enc.dense[str(k)]
    rows = {f.name: getattr(enc, f"rows_{j}")[:3] for j, f in enumerate(enc.spec.fields)}
    base = enc.encode_rows(rows, model.tables)
    # the numeric field's part: its linear map plus its bin's row; a missing value adds none
    for value, missing, expected_bin in ((float(edges[0]) - 1.0, 0.0, 0),
                                         (float(edges[-1]) + 1.0, 0.0, 3), (0.0, 1.0, None)):
        changed = dict(rows, **{name: torch.tensor([[value, missing]] * 3)})
        got = enc.encode_rows(changed, model.tables) - base
        part = linear(changed[name]) - linear(rows[name])
        if expected_bin is not None:
            part = part + table[expected_bin]
        part = part - table[numeric_bin(rows[name], edges)]
        torch.testing.assert_close(got, part)


def test_id_dropout_spares_the_items_a_user_tower_reads(feature_data):
    """Ids are dropped from candidate items only: a history pooled in training equals the
    same history pooled in evaluation (an evaluated user's history holds warm items with
    their ids; dropping them in training would only add noise the user tower never meets)."""
    model = _model(feature_data, id_dropout=0.9)
    warm = torch.nonzero(~feature_data.cold_masks()[0]).flatten()
    g = torch.Generator().manual_seed(1)
    history = warm[torch.randint(len(warm), (40, 5), generator=g)]
    valid = torch.rand(40, 5, generator=g) < 0.8
    model.eval()
    expected = model._pool_history(history, valid)
    model.train()
    torch.manual_seed(0)
    torch.testing.assert_close(model._pool_history(history, valid), expected)
    # while the candidates' ids are dropped
    items = warm[:40]
    assert not torch.allclose(model.encode_items(items), model.eval().encode_items(items))


def test_cold_item_bias_comes_from_its_features(feature_data):
    model = _model(feature_data, loss="infonce")  # item_bias "auto": on
    cold = feature_data.cold_masks()[0]
    items = torch.arange(feature_data.num_items)
    with torch.no_grad():
        model.tables.weight("item_bias").fill_(5.0)
        model.item_bias_head.weight.normal_()
        from_features = model.item_bias_head(model.item_fields(items, model.tables)).squeeze(-1)
        last = model.encode_items(items)[:, -1] / model.temperature
    assert from_features.std() > 0  # the head reads the features: items differ
    torch.testing.assert_close(last[cold], from_features[cold])
    torch.testing.assert_close(last[~cold], 5.0 + from_features[~cold])


def test_feature_model_trains_saves_and_loads(feature_data, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=256, dim=16, history_len=5, id_dropout=0.2,
                      eval_split="valid", patience=0, lr=1e-2)
    train(feature_data.path, tmp_path / "run", cfg, progress=False)
    model, _ = load_run(tmp_path / "run")
    assert model.config.item_features is not None and model.config.user_features is not None
    ref = _model(feature_data)
    # the catalogue's encoded rows and cold masks travel with the weights
    for k in range(len(ref.item_fields.spec.fields)):
        assert torch.equal(getattr(model.item_fields, f"rows_{k}"),
                           getattr(ref.item_fields, f"rows_{k}"))
    assert torch.equal(model.item_cold, ref.item_cold)
    model.eval()
    items = torch.arange(feature_data.num_items)
    v = model.encode_items(items)
    assert torch.isfinite(v).all()
    # training moved the cold items' vectors: their features' encoders learnt
    assert not torch.allclose(v[ref.item_cold], ref.encode_items(items)[ref.item_cold])


def test_features_none_trains_the_id_only_model(feature_data, tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=256, dim=16, history_len=5, features="none",
                      eval_split="none", patience=0)
    train(feature_data.path, tmp_path / "run", cfg, progress=False)
    model, _ = load_run(tmp_path / "run")
    assert model.item_fields is None and model.user_fields is None
    assert not any("rows_" in k or "cold" in k for k in model.state_dict())


def test_evaluate_reports_warm_and_cold_rows_apart(feature_data, tmp_path):
    from recsys_ccl.evaluation import evaluate_run

    cfg = TrainConfig(epochs=2, batch_size=256, dim=16, history_len=5, id_dropout=0.3,
                      eval_split="none", patience=0, lr=1e-2)
    train(feature_data.path, tmp_path / "run", cfg, progress=False)
    out = evaluate_run(tmp_path / "run", feature_data.path)
    seg = out["segments"]
    assert set(seg) == {"warm_items", "cold_items", "cold_users", "cold_among_cold"}
    cold_items, cold_users = feature_data.cold_masks()
    users, items = feature_data.splits["test"]
    assert seg["cold_items"]["users"] == len(torch.unique(users[cold_items[items]]))
    assert seg["warm_items"]["users"] == len(torch.unique(users[~cold_items[items]]))
    assert seg["cold_users"]["users"] == len(torch.unique(users[cold_users[users]]))
    # popularity never ranks an item it has no count for above one it has: no cold hit
    assert seg["cold_items"]["popularity"]["recall@20"] == 0.0
    assert seg["cold_items"]["recall@20"] > 0.0
    # the same rows with fewer items competing
    assert seg["cold_among_cold"]["users"] == seg["cold_items"]["users"]
    assert seg["cold_among_cold"]["recall@20"] > seg["cold_items"]["recall@20"]
    assert "popularity" not in seg["cold_among_cold"]


def test_evaluate_model_ranks_only_the_items_asked(feature_data, tmp_path):
    """rank_only: the cold-start protocol that ranks the cold items among themselves equals
    the full ranking of vectors where every other item scores -inf."""
    from recsys_ccl.data.dataset import histories_before
    from recsys_ccl.evaluation import evaluate_embeddings, evaluate_model

    model = _model(feature_data, id_dropout=0.3)
    cold = feature_data.cold_masks()[0]
    hist = histories_before(feature_data, "test", 5)
    users = torch.arange(feature_data.num_users)
    with torch.no_grad():
        u = model.encode_users(users, hist[users])
        v = model.encode_all_items()
    only = evaluate_model(model, feature_data, hist, "test", 10, item_mask=cold, rank_only=cold)
    every = evaluate_model(model, feature_data, hist, "test", 10, item_mask=cold)
    far = v.clone()
    far[~cold] = 0.0
    ref = evaluate_embeddings(torch.cat([u, torch.ones(len(u), 1)], 1),
                              torch.cat([far, torch.where(cold, 0.0, -1e30)[:, None]], 1),
                              feature_data, "test", 10, item_mask=cold)
    assert only["recall@10"] == pytest.approx(ref["recall@10"])
    assert only["ndcg@10"] == pytest.approx(ref["ndcg@10"])
    assert only["recall@10"] > every["recall@10"]  # fewer items compete


def test_feature_model_resume_equals_uninterrupted(feature_data, tmp_path):
    """Resume with features (id dropout draws included): one epoch then resume to three gives
    the weights of three epochs straight."""
    from safetensors.torch import load_file

    fast = dict(batch_size=256, dim=16, history_len=5, id_dropout=0.3, eval_split="none",
                patience=0, lr=1e-2)
    train(feature_data.path, tmp_path / "full", TrainConfig(epochs=3, **fast), progress=False)
    # the first epoch of the three-epoch schedule, then resume
    train(feature_data.path, tmp_path / "part", TrainConfig(epochs=3, **fast), progress=False,
          stop_after=1)
    train(feature_data.path, tmp_path / "part", TrainConfig(epochs=3, **fast), resume=True,
          progress=False)
    a = load_file(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys() and any("item_fields" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
