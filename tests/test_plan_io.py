"""Plan files: the JSON round trip, strict reading, and the graph fingerprint. One process, meta models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import autotp
from autotp.api import _apply_plan, plan_model
from autotp.examples import build_example
from autotp.io.fingerprint import canonical_entries, node_entry
from autotp.io.plan_align import align_plan
from autotp.io.plan_io import SCHEMA_VERSION, plan_from_dict, plan_to_dict
from autotp.ir.mesh import MeshSpec
from autotp.ir.values import TensorMeta, ValueRef, format_value


@pytest.fixture(scope="module")
def gpt_plan() -> autotp.Plan:
    model, inputs = build_example("gpt", device="meta")
    budget = sum(p.numel() * 4 for p in model.parameters()) * 4 // 3  # training state must be split
    return autotp.plan(model, inputs, mesh_shape=(4,), hardware="cpu-gloo", memory_budget=budget)


def test_json_round_trip_is_exact(gpt_plan: autotp.Plan, tmp_path: Path) -> None:
    assert any(n.conversions for n in gpt_plan.nodes) and gpt_plan.sharded_state()
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(gpt_plan)))) == gpt_plan
    path = tmp_path / "plan.json"
    gpt_plan.save(str(path))
    loaded = autotp.Plan.load(str(path))
    assert loaded == gpt_plan and loaded.fingerprint.startswith("sha256:")
    assert loaded.summary() == gpt_plan.summary()


def test_the_plan_holds_typed_values_and_json_holds_their_text(gpt_plan: autotp.Plan) -> None:
    """Working data names values by ``ValueRef`` and shapes by ``TensorMeta``; the JSON layer writes
    the text forms the fingerprint hashes and reads them back."""
    data = gpt_plan.to_dict()
    for node, written in zip(gpt_plan.nodes, data["nodes"]):
        assert all(isinstance(ref, ValueRef) for ref in node.inputs)
        assert written["inputs"] == [str(ref) for ref in node.inputs] and written["value"] == format_value(node.output_meta)
        for conversion, written_conversion in zip(node.conversions, written["conversions"]):
            assert isinstance(conversion.value, ValueRef) and written_conversion["value"] == str(conversion.value)


class _Gated(torch.nn.Module):
    """A multi-output op (``split``) read by ``getitem``: values named ``split[0]``, ``split[1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


def test_multi_output_values_round_trip_as_typed_refs() -> None:
    plan = autotp.plan(_Gated(), (torch.randn(4, 16),), mesh_shape=(2,), hardware="cpu-gloo")
    (multi,) = [n for n in plan.nodes if isinstance(n.output_meta, tuple)]
    assert multi.output_meta == (TensorMeta((4, 16), torch.float32), TensorMeta((4, 16), torch.float32))
    indexed = {ref for n in plan.nodes for ref in n.inputs if ref.index is not None}
    assert indexed == {ValueRef(multi.name, 0), ValueRef(multi.name, 1)}
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))) == plan


def test_placements_are_written_as_strings(gpt_plan: autotp.Plan) -> None:
    data = gpt_plan.to_dict()
    assert data["version"] == SCHEMA_VERSION and data["format"] == "autotp.plan"
    placements = {p for n in data["nodes"] for p in n["strategy"]["inputs"]}
    assert placements <= {"R", "P"} | {f"S({d})" for d in range(4)} and "R" in placements


def _write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _edited(plan: autotp.Plan, edit) -> dict:
    data = plan.to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), r"unknown field 'extra'"),
        (lambda d: d["nodes"][3].update(colour="red"), r"unknown field 'nodes\[3\]\.colour'"),
        (lambda d: d.update(version=SCHEMA_VERSION + 1), rf"schema version {SCHEMA_VERSION + 1} is not supported.*newer autotp"),
        (lambda d: d.update(format="something"), r"not an autotp plan"),
        (lambda d: d.pop("fingerprint"), r"missing field 'fingerprint'"),
        (lambda d: d["nodes"][0]["strategy"].update(output="S(x)"), r"nodes\[0\]\.strategy\.output: not a placement: 'S\(x\)'"),
        (lambda d: d.update(mesh_shape=[2, 2]), r"field 'mesh_axis_names' must hold 2 distinct names, one per axis of mesh_shape \[2, 2\], got \['tp'\]"),
        (lambda d: d["nodes"][5].update(compute_seconds="fast"), r"field 'nodes\[5\]\.compute_seconds' must be a number, got a string"),
        (lambda d: d["nodes"][5].update(value="float99[2,3]"), r"nodes\[5\]\.value: 'float99\[2,3\]' is not a tensor value"),
        (lambda d: d["nodes"][5].update(value="float32[2,x]"), r"nodes\[5\]\.value: 'float32\[2,x\]' has a shape that is not a list of integers"),
    ],
    ids=["unknown-top", "unknown-nested", "version", "format", "missing", "placement", "mesh", "type", "dtype", "shape"],
)
def test_bad_plan_files_name_the_field(gpt_plan: autotp.Plan, tmp_path: Path, edit, message: str) -> None:
    path = _write(tmp_path, _edited(gpt_plan, edit))
    with pytest.raises(autotp.PlanFormatError, match=message) as info:
        autotp.Plan.load(path)
    assert "\n" not in str(info.value) and path in str(info.value)


def test_malformed_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(autotp.PlanFormatError, match=r"is not valid JSON: .* line 1 column"):
        autotp.Plan.load(_write(tmp_path, '{"format": "autotp.plan", '))
    with pytest.raises(autotp.PlanFormatError, match=r"cannot read plan file"):
        autotp.Plan.load(str(tmp_path / "absent.json"))
    with pytest.raises(autotp.PlanFormatError, match=r"plan must be an object, got a list"):
        autotp.Plan.load(_write(tmp_path, []))
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(autotp.PlanFormatError, match=r"garbage.json' is not a text file \(byte 0 is not UTF-8\)") as info:
        autotp.Plan.load(str(garbage))
    assert "\n" not in str(info.value)


def test_fingerprint_depends_on_shapes_and_ranks(gpt_plan: autotp.Plan) -> None:
    wider = build_example("gpt", device="meta", n_embd=128)
    other = autotp.plan(*wider, mesh_shape=(4,), hardware="cpu-gloo")
    on_two = autotp.plan(*build_example("gpt", device="meta"), mesh_shape=(2,), hardware="cpu-gloo")
    assert len({gpt_plan.fingerprint, other.fingerprint, on_two.fingerprint}) == 3


def test_applying_to_another_model_names_the_first_difference(gpt_plan: autotp.Plan) -> None:
    model, inputs = build_example("gpt", device="meta", n_embd=128)
    with pytest.raises(autotp.PlanMismatchError, match=r"graph fingerprint differs\): op 0 is 'p_wpe_weight placeholder \(\) -> float32\[64,64\]' in the plan but '.*float32\[64,128\]' in this model"):
        _apply_plan(model, inputs, gpt_plan, MeshSpec.of(4))
    deeper = build_example("gpt", device="meta", n_layer=3)
    with pytest.raises(autotp.PlanMismatchError, match=r"p_blocks_2_ln_1_weight"):
        _apply_plan(*deeper, gpt_plan, MeshSpec.of(4))
    with pytest.raises(autotp.PlanMismatchError, match=r"made for 4 ranks but the mesh has 2"):
        _apply_plan(*build_example("gpt", device="meta"), gpt_plan, MeshSpec.of(2))


def test_layout_only_nodes_do_not_change_the_fingerprint(gpt_plan: autotp.Plan) -> None:
    """Meta attention returns a contiguous tensor, so `.contiguous()` leaves a node on meta that
    the CPU graph lacks; the plan made on meta still applies to the CPU model."""
    meta = [n for n in gpt_plan.nodes if n.op == "aten.contiguous.default"]
    result = plan_model(*build_example("gpt"), mesh_shape=(4,), hardware="cpu-gloo", memory_budget=None)
    cpu_ops = {n.op for n in result.space.nodes}
    assert meta and "aten.contiguous.default" not in cpu_ops  # the premise: the graphs differ
    assert result.plan.fingerprint == gpt_plan.fingerprint
    aligned = align_plan(gpt_plan, result.space)
    assert [n.name for n in aligned.nodes] == [n.name for n in result.space.nodes]
    for node in aligned.nodes:
        assert node.strategy == gpt_plan.node(node.name).strategy
    entries = canonical_entries([node_entry(n) for n in result.space.nodes])
    assert all(e.op != "aten.contiguous.default" for e in entries)
