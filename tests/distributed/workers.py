"""Module-level worker functions for ``signsgd.distributed.launch.spawn``.

Used by tests/distributed/test_vote.py, test_aggregators.py and test_failures.py; every
function takes ``(rank, world_size, *args)`` and returns something picklable.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from signsgd.distributed.vote import majority_vote


def case_inputs(world_size: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """All ranks' inputs of one vote case, ``(world_size, numel)``: small ints incl. zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (world_size, numel), generator=g).to(dtype)


def vote_cases(rank: int, world_size: int, cases: list[tuple[Any, ...]]) -> list[torch.Tensor]:
    """Run ``majority_vote`` for each ``(numel, dtype, mode, seed, step, data_seed)`` case."""
    out = []
    for numel, dtype, mode, seed, step, data_seed in cases:
        x = case_inputs(world_size, numel, dtype, data_seed)[rank]
        out.append(majority_vote(x, mode=mode, seed=seed, step=step))
    return out


def die_in_vote(rank: int, world_size: int) -> str:
    """Rank 1 exits abruptly before the vote; the others must fail with a clear error."""
    if rank == 1:
        os._exit(3)
    try:
        majority_vote(torch.ones(1000))
    except Exception as exc:  # noqa: BLE001 - report the error text to the parent
        return f"{type(exc).__name__}: {exc}"
    return "no error"
