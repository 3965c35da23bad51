"""Values written in place stay whole, so every write lands where the original's did.

The captured graph keeps in-place ops (``copy_`` from ``buf[:, :8] = h``, ``add_``, batch norm's
running statistics). A conversion between a value and its writer would write into a gathered or
chunked copy, and a conversion shared by readers on both sides of a write would hand the later
ones a stale copy: the output can still be right while the buffer or a later gradient is not.
So the value written (its root: the tensor the views start from), every view of it, every writer
and every reader of any of them run replicated: no conversion touches them.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx

from autotp.capture.torch_compat import op_schema

aten = torch.ops.aten


def replicated_by_mutation(graph: fx.Graph) -> frozenset[str]:
    """Names of the nodes that must keep every input and output replicated because of a write."""
    roots = {_root(written) for node in graph.nodes for written in _written_args(node)}
    pinned: set[str] = set()
    for root in roots:
        for value in _aliases(root):
            pinned.add(value.name)
            pinned.update(user.name for user in value.users if user.op != "output")
    return frozenset(pinned)


# Composite ops that update running statistics in place without saying so in their schema:
# the positions of the statistics, and of the flag that switches the update on.
_UNDECLARED_WRITES = {
    aten.batch_norm.default: ((3, 4), 5),  # running_mean, running_var; training
    aten.instance_norm.default: ((3, 4), 5),  # running_mean, running_var; use_input_stats
}


def _written_args(node: fx.Node) -> Iterator[fx.Node]:
    schema = op_schema(node.target) if node.op == "call_function" else None
    if schema is None:
        return
    undeclared = _UNDECLARED_WRITES.get(node.target)  # type: ignore[call-overload]  # any target may be looked up
    if undeclared is not None and len(node.args) > undeclared[1] and node.args[undeclared[1]]:
        yield from (a for i in undeclared[0] if isinstance(a := node.args[i], fx.Node))
    for index, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is None or not info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, fx.Node):
            yield value


def _viewed_arg(node: fx.Node) -> fx.Node | None:
    """The input ``node`` returns a view of (or writes and returns, like ``add_``), if any; an
    item of a multi-output op counts as a view of it (``split``'s parts)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0]  # type: ignore[return-value]  # getitem's first argument is a node
    schema = op_schema(node.target) if node.op == "call_function" else None
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    alias_set = schema.returns[0].alias_info.before_set
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.before_set == alias_set:
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            return value if isinstance(value, fx.Node) else None
    return None


def _root(value: fx.Node) -> fx.Node:
    while (base := _viewed_arg(value)) is not None:
        value = base
    return value


def _aliases(root: fx.Node) -> Iterator[fx.Node]:
    """``root`` and every node that views it, directly or through other views."""
    stack, seen = [root], {root}
    while stack:
        value = stack.pop()
        yield value
        for user in value.users:
            if user not in seen and _viewed_arg(user) is value:
                seen.add(user)
                stack.append(user)
