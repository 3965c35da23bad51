"""A capture failure says what torch.export tripped on and what to do about that cause.

Each case is a model a user plausibly writes; the hint must name its real cause and must not
send the user after a different one (issue 16: a Hugging Face cache was blamed on control flow).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autotp
from autotp.capture.export import capture


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a tensor's values
            return x * 2
        return x


class ReadsAValue(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(int(x.max().item()))


class ReturnsAnObject(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"y": x * 2, "state": object()}


class WrongInputWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TakesAMask(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * mask


class UsesNumpy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)


def _capture_error(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    with pytest.raises(autotp.CaptureError) as info:
        capture(model, inputs)
    assert info.value.__cause__ is not None
    return str(info.value)


def test_hugging_face_cache_output_names_the_cache_and_use_cache() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # use_cache left at its default, True, as a user would
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    message = _capture_error(model, (torch.zeros(2, 8, dtype=torch.long, device="meta"),))
    assert "could not capture model 'LlamaForCausalLM'" in message
    assert "returns an object of type DynamicCache" in message
    assert "use_cache=False" in message
    assert "control flow" not in message
    assert "<string>" not in message  # no frame of code torch generated


def test_non_tensor_output_names_the_type_and_says_return_tensors() -> None:
    message = _capture_error(ReturnsAnObject(), (torch.randn(3),))
    assert "returns an object of type object, which is not a tensor" in message
    assert "return only tensors" in message
    assert "control flow" not in message


@pytest.mark.parametrize("model", [DataDependent(), ReadsAValue()], ids=["branch", "item"])
def test_data_dependent_control_flow_keeps_its_hint(model: nn.Module) -> None:
    message = _capture_error(model, (torch.randn(3),))
    assert "data-dependent Python control flow" in message
    assert "torch.cond" in message
    assert "test_capture_errors.py" in message  # points at the user's line
    assert "use_cache" not in message


def test_inputs_the_model_rejects_are_not_blamed_on_control_flow() -> None:
    message = _capture_error(WrongInputWidth(), (torch.randn(3, 5),))
    assert "example_inputs are 1 tensor (float32[3, 5]), and forward() rejects one's shape" in message
    assert "[3, 5]" in message  # torch's own reason, with the shapes
    assert "control flow" not in message


def test_a_missing_input_points_at_the_call_not_at_the_standard_library() -> None:
    message = _capture_error(TakesAMask(), (torch.randn(3),))
    assert "missing a required argument: 'mask'" in message
    assert "forward() takes x, mask; example_inputs gave 1 tensor (float32[3])" in message
    assert "inspect.py" not in message


def test_inputs_on_another_device_than_the_model_say_to_make_them_there() -> None:
    with torch.device("meta"):
        model = WrongInputWidth()
    message = _capture_error(model, (torch.randn(2, 4),))  # a meta model, real CPU inputs
    assert "the model and the example inputs are on different devices (cpu and meta)" in message
    assert 'device="meta"' in message
    assert "control flow" not in message


def test_numpy_in_forward_says_to_use_torch_ops() -> None:
    message = _capture_error(UsesNumpy(), (torch.randn(3),))
    assert "numpy" in message and "use torch ops instead" in message
    assert "control flow" not in message
