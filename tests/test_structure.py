"""The code's shape: no import cycles, lower layers never import higher ones, config at the bottom.

Read from the source (every `import`, also inside functions), so a late import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "deployments")
LAYER = {"tasks": 0, "flows": 1, "deployments": 2}  # a module may import its own layer or lower ones


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, for every module of the three packages."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule; `from pkg import name`, on pkg.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in files and t != name}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_never_import_higher_ones():
    wrong = [f"{m} imports {t}" for m, deps in import_graph().items() for t in deps
             if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert wrong == []


def test_the_config_imports_no_task_module():
    graph = import_graph()  # its three modules import only each other, downwards
    assert graph["tasks.config"] == {"tasks.config_base", "tasks.config_eval"}
    assert graph["tasks.config_eval"] == {"tasks.config_base"} and graph["tasks.config_base"] == set()


def test_one_list_of_benchmark_names():
    from tasks.benchmarks import REGISTRY
    from tasks.config import BENCHMARKS

    assert tuple(REGISTRY) == BENCHMARKS
