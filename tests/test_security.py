"""Nothing is unpickled or evaluated from disk or the network; the server binds loopback."""

from __future__ import annotations

import ast
from pathlib import Path

from recsys_ccl.cli import build_parser
from recsys_ccl.serving.server import RecommenderServer

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("recsys_ccl", "kernels", "benchmarks", "tests")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}


def _python_files():
    for top in SCANNED:
        yield from (REPO / top).rglob("*.py")


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if isinstance(f, ast.Name) and name in {"eval", "exec", "__import__"}:
            found.append(f"{name}()")
        if name == "load" and isinstance(f, ast.Attribute) and \
                getattr(f.value, "id", "") == "torch":
            safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                       for k in node.keywords)
            if not safe:
                found.append("torch.load without weights_only=True")
        if name == "load" and getattr(f, "value", None) is not None and \
                getattr(f.value, "id", "") in {"np", "numpy"} and any(
                    k.arg == "allow_pickle" and getattr(k.value, "value", None) is True
                    for k in node.keywords):
            found.append("np.load(allow_pickle=True)")
    return found


def test_no_pickle_eval_or_unsafe_torch_load_anywhere():
    offenders = {}
    for path in _python_files():
        found = _unsafe_calls(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert offenders == {}


def test_the_scanner_catches_what_it_looks_for():
    bad = ("import pickle\nx = eval('1')\ntorch.load('m.pt')\n"
           "np.load('a.npy', allow_pickle=True)\n")
    found = _unsafe_calls(ast.parse(bad))
    assert found == ["import pickle", "eval()", "torch.load without weights_only=True",
                     "np.load(allow_pickle=True)"]
    assert _unsafe_calls(ast.parse("torch.load('m.pt', weights_only=True)")) == []


def test_the_server_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--bundle", "b"])
    assert args.host == "127.0.0.1"
    assert RecommenderServer("b").host == "127.0.0.1"


# -- paths: the CLI writes only where it was told to --

def _snapshot(root: Path) -> dict[Path, int]:
    return {p: (p.stat().st_mtime_ns if p.is_file() else 0) for p in root.rglob("*")}


def test_cli_writes_only_inside_the_chosen_outputs(tmp_path, monkeypatch):
    """The whole pipeline through the CLI, on ids that look like paths: every new or changed
    path lies inside an --out the command was given, nothing lands in the working directory,
    no temporary is left beside an output."""
    import numpy as np
    import polars as pl

    from recsys_ccl.cli import main

    sandbox, cwd = tmp_path / "sandbox", tmp_path / "cwd"
    sandbox.mkdir()
    cwd.mkdir()
    (cwd / "mine.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    evil = ["../../escaped", "/tmp/abs", "a/b/c", "..", "\u202e.txt", "con", "x\\..\\y"]
    rng = np.random.default_rng(0)
    pl.DataFrame({
        "user_id": [evil[i % len(evil)] + str(i % 40) for i in range(4000)],
        "item_id": [evil[i % len(evil)] + str(j) for i, j in
                    enumerate(rng.integers(0, 60, 4000))],
        "timestamp": list(range(4000)),
    }).write_csv(sandbox / "log.csv")
    before_cwd = _snapshot(cwd)
    before_tmp = set((tmp_path.parent).iterdir())
    steps = [
        (["prepare", "--input", str(sandbox / "log.csv"), "--format", "csv", "--out",
          str(sandbox / "data")], sandbox / "data"),
        (["train", "--data", str(sandbox / "data"), "--out", str(sandbox / "run"),
          "--no-progress", "--set", "epochs=1", "--set", "dim=8", "--set", "batch_size=256"],
         sandbox / "run"),
        (["export", "--run", str(sandbox / "run"), "--data", str(sandbox / "data"), "--out",
          str(sandbox / "bundle")], sandbox / "bundle"),
        (["evaluate", "--run", str(sandbox / "run"), "--data", str(sandbox / "data")], None),
    ]
    for args, out in steps:
        before = _snapshot(sandbox)
        assert main(args) == 0, args
        after = _snapshot(sandbox)
        changed = {p for p in after if before.get(p) != after[p]} | (before.keys() - after.keys())
        outside = sorted(str(p) for p in changed if out is None or not p.is_relative_to(out))
        assert outside == [], f"{args[0]} wrote outside its --out: {outside}"
    assert _snapshot(cwd) == before_cwd, "nothing is written to the working directory"
    assert set(tmp_path.parent.iterdir()) == before_tmp
    ids = pl.read_parquet(sandbox / "data" / "users.parquet")["user_id"].to_list()
    assert any(i.startswith("../../escaped") for i in ids), "the path-like ids were kept as ids"


def test_overwrite_never_replaces_a_directory_that_is_not_ours(tmp_path, monkeypatch, capsys):
    from recsys_ccl.cli import main

    (tmp_path / "log.csv").write_text("user_id,item_id\n" + "".join(
        f"{u},{i}\n" for u in range(30) for i in range(u % 7, u % 7 + 6)))
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "projects" / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(home / "projects")
    monkeypatch.setenv("HOME", str(home))
    prepare = ["prepare", "--input", str(tmp_path / "log.csv"), "--format", "csv",
               "--split", "random", "--overwrite", "--out"]
    for out, why in [(".", "working directory"), ("..", "working directory"),
                     (str(home), "working directory"),
                     (str(home / "projects" / "thesis.tex"), "not a directory")]:
        assert main([*prepare, out]) == 2
        assert why in capsys.readouterr().err
    notes = home / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("x")
    assert main([*prepare, str(notes)]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert (notes / "todo.md").read_text() == "x"
    assert (home / "projects" / "thesis.tex").read_text() == "years of work"
    # an earlier output, or an empty directory, is replaced
    assert main([*prepare, str(home / "data")]) == 0
    assert main([*prepare, str(home / "data")]) == 0
    (home / "empty").mkdir()
    assert main([*prepare, str(home / "empty")]) == 0
    # the demo refuses a work directory it did not make
    assert main(["demo", "--workdir", str(notes), "--epochs", "1", "--no-progress"]) == 2
    assert "was not made by the demo" in capsys.readouterr().err
