"""What the cost model and the layout finder need to know about an op beyond its sharding rule:
which measured op class prices it and which slot of a contraction holds its second matrix.

Ops are named by their packet (``aten.linear``, overload dropped), as ``NodeSpace.op`` names them
without the overload; ``tests/test_torch_compat.py`` fails when a name here is no longer an ATen op.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx.operator_schemas import normalize_function

from autotp.capture.torch_compat import OpOverload

CONTRACTION_OPS = {"aten.linear", "aten.mm", "aten.bmm", "aten.addmm", "aten.matmul", "aten.baddbmm"}
# Convolutions contract input channels and the kernel window, so the matmul roofline prices them
# too; a transposed one stores its weight as (C_in, C_out / groups, *kernel).
CONVOLUTION_OPS = {"aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"}
TRANSPOSED_CONVOLUTION_OPS = {"aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d"}
ATTENTION_OPS = {
    "aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
}
ACTIVATION_OPS = {f"aten.{name}" for name in (
    "gelu", "silu", "sigmoid", "tanh", "exp", "exp2", "expm1", "log", "log1p", "log2", "erf", "pow",
    "rsqrt", "sqrt", "reciprocal", "softplus", "mish", "elu", "selu", "celu", "log_sigmoid", "sin", "cos",
)}
NORMALIZATION_OPS = {f"aten.{name}" for name in (
    "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "mean", "sum", "var", "var_mean", "std",
    "amax", "amin", "max", "min", "argmax", "argmin", "norm", "linalg_vector_norm", "cumsum",
    "cross_entropy_loss", "nll_loss", "nll_loss_forward", "logsumexp",
)}

# The slot of a contraction's second matrix: ``nn.Linear``'s weight, or the keys of attention scores.
SECOND_MATRIX_SLOT = {
    "aten.linear": 1, "aten.mm": 1, "aten.matmul": 1, "aten.bmm": 1, "aten.addmm": 2, "aten.baddbmm": 2,
    **{op: 1 for op in CONVOLUTION_OPS | TRANSPOSED_CONVOLUTION_OPS},
}


def packet_name(op: str) -> str:
    """``aten.linear.default`` -> ``aten.linear``; other names unchanged."""
    return op.rsplit(".", 1)[0] if op.count(".") >= 2 else op


def op_class_of(op: str) -> str | None:
    """The ``cost_models.OP_CLASSES`` entry of a non-view op; None for contractions (priced by their roofline)."""
    packet = packet_name(op)
    if packet in CONTRACTION_OPS or packet in CONVOLUTION_OPS or packet in TRANSPOSED_CONVOLUTION_OPS:
        return None
    if packet in ATTENTION_OPS:
        return "attention"
    if packet in ACTIVATION_OPS:
        return "activation"
    if packet in NORMALIZATION_OPS:
        return "normalization"
    return "elementwise"


def is_random(target: Any) -> bool:
    """An op that draws from the random generator (``torch.Tag.nondeterministic_seeded``)."""
    return isinstance(target, OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def draws_random(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call of ``target`` draws random numbers: a seeded op, unless its arguments
    switch the draw off (dropout with ``train=False`` or probability 0, attention with
    ``dropout_p=0``). Forking the generator costs two state copies per call, so an eval-mode
    dropout or a dropout-free attention runs as it is."""
    if not is_random(target):
        return False
    normalized = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:  # arguments torch cannot bind to the schema: assume the op draws
        return True
    bound = normalized.kwargs  # every argument by name, defaults filled in
    if bound.get("train") is False:
        return False
    probability = next((bound[name] for name in ("p", "dropout_p") if name in bound), None)
    return not (isinstance(probability, (int, float)) and probability == 0)
