"""The package's layering, read from its source (docs: README "Where each concept lives").

* no import circle between modules of ``target_sft`` (imports inside functions count too: a lazy
  import still ties two rooms together; ``if TYPE_CHECKING:`` blocks do not);
* ``target_sft.kernels`` is a leaf: it imports nothing else of the package;
* no module imports a private name (``_x``) defined in another area (an area is a top-level
  module or subpackage of ``target_sft``); the native module ``_core`` is the one exception;
* the runtime package never imports ``target_sft.testing``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "python" / "target_sft"

#: private modules any area may import: the native module (its stub is checked in tests/bindings)
#: and the batch path's shared-memory slots (imported by the collator only)
ALLOWED_PRIVATE = {"target_sft._core", "target_sft._shm"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of the package."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("target_sft"):
                        out.append((a.name, None, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base if is_pkg else base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    src = ".".join(base + ([child.module] if child.module else []))
                else:
                    src = child.module or ""
                if not src.startswith("target_sft"):
                    continue
                for a in child.names:
                    sub = f"{src}.{a.name}"
                    if sub in known:  # `from target_sft import losses`: a module
                        out.append((sub, None, child.lineno))
                    else:
                        out.append((src, a.name, child.lineno))
            visit(child)

    visit(tree)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str | None, int]]]]:
    mods = _modules()
    known = set(mods)
    imports = {m: _imports(m, p, known) for m, p in mods.items()}
    graph = {
        m: {src for src, _, _ in imps if src in known and src != m} for m, imps in imports.items()
    }
    return graph, imports


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            # a package's face hands on names of its own submodules: package -> own child is not
            # a tie back up (the child importing its package's __init__ would be)
            if n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state:
                found = dfs(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle() -> None:
    graph, _ = _graph()
    # the top-level face (target_sft/__init__) lazily hands on every area's public names; an area
    # importing `from target_sft import _core` goes through it, so leave the face out
    graph = {m: {n for n in deps if n != "target_sft"} for m, deps in graph.items()}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def test_kernels_is_a_leaf() -> None:
    _, imports = _graph()
    bad = [
        f"{m}:{line} imports {src}{'' if name is None else '.' + name}"
        for m, imps in imports.items()
        if _area(m) == "kernels"
        for src, name, line in imps
        if _area(src) != "kernels"
    ]
    assert bad == []


def test_no_module_imports_a_private_name_of_another_area() -> None:
    _, imports = _graph()
    bad = []
    for m, imps in imports.items():
        for src, name, line in imps:
            full = src if name is None else f"{src}.{name}"
            if full in ALLOWED_PRIVATE or _area(src) == _area(m):
                continue
            private_name = name is not None and name.startswith("_") and not name.endswith("__")
            private_module = any(p.startswith("_") and p != "__init__" for p in src.split(".")[1:])
            if private_name or private_module:
                bad.append(f"{m}:{line} imports {full}")
    assert bad == []


def test_the_runtime_package_never_imports_testing() -> None:
    _, imports = _graph()
    bad = [
        f"{m}:{line}"
        for m, imps in imports.items()
        if _area(m) not in ("testing", "synthetic")
        for src, _, line in imps
        if _area(src) == "testing"
    ]
    assert bad == []


def test_the_checks_see_the_package() -> None:
    """The reader above must find the modules and their imports (or every test passes vacuously)."""
    graph, imports = _graph()
    assert {"target_sft.losses.qtarget", "target_sft.kernels.reference", "target_sft.cache"} <= set(
        graph
    )
    assert "target_sft.kernels.reference" in graph["target_sft.losses.backend"]
    assert any(name == "check_int" for _, name, _ in imports["target_sft.cache"])
    # a circle and a private import planted in a copy of the graph are found
    planted = {**graph, "target_sft.kernels.reference": {"target_sft.losses.backend"}}
    assert _cycle(planted) is not None
