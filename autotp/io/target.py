"""What the CLI plans: a built-in example name, ``package.module:function`` or ``path/file.py:function``.

A function target returns a model, or ``(model, example_inputs)``. When it takes a ``device``
argument it is called with ``device="meta"``, so a model too large for this machine is planned
from shapes alone. ``--input NAME:DTYPE[SHAPE]`` (``input_ids:int64[8,2048]``) gives or replaces
the example inputs, and ``--config KEY=VALUE`` overrides an example's config field (or is passed
to the function as a keyword argument).

The built-in examples default to sizes worth planning (GPT-2 small at 8 x 1024 tokens, a
LLaMA-style 8-layer model, a 4096-wide MLP), not the toy sizes the tests use.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import sysconfig
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotp.errors import ConfigError, TargetError


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One ``--input``: a name, a dtype and a global shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name}:{str(self.dtype).removeprefix('torch.')}[{','.join(map(str, self.shape))}]"


@dataclass(frozen=True, slots=True)
class ExampleDefaults:
    """CLI sizes of a built-in example: config overrides and the example input shape."""

    config: Mapping[str, Any]
    batch: int
    seq: int
    about: str


EXAMPLE_DEFAULTS: dict[str, ExampleDefaults] = {
    "gpt": ExampleDefaults(
        {"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}, batch=8, seq=1024,
        about="GPT-2 small (124M parameters; nanoGPT's padded vocabulary) at 8 x 1024 tokens",
    ),
    "llama": ExampleDefaults(
        {"vocab_size": 32000, "dim": 1024, "n_layers": 8, "n_heads": 16, "n_kv_heads": 8, "ffn_hidden": 2816, "max_seq_len": 2048},
        batch=4, seq=2048,
        about="a LLaMA-style decoder (8 layers, dim 1024, 16 heads, 8 KV heads) at 4 x 2048 tokens",
    ),
    "mlp": ExampleDefaults(
        {"d_model": 4096, "d_hidden": 16384, "n_layers": 4}, batch=8, seq=1024,
        about="4 residual MLP blocks, 4096 -> 16384 -> 4096, at 8 x 1024 tokens",
    ),
}

_SEQ_FIELD = {"gpt": "block_size", "llama": "max_seq_len"}


@dataclass(frozen=True, slots=True)
class Target:
    """A model to plan, with example inputs of its global shapes."""

    spec: str  # as the user wrote it
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    about: str
    builtin: str | None = None  # the example name, for built-in targets
    inputs: tuple[InputSpec, ...] = field(default=())

    @property
    def model_name(self) -> str:
        return type(self.model).__name__


_INPUT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([A-Za-z0-9_]+)\s*\[\s*((?:\d+\s*(?:,\s*\d+\s*)*)?)\]\s*$")
_DTYPE_ALIASES = {"long": "int64", "int": "int32", "float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_input(text: str) -> InputSpec:
    """``input_ids:int64[8,2048]`` -> ``InputSpec("input_ids", torch.int64, (8, 2048))``."""
    match = _INPUT.match(text)
    if not match:
        raise ConfigError(f"cannot read --input {text!r}: expected NAME:DTYPE[SHAPE], such as input_ids:int64[8,2048] or x:float32[8,1024,4096]")
    name, dtype_name, dims = match.groups()
    dtype_name = _DTYPE_ALIASES.get(dtype_name.lower(), dtype_name.lower())
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"cannot read --input {text!r}: unknown dtype {match.group(2)!r} (use a torch dtype name such as int64, float32, bfloat16)")
    shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
    if any(d <= 0 for d in shape):
        raise ConfigError(f"cannot read --input {text!r}: every dim must be positive")
    return InputSpec(name, dtype, shape)


def parse_config(items: Sequence[str]) -> dict[str, Any]:
    """``["n_layer=4", "bias=false"]`` -> ``{"n_layer": 4, "bias": False}`` (ints, floats, booleans, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"cannot read --config {item!r}: expected KEY=VALUE, such as n_layer=4")
        out[key.strip()] = _literal(raw.strip())
    return out


def _literal(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def load_target(spec: str, *, inputs: Sequence[InputSpec] = (), config: Mapping[str, Any] | None = None, device: str = "meta") -> Target:
    """Build the model ``spec`` names, on the meta device when it can be, with its example inputs.

    ``device`` is what a function target that takes a ``device`` argument gets (``autotp verify``
    runs the model, so it asks for ``"cpu"``)."""
    from autotp.examples import EXAMPLES

    config = dict(config or {})
    if spec in EXAMPLES:
        return _builtin(spec, inputs, config)
    if ":" not in spec:
        raise ConfigError(
            f"unknown target {spec!r}: expected a built-in example ({', '.join(EXAMPLES)}), "
            "package.module:function or path/to/file.py:function"
        )
    where, _, fn_name = spec.rpartition(":")
    fn = _load_function(where, fn_name, spec)
    kwargs = dict(config)
    try:
        params: Mapping[str, inspect.Parameter] = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "device" in params:
        kwargs["device"] = device
    try:
        returned = fn(**kwargs)
    except Exception as exc:  # the user's code: any failure is one line naming it, not a traceback
        raise TargetError(f"calling {spec} raised {_raised(exc)}: fix the function, or the --config keywords it was given ({_listed_kwargs(kwargs)})") from exc
    model, given = _split_return(returned, spec)
    example_inputs = _make_inputs(model, inputs, spec) if inputs else given
    if example_inputs is None:
        names = ", ".join(_forward_params(model)) or "its inputs"
        raise ConfigError(f"{spec} returned only a model: give its example inputs with --input NAME:DTYPE[SHAPE] for each of {names}")
    on = "meta" if _is_meta(model) else "real weights"
    return Target(spec, model, example_inputs, about=f"{type(model).__name__} from {spec} ({on})", inputs=tuple(inputs))


def builtin_memory_budget(model: nn.Module, tp_size: int, *, training: bool, optimizer: str | None) -> int:
    """The CLI's default budget for built-in examples: 1.3/tp of the replicated model's state
    (parameters, plus gradients and optimizer state when training), as ``autotp demo`` uses. It
    forces the weights to be split, which is what the examples are there to show."""
    from cost_models import state_nbytes

    replicated = sum(state_nbytes(param_nbytes=p.numel() * p.element_size(), numel=p.numel(), training=training, optimizer=optimizer) for p in model.parameters())
    replicated += sum(b.numel() * b.element_size() for b in model.buffers())
    return max(1, int(replicated * min(1.0, 1.3 / tp_size)))


def _builtin(name: str, inputs: Sequence[InputSpec], config: dict[str, Any]) -> Target:
    from autotp.examples import build_example

    defaults = EXAMPLE_DEFAULTS[name]
    merged = {**defaults.config, **config}
    batch, seq = defaults.batch, defaults.seq
    if len(inputs) == 1 and len(inputs[0].shape) >= 2:
        batch, seq = inputs[0].shape[0], inputs[0].shape[1]
    seq_field = _SEQ_FIELD.get(name)
    if seq_field is not None and seq_field not in config:
        merged[seq_field] = max(int(merged[seq_field]), seq)
    try:
        model, example_inputs = build_example(name, device="meta", batch=batch, seq=seq, **merged)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build the '{name}' example: {exc}") from exc
    if inputs:
        example_inputs = _make_inputs(model, inputs, name)
    about = defaults.about if not config and not inputs else f"the '{name}' example" + (f" with {', '.join(f'{k}={v}' for k, v in config.items())}" if config else "")
    return Target(name, model, example_inputs, about=about, builtin=name, inputs=tuple(inputs))


def _load_function(where: str, fn_name: str, spec: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"cannot load target {spec!r}: no such file {where!r}")
        module_name = f"_autotp_target_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot load target {spec!r}: {where!r} is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.resolve().parent))
        try:
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: a syntax error, a failed import, code that raises
            sys.modules.pop(module_name, None)
            raise TargetError(f"cannot load target {spec!r}: running {where} raised {_raised(exc)}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise TargetError(f"cannot load target {spec!r}: importing module {where!r} raised {_raised(exc)}") from exc
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"cannot load target {spec!r}: {where!r} has no function {fn_name!r}")
    return fn


_LIBRARY_DIRS = ("<", str(Path(torch.__file__).parent), str(Path(__file__).parents[1]), sysconfig.get_paths()["stdlib"])


def _raised(exc: BaseException) -> str:
    """``SyntaxError: invalid syntax (model.py, line 3)`` or ``ValueError: bad (at model.py:12)``: the
    exception and the innermost line of the user's code, where a traceback would point."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_LIBRARY_DIRS)]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _listed_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"


def _split_return(returned: Any, spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    if isinstance(returned, nn.Module):
        return returned, None
    if isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[0], nn.Module):
        given = returned[1]
        if isinstance(given, torch.Tensor):
            given = (given,)
        if not isinstance(given, tuple) or not all(isinstance(t, torch.Tensor) for t in given):
            raise ConfigError(f"{spec} returned (model, inputs) but inputs is not a tuple of tensors")
        return returned[0], given
    raise ConfigError(f"{spec} must return an nn.Module or (model, example_inputs), got {type(returned).__name__}")


def _forward_params(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _is_meta(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return not tensors or all(t.is_meta for t in tensors)


def _make_inputs(model: nn.Module, specs: Sequence[InputSpec], spec: str) -> tuple[torch.Tensor, ...]:
    """Meta (or zero) tensors for ``specs``, ordered as ``model.forward`` takes them."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--input names must be distinct, got {', '.join(names)}")
    params = _forward_params(model)
    if params and all(n in params for n in names):
        order = sorted(specs, key=lambda s: params.index(s.name))
        missing = [p for p in params[: len(order)] if p not in names]
        if missing:
            raise ConfigError(f"{spec}: forward({', '.join(params)}) takes '{missing[0]}' before the inputs given; add --input for it")
    elif params and not _takes_varargs(model):
        unknown = next(n for n in names if n not in params)
        raise ConfigError(f"{spec}: --input '{unknown}' is not an argument of forward({', '.join(params)})")
    else:
        order = list(specs)
    device = torch.device("meta") if _is_meta(model) else next(iter(model.parameters())).device
    return tuple(torch.zeros(s.shape, dtype=s.dtype, device=device) for s in order)


def _takes_varargs(model: nn.Module) -> bool:
    try:
        return any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
