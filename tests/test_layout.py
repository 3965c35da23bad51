"""The package layout holds: no import cycle among autotp's modules, the data model (``autotp.ir``)
imports nothing above it, and ``cost_models`` imports neither torch nor autotp.

Imports are read from the source by AST, at module level and inside functions (a deferred import is
still a dependency), so the check needs no import side effects and sees every edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# The public methods of ``autotp.Plan`` that hand the plan to the stage owning the work (users call
# ``plan.save``, ``Plan.load``, ``str(plan)``, ``plan.cost_expression()``). They are the only
# imports from the data model upwards; nothing may add another.
PLAN_METHOD_IMPORTS = {
    ("autotp.ir.plan", "autotp.io.plan_io"): "Plan.to_dict/from_dict/save/load",
    ("autotp.ir.plan", "autotp.report.table"): "Plan.__str__",
    ("autotp.ir.plan", "autotp.cost.symbolic"): "Plan.cost_expression",
    ("autotp.ir.plan", "autotp.cost.activations"): "Plan.activation_nbytes_per_device",
}


def module_names(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package`` (packages by their ``__init__``)."""
    names = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` imports anywhere in its source, resolved to the most specific one in ``known``
    (``from autotp.comm import collectives`` is the module ``autotp.comm.collectives``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    return found


def import_graph(package: str) -> nx.DiGraph:
    """Edges from each module of ``package`` to the modules of ``package`` it imports.

    The package root (``autotp/__init__.py``, the public names) is left out as a target: every
    submodule import runs it, so it is no layer of its own.
    """
    modules = module_names(package)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in imported_modules(name, path, set(modules)):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target not in (name, package):
                graph.add_edge(name, target)
    return graph


def external_imports(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports."""
    modules = module_names(package)
    return {
        name: {imported.split(".")[0] for imported in imported_modules(name, path, set(modules)) if imported}
        for name, path in modules.items()
    }


def test_autotp_has_no_import_cycle() -> None:
    graph = import_graph("autotp")
    graph.remove_edges_from(edge for edge in PLAN_METHOD_IMPORTS if graph.has_edge(*edge))
    assert graph.number_of_edges() > 50, "the import walk found almost no edges: the test reads nothing"
    cycles = [sorted(component) for component in nx.strongly_connected_components(graph) if len(component) > 1]
    if cycles:
        cycle = nx.find_cycle(graph.subgraph(cycles[0]))
        pytest.fail(
            f"import cycle: {' -> '.join(edge[0] for edge in cycle)} -> {cycle[0][0]} "
            f"({len(cycles)} cycle(s); modules in them: {cycles}). Move the function to the stage it belongs to."
        )


def test_data_model_imports_nothing_above_it() -> None:
    graph = import_graph("autotp")
    allowed = {"autotp.errors"}
    offending = {
        (name, target)
        for name, target in graph.edges
        if name.startswith("autotp.ir") and not target.startswith("autotp.ir") and target not in allowed
        and (name, target) not in PLAN_METHOD_IMPORTS
    }
    assert not offending, f"autotp.ir imports stages above it: {sorted(offending)}"


def test_cost_models_imports_neither_torch_nor_autotp() -> None:
    offending = {name: sorted(tops & {"torch", "autotp"}) for name, tops in external_imports("cost_models").items() if tops & {"torch", "autotp"}}
    assert offending == {}, f"cost_models must stay free of torch and autotp: {offending}"


def test_import_walk_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    source = "from __future__ import annotations\nfrom . import b\ndef f():\n    from pkg.c import g\n    import torch\n"
    (tmp_path / "a.py").write_text(source)
    assert imported_modules("pkg.a", tmp_path / "a.py", {"pkg.a", "pkg.b", "pkg.c"}) == {"__future__", "pkg.b", "pkg.c", "torch"}
