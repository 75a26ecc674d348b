"""Every user mistake on the command line is one line on stderr and a non-zero exit: never a
traceback, and for a bad training config, nothing written."""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import pytest
from conftest import synthetic_data_dir
from hypothesis import HealthCheck, given, settings

from recsys_ccl import __version__
from recsys_ccl.cli import main
from recsys_ccl.config import TrainConfig

KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
MALFORMED = st.one_of(
    st.sampled_from(["abc", "2.5", "-1", "0", "[1,", "[1, 0]", "{}", "nan", "inf", "-inf",
                     "1e400", '"x"', "true", "false", "", " ", "[]", "[\"a\"]", "1_0",
                     "0x10", "9" * 30, "-9223372036854775809", "auto", "ünï"]),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**20), 10**20).map(str),
)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=MALFORMED)
def test_any_set_value_is_a_one_line_error_or_accepted(key, value, capsys, tmp_path):
    """A missing DATA directory makes even a valid value end in an error, so every example is
    one line and a non-zero exit; a config error comes before anything is written."""
    out = tmp_path / "run"
    code, err = run_cli(["train", "--data", str(tmp_path / "no-data"), "--out", str(out),
                         "--set", f"{key}={value}"], capsys)
    assert_one_line_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize(("setting", "words"), [
    ("dim=abc", "dim='abc' is not an integer"),
    ("epochs=2.5", "epochs=2.5 is not an integer"),
    ("lr=-1", "lr=-1.0 is out of range (expected > 0)"),
    ("loss=infoNCE", "loss='infoNCE' is not one of 'infonce', 'ccl', 'margin', 'bpr'"),
    ("embedding_dropout=1", "embedding_dropout=1.0 is out of range (expected in [0, 1))"),
    ("mlp_hidden=[64, 0]", "mlp_hidden=(64, 0) is out of range"),
    ("item_bias=1", "item_bias=1 is not true or false"),
    ("no_such_key=1", "unknown key 'no_such_key'; known keys: autocast, batch_size"),
    ("epoch=3", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("temperature=2", "temperature=2.0 is out of range (expected in [temperature_min, "
                      "temperature_max] = [0.01, 1])"),
    ("user_id_embedding=false;history_len=0", "user_id_embedding=False is out of range "
                                              "(expected true unless history_len > 0"),
    ("history_len=0;ssl_weight=0.5", "ssl_weight=0.5 is out of range (expected >= 0, and 0 "
                                     "with history_len = 0"),
])
def test_bad_config_names_key_value_and_expectation_before_writing(setting, words, capsys,
                                                                   tmp_path, data_dir):
    out = tmp_path / "run"
    sets = [a for s in setting.split(";") for a in ("--set", s)]
    code, err = run_cli(["train", "--data", str(data_dir), "--out", str(out), *sets], capsys)
    assert_one_line_error(code, err)
    assert words in err
    assert not out.exists()


def test_toml_config_values_are_checked_too(tmp_path, capsys, data_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\ndim = 32\n[optim]\nepochs = 2.5\n")
    code, err = run_cli(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                         "--config", str(cfg)], capsys)
    assert_one_line_error(code, err)
    assert "epochs=2.5 is not an integer" in err


COMMANDS = [
    ["synth", "--out", "{tmp}/s.parquet", "--interactions", "50", "--users", "{v}"],
    ["synth", "--out", "{tmp}/s.parquet", "--interactions", "{v}", "--users", "0"],
    ["prepare", "--input", "{tmp}/missing.csv", "--format", "csv", "--out", "{tmp}/d",
     "--k-core", "{v}"],
    ["prepare", "--input", "{tmp}/missing.csv", "--format", "{v}", "--out", "{tmp}/d"],
    ["prepare", "--input", "{tmp}/missing.csv", "--format", "csv", "--out", "{tmp}/d",
     "--test-ratio", "{v}"],
    ["evaluate", "--run", "{tmp}/r", "--data", "{tmp}/d", "--k", "{v}"],
    ["export", "--run", "{tmp}/r", "--data", "{v}", "--out", "{tmp}/b"],
    ["serve", "--bundle", "{tmp}/b", "--port", "{v}"],
    ["train", "--data", "{tmp}/d", "--out", "{tmp}/r", "--epochs", "{v}"],
]


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(COMMANDS), value=MALFORMED)
def test_malformed_arguments_of_every_command(template, value, capsys, tmp_path):
    """A value that happens to be valid may succeed; anything else is one line."""
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{v}", value) for a in template]
    code, err = run_cli(argv, capsys)
    if code != 0 or err:
        assert_one_line_error(code, err)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"recsys-ccl {__version__}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data_dir(tmp_path_factory.mktemp("cli-data"), 50, 40, 600, seed=1)


@pytest.mark.parametrize("host, words", [
    ("127.0.0.1", "the port is in use"),
    ("no-such-host.invalid", "the host does not resolve"),
])
def test_serve_start_up_failure_is_one_line_before_the_bundle_loads(host, words, bundles):
    """In a child process: gRPC's core writes its own error lines to file descriptor 2,
    which capsys cannot see."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "recsys_ccl.cli", "serve", "--bundle", str(bundles["a"]),
             "--host", host, "--port", str(port)],
            capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr)
    assert words in proc.stderr and f":{port}" in proc.stderr
    assert "bundle_loaded" not in proc.stderr + proc.stdout
