"""Per-rank peak memory while parallelizing a model four times bigger than each rank's share.

    python -m benchmarks.load_memory                  # MLP example, d_model 2048, 8 layers (1 GiB fp32), 4 gloo ranks
    python -m benchmarks.load_memory --d-model 1024   # a quarter of that

Each row builds the model one way on every rank and parallelizes it under a memory budget that
splits every weight over the 4 ranks, and prints the largest per-rank growth of resident memory
(the kernel's high-water mark over the call, ``autotp.testing.peak_resident_growth``), beside
this rank's share of the state and the full model's size:

- full model on every rank: the model materialised, then parallelized (all that was possible before);
- meta + safetensors: built on the meta device, ``weights=`` a Hugging Face safetensors file;
- meta + DCP: the same from a ``torch.distributed.checkpoint`` directory;
- meta + init: built on the meta device and initialised part by part (``reset_parameters``).

The "meta, no weights" row before the others is the baseline: the same call on the same
architecture at d_model 64 (capture, planning and the rewrite, whose memory does not grow with the
weights). The target (issue 20): peak <= 1.5 x share + baseline, far below the full size.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.examples.mlp import MLP, MLPConfig
from autotp.testing import peak_resident_growth, run_on_ranks

WORLD_SIZE = 4
BASELINE_D_MODEL = 64
MIB = 2**20


def _config(d_model: int, n_layers: int) -> MLPConfig:
    return MLPConfig(d_model=d_model, d_hidden=4 * d_model, n_layers=n_layers)


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _measure(rank: int, world_size: int, d_model: int, n_layers: int, sources: dict[str, str | None]) -> dict[str, dict[str, int]]:
    mesh = init_device_mesh("cpu", (world_size,))
    rows: dict[str, dict[str, int]] = {}
    for label, weights in [("warm-up", None), *sources.items()]:
        size = BASELINE_D_MODEL if label in ("warm-up", "baseline") else d_model

        def build_and_parallelize(size: int = size, label: str = label, weights: str | None = weights) -> autotp.ShardedModule:
            torch.manual_seed(0)
            with torch.device("cpu" if label.startswith("full") else "meta"):
                model = MLP(_config(size, n_layers))
            budget = int(_nbytes(model) / world_size * 1.2)
            return autotp.parallelize(model, mesh, (torch.randn(2, 8, size),), hardware="cpu-gloo", training=False, memory_budget=budget, weights=weights)

        sharded, growth = peak_resident_growth(build_and_parallelize)
        with torch.device("meta"):
            full = _nbytes(MLP(_config(size, n_layers)))
        rows[label] = {"growth": growth, "share": _nbytes(sharded), "full": full}
        del sharded
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        state = MLP(_config(args.d_model, args.layers)).state_dict()
        save_file(state, Path(tmp, "model.safetensors"), metadata={"format": "pt"})
        with warnings.catch_warnings():  # DCP warns that it saves from one process: that is the point
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=Path(tmp, "dcp"), no_dist=True)
        tiny = MLP(_config(BASELINE_D_MODEL, args.layers)).state_dict()
        save_file(tiny, Path(tmp, "tiny.safetensors"), metadata={"format": "pt"})
        del state
        sources: dict[str, str | None] = {
            "baseline": str(Path(tmp, "tiny.safetensors")),
            "full model on every rank": None,
            "meta + safetensors": str(Path(tmp, "model.safetensors")),
            "meta + DCP": str(Path(tmp, "dcp")),
            "meta + init": None,
        }
        ranks = run_on_ranks(_measure, WORLD_SIZE, args.d_model, args.layers, sources, timeout_seconds=1200)
    _print_table(ranks, args)


def _print_table(ranks: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    baseline = max(r["baseline"]["growth"] for r in ranks)
    print(f"MLP example, d_model {args.d_model}, {args.layers} layers, {WORLD_SIZE} gloo ranks; baseline (d_model {BASELINE_D_MODEL}) {baseline / MIB:.0f} MiB")
    print(f"{'':28} {'peak growth':>12} {'share':>9} {'full':>9} {'peak / share':>13} {'peak / full':>12} {'<= 1.5 share + base':>20}")
    for label in [k for k in ranks[0] if k not in ("warm-up", "baseline")]:
        growth = max(r[label]["growth"] for r in ranks)
        share = max(r[label]["share"] for r in ranks)
        full = ranks[0][label]["full"]
        ok = growth <= 1.5 * share + baseline
        print(f"{label:28} {growth / MIB:>8.0f} MiB {share / MIB:>5.0f} MiB {full / MIB:>5.0f} MiB {growth / share:>13.2f} {growth / full:>12.2f} {'yes' if ok else 'NO':>20}")


if __name__ == "__main__":
    main()
