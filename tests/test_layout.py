"""The code's layout: imports flow one way, from the CLI at the top to `costs/` at the bottom.

Read from the source with the standard library's `ast`, function-local imports included, so a cycle cannot
hide inside a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tunegap"

# Lower layers never import higher ones. Within a layer, imports are allowed as long as there is no cycle.
LAYERS = [
    {"errors", "io", "costs", "stats"},
    {"config", "safety", "ledger", "runs", "checkpoint", "report", "literature", "precision", "compiling", "losses", "schedule", "generation"},
    {"data", "models", "methods", "evaluate", "forgetting", "predict"},
    {"objectives", "strategies", "callbacks", "outputs"},
    {"trainer", "estimate", "multipliers", "export"},
    {"experiments", "analysis", "compare", "decide"},
    {"cli", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every tunegap module `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tunegap")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tunegap"):
                continue
            submodules = {f"{target}.{a.name}" for a in node.names if is_package(target) and
                          ((PACKAGE.parent / Path(*target.split(".")) / f"{a.name}.py").is_file() or
                           is_package(f"{target}.{a.name}"))}
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module (or package) itself
                found.add(target)
    return {m for m in found if m != name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: not placed in any layer of tests/test_layout.py")


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
              if a != "tunegap" and layer_of(b) > layer_of(a)]
    assert not upward, "imports that flow upward:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    done, path, cycles = set(), [], []

    def visit(node):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["trainer", "objectives", "strategies", "callbacks"])
def test_trainer_strategies_and_objectives_keep_functions_short(module):
    """The seams stay readable: no function in them longer than about 60 lines."""
    root = PACKAGE / module
    files = [root.with_suffix(".py")] if root.with_suffix(".py").is_file() else list(root.rglob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno} lines)")
    assert not long, long
