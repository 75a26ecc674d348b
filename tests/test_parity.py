"""Online/offline parity: what a server answers, replayed through `evaluate --server`, scores
exactly what offline `evaluate` scores, for a bundle exported with the history before the
evaluated split."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
import torch
from conftest import synthetic_data_dir
from hypothesis import given, settings

from recsys_ccl.cli import main
from recsys_ccl.config import TrainConfig
from recsys_ccl.evaluation import evaluate_run, evaluate_server
from recsys_ccl.export import export_bundle
from recsys_ccl.index import top_k
from recsys_ccl.serving.server import RecommenderServer
from recsys_ccl.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    synthetic_data_dir(root, 400, 300, 12_000, seed=5, clusters=8, k_core=2)
    train(root / "data", root / "run", TrainConfig(epochs=2, batch_size=256, dim=16,
                                                   history_len=10, eval_split="none"),
          progress=False)
    return root, root / "run", root / "data"


@pytest.mark.parametrize(("split", "history"), [("test", "train,valid"), ("valid", "train")])
def test_served_metrics_equal_offline_evaluate(run_and_data, split, history):
    """A bundle holding what users had done before the split (the model's input offline: the
    validation item joins the history for the test) serves what offline evaluation scores."""
    root, run, data = run_and_data
    bundle = root / f"bundle-{history}"
    if not bundle.exists():
        export_bundle(run, data, bundle, history_splits=history)
    offline = evaluate_run(run, data, split, 20)
    with RecommenderServer(bundle, port=0) as srv:
        served = evaluate_server(srv.target, data, split, 20)
    assert served["users"] == offline["users"] > 0
    for key in ("recall@20", "ndcg@20", "hit@20", "mrr@20", "coverage@20"):
        assert served[key] == pytest.approx(offline[key], abs=1e-6), key


def test_a_bundle_with_every_split_marks_test_items_seen(run_and_data, capsys):
    """The default export (production) holds the test interactions in the users' histories,
    so a replay scores far lower: the reason --history-splits exists."""
    root, run, data = run_and_data
    bundle = root / "bundle-all"
    assert main(["export", "--run", str(run), "--data", str(data), "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["history_splits"] == ["train", "valid", "test"]
    offline = evaluate_run(run, data, "test", 20)
    with RecommenderServer(bundle, port=0) as srv:
        capsys.readouterr()
        assert main(["evaluate", "--server", srv.target, "--data", str(data), "--k",
                     "20"]) == 0
        served = json.loads(capsys.readouterr().out)
    assert served["recall@20"] == 0.0 < offline["recall@20"]


def test_history_splits_are_checked(run_and_data, capsys):
    root, run, data = run_and_data
    code = main(["export", "--run", str(run), "--data", str(data), "--out",
                 str(root / "b-bad"), "--history-splits", "train,tests"])
    assert code == 2
    assert "--history-splits takes a comma-separated subset of train,valid,test" in \
        capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.integers(-3, 3), min_size=1, max_size=30), min_size=1,
                     max_size=5).filter(lambda r: len({len(x) for x in r}) == 1),
       k=st.integers(1, 40))
def test_top_k_orders_ties_by_index(rows, k):
    """The one tie rule of the server and evaluate: score descending, then item index
    ascending, also at the cut-off (small integer scores tie often)."""
    scores = torch.tensor(rows, dtype=torch.float32)
    vals, idx = top_k(scores, k)
    for r, row in enumerate(rows):
        expected = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        assert idx[r].tolist() == expected
        assert vals[r].tolist() == [row[j] for j in expected]
