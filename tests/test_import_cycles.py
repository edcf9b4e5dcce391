"""No import cycle anywhere in pipeline/ or gan/: counting the imports hidden inside functions,
which Python tolerates at run time but which tie modules that should layer (train <-> sweep
was one)."""

from tests.conftest import REPO_ROOT
from tests.imports import PACKAGES, imported, module_file


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                found.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other, [*path, other])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's submodule, not the package, where
    `from package import submodule` names one)."""
    graph = {}
    for name in modules():
        targets = set()
        for target in imported(name):
            parent = target.rpartition(".")[0]
            if parent in targets and module_file(parent).name == "__init__.py":
                targets.discard(parent)  # `from pkg import mod`: the edge is to pkg.mod
            targets.add(target)
        graph[name] = {t for t in targets if t != name}
    return graph


def test_the_search_finds_a_cycle_and_passes_a_layering():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_module_of_the_project_is_on_an_import_cycle():
    graph = module_graph()
    assert "pipeline.training.loop" in graph and "pipeline.train" in graph
    assert cycles(graph) == []
