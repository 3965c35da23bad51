"""Progress of long planning work, for a caller that shows it (``autotp plan`` on a terminal).

Planning a 70B model takes tens of seconds, most of it in capture and the ILP. ``plan_model``
reports each stage as it starts, any news while it runs (the solver's incumbents) and its time
when it ends, to a callback:

    def show(event: ProgressEvent) -> None:
        print(event.stage, event.state, f"{event.seconds:.1f}s", event.detail)

    autotp.api.plan_model(model, example_inputs, ..., progress=show)

The library never prints; without a callback nothing is reported.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

State = Literal["start", "update", "end"]


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One stage starting, reporting news while it runs, or ending."""

    stage: str  # capture | strategies | solve (with building the plan and wake-aware re-solves) | baselines
    state: State
    seconds: float  # since the stage started
    detail: str = ""  # update: the news (e.g. "incumbent 39.67 ms"); end: the stage's outcome, or ""


Progress = Callable[[ProgressEvent], None]


class StageReport:
    """What a running stage may say: ``update(detail)`` reports news now; ``outcome`` is the
    detail its end event carries (e.g. the solver's status)."""

    def __init__(self, progress: Progress | None, name: str) -> None:
        self.progress, self.name = progress, name
        self.started = time.perf_counter()
        self.outcome = ""

    def update(self, detail: str) -> None:
        self.emit("update", detail)

    def emit(self, state: State, detail: str = "") -> None:
        if self.progress is not None:
            seconds = 0.0 if state == "start" else time.perf_counter() - self.started
            self.progress(ProgressEvent(self.name, state, seconds, detail))


@contextmanager
def stage(progress: Progress | None, name: str) -> Iterator[StageReport]:
    """Report ``name`` starting, then ending with its time and ``outcome``; nothing with ``progress=None``."""
    report = StageReport(progress, name)
    report.emit("start")
    try:
        yield report
    except BaseException:
        report.emit("end", "failed")  # ends the line a terminal shows, before the error is printed
        raise
    report.emit("end", report.outcome)
