"""The docs run: every code block in README.md and docs/*.md that a user would run is run here.

A doc edit cannot silently break an example, and a new block cannot silently go untested: each
block is run, or it is output or a file format (```text, ```json, ```toml), or a marker says why
not. docs/writing-docs.md states the conventions for doc writers; in short:

- The ```python blocks of one file run in order in one namespace, like a notebook, in a fresh
  working directory that the file's shell blocks share (a plan a command writes is there for
  the next block to load).
- ```bash/```sh/```shell/```console blocks run each `autotp ...` command through the CLI's entry
  point (`autotp.cli.main`, which `python -m autotp.cli` and the `autotp` script call) and expect
  exit status 0. Any other command needs a marker.
- HTML comments on the lines right above a fence (`<!-- doc-test: ... -->`) change how it runs:
  `skip — REASON`, `replace "OLD" "NEW"` (reduced sizes), `file NAME`, `needs NAME from DOC`,
  `ranks N` (a script under torchrun), `setup`/`check` (hidden code before/after; a json or
  toml block's check sees it parsed as `data`), `fails`.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import tomllib

from autotp import cli
from autotp.testing import find_free_port

ROOT = Path(__file__).resolve().parent.parent
SHELL = frozenset({"bash", "sh", "shell", "console"})
PYTHON = frozenset({"python", "py"})
DATA = {"json": json.loads, "toml": tomllib.loads}
NOT_RUN = frozenset({"text", "markdown"})  # output, synopses, and examples of markdown itself
RANKS_TIMEOUT_SECONDS = 240

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*(?P<end>-->)?\s*$")
_SKIP = re.compile(r"^skip\s*(?:—|–|:|-)\s*(?P<reason>\S.*)$")


def doc_files() -> list[Path]:
    """README.md and every docs/*.md, so a new doc page is picked up without editing this test."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True, slots=True)
class Markers:
    """What the `<!-- doc-test: ... -->` comments above one block say."""

    skip: str | None = None
    replaces: tuple[tuple[str, str], ...] = ()
    file: str | None = None
    needs: tuple[tuple[str, str], ...] = ()  # (file name, doc that defines it)
    ranks: int | None = None
    setup: str = ""
    check: str = ""
    fails: bool = False
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Block:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str  # as written, dedented to the fence
    markers: Markers = field(default_factory=Markers)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def runnable_code(self) -> str:
        """The code with the block's `replace` markers applied."""
        code = self.code
        for old, new in self.markers.replaces:
            code = code.replace(old, new)
        return code


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one markdown file with their markers, and markers attached to none."""
    doc = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    orphans: list[str] = []
    pending: list[tuple[int, str]] = []  # (line, marker text) waiting for the next fence
    i = 0
    while i < len(lines):
        marker = _MARKER.match(lines[i])
        if marker:
            start, text = i, marker.group("body")
            while marker.group("end") is None and i + 1 < len(lines):  # a multi-line marker
                i += 1
                marker = re.match(r"^(?P<body>.*?)(?P<end>-->)?\s*$", lines[i])
                text += "\n" + marker.group("body")
            pending.append((start + 1, text))
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if fence is None:
            orphans += [f"{doc}:{n}: a doc-test marker must sit right above a fenced block" for n, _ in pending]
            pending = []
            i += 1
            continue
        indent, chars = len(fence.group("indent")), fence.group("fence")
        closing = re.compile(rf"^\s*{re.escape(chars[0])}{{{len(chars)},}}\s*$")
        body_start = i + 1
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            i += 1
        body = "\n".join(line[indent:] if not line[:indent].strip() else line for line in lines[body_start:i])
        blocks.append(Block(doc, body_start, fence.group("lang").lower(), body + "\n", _parse_markers(pending, body)))
        pending = []
        i += 1
    orphans += [f"{doc}:{n}: a doc-test marker must sit right above a fenced block" for n, _ in pending]
    return blocks, orphans


def _parse_markers(pending: list[tuple[int, str]], body: str) -> Markers:
    markers = Markers()
    problems: list[str] = []
    for _, text in pending:
        head, _, rest = text.partition("\n")
        words = head.split()
        skip = _SKIP.match(head)
        if words[:1] == ["skip"]:
            if skip is None:
                problems.append("`skip` needs a reason: <!-- doc-test: skip — why this block cannot run here -->")
            else:
                markers = replace(markers, skip=skip.group("reason"))
        elif words[:1] == ["replace"]:
            args = shlex.split(head)[1:]
            if len(args) != 2:
                problems.append(f'`{head}`: write replace "OLD" "NEW"')
            elif args[0] not in body:
                problems.append(f"`{head}`: {args[0]!r} is not in the block any more")
            else:
                markers = replace(markers, replaces=(*markers.replaces, (args[0], args[1])))
        elif len(words) == 2 and words[0] == "file":
            markers = replace(markers, file=words[1])
        elif len(words) == 4 and words[0] == "needs" and words[2] == "from":
            markers = replace(markers, needs=(*markers.needs, (words[1], words[3])))
        elif len(words) == 2 and words[0] == "ranks" and words[1].isdigit():
            markers = replace(markers, ranks=int(words[1]))
        elif words in (["setup"], ["check"]):
            markers = replace(markers, **{words[0]: textwrap.dedent(rest)})
        elif words == ["fails"]:
            markers = replace(markers, fails=True)
        else:
            problems.append(f"unknown doc-test marker `{head}` (see docs/writing-docs.md)")
    return replace(markers, problems=tuple(problems))


def shell_commands(block: Block) -> list[list[str]]:
    """The commands of a shell block: `$ ` lines of a console block, every line of the others."""
    text = block.runnable_code().replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in text.splitlines():
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output shown in the doc
            line = line[2:]
        command: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:  # `a && b` is two commands
            if word != "&&":
                command.append(word)
            elif command:
                commands.append(command)
                command = []
    return commands


def block_problems(block: Block) -> list[str]:
    """Why ``block`` is neither run nor marked: the answer for a new, untested doc block."""
    markers = block.markers
    problems = [f"{block.where}: {p}" for p in markers.problems]
    if markers.skip is not None:
        return problems
    if not block.lang:
        problems.append(f"{block.where}: the fence names no language; tag output ```text, a command ```bash, code ```python")
    elif block.lang not in SHELL | PYTHON | NOT_RUN | set(DATA):
        problems.append(f"{block.where}: ```{block.lang} blocks are not run; use ```text, or mark it <!-- doc-test: skip — reason -->")
    if block.lang in SHELL:
        for command in shell_commands(block):
            if command[0] != "autotp":
                problems.append(f"{block.where}: `{shlex.join(command)}` is not an autotp command; only those run here: mark the block")
    if (markers.file or markers.ranks) and block.lang not in PYTHON:
        problems.append(f"{block.where}: file/ranks apply to python blocks only")
    if (markers.setup or markers.check) and block.lang not in PYTHON | set(DATA):
        problems.append(f"{block.where}: setup/check apply to python, json and toml blocks only")
    if markers.fails and block.lang not in SHELL:
        problems.append(f"{block.where}: `fails` applies to shell blocks only")
    for name, source in markers.needs:
        if not (ROOT / source).is_file() or not any(b.markers.file == name for b in parse_blocks(ROOT / source)[0]):
            problems.append(f"{block.where}: `needs {name} from {source}`: {source} has no block marked `file {name}`")
    return problems


def test_every_block_is_run_or_marked() -> None:
    problems: list[str] = []
    blocks = 0
    for path in doc_files():
        found, orphans = parse_blocks(path)
        blocks += len(found)
        problems += orphans
        for block in found:
            problems += block_problems(block)
    assert blocks > 20, "the markdown parser found almost no code blocks"
    assert not problems, "doc blocks neither run nor marked:\n" + "\n".join(problems)


def test_the_parser_reads_markers_and_finds_unmarked_blocks(tmp_path: Path) -> None:
    """The check above can fail: untagged blocks, reasonless skips and stale replaces are reported."""
    page = tmp_path / "probe.md"
    page.write_text(
        '<!-- doc-test: replace "n_layer=12" "n_layer=2" -->\n```python\nx = dict(n_layer=12)\n```\n\n'
        "```\nautotp plan gpt\n```\n\n"
        "<!-- doc-test: skip -->\n```bash\npip install autotp\n```\n\n"
        '<!-- doc-test: replace "absent" "x" -->\n<!-- doc-test: setup\n  y = 1\n-->\n```python\nz = y\n```\n\n'
        "```bash\nautotp plan gpt && rm -rf /\n```\n\n"
        "<!-- doc-test: skip — not a block -->\nplain text\n",
        encoding="utf-8",
    )
    blocks, orphans = parse_blocks(page)
    problems = [p for block in blocks for p in block_problems(block)]
    assert [b.line for b in blocks] == [2, 6, 11, 19, 23]
    assert blocks[0].runnable_code() == "x = dict(n_layer=2)\n"
    assert blocks[3].markers.setup == "y = 1\n"
    assert shell_commands(blocks[4]) == [["autotp", "plan", "gpt"], ["rm", "-rf", "/"]]
    assert orphans == ["probe.md:27: a doc-test marker must sit right above a fenced block"]
    assert problems == [
        "probe.md:6: the fence names no language; tag output ```text, a command ```bash, code ```python",
        "probe.md:11: `skip` needs a reason: <!-- doc-test: skip — why this block cannot run here -->",
        "probe.md:11: `pip install autotp` is not an autotp command; only those run here: mark the block",
        "probe.md:19: `replace \"absent\" \"x\"`: 'absent' is not in the block any more",
        "probe.md:23: `rm -rf /` is not an autotp command; only those run here: mark the block",
    ]


def test_a_broken_block_fails_naming_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block that fails as written fails the test at its file:line; `fails` expects a failure."""
    page = tmp_path / "probe.md"
    page.write_text(
        "```python\nanswer = 6 * 7\n```\n\n"
        "<!-- doc-test: check\nassert answer == 42\n-->\n```python\nanswer += 1\n```\n\n"
        "<!-- doc-test: fails -->\n```bash\nautotp plan no_such_model.py:build\n```\n\n"
        "```bash\nautotp plan no_such_model.py:build\n```\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    blocks, _ = parse_blocks(page)
    namespace: dict[str, object] = {}
    _run(blocks[0], tmp_path, namespace)
    with pytest.raises(pytest.fail.Exception, match=r"probe.md:8: the python check failed as written"):
        _run(blocks[1], tmp_path, namespace)
    _run(blocks[2], tmp_path, namespace)  # exits 2, as the marker says
    with pytest.raises(pytest.fail.Exception, match=r"probe.md:17: `autotp plan no_such_model.py:build` exited with 2\n.*no such file"):
        _run(blocks[3], tmp_path, namespace)


@pytest.mark.timeout(120)
def test_a_hanging_ranks_block_fails_and_leaves_no_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "probe.md"
    page.write_text(
        "<!-- doc-test: ranks 1 -->\n```python\nimport os, pathlib, time\n"
        "pathlib.Path('rank.pid').write_text(str(os.getpid()))\ntime.sleep(600)\n```\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "RANKS_TIMEOUT_SECONDS", 20)
    blocks, _ = parse_blocks(page)
    with pytest.raises(pytest.fail.Exception, match=r"probe.md:2: the block did not finish on 1 ranks in 20s"):
        _run(blocks[0], tmp_path, {})
    rank = Path(f"/proc/{(tmp_path / 'rank.pid').read_text()}/status")
    deadline = time.monotonic() + 10
    while rank.exists() and "\nState:\tZ" not in rank.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILL is delivered asynchronously
    assert not rank.exists() or "\nState:\tZ" in rank.read_text(), "the rank outlived its block"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_doc_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks, _ = parse_blocks(path)
    problems = [p for block in blocks for p in block_problems(block)]
    assert not problems, "\n".join(problems)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict[str, object] = {"__name__": "__doc_test__"}
    try:
        for block in blocks:
            if block.markers.skip is None:
                _run(block, tmp_path, namespace)
    finally:  # modules a doc wrote (mymodel.py, tp_plan.py) must not leak into the next doc
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]


def _run(block: Block, workdir: Path, namespace: dict[str, object]) -> None:
    for name, source in block.markers.needs:
        defining = next(b for b in parse_blocks(ROOT / source)[0] if b.markers.file == name)
        (workdir / name).write_text(defining.runnable_code(), encoding="utf-8")
    code = block.runnable_code()
    if block.lang in DATA:
        try:
            namespace["data"] = DATA[block.lang](code)
        except ValueError as exc:
            pytest.fail(f"{block.where}: the {block.lang} block does not parse: {exc}")
        _exec_in_notebook(block, {"setup": block.markers.setup, "check": block.markers.check}, namespace)
    elif block.lang in SHELL:
        for command in shell_commands(block):
            status, output = _autotp(command[1:])
            if (status != 0) != block.markers.fails:
                pytest.fail(f"{block.where}: `{shlex.join(command)}` exited with {status}\n{output[-4000:]}")
    elif block.lang in PYTHON and block.markers.file:
        (workdir / block.markers.file).write_text(code, encoding="utf-8")
    elif block.lang in PYTHON and block.markers.ranks:
        _run_on_ranks(block, code, workdir)
    elif block.lang in PYTHON:
        _exec_in_notebook(block, {"setup": block.markers.setup, "block": code, "check": block.markers.check}, namespace)


def _exec_in_notebook(block: Block, parts: dict[str, str], namespace: dict[str, object]) -> None:
    for part, text in parts.items():
        try:
            exec(compile(text, f"{block.where} ({part})", "exec"), namespace)
        except Exception:
            pytest.fail(f"{block.where}: the {block.lang} {part} failed as written\n{traceback.format_exc()[-4000:]}")


def _autotp(argv: list[str]) -> tuple[int, str]:
    """Run one `autotp` command line in this process: its exit status and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse rejects the command line
            status = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            status = 1
    return status, out.getvalue()


# After the block and its check have run, a rank sometimes aborts in torch's C++ teardown at
# interpreter exit ("terminate called without an active exception", about one run in six here,
# after every line of the script had run): end the group, then leave without that teardown.
_TEARDOWN = (
    "import os, sys, torch.distributed\n"
    "if torch.distributed.is_initialized():\n    torch.distributed.destroy_process_group()\n"
    "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n"
)


def _run_on_ranks(block: Block, code: str, workdir: Path) -> None:
    """Run setup + block + check as one script under `torchrun --nproc-per-node N`."""
    script = workdir / f"doc_block_{block.line}.py"
    script.write_text(f"# {block.where}\n{block.markers.setup}\n{code}\n{block.markers.check}\n{_TEARDOWN}", encoding="utf-8")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={block.markers.ranks}",
        f"--master-port={find_free_port()}", script.name,
    ]
    log = workdir / f"doc_block_{block.line}.log"  # a file, not a pipe: a stuck rank cannot block reading it
    with log.open("w") as output, subprocess.Popen(command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT) as launcher:
        try:
            launcher.wait(timeout=RANKS_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            launcher.terminate()  # torchrun ends its ranks on SIGTERM
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
            pytest.fail(f"{block.where}: the block did not finish on {block.markers.ranks} ranks in {RANKS_TIMEOUT_SECONDS}s")
    if launcher.returncode != 0:
        pytest.fail(f"{block.where}: the block failed on {block.markers.ranks} ranks\n{log.read_text()[-8000:]}")
