"""Worker side of tests/distributed/test_fsdp.py (spawn pickles it by name)."""

from __future__ import annotations

from typing import Any

import torch

import signsgd
from signsgd.distributed import MajorityVote


def fsdp2(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 (fully_shard): our optimisers step the local shards without an aggregator,
    and refuse one at construction with a clear error."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    out: dict[str, Any] = {}
    try:
        signsgd.Signum(model.parameters(), lr=0.01, aggregator=MajorityVote())
    except ValueError as exc:
        out["error"] = str(exc)
    opt = signsgd.Lion(model.parameters(), lr=0.01)
    before = [p.to_local().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(rank)
    model(torch.randn(4, 8, generator=g)).sum().backward()
    opt.step()
    out["moved"] = [not torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters())]
    out["full"] = [p.full_tensor().clone() for p in model.parameters()]
    return out
