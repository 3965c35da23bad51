"""Hugging Face safetensors checkpoints in one process: the lazy reader, the streaming writer, their errors."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autotp.errors import CheckpointError, ConfigError
from autotp.io.hf_checkpoint import SafetensorsCheckpoint, SafetensorsWriter, is_safetensors_checkpoint
from tests._hf_fns import build_hf_model


def _tensors() -> dict[str, torch.Tensor]:
    """Every dtype and corner the writer must round-trip, in an order that mixes element sizes."""
    gen = torch.Generator().manual_seed(0)
    return {
        "mask": torch.tensor([True, False, True]),
        "w": torch.randn(6, 10, generator=gen),
        "half": torch.randn(3, 4, generator=gen).half(),
        "brain": torch.randn(5, 3, generator=gen).bfloat16(),
        "ids": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "deep": torch.randn(2, 3, 4, generator=gen),
    }


def _write(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> None:
    with SafetensorsWriter(directory, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_shard_size=max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def _slices(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The whole tensor, a row block, a column block, a nested block, and an empty part of each dim."""
    out = [tuple(slice(0, s) for s in shape)]
    if shape:
        out.append((slice(shape[0] // 2, shape[0]), *(slice(0, s) for s in shape[1:])))
        out.append((*(slice(0, s) for s in shape[:-1]), slice(shape[-1] // 2, shape[-1])))
        out.append(tuple(slice(s // 3, s - s // 4) for s in shape))
        out.append((slice(shape[0], shape[0]), *(slice(0, s) for s in shape[1:])))
    return out


def _check_reads(checkpoint: SafetensorsCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    assert set(checkpoint.tensors) == set(expected)
    for name, tensor in expected.items():
        stored = checkpoint.tensors[name]
        assert (stored.name, stored.shape, stored.dtype) == (name, tuple(tensor.shape), tensor.dtype)
        for index in _slices(tuple(tensor.shape)):
            part = checkpoint.read(name, index)
            assert part.dtype == tensor.dtype and torch.equal(part, tensor[index]), (name, index)


def test_writer_one_file_round_trips_every_dtype(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path, tensors, max_shard_size=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert list(loaded) != [] and set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("deep"), tensors["deep"])
    checkpoint = SafetensorsCheckpoint.open(tmp_path)
    _check_reads(checkpoint, tensors)
    assert {s.file for s in checkpoint.tensors.values()} == {tmp_path / "model.safetensors"}
    assert checkpoint.read("scalar", ()).shape == () and checkpoint.read("scalar", ()).item() == 2.5


def test_writer_splits_files_greedily_and_writes_the_index(tmp_path: Path) -> None:
    tensors = _tensors()  # bytes: mask 3, w 240, half 24, brain 30, ids 56, scalar 4, empty 0, deep 96
    _write(tmp_path, tensors, max_shard_size=100)
    expected_files = {  # w (240 > 100) alone; then half+brain+ids (110 > 100 with ids) splits before ids
        "mask": 1, "w": 2, "half": 3, "brain": 3, "ids": 4, "scalar": 4, "empty": 4, "deep": 5,
    }
    names = {k: f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names.values(), "model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: names[k] for name, k in expected_files.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for k, file_name in names.items():
        loaded = load_file(tmp_path / file_name)
        assert set(loaded) == {n for n, f in expected_files.items() if f == k}
        assert all(torch.equal(loaded[n], tensors[n]) for n in loaded)
    _check_reads(SafetensorsCheckpoint.open(tmp_path), tensors)
    _check_reads(SafetensorsCheckpoint.open(tmp_path / "model.safetensors.index.json"), tensors)  # the index's own path


def test_writer_replaces_a_previous_save(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path, tensors, max_shard_size=100)  # five files and an index
    (tmp_path / "config.json").write_text("{}")
    _write(tmp_path, tensors, max_shard_size=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # stale shards would mislead a loader
    _check_reads(SafetensorsCheckpoint.open(tmp_path), tensors)


def test_reader_on_save_file_outputs(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "one.safetensors")
    _check_reads(SafetensorsCheckpoint.open(tmp_path / "one.safetensors"), tensors)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    parts = {"a.safetensors": ["mask", "w", "half"], "b.safetensors": ["brain", "ids", "scalar", "empty", "deep"]}
    for file_name, names in parts.items():
        save_file({n: tensors[n] for n in names}, sharded / file_name)
    (sharded / "weights.safetensors.index.json").write_text(json.dumps({"weight_map": {n: f for f, ns in parts.items() for n in ns}}))
    (sharded / "stray.safetensors").write_text("not read: the index says which files hold the weights")
    _check_reads(SafetensorsCheckpoint.open(sharded), tensors)

    (sharded / "weights.safetensors.index.json").unlink()
    (sharded / "stray.safetensors").unlink()
    _check_reads(SafetensorsCheckpoint.open(sharded), tensors)  # no index: every file is read


def test_reader_on_transformers_save_pretrained(tmp_path: Path) -> None:
    model, _ = build_hf_model("gpt2")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    checkpoint = SafetensorsCheckpoint.open(tmp_path)
    assert len({s.file for s in checkpoint.tensors.values()}) > 1
    state = model.state_dict()
    assert set(checkpoint.tensors) == set(state) - {"lm_head.weight"}  # tied to transformer.wte.weight: stored once
    for name in checkpoint.tensors:
        for index in _slices(tuple(state[name].shape)):
            assert torch.equal(checkpoint.read(name, index), state[name][index]), (name, index)


def test_transformers_loads_what_the_writer_wrote(tmp_path: Path) -> None:
    import transformers

    model, (ids,) = build_hf_model("llama")
    state = model.state_dict()
    _write(tmp_path, state, max_shard_size=100_000)
    model.config.save_pretrained(tmp_path)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == len(state)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in state.items())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_is_safetensors_checkpoint(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    (tmp_path / "dcp" / "__0_0.distcp").write_bytes(b"")
    assert is_safetensors_checkpoint(tmp_path)
    assert is_safetensors_checkpoint(tmp_path / "model.safetensors")
    assert is_safetensors_checkpoint(tmp_path / "sharded")
    assert not is_safetensors_checkpoint(tmp_path / "dcp")
    assert not is_safetensors_checkpoint(tmp_path / "missing")
    assert not is_safetensors_checkpoint(tmp_path / "dcp" / ".metadata")


def _raw_file(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _error(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_reader_errors_name_the_file_and_tensor(tmp_path: Path) -> None:
    message = _error(SafetensorsCheckpoint.open, tmp_path / "nowhere")
    assert "nowhere" in message and "does not exist" in message

    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"")
    (dcp / "__0_0.distcp").write_bytes(b"")
    message = _error(SafetensorsCheckpoint.open, dcp)
    assert str(dcp) in message and "__0_0.distcp" in message and "model.safetensors" in message and "DCP" in message and ".metadata" in message

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(4, 4), "b": torch.randn(4)}, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    message = _error(SafetensorsCheckpoint.open, truncated)
    assert str(truncated) in message and "truncated or corrupt" in message and "re-download" in message
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    assert str(garbage) in _error(SafetensorsCheckpoint.open, garbage)

    odd = tmp_path / "odd.safetensors"
    _raw_file(odd, {"packed": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1))
    message = _error(SafetensorsCheckpoint.open, odd)
    assert "'packed'" in message and str(odd) in message and "F4" in message and "BF16" in message

    message = _indexed_dir_error(tmp_path / "missing_file", "model-00001-of-00002.safetensors", {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    assert "model-00002-of-00002.safetensors" in message and "'b'" in message and "missing" in message
    message = _indexed_dir_error(tmp_path / "absent", "model-00001-of-00001.safetensors", {"a": "model-00001-of-00001.safetensors", "c": "model-00001-of-00001.safetensors"})
    assert "'c'" in message and "model-00001-of-00001.safetensors" in message and "does not hold it" in message

    bad_index = tmp_path / "bad_index"
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json" in _error(SafetensorsCheckpoint.open, bad_index)

    twice = tmp_path / "twice"
    twice.mkdir()
    save_file({"a": torch.ones(2)}, twice / "x.safetensors")
    save_file({"a": torch.ones(2)}, twice / "y.safetensors")
    message = _error(SafetensorsCheckpoint.open, twice)
    assert "'a'" in message and "x.safetensors" in message and "y.safetensors" in message

    not_weights = tmp_path / "weights.bin"
    not_weights.write_bytes(b"")
    assert "weights.bin" in _error(SafetensorsCheckpoint.open, not_weights)


def test_read_errors_name_the_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 6)}, path)
    checkpoint = SafetensorsCheckpoint.open(tmp_path)
    message = _error(checkpoint.read, "v", (slice(0, 1),))
    assert "'v'" in message and str(tmp_path) in message and "w" in message
    for index in [(slice(0, 4),), (slice(0, 5), slice(0, 6)), (slice(2, 1), slice(0, 6)), (slice(0, 4, 2), slice(0, 6))]:
        message = _error(checkpoint.read, "w", index)
        assert "'w'" in message and str(path) in message and "[4, 6]" in message, index
    path.write_bytes(path.read_bytes()[:40])  # changed under the open checkpoint
    message = _error(checkpoint.read, "w", (slice(0, 2), slice(0, 6)))
    assert "'w'" in message and str(path) in message and "[0:2, 0:6]" in message


def test_writer_errors(tmp_path: Path) -> None:
    specs = [("a", (2, 3), torch.float32), ("b", (4,), torch.int64)]
    with pytest.raises(ConfigError, match="max_shard_size"):
        SafetensorsWriter(tmp_path, specs, max_shard_size=0)
    assert "'a'" in _error(SafetensorsWriter, tmp_path, [*specs, ("a", (1,), torch.float32)], max_shard_size=100)
    message = _error(SafetensorsWriter, tmp_path, [("c", (2,), torch.complex128)], max_shard_size=100)
    assert "'c'" in message and "complex128" in message

    for name, tensor in [("b", torch.zeros(4, dtype=torch.int64)), ("a", torch.zeros(3, 2)), ("a", torch.zeros(2, 3, dtype=torch.float64))]:
        writer = SafetensorsWriter(tmp_path / "out", specs, max_shard_size=100)
        message = _error(writer.write, name, tensor)
        assert f"'{name}'" in message and "expected 'a' ([2, 3], torch.float32)" in message and "model.safetensors" in message
        writer.abort()

    with pytest.raises(CheckpointError, match=r"incomplete: 1 tensors were never written \(b\)"), SafetensorsWriter(tmp_path / "out", specs, max_shard_size=100) as writer:
        writer.write("a", torch.zeros(2, 3))


def _indexed_dir_error(directory: Path, file: str, weight_map: dict[str, str]) -> str:
    """The error opening a directory whose index maps ``weight_map`` but whose one file ``file`` holds only ``a``."""
    directory.mkdir()
    save_file({"a": torch.ones(2)}, directory / file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return _error(SafetensorsCheckpoint.open, directory)
