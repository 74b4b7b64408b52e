"""The rooms of src/vaelab/: imports point down, and no modules import each other in a circle."""

from __future__ import annotations

import pytest


def test_no_module_of_vaelab_imports_itself_through_others() -> None:
    grimp = pytest.importorskip("grimp")  # installed with import-linter (make lint's dev tools)
    graph = grimp.build_graph("vaelab")  # TYPE_CHECKING and in-function imports count too
    modules = sorted(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in modules}
    # A package's __init__ re-exports its own modules: the package → its module edge is not a
    # dependency between rooms, and vaelab/__init__ itself is the public surface over them all.
    for m in modules:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for m in modules:
        if m not in state and m != "vaelab":
            visit(m, [m])
    cycles = [c for c in cycles if "vaelab" not in c]
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)
