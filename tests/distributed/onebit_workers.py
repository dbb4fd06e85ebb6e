"""Worker side of tests/test_onebit_adam.py (spawn pickles these by name): OneBitAdam with
OneBitAllReduce on Gloo sub-groups of 1, 3 and 4 ranks, in one launch."""

from __future__ import annotations

import copy
import io
from typing import Any

import torch
import torch.distributed as dist

import signsgd
from signsgd.distributed import AllReduce

from .workers import _same, _snapshot, grads_for, make_params

#: the hyper-parameters of every run (the reference in tests/test_onebit_adam.py uses them)
HP: dict[str, Any] = {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}
FREEZE, STEPS = 2, 5


def _opt(params: list[torch.nn.Parameter], group: Any, **over: Any) -> signsgd.OneBitAdam:
    return signsgd.OneBitAdam(params, **{**HP, "freeze_step": FREEZE, **over},
                              aggregator=signsgd.distributed.OneBitAllReduce(group))


def _feed(params: list[torch.nn.Parameter], rank: int, step: int, nan: bool = False) -> None:
    for p, g in zip(params, grads_for(params, rank, step, zeros=False)):
        p.grad = g
    if nan:
        params[1].grad[3] = float("nan")


def _state(params: list[torch.nn.Parameter], opt: signsgd.OneBitAdam) -> dict[str, Any]:
    """Everything a step may change: parameters, m, v, worker errors, the reducers' state
    (server error, counters), the step counter."""
    return copy.deepcopy({"params": _snapshot(params), "sd": opt.state_dict()})


def trajectory(rank: int, group: Any, **over: Any) -> dict[str, Any]:
    """STEPS steps across the freeze: parameters and bytes after every step, final state."""
    params = make_params(torch.float64)
    opt = _opt(params, group, **over)
    traj, sent = [], []
    for step in range(STEPS):
        _feed(params, rank, step)
        opt.step()
        traj.append(_snapshot(params))
        sent.append(opt.bytes_sent)
    return {"traj": traj, "sent": sent, "errors": [opt.state[p]["error"].clone() for p in params],
            "server": opt.aggregator.ef.server_error, "steps": opt.steps}


def nan_step(rank: int, group: Any, at: int) -> dict[str, Any]:
    """``at`` good steps, then a NaN on rank 1 only: the error of every rank and whether
    anything changed; then one good step, which must go through."""
    params = make_params(torch.float64)
    opt = _opt(params, group)
    for step in range(at):
        _feed(params, rank, step)
        opt.step()
    before = _state(params, opt)
    _feed(params, rank, at, nan=rank == 1)
    try:
        opt.step()
        error = None
    except signsgd.NonFiniteGradientError as exc:
        error = str(exc)
    unchanged = _same(before, _state(params, opt))
    _feed(params, rank, at)
    opt.step()
    return {"error": error, "unchanged": unchanged, "steps": opt.steps}


def resume(rank: int, group: Any, at: int) -> dict[str, Any]:
    """Save after ``at`` steps (before the freeze), load into fresh objects (torch.save,
    weights_only), continue past the freeze: the same as STEPS steps without a break."""
    params = make_params(torch.float64)
    opt = _opt(params, group)
    for step in range(STEPS):
        if step == at:
            buf = io.BytesIO()
            torch.save({"params": _snapshot(params), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            params = [torch.nn.Parameter(t) for t in saved["params"]]
            opt = _opt(params, group)
            opt.load_state_dict(saved["opt"])
        _feed(params, rank, step)
        opt.step()
    return _state(params, opt)


def header(rank: int, group: Any, key: str, value: Any) -> str | None:
    """Rank 1 takes ``key=value``, the others the defaults: the error of the first step."""
    params = make_params(torch.float64)
    opt = _opt(params, group, **({key: value} if rank == 1 else {}))
    _feed(params, rank, 0)
    try:
        opt.step()
    except ValueError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def bytes_100k(rank: int, group: Any) -> dict[str, Any]:
    """100 000 fp32 coordinates in two tensors, freeze_step 1: the bytes of the warm-up
    step, of two steps after the freeze, and AllReduce's for the same tensors."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((256, 390), (160,))]
    opt = signsgd.OneBitAdam(params, freeze_step=1,
                             aggregator=signsgd.distributed.OneBitAllReduce(group))
    sent = []
    for step in range(3):
        g = torch.Generator().manual_seed(100 * rank + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sent.append((opt.bytes_sent, opt.bytes_received))
    mean = AllReduce(group)
    mean.reduce([p.grad for p in params])
    return {"sent": sent, "allreduce": (mean.bytes_sent, mean.bytes_received),
            "numel": sum(p.numel() for p in params)}


def onebit_suite(rank: int, world_size: int) -> dict[str, Any]:
    """Everything tests/test_onebit_adam.py checks on Gloo, one launch of 4 ranks."""
    groups = {m: dist.new_group(list(range(m))) for m in (1, 3, 4)}
    out: dict[str, Any] = {}
    if rank < 1:
        out["traj1"] = trajectory(rank, groups[1])
    if rank < 3:
        out["traj3"] = trajectory(rank, groups[3])
        out["traj3/bias"] = trajectory(rank, groups[3], bias_correction=True)
        out["nan/warm-up"] = nan_step(rank, groups[3], 1)
        out["nan/frozen"] = nan_step(rank, groups[3], 3)
        out["resume"] = resume(rank, groups[3], 1)
        out["straight"] = resume(rank, groups[3], STEPS)
        for key, value in (("lr", 0.04), ("freeze_step", 3), ("bias_correction", True)):
            out[f"header/{key}"] = header(rank, groups[3], key, value)
    out["traj4"] = trajectory(rank, groups[4])
    out["bytes4"] = bytes_100k(rank, groups[4])
    return out
