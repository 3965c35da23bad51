"""Conv front-end models train sharded equal to the original on 2 ranks.

A toy HF ViT (conv2d patch embedding), a toy Whisper encoder (conv1d, then a stride-2 conv1d)
and a small CNN (conv2d -> BatchNorm2d in train mode -> max pool -> conv2d -> GroupNorm ->
adaptive pool -> Linear), planned for training under a budget that fits only with every
divisible weight split, each conv pinned to an output- or input-channel split
(``_conv_model_fns.PINS``): output, every gradient, the loss, and the parameters and buffers
(batch norm's running stats included) after one AdamW step equal the unsharded model's, and every
conv weight is really split (half its pinned dim on each rank). One more test checks
that ViT's patch-embedding conv is priced as the matmul it is.
"""
from __future__ import annotations

import warnings

import pytest

from autotp.api import plan_model
from autotp.cost.model import CostModel, node_flops, resolve_hardware
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import R, Shard
from autotp.strategies.rules.registry import OpStrategy
from autotp.testing import run_on_ranks
from tests import _conv_model_fns


@pytest.mark.timeout(240)
def test_conv_models_train_equal_to_original() -> None:
    pytest.importorskip("transformers")
    reports = run_on_ranks(_conv_model_fns.conv_training_equivalence, 2, list(_conv_model_fns.MODELS), 0.01, timeout_seconds=180)
    for rank, report in enumerate(reports):
        assert set(report) == set(_conv_model_fns.MODELS)
        for name, r in report.items():
            assert r["output_error"] <= 1e-5 * max(1.0, r["output_scale"]), (rank, name, r["output_error"])
            assert max(r["grad_errors"].values()) <= 1e-5, (rank, name, r["grad_errors"])
            reference, sharded = r["losses"]
            assert abs(reference - sharded) <= 1e-5 * max(1.0, abs(reference)), (rank, name, r["losses"])
            assert max(r["state_errors"].values()) <= 1e-4, (rank, name, r["state_errors"])
            split = {n for n, p in r["placements"].items() if p != "R"}
            for n, shape in r["local_shapes"].items():  # the local shape is the split one
                assert (n in split) == (shape != r["full_shapes"][n]), (rank, name, n, shape, r["placements"][n])
            pins = _conv_model_fns.PINS[name]
            assert r["conv_strategies"] == {path: str(st) for path, st in pins.items()}, (name, r["conv_strategies"])
            for path, strategy in pins.items():  # the conv weight is split on every rank
                dim = strategy.inputs[1].dim  # type: ignore[union-attr]  # a Shard
                local, full = r["local_shapes"][f"{path}.weight"], r["full_shapes"][f"{path}.weight"]
                assert local[dim] * 2 == full[dim] and local[:dim] + local[dim + 1:] == full[:dim] + full[dim + 1:], (rank, name, path, local)
        cnn = report["cnn"]  # batch norm in train mode wrote its running stats in place, on both forwards: replicated, equal
        assert cnn["batches_tracked"] == 2 and cnn["placements"]["bn.running_mean"] == "R", (cnn["batches_tracked"], cnn["placements"])
        assert max(cnn["state_errors"][f"bn.running_{s}"] for s in ("mean", "var")) <= 1e-5, cnn["state_errors"]


def test_vit_patch_embedding_priced_as_its_matmul() -> None:
    """The patch-embedding conv costs what the same matmul over the patches costs (2 FLOPs per
    output element and input-channel x kernel entry), and a weight split makes it cheaper."""
    pytest.importorskip("transformers")
    model, inputs = _conv_model_fns.build_conv_model("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = plan_model(model, inputs, mesh_shape=(2,), hardware="h100-sxm", memory_budget=None, training=True)
    (conv,) = [n for n in result.space.nodes if n.op.startswith("aten.conv2d")]
    batch, channels, size, _ = inputs[0].shape
    patch, hidden = 4, 48
    assert node_flops(conv) == 2 * batch * (size // patch) ** 2 * hidden * channels * patch * patch
    cost = CostModel(resolve_hardware("h100-sxm"), MeshSpec.of(2), training=True, optimizer="adamw")
    seconds = {st.axis(0): cost.compute_seconds(conv, st) for st in conv.strategies}
    replicated = seconds[OpStrategy((R, R, R), R)]
    assert seconds[OpStrategy((R, Shard(0), Shard(0)), Shard(1))] < replicated
    assert seconds[OpStrategy((Shard(0), R, R), Shard(0))] < replicated
