"""The code's shape: imports run one way, and Redis key names live in one module.

Imports inside functions count as much as those at the top: a cycle hidden in
a function is a cycle all the same.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGES = ("orchestrator", "tasks")


def project_modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts): path
        for package in PACKAGES
        for path in sorted((REPO / package).glob("*.py"))
    }


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a module imports, anywhere in it (``__init__`` excluded: a
    submodule import runs it, but it imports nothing of the project at the top)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules and not name.endswith("__init__")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            if cycle := visit(imported, [*path, module]):
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_what_workers_import_never_imports_the_driver():
    for module, imported in import_graph().items():
        if module.startswith("tasks."):
            assert not [m for m in imported if m.startswith("orchestrator.")], module


def test_only_the_entry_point_imports_the_cli():
    importers = [m for m, imported in import_graph().items() if "orchestrator.cli" in imported]
    assert importers == ["orchestrator.__main__"]


# A string that starts a Redis key: RQ's ("rq:job:", "rq:queue:"...) or one of a namespace's
# (f"{ns}:meta", "...:p{P}:state").
KEY_PREFIX = re.compile(r"""["'](rq:[a-z_-]+:|\{[a-z_.]*namespace\}:)""")


def test_no_redis_key_prefix_outside_the_keys_module():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            if path.name == "keys.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if KEY_PREFIX.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_key_prefix_check_sees_a_key_literal():
    assert KEY_PREFIX.search('pipe.delete(f"rq:job:{job_id}")')
    assert KEY_PREFIX.search('r.hget(f"{keys.namespace}:meta", "committed")')
    assert not KEY_PREFIX.search('say(f"namespace {keys.namespace!r} reset")')
