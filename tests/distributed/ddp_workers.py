"""Worker side of tests/distributed/test_ddp_modes.py: the majority-vote hook under every
DDP mode users turn on, next to ``Signum(aggregator=MajorityVote())`` fed the same data.

Every case trains a few steps with DDP + hook + ``SGD(momentum=0)`` and, beside it, the
optimiser path; it returns both parameter sets (the parent checks them equal where the
algorithms agree, and identical on every rank). A hang here is the bug the private vote
group fixes: the spawn's timeout turns it into a failure.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import signsgd
from signsgd.distributed import MajorityVote, MajorityVoteHookState, majority_vote_hook


class WithUnused(nn.Module):
    """Two layers used every step and a head used only when ``use_extra``."""

    use_extra: bool

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3).to(dtype)
        self.extra = nn.Linear(8, 3)
        self.use_extra = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        out = self.b(h.to(self.b.weight.dtype)).float()
        return out + self.extra(h) if self.use_extra else out


MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "find_unused_parameters": {"find_unused_parameters": True},
    "static_graph": {"static_graph": True},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "no_sync_accumulation": {"accumulate": 2},
    "mixed_fp32_bf16": {"dtype": torch.bfloat16},
}


def run_mode(rank: int, world: int, mode: str, steps: int = 4) -> dict[str, Any]:
    opts = dict(MODES[mode])
    accumulate = opts.pop("accumulate", 1)
    dtype = opts.pop("dtype", torch.float32)
    base = WithUnused(dtype)
    ddp = DDP(copy.deepcopy(base), bucket_cap_mb=0.0002, **opts)
    state = MajorityVoteHookState(momentum=0.9, module=ddp)
    ddp.register_comm_hook(state, majority_vote_hook)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01)
    ref = copy.deepcopy(base)
    opt = signsgd.Signum(ref.parameters(), lr=0.01, momentum=0.9, aggregator=MajorityVote())
    g = torch.Generator().manual_seed(rank)
    for step in range(steps):
        # With find_unused_parameters the head is used every other step; else always.
        use = mode != "find_unused_parameters" or step % 2 == 1
        ddp.module.use_extra = ref.use_extra = use
        sgd.zero_grad()
        opt.zero_grad()
        for micro in range(accumulate):
            x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
            loss_fn = nn.functional.mse_loss
            if micro < accumulate - 1:
                with ddp.no_sync():  # local accumulation: no vote
                    loss_fn(ddp(x), y).backward()
            else:
                loss_fn(ddp(x), y).backward()
            loss_fn(ref(x), y).backward()
        sgd.step()
        opt.step()
    return {"ddp": [p.detach().float().clone() for p in ddp.module.parameters()],
            "ref": [p.detach().float().clone() for p in ref.parameters()],
            "names": [n for n, _ in ddp.module.named_parameters()],
            "steps": state.step}


def ddp_modes(rank: int, world: int) -> dict[str, Any]:
    return {mode: run_mode(rank, world, mode) for mode in MODES}
