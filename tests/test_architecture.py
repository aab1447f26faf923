"""The package's shape is a contract: layers (``.importlinter``), no import cycles, no private names shared.

``lint-imports`` checks the layers; the rest is read here from the source with ``ast``, counting every import
statement wherever it is (inside functions and ``TYPE_CHECKING`` blocks too), because an import hidden in a
function is still a dependency and still a cycle.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hubmerge"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def package_graph() -> dict[str, set[str]]:
    """hubmerge module -> the hubmerge modules it imports (``from pkg import submodule`` counts the submodule)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for target, names, _ in imports(path):
            if not target.startswith("hubmerge"):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            graph[name] |= set(hits) if hits and len(hits) == len(names) else ({target} if target in files else set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_counting_imports_inside_functions():
    graph = package_graph()
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_is_imported_from_another_module():
    """Shared code is public where it lives; ``from m import _x`` (package, tests, benchmarks) means it is not."""
    offenders = []
    for root in ("hubmerge", "tests", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            for target, names, line in imports(path):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
                if private:
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {target} {private}")
    assert offenders == []


def test_engines_import_neither_workflows_nor_the_cli_nor_each_other():
    engines = ("hubmerge.merging", "hubmerge.evaluation", "hubmerge.stability")
    bad = []
    for name, targets in package_graph().items():
        engine = next((e for e in engines if name == e or name.startswith(e + ".")), None)
        if engine is None:
            continue
        for t in targets:
            other = next((e for e in engines if t == e or t.startswith(e + ".")), engine)
            if other != engine or t.startswith(("hubmerge.workflows", "hubmerge.cli", "hubmerge.demo")):
                bad.append(f"{name} -> {t}")
    assert bad == []


def test_import_linter_contracts_are_kept():
    """The layers of ``.importlinter`` (import-linter comes with the dev extra, as .ci/run installs it)."""
    beside = Path(sys.executable).parent / "lint-imports"
    exe = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports not found: pip install -e '.[dev]'"
    res = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_the_facade_names_resolve_and_import_light():
    code = (
        "import sys, hubmerge\n"
        "assert 'torch' not in sys.modules and 'hubmerge.workflows.merge' not in sys.modules\n"
        "missing = [n for n in hubmerge.__all__ if not hasattr(hubmerge, n)]\n"
        "assert not missing, missing\n"
        "from hubmerge import merge_recipe, HubClient, ResultsStore\n"
        "assert merge_recipe.__module__ == 'hubmerge.workflows.merge'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
