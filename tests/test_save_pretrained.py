"""``autotp.save_pretrained`` on real gloo ranks: what it writes, Hugging Face loads as the original."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autotp.ir.placement import Shard
from autotp.testing import run_on_ranks
from tests import _checkpoint_fns, _mesh_fns
from tests._hf_fns import build_hf_model

NAMES = ["llama", "gpt2"]


@pytest.mark.timeout(600)
def test_save_pretrained_loads_in_transformers(tmp_path: Path) -> None:
    import transformers

    reports = run_on_ranks(_checkpoint_fns.save_hf_models, 2, str(tmp_path), NAMES, timeout_seconds=540)
    for name in NAMES:
        assert reports[0][name]["split"], (name, "the weights were really split")
        model, (ids,) = build_hf_model(name)
        saved = tmp_path / name
        index = json.loads((saved / "model.safetensors.index.json").read_text())
        files = sorted(p.name for p in saved.glob("*.safetensors"))
        assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
        reference = tmp_path / f"{name}-by-transformers"
        model.save_pretrained(reference, max_shard_size=_checkpoint_fns.SHARD_SIZE)
        reference_names = set(json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"])
        assert set(index["weight_map"]) == reference_names  # tied weights once, under the same name
        loaded = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
        assert type(loaded) is type(model)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), (name, key)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits), name

    model, _ = build_hf_model(NAMES[-1])
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")  # one file at the default 5GB
    assert set(bf16) == set(json.loads((tmp_path / NAMES[-1] / "model.safetensors.index.json").read_text())["weight_map"])
    for key, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, model.state_dict()[key].bfloat16()), key
    assert (tmp_path / "bf16" / "config.json").is_file()

    for rank, report in enumerate(reports):
        for shape, (local_shape, equal) in report["uneven"].items():
            assert equal, (rank, shape, local_shape)
        assert reports[0]["uneven"]["(1, 4)"][0] == (1, 4) and reports[1]["uneven"]["(1, 4)"][0] == (0, 4)  # an empty part gathers too
        assert str(tmp_path / "a_file" / "model") in report["blocked"] and "rank 0" in report["blocked"], (rank, report["blocked"])
        assert str(tmp_path / "full") in report["disk_full"] and "No space left on device" in report["disk_full"], (rank, report["disk_full"])
        assert [e.split(" ")[0] for e in report["config_errors"]] == ["max_shard_size", "max_shard_size", "dtype", "config"], report["config_errors"]
    assert not (tmp_path / "never").exists()
    assert reports[0]["writes_before_failure"] == 3 and reports[1]["writes_before_failure"] == 0  # rank 0 stopped writing, kept gathering
    assert not (tmp_path / "full" / "config.json").exists()


@pytest.mark.timeout(600)
def test_save_pretrained_on_a_2x2_mesh(tmp_path: Path) -> None:
    import transformers

    plan = _mesh_fns.plan_2d("hf-gpt2")
    assert all(any(isinstance(p[axis], Shard) for p in plan.sharded_state().values()) for axis in (0, 1))  # both axes split weights
    saved = tmp_path / "gpt2"
    reports = run_on_ranks(_checkpoint_fns.save_on_mesh, 4, str(saved), plan.to_dict(), timeout_seconds=540)
    model, (ids,) = build_hf_model("gpt2")
    assert len(list(saved.glob("*.safetensors"))) > 1
    loaded = transformers.GPT2LMHeadModel.from_pretrained(saved).eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for report in reports:  # the writer is at (0, 0); the others hear of its failure over both axes
        assert f"{saved}-full" in report["disk_full"] and "No space left on device" in report["disk_full"], report
        assert report["writes_before_failure"] == (3 if report["coordinate"] == (0, 0) else 0), report
