"""Module-level worker functions for tests/distributed/test_launch.py (spawn pickles them)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def sum_of_ranks(rank: int, world_size: int) -> float:
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return float(t)


def raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    t = torch.tensor([1.0])
    dist.all_reduce(t)  # blocks until the launcher kills it or the peer's exit breaks it
    return rank


def kill_one_rank(rank: int, world_size: int, victim: int) -> int:
    """``victim`` is killed by SIGKILL mid-run; the others block in a collective."""
    t = torch.tensor([1.0])
    dist.all_reduce(t)  # everyone is up
    if rank == victim:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(t)  # fails on the others once the victim's sockets close
    return rank


def stop_one_rank(rank: int, world_size: int, victim: int) -> int:
    """At step 2, before its heartbeat, ``victim`` stops itself (SIGSTOP); the others wait
    for it in the collective until the group's timeout."""
    from signsgd.distributed.launch import heartbeat

    t = torch.tensor([1.0])
    for step in range(3):
        if rank == victim and step == 2:
            time.sleep(1.0)  # heartbeats travel on the queue's feeder thread: let it send
            os.kill(os.getpid(), signal.SIGSTOP)
        heartbeat(step)
        dist.all_reduce(t)
    return rank


def write_pid_and_sleep(rank: int, world_size: int, folder: str) -> None:
    Path(folder, f"pid{rank}").write_text(str(os.getpid()))
    time.sleep(300)


if __name__ == "__main__":  # the launcher process of test_workers_die_with_a_killed_launcher
    from signsgd.distributed.launch import spawn

    spawn(write_pid_and_sleep, 2, (sys.argv[1],), timeout=300)
