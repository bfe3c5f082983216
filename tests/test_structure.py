"""The package's shape: imports between its modules point one way, and modules stay small.

Every import of a package module counts, at module level or inside a function; only
imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "langgraph_scoped_conn"
NAME = "langgraph_scoped_conn"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports when it runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(NAME))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(NAME):
            found.add(node.module)
            for alias in node.names:  # `from pkg import module`
                if f"{node.module}.{alias.name}" in modules:
                    found.add(f"{node.module}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: runtime_imports(path, modules) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the modules (ignoring edges into the package root), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep == NAME:
                continue  # `from langgraph_scoped_conn import x` re-exports: checked below
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = walk(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_the_package_modules() -> None:
    graph = import_graph()
    assert len(graph) > 15  # the walk really found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_package_root_and_the_demo_import_the_package_root() -> None:
    """Inner modules import the module they need, never the root (which imports them)."""
    graph = import_graph()
    offenders = [
        m for m, deps in graph.items() if NAME in deps and not m.startswith(f"{NAME}.demo")
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("execution", "registry"),
        ("execution", "engine"),
        ("pool", "engine"),
        ("registry", "manager"),
        ("manager", "current"),
        ("current", "scope"),
        ("manager", "sql_database"),
        ("schema_cache", "sql_database"),
        ("langchain_sql_database", "manager"),
        ("current", "handler"),
        ("checkout", "execution"),
        ("session", "engine"),
        ("compat", "pool"),
        ("results", "sql_database"),
        ("pools", "manager"),
        ("manager", "configure"),
        ("redaction", "settings"),
        ("urls", "engine"),
        # the checkpointer's and store's pools and the create_agent middleware sit on top:
        # the core never imports them, so their extras stay optional
        ("manager", "checkpoint"),
        ("engine", "checkpoint_pool"),
        ("checkpoint_pool", "checkpoint"),
        ("manager", "middleware"),
        ("handler", "middleware"),
    ],
)
def test_layers_point_down(lower: str, upper: str) -> None:
    graph = import_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        if start == goal:
            return True
        seen.add(start)
        return any(reaches(d, goal, seen) for d in graph[start] if d not in seen)

    assert not reaches(f"{NAME}.{lower}", f"{NAME}.{upper}", set()), f"{lower} imports {upper}"


def test_no_module_is_over_600_lines() -> None:
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 600} == {}


#: Module-level mutable state the package keeps on purpose, none of it per manager.
PROCESS_STATE = {
    # renderings of URLs whose driver parse_url chose: a bounded, process-wide memo
    "langgraph_scoped_conn.urls._IMPLICIT_DRIVER",
}
_MUTABLE_CALLS = {
    "dict",
    "set",
    "list",
    "defaultdict",
    "OrderedDict",
    "WeakSet",
    "WeakKeyDictionary",
    "WeakValueDictionary",
}


def module_state(path: Path, name: str | None = None) -> set[str]:
    """Names bound at module level to a mutable container (constants in CAPS excepted)."""
    name = name or module_name(path)
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        call = value.func if isinstance(value, ast.Call) else None
        called = getattr(call, "attr", None) or getattr(call, "id", None)
        mutable = isinstance(value, ast.Dict | ast.Set | ast.List | ast.ListComp | ast.DictComp)
        if not mutable and called not in _MUTABLE_CALLS:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id != "__all__":
                if target.id.lstrip("_").isupper() and target.id not in ("_IMPLICIT_DRIVER",):
                    continue  # a constant table, never written
                found.add(f"{name}.{target.id}")
    return found


def test_no_module_level_state_holds_per_manager_data() -> None:
    """Per-manager state lives on the manager: no module keeps a map of managers' data."""
    state = set().union(*(module_state(p) for p in PACKAGE.rglob("*.py")))
    assert state == PROCESS_STATE


def test_the_state_finder_finds_state(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import weakref\n_caches = weakref.WeakKeyDictionary()\nX = {}\n")
    assert module_state(probe, "probe") == {"probe._caches"}


def test_a_checkout_records_no_frame_and_no_node() -> None:
    """Which node and tool took a connection is worked out for a leak report only."""
    from langgraph_scoped_conn.checkout import Checkout

    assert not {"frame", "node", "stack_frame"} & set(Checkout.__slots__)
