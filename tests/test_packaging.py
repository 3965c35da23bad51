"""Every third-party module the library imports at run time is declared in pyproject.toml.

The test extra pulls in transformers, which brings numpy, so a suite run alone cannot see a missing
runtime dependency; .ci/run also runs README command 1 in a fresh venv without the extras.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_PACKAGES = ("autotp", "cost_models")
# torch.distributed's object collectives pickle through numpy, which the CPU torch wheel does not require.
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


def _names(specs: list[str]) -> set[str]:
    return {_normalise(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in specs}


def _declared() -> set[str]:
    return _names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def _optional() -> set[str]:
    """Distributions of the optional extras a user installs for a feature (not the test extra)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return set().union(*(_names(specs) for name, specs in extras.items() if name != "test"))


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _sources() -> list[Path]:
    return [path for package in LIBRARY_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def _imported_top_level_modules(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Top-level names ``path`` imports; with ``module_level_only`` only those imported when the
    module is (not inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    modules: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """Runtime dependencies, or an optional extra's where the import is inside a function (the
    feature that needs it: ``solver="highs"`` needs ``pip install autotp[highs]``)."""
    distributions = importlib.metadata.packages_distributions()
    declared, optional = _declared(), _optional()
    missing: list[str] = []
    for path in _sources():
        at_import = _imported_top_level_modules(path, module_level_only=True)
        for module in sorted(_imported_top_level_modules(path)):
            if module in sys.stdlib_module_names or module in LIBRARY_PACKAGES or module == "__future__":
                continue
            owners = {_normalise(d) for d in distributions.get(module, [module])}
            if owners & declared or (owners & optional and module not in at_import):
                continue
            missing.append(f"{path.relative_to(ROOT)} imports {module} (distribution {', '.join(sorted(owners))})")
    assert not missing, "not declared in pyproject.toml [project] dependencies (or an optional extra, imported lazily):\n" + "\n".join(missing)


def test_object_collectives_come_with_numpy() -> None:
    users = [str(p.relative_to(ROOT)) for p in _sources() if any(name in p.read_text() for name in OBJECT_COLLECTIVES)]
    assert users, "no object collective is used any more; drop this test and reconsider the numpy dependency"
    assert "numpy" in _declared(), f"{', '.join(users)} use torch's object collectives, which need numpy at run time"
