"""Rules for convolution, pooling, normalisation, padding, upsampling, grid sampling and
``repeat_interleave`` (autotp/strategies/rules/conv.py, norm.py), checked by brute force.

Every strategy of every node of each small model below is run per rank on 2, 3 and 4 ranks and
compared with the unsharded result (``autotp.rewrite.rule_check``). The "offers" tests make sure
the splits that matter are offered (batch, channels, whole groups, unpadded dims) and the wrong
ones are not (spatial dims, padded dims, the dim a tensor of repeats repeats, batch statistics split over the batch).
The ViT and Whisper tests check the conv front-ends of real models; one 2-rank run checks a
conv model end to end with its conv weight split.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autotp.capture.export import CapturedGraph, capture
from autotp.ir.mesh import MeshSpec
from autotp.ir.placement import P, Placement, R, Shard
from autotp.rewrite.rule_check import node_values
from autotp.strategies.engine import NodeKind, NodeSpace, build_strategy_space
from autotp.strategies.rules.registry import OpStrategy
from autotp.testing import run_on_ranks
from tests import _conv_fns
from tests._rule_fns import assert_strategies_hold, captured_with_values
from tests.test_rules import Case, Fn, _space

TP_SIZES = (2, 3, 4)
aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_thread")


X4 = (12, 12, 12, 12)  # (N, C, H, W)
GRID = (12, 12, 24, 2)  # (N, H_out, W_out, 2)

CASES: dict[str, Case] = {
    "conv1d": Case(
        lambda m, x, w, b: (F.conv1d(x, w, b, padding=1), F.conv1d(x, w, stride=2, dilation=2), F.conv1d(x[0], w, b)),
        ((12, 12, 24), (24, 12, 3), (24,)),
    ),
    "conv2d": Case(lambda m, x: m.conv(x), (X4,), lambda: {"conv": nn.Conv2d(12, 24, 3, stride=2, padding=1)}),
    "conv2d_groups": Case(
        lambda m, x: (m.depthwise(x), m.grouped(x)), (X4,),
        lambda: {"depthwise": nn.Conv2d(12, 24, 3, groups=12), "grouped": nn.Conv2d(12, 12, 3, groups=6, bias=False)},
    ),
    "conv3d": Case(lambda m, x: m.conv(x), ((12, 12, 4, 4, 4),), lambda: {"conv": nn.Conv3d(12, 12, 3, padding=1)}),
    "conv_transpose": Case(
        lambda m, x: (m.up(x), m.grouped(x)), ((12, 12, 12),),
        lambda: {"up": nn.ConvTranspose1d(12, 24, 3, stride=2), "grouped": nn.ConvTranspose1d(12, 24, 3, groups=12)},
    ),
    "convolution": Case(
        lambda m, x, w, wt, b: (aten.convolution(x, w, b, [1], [1], [1], False, [0], 1),
                                aten.convolution(x, wt, None, [2], [0], [1], True, [1], 12)),
        ((12, 12, 24), (24, 12, 3), (12, 2, 3), (24,)),
    ),
    "pool": Case(
        lambda m, x: (F.max_pool2d(x, 2), F.max_pool2d(x, 3, 2, padding=1, return_indices=True), F.avg_pool2d(x, 2),
                      F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False), F.adaptive_avg_pool2d(x, 3),
                      F.adaptive_max_pool2d(x, 3, return_indices=True), F.max_pool2d(x[0], 2)),
        (X4,),
    ),
    "pool_1d_3d": Case(
        lambda m, x: (F.max_pool1d(x, 2), F.avg_pool1d(x, 3), F.adaptive_avg_pool1d(x, 5), F.adaptive_max_pool1d(x, 4),
                      F.max_pool1d(x, 2, return_indices=True)[1], F.max_pool3d(x[:, :, None].expand(12, 12, 4, 24), 2),
                      F.avg_pool3d(x.view(12, 12, 4, 2, 3), 2), F.adaptive_avg_pool3d(x.view(12, 12, 2, 3, 4), 2)),
        ((12, 12, 24),),
    ),
    "group_norm": Case(
        lambda m, x: (m.gn(x), m.gn3(x[:, :12]), F.group_norm(x, 4), m.gn6(x[:, 12:])), ((12, 24, 12),),
        lambda: {"gn": nn.GroupNorm(12, 24), "gn3": nn.GroupNorm(3, 12), "gn6": nn.GroupNorm(6, 12)},
    ),
    "native_group_norm": Case(
        lambda m, x, w, b: aten.native_group_norm(x, w, b, 12, 24, 24, 12, 1e-5), ((12, 24, 4, 6), (24,), (24,)),
    ),
    "batch_norm_eval": Case(
        lambda m, x: (m.bn2(x), m.bn1(x[:, :, 0, 0]), m.plain(x)), (X4,),
        lambda: {"bn2": nn.BatchNorm2d(12), "bn1": nn.BatchNorm1d(12), "plain": nn.BatchNorm2d(12, affine=False)},
    ),
    "batch_norm_batch_stats": Case(  # no running statistics: batch statistics, in train and eval mode
        lambda m, x: (m.bn(x), F.batch_norm(x, None, None, training=True)), (X4,),
        lambda: {"bn": nn.BatchNorm2d(12, track_running_stats=False)},
    ),
    "native_batch_norm": Case(
        lambda m, x, w, b, rm, rv: (aten.native_batch_norm(x, w, b, rm, rv.abs() + 0.5, False, 0.1, 1e-5),
                                    aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5),
                                    aten._native_batch_norm_legit_no_training(x, w, b, rm, rv.abs() + 0.5, 0.1, 1e-5),
                                    aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-5)),
        (X4, (12,), (12,), (12,), (12,)),
    ),
    "instance_norm": Case(
        lambda m, x, rm, rv: (F.instance_norm(x), m.inorm(x), F.instance_norm(x, rm, rv.abs() + 0.5, use_input_stats=False)),
        (X4, (12,), (12,)), lambda: {"inorm": nn.InstanceNorm2d(12, affine=True)},
    ),
    "pad": Case(
        lambda m, x: (F.pad(x, (1, 2)), F.pad(x, (0, 0, 1, 1), value=0.5), F.pad(x, (1, 1, 2, 2), mode="reflect"),
                      F.pad(x, (2, 1, 0, 0), mode="replicate"), F.pad(x, (1, 1, 1, 1), mode="circular"),
                      aten.constant_pad_nd(x, [0, 0, 2, -1], 0.0), aten.reflection_pad1d(x[0], [1, 1]), F.pad(x, (0, 3))),
        (X4,),
    ),
    "upsample": Case(
        lambda m, x: (F.interpolate(x, scale_factor=2), F.interpolate(x, size=(18, 30), mode="bilinear"),
                      F.interpolate(x, scale_factor=1.5, mode="nearest-exact"), F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=True),
                      F.interpolate(x, size=(6, 8), mode="bilinear", antialias=True), F.interpolate(x[0], scale_factor=2, mode="linear"),
                      F.interpolate(x.view(12, 12, 4, 6, 6), scale_factor=2, mode="trilinear"), F.interpolate(x[0], size=30)),
        (X4,),
    ),
    "grid_sample": Case(
        lambda m, x, g, v, g3: (F.grid_sample(x, g.tanh(), align_corners=False), F.grid_sample(x, g.tanh(), mode="nearest", padding_mode="border"),
                                F.grid_sample(v, g3.tanh(), align_corners=True)),
        (X4, GRID, (12, 12, 4, 4, 4), (12, 12, 4, 4, 3)),
    ),
    "repeat_interleave": Case(
        lambda m, x: (x.repeat_interleave(3, dim=1), x.repeat_interleave(2, dim=-1), x.repeat_interleave(2),
                      torch.repeat_interleave(x, torch.full((24,), 2), dim=1, output_size=48)),
        ((12, 24, 12),),
    ),
}


def _randomize(model: nn.Module, seed: int) -> None:
    """Redraw every parameter and float buffer: default zero biases, unit weights and running
    statistics of 0 and 1 would hide a wrong placement (running variances stay positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dtype.is_floating_point:
                noise = torch.randn(t.shape, generator=gen)
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise / max(t.shape[-1], 1) ** 0.5 if t.dim() > 1 else noise)


@functools.cache
def _case(name: str) -> tuple[CapturedGraph, dict[str, Any]]:
    case = CASES[name]
    torch.manual_seed(0)
    model = Fn(case.fn, **case.modules()).eval()
    _randomize(model, seed=1)
    gen = torch.Generator().manual_seed(2)
    return captured_with_values(model, *(torch.randn(s, generator=gen) for s in case.shapes))


def _op_spaces(case: str, tp_size: int, op: str) -> list[NodeSpace]:
    captured, _ = _case(case)
    found = [n for n in _space(captured, tp_size).nodes if n.kind is NodeKind.OP and n.op.startswith(op)]
    assert found, f"{case} has no {op} node"
    return found


def _split_dims(space: NodeSpace, slot: int = 0) -> set[int]:
    """The dims of input ``slot`` some strategy of ``space`` splits."""
    return {p.dim for s in space.strategies if isinstance(p := s.inputs[slot], Shard)}


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_of_op(case: str, tp_size: int) -> None:
    captured, values = _case(case)
    checked = assert_strategies_hold(captured, values, tp_size=tp_size)
    space = _space(captured, tp_size)
    ops = [n for n in space.nodes if n.kind is NodeKind.OP]
    assert not [n.op for n in ops if n.fallback], f"{case}: ops without a rule"
    assert checked == sum(len(n.strategies) for n in ops)


@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 3)], ids=str)
def test_grouped_splits_on_2d_meshes(mesh_shape: tuple[int, int]) -> None:
    """Groups split over two axes must divide by both sizes together: 6 groups do on (2, 3), not on
    (2, 2), where each rank would hold one and a half. Every combination offered runs right."""
    for case in ("conv2d_groups", "conv_transpose", "convolution", "group_norm", "native_group_norm"):
        captured, values = _case(case)
        assert assert_strategies_hold(captured, values, mesh_shape=mesh_shape) > 0
    captured, _ = _case("conv2d_groups")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(captured, MeshSpec.of(mesh_shape))
    depthwise, grouped = (n for n in space.nodes if n.op.startswith("aten.conv2d"))
    both = ((Shard(1), Shard(1)), (Shard(0), Shard(0)), (Shard(0), Shard(0)))  # channels over both axes
    assert any(s.inputs == both for s in depthwise.strategies)  # 12 groups
    assert any(s.inputs == both[:2] for s in grouped.strategies) == (mesh_shape == (2, 3))  # 6 groups
    captured, _ = _case("group_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = build_strategy_space(captured, MeshSpec.of(mesh_shape))
    gn12, *_, gn6 = (n for n in space.nodes if n.op.startswith("aten.group_norm"))
    assert any(s.inputs[0] == (Shard(1), Shard(1)) for s in gn12.strategies)
    assert any(s.inputs[0] == (Shard(1), Shard(1)) for s in gn6.strategies) == (mesh_shape == (2, 3))


# --- the rules offer what matters, and not what would be wrong ---------------------------------

def _offers(space: NodeSpace, inputs: tuple[Placement, ...], output: Placement | tuple[Placement, ...]) -> bool:
    return OpStrategy(inputs, output) in space.strategies


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_conv_offers_batch_and_channel_splits_never_spatial(tp_size: int) -> None:
    (conv,) = _op_spaces("conv2d", tp_size, "aten.conv2d")
    assert _offers(conv, (Shard(0), R, R), Shard(0))  # batch
    assert _offers(conv, (R, Shard(0), Shard(0)), Shard(1))  # output channels
    assert _offers(conv, (Shard(1), Shard(1), P), P)  # input channels: partial sums
    assert _split_dims(conv) == {0, 1} and _split_dims(conv, 1) == {0, 1}  # no spatial or kernel split
    assert all(not isinstance(s.output, Shard) or s.output.dim < 2 for s in conv.strategies)
    with_bias, no_bias, unbatched = _op_spaces("conv1d", tp_size, "aten.conv1d")
    assert _offers(no_bias, (Shard(1), Shard(1)), P)
    assert _offers(unbatched, (R, Shard(0), Shard(0)), Shard(0))  # (C, L): channels lead
    assert _offers(unbatched, (Shard(0), Shard(1), P), P)
    assert _split_dims(unbatched) == {0}
    up, _ = _op_spaces("conv_transpose", tp_size, "aten.conv_transpose1d")
    assert _offers(up, (R, Shard(1), Shard(0)), Shard(1))  # transposed weights are (C_in, C_out/g, k)
    assert _offers(up, (Shard(1), Shard(0), P), P)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_grouped_conv_splits_whole_groups(tp_size: int) -> None:
    depthwise, grouped = _op_spaces("conv2d_groups", tp_size, "aten.conv2d")
    assert _offers(depthwise, (Shard(1), Shard(0), Shard(0)), Shard(1))  # 12 groups
    assert _offers(grouped, (Shard(1), Shard(0)), Shard(1)) == (6 % tp_size == 0)  # 6 groups
    for space in (depthwise, grouped):  # groups > 1: no output-channel split with x whole, no contraction
        assert not any(s.inputs[0] == R and s.output == Shard(1) for s in space.strategies)
        assert not any(s.inputs[0] == Shard(1) and s.output == P for s in space.strategies)
    _, transposed = _op_spaces("convolution", tp_size, "aten.convolution")
    assert _offers(transposed, (Shard(1), Shard(0)), Shard(1))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_pooling_and_upsampling_split_leading_dims(tp_size: int) -> None:
    max_pool = _op_spaces("pool", tp_size, "aten.max_pool2d.default")
    assert _split_dims(max_pool[0]) == {0, 1} and _split_dims(max_pool[1]) == {0}  # (N, C, H, W) and (C, H, W)
    assert not any(s.output == P for s in max_pool[0].strategies)  # max is not linear
    (with_indices,) = _op_spaces("pool", tp_size, "aten.max_pool2d_with_indices")
    assert _offers(with_indices, (Shard(1),), (Shard(1), Shard(1)))
    avg = _op_spaces("pool", tp_size, "aten.avg_pool2d")[0]
    assert _split_dims(avg) == {0, 1} and _offers(avg, (P,), P)
    pool3d = _op_spaces("pool_1d_3d", tp_size, "aten.avg_pool3d")[0]
    assert _split_dims(pool3d) == {0, 1}
    for op in ("aten.upsample_nearest2d", "aten.upsample_bilinear2d", "aten.upsample_bicubic2d", "aten.upsample_trilinear3d", "aten.upsample_linear1d"):
        for space in _op_spaces("upsample", tp_size, op):
            assert _split_dims(space) == {0, 1}, op
            assert _offers(space, (P,), P), op


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_padding_splits_only_unpadded_dims(tp_size: int) -> None:
    last, middle, reflect, replicate, circular, right_only = _op_spaces("pad", tp_size, "aten.pad")
    assert _split_dims(last) == {0, 1, 2} and _offers(last, (P,), P)  # pads 0
    assert _split_dims(middle) == {0, 1, 3} and not _offers(middle, (P,), P)  # pads 0.5: not linear
    assert _split_dims(reflect) == {0, 1} and _offers(reflect, (P,), P)
    assert _split_dims(replicate) == {0, 1, 2}
    assert _split_dims(circular) == {0, 1}
    assert _split_dims(right_only) == {0, 1, 2}  # (0, 3): padded at the end only
    (constant,) = _op_spaces("pad", tp_size, "aten.constant_pad_nd")
    assert _split_dims(constant) == {0, 1, 3}  # a negative pad crops dim 2


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_norms_split_groups_and_channels(tp_size: int) -> None:
    gn, gn3, plain, _ = _op_spaces("group_norm", tp_size, "aten.group_norm")
    assert _offers(gn, (Shard(0), R, R), Shard(0))
    assert _offers(gn, (Shard(1), Shard(0), Shard(0)), Shard(1))  # 12 groups
    assert _offers(gn3, (Shard(1), Shard(0), Shard(0)), Shard(1)) == (tp_size == 3)  # 3 groups
    assert _split_dims(plain) == ({0, 1} if 4 % tp_size == 0 else {0}) and 2 not in _split_dims(gn)  # 4 groups
    assert not any(s.output == P for s in gn.strategies)
    bn2, bn1, _ = _op_spaces("batch_norm_eval", tp_size, "aten.batch_norm")
    assert _offers(bn2, (Shard(1),) + (Shard(0),) * 4, Shard(1))  # channels, with every statistic
    assert _offers(bn2, (Shard(0),) + (R,) * 4, Shard(0))  # eval: a fixed affine map per channel
    assert _split_dims(bn2) == {0, 1, 2, 3} and _split_dims(bn1) == {0, 1}
    for batch_stats in _op_spaces("batch_norm_batch_stats", tp_size, "aten.batch_norm"):
        assert _split_dims(batch_stats) == {1}  # statistics over the batch and spatial dims
    plain_in, affine_in, fixed_in = _op_spaces("instance_norm", tp_size, "aten.instance_norm")
    assert _split_dims(plain_in) == {0, 1} and _offers(affine_in, (Shard(1), Shard(0), Shard(0)), Shard(1))
    assert _split_dims(fixed_in) == {0, 1, 2, 3}
    native_eval, native_train = _op_spaces("native_batch_norm", tp_size, "aten.native_batch_norm")
    assert _offers(native_train, (Shard(1), Shard(0), Shard(0)), (Shard(1), Shard(0), Shard(0)))
    assert _split_dims(native_train) == {1} and _split_dims(native_eval) == {0, 1, 2, 3}


def test_batch_norm_running_statistics_written_in_training_stay_replicated() -> None:
    """Training mode updates the running statistics in place: mutation.py pins the node whole."""
    model = Fn(lambda m, x: m.bn(x), bn=nn.BatchNorm2d(12)).train()
    captured = capture(model, (torch.randn(X4),))
    (bn,) = (n for n in _space(captured, 2).nodes if n.op.startswith("aten.batch_norm"))
    assert all(p == R for s in bn.strategies for p in (*s.inputs, *s.outputs()))


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_repeat_interleave_and_grid_sample_offer_their_splits(tp_size: int) -> None:
    along_1, along_last, flat = _op_spaces("repeat_interleave", tp_size, "aten.repeat_interleave.self_int")
    assert _split_dims(along_1) == {0, 1, 2} and _split_dims(along_last) == {0, 1, 2}  # an int repeat splits its dim too
    assert len(flat.strategies) == 1  # no dim: flattened, nothing survives
    (tensor_repeats,) = _op_spaces("repeat_interleave", tp_size, "aten.repeat_interleave.self_Tensor")
    assert _offers(tensor_repeats, (Shard(2), R), Shard(2)) and _split_dims(tensor_repeats) == {0, 2}
    bilinear, _, volume = _op_spaces("grid_sample", tp_size, "aten.grid_sampler")
    assert _offers(bilinear, (Shard(0), Shard(0)), Shard(0))
    assert _offers(bilinear, (Shard(1), R), Shard(1))
    assert _offers(bilinear, (R, Shard(2)), Shard(3))  # output columns follow the grid's
    assert _split_dims(bilinear) == {0, 1}  # x's spatial dims stay whole
    assert _offers(volume, (R, Shard(1)), Shard(2))


# --- real models --------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [_conv_fns.build_vit, _conv_fns.build_whisper_encoder], ids=lambda f: f.__name__)
def test_hf_conv_front_ends_offer_splits(build: Any) -> None:
    """ViT's patch embedding (conv2d) and Whisper's two conv1d get batch and output-channel splits
    at tp 2; every strategy of every node of both models passes the brute-force check."""
    pytest.importorskip("transformers")
    model, inputs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, inputs)
    values = node_values(captured, model, inputs)
    assert_strategies_hold(captured, values, tp_size=2)
    space = _space(captured, 2)
    convs = [n for n in space.nodes if n.op.startswith(("aten.conv1d", "aten.conv2d"))]
    assert len(convs) == (1 if build is _conv_fns.build_vit else 2)
    for conv in convs:
        assert _offers(conv, (Shard(0), R, R), Shard(0)), conv.name
        assert _offers(conv, (R, Shard(0), Shard(0)), Shard(1)), conv.name
    assert not [n.op for n in space.nodes if n.kind is NodeKind.OP and n.fallback]


@pytest.mark.timeout(300)
def test_conv_model_on_two_ranks_equals_original() -> None:
    """Conv1d -> GroupNorm -> pool -> Conv1d under a budget that forces the conv weights to split:
    output and every gradient equal the original's."""
    reports = run_on_ranks(_conv_fns.convnet_equivalence, 2, timeout_seconds=240)
    for report in reports:
        assert report["output_error"] <= 1e-5, report
        assert report["grad_error"] <= 1e-5, report
        assert {"conv1.weight", "conv2.weight"} <= set(report["split"]), report["placements"]
        assert report["local_shapes"]["conv1.weight"][0] * report["local_shapes"]["conv1.weight"][1] < 48 * 12, report
