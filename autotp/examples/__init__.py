"""Built-in example models for tests, benchmarks and the CLI.

``build_example("gpt", device="meta", n_embd=4096, n_head=32)`` gives a model and matching
example inputs without allocating any storage, which is all the planner needs to capture a
graph of a model too large for one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autotp.examples.gpt import GPT, GPTConfig
from autotp.examples.llama import Llama, LlamaConfig
from autotp.examples.mlp import MLP, MLPConfig

__all__ = [
    "EXAMPLES",
    "GPT",
    "GPTConfig",
    "MLP",
    "MLPConfig",
    "Llama",
    "LlamaConfig",
    "build_example",
]

EXAMPLES: dict[str, tuple[type[nn.Module], type[Any]]] = {
    "mlp": (MLP, MLPConfig),
    "gpt": (GPT, GPTConfig),
    "llama": (Llama, LlamaConfig),
}

# Default example sequence length per model.
_DEFAULT_SEQ: dict[str, int] = {"mlp": 8, "gpt": 16, "llama": 16}


def _activations(
    config: MLPConfig, *, batch: int, seq: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, ...]:
    shape = (batch, seq, config.d_model)
    if device.type == "meta":
        return (torch.empty(shape, device=device),)
    return (torch.randn(shape, generator=generator).to(device),)


def _token_ids(
    config: GPTConfig | LlamaConfig,
    *,
    batch: int,
    seq: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    max_seq = config.block_size if isinstance(config, GPTConfig) else config.max_seq_len
    if seq > max_seq:
        raise ValueError(
            f"seq={seq} is longer than the model's maximum sequence length {max_seq}; "
            "pass a smaller seq or a larger block_size / max_seq_len"
        )
    shape = (batch, seq)
    if device.type == "meta":
        return (torch.empty(shape, dtype=torch.long, device=device),)
    return (torch.randint(config.vocab_size, shape, generator=generator).to(device),)


_INPUTS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "mlp": _activations,
    "gpt": _token_ids,
    "llama": _token_ids,
}


def build_example(
    name: str,
    *,
    device: str | torch.device = "cpu",
    batch: int = 2,
    seq: int | None = None,
    targets: bool = False,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build example ``name`` in eval mode with deterministic inputs on ``device``.

    ``config_overrides`` replace fields of the example's config. On ``device="meta"`` the
    model is constructed under ``torch.device("meta")``, so parameters and inputs carry
    shapes and dtypes but no storage. Inputs are drawn on the CPU from a generator seeded
    with ``seed + 1`` and then moved, so they are the same on every device. With ``targets``
    (GPT only) the inputs gain next-token targets and the model returns its loss.
    """
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; known examples: {', '.join(EXAMPLES)}")
    model_cls, config_cls = EXAMPLES[name]
    field_names = [f.name for f in dataclasses.fields(config_cls)]
    for key in config_overrides:
        if key not in field_names:
            raise TypeError(
                f"{config_cls.__name__} has no field {key!r}; fields: {', '.join(field_names)}"
            )
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    seq = _DEFAULT_SEQ[name] if seq is None else seq
    if seq <= 0:
        raise ValueError(f"seq must be positive, got {seq}")

    config = config_cls(**config_overrides)
    device = torch.device(device)
    torch.manual_seed(seed)
    with device:
        model = model_cls(config)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = _INPUTS[name](config, batch=batch, seq=seq, generator=generator, device=device)
    if targets:
        if name != "gpt":
            raise ValueError(f"targets=True needs a model that computes its own loss; '{name}' does not (use 'gpt')")
        inputs = inputs + _token_ids(config, batch=batch, seq=seq, generator=generator, device=device)
    return model.eval(), inputs
