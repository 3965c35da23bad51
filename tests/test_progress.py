"""Progress of long planning: stage events from ``plan_model`` and their lines from ``autotp plan``."""
from __future__ import annotations

import io
import re

import pytest

from autotp.api import plan_model
from autotp.cli import main
from autotp.examples import build_example
from autotp.ir.units import fmt_seconds
from autotp.report.progress import ProgressEvent

STAGES = ("capture", "strategies", "solve")
SMALL_MLP = ["plan", "mlp", "--mesh", "2", "--config", "d_model=256", "--config", "d_hidden=1024"]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is when a person runs autotp."""

    def isatty(self) -> bool:
        return True


def test_plan_model_reports_each_stage_with_its_time_and_the_solvers_incumbent() -> None:
    model, inputs = build_example("gpt", device="meta", n_layer=2)
    events: list[ProgressEvent] = []
    result = plan_model(model, inputs, mesh_shape=(2,), hardware="cpu-gloo", memory_budget="2MiB", progress=events.append)
    ends = [e for e in events if e.state == "end"]
    assert [e.stage for e in ends] == list(STAGES)
    assert [e.stage for e in events if e.state == "start"] == list(STAGES)
    for end in ends:  # every stage starts before it ends, and ends with its own time
        assert events.index(ProgressEvent(end.stage, "start", 0.0)) < events.index(end) and end.seconds >= 0
    assert re.fullmatch(r"\d+ nodes", ends[0].detail) and re.fullmatch(r"\d+ candidates", ends[1].detail)
    solve_end = ends[2]
    assert solve_end.detail == f"optimal, {fmt_seconds(result.plan.total_seconds)}"
    incumbents = [e.detail for e in events if e.stage == "solve" and e.state == "update"]
    assert incumbents, "CBC's log gave no incumbent"
    assert incumbents[-1].startswith(f"incumbent {fmt_seconds(result.plan.total_seconds)}")  # the last incumbent is the optimum


def test_forced_progress_prints_stage_lines_with_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL_MLP, "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "totals (per step, per device)" in out and "autotp:" not in out  # the table alone on stdout
    lines = err.splitlines()
    for name in (*STAGES, "baselines"):
        assert f"autotp: {name} ..." in lines
        assert any(re.fullmatch(rf"autotp: {name} \d+\.\d\ds( \(.+\))?", line) for line in lines), (name, err)
    assert re.search(r"^autotp: solve \d+\.\d\ds \(optimal, [\d.]+ [mu]?s\)$", err, re.MULTILINE), err
    assert "\r" not in err and "\033" not in err  # not a terminal: plain lines


def test_no_progress_off_a_terminal_or_with_quiet(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main([*SMALL_MLP, "--no-baselines"]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal: logs stay clean
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*SMALL_MLP, "--no-baselines", "--quiet"]) == 0
    assert terminal.getvalue() == ""


def test_on_a_terminal_the_running_stage_is_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*SMALL_MLP, "--no-baselines"]) == 0
    text = terminal.getvalue()
    assert text.startswith("\r\033[Kautotp: capture ... (0.0s)")
    finished = [part.rstrip("\n") for part in text.split("\r\033[K") if part.endswith("\n")]
    assert [line.split()[1] for line in finished] == list(STAGES)
    assert all(re.fullmatch(r"autotp: \w+ \d+\.\d\ds( \(.+\))?", line) for line in finished), finished


def test_a_failed_stage_ends_its_line_before_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL_MLP, "--progress", "--memory-budget", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^autotp: solve \d+\.\d\ds \(failed\)\nautotp: error: no plan fits a memory budget", err, re.MULTILINE), err
