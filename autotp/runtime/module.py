"""The module ``parallelize`` returns: this rank's shards under the original names, and the graph."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh

from autotp.capture.export import CapturedGraph, InputRole
from autotp.capture.torch_compat import child_modules, pytree
from autotp.ir.placement import Placements
from autotp.ir.plan import Plan
from autotp.runtime.arguments import PlannedCall

if TYPE_CHECKING:  # the retracer runs the pipeline; the module only holds one
    from autotp.runtime.retrace import Retracer


class ShardedModule(nn.Module):
    """Holds only this rank's shard of each split parameter, named as in the original model.

    ``state_dict()`` keys match the original's; split tensors hold the local chunk.
    ``graph_module`` is the rank-local fx graph (inspect it to see the collectives). Calls bind
    as the original ``forward`` binds them and must match the planned inputs, except along the
    dims declared dynamic (``autotp.runtime.arguments``), for which ``retracer`` builds further graphs.
    """

    graph_module: fx.GraphModule  # set in __init__ outside nn.Module's registry

    def __init__(
        self,
        captured: CapturedGraph,
        graph_module: fx.GraphModule,
        local_state: dict[str, torch.Tensor],
        plan: Plan,
        *,
        planned_call: PlannedCall,
        coordinate: tuple[int, ...],
        group_names: tuple[str, ...],
        mesh: DeviceMesh | None = None,
        retracer: Retracer | None = None,
    ) -> None:
        super().__init__()
        self.training = captured.training
        self.__dict__["graph_module"] = graph_module  # not a submodule: keeps state_dict keys clean
        self.plan = plan
        self.planned_call = planned_call
        self._retracer = retracer
        self.coordinate = coordinate  # this rank's index on each mesh axis
        self.group_names = group_names  # the process group of each mesh axis it belongs to
        self.mesh = mesh
        self._captured_training = captured.training
        self._out_spec = captured.out_spec
        self._captured_inputs = tuple(gi for gi in captured.inputs if gi.role is not InputRole.USER_INPUT)
        # Per graph placeholder: None for a user input, else the (owning module, attribute) of its
        # state, resolved once (a get_submodule lookup per call cost about 10 us per parameter).
        self._feeds: list[tuple[nn.Module, str] | None] = []
        for k, gi in enumerate(captured.inputs):
            if gi.role is InputRole.USER_INPUT:
                self._feeds.append(None)
                continue
            tensor = local_state[gi.node_name]
            if gi.role is InputRole.CONSTANT:
                path = f"_autotp_constant_{k}"
                self.register_buffer(path, tensor, persistent=False)
            else:
                for fqn in gi.fqns:
                    register_state(self, fqn, tensor, gi.role, gi.persistent)
                path = gi.fqns[0]
            self._feeds.append(self._owner_and_name(path))

    def placements(self) -> dict[str, Placements]:
        """Placements (one per mesh axis) of every parameter/buffer by its name(s) in the original model."""
        by_node = {n.name: n for n in self.plan.nodes}  # .output only on state nodes: a multi-output op has none
        return {fqn: by_node[gi.node_name].strategy.output for gi in self._captured_inputs for fqn in gi.fqns}

    def train(self, mode: bool = True) -> ShardedModule:
        """The graph was captured in one mode (dropout on or off); warn when asked for the other."""
        if mode != self._captured_training:
            warnings.warn(
                f"this model was captured by autotp in {'train' if self._captured_training else 'eval'} mode and "
                f"its graph keeps that behaviour (dropout {'on' if self._captured_training else 'off'}); "
                f"call autotp.parallelize on the model in {'train' if mode else 'eval'} mode to change it",
                stacklevel=2,
            )
        return super().train(mode)

    def _owner_and_name(self, path: str) -> tuple[nn.Module, str]:
        owner, _, name = path.rpartition(".")
        return (self.get_submodule(owner) if owner else self), name

    def graph_arguments(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The rank-local graph's placeholders for these inputs: user inputs and this rank's state, in order."""
        return self._placeholders(self.planned_call.bind(args, kwargs)[0])

    def _placeholders(self, user_inputs: list[Any]) -> list[Any]:
        user_iter = iter(user_inputs)
        return [next(user_iter) if feed is None else getattr(*feed) for feed in self._feeds]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        user_inputs, resized = self.planned_call.bind(args, kwargs)
        graph = self.graph_module if resized is None else self._retracer.graph_for(resized)  # type: ignore[union-attr]  # resized only along dynamic dims, which need a retracer
        outputs = graph(*self._placeholders(user_inputs))
        return pytree.tree_unflatten(list(outputs), self._out_spec)  # type: ignore[arg-type]  # CapturedGraph keeps it as object


def register_state(root: nn.Module, fqn: str, tensor: torch.Tensor, role: InputRole, persistent: bool) -> None:
    owner_path, _, name = fqn.rpartition(".")
    owner = root
    for part in owner_path.split(".") if owner_path else ():
        if part not in child_modules(owner):
            owner.add_module(part, nn.Module())
        owner = child_modules(owner)[part]  # type: ignore[assignment]
    if role is InputRole.PARAMETER:
        owner.register_parameter(name, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
    else:
        owner.register_buffer(name, tensor, persistent=persistent)
