"""Export a plan for ``torch.distributed.tensor.parallel.parallelize_module``: translate it
(``autotp.io.torch_tp``), refuse what the styles cannot express, check the rest against the
model's own code (``autotp.io.torch_tp_check``) and write it as JSON or Python."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from torch import nn

from autotp.errors import TorchTPExportError
from autotp.io.torch_tp import WHAT_TO_DO, Style, TorchTPPlan, torch_tp_plan
from autotp.io.torch_tp_check import check_torch_tp
from autotp.ir.placement import Placement, Replicate, Shard
from autotp.ir.plan import Plan
from autotp.strategies.blocks import block_pattern

_SHOWN = 6  # problems listed in a refusal; the rest are counted


def export_torch_tp(plan: Plan, *, model: nn.Module, example_inputs: tuple[Any, ...]) -> TorchTPPlan:
    """The ``parallelize_module`` plan that runs ``model`` as ``plan`` does, checked against the
    model's own code; :class:`TorchTPExportError` when the styles cannot express the plan or
    the model's code does not run on rank-local tensors."""
    tp = torch_tp_plan(plan)
    if tp.not_expressible:
        raise TorchTPExportError(_inexpressible_message(tp))
    if tp.styles:
        check_torch_tp(tp, plan=plan, model=model, example_inputs=example_inputs)
    return tp


def _inexpressible_message(tp: TorchTPPlan) -> str:
    lines = [
        f"cannot export this plan for parallelize_module: {len(tp.not_expressible)} part(s) of it are beyond "
        "ColwiseParallel/RowwiseParallel/SequenceParallel, which convert layouts only at a styled "
        "linear's or embedding's input and output, and would run differently from the plan:"
    ]
    by_pattern: dict[str, list[dict[str, str]]] = defaultdict(list)  # blocks.0.ln_1, blocks.1.ln_1 -> blocks.*.ln_1
    for problem in tp.not_expressible:
        by_pattern[block_pattern(problem["module"])].append(problem)
    for pattern, problems in list(by_pattern.items())[:_SHOWN]:
        first, more = problems[0], f" (and {len(problems) - 1} more in '{pattern}')" if len(problems) > 1 else ""
        lines.append(f"  module '{first['module'] or '(model)'}'{more}, node {first['node']}: {first['why']}")
    if len(by_pattern) > _SHOWN:
        lines.append(f"  ... and {sum(len(p) for p in list(by_pattern.values())[_SHOWN:])} more in {len(by_pattern) - _SHOWN} other modules")
    lines.append(f"What to do: {WHAT_TO_DO}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# emitting and applying


def dumps_torch_tp(plan: Plan, *, model: nn.Module, example_inputs: tuple[Any, ...], python: bool = False, title: str = "") -> str:
    """JSON (``python=False``) or a Python module defining ``PLAN`` for ``parallelize_module``;
    :class:`TorchTPExportError` where that would not run as ``plan`` does (see ``export_torch_tp``)."""
    tp = export_torch_tp(plan, model=model, example_inputs=example_inputs)
    if not python:
        return json.dumps(tp.to_dict(), indent=1) + "\n"
    lines = [
        f'"""{title or "autotp plan"} as a torch.distributed.tensor.parallel plan for {tp.tp_size} ranks.',
        "",
        "    from torch.distributed.tensor.parallel import parallelize_module",
        "    parallelize_module(model, mesh, PLAN)",
        "",
        "autotp checked the model's code against the plan on rank-local shapes: it runs as planned.",
        '"""',
        "from torch.distributed.tensor import Partial, Replicate, Shard",
        "from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel",
        "",
        "PLAN = {",
    ]
    lines += [f"    {path!r}: {_style_source(style)}," for path, style in tp.styles.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _placement_source(p: Placement) -> str:
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    return "Replicate()" if isinstance(p, Replicate) else "Partial()"


def _style_source(style: Style) -> str:
    args = []
    if style.sequence_dim is not None:
        args.append(f"sequence_dim={style.sequence_dim}")
        args.append("use_local_output=True")
    if style.input_layouts is not None:
        args.append(f"input_layouts={_placement_source(style.input_layouts)}")
    if style.output_layouts is not None:
        args.append(f"output_layouts={_placement_source(style.output_layouts)}")
    return f"{style.style}({', '.join(args)})"
