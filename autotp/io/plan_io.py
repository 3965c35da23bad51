"""Plans as JSON: ``plan_to_dict`` / ``plan_from_dict`` and the file functions behind ``Plan.save``/``Plan.load``.

The schema is documented field by field in ``docs/plan-format.md``. Reading is strict: an
unknown field, a missing one, a wrong type or another schema version is a ``PlanFormatError``
naming the field, because a plan that is silently misread would shard a model wrongly.
Placements are written as ``format_placements`` writes them: ``"R"``, ``"P"`` and ``"S(d)"`` on a
1-D mesh, ``"(S(0), R)"`` (one per mesh axis) on an N-D one; a loaded plan equals the saved one.
Version 1 files (1-D meshes, before axis names) are still read, as a mesh of one axis ``tp``.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from autotp.errors import PlanFormatError
from autotp.ir.placement import Placements, format_placements, parse_placements
from autotp.ir.plan import Conversion, NodePlan, Plan
from autotp.ir.steps import Step, StepKind
from autotp.ir.strategy import MeshStrategy, NodeKind
from autotp.ir.values import TensorMeta, format_value, parse_value, parse_value_ref

FORMAT = "autotp.plan"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: a 1-D mesh, no axis names (read as ("tp",)), no step axes


def plan_to_dict(plan: Plan, *, source: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON-ready form of ``plan``; ``source`` (model name, target, ...) is informational."""
    out: dict[str, Any] = {
        "format": FORMAT,
        "version": SCHEMA_VERSION,
        "fingerprint": plan.fingerprint,
        "mesh_shape": list(plan.mesh_shape),
        "mesh_axis_names": list(plan.mesh_axis_names),
        **({"inter_node_axes": list(plan.inter_node_axes)} if plan.inter_node_axes is not None else {}),
        "hardware": plan.hardware,
        "training": plan.training,
        "optimizer": plan.optimizer,
        "overlap": plan.overlap,
        "memory_budget_nbytes": plan.memory_budget,
        "solver": {"status": plan.solver_status, "seconds": plan.solve_seconds},
        "memory": {
            "param_nbytes_per_device": plan.param_nbytes_per_device,
            "replicated_param_nbytes": plan.replicated_param_nbytes,
            "memory_nbytes_per_device": plan.memory_nbytes_per_device,
        },
        "totals": {
            "compute_seconds": plan.compute_seconds,
            "comm_seconds": plan.comm_seconds,
            "total_seconds": plan.total_seconds,
            "comm_bytes_per_rank": plan.comm_bytes_per_rank,
        },
    }
    if source:
        out["source"] = {str(k): str(v) for k, v in source.items()}
    out["nodes"] = [_node_to_dict(n) for n in plan.nodes]
    return out


def plan_from_dict(data: Any) -> Plan:
    """Inverse of ``plan_to_dict``; raises ``PlanFormatError`` naming the first bad field."""
    top = _Obj(data, "plan")
    if "format" not in data:
        raise PlanFormatError(f"not an autotp plan: it has no field 'format' (its fields: {', '.join(map(repr, list(data)[:6])) or 'none'}); a plan is the JSON written by Plan.save")
    fmt = top.get("format", str)
    if fmt != FORMAT:
        raise PlanFormatError(f"not an autotp plan: field 'format' is {fmt!r}, expected {FORMAT!r}")
    version = top.get("version", int)
    if version not in READABLE_VERSIONS:
        newer = version > SCHEMA_VERSION
        raise PlanFormatError(
            f"plan schema version {version} is not supported: this autotp reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            + ("; the file was written by a newer autotp (upgrade autotp, or re-plan with this one)" if newer else "; re-plan with this autotp")
        )
    mesh_shape, names, inter_node_axes = _mesh(top, version)
    ndim = len(mesh_shape)
    solver = _Obj(top.get("solver", dict), "solver")
    memory = _Obj(top.get("memory", dict), "memory")
    totals = _Obj(top.get("totals", dict), "totals")
    for key in ("compute_seconds", "comm_seconds", "total_seconds", "comm_bytes_per_rank"):
        totals.get(key, float)  # informational: recomputed from the nodes
    totals.done()
    if "source" in top.data:
        source = _Obj(top.get("source", dict), "source")
        for key in list(source.data):
            source.get(key, str)
        source.done()
    nodes_data = top.get("nodes", list)
    nodes = tuple(_node_from_dict(item, f"nodes[{k}]", ndim) for k, item in enumerate(nodes_data))
    budget = top.get("memory_budget_nbytes", int, nullable=True)
    plan = Plan(
        mesh_shape=mesh_shape,
        hardware=top.get("hardware", str),
        memory_budget=budget,
        nodes=nodes,
        param_nbytes_per_device=memory.get("param_nbytes_per_device", float),
        replicated_param_nbytes=memory.get("replicated_param_nbytes", float),
        memory_nbytes_per_device=memory.get("memory_nbytes_per_device", float),
        solver_status=solver.get("status", str),
        solve_seconds=solver.get("seconds", float),
        training=top.get("training", bool),
        optimizer=top.get("optimizer", str, nullable=True),
        fingerprint=top.get("fingerprint", str),
        mesh_axis_names=names,
        inter_node_axes=inter_node_axes,
        overlap=top.get("overlap", bool) if "overlap" in top.data else False,  # older files: priced without overlap
    )
    solver.done()
    memory.done()
    top.done()
    return plan


def _mesh(top: _Obj, version: int) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...] | None]:
    """The mesh fields: shape, axis names (``("tp",)`` in a version-1 file) and inter-node axes."""
    mesh_shape = tuple(_int_list(top.get("mesh_shape", list), "mesh_shape"))
    if version == 1:
        if len(mesh_shape) != 1 or mesh_shape[0] < 1:
            raise PlanFormatError(f"field 'mesh_shape' of a version 1 plan must be a 1-D shape such as [4], got {list(mesh_shape)}")
        return mesh_shape, ("tp",), None
    if not mesh_shape or any(size < 1 for size in mesh_shape):
        raise PlanFormatError(f"field 'mesh_shape' must be a non-empty list of positive integers such as [4] or [2, 4], got {list(mesh_shape)}")
    names = tuple(_str_list(top.get("mesh_axis_names", list), "mesh_axis_names"))
    if len(names) != len(mesh_shape) or len(set(names)) != len(names):
        raise PlanFormatError(
            f"field 'mesh_axis_names' must hold {len(mesh_shape)} distinct names, one per axis of mesh_shape {list(mesh_shape)}, got {list(names)}"
        )
    inter_node_axes = None
    if "inter_node_axes" in top.data:
        axes = _int_list(top.get("inter_node_axes", list), "inter_node_axes")
        if any(not 0 <= a < len(mesh_shape) for a in axes) or list(axes) != sorted(set(axes)):
            raise PlanFormatError(
                f"field 'inter_node_axes' must list distinct mesh axis indices in 0..{len(mesh_shape) - 1} in increasing order, got {list(axes)}"
            )
        inter_node_axes = tuple(axes)
    return mesh_shape, names, inter_node_axes


def save_plan(plan: Plan, path: str | os.PathLike[str], *, source: Mapping[str, str] | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps_plan(plan, source=source))


def dumps_plan(plan: Plan, *, source: Mapping[str, str] | None = None) -> str:
    return json.dumps(plan_to_dict(plan, source=source), indent=1) + "\n"


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file; every problem is a one-line ``PlanFormatError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PlanFormatError(f"cannot read plan file {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PlanFormatError(
            f"plan file {os.fspath(path)!r} is not a text file (byte {exc.start} is not UTF-8): "
            "a plan is the JSON written by `autotp plan --out plan.json` or Plan.save"
        ) from None
    if not text.strip():
        raise PlanFormatError(f"plan file {os.fspath(path)!r} is empty: a plan is the JSON written by `autotp plan --out plan.json` or Plan.save")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFormatError(f"plan file {os.fspath(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    try:
        return plan_from_dict(data)
    except PlanFormatError as exc:
        raise PlanFormatError(f"plan file {os.fspath(path)!r}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# nodes, strategies, conversions


def _node_to_dict(node: NodePlan) -> dict[str, Any]:
    return {
        "name": node.name,
        "op": node.op,
        "module": node.module_path,
        "kind": node.kind.value,
        "inputs": [str(ref) for ref in node.inputs],
        "value": format_value(node.output_meta),
        "strategy": {
            "inputs": [format_placements(p) for p in node.strategy.inputs],
            "output": (
                [format_placements(p) for p in node.strategy.outputs] if node.strategy.multi_output
                else format_placements(node.strategy.output)
            ),
        },
        "compute_seconds": node.compute_seconds,
        "conversions": [_conversion_to_dict(c) for c in node.conversions],
    }


_Kind = TypeVar("_Kind", NodeKind, StepKind)


def _kind(obj: _Obj, enum: type[_Kind], what: str, where: str) -> _Kind:
    """``obj``'s ``kind`` field as a member of ``enum``; an unknown value names the known ones."""
    text = obj.get("kind", str)
    try:
        return enum(text)
    except ValueError:
        raise PlanFormatError(f"{where}.kind: unknown {what} {text!r} (known: {', '.join(k.value for k in enum)})") from None


def _node_from_dict(data: Any, where: str, ndim: int) -> NodePlan:
    obj = _Obj(data, where)
    kind = _kind(obj, NodeKind, "node kind", where)
    strategy = _Obj(obj.get("strategy", dict), f"{where}.strategy")
    inputs = tuple(
        _placements(p, f"{where}.strategy.inputs[{k}]", ndim)
        for k, p in enumerate(_str_list(strategy.get("inputs", list), f"{where}.strategy.inputs"))
    )
    raw_out = strategy.get("output", (str, list))
    if isinstance(raw_out, list):
        outputs = tuple(_placements(p, f"{where}.strategy.output[{k}]", ndim) for k, p in enumerate(_str_list(raw_out, f"{where}.strategy.output")))
    else:
        outputs = (_placements(raw_out, f"{where}.strategy.output", ndim),)
    strategy.done()
    conversions = tuple(_conversion_from_dict(c, f"{where}.conversions[{k}]", ndim) for k, c in enumerate(obj.get("conversions", list)))
    node = NodePlan(
        name=obj.get("name", str),
        op=obj.get("op", str),
        module_path=obj.get("module", str),
        kind=kind,
        strategy=MeshStrategy(inputs, outputs, multi_output=isinstance(raw_out, list)),
        conversions=conversions,
        compute_seconds=obj.get("compute_seconds", float),
        inputs=tuple(parse_value_ref(ref) for ref in _str_list(obj.get("inputs", list), f"{where}.inputs")),
        output_meta=_output_meta(obj.get("value", str), f"{where}.value"),
    )
    obj.done()
    return node


def _output_meta(text: str, where: str) -> TensorMeta | tuple[TensorMeta, ...] | None:
    try:
        return parse_value(text)
    except ValueError as exc:
        raise PlanFormatError(f"{where}: {exc}") from None


def _conversion_to_dict(c: Conversion) -> dict[str, Any]:
    return {
        "value": str(c.value),
        "src": format_placements(c.src),
        "dst": format_placements(c.dst),
        "steps": [_step_to_dict(s) for s in c.steps],
        "nbytes": c.nbytes,
        "bytes_per_rank": c.bytes_per_rank,
        "seconds": c.seconds,
        "backward_only": c.backward_only,
        **({"wake_seconds": c.wake_seconds} if c.wake_seconds else {}),
        **({"hidden_seconds": c.hidden_seconds} if c.hidden_seconds else {}),
    }


def _conversion_from_dict(data: Any, where: str, ndim: int) -> Conversion:
    obj = _Obj(data, where)
    conversion = Conversion(
        value=parse_value_ref(obj.get("value", str)),
        src=_placements(obj.get("src", str), f"{where}.src", ndim),
        dst=_placements(obj.get("dst", str), f"{where}.dst", ndim),
        steps=tuple(_step_from_dict(s, f"{where}.steps[{k}]", ndim) for k, s in enumerate(obj.get("steps", list))),
        nbytes=obj.get("nbytes", int),
        bytes_per_rank=obj.get("bytes_per_rank", float),
        seconds=obj.get("seconds", float),
        backward_only=obj.get("backward_only", bool),
        wake_seconds=obj.get("wake_seconds", float) if "wake_seconds" in data else 0.0,
        hidden_seconds=obj.get("hidden_seconds", float) if "hidden_seconds" in data else 0.0,
    )
    obj.done()
    return conversion


def _step_to_dict(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": step.kind.value}
    if step.src_dim is not None:
        out["src_dim"] = step.src_dim
    if step.dst_dim is not None:
        out["dst_dim"] = step.dst_dim
    if step.axis:
        out["axis"] = step.axis
    return out


def _step_from_dict(data: Any, where: str, ndim: int) -> Step:
    obj = _Obj(data, where)
    kind = _kind(obj, StepKind, "step", where)
    src_dim = obj.get("src_dim", int) if "src_dim" in obj.data else None
    dst_dim = obj.get("dst_dim", int) if "dst_dim" in obj.data else None
    axis = obj.get("axis", int) if "axis" in obj.data else 0
    if not 0 <= axis < ndim:
        raise PlanFormatError(f"field '{where}.axis' must be a mesh axis index in 0..{ndim - 1}, got {axis}")
    obj.done()
    return Step(kind, src_dim, dst_dim, axis)


# ----------------------------------------------------------------------------------------------
# strict field access


_TYPE_NAMES: dict[type, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "an object"}


class _Obj:
    """A JSON object read field by field; ``done()`` rejects the fields nobody asked for."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise PlanFormatError(f"{where} must be an object, got {_json_type(data)}")
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], *, nullable: bool = False) -> Any:
        where = f"{key}" if self.where == "plan" else f"{self.where}.{key}"
        if key not in self.data:
            raise PlanFormatError(f"missing field '{where}'")
        self.seen.add(key)
        value = self.data[key]
        if value is None and nullable:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        for k in kinds:
            if _is(value, k):
                return float(value) if k is float else value
        expected = " or ".join(_TYPE_NAMES[k] for k in kinds) + (" or null" if nullable else "")
        raise PlanFormatError(f"field '{where}' must be {expected}, got {_json_type(value)} {_short(value)}")

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            prefix = "" if self.where == "plan" else f"{self.where}."
            raise PlanFormatError(
                f"unknown field '{prefix}{unknown[0]}' (known here: {', '.join(sorted(self.seen))}); "
                "the file was edited or written by another autotp version"
            )


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _json_type(value: Any) -> str:
    names: list[tuple[type, str]] = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"), (dict, "an object")]
    if value is None:
        return "null"
    return next((name for t, name in names if isinstance(value, t)), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed_list(check: Callable[[Any], bool], what: str) -> Callable[[Any, str], list]:
    def read(values: list, where: str) -> list:
        for k, v in enumerate(values):
            if not check(v):
                raise PlanFormatError(f"{where}[{k}] must be {what}, got {_json_type(v)} {_short(v)}")
        return values

    return read


_str_list = _typed_list(lambda v: isinstance(v, str), "a string")
_int_list = _typed_list(lambda v: _is(v, int), "an integer")


def _placements(text: str, where: str, ndim: int) -> Placements:
    """One tensor's placements, one per mesh axis: ``"S(0)"`` on a 1-D mesh, ``"(S(0), R)"`` on an N-D one."""
    if not isinstance(text, str):
        raise PlanFormatError(f"{where} must be a placement string (R, P or S(d)), got {_json_type(text)}")
    try:
        placements = parse_placements(text)
    except ValueError as exc:
        raise PlanFormatError(f"{where}: {exc}") from None
    if len(placements) != ndim:
        example = "S(0)" if ndim == 1 else "(" + ", ".join(["R"] * ndim) + ")"
        count = f"{len(placements)} placement" + ("s" if len(placements) != 1 else "")
        axes = f"{ndim} axis" if ndim == 1 else f"{ndim} axes"
        raise PlanFormatError(f"{where}: {text!r} has {count} but the mesh has {axes} (one placement per axis, e.g. {example!r})")
    return placements
