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
