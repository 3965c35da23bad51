"""``autotp calibrate``: measure this machine and write a hardware profile for the planner."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_EPILOG = """\
The profile is written to the first user profile directory ($AUTOTP_PROFILE_DIR, else
$XDG_CONFIG_HOME/autotp/profiles, else ~/.config/autotp/profiles) as NAME.toml, so that
hardware="NAME" finds it, or to --output PATH (then use hardware="PATH").
See docs/calibration.md.

examples:
  autotp calibrate --nproc 2 --quick
  autotp calibrate --nproc 4 --name ci-cpu4
  autotp calibrate --nproc 8 --device cuda --output profiles/dgx.toml
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure this machine (matmuls, memory, collectives) and write a hardware profile",
        description="Spawns N local ranks (gloo on CPU, NCCL on GPUs), times matmuls over a grid of shapes and dtypes, "
        "a memory-bound kernel, and each collective from 4 KiB to 256 MiB; fits the profile's numbers by least squares, "
        "prints a fit report and writes a profile file usable by name or path.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to measure with (>= 2; default: 2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="a smaller grid (messages up to 16 MiB): under a minute on a 2-core CPU")
    parser.add_argument("--name", default=None, help="profile name (default: local-<device>-<nproc>)")
    parser.add_argument("--output", default=None, help="write the profile here instead of the user profile directory")
    parser.add_argument(
        "--statistic", choices=["median", "min"], default="median",
        help="time of a sample over its repeats: median (default), or min (best of) on a machine other programs load",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed (default: 1800)")
    parser.set_defaults(func=run)


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from cost_models import available_profiles, write_profile
    from cost_models.calibrate import CalibrationError, build_profile, fit_all
    from cost_models.profile_files import user_profile_dirs
    from autotp.cost.calibrate import default_config, describe_machine, measure_rank, memory_capacity_nbytes, merge, merge_overlap
    from autotp.testing import RankError, run_on_ranks

    if args.nproc < 2:
        print("autotp: error: --nproc must be at least 2 (collectives need two ranks)", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and torch.cuda.device_count() < args.nproc:
        print(f"autotp: error: --nproc {args.nproc} needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    name = args.name or f"local-{device}-{args.nproc}"
    if args.output is None and name in available_profiles():
        print(f"autotp: error: {name!r} is a built-in profile name; choose another --name or pass --output PATH", file=sys.stderr)
        return 2
    path = Path(args.output) if args.output else user_profile_dirs()[0] / f"{name}.toml"
    backend = "nccl" if device == "cuda" else "gloo"
    config = default_config(device_type=device, quick=args.quick)
    print(f"autotp calibrate: measuring {config.n_samples(args.nproc)} samples, {config.repeats_text()} of each after {config.warmup} warm-up, on {args.nproc} {device} ranks over {backend} ...", flush=True)
    started = time.perf_counter()
    try:
        ranks = run_on_ranks(measure_rank, args.nproc, config, _progress, timeout_seconds=args.timeout, backend=backend)
    except RankError as exc:
        print(f"autotp: error: a rank failed:\n{exc}", file=sys.stderr)
        return 1
    try:
        report = fit_all(*merge(ranks, statistic=args.statistic), overlap=merge_overlap(ranks))
    except CalibrationError as exc:
        print(f"autotp: error: cannot fit the measurements: {exc}", file=sys.stderr)
        return 1
    description = describe_machine(device, args.nproc, backend) + f", {args.statistic} of {config.repeats_text()}"
    profile = build_profile(report, name=name, device_type=device, memory_capacity_nbytes=memory_capacity_nbytes(device, args.nproc), description=description)
    flags = (" --quick" if args.quick else "") + (f" --statistic {args.statistic}" if args.statistic != "median" else "")
    header = f"Written by `autotp calibrate --nproc {args.nproc}{flags}` on {description}.\n\nFit report:\n{report.text()}"
    write_profile(profile, path, header=header)
    print(report.text())
    print()
    usable = f'hardware="{name}"' if args.output is None else f'hardware="{path}"'
    print(f"wrote {path} ({time.perf_counter() - started:.0f}s); use it with {usable}")
    return 0
