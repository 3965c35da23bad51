"""How well does the cost model price compute on one GPU? (Not a timed test; needs CUDA.)

    python benchmarks/gpu_compute_accuracy.py            # about 2 minutes on one H100/H200

The compute half of ``benchmarks/cost_accuracy.py``, on a GPU: one rank cannot measure a
collective, but it can check every op's price.

1. **Calibrate the compute side** on this GPU as ``autotp calibrate --device cuda`` does
   (matmuls in fp32, bf16 and fp16, the memory-bound kernel, the op classes), one rank.
2. **Forward step times.** For GPT and LLaMA at three sizes in bf16, price the forward step
   (one device: every op replicated) with the shipped datasheet profile (``--datasheet``,
   default ``h200``) and with the calibrated one, and time it (CUDA events, the median of
   batches of back-to-back steps).

It prints the fit report and a markdown table of predicted and measured step times.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import init_device_mesh

from cost_models import HardwareProfile, load_profile
from cost_models.calibrate import CalibrationReport, ComputeFit, fit_compute
import autotp
from autotp.api import plan_model
from autotp.cost.calibrate import default_config, measure_rank, merge
from autotp.examples import build_example
from autotp.testing import run_on_ranks

# (example, label, config, batch, seq)
MODELS: tuple[tuple[str, str, dict, int, int], ...] = (
    ("gpt", "S", dict(n_embd=1024, n_head=16, n_layer=4, vocab_size=8192, block_size=1024), 8, 512),
    ("gpt", "M", dict(n_embd=2048, n_head=16, n_layer=4, vocab_size=16384, block_size=1024), 8, 1024),
    ("gpt", "L", dict(n_embd=4096, n_head=32, n_layer=2, vocab_size=32000, block_size=2048), 4, 2048),
    ("llama", "S", dict(dim=1024, n_heads=16, n_kv_heads=8, n_layers=4, ffn_hidden=2816, vocab_size=8192, max_seq_len=1024), 8, 512),
    ("llama", "M", dict(dim=2048, n_heads=16, n_kv_heads=8, n_layers=4, ffn_hidden=5632, vocab_size=16384, max_seq_len=1024), 8, 1024),
    ("llama", "L", dict(dim=4096, n_heads=32, n_kv_heads=8, n_layers=2, ffn_hidden=11008, vocab_size=32000, max_seq_len=2048), 4, 2048),
)
DTYPE = torch.bfloat16


def calibrated(datasheet: HardwareProfile, fit: ComputeFit) -> HardwareProfile:
    """``datasheet`` with its compute and memory numbers replaced by ``fit``'s (links kept)."""
    return dataclasses.replace(
        datasheet, name=f"{datasheet.name}-measured", peak_flops_per_s=fit.flops_per_s, compute_efficiency=1.0,
        memory_bytes_per_s=fit.memory_bytes_per_s, memory_efficiency=1.0, kernel_launch_seconds=fit.kernel_launch_seconds,
        op_classes=fit.op_classes, matmul_launch_seconds=fit.matmul_launch_seconds, matmul_weight_bytes_per_s=fit.matmul_weight_bytes_per_s,
        source=f"compute measured by {__file__}; links from {datasheet.name}",
    )


def _forward_seconds(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *, batches: int = 7) -> float:
    """Median over batches of the mean step, back-to-back steps in a batch of about 50 ms."""
    with torch.no_grad():
        for _ in range(3):
            module(*inputs)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module(*inputs)
        end.record()
        torch.cuda.synchronize()
        calls = max(1, int(50.0 / max(start.elapsed_time(end), 1e-3)))
        per_batch = []
        for _ in range(batches):
            start.record()
            for _ in range(calls):
                module(*inputs)
            end.record()
            torch.cuda.synchronize()
            per_batch.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(per_batch)


def gpu_rank(rank: int, world: int, datasheet: HardwareProfile, quick: bool) -> tuple[str, list[tuple[str, str, float, float, float]]]:
    torch.cuda.set_device(rank)
    config = dataclasses.replace(default_config(device_type="cuda", quick=quick), collectives=())
    kernels, _, _ = merge([measure_rank(rank, world, config, progress=lambda line: print(line, file=sys.stderr, flush=True))])
    fit = fit_compute(kernels)
    profile = calibrated(datasheet, fit)
    mesh = init_device_mesh("cuda", (1,))
    rows = []
    for example, label, overrides, batch, seq in MODELS:
        meta_model, meta_inputs = build_example(example, device="meta", batch=batch, seq=seq, **overrides)
        meta_model = meta_model.to(DTYPE)
        predicted = [
            plan_model(meta_model, meta_inputs, mesh_shape=(1,), hardware=p, memory_budget=None, training=False).plan.total_seconds
            for p in (datasheet, profile)
        ]
        model, inputs = build_example(example, device="cuda", batch=batch, seq=seq, **overrides)
        module = autotp.parallelize(model.to(DTYPE), mesh, inputs, hardware=profile, training=False)
        rows.append((example, label, predicted[0], predicted[1], _forward_seconds(module, inputs)))
        print(f"{example} {label}: datasheet {predicted[0] * 1e3:.2f} ms, calibrated {predicted[1] * 1e3:.2f} ms, measured {rows[-1][4] * 1e3:.2f} ms", file=sys.stderr, flush=True)
        del model, module
        torch.cuda.empty_cache()
    return CalibrationReport(fit, ()).text(), rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasheet", default="h200", help="the shipped profile to compare (default: h200)")
    parser.add_argument("--quick", action="store_true", help="the quick calibration grid")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_compute_accuracy.py needs a CUDA GPU", file=sys.stderr)
        return 2
    datasheet = load_profile(args.datasheet)
    report, rows = run_on_ranks(gpu_rank, 1, datasheet, args.quick, backend="nccl", timeout_seconds=1800)[0]
    print(f"# Compute fit on {torch.cuda.get_device_name(0)} (torch {torch.__version__})\n\n```\n{report}\n```\n")
    print(f"datasheet profile {args.datasheet}: " + ", ".join(f"{k} {v * datasheet.compute_efficiency / 1e12:.0f} TFLOP/s" for k, v in datasheet.peak_flops_per_s.items())
          + f" achievable, memory {datasheet.memory_bytes_per_s * datasheet.memory_efficiency / 1e12:.2f} TB/s, launch {datasheet.kernel_launch_seconds * 1e6:.1f} us\n")
    print("| model | size | datasheet ms | error | calibrated ms | error | measured ms |")
    print("|---|---|---|---|---|---|---|")
    for example, label, sheet, cal, measured in rows:
        print(f"| {example} | {label} | {sheet * 1e3:.2f} | {sheet / measured - 1:+.0%} | {cal * 1e3:.2f} | {cal / measured - 1:+.0%} | {measured * 1e3:.2f} |")
    for name, column in (("datasheet", 2), ("calibrated", 3)):
        print(f"\nmedian |error|, {name} profile: {statistics.median(abs(r[column] / r[4] - 1) for r in rows):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
