"""The hand-written stub python/target_sft/_core.pyi matches the native module."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import target_sft._core as core

STUB = Path(__file__).resolve().parents[2] / "python" / "target_sft" / "_core.pyi"


def stub_api() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    api: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            api[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            api[""].add(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            api[""].add(node.name)
    return api


def test_stub_lists_exactly_the_module_api():
    api = stub_api()
    runtime_classes = {n for n, v in vars(core).items() if inspect.isclass(v)}
    assert runtime_classes == set(api) - {""}
    assert api[""] <= set(vars(core))
    runtime_functions = {
        n
        for n, v in vars(core).items()
        if callable(v) and not inspect.isclass(v) and not n.startswith("_")
    }
    assert runtime_functions == {n for n in api[""] if callable(getattr(core, n))}
    for cls in runtime_classes:
        runtime = {
            n
            for n in vars(getattr(core, cls))
            if not n.startswith("_") or n in ("__init__", "__len__", "__contains__")
        }
        runtime |= {"__init__"}
        assert api[cls] == runtime, cls
