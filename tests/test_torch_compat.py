"""torch at one door: private torch names only in ``autotp.capture.torch_compat``, every ATen op autotp
names exists in the installed torch, and the torch requirement matches what CI tests.

The scans read autotp's source (AST), so a private name or a renamed op added anywhere fails here
with its file and line, before a user meets it as an ``AttributeError`` or as an op that silently
falls into the wrong table.
"""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from autotp.capture import torch_compat
from autotp.capture.torch_compat import TESTED_TORCH, TorchCompatError, UntestedTorchWarning, aten_op, check_torch_version

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "autotp" / "capture" / "torch_compat.py"
# Public-looking, but torch marks them unstable: they move between releases like private names.
UNSTABLE_TORCH_MODULES = ("torch.fx.experimental",)
# An op name as a plan writes it: ``aten.mm`` (packet) or ``aten.mm.default`` (overload).
ATEN_NAME = re.compile(r"aten\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
STRING_AFFIX_METHODS = ("startswith", "endswith", "removeprefix", "removesuffix")


def _sources() -> list[Path]:
    return sorted((ROOT / "autotp").rglob("*.py"))


def _is_private(component: str) -> bool:
    return component.startswith("_") and not component.startswith("__")


def _chain(node: ast.expr) -> list[str] | None:
    """``torch.ops.aten.mm`` -> ``["torch", "ops", "aten", "mm"]``; None unless rooted at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _outermost_attributes(tree: ast.AST) -> list[ast.Attribute]:
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    return [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and id(node) not in inner]


def _names_autotp_defines(trees: list[ast.AST]) -> set[str]:
    """Every name autotp binds (functions, classes, variables, attributes, arguments, imports): a
    ``x._name`` outside this set is a private attribute of someone else's object."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the module path it was imported from (``nn`` -> ``torch.nn``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def private_torch_uses(source: str, *, filename: str, autotp_names: set[str]) -> list[str]:
    """``file:line what`` for each private or unstable torch name ``source`` reaches."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')} {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch" and (
                    any(map(_is_private, alias.name.split("."))) or alias.name.startswith(UNSTABLE_TORCH_MODULES)
                ):
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                if any(map(_is_private, path.split("."))) or path.startswith(UNSTABLE_TORCH_MODULES):
                    flag(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr", "delattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                if _is_private(node.args[1].value) and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls")):
                    flag(node, f'{node.func.id}(..., "{node.args[1].value}")')
    aliases = _module_aliases(tree)
    for node in _outermost_attributes(tree):
        chain = _chain(node)
        if chain is None:  # rooted at a call or subscript: judge by the attribute names alone
            attrs: list[str] = []
            current: ast.expr = node
            while isinstance(current, ast.Attribute):
                attrs.append(current.attr)
                current = current.value
            chain = ["?", *attrs[::-1]]
        root = aliases.get(chain[0], chain[0])
        full = [*root.split("."), *chain[1:]]
        if chain[0] == "aten" or full[:2] == ["torch", "ops"]:
            continue  # ATen op names: test_every_aten_op_autotp_names_exists checks them
        if chain[0] in aliases and full[0] != "torch":
            continue  # another library's private name (argparse._SubParsersAction): not torch's
        if full[0] == "torch" and (any(map(_is_private, full[1:])) or ".".join(full).startswith(UNSTABLE_TORCH_MODULES)):
            flag(node, ".".join(chain))
        elif chain[0] not in ("self", "cls") and any(_is_private(a) and a not in autotp_names for a in chain[1:]):
            flag(node, ".".join(chain))
    return found


def test_no_private_torch_name_outside_the_compat_module() -> None:
    trees = [ast.parse(path.read_text(), filename=str(path)) for path in _sources()]
    autotp_names = _names_autotp_defines(trees)
    found = [
        use
        for path in _sources()
        if path != COMPAT
        for use in private_torch_uses(path.read_text(), filename=str(path.relative_to(ROOT)), autotp_names=autotp_names)
    ]
    assert not found, (
        "private or unstable torch names outside autotp/capture/torch_compat.py; add them there (lazily if only "
        "one feature needs them) and import them from it:\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("import torch\nx = torch._higher_order_ops.wrap.wrap_with_set_grad_enabled\n", "torch._higher_order_ops"),
        ("from torch.utils import _pytree as pytree\n", "from torch.utils import _pytree"),
        ("from torch._ops import OpOverload\n", "from torch._ops import OpOverload"),
        ("import torch.distributed as dist\ndist.distributed_c10d._resolve_process_group('g')\n", "dist.distributed_c10d._resolve_process_group"),
        ("from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode\n", "torch.fx.experimental"),
        ("def f(m):\n    return m._modules\n", "m._modules"),
        ("def f(op):\n    return getattr(op, '_schema', None)\n", '"_schema"'),
    ],
)
def test_the_private_name_scan_catches(source: str, what: str) -> None:
    found = private_torch_uses(source, filename="snippet.py", autotp_names=set())
    assert found and what in found[0], found


def test_the_private_name_scan_passes_public_and_own_names() -> None:
    source = (
        "import argparse\nimport torch\nfrom torch import nn\naten = torch.ops.aten\n"
        "x = aten._softmax.default\ny = torch.ops.aten._unsafe_view.default\nz = nn.Linear\n"
        "a = argparse._SubParsersAction\nv = torch.__version__\n"
        "class C:\n    def f(self, other):\n        return self._own, other._own\n"
    )
    assert private_torch_uses(source, filename="snippet.py", autotp_names={"_own"}) == []


def aten_names(source: str, *, filename: str) -> list[tuple[str, str]]:
    """``(file:line, "aten.op[.overload]")`` for every ATen op ``source`` names: string literals,
    ``f"aten.{name}" for name in (...)`` tables, and ``torch.ops.aten.op.overload`` / ``aten.op``."""
    tree = ast.parse(source, filename=filename)
    prefixes = {  # op.startswith(("aten.scaled_dot_product", ...)) matches a family, not one op
        id(constant)
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in STRING_AFFIX_METHODS
        for argument in call.args
        for constant in ast.walk(argument)
    }
    names: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ATEN_NAME.fullmatch(node.value) and id(node) not in prefixes:
            names.append((where, node.value))
        elif isinstance(node, (ast.SetComp, ast.ListComp, ast.GeneratorExp, ast.DictComp)):
            element = node.key if isinstance(node, ast.DictComp) else node.elt
            generator = node.generators[0]
            if (
                isinstance(element, ast.JoinedStr) and len(element.values) == 2
                and isinstance(element.values[0], ast.Constant) and element.values[0].value == "aten."
                and isinstance(generator.iter, (ast.Tuple, ast.List, ast.Set))
            ):
                names += [(where, f"aten.{item.value}") for item in generator.iter.elts if isinstance(item, ast.Constant)]
    for node in _outermost_attributes(tree):
        chain = _chain(node)
        if chain and chain[:3] == ["torch", "ops", "aten"] and len(chain) > 3:
            names.append((f"{filename}:{node.lineno}", ".".join(chain[2:5])))
        elif chain and chain[0] == "aten" and len(chain) > 1 and "aten = torch.ops.aten" in source:
            names.append((f"{filename}:{node.lineno}", ".".join(chain[:3])))
    return names


def _autotp_aten_names() -> list[tuple[str, str]]:
    return [name for path in _sources() for name in aten_names(path.read_text(), filename=str(path.relative_to(ROOT)))]


def test_every_aten_op_autotp_names_exists() -> None:
    names = _autotp_aten_names()
    # the tables this test exists for are seen: op_facts' op classes, fingerprint's layout-only ops, rules
    seen = {name for _, name in names}
    assert {"aten.gelu", "aten._softmax", "aten.scaled_dot_product_attention", "aten.contiguous.default", "aten.mm.default"} <= seen
    missing = sorted({f"{where} {name}" for where, name in names if aten_op(name) is None})
    assert not missing, (
        f"ATen ops named in autotp that torch {torch.__version__} does not have (renamed or removed: "
        "a table keyed by them silently stops matching):\n" + "\n".join(missing)
    )


def test_the_aten_scan_reads_every_table_form_and_flags_a_missing_op() -> None:
    source = (
        "import torch\naten = torch.ops.aten\nA = {'aten.mm', 'aten.no_such_op'}\n"
        "B = {f'aten.{name}' for name in ('gelu', 'no_such_activation')}\n"
        "C = (aten.mm.default, torch.ops.aten.no_such_view.default)\n"
        "D = op.startswith(('aten.scaled_dot_product', 'aten._scaled_dot_product'))\n"
    )
    names = aten_names(source, filename="snippet.py")
    assert sorted(name for _, name in names) == sorted([
        "aten.mm", "aten.no_such_op", "aten.gelu", "aten.no_such_activation", "aten.mm.default", "aten.no_such_view.default",
    ])
    assert sorted(name for _, name in names if aten_op(name) is None) == [
        "aten.no_such_activation", "aten.no_such_op", "aten.no_such_view.default",
    ]


def test_aten_op_resolves_packets_and_overloads() -> None:
    assert aten_op("aten.mm") is torch.ops.aten.mm
    assert aten_op("aten.mm.default") is torch.ops.aten.mm.default
    assert aten_op("aten.mm.no_such_overload") is None
    assert aten_op("getitem") is None


def test_the_torch_requirement_is_the_tested_range() -> None:
    (low_major, low_minor), (high_major, high_minor) = TESTED_TORCH
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_specs = [re.sub(r"\s", "", spec) for spec in dependencies if re.match(r"torch\b", spec)]
    assert torch_specs == [f"torch>={low_major}.{low_minor},<{high_major}.{high_minor}"]
    readme_pins = set(re.findall(r"pip install torch==(\d+)\.(\d+)", (ROOT / "README.md").read_text()))
    assert readme_pins and all((low_major, low_minor) <= (int(a), int(b)) < (high_major, high_minor) for a, b in readme_pins)


@pytest.mark.parametrize(("version", "tested"), [("2.13.0", True), ("2.13.1+cpu", True), ("2.12.1", False), ("2.14.0", False), ("2.15.0.dev20260101", False)])
def test_a_torch_outside_the_tested_range_warns(version: str, tested: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_torch_version(version) is tested
    untested = [w for w in caught if issubclass(w.category, UntestedTorchWarning)]
    assert len(untested) == (0 if tested else 1)
    if untested:
        assert f"torch {version}" in str(untested[0].message) and ">=2.13,<2.14" in str(untested[0].message)


@pytest.mark.parametrize(
    ("module", "name", "lookup"),
    [
        ("torch._higher_order_ops.wrap", "wrap_with_set_grad_enabled", torch_compat.set_grad_enabled_hop),
        ("torch.fx.experimental.symbolic_shapes", "GuardOnDataDependentSymNode", torch_compat.data_dependent_guard_error),
        ("torch.distributed.distributed_c10d", "_resolve_process_group", lambda: torch_compat.resolve_process_group("tp")),
    ],
)
def test_a_missing_lazy_name_raises_a_typed_error_naming_it(monkeypatch: pytest.MonkeyPatch, module: str, name: str, lookup: Callable[[], object]) -> None:
    monkeypatch.delattr(importlib.import_module(module), name)
    for cached in (torch_compat.set_grad_enabled_hop, torch_compat.data_dependent_guard_error, torch_compat._process_group_resolver):
        cached.cache_clear()
    try:
        with pytest.raises(TorchCompatError, match=rf"torch {re.escape(torch.__version__)} has no {re.escape(module)}\.{name}, "):
            lookup()
    finally:
        monkeypatch.undo()
        for cached in (torch_compat.set_grad_enabled_hop, torch_compat.data_dependent_guard_error, torch_compat._process_group_resolver):
            cached.cache_clear()
    assert torch_compat.set_grad_enabled_hop() is importlib.import_module("torch._higher_order_ops.wrap").wrap_with_set_grad_enabled


def test_import_autotp_survives_missing_lazy_names() -> None:
    """A torch without the lazy names still imports autotp; the feature that needs one says which."""
    script = (
        "import torch.distributed.tensor.parallel, torch.export  # torch's own users of the names load first\n"
        "import torch.distributed.distributed_c10d as c10d\n"
        "import torch._higher_order_ops.wrap as wrap\n"
        "import torch.fx.experimental.symbolic_shapes as shapes\n"
        "del c10d._resolve_process_group, wrap.wrap_with_set_grad_enabled, shapes.GuardOnDataDependentSymNode\n"
        "import autotp, autotp.comm.collectives\n"
        "from autotp.capture.torch_compat import TorchCompatError, resolve_process_group\n"
        "try:\n"
        "    resolve_process_group('tp')\n"
        "except TorchCompatError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"torch {torch.__version__} has no torch.distributed.distributed_c10d._resolve_process_group" in result.stdout
