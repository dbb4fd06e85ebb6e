"""Worker side of tests/distributed/test_local_steps.py (spawn pickles these by name)."""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist

import signsgd
from signsgd.distributed import (
    AllReduce,
    ErrorFeedbackAllReduce,
    LocalSteps,
    MajorityVote,
    QuantizedMean,
)
from signsgd.errors import NonFiniteGradientError

from .workers import _snapshot, grads_for, make_params


def _feed(params: list[torch.nn.Parameter], rank: int, step: int) -> None:
    for p, g in zip(params, grads_for(params, rank, step, zeros=False)):
        p.grad = g


def h1_equals_signsgd(rank: int, group: Any, steps: int) -> dict[str, Any]:
    """H = 1, inner SGD(lr=1, momentum=0), no outer momentum vs SignSGD + MajorityVote."""
    a, b = make_params(torch.float64), make_params(torch.float64)
    local = LocalSteps(torch.optim.SGD(a, lr=1.0), sync_every=1, outer_lr=0.125,
                       reducer=MajorityVote(group, seed=2))
    sign = signsgd.SignSGD(b, lr=0.125, aggregator=MajorityVote(group, seed=2))
    for step in range(steps):
        _feed(a, rank, step)
        _feed(b, rank, step)
        local.step()
        sign.step()
    return {"local": _snapshot(a), "signsgd": _snapshot(b),
            "bytes": (local.reducer.total_bytes_sent, sign.aggregator.total_bytes_sent)}


def rounds(rank: int, group: Any, steps: int, h: int, beta: float, kind: str
           ) -> dict[str, Any]:
    """Inner SGD(lr=1/4), H local steps, outer lr 1/8 and momentum β; parameters after
    every step and what the reducer counted."""
    params = make_params(torch.float64)
    reducer = MajorityVote(group, seed=4) if kind == "vote" else ErrorFeedbackAllReduce(group)
    opt = LocalSteps(torch.optim.SGD(params, lr=0.25), sync_every=h, outer_lr=0.125,
                     outer_momentum=beta, reducer=reducer)
    traj, sent = [], []
    for step in range(steps):
        _feed(params, rank, step)
        opt.step()
        traj.append(_snapshot(params))
        sent.append(opt.bytes_sent)
    return {"traj": traj, "sent": sent}


def _build_adamw(group: Any, params: list[torch.nn.Parameter]) -> LocalSteps:
    inner = torch.optim.AdamW(params, lr=0.01)
    return LocalSteps(inner, sync_every=3, outer_lr=0.01, outer_momentum=0.5,
                      reducer=MajorityVote(group, seed=1))


def resume_mid_round(rank: int, group: Any, total: int, at: int) -> dict[str, Any]:
    """Uninterrupted vs saved at step ``at`` (mid-round), restored into fresh objects."""
    pa = make_params(torch.float64)
    oa = _build_adamw(group, pa)
    for step in range(total):
        _feed(pa, rank, step)
        oa.step()
    pb = make_params(torch.float64)
    ob = _build_adamw(group, pb)
    for step in range(at):
        _feed(pb, rank, step)
        ob.step()
    buf = io.BytesIO()
    torch.save({"params": _snapshot(pb), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    pc = make_params(torch.float64)
    with torch.no_grad():
        for p, v in zip(pc, ck["params"]):
            p.copy_(v)
    oc = _build_adamw(group, pc)
    oc.load_state_dict(ck["opt"])
    for step in range(at, total):
        _feed(pc, rank, step)
        oc.step()
    return {"uninterrupted": _snapshot(pa), "resumed": _snapshot(pc),
            "position": ck["opt"]["outer"]["position"]}


def nan_in_a_local_step(rank: int, group: Any, inner: str) -> dict[str, Any]:
    """Rank 1 gets a NaN gradient in local step 1 of a 3-step round: every rank raises at
    the synchronisation (step 2), the anchor is unchanged, parameters go back to it."""
    params = make_params(torch.float64)
    local = (signsgd.Signum(params, lr=0.01) if inner == "signum"
             else torch.optim.SGD(params, lr=0.01))
    opt = LocalSteps(local, sync_every=3, outer_lr=0.01, reducer=MajorityVote(group))
    anchor = [a.clone() for a in opt.anchor]
    errors = []
    for step in range(3):
        _feed(params, rank, step)
        if rank == 1 % dist.get_world_size(group) and step == 1:
            params[0].grad[0, 0] = float("nan")
        try:
            opt.step()
        except NonFiniteGradientError as exc:
            errors.append((step, str(exc)))
    return {"errors": errors,
            "anchor_unchanged": all(torch.equal(a, b) for a, b in zip(anchor, opt.anchor)),
            "at_anchor": all(torch.equal(p, a) for p, a in zip(params, anchor)),
            "next_round_ok": _next_round(opt, params, rank)}


def _next_round(opt: LocalSteps, params: list[torch.nn.Parameter], rank: int) -> bool:
    for step in range(3):
        _feed(params, rank, 10 + step)
        opt.step()
    return all(bool(torch.isfinite(p).all()) for p in params)


def diloco(rank: int, group: Any, steps: int, h: int) -> dict[str, Any]:
    """DiLoCo: inner SGD(lr=1/4), the fp32 mean of the pseudo-gradients, outer
    SGD(lr=0.7, momentum=0.9, nesterov=True); a partial last round ended by synchronise()."""
    params = make_params(torch.float64)
    opt = LocalSteps(torch.optim.SGD(params, lr=0.25), sync_every=h, reducer=AllReduce(group),
                     outer_optimizer=torch.optim.SGD(params, lr=0.7, momentum=0.9,
                                                     nesterov=True))
    traj = []
    for step in range(steps):
        _feed(params, rank, step)
        opt.step()
        traj.append(_snapshot(params))
    return {"traj": traj, "synchronised": opt.synchronise(), "final": _snapshot(params)}


def absent_gradients(rank: int, group: Any, kind: str) -> dict[str, Any]:
    """A parameter without a gradient on any rank and one with a gradient on rank 0 only,
    two rounds of H = 2 with every reducer: the first never moves."""
    params = make_params(torch.float64)
    never = torch.nn.Parameter(torch.full((5,), 3.0, dtype=torch.float64))
    rank0 = torch.nn.Parameter(torch.full((3,), -1.0, dtype=torch.float64))
    reducer = {"vote": MajorityVote(group, seed=3), "ef": ErrorFeedbackAllReduce(group),
               "mean": AllReduce(group)}[kind]
    opt = LocalSteps(torch.optim.AdamW(params + [never, rank0], lr=0.1), sync_every=2,
                     outer_lr=0.5, reducer=reducer)
    for step in range(4):
        _feed(params, rank, step)
        rank0.grad = torch.ones(3, dtype=torch.float64) if rank == 0 else None
        opt.step()
    return {"never": _snapshot([never])[0], "rank0": _snapshot([rank0])[0]}


def quantized_mean(rank: int, group: Any, precision: str) -> dict[str, Any]:
    """Two steps of QuantizedMean on float64 tensors of 700 and 45 elements (this rank's
    values: a seeded normal times (rank + 1), the second tensor absent on rank 1)."""
    g = torch.Generator().manual_seed(50 + rank)
    red = QuantizedMean(precision, group=group)
    out = []
    for _ in range(2):
        a = torch.randn(700, generator=g, dtype=torch.float64) * (rank + 1)
        b = torch.randn(45, generator=g, dtype=torch.float64)
        r = red.reduce([a, None if rank == 1 else b])
        out.append({"inputs": [a, b], "update": [t.clone() for t in r.update],
                    "transmitted": [None if t is None else t.clone() for t in r.transmitted],
                    "sent": red.bytes_sent, "received": red.bytes_received})
    return {"steps": out, "state": red.state_dict()}


def diloco_int8(rank: int, group: Any) -> dict[str, Any]:
    """DiLoCo with the int8 mean: every rank ends identical."""
    params = make_params(torch.float64)
    opt = LocalSteps(torch.optim.AdamW(params, lr=0.01), sync_every=2,
                     reducer=QuantizedMean("int8", group=group),
                     outer_optimizer=torch.optim.SGD(params, lr=0.7, momentum=0.9,
                                                     nesterov=True))
    for step in range(4):
        _feed(params, rank, step)
        opt.step()
    return {"final": _snapshot(params), "sent": opt.reducer.total_bytes_sent}


def local_suite(rank: int, world_size: int) -> dict[str, Any]:
    groups = {m: dist.new_group(list(range(m))) for m in (1, 3, 4)}
    out: dict[str, Any] = {}
    for m in (1, 3, 4):
        if rank < m:
            out[f"h1/{m}"] = h1_equals_signsgd(rank, groups[m], 6)
    for precision in ("bf16", "int8"):
        for m in (3, 4):
            if rank < m:
                out[f"quantized/{precision}/{m}"] = quantized_mean(rank, groups[m], precision)
    if rank < 3:
        g = groups[3]
        out["diloco/int8"] = diloco_int8(rank, g)
        out["vote/h2"] = rounds(rank, g, 6, 2, 0.0, "vote")
        out["vote/h3/momentum"] = rounds(rank, g, 9, 3, 0.5, "vote")
        out["ef/h2"] = rounds(rank, g, 6, 2, 0.0, "ef")
        out["resume"] = resume_mid_round(rank, g, 10, 4)
        out["nan/signum"] = nan_in_a_local_step(rank, g, "signum")
        out["nan/sgd"] = nan_in_a_local_step(rank, g, "sgd")
        out["diloco"] = diloco(rank, g, 5, 2)
        for kind in ("vote", "ef", "mean"):
            out[f"absent/{kind}"] = absent_gradients(rank, g, kind)
    return out
