"""The package's layers form a DAG, and the entry points are light.

The import graph is read from the source with ``ast`` (imports inside functions included, as they
run too): a cycle between packages (``gasungbi.train`` <-> ``gasungbi.post``) or between modules
fails the test, naming the cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gasungbi

ROOT = Path(gasungbi.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("gasungbi",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the gasungbi modules it imports (``from a import b`` counts b when b is a module)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("gasungbi"):
                    graph[mod].add(t)
    return graph


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "gasungbi"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        src = _package(mod)
        if src == "gasungbi":  # the package root only re-exports lazily
            continue
        out.setdefault(src, set()).update(_package(d) for d in deps if _package(d) not in (src, "gasungbi"))
    return out


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_packages_form_a_dag():
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_modules_form_a_dag():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module import cycle: " + " -> ".join(cycle)


def test_plan_needs_only_config_and_accounting():
    graph = import_graph()
    allowed = {"gasungbi.config", "gasungbi.presets", "gasungbi.errors", "gasungbi.model.accounting"}
    for mod, deps in graph.items():
        if _package(mod) == "plan":
            outside = {d for d in deps if _package(d) != "plan"} - allowed
            assert not outside, f"{mod} imports {sorted(outside)}"


def test_entry_points_import_no_torch():
    code = ("import sys, gasungbi, gasungbi.cli\n"
            "try:\n    gasungbi.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "speedrun" in out.stdout  # the command list is there


def test_lazy_names_still_import():
    assert gasungbi.load_model.__module__ == "gasungbi.interop.hf"
    assert gasungbi.ModelConfig.__name__ == "ModelConfig"
