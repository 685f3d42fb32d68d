"""The package's import graph: no cycles, no upward imports, the core never imports the tools, few duplicates.

Every module of ``elas_megatron`` is parsed with ``ast`` (nothing is imported); an import anywhere in a module --
inside functions too -- is an edge, except under ``if TYPE_CHECKING:`` (annotations only, never run). ``from pkg import name`` counts as an import of ``pkg.name`` when that is a
module, else of ``pkg``.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "elas_megatron"

LAYERS = ["utils", "compat", "sparsity", "kernels", "layers", "variants", "config", "models", "parallel", "data",
          "training", "prep", "bench", "export", "cli"]
"""The sub-packages, lowest first: a module may import its own layer and the layers before it, never one after.

``utils`` .. ``training`` are the library (the core). ``variants`` sit on the layers they assemble; ``config``
sits on the variants because it composes every component's settings and checks each with the rules of the
component that owns it (a variant's rules for ``model.*``). ``prep`` (data preparation, ``elas-prep``), ``bench``
(benchmarks; it builds its corpus with ``prep``), ``export`` and ``cli`` (the entry points, and the config table
they render) are tools on top of it.
"""
CORE = LAYERS[:LAYERS.index("training") + 1]
TOOLS = LAYERS[len(CORE):]
MAX_DUPLICATE_PLACES = 3


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else None


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        targets = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
                # "from pkg import module" imports the module; "from pkg import name" the package
                names = [n for n in names[:-1] if n in mods] or [base]
            else:
                continue
            for name in names:
                if name == "elas_megatron" or name.startswith("elas_megatron."):
                    target = _resolve(name, mods)
                    if target is not None and target != mod:
                        targets.add(target)
        graph[mod] = targets
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(LAYERS), "add the new sub-package to LAYERS (and say why it sits there)"


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_no_upward_imports():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
              if _layer(a) and _layer(b) and LAYERS.index(_layer(b)) > LAYERS.index(_layer(a))]
    assert upward == []


def test_core_never_imports_tools():
    leaks = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
             if _layer(a) in CORE and _layer(b) in TOOLS]
    assert leaks == []


def test_graph_sees_imports_inside_functions():
    graph = import_graph()
    # cli.train imports the trainer inside main(); the trainer imports the sparsity schedule inside __init__
    assert "elas_megatron.training.trainer" in graph["elas_megatron.cli.train"]
    assert "elas_megatron.sparsity.schedule" in graph["elas_megatron.training.trainer"]
    # layers.specs names ModelConfig and Variant in annotations only (under TYPE_CHECKING): no edge
    assert "elas_megatron.config.schema" not in graph["elas_megatron.layers.specs"]


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the duplicates command is not installed")
def test_few_duplicated_places():
    out = subprocess.run(["duplicates", "--repo", str(PACKAGE), "--most", "50", "--seconds", "60"],
                         capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith("D")]
    assert not any(line.startswith("incomplete:") for line in out.splitlines()), out
    assert len(rows) <= MAX_DUPLICATE_PLACES, out
