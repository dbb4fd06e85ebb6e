"""The local Gloo launcher: results, a failing worker's traceback, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from signsgd.distributed.launch import WorkerError, spawn

from . import launch_workers as lw


def test_results_come_back_in_rank_order() -> None:
    assert spawn(lw.sum_of_ranks, 3) == [6.0, 6.0, 6.0]


def test_a_failing_worker_ends_the_launch_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(lw.raise_on_rank_one, 3, pg_timeout=20, timeout=60)
    assert "rank 1 fails on purpose" in str(info.value)
    assert "ValueError" in info.value.failures[1]
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("victim", [1, 2])
def test_a_killed_worker_is_named_first_with_its_signal(victim: int) -> None:
    with pytest.raises(WorkerError) as info:
        spawn(lw.kill_one_rank, 4, (victim,), pg_timeout=20, timeout=60)
    err = info.value
    assert err.cause == victim
    first = str(err).splitlines()[0]
    assert f"the cause: rank {victim}" in first, first
    assert "was killed by signal 9 (SIGKILL)" in first, first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/stat")
def test_a_stopped_worker_is_named_as_stalled_not_as_killed() -> None:
    """SIGSTOP: the cause is the lack of progress, not the launcher's own kill at the end."""
    with pytest.raises(WorkerError) as info:
        spawn(lw.stop_one_rank, 2, (1,), pg_timeout=2, timeout=60)
    err = info.value
    first = str(err).splitlines()[0]
    assert err.cause == 1, first
    assert "the cause: rank 1: no progress for " in first, first
    assert " s, since step 1 (stalled: stopped by SIGSTOP" in first, first
    assert "signal 9" not in str(err), str(err)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_world_size_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        spawn(lw.sum_of_ranks, bad)  # type: ignore[arg-type]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux")
def test_workers_die_with_a_killed_launcher(tmp_path: Path) -> None:
    tests_dir = Path(__file__).resolve().parents[1]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "distributed.launch_workers", str(tmp_path)], cwd=tests_dir
    )
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid{r}").exists() for r in range(2)):
            if time.monotonic() > deadline or launcher.poll() is not None:
                pytest.fail("the launcher's workers did not start")
            time.sleep(0.1)
        time.sleep(0.2)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    finally:
        launcher.send_signal(signal.SIGKILL)  # no chance for Python clean-up in the launcher
        launcher.wait(timeout=30)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their launcher"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie awaiting its (dead) parent's reaping counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
