"""Start M local worker processes in one Gloo process group and collect what they return.

Used by the tests (``tests/distributed``), the benchmarks and ``signsgd train --workers M``.
Each worker joins a ``torch.distributed`` group on ``127.0.0.1`` at a free port. A worker
that raises ends the whole launch with that worker's traceback; workers still blocked in
a collective are terminated, so a launch never hangs past ``timeout``. The root cause is
named first: a worker that died (with its signal or exit code), else one that stalled
(stopped, or behind the others' :func:`heartbeat`), else the first to fail.

Example:
    >>> def work(rank: int, world_size: int) -> int:   # must live in an importable module
    ...     t = torch.tensor([rank + 1.0]); dist.all_reduce(t); return int(t)
    >>> spawn(work, 3)   # doctest: +SKIP
    [6, 6, 6]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["free_port", "spawn", "heartbeat", "memory_available", "WorkerError"]

#: In a worker started by :func:`spawn`: (rank, the queue to the launcher).
_LAUNCHER: tuple[int, Any] | None = None


def memory_available() -> int | None:
    """Bytes of memory available for new processes (``MemAvailable`` of ``/proc/meminfo``;
    ``None`` where it cannot be read): what the trainer and the benchmarks check before
    starting local workers.

    Example:
        >>> memory_available() is None or memory_available() > 0
        True
    """
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def heartbeat(step: int) -> None:
    """Tell the launcher this worker reached ``step`` (a no-op outside :func:`spawn`).

    When the launch fails, a worker found stopped (SIGSTOP) or whose last step is behind
    the others' is named as the cause: ``no progress for N s, since step S`` (its last
    heartbeat), not by the signal the launcher itself then ends it with. Heartbeats travel
    on a queue's feeder thread: one sent just before the worker stopped may not arrive.

    Example:
        >>> heartbeat(1)   # not in a spawned worker: nothing happens
    """
    if _LAUNCHER is not None:
        rank, queue_ = _LAUNCHER
        queue_.put((rank, None, step))


class WorkerError(RuntimeError):
    """One or more workers raised (or died, or timed out); the message holds their tracebacks.

    Attributes:
        failures: rank -> traceback (or how the worker died).
        cause: the rank of the root cause: a worker that died without reporting (killed,
            crashed) comes first, else the worker that failed first in time.
    """

    def __init__(self, message: str, failures: dict[int, str], cause: int | None = None
                 ) -> None:
        super().__init__(message)
        self.failures = failures
        self.cause = cause


def _exit_text(rank: int, code: int | None) -> str:
    """How worker ``rank`` ended, in words (a negative exit code is a signal)."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker {rank} was killed by signal {-code} ({name}) without reporting"
    return f"worker {rank} died with exit code {code} without reporting"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def _stalled(progress: dict[int, int], world_size: int) -> list[int]:
    """The workers whose last heartbeat is behind the others' (none without heartbeats)."""
    if not progress:
        return []
    ahead = max(progress.values())
    return [r for r in range(world_size) if progress.get(r, 0) < ahead]


def _stopped(pid: int | None) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, SIGTSTP, a debugger); False where
    ``/proc`` is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _stall_text(rank: int, progress: dict[int, int], quiet_s: float, stopped: bool) -> str:
    """Why worker ``rank`` is the cause although it is alive: it made no progress."""
    since = f"since step {progress[rank]}" if rank in progress else "since it started"
    ahead = max(progress.values(), default=0)
    why = ("stopped by SIGSTOP or a debugger" if stopped else
           f"alive but it did not arrive where the others reached step {ahead}")
    return f"no progress for {quiet_s:.0f} s, {since} (stalled: {why})"


def _report(world_size: int, failures: dict[int, str], died: list[int]) -> tuple[str, int]:
    """The launch's error message: the root cause first, one line per other rank, then the
    full tracebacks. A worker in ``died`` (died, in the order it was seen, or stalled) is
    the root cause: its peers only saw their connections close or time out."""
    cause = died[0] if died else next(iter(failures))
    text = failures[cause]
    how = _last_line(text) if text.startswith("Traceback") else text.splitlines()[0]
    lines = [f"{len(failures)} of {world_size} workers failed; the cause: rank {cause}: {how}"]
    lines += [f"  rank {r}: {_last_line(failures[r])}" for r in sorted(failures) if r != cause]
    lines += [f"--- rank {r} ---\n{failures[r]}" for r in [cause] + sorted(
        r for r in failures if r != cause)]
    return "\n".join(lines), cause


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this worker when the launching process dies (even by SIGKILL).

    Without it, a launcher killed from outside would leave its workers orphaned, blocked in a
    collective until the group's timeout. No-op where ``prctl`` is unavailable.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: Sequence[Any],
    port: int,
    backend: str,
    pg_timeout: float,
    threads: int | None,
    env: dict[str, str],
    results: Any,
    parent_pid: int,
) -> None:
    _die_with_parent(parent_pid)
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    global _LAUNCHER
    _LAUNCHER = (rank, results)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            # A failed peer can leave the group unusable; tearing down must not hang or mask
            # the real error.
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        # Plain pickle: torch's multiprocessing reducers would pass tensors as shared-memory
        # handles that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    threads: int | None = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world_size: number of processes M (>= 1).
        args: extra positional arguments for ``fn``.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout: seconds for the whole launch; then every worker is killed.
        pg_timeout: the process group's own timeout for collectives (default: ``timeout``).
            A worker blocked on a dead peer fails after this long.
        threads: ``torch.set_num_threads`` in each worker (``None`` leaves the default).
        env: extra environment variables for the workers.

    Returns:
        ``[result of rank 0, ..., result of rank M-1]``.

    Raises:
        ValueError: ``world_size < 1``.
        WorkerError: a worker raised, died or did not finish in ``timeout``; the message
            holds each failing rank's traceback.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, tuple(args), port, backend,
                  float(pg_timeout if pg_timeout is not None else timeout), threads,
                  dict(env or {}), results, os.getpid()),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    died: list[int] = []  # workers that ended without reporting, in the order seen
    progress: dict[int, int] = {}  # the last step each worker reached (heartbeat)
    start = time.monotonic()
    beats: dict[int, float] = {}  # when each worker's last heartbeat arrived
    stopped: list[int] = []  # workers found stopped when the launch ended
    ended: set[int] = set()  # workers this launcher had to end (their exit code is ours)
    deadline = start + timeout
    grace_deadline: float | None = None
    try:
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            if now >= limit:
                break
            try:
                rank, ok, value = results.get(timeout=min(0.2, limit - now))
                if ok is None:  # a heartbeat: the step this worker completed
                    progress[rank], beats[rank] = value, time.monotonic()
                    continue
            except queue.Empty:
                # A worker that died without reporting (killed, segfault) is a failure too.
                for rank, p in enumerate(procs):
                    if (not p.is_alive() and rank not in outputs and rank not in failures
                            and p.exitcode not in (0, None)):
                        time.sleep(0.2)  # let a report in flight arrive first
                        try:
                            while True:
                                r, ok2, v = results.get_nowait()
                                if ok2 is None:
                                    progress[r], beats[r] = v, time.monotonic()
                                    continue
                                (outputs if ok2 else failures)[r] = v
                        except queue.Empty:
                            pass
                        if rank not in outputs and rank not in failures:
                            failures[rank] = _exit_text(rank, p.exitcode)
                            died.append(rank)
                if failures and grace_deadline is None:
                    grace_deadline = time.monotonic() + 10.0
                if failures and all(_stopped(p.pid) for r, p in enumerate(procs)
                                    if r not in outputs and r not in failures):
                    break  # only stopped workers are left: no point in waiting for them
                continue
            if ok:
                outputs[rank] = value
            else:
                failures[rank] = value
                if grace_deadline is None:
                    # Give the others a moment to fail on their own (with their own error),
                    # then kill whoever is still blocked.
                    grace_deadline = time.monotonic() + 10.0
    finally:
        over = time.monotonic()
        for r, p in enumerate(procs):
            if p.is_alive():
                ended.add(r)
                if _stopped(p.pid):
                    stopped.append(r)
                    p.kill()  # a stopped process would not act on SIGTERM
                else:
                    p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    missing = [r for r in range(world_size) if r not in outputs and r not in failures]
    for r in missing:
        failures[r] = (
            f"worker {r} did not finish within the launch "
            f"({'a peer failed' if failures else f'timeout {timeout:g}s'}); terminated"
        )
    if failures:
        for r, p in enumerate(procs):  # a late exit code: died without reporting after all
            if r not in died and r not in ended and r in missing \
                    and p.exitcode not in (0, None):
                failures[r] = _exit_text(r, p.exitcode)
                died.append(r)
        # the cause when none died: a worker found stopped, else one behind the others
        # (stalled if it never reported; else its own error, e.g. it raised first)
        stalled = [r for r in stopped if r in missing]
        stalled += [r for r in _stalled(progress, world_size) if r not in stalled]
        if stalled and not died:
            for r in stalled:
                if r in missing:
                    failures[r] = (_stall_text(r, progress, over - beats.get(r, start),
                                               r in stopped) + "\n" + failures[r])
            died = stalled
        message, cause = _report(world_size, failures, died)
        raise WorkerError(message, failures, cause)
    return [pickle.loads(outputs[r]) for r in range(world_size)]
