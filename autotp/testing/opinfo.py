"""Every sharding rule against PyTorch's operator corpus (OpInfo), checked by brute force.

The hand-written cases of ``tests/test_rules.py`` cover the ops autotp's examples use; PyTorch's
``op_db`` has sample inputs for ~700 operators (DTensor validates its strategies against it). For
each OpInfo, float32 on the CPU, the first ``max_samples`` samples each become a small module
whose forward takes the sample's tensors and calls the op with the other arguments baked in; it is
captured (``autotp.capture.export.capture``), run once for the values of every node
(``node_values``) and every strategy the engine offers at each of ``tp_sizes`` ranks is checked
(``autotp.rewrite.rule_check``). 5 ranks is in the default sizes because OpInfo's sizes are 5, 10
and 20: most dims split at 5, few at 3.

Outcomes, per sample::

    not captured   torch.export refused the sample (not autotp's fault; counted, with the reason)
    wrong          a strategy the engine offers does not reproduce the unsharded result
    crash          autotp raised building the strategy space, running the graph or checking

Per ATen overload seen in a captured graph it counts: seen, split (some strategy at some size is
not all-replicate), checked (strategies run), wrong, crash. ``EXPECTED_FAILURES`` lists known
wrong strategies and crashes with their reason; they still run (``EXPECTED_SAMPLES`` samples of an OpInfo
listed by name), and an entry that no longer fails is reported so the list does not rot.

    python -m autotp.testing.opinfo                       # the whole corpus, 2 samples per op
    python -m autotp.testing.opinfo --ops cumsum mm --tp 2 3 --max-samples 4
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import fx, nn

from autotp.capture.export import capture
from autotp.capture.torch_compat import OpOverload, dtensor_registered_ops, opinfo_database, pytree
from autotp.errors import CaptureError
from autotp.rewrite.rule_check import check_node, node_values
from autotp.strategies.engine import NodeKind, NodeSpace, build_strategy_space
from autotp.strategies.rules.registry import lookup

aten = torch.ops.aten

TP_SIZES = (2, 3, 5)
MAX_SAMPLES = 2
EXPECTED_SAMPLES = 32  # samples run of an OpInfo named in EXPECTED_FAILURES

# Known wrong strategies and crashes, by OpInfo name (``name`` or ``name.variant``) or ATen
# overload (``aten.nonzero.default``), with the reason. They run and are reported as expected.
EXPECTED_FAILURES: dict[str, str] = {}


@dataclass(slots=True)
class OverloadStats:
    """Counts for one ATen overload over the run (accumulated, hence not frozen)."""

    seen: int = 0  # nodes in captured graphs
    split: bool = False  # some strategy at some size places something other than R
    has_rule: bool = False
    checked: int = 0  # (node, strategy) pairs run
    wrong: int = 0
    crash: int = 0


@dataclass(frozen=True, slots=True)
class Problem:
    """A wrong strategy or a crash, with where it happened and whether it is expected."""

    kind: str  # "wrong" or "crash"
    opinfo: str  # name.variant
    family: str  # the OpInfo's name without its variant
    sample: int
    overload: str  # "?" when a crash names no node
    detail: str
    expected: str | None  # EXPECTED_FAILURES' reason

    def __str__(self) -> str:
        tag = f" [expected: {self.expected}]" if self.expected else ""
        return f"{self.kind}: {self.opinfo} sample {self.sample}, {self.overload}: {self.detail}{tag}"


@dataclass(slots=True)
class ConformanceReport:
    """What a run found (see the module docstring), accumulated as it goes; ``summary()`` prints it."""

    tp_sizes: tuple[int, ...]
    ops_tried: int = 0
    ops_captured: int = 0  # ops with at least one captured sample
    samples_tried: int = 0
    samples_captured: int = 0
    pairs_checked: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (ops, samples or nodes)
    not_captured: dict[str, str] = field(default_factory=dict)  # OpInfo -> first reason
    overloads: dict[str, OverloadStats] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    exercised: set[str] = field(default_factory=set)  # OpInfo names run and overloads seen
    selected: set[str] | None = None  # the OpInfo names asked for; None: the whole corpus
    seconds: float = 0.0

    def unexpected(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind and p.expected is None]

    def expected_passing(self) -> list[str]:
        """EXPECTED_FAILURES entries that ran and failed nowhere: remove them from the list."""
        failing = {key for p in self.problems for key in (p.opinfo, p.family, p.overload)}
        return sorted(k for k in EXPECTED_FAILURES if k in self.exercised and k not in failing)

    def expected_unreached(self) -> list[str]:
        """EXPECTED_FAILURES entries this run should have reached but did not (an OpInfo renamed
        or dropped, an overload no sample produces)."""
        asked = set(EXPECTED_FAILURES) if self.selected is None else set(EXPECTED_FAILURES) & self.selected
        return sorted(asked - self.exercised)

    def coverage(self, among: Iterable[str] | None = None) -> tuple[int, int]:
        """(overloads with a split, overloads seen), among ``among`` when given."""
        keys = set(self.overloads) if among is None else set(self.overloads) & set(among)
        return sum(self.overloads[k].split for k in keys), len(keys)

    def unsplit(self, among: Iterable[str]) -> list[str]:
        """The overloads of ``among`` seen without a split, sorted."""
        return sorted(k for k in set(self.overloads) & set(among) if not self.overloads[k].split)

    def summary(self, dtensor_ops: Iterable[str]) -> str:
        dtensor = set(dtensor_ops)
        split, seen = self.coverage()
        dsplit, dseen = self.coverage(dtensor)
        wrong, crash = (sum(p.kind == k for p in self.problems) for k in ("wrong", "crash"))
        lines = [
            f"OpInfo conformance at {', '.join(map(str, self.tp_sizes))} ranks ({self.seconds:.0f} s)",
            f"  ops tried {self.ops_tried}, captured {self.ops_captured}; samples tried {self.samples_tried}, captured {self.samples_captured}",
            f"  (node, strategy) pairs checked {self.pairs_checked}",
            f"  wrong {wrong} ({len(self.unexpected('wrong'))} unexpected), crashes {crash} ({len(self.unexpected('crash'))} unexpected)",
            f"  coverage {split}/{seen} overloads with a split ({_percent(split, seen)})",
            f"  coverage of DTensor-registered overloads {dsplit}/{dseen} ({_percent(dsplit, dseen)}; "
            f"DTensor in torch {torch.__version__} registers {len(dtensor)}, {dseen} of them seen here)",
        ]
        lines += [f"  skipped {count}: {reason}" for reason, count in sorted(self.skipped.items())]
        lines += [f"  not captured: {op}: {reason}" for op, reason in sorted(self.not_captured.items())]
        lines += [f"  {p}" for p in self.problems if p.expected is None]
        lines += [f"  expected: {key}: {count} ({reason})" for key, (count, reason) in sorted(self._expected_counts().items())]
        lines += [f"  expected failure passes (remove it from EXPECTED_FAILURES): {k}" for k in self.expected_passing()]
        lines += [f"  expected failure not reached: {k}" for k in self.expected_unreached()]
        unsplit = self.unsplit(dtensor)
        lines.append(f"  DTensor-registered overloads seen without a split ({len(unsplit)}):")
        lines += [f"    {k}{'' if self.overloads[k].has_rule else ' (no rule)'}" for k in unsplit]
        return "\n".join(lines)

    def _expected_counts(self) -> dict[str, tuple[str, str]]:
        """Per OpInfo with expected problems: how many of each kind, and the reason."""
        counts: dict[str, dict[str, int]] = {}
        reasons: dict[str, str] = {}
        for p in self.problems:
            if p.expected is not None:
                kinds = counts.setdefault(p.opinfo, {})
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
                reasons[p.opinfo] = p.expected
        return {k: (", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())), reasons[k]) for k, kinds in counts.items()}

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` things (ops, samples, nodes) not checked, for ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


class SampleCall(nn.Module):
    """``fn(input, *args, **kwargs)`` of one OpInfo sample, its tensors as forward's inputs and
    everything else baked in (captured graphs take only tensors)."""

    def __init__(self, fn: Callable[..., Any], leaves: Sequence[Any], spec: Any) -> None:
        super().__init__()
        self.fn = fn
        self.spec = spec
        self.constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]  # a list: tensors here would be registered
        self.slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self.constants)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        input_, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.fn(input_, *args, **kwargs)


def sample_call(fn: Callable[..., Any], sample: Any) -> tuple[SampleCall, tuple[torch.Tensor, ...]]:
    """The module and example inputs for one OpInfo ``SampleInput``."""
    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    return SampleCall(fn, leaves, spec), tuple(v for v in leaves if isinstance(v, torch.Tensor))


def opinfo_name(op: Any) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def _expected(opinfo: str, family: str, overload: str) -> str | None:
    for key in (opinfo, family, overload):
        if key in EXPECTED_FAILURES:
            return EXPECTED_FAILURES[key]
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _culprit(tb: TracebackType | None) -> str:
    """The op of the innermost frame that was handling a graph node (a local named ``node``)."""
    found = "?"
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, fx.Node) and node.op == "call_function":
            found = str(node.target)
        tb = tb.tb_next
    return found


def _is_split(space: NodeSpace) -> bool:
    return not all(s.replicated for s in space.strategies)


def run_conformance(
    *, ops: Sequence[str] | None = None, tp_sizes: Sequence[int] = TP_SIZES, max_samples: int = MAX_SAMPLES, log: Callable[[str], None] | None = None,
) -> ConformanceReport:
    """Run the OpInfo corpus (or the OpInfos named in ``ops``: ``name`` or ``name.variant``)."""
    start = time.perf_counter()
    wanted = set(ops) if ops is not None else None
    database = [op for op in opinfo_database() if wanted is None or op.name in wanted or opinfo_name(op) in wanted]
    names = {op.name for op in database} | {opinfo_name(op) for op in database}
    if wanted is not None and wanted - names:
        raise ValueError(
            f"no OpInfo named {', '.join(sorted(wanted - names))}; names are OpInfo.name or "
            "name.variant_test_name (e.g. 'nn.functional.relu', 'max.reduction_with_dim')"
        )
    report = ConformanceReport(tuple(tp_sizes), selected=None if wanted is None else names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in database:
            _run_op(op, report, max_samples=max_samples)
            if log is not None:
                log(opinfo_name(op))
    report.seconds = time.perf_counter() - start
    return report


def _run_op(op: Any, report: ConformanceReport, *, max_samples: int) -> None:
    name = opinfo_name(op)
    report.ops_tried += 1
    if torch.float32 not in op.supported_dtypes("cpu"):
        report.skip("ops without float32 on the CPU")
        return
    torch.manual_seed(0)
    try:
        samples = list(op.sample_inputs("cpu", torch.float32, requires_grad=False))
    except Exception:  # noqa: BLE001 -- the corpus's own generator failing is not autotp's fault
        report.skip("ops whose sample generator raised")
        return
    if not samples:
        report.skip("ops without float32 samples")
        return
    if name in EXPECTED_FAILURES or op.name in EXPECTED_FAILURES:
        max_samples = max(max_samples, EXPECTED_SAMPLES)  # so the failure is reached and its fix noticed
    if len(samples) > max_samples:
        report.skip(f"samples past the {max_samples} most splittable of an op", len(samples) - max_samples)
    captured_any = False
    report.exercised.update((name, op.name))
    order = sorted(range(len(samples)), key=lambda i: -_splittable_dims(samples[i], report.tp_sizes))
    for index in order[:max_samples]:
        sample = samples[index]
        report.samples_tried += 1
        captured_any |= _run_sample(op, name, index, sample, report)
    report.ops_captured += captured_any


def _splittable_dims(sample: Any, tp_sizes: Sequence[int]) -> int:
    """How many dims of the sample's tensors some ``tp_sizes`` divides: the samples run first
    (stable: ties keep the corpus's order), so few samples per op still offer splits to check."""
    leaves = pytree.tree_leaves((sample.input, tuple(sample.args), dict(sample.kwargs)))
    return sum(any(d >= k and d % k == 0 for k in tp_sizes) for t in leaves if isinstance(t, torch.Tensor) for d in t.shape)


def _run_sample(op: Any, name: str, index: int, sample: Any, report: ConformanceReport) -> bool:
    """Check one sample; False when it could not be captured."""
    model, inputs = sample_call(op.op, sample)
    if any(t.layout is not torch.strided for t in inputs):
        report.skip("samples with sparse inputs")
        return False
    try:
        captured = capture(model, inputs)
    except CaptureError as exc:
        report.not_captured.setdefault(name, _first_line(exc.__cause__ or exc)[:160])  # torch's reason, not autotp's advice
        return False
    except Exception as exc:  # noqa: BLE001 -- autotp's lifting of an exported graph failed
        _crash(report, op, index, _culprit(exc.__traceback__), f"capture: {_first_line(exc)}")
        return False
    try:
        values: dict[str, Any] | None = node_values(captured, model, tuple(t.clone() for t in inputs))
    except Exception as exc:  # noqa: BLE001 -- the captured graph does not run as captured
        culprit = _culprit(exc.__traceback__)
        if culprit == str(aten._assert_scalar.default):  # torch.export's own bound on a data-dependent size fails
            report.not_captured.setdefault(name, f"torch.export's runtime assertion fails on its own sample: {_first_line(exc)}"[:160])
            return False
        _crash(report, op, index, culprit, f"node_values: {_first_line(exc)}")
        values = None
    report.samples_captured += 1
    for target in (n.target for n in captured.graph_module.graph.nodes if n.op == "call_function"):
        if isinstance(target, OpOverload):
            report.overloads.setdefault(str(target), OverloadStats(has_rule=lookup(target) is not None)).seen += 1
            report.exercised.add(str(target))
    if values is None:
        return True
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    for size in report.tp_sizes:
        try:
            space = build_strategy_space(captured, size)
        except Exception as exc:  # noqa: BLE001 -- any exception out of the engine is a crash to report
            _crash(report, op, index, _culprit(exc.__traceback__), f"build_strategy_space at {size} ranks: {_first_line(exc)}")
            return True
        generator = torch.Generator().manual_seed(index)
        for ns in space.nodes:
            if ns.kind is not NodeKind.OP:
                continue
            node = nodes[ns.name]
            overload = str(node.target) if isinstance(node.target, OpOverload) else None
            stats = report.overloads.get(overload) if overload else None
            if stats is not None and _is_split(ns):
                stats.split = True
            try:
                result = check_node(node, ns, values, mesh_shape=(size,), generator=generator)
            except Exception as exc:  # noqa: BLE001 -- the checker itself failed on this node
                _crash(report, op, index, overload or ns.op, f"check at {size} ranks: {_first_line(exc)}")
                continue
            if result.skipped is not None:
                report.skip(f"nodes the checker cannot split: {ns.op} {result.skipped}")
            report.pairs_checked += result.checked
            if stats is not None:
                stats.checked += result.checked
                stats.wrong += len(result.failures)
            for failure in result.failures:
                detail = f"{failure.strategy} at {size} ranks: {failure.reason}"
                report.problems.append(Problem("wrong", name, op.name, index, overload or ns.op, detail, _expected(name, op.name, overload or ns.op)))
    return True


def _crash(report: ConformanceReport, op: Any, index: int, overload: str, detail: str) -> None:
    stats = report.overloads.get(overload)
    if stats is not None:
        stats.crash += 1
    name = opinfo_name(op)
    report.problems.append(Problem("crash", name, op.name, index, overload, detail, _expected(name, op.name, overload)))


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; exits 1 when a wrong strategy or a crash is not in ``EXPECTED_FAILURES``."""
    parser = argparse.ArgumentParser(prog="python -m autotp.testing.opinfo", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", metavar="NAME", help="OpInfo names (name or name.variant); default: all")
    parser.add_argument("--tp", nargs="+", type=int, default=list(TP_SIZES), metavar="N", help="ranks to check at (default: 2 3 5)")
    parser.add_argument("--max-samples", type=int, default=MAX_SAMPLES, metavar="N", help=f"samples per op (default: {MAX_SAMPLES})")
    parser.add_argument("--verbose", action="store_true", help="print each OpInfo name as it finishes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = run_conformance(
        ops=args.ops, tp_sizes=args.tp, max_samples=args.max_samples,
        log=(lambda name: print(name, file=sys.stderr, flush=True)) if args.verbose else None,
    )
    print(report.summary(str(op) for op in dtensor_registered_ops()))
    return 1 if report.unexpected("wrong") or report.unexpected("crash") else 0


if __name__ == "__main__":
    sys.exit(main())
