"""The project's own import graph, read from the source (lazy imports inside functions too)."""

import ast

from tests.conftest import REPO_ROOT

PACKAGES = ("pipeline", "gan")


def module_file(name: str):
    path = REPO_ROOT / (name.replace(".", "/") + ".py")
    package = REPO_ROOT / name.replace(".", "/") / "__init__.py"
    return path if path.is_file() else package if package.is_file() else None


def imported(name: str) -> set[str]:
    """Project modules `name` imports anywhere (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}
    return found
