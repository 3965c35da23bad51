"""examples/train_gpt.py under real torchrun: trains, saves a checkpoint, resumes on more ranks;
trains on a (2, 2) ("dp", "tp") mesh."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from autotp.testing import find_free_port

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"


# torch's C++ teardown sometimes aborts a rank at interpreter exit after the script has run to its
# end (about one run in six inside the suite, never in a dozen standalone runs; see the issue-18
# note): such a run is repeated once. Any other failure, or the abort twice, fails the test.
EXIT_ABORT = "terminate called without an active exception"


def _torchrun(nproc: int, *args: str) -> str:
    for attempt in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={find_free_port()}", str(SCRIPT), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        if done.returncode == 0 or EXIT_ABORT not in done.stderr or attempt == 2:
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _final_loss(output: str) -> float:
    return float(re.search(r"final loss ([0-9.]+)", output).group(1))


@pytest.mark.timeout(600)
def test_train_save_and_resume_on_more_ranks(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    first = _torchrun(2, "--steps", "30", "--save", str(checkpoint))
    assert "saved a sharded checkpoint" in first
    trained = _final_loss(first)
    assert trained < 4.5  # from ln(256) = 5.55 at initialisation
    resumed = _torchrun(4, "--steps", "1", "--load", str(checkpoint), "--lr", "0")
    assert "resumed from" in resumed
    assert _final_loss(resumed) < 4.5  # a fresh model would start at ~5.5


@pytest.mark.timeout(600)
def test_train_on_a_2x2_mesh() -> None:
    output = _torchrun(4, "--steps", "30", "--mesh", "2x2")
    assert "mesh (dp=2, tp=2)" in output  # the plan is for the 2-D mesh
    assert _final_loss(output) < 4.5  # from ln(256) = 5.55 at initialisation
