"""AMP recipes (tests/frameworks/test_amp.py): GradScaler, bf16 autocast, gradient
accumulation with ``no_sync()`` and the majority-vote hook, next to references.

Imported by spawned workers: no pytest here. Only torch and signsgd.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import signsgd
from signsgd.distributed import MajorityVote, MajorityVoteHookState, majority_vote_hook

STEPS = 4
ACCUMULATE = 2
BAD_STEP = 1     # the step whose batch overflows (an inf input, as fp16 overflow gives)
BAD_RANK = 1     # ... on this rank only


def net() -> nn.Module:
    """The model, the same initial weights on every call and every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch; rank BAD_RANK's batches of step BAD_STEP hold an inf."""
    gen = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    x = torch.randn(4, 6, generator=gen)
    if rank == BAD_RANK and step == BAD_STEP:
        x[0, 0] = float("inf")
    return x, x.sum(1, keepdim=True).sin()


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE with the forward pass under bf16 autocast on CPU (the fp32 weights stay fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return nn.functional.mse_loss(out.float(), y)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the parameters."""
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Two parameter lists, bit for bit."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def same_state(a: Any, b: Any) -> bool:
    """Deep equality of two state dicts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def accumulation(rank: int, world: int) -> dict[str, Any]:
    """bf16 autocast + ``no_sync()`` accumulation + the hook vs Signum(MajorityVote())."""
    model = net()
    ddp = DDP(model)
    ddp.register_comm_hook(MajorityVoteHookState(momentum=0.9, module=ddp), majority_vote_hook)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.0)
    ref = net()
    voted = signsgd.Signum(ref.parameters(), lr=0.01, momentum=0.9, aggregator=MajorityVote())
    for step in range(STEPS):
        shift = step + (step >= BAD_STEP)  # no inf here: skip the bad step's batches
        for micro in range(ACCUMULATE):
            x, y = batch(rank, shift, micro)
            quiet = ddp.no_sync() if micro < ACCUMULATE - 1 else contextlib.nullcontext()
            with quiet:
                (loss_of(ddp, x, y) / ACCUMULATE).backward()
            (loss_of(ref, x, y) / ACCUMULATE).backward()
        sgd.step()
        sgd.zero_grad()
        voted.step()
        voted.zero_grad()
    return {"hook": snapshot(model), "optimiser": snapshot(ref)}


def scaler_with_aggregator(rank: int, world: int) -> dict[str, Any]:
    """GradScaler + Signum(aggregator=MajorityVote()), an inf on one rank: the recipe
    (unscale_, step on every rank, back off together) vs training on the finite batches."""
    model = net()
    opt = signsgd.Signum(model.parameters(), lr=0.01, momentum=0.9, aggregator=MajorityVote())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    skipped, scales, unchanged = [], [], None
    for step in range(STEPS):
        x, y = batch(rank, step)
        before, state = snapshot(model), copy.deepcopy(opt.state_dict())
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt)
        try:
            opt.step()          # every rank votes; a NaN/inf on any rank raises on every rank
            scaler.update()
        except signsgd.NonFiniteGradientError:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            skipped.append(step)
            unchanged = same(before, snapshot(model)) and same_state(state, opt.state_dict())
        opt.zero_grad()
        scales.append(scaler.get_scale())
    ref = net()
    plain = signsgd.Signum(ref.parameters(), lr=0.01, momentum=0.9, aggregator=MajorityVote())
    for step in range(STEPS):
        if step == BAD_STEP:
            continue
        loss_of(ref, *batch(rank, step)).backward()
        plain.step()
        plain.zero_grad()
    return {"params": snapshot(model), "reference": snapshot(ref), "skipped": skipped,
            "scales": scales, "unchanged": unchanged}


def scaler_with_hook(rank: int, world: int) -> dict[str, Any]:
    """GradScaler + DDP + the hook, an inf on one rank: ``backward()`` raises on every rank;
    the recipe skips the step and backs off on every rank."""
    model = net()
    ddp = DDP(model)
    state = MajorityVoteHookState(momentum=0.9, module=ddp)
    ddp.register_comm_hook(state, majority_vote_hook)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    errors, scales, unchanged = [], [], None
    for step in range(STEPS):
        x, y = batch(rank, step)
        before, momentum = snapshot(model), copy.deepcopy(state.state_dict())
        try:
            scaler.scale(loss_of(ddp, x, y)).backward()   # the votes run here
        except RuntimeError as exc:                         # some rank had a NaN/inf
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            errors.append((step, "NonFiniteGradientError" in str(exc)))
            unchanged = same(before, snapshot(model)) and same_state(
                momentum, state.state_dict())
        else:
            scaler.step(sgd)
            scaler.update()
        sgd.zero_grad()
        scales.append(scaler.get_scale())
    return {"params": snapshot(model), "errors": errors, "scales": scales,
            "hook_steps": state.step, "unchanged": unchanged}


def cases(rank: int, world: int) -> dict[str, Any]:
    """The distributed AMP recipes in one launch."""
    out = {"accumulation": accumulation(rank, world),
           "scaler_with_aggregator": scaler_with_aggregator(rank, world),
           "scaler_with_hook": scaler_with_hook(rank, world)}
    dist.barrier()
    return out
