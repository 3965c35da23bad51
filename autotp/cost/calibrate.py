"""Measure this machine for ``autotp calibrate``: kernels and collectives on N local ranks.

Every rank runs :func:`measure_rank` at once (gloo on CPU, NCCL on GPUs), so the compute
numbers are what one rank gets while its peers work too, which is how a tensor-parallel model
runs. The fitting is torch-free and lives in ``cost_models.calibrate``.

What is timed (per sample: ``warmup`` untimed then ``repeats`` timed batches, taken round-robin
over the samples, then more rounds of the samples still noisy, see :func:`measure_rank`; each batch runs the op ``k`` times back to back between barriers, ``k`` chosen
so that it lasts about ``batch_seconds``, and counts the mean; a collective's sample is the
median over batches of the slowest rank's time, a kernel's the median over ranks of each rank's
median):

* matmuls ``aten.mm`` over a grid of (M, K, N) shapes and dtypes, called as a layer calls them
  (:func:`_as_in_a_layer`: the activation hot in cache, the weight last read a forward ago);
* a memory-bound kernel, ``aten.add`` of two tensors from a few KiB to tens of MiB, as the
  rank-local graph calls it (allocating its output);
* one or two representative ops of each op class (``cost_models.OP_CLASSES``): views
  (``view``, ``t``, ``unsqueeze``), activations (``gelu``, ``silu``), normalisations
  (``layer_norm``, ``_softmax``) and causal ``scaled_dot_product_attention``, whose measured
  lines floor the roofline of every op of the class (elementwise ops reuse the ``add``);
* all_reduce, all_gather, reduce_scatter, all_to_all and broadcast over message sizes from
  4 KiB to 256 MiB (``quick``: to 16 MiB), on groups of 2 ranks and of all N. Each call
  follows a little compute, whose time is subtracted (:func:`collective_seconds`): that is how a
  model calls them, and back-to-back calls would hide the wake-up latency each call pays;
* the wake-up (CPU only): each collective of 128 KiB on all ranks after 1, 2, 4 and 8 times
  that compute (``wake_gaps``). On gloo a collective pays more the longer its ranks computed
  before it, up to a plateau; a plan prices that from its schedule (``cost_models.WakeCurve``);
* the overlap slowdown (:func:`measure_overlap`): a matmul loop alone, an all-reduce alone and
  the all-reduce started asynchronously with the loop run before waiting for it.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cost_models.calibrate import CollectiveSample, KernelSample, OverlapSample, WakeSample

Progress = Callable[[str], None]

KIB, MIB = 2**10, 2**20
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
WAKE_PROBE_NBYTES = 128 * KIB  # each collective is timed at this size after each wake gap
OVERLAP_COMPUTE_RATIO = 2.0  # the overlap probe's compute lasts about this many times its all-reduce


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    """What to measure; :func:`default_config` gives the full and the quick grids."""

    device_type: str
    matmul_shapes: tuple[tuple[int, int, int], ...]
    dtypes: tuple[str, ...]
    memory_nbytes: tuple[int, ...]  # size of each operand of the add
    message_nbytes: tuple[int, ...]
    op_class_numels: tuple[int, ...] = ()  # elements of each activation / normalization sample
    attention_shapes: tuple[tuple[int, int, int, int], ...] = ()  # (batch, heads, tokens, head dim)
    collectives: tuple[str, ...] = COLLECTIVES
    repeats: int = 7  # timed batches of every sample
    warmup: int = 2
    max_repeats: int = 0  # a noisy sample gets more timed batches, up to this many (0: exactly ``repeats``)
    precision: float = 0.04  # ... until its median's standard error is at most this fraction of it
    batch_seconds: float = 0.05  # each timed batch lasts about this long (see _calls_for)
    group_sizes: tuple[int, ...] = field(default=())  # () -> {2, nproc}
    wake_gaps: tuple[int, ...] = ()  # the wake probe follows this many gap kernels (the collectives follow 1)
    overlap_nbytes: int = 4 * MIB  # the overlap probe's all-reduce
    overlap_repeats: int = 5  # repeats of the overlap probe (0: not measured)

    def groups(self, world_size: int) -> tuple[int, ...]:
        """The group sizes collectives are measured on: 2 and all ranks (none on one rank)."""
        return self.group_sizes or tuple(sorted({2, world_size} if world_size >= 2 else ()))

    def repeats_text(self) -> str:
        """'9 repeats', or '9 to 45 repeats' when noisy samples get more."""
        return f"{self.repeats}" + (f" to {self.max_repeats}" if self.max_repeats > self.repeats else "") + " repeats"

    def n_samples(self, world_size: int) -> int:
        groups = len(self.groups(world_size))
        kernels = len(self.matmul_shapes) * len(self.dtypes) + len(self.memory_nbytes)
        op_classes = len(_VIEW_OPS) + len(_ROW_OPS) * len(self.op_class_numels) + len(self.attention_shapes)
        wake = len(self.wake_gaps) * len(self.collectives) if world_size >= 2 else 0
        return kernels + op_classes + len(self.collectives) * len(self.message_nbytes) * groups + wake


def default_config(*, device_type: str, quick: bool) -> CalibrationConfig:
    """The measurement grid: ``quick`` keeps a CPU run with 2 ranks well under 2 minutes."""
    if device_type == "cuda":
        shapes: tuple[tuple[int, int, int], ...] = ((256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 1024, 8192), (1024, 8192, 1024))
        dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
        memory = tuple(4**k * 64 * KIB for k in range(0, 7 if quick else 9))  # 64 KiB .. 1 GiB
        numels = tuple(4**k * 16 * KIB for k in range(0, 6 if quick else 8))  # 16 Ki .. 16 / 256 Mi elements
        attention: tuple[tuple[int, int, int, int], ...] = ((4, 16, 512, 64), (8, 16, 1024, 64), (8, 32, 2048, 128)) + (() if quick else ((4, 32, 4096, 128),))
    else:
        shapes = ((32, 32, 32), (64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (128, 1024, 512), (1024, 256, 256))
        dtypes = ("float32", "bfloat16") if quick else ("float32", "bfloat16", "float64")
        memory = tuple(4**k * 4 * KIB for k in range(0, 7 if quick else 8))  # 4 KiB .. 16 / 64 MiB
        numels = tuple(4**k * 4 * KIB for k in range(0, 4 if quick else 5))  # 4 Ki .. 256 Ki / 1 Mi elements
        attention = ((1, 4, 64, 32), (4, 8, 64, 32), (4, 8, 128, 64)) + (() if quick else ((8, 8, 256, 64),))
    if quick:
        shapes = shapes[:5]
    top = 16 * MIB if quick else 256 * MIB
    # x4 steps below 1 MiB; x2 from there in the full grid, where caches and protocol switches
    # bend the curve (on a 2-core VM gloo's all-gather took 3.3x as long at 32 MiB as at 16, then
    # 1.8x as long again at 64): a knee can only sit at a measured size.
    small = (4**k * 4 * KIB for k in range(4))  # 4 KiB .. 256 KiB
    large = (MIB * (4**k if quick else 2**k) for k in range(9))
    messages = tuple(s for s in (*small, *large) if s <= top)
    wake_gaps = () if device_type == "cuda" else (1, 2, 4, 8)  # NCCL queues collectives on the stream: no wake-up to time
    return CalibrationConfig(device_type, shapes, dtypes, memory, messages, numels, attention, repeats=5 if quick else 9, warmup=1 if quick else 2,
                             max_repeats=0 if quick else 45, wake_gaps=wake_gaps)


@dataclass(frozen=True, slots=True)
class RankMeasurements:
    """One rank's timings: per sample, the per-op seconds of every timed batch."""

    kernels: list[tuple[KernelSample, list[float]]]
    collectives: list[tuple[CollectiveSample, list[float]]]
    wake: list[tuple[WakeSample, list[float], list[float]]] = field(default_factory=list)  # and each batch's gap seconds
    overlap: list[OverlapSample] = field(default_factory=list)  # this rank's seconds, per repeat of the overlap probe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_batches(op: Callable[[], object], *, calls: int, repeats: int, warmup: int, device: torch.device, group: dist.ProcessGroup | None) -> list[float]:
    """Seconds per call of ``op`` for each timed batch of ``calls`` calls, after ``warmup`` batches."""
    out = []
    for i in range(warmup + repeats):
        dist.barrier(group=group)
        _sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            op()
        _sync(device)
        elapsed = (time.perf_counter() - started) / calls
        if i >= warmup:
            out.append(elapsed)
    return out


def _calls_for(seconds_estimate: float, target: float) -> int:
    """Calls per timed batch so that it lasts about ``target`` seconds.

    Batches of tens of milliseconds see a machine shared with other programs the way a real
    step does (time-sliced). A short batch right after a barrier runs on the scheduler's
    wake-up credit (Linux CFS favours a task that slept) and measures a machine faster than the
    one a model's steps will run on.
    """
    return max(1, min(4096, int(target / max(seconds_estimate, 1e-7))))


def _estimate(op: Callable[[], object], device: torch.device) -> float:
    op()
    _sync(device)
    started = time.perf_counter()
    op()
    _sync(device)
    return time.perf_counter() - started


def _agree(value: int, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
    """The largest of every rank's ``value`` (all ranks must run the same number of calls)."""
    return _agree_all([value], device, group)[0]


def _agree_all(values: Sequence[int], device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """The largest of every rank's value, element by element."""
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def median_relative_error(times: Sequence[float]) -> float:
    """Standard error of the median of ``times``, as a fraction of it; ``inf`` for fewer than 3.

    Distribution-free (McKean and Schrader): half the distance between the order statistics
    sqrt(n)/2 ranks either side of the middle. Batch times on a shared machine have long tails,
    where the normal formula would mislead.
    """
    n = len(times)
    if n < 3:
        return math.inf
    ordered = sorted(times)
    c = max(1, math.floor((n + 1) / 2 - math.sqrt(n) / 2 + 0.5))  # 1-based rank of the lower one
    middle = statistics.median(ordered)
    return (ordered[n - c] - ordered[c - 1]) / 2 / middle if middle > 0 else math.inf


def _collective_op(kind: str, nbytes: int, group: dist.ProcessGroup, n: int, device: torch.device) -> Callable[[], object]:
    numel = max(n, nbytes // 4 // n * n)  # float32, divisible by the group size
    full = torch.ones(numel, device=device)
    part = torch.ones(numel // n, device=device)
    recv = torch.empty_like(part)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if kind == "all_gather":
        return lambda: dist.all_gather_single(full, part, group=group)
    if kind == "reduce_scatter":
        return lambda: dist.reduce_scatter_single(part, full, group=group)
    if kind == "all_to_all":
        return lambda: dist.all_to_all_single(recv, part, group=group)
    if kind == "broadcast":
        return lambda: dist.broadcast(full, dist.get_global_rank(group, 0), group=group)
    raise ValueError(f"unknown collective {kind!r}")


@dataclass(slots=True)
class _Sample:
    label: str
    make: Callable[[], Callable[[], object]]  # allocates the tensors, returns the op to time
    group: dist.ProcessGroup | None  # None: every rank (kernels); else only its members time it
    member: bool
    calls: int = 0  # ops per timed batch, agreed by all ranks in the first round
    times: list[float] = field(default_factory=list)
    gap: Callable[[], object] | None = None  # collectives: compute run before each call, then subtracted
    gap_times: list[float] = field(default_factory=list)  # seconds of that compute, per timed batch


def gap_kernel(device: torch.device) -> Callable[[], object]:
    """About a millisecond of compute on a CPU core, as a model runs between collectives (see collective_seconds).

    On gloo the gap's length matters: measured on 2 ranks, a 256 KiB all-reduce took 1.4 ms
    after 0.05 ms of compute, 1.5 ms after 0.3 ms, 2.2 ms after 1.1 ms and 3.0 ms after 2.7 ms.
    The blocks of a small transformer compute for about a millisecond between collectives.
    """
    n = 2048 if device.type == "cuda" else 384
    a = torch.randn(n, n, device=device)
    return lambda: torch.ops.aten.mm.default(a, a)


def repeated(gap: Callable[[], object], times: int) -> Callable[[], object]:
    """``gap`` run ``times`` times: the longer compute a wake-up sample follows."""
    def run() -> None:
        for _ in range(times):
            gap()
    return run


def collective_seconds(op: Callable[[], object], gap: Callable[[], object], *, calls: int, device: torch.device, group: dist.ProcessGroup | None) -> tuple[float, float]:
    """Seconds per call of the collective ``op`` when each call follows some compute, as in a model.

    Back to back, a collective finds its peers already waiting and the transport hot; in a model
    every call follows compute, and pays the peers' wake-up (on gloo over loopback a 256 KiB
    all-reduce takes about twice as long that way). So each call runs after ``gap``, and the
    time of ``gap`` alone, timed right after, is subtracted. Returns both: the collective's
    seconds per call and the gap's.
    """
    def both() -> None:
        gap()
        op()

    with_gap = _timed_batches(both, calls=calls, repeats=1, warmup=0, device=device, group=group)[0]
    gap_only = _timed_batches(gap, calls=calls, repeats=1, warmup=0, device=device, group=group)[0]
    return max(with_gap - gap_only, 0.01 * with_gap), gap_only


def _kernel_samples(config: CalibrationConfig, device: torch.device) -> list[tuple[KernelSample, _Sample]]:
    out = []
    for dtype_name in config.dtypes:
        dtype = getattr(torch, dtype_name)
        for m, k, n in config.matmul_shapes:
            nbytes = float((m * k + k * n + m * n) * dtype.itemsize)

            def make(m: int = m, k: int = k, n: int = n, dtype: torch.dtype = dtype) -> Callable[[], object]:
                return _as_in_a_layer(m, k, n, dtype, device)
            out.append((KernelSample("matmul", dtype_name, 2.0 * m * k * n, nbytes, 0.0, weight_nbytes=float(k * n * dtype.itemsize)), _Sample(f"matmul {dtype_name} {m}x{k}x{n}", make, None, True)))
    for size in config.memory_nbytes:
        def make(size: int = size) -> Callable[[], object]:  # type: ignore[misc]  # one closure per sample
            return _as_in_a_graph(lambda: (torch.ones(size // 4, device=device), torch.ones(size // 4, device=device)), torch.ops.aten.add.Tensor, 3 * size)
        out.append((KernelSample("memory", "float32", float(size // 4), 3.0 * (size // 4) * 4, 0.0), _Sample(f"add of 2 x {size / MIB:.3f} MiB", make, None, True)))
    return out


_RING_NBYTES = 32 * MIB  # what the input sets and live outputs of one sample may hold at most
_WEIGHT_RING_NBYTES = 64 * MIB  # more than a last-level cache: 32 MiB L3 on the CI VM, 50 MiB L2 on an H100


def _weight_ring(k: int, n: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """(k, n) weights, each stored (n, k) and transposed as ``nn.Linear`` keeps it, more bytes in
    all than a last-level cache (or 512 of them); their values do not change a matmul's time."""
    count = max(2, min(512, _WEIGHT_RING_NBYTES // (k * n * dtype.itemsize)))
    return [w.t() for w in torch.ones(count, n, k, device=device, dtype=dtype).unbind()]


def _as_in_a_layer(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    """``aten.mm`` of an (m, k) activation by a (k, n) weight as a layer calls it: the activation
    was just written by the op before (hot in cache), the weight was last read a whole forward
    ago (each call takes the next of :func:`_weight_ring`). On the CI VM a 128x128x128 fp32
    matmul took 47 us on hot operands, 58 us this way, and 64 us inside a model's graph; a
    256x128x352 one 232, 266 and 265 us."""
    ring = itertools.cycle(_weight_ring(k, n, dtype, device))
    activation = torch.randn(m, k, device=device).to(dtype)
    live: collections.deque[torch.Tensor] = collections.deque(maxlen=2)  # outputs stay alive a little, as in a graph

    def call() -> torch.Tensor:
        out = torch.ops.aten.mm.default(activation, next(ring))
        live.append(out)
        return out
    return call


def _as_in_a_graph(make_inputs: Callable[[], tuple[torch.Tensor, ...]], op: Callable[..., object], nbytes: int) -> Callable[[], object]:
    """``op`` called as a graph calls it: each call reads another of up to 8 input sets (not the
    one it just read, still hot in cache) and writes a fresh output while the last few outputs
    stay alive. On one CPU core a GELU of 256 Ki elements took 133 us called on the same tensor
    and 230 us this way, which is what it took inside a model's graph."""
    k = max(1, min(8, _RING_NBYTES // max(nbytes, 1)))
    inputs = itertools.cycle([make_inputs() for _ in range(k)])
    live: collections.deque[object] = collections.deque(maxlen=k)
    return lambda: live.append(op(*next(inputs)))


_ROW_WIDTH = 256  # activation and normalization samples are (numel / 256, 256) tensors
# (op class, name, op(x, weight, bias)) for the activation and normalization samples
_ROW_OPS: tuple[tuple[str, str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]], ...] = (
    ("activation", "gelu", lambda x, w, b: torch.ops.aten.gelu.default(x)),
    ("activation", "silu", lambda x, w, b: torch.ops.aten.silu.default(x)),
    ("normalization", "layer_norm", lambda x, w, b: torch.ops.aten.layer_norm.default(x, [_ROW_WIDTH], w, b)),
    ("normalization", "softmax", lambda x, w, b: torch.ops.aten._softmax.default(x, -1, False)),
)
_VIEW_OPS: tuple[tuple[str, Callable[[torch.Tensor], object]], ...] = (
    ("view", lambda x: torch.ops.aten.view.default(x, [-1])),
    ("t", lambda x: torch.ops.aten.t.default(x)),
    ("unsqueeze", lambda x: torch.ops.aten.unsqueeze.default(x, 0)),
)


def _op_class_samples(config: CalibrationConfig, device: torch.device) -> list[tuple[KernelSample, _Sample]]:
    """Views, activations, normalisations and attention, in the dtype models run them in."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for name, view in _VIEW_OPS:
        def make(view: Callable[[torch.Tensor], object] = view) -> Callable[[], object]:
            x = torch.ones(64, 256, device=device, dtype=dtype)
            return lambda: view(x)
        out.append((KernelSample("view", "float32", 0.0, 0.0, 0.0), _Sample(f"view: {name}", make, None, True)))
    for numel in config.op_class_numels:
        for kind, name, op in _ROW_OPS:
            nbytes = 2.0 * numel * dtype.itemsize

            def make(numel: int = numel, op: Callable[..., object] = op, nbytes: float = nbytes) -> Callable[[], object]:  # type: ignore[misc]  # one closure per sample
                w, b = torch.ones(_ROW_WIDTH, device=device, dtype=dtype), torch.zeros(_ROW_WIDTH, device=device, dtype=dtype)
                return _as_in_a_graph(lambda: (torch.randn(max(1, numel // _ROW_WIDTH), _ROW_WIDTH, device=device).to(dtype), w, b), op, int(nbytes))
            out.append((KernelSample(kind, str(dtype).removeprefix("torch."), float(numel), nbytes, 0.0), _Sample(f"{name} of {numel} elements", make, None, True)))
    for b, h, t, d in config.attention_shapes:
        flops, nbytes = 4.0 * b * h * t * t * d, 4.0 * b * h * t * d * dtype.itemsize

        def make(shape: tuple[int, int, int, int] = (b, h, t, d), nbytes: float = nbytes) -> Callable[[], object]:  # type: ignore[misc]  # one closure per sample
            def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, is_causal=True)
            return _as_in_a_graph(lambda: tuple(torch.randn(*shape, device=device).to(dtype) for _ in range(3)), attention, int(nbytes))
        out.append((KernelSample("attention", str(dtype).removeprefix("torch."), flops, nbytes, 0.0), _Sample(f"causal attention {b}x{h}x{t}x{d}", make, None, True)))
    return out


def _time_batch(sample: _Sample, device: torch.device, config: CalibrationConfig) -> tuple[float, float]:
    """One timed batch of ``sample`` on this rank: seconds per call and the gap's before each
    (0.0 without one, both 0.0 if it is not in the sample's group); every rank takes part."""
    seconds = gap_seconds = 0.0
    if sample.member:
        op = sample.make()
        if sample.calls == 0:  # as many calls as fill a batch, the same on every rank
            one = op if sample.gap is None else (lambda op=op, gap=sample.gap: (gap(), op()))  # type: ignore[misc]  # default-bound lambda
            sample.calls = _agree(_calls_for(_estimate(one, device), config.batch_seconds), device, sample.group)
        if sample.gap is None:
            seconds = _timed_batches(op, calls=sample.calls, repeats=1, warmup=0, device=device, group=sample.group)[0]
        else:
            seconds, gap_seconds = collective_seconds(op, sample.gap, calls=sample.calls, device=device, group=sample.group)
        del op
    if sample.group is not None:
        dist.barrier()
    return seconds, gap_seconds


def _needs_more(sample: _Sample, config: CalibrationConfig) -> bool:
    return sample.member and len(sample.times) < config.max_repeats and median_relative_error(sample.times) > config.precision


def measure_rank(rank: int, world_size: int, config: CalibrationConfig, progress: Progress | None = None) -> RankMeasurements:
    """Run the whole grid on this rank (inside ``autotp.testing.run_on_ranks``).

    Samples are timed round-robin, one batch of each per round, so a burst of load from
    elsewhere on the machine spreads over all samples instead of spoiling one. Then, while any
    rank finds a sample's median less certain than ``config.precision``
    (:func:`median_relative_error`), further rounds time the noisy samples, up to
    ``config.max_repeats`` batches each. On a shared 2-core VM the batches of one collective
    spread by a factor of 2, and a median of 9 moved by 15 to 38% between runs; of 36, by
    10% or less.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if config.device_type == "cuda" else torch.device("cpu")
    say = progress if (progress is not None and rank == 0) else (lambda _: None)
    kernels = _kernel_samples(config, device) + _op_class_samples(config, device)
    groups = {g: dist.new_group(list(range(g))) for g in config.groups(world_size)}  # every rank creates every group
    collectives: list[tuple[CollectiveSample, _Sample]] = []
    gap = gap_kernel(device)
    for kind in config.collectives:
        for nbytes in config.message_nbytes:
            for g, group in groups.items():
                make = lambda kind=kind, nbytes=nbytes, group=group, g=g: _collective_op(kind, nbytes, group, g, device)  # noqa: E731
                sample = _Sample(f"{kind} {nbytes / MIB:.3f} MiB on {g} ranks", make, group, rank < g, gap=gap)
                collectives.append((CollectiveSample(kind, g, float(nbytes), 0.0), sample))
    wake: list[tuple[WakeSample, _Sample]] = []
    for kind in config.collectives if world_size >= 2 else ():
        for times in config.wake_gaps:
            make = lambda kind=kind: _collective_op(kind, WAKE_PROBE_NBYTES, dist.group.WORLD, world_size, device)  # type: ignore[misc, assignment, arg-type]  # noqa: E731  # rebound closure; WORLD is set once the group is up
            sample = _Sample(f"{kind} {WAKE_PROBE_NBYTES / MIB:.3f} MiB on {world_size} ranks after {times} x the gap", make, dist.group.WORLD, True, gap=repeated(gap, times))
            wake.append((WakeSample(kind, world_size, float(WAKE_PROBE_NBYTES), 0.0, 0.0), sample))
    samples = [s for _, s in kernels] + [s for _, s in collectives] + [s for _, s in wake]
    rounds = config.warmup + config.repeats
    for round_ in range(rounds):
        for k, sample in enumerate(samples):
            seconds, gap_seconds = _time_batch(sample, device, config)
            if round_ >= config.warmup and sample.member:
                sample.times.append(seconds)
                sample.gap_times.append(gap_seconds)
            if round_ == 0:
                say(f"[{k + 1}/{len(samples)}] {sample.label}" + (f": {seconds * 1e6:.1f} us" if sample.member else ""))
        say(f"round {round_ + 1}/{rounds} done" + (" (warm-up)" if round_ < config.warmup else ""))
    extra = 0
    while noisy := [s for s, again in zip(samples, _agree_all([_needs_more(s, config) for s in samples], device)) if again]:
        extra += 1
        say(f"extra round {extra}: {len(noisy)} noisy samples, each to be within {config.precision:.0%} (at most {config.max_repeats} repeats)")
        for sample in noisy:
            seconds, gap_seconds = _time_batch(sample, device, config)
            if sample.member:
                sample.times.append(seconds)
                sample.gap_times.append(gap_seconds)
    for group in groups.values():
        dist.destroy_process_group(group)
    overlap = measure_overlap(world_size, config, device) if world_size >= 2 and config.overlap_repeats > 0 else []
    say(f"overlap probe: {len(overlap)} repeats")
    return RankMeasurements(
        [(ks, s.times) for ks, s in kernels], [(cs, s.times) for cs, s in collectives], [(ws, s.times, s.gap_times) for ws, s in wake], overlap,
    )


def measure_overlap(world_size: int, config: CalibrationConfig, device: torch.device) -> list[OverlapSample]:
    """This rank's timings of compute beside a collective, per repeat: C, T and O.

    C is a loop of matmuls sized (agreed by all ranks) to last about ``OVERLAP_COMPUTE_RATIO``
    times T, an all-reduce of ``config.overlap_nbytes`` on all ranks; O starts the all-reduce
    asynchronously, runs the loop and waits. Each is timed between barriers, in turn, so
    load from elsewhere falls on all three alike. With C > T the collective ends first and
    ``O = C + T·s / (1 + s)`` (``cost_models.exposed_seconds``), which ``fit_overlap`` solves for s.
    """
    numel = max(world_size, config.overlap_nbytes // 4)
    buffer = torch.ones(numel, device=device)
    reduce = lambda: dist.all_reduce(buffer)  # noqa: E731
    matmul = gap_kernel(device)
    comm = statistics.median(_timed_batches(reduce, calls=1, repeats=5, warmup=2, device=device, group=None))
    one = statistics.median(_estimate(matmul, device) for _ in range(3))
    steps = _agree(max(1, math.ceil(OVERLAP_COMPUTE_RATIO * comm / max(one, 1e-7))), device)

    def compute() -> None:
        for _ in range(steps):
            matmul()

    def both() -> None:
        work = dist.all_reduce(buffer, async_op=True)
        compute()
        work.wait()

    samples = []
    for _ in range(config.overlap_repeats):
        c, t, o = (_timed_batches(op, calls=1, repeats=1, warmup=0, device=device, group=None)[0] for op in (compute, reduce, both))
        samples.append(OverlapSample(c, t, o))
    return samples


STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {"median": statistics.median, "min": min}


def merge(ranks: Sequence[RankMeasurements], *, statistic: str = "median") -> tuple[list[KernelSample], list[CollectiveSample], list[WakeSample]]:
    """One sample per kernel, per collective and per wake gap, from every rank's batches.

    A kernel's time is the median over ranks of each rank's ``statistic`` over its batches; a
    collective's is the ``statistic`` over batches of the slowest rank's time, and so is a wake
    sample's, after the median over ranks of each rank's median gap. ``"median"`` is
    the default; ``"min"`` (best of the batches) estimates the machine without the load other
    programs put on it, for a shared machine, and must then be compared with best-of timings.
    """
    reduce = STATISTICS[statistic]
    kernels = []
    for per_rank in zip(*(r.kernels for r in ranks)):
        sample = per_rank[0][0]
        seconds = statistics.median(reduce(times) for _, times in per_rank)
        kernels.append(dataclasses.replace(sample, seconds=seconds))
    collectives = [CollectiveSample(s.collective, s.group_size, s.nbytes, reduce(slowest)) for s, slowest in slowest_batches(ranks)]
    wake = []
    for per_rank in zip(*(r.wake for r in ranks)):
        sample = per_rank[0][0]
        gap = statistics.median(statistics.median(gaps) for _, _, gaps in per_rank)
        slowest = [max(batch) for batch in zip(*(times for _, times, _ in per_rank))]
        wake.append(WakeSample(sample.collective, sample.group_size, sample.nbytes, gap, reduce(slowest)))
    return kernels, collectives, wake


def merge_overlap(ranks: Sequence[RankMeasurements]) -> list[OverlapSample]:
    """Per repeat of the overlap probe, the slowest rank's C, T and O (a step ends when its last rank does)."""
    return [
        OverlapSample(max(s.compute_seconds for s in per_rank), max(s.comm_seconds for s in per_rank), max(s.overlapped_seconds for s in per_rank))
        for per_rank in zip(*(r.overlap for r in ranks))
    ]


def slowest_batches(ranks: Sequence[RankMeasurements]) -> list[tuple[CollectiveSample, list[float]]]:
    """Each collective sample with, per timed batch, the slowest member rank's seconds (a collective ends when its last rank does)."""
    out = []
    for index, (sample, _) in enumerate(ranks[0].collectives):
        members = [r.collectives[index][1] for r in ranks[: sample.group_size]]
        out.append((sample, [max(batch) for batch in zip(*members)]))
    return out


def memory_capacity_nbytes(device_type: str, nproc: int) -> int:
    """Device memory of one rank: the GPU's, or the machine's RAM shared by ``nproc`` ranks."""
    if device_type == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // nproc)


def describe_machine(device_type: str, nproc: int, backend: str) -> str:
    """One line for the profile's ``source``: host, device, ranks, backend, date."""
    device = torch.cuda.get_device_name(0) if device_type == "cuda" else (platform.processor() or platform.machine())
    threads = "" if device_type == "cuda" else ", 1 thread per rank"
    when = time.strftime("%Y-%m-%d")
    return f"{platform.node()}, {device}, {nproc} ranks over {backend}{threads}, torch {torch.__version__}, {when}"
