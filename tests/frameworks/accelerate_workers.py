"""HF accelerate recipes (tests/frameworks/test_accelerate.py), on the spawned Gloo group,
each next to the same training written with plain torch + signsgd on the same batches.

Imported by spawned workers: no pytest here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import signsgd
from signsgd.distributed import MajorityVote, MajorityVoteHookState, majority_vote_hook

STEPS = 4          # optimiser steps
ACCUMULATE = 2     # micro-batches per step
BATCH = 4


def data() -> TensorDataset:
    """A small regression problem, the same on every rank (the loader shards it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * ACCUMULATE * BATCH * 2, 6, generator=gen)
    y = x @ torch.randn(6, 1, generator=gen) + 0.1 * torch.randn(len(x), 1, generator=gen)
    return TensorDataset(x, y)


def net() -> nn.Module:
    """The model, the same initial weights on every call and every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def my_batches(rank: int, world: int) -> list[Any]:
    """The batches accelerate's prepared loader gives this rank: every world-th batch."""
    return list(DataLoader(data(), batch_size=BATCH))[rank::world]


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train(accelerator: Accelerator, model: Any, opt: Any, loader: Any) -> None:
    """The accelerate loop: accumulate(), accelerator.backward, step, zero_grad."""
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()


def by_hand(model: nn.Module, opt: Any, batches: list[Any], ddp: DDP | None) -> None:
    """The same loop written by hand: loss / ACCUMULATE, ``no_sync`` between steps."""
    for i, (x, y) in enumerate(batches):
        last = (i + 1) % ACCUMULATE == 0
        quiet = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        with quiet:
            (nn.functional.mse_loss((ddp or model)(x), y) / ACCUMULATE).backward()
        if last:
            opt.step()
            opt.zero_grad()


def cases(rank: int, world: int) -> dict[str, Any]:
    """Three recipes on one Accelerator (gradient accumulation over 2 micro-batches), and
    the hook given through DistributedDataParallelKwargs."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    out: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type),
        "processes": accelerator.num_processes, "index": accelerator.process_index,
        "multi_cpu": accelerator.distributed_type == DistributedType.MULTI_CPU,
    }
    mine = my_batches(rank, world)

    # 1. Signum through prepare: DDP averages the gradients, Signum steps on the mean.
    model = net()
    opt = signsgd.Signum(model.parameters(), lr=0.01, momentum=0.9)
    ddp, opt, loader = accelerator.prepare(model, opt, DataLoader(data(), batch_size=BATCH))
    out["wrapped_in_ddp"] = isinstance(ddp, DDP)
    train(accelerator, ddp, opt, loader)
    ref = net()
    ref_ddp = DDP(ref)
    by_hand(ref, signsgd.Signum(ref_ddp.parameters(), lr=0.01, momentum=0.9), mine, ref_ddp)
    out["signum"] = {"accelerate": params(model), "plain": params(ref)}

    # 2. The majority-vote hook on the prepared DDP model + SGD(momentum=0).
    model = net()
    ddp, opt, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0),
        DataLoader(data(), batch_size=BATCH))
    state = MajorityVoteHookState(momentum=0.9, module=ddp)
    ddp.register_comm_hook(state, majority_vote_hook)
    train(accelerator, ddp, opt, loader)
    ref = net()
    ref_ddp = DDP(ref)
    ref_ddp.register_comm_hook(MajorityVoteHookState(momentum=0.9), majority_vote_hook)
    by_hand(ref, torch.optim.SGD(ref_ddp.parameters(), lr=0.01, momentum=0.0), mine, ref_ddp)
    out["hook"] = {"accelerate": params(model), "plain": params(ref), "hook_steps": state.step}

    # 3. Signum(aggregator=MajorityVote()): prepare the optimiser and the loader, not the
    #    model (a DDP model would all-reduce the gradients as well as the vote).
    model = net()
    voted = signsgd.Signum(model.parameters(), lr=0.01, momentum=0.9, aggregator=MajorityVote())
    opt, loader = accelerator.prepare(voted, DataLoader(data(), batch_size=BATCH))
    train(accelerator, model, opt, loader)
    ref = net()
    by_hand(ref, signsgd.Signum(ref.parameters(), lr=0.01, momentum=0.9,
                                aggregator=MajorityVote()), mine, None)
    out["voted"] = {"accelerate": params(model), "plain": params(ref),
                    "momentum_buffers": len(voted.state)}

    # 4. DistributedDataParallelKwargs(comm_hook=our hook): accepted, then not registered
    #    (accelerate maps only its DDPCommunicationHookType names to hooks).
    handler = DistributedDataParallelKwargs(comm_hook=majority_vote_hook)
    ddp = Accelerator(cpu=True, kwargs_handlers=[handler]).prepare(net())
    x, y = mine[0]
    nn.functional.mse_loss(ddp(x), y).backward()
    out["kwargs_hook_voted"] = all(set(p.grad.unique().tolist()) <= {-1.0, 1.0}
                                   for p in ddp.parameters())
    return out
