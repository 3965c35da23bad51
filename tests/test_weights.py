"""Meta models with weights from disk: ``parallelize(meta_model, mesh, inputs, weights=PATH)``.

Each rank reads only its part of every tensor, from a Hugging Face safetensors checkpoint (one
file, or sharded with an index) or a DCP checkpoint saved on another world size; the sharded model
equals the original. Bad checkpoints are one typed error, on every rank, before any collective.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from autotp.errors import CheckpointError
from autotp.runtime.materialize import check_checkpoint, open_checkpoint
from autotp.testing import run_on_ranks
from tests import _weights_fns
from tests._hf_fns import ATOL, build_hf_model

MODELS = ("llama", "gpt2")


def _hf_checkpoints(root: Path) -> dict[str, str]:
    """Each model saved by Hugging Face's own save_pretrained, in one file and sharded into several."""
    paths = {}
    for name in MODELS:
        model, _ = build_hf_model(name)
        model.save_pretrained(root / f"{name}-single")
        model.save_pretrained(root / f"{name}-sharded", max_shard_size="40KB")
        assert len(list((root / f"{name}-sharded").glob("*.safetensors"))) > 2  # really sharded
        assert (root / f"{name}-sharded" / "model.safetensors.index.json").is_file()
        paths[f"{name}@single"] = str(root / f"{name}-single")
        paths[f"{name}@sharded"] = str(root / f"{name}-sharded")
    return paths


def _assert_loaded(reports: list[dict[str, dict]]) -> None:
    for rank, report in enumerate(reports):
        for key, r in report.items():
            assert r["max_abs_diff"] <= ATOL, (rank, key, r["max_abs_diff"])
            assert r["split"] and r["collectives"], (rank, key)  # really sharded, not a replicated copy
            assert r["local_numel"] < r["full_numel"], (rank, key)
            assert not r["meta_left"], (rank, key, r["meta_left"])


@pytest.mark.timeout(300)
def test_safetensors_into_meta_models_on_2_ranks(tmp_path: Path) -> None:
    checkpoints = _hf_checkpoints(tmp_path)
    _assert_loaded(run_on_ranks(_weights_fns.load_into_meta, 2, checkpoints, 0.5, timeout_seconds=280))


@pytest.mark.timeout(400)
def test_safetensors_and_dcp_from_2_ranks_into_meta_models_on_4_ranks(tmp_path: Path) -> None:
    checkpoints = {k: v for k, v in _hf_checkpoints(tmp_path).items() if k.endswith("@sharded")}
    run_on_ranks(_weights_fns.save_dcp, 2, list(MODELS), str(tmp_path / "dcp"), timeout_seconds=200)
    checkpoints.update({f"{name}@dcp": str(tmp_path / "dcp" / name) for name in MODELS})
    _assert_loaded(run_on_ranks(_weights_fns.load_into_meta, 4, checkpoints, 1.25, timeout_seconds=380))


def _bad_checkpoints(root: Path) -> dict[str, Path]:
    """One safetensors checkpoint of the tiny LLaMA per way a checkpoint goes wrong."""
    model, _ = build_hf_model("llama")
    model.save_pretrained(root / "good", max_shard_size="40KB")
    state = {k: v.contiguous() for k, v in load_file(next((root / "good").glob("*00001*.safetensors"))).items()}
    full = {}
    for f in sorted((root / "good").glob("*.safetensors")):
        full.update(load_file(f))
    cases = {"good": root / "good"}

    def variant(name: str, tensors: dict[str, torch.Tensor]) -> None:
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        cases[name] = root / name

    variant("missing", {k: v for k, v in full.items() if k != "model.norm.weight"})
    variant("shape", {**full, "model.norm.weight": torch.ones(65)})
    variant("dtype", {**full, "model.norm.weight": full["model.norm.weight"].to(torch.int32)})
    variant("unexpected", {**full, "model.extra.weight": torch.ones(3)})
    (root / "truncated").mkdir()
    data = (root / "missing" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = root / "truncated" / "model.safetensors"
    (root / "empty").mkdir()
    (root / "empty" / "config.json").write_text("{}")
    cases["no_weights"] = root / "empty"
    index = json.loads((root / "good" / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (root / "lost_file").mkdir()
    for f in (root / "good").iterdir():
        if f.name != lost:
            (root / "lost_file" / f.name).write_bytes(f.read_bytes())
    cases["lost_file"] = root / "lost_file"
    assert state  # the first file holds tensors
    return cases


# case -> what the message must name besides the path
EXPECTED = {
    "missing": ["missing 1", "model.norm.weight"],
    "shape": ["model.norm.weight", "[65]", "[64]"],
    "dtype": ["model.norm.weight", "int32", "float32"],
    "unexpected": ["unexpected 1", "model.extra.weight"],
    "truncated": ["truncated"],
    "no_weights": ["model.safetensors"],
    "lost_file": [],
}


def test_bad_checkpoints_are_one_typed_error_naming_the_file_and_tensor(tmp_path: Path) -> None:
    cases = _bad_checkpoints(tmp_path)
    model, _ = build_hf_model("llama")
    meta = _weights_fns.meta_copy(model)
    check_checkpoint(meta, open_checkpoint(cases["good"]), strict=True, convert_dtypes=False)
    for case, words in EXPECTED.items():
        with pytest.raises(CheckpointError) as caught:
            check_checkpoint(meta, open_checkpoint(cases[case]), strict=True, convert_dtypes=False)
        message = str(caught.value)
        assert str(cases[case].parent if case == "truncated" else cases[case]) in message, (case, message)
        for word in words:
            assert word in message, (case, word, message)
    check_checkpoint(meta, open_checkpoint(cases["unexpected"]), strict=False, convert_dtypes=False)  # strict=False skips extras
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


@pytest.mark.timeout(200)
def test_bad_checkpoints_raise_on_every_rank_without_a_hang(tmp_path: Path) -> None:
    cases = {k: str(v) for k, v in _bad_checkpoints(tmp_path).items() if k in ("good", "missing", "truncated", "no_weights")}
    model, _ = build_hf_model("llama")
    with warnings.catch_warnings():  # DCP warns that it saves from one process
        warnings.simplefilter("ignore")
        dcp.save(model.state_dict(), checkpoint_id=tmp_path / "dcp", no_dist=True)
    for data in (tmp_path / "dcp").glob("*.distcp"):  # the metadata is whole: the loss shows when the data is read
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    cases["dcp_truncated"] = str(tmp_path / "dcp")
    seen = run_on_ranks(_weights_fns.bad_checkpoints, 2, cases, str(tmp_path / "nowhere"), timeout_seconds=180)
    for rank, outcomes in enumerate(seen):
        assert outcomes["good"] == "ok", (rank, outcomes["good"])
        for case in ("missing", "truncated", "no_weights", "dcp_truncated"):
            assert outcomes[case].startswith("CheckpointError"), (rank, case, outcomes[case])
        assert "dcp" in outcomes["dcp_truncated"] and "distcp" in outcomes["dcp_truncated"], outcomes["dcp_truncated"]  # names the data file
    assert seen[1]["only_rank1"].startswith("CheckpointError") and "nowhere" in seen[1]["only_rank1"]
    assert seen[0]["only_rank1"].startswith("PeerRankError") and "rank 1" in seen[0]["only_rank1"], seen[0]["only_rank1"]


@pytest.mark.timeout(200)
def test_dtype_converts_on_load_and_a_meta_model_initialises_in_parts(tmp_path: Path) -> None:
    model, _ = build_hf_model("llama")
    model.save_pretrained(tmp_path / "llama")
    bf16 = run_on_ranks(_weights_fns.load_in_bf16, 2, str(tmp_path / "llama"), timeout_seconds=180)
    for rank, r in enumerate(bf16):
        assert r["dtypes"] == ["torch.bfloat16"], (rank, r["dtypes"])
        assert r["max_abs_diff"] <= 0.1 and r["split"], (rank, r)  # bf16 keeps about 3 digits of logits of size ~1
    inits = run_on_ranks(_weights_fns.init_on_meta, 2, timeout_seconds=180)
    for rank, r in enumerate(inits):
        assert r["keys_equal"] and r["state_diff"] == 0.0, (rank, r["state_diff"])  # reset_parameters replayed part by part
        assert r["max_abs_diff"] <= ATOL and r["split"] and r["collectives"], (rank, r)
        assert r["arange_ok"], rank  # init_fn(name, local, global_shape, shard) fills the right part
