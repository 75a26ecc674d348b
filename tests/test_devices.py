"""Device placement, checked without a GPU: the training objective runs with the model on
PyTorch's `meta` device, where any CPU tensor mixed into a model-side operation raises, as a
CUDA tensor would on a GPU. (What follows the data back to the CPU is decided in
batch_loss: ids, histories, shuffles and sampling stay on the CPU so a seed draws the same
batches on any device.)"""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_data_dir

from recsys_ccl.config import TrainConfig
from recsys_ccl.data.dataset import load_data_dir, train_histories
from recsys_ccl.model import TwoTower
from recsys_ccl.objective import batch_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data_dir(synthetic_data_dir(tmp_path_factory.mktemp("devices"), 80, 60, 2_000,
                                            seed=4))


@pytest.mark.parametrize("overrides", [
    {"ssl_weight": 0.2},
    {"extra_negatives": 16, "negative_sampling": "popularity"},
    {"symmetric": True, "learn_temperature": True},
    {"loss": "bpr"},
    {"loss": "ccl", "embedding_dropout": 0.1},
])
def test_batch_objective_stays_on_the_model_device(data, overrides):
    cfg = TrainConfig(dim=16, history_len=8, loss_impl="naive", **overrides)
    model = TwoTower(cfg.model_config(data.num_users, data.num_items)).to("meta")
    histories = train_histories(data, cfg.history_len)
    users, items = (t[:32] for t in data.splits["train"])
    loss = batch_loss(model, cfg, data, histories, users, items,
                      torch.Generator().manual_seed(0))
    assert loss.device.type == "meta" and loss.shape == ()
