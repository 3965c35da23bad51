"""Run a function on `world_size` gloo ranks, each in a fresh process, for multi-process tests.

Why not `torch.multiprocessing.spawn`: it joins in its own loop, so a test cannot bound a hang, and
a rank that dies leaves its peers blocked in a collective. Here every rank reports over its own
pipe, the parent waits with a deadline, and on the first failure every rank is killed and reaped.

Each rank sends its outcome with a synchronous `Connection.send` *before* it tears its process
group down, so the root-cause error is already readable when peers start failing because that rank
left. A rank that dies without reporting (segfault, `os._exit`) closes its end of the pipe, which
the parent sees at once as end-of-file rather than after the deadline.

    results = run_on_ranks(my_module.check_all_reduce, 4, timeout_seconds=60)
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

T = TypeVar("T")

# Seconds a rank that already reported gets to tear its group down and exit before it is killed.
_EXIT_GRACE_SECONDS = 10.0
# Seconds to wait for a terminated rank before escalating to SIGKILL.
_TERMINATE_GRACE_SECONDS = 2.0


class RankError(RuntimeError):
    """A rank raised, or exited without reporting; the message names the rank and its traceback."""


class RankTimeoutError(RankError):
    """Some ranks did not report before the deadline: a hang, e.g. mismatched collectives."""


def resident_nbytes() -> int:
    """This process's resident memory now (Linux ``/proc``)."""
    return _proc_status_kib("VmRSS") * 1024


def peak_resident_growth(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and how far this process's resident memory rose above its level before the call, at its peak.

    The kernel's high-water mark (``VmHWM``) is reset to the current level first (writing 5 to
    ``/proc/self/clear_refs``), so the figure is the call's own, sampled by the kernel, not polled.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = resident_nbytes()
    result = fn()
    return result, _proc_status_kib("VmHWM") * 1024 - before


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (peak memory is measured on Linux only)")


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; races are possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(
    fn: Callable[..., T],
    world_size: int,
    /,
    *args: Any,
    timeout_seconds: float = 120.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[T]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; results by rank.

    `backend="nccl"` runs NCCL ranks instead, rank r on GPU r (`autotp calibrate` on GPUs).

    `fn` must be a module-level function importable in a freshly spawned interpreter (not a
    lambda, closure or a function defined in a test body), and `args`, `kwargs` and its return
    value must be picklable. Results travel through plain `pickle`, so tensors are copied, not
    shared. `timeout_seconds` bounds the whole call and is also the process-group timeout.

    Ranks are daemonic, so `fn` cannot start `multiprocessing` children (e.g. DataLoader workers).

    Raises `RankError` as soon as a rank raises or exits without reporting (with every error
    readable at that moment, so a peer's knock-on failure does not hide the root cause), and
    `RankTimeoutError` when the deadline passes; every rank is killed and reaped either way.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    deadline = time.monotonic() + timeout_seconds
    ctx = mp.get_context("spawn")
    port = find_free_port()
    processes: list[BaseProcess] = []
    readers: list[Connection] = []
    succeeded = False
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_run_rank,
                args=(fn, rank, world_size, port, timeout_seconds, args, kwargs, writer, backend),
                name=f"autotp-rank-{rank}",
                daemon=True,
            )
            process.start()
            # The child holds its own copy; closing ours lets its death show up as EOF.
            writer.close()
            processes.append(process)
            readers.append(reader)
        results = _collect(processes, readers, deadline=deadline, timeout_seconds=timeout_seconds)
        succeeded = True
        return results
    finally:
        _reap(processes, grace_seconds=_EXIT_GRACE_SECONDS if succeeded else 0.0)
        for reader in readers:
            reader.close()


def _run_rank(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    timeout_seconds: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    writer: Connection,
    backend: str = "gloo",
) -> None:
    """Child entry point: join the process group, run `fn`, send ("ok", pickled) or ("error", text)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_seconds)
        )
        # Plain pickle, not torch's ForkingPickler: tensors are copied rather than shared through
        # file descriptors that vanish when this process exits, and an unpicklable result fails
        # here, with a traceback, instead of silently in a queue's feeder thread.
        writer.send(("ok", pickle.dumps(fn(rank, world_size, *args, **kwargs))))
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt must be reported too
        writer.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        writer.close()


def _collect(
    processes: list[BaseProcess],
    readers: list[Connection],
    *,
    deadline: float,
    timeout_seconds: float,
) -> list[Any]:
    """Read one report per rank until all are in; raise on the first failure or at the deadline."""
    results: dict[int, Any] = {}
    pending = dict(enumerate(readers))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait(list(pending.values()), timeout=remaining):
            raise RankTimeoutError(
                f"ranks {sorted(pending)} of {len(processes)} did not report within "
                f"{timeout_seconds:g} s (a hang: mismatched collectives, a deadlock, or a rank "
                f"still starting); ranks {sorted(results)} had reported"
            )
        # Drain every ready rank before raising, so that the error of the rank that failed first
        # is reported alongside the errors its peers hit when it left the group.
        errors: list[str] = []
        for rank, reader in sorted(pending.items()):
            if not reader.poll():
                continue
            del pending[rank]
            try:
                status, payload = reader.recv()
            except EOFError:
                errors.append(_describe_silent_exit(rank, processes[rank]))
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} raised:\n{payload}")
        if errors:
            raise RankError("\n".join(errors))
    return [results[rank] for rank in range(len(processes))]


def _describe_silent_exit(rank: int, process: BaseProcess) -> str:
    """Why a rank closed its pipe without a report: its exit code or the signal that killed it."""
    process.join(timeout=_TERMINATE_GRACE_SECONDS)
    code = process.exitcode
    if code is None:
        how = "closed its pipe but is still running"
    elif code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        how = f"exited with code {code}"
    return f"rank {rank} {how} without reporting a result; its stderr may say why\n"


def _reap(processes: list[BaseProcess], *, grace_seconds: float) -> None:
    """Wait up to `grace_seconds` for ranks to exit, then terminate, kill and join the rest."""
    end = time.monotonic() + grace_seconds
    for process in processes:
        process.join(timeout=max(0.0, end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=_TERMINATE_GRACE_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
