"""The whole configuration space: any combination of training keys either trains (one step,
through the real command) or is refused in one line with nothing written. Every rule a
configuration must satisfy, those of the model included, is checked when it is built."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
from conftest import synthetic_data_dir
from hypothesis import HealthCheck, given, settings

from recsys_ccl.cli import main

# each key's plausible values and edge values (valid and invalid), as TOML text
SPACE: dict[str, list[str]] = {
    "dim": ["1", "2", "8", "15", "16"],
    "user_tower": ['"pool"', '"transformer"'],
    "user_id_embedding": ["true", "false", '"auto"'],
    "history_len": ["0", "1", "5"],
    "history_weight": ["0.0", "0.5", "1.0"],
    "item_history_len": ["0", "3"],
    "max_len": ["1", "4"],
    "layers": ["1", "2"],
    "heads": ["1", "2", "3"],
    "dropout": ["0.0", "0.3"],
    "mlp_hidden": ["[]", "[8]"],
    "normalize": ["true", "false"],
    "temperature": ["0.005", "0.05", "0.5", "2.0"],
    "temperature_min": ["0.01", "0.1"],
    "temperature_max": ["0.05", "1.0"],
    "learn_temperature": ["true", "false"],
    "embedding_dropout": ["0.0", "0.2"],
    "item_bias": ['"auto"', "true", "false"],
    "features": ['"auto"', '"none"'],
    "feature_combine": ['"sum"', '"concat"'],
    "id_dropout": ["0.0", "0.3"],
    "feature_dropout": ["0.0", "0.3", "1.0"],
    "numeric_bins": ["0", "1", "10"],
    "loss": ['"infonce"', '"ccl"', '"margin"', '"bpr"'],
    "logq": ["true", "false"],
    "symmetric": ["true", "false"],
    "extra_negatives": ["0", "7"],
    "negative_sampling": ['"uniform"', '"popularity"'],
    "ssl_weight": ["0.0", "0.1"],
    "optimizer": ['"adam"', '"adamw"'],
    "table_optimizer": ['"lazy_adam"', '"rowwise_adagrad"', '"dense"'],
    "autocast": ['"none"', '"bf16"'],
    "weight_decay": ["0.0", "0.01"],
    "lr_schedule": ['"constant"', '"cosine"'],
    "batch_size": ["2", "64"],
    "eval_split": ['"valid"', '"none"'],
    "eval_sample_users": ["0", "10"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data_dir(tmp_path_factory.mktemp("space"), 120, 80, 2_000, seed=8)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.fixed_dictionaries({}, optional={k: st.sampled_from(v)
                                                  for k, v in SPACE.items()}))
def test_every_combination_trains_one_step_or_fails_in_one_line(choice, data_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sets = [a for k, v in choice.items() for a in ("--set", f"{k}={v}")]
    capsys.readouterr()
    code = main(["train", "--data", str(data_dir), "--out", str(out), "--max-steps", "1",
                 "--no-progress", "--device", "cpu", *sets])
    captured = capsys.readouterr()
    if code == 0:
        summary = json.loads(captured.out.strip().splitlines()[-1])
        assert summary["steps"] == 1 and (out / "checkpoints" / "last").is_dir()
    else:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in captured.err, \
            (choice, captured.err)
        assert not out.exists(), (choice, "a refused configuration wrote", lines[0])
