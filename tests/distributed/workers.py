"""Module-level worker functions for ``signsgd.distributed.launch.spawn``.

Used by tests/distributed/test_vote.py, test_aggregators.py and test_failures.py; every
function takes ``(rank, world_size, *args)`` and returns something picklable. Helpers that
build inputs are shared with the parent process, which recomputes expected values.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import signsgd
from signsgd.compression import Identity, ScaledSign
from signsgd.distributed import AllReduce, ErrorFeedbackAllReduce, MajorityVote
from signsgd.distributed.vote import majority_vote, vote_async
from signsgd.errors import NonFiniteGradientError

# ----------------------------------------------------------------------------- votes


def case_inputs(world_size: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """All ranks' inputs of one vote case, ``(world_size, numel)``: ints in [-2, 2] (zeros
    included, so zero -> +1 is exercised) scaled by 0.5."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-2, 3, (world_size, numel), generator=g) * 0.5).to(dtype)


def vote_cases(rank: int, world_size: int, cases: list[tuple[Any, ...]]
               ) -> dict[int, dict[str, Any]]:
    """For every sub-group of ranks ``0..m-1`` (m = 1..world_size, made with
    ``dist.new_group``), vote every ``(numel, dtype, mode, seed, step, data_seed)`` case
    three ways (``majority_vote``, ``vote_async``, ``MajorityVote`` with 512-coordinate
    buckets) and record ``MajorityVote``'s byte counters. Returns ``{m: results}`` for the
    groups this rank belongs to."""
    groups = {m: dist.new_group(list(range(m))) for m in range(1, world_size + 1)}
    out: dict[Any, Any] = {}
    for m, group in groups.items():
        if rank >= m:
            out.setdefault("non_member", []).append(
                _error(lambda g=group: majority_vote(torch.ones(3), g, step=0)))
            continue
        votes, asyncs, buckets, counted = [], [], [], []
        for numel, dtype, mode, seed, step, data_seed in cases:
            x = case_inputs(m, numel, dtype, data_seed)[rank]
            shaped = x.view(1, numel)
            votes.append(majority_vote(shaped, group, mode, seed=seed, step=step).reshape(-1))
            asyncs.append(vote_async(x, group=group, mode=mode, seed=seed, step=step).wait())
            agg = MajorityVote(group, mode=mode, seed=seed, bucket_bytes=64)
            agg.load_state_dict({"step": step})
            third = numel // 3
            res = agg.reduce([x[:third].clone(), x[third:].clone()]).update
            buckets.append(torch.cat([o.reshape(-1) for o in res]))
            counted.append((agg.bytes_sent, agg.bytes_received, agg.step))
        out[m] = {"votes": votes, "async": asyncs, "buckets": buckets, "counted": counted}
    return out


# ----------------------------------------------------------------------------- Signum


SHAPES = [(13, 11), (37,), (5,)]


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """The same small parameter set on every rank (seeded)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def grads_for(params: list[torch.Tensor], rank: int, step: int,
              zeros: bool = True) -> list[torch.Tensor]:
    """A rank's stochastic gradient: ``x − target_rank + noise(step, rank)``, rounded to
    multiples of 1/4 (so exact zeros occur when ``zeros``), in the params' dtype."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    out = []
    for i, p in enumerate(params):
        target = torch.full(p.shape, 0.25 * (i + 1) * (1 if rank % 2 else -1), dtype=p.dtype)
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        v = p.detach() - target + noise
        if zeros:
            v = torch.round(v * 4) / 4
        out.append(v)
    return out


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def signum_ranks(rank: int, group: Any, steps: int, momentum: float, mode: str
                 ) -> dict[str, Any]:
    """Signum + MajorityVote for ``steps`` steps, with a parameter that gets a gradient
    only on rank 0 and one that never gets one; returns the final parameters."""
    params = make_params()
    partial = torch.nn.Parameter(torch.ones(6))
    unused = torch.nn.Parameter(torch.full((4,), 2.0))
    agg = MajorityVote(group, mode=mode, seed=7)
    opt = signsgd.Signum(params + [partial, unused], lr=0.01, momentum=momentum,
                         weight_decay=0.1, aggregator=agg)
    for step in range(steps):
        for p, g in zip(params, grads_for(params, rank, step)):
            p.grad = g
        partial.grad = torch.full((6,), -1.0) if rank == 0 else None
        opt.step()
    return {"params": _snapshot(params + [partial, unused]), "step": agg.step,
            "bytes": (agg.bytes_sent, agg.bytes_received)}


def signum_single_equivalence(rank: int, group: Any, steps: int) -> dict[str, Any]:
    """M = 1: SignSGD/Signum with MajorityVote vs the single-process optimisers.

    Returns params of: SignSGD + vote on gradients with zeros, a hand-written SignSGD with
    zero -> +1, Signum + vote and plain Signum on gradients without zeros."""
    out: dict[str, Any] = {}
    a = make_params()
    ref = _snapshot(a)
    opt = signsgd.SignSGD(a, lr=0.125, aggregator=MajorityVote(group))
    zeros = 0
    for step in range(steps):
        gs = grads_for(a, rank, step, zeros=True)
        for p, g in zip(a, gs):
            p.grad = g
        opt.step()
        gs_ref = grads_for(ref, rank, step, zeros=True)
        zeros += sum(int((g == 0).sum()) for g in gs_ref)
        for x, g in zip(ref, gs_ref):
            x.sub_(torch.where(g >= 0, 1.0, -1.0) * 0.125)
    out["signsgd_vote"], out["signsgd_ref"], out["zeros_seen"] = _snapshot(a), ref, zeros
    b, c = make_params(), make_params()
    ob = signsgd.Signum(b, lr=0.01, momentum=0.9, weight_decay=0.01,
                        aggregator=MajorityVote(group))
    oc = signsgd.Signum(c, lr=0.01, momentum=0.9, weight_decay=0.01)
    for step in range(steps):
        for ps, opt_ in ((b, ob), (c, oc)):
            for p, g in zip(ps, grads_for(ps, rank, step, zeros=False)):
                p.grad = g
            opt_.step()
    out["signum_vote"], out["signum_plain"] = _snapshot(b), _snapshot(c)
    return out


COMPRESSORS = {"scaled_sign": ScaledSign, "identity": Identity,
               "sign": signsgd.compression.Sign}


def ef_run(rank: int, group: Any, steps: int, compressor: str) -> dict[str, Any]:
    """EFSGD (float64, lr = 1/4) with ErrorFeedbackAllReduce; parameters after every step,
    final worker errors, server error and byte counters."""
    params = make_params(torch.float64)
    agg = ErrorFeedbackAllReduce(group)
    opt = signsgd.EFSGD(params, lr=0.25, compressor=COMPRESSORS[compressor](),
                        aggregator=agg)
    traj = []
    for step in range(steps):
        for p, g in zip(params, grads_for(params, rank, step, zeros=False)):
            p.grad = g
        opt.step()
        traj.append(_snapshot(params))
    errors = [opt.state[p]["error"].clone() for p in params]
    return {"traj": traj, "errors": errors,
            "server_error": None if agg.server_error is None else agg.server_error.clone(),
            "bytes": (agg.bytes_sent, agg.bytes_received)}


def identity_vs_allreduce(rank: int, group: Any, steps: int) -> dict[str, Any]:
    """EFSGD(Identity) + ErrorFeedbackAllReduce vs torch SGD on AllReduce-averaged grads."""
    a, b = make_params(torch.float64), make_params(torch.float64)
    agg = ErrorFeedbackAllReduce(group)
    oa = signsgd.EFSGD(a, lr=0.25, compressor=Identity(), aggregator=agg)
    base = AllReduce(group)
    ob = torch.optim.SGD(b, lr=0.25)
    for step in range(steps):
        for p, g in zip(a, grads_for(a, rank, step, zeros=False)):
            p.grad = g
        oa.step()
        mean = base.reduce(grads_for(b, rank, step, zeros=False)).update
        for p, g in zip(b, mean):
            p.grad = g
        ob.step()
    return {"ef": _snapshot(a), "sgd": _snapshot(b),
            "bytes": {"allreduce": (base.bytes_sent, base.bytes_received),
                      "ef_identity": (agg.bytes_sent, agg.bytes_received)}}


LION = dict(lr=0.125, betas=(0.5, 0.75), weight_decay=0.5)


def lion_ranks(rank: int, group: Any, steps: int, mode: str) -> dict[str, Any]:
    """Distributed Lion (float64, dyadic hyper-parameters, gradients on a 1/4 grid with
    zeros): parameters after every step and this rank's final momentum."""
    params = make_params(torch.float64)
    opt = signsgd.Lion(params, **LION, aggregator=MajorityVote(group, mode, seed=5))
    traj = []
    for step in range(steps):
        for p, g in zip(params, grads_for(params, rank, step, zeros=True)):
            p.grad = g
        opt.step()
        traj.append(_snapshot(params))
    return {"traj": traj, "m": [opt.state[p]["exp_avg"].clone() for p in params]}


def lion_single(rank: int, group: Any, steps: int) -> dict[str, Any]:
    """M = 1: Distributed Lion against single-process Lion on gradients without zeros."""
    a, b = make_params(torch.float64), make_params(torch.float64)
    voted = signsgd.Lion(a, **LION, aggregator=MajorityVote(group))
    plain = signsgd.Lion(b, **LION)
    for step in range(steps):
        for p, q, g in zip(a, b, grads_for(a, rank, step, zeros=False)):
            p.grad, q.grad = g, g.clone()
        voted.step()
        plain.step()
    return {"voted": _snapshot(a), "plain": _snapshot(b)}


def _build(kind: str, group: Any) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = make_params(torch.float64)
    if kind == "lion":
        opt: torch.optim.Optimizer = signsgd.Lion(params, **LION,
                                                  aggregator=MajorityVote(group, seed=3))
    elif kind == "signum":
        opt = signsgd.Signum(params, lr=0.01, momentum=0.9,
                             aggregator=MajorityVote(group, seed=3))
    else:
        opt = signsgd.EFSGD(params, lr=0.25, compressor=ScaledSign(),
                            aggregator=ErrorFeedbackAllReduce(group))
    return params, opt


def _train(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, rank: int,
           steps: range) -> None:
    for step in steps:
        for p, g in zip(params, grads_for(params, rank, step, zeros=True)):
            p.grad = g
        opt.step()


def checkpoint_resume(rank: int, group: Any, kind: str, total: int, at: int
                      ) -> dict[str, Any]:
    """Uninterrupted run vs run saved at step ``at`` (torch.save of params + optimiser
    state + the pickled aggregator), restored into fresh objects and continued."""
    pa, oa = _build(kind, group)
    _train(pa, oa, rank, range(total))
    pb, ob = _build(kind, group)
    _train(pb, ob, rank, range(at))
    buf = io.BytesIO()
    torch.save({"params": _snapshot(pb), "opt": ob.state_dict(),
                "agg": pickle.dumps(ob.aggregator)}, buf)
    _train(pb, ob, rank, range(at, at + 2))  # keep going: the checkpoint must not alias
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    pc, oc = _build(kind, group)
    with torch.no_grad():
        for p, v in zip(pc, ck["params"]):
            p.copy_(v)
    unpickled = pickle.loads(ck["agg"])
    restored_group = unpickled.group  # None: aggregators pickle without their group
    oc.load_state_dict(ck["opt"])
    _train(pc, oc, rank, range(at, total))
    return {"uninterrupted": _snapshot(pa), "resumed": _snapshot(pc),
            "step": (oa.aggregator.step, oc.aggregator.step),
            "unpickled_group": restored_group, "unpickled_step": unpickled.step}


def ef_negated(rank: int, group: Any) -> dict[str, Any]:
    """One EF all-reduce (fresh state, ScaledSign) honest and one with every rank negating
    its signs: the second update must be exactly minus the first (C(-q) = -C(q))."""
    from signsgd.distributed.adversary import Negate

    p = grads_for(make_params(torch.float64), rank, 0, zeros=False)
    out = {}
    for name, adversary in (("honest", None), ("negated", Negate())):
        agg = ErrorFeedbackAllReduce(group, adversary=adversary)
        r = agg.reduce([t.clone() for t in p], compressor=ScaledSign())
        sent, update = r.transmitted, r.update
        out[name], out[name + "_sent"] = update, sent
    return out


def aggregator_suite(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """Everything test_aggregators.py checks, in one launch: sub-groups of ranks 0..m-1."""
    groups = {m: dist.new_group(list(range(m))) for m in range(1, world_size + 1)}
    out: dict[str, Any] = {}
    g1, g2, g3 = groups[1], groups[2], groups[3]
    if rank < 1:
        out["single"] = signum_single_equivalence(rank, g1, steps)
        out["ef1"] = ef_run(rank, g1, 5, "scaled_sign")
    if rank < 2:
        out["signum2"] = signum_ranks(rank, g2, steps, 0.9, "sharded")
        out["ef2"] = ef_run(rank, g2, 5, "scaled_sign")
        out["ckpt_signum"] = checkpoint_resume(rank, g2, "signum", 10, 4)
        out["ef2_negated"] = ef_negated(rank, g2)
    out["signum3"] = signum_ranks(rank, g3, steps, 0.9, "allgather")
    out["signsgd3"] = signum_ranks(rank, g3, steps, 0.0, "sharded")
    out["ef3"] = ef_run(rank, g3, 5, "scaled_sign")
    out["ef3_sign"] = ef_run(rank, g3, 3, "sign")
    out["identity3"] = identity_vs_allreduce(rank, g3, 4)
    out["ckpt_ef"] = checkpoint_resume(rank, g3, "ef", 8, 3)
    out["bad"] = bad_inputs(rank, world_size)  # last: it leaves the group usable anyway
    return out


_SUITE: dict[int, list[dict[str, Any]]] = {}


def lion_suite(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """Distributed Lion on sub-groups of 1, 3 and 4 ranks (ties at M = 4), one launch."""
    groups = {m: dist.new_group(list(range(m))) for m in (1, 3, 4)}
    out: dict[str, Any] = {}
    if rank < 1:
        out["single"] = lion_single(rank, groups[1], steps)
        out["lion1"] = lion_ranks(rank, groups[1], steps, "sharded")
    if rank < 3:
        out["lion3"] = lion_ranks(rank, groups[3], steps, "allgather")
        out["ckpt_lion"] = checkpoint_resume(rank, groups[3], "lion", 8, 3)
    out["lion4"] = lion_ranks(rank, groups[4], steps, "sharded")
    return out


def suite_results(steps: int) -> list[dict[str, Any]]:
    """Run :func:`aggregator_suite` on 3 ranks once per test session (test_aggregators and
    test_failures share the launch: each launch costs seconds of process start-up)."""
    from signsgd.distributed.launch import spawn

    if steps not in _SUITE:
        _SUITE[steps] = spawn(aggregator_suite, 3, (steps,), timeout=300)
    return _SUITE[steps]


# ----------------------------------------------------------------------------- failures


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the parent checks type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def bad_inputs(rank: int, world_size: int) -> dict[str, Any]:
    """Each case is a call that must fail the same way on every rank; the group stays
    usable afterwards (the last case is a good vote)."""
    out: dict[str, Any] = {}
    out["numel"] = _error(lambda: majority_vote(torch.ones(10 + rank)))
    out["dtype"] = _error(lambda: majority_vote(
        torch.ones(10, dtype=torch.float64 if rank == 1 else torch.float32)))
    out["shape"] = _error(lambda: majority_vote(torch.ones((2, 5) if rank else (5, 2))))
    out["mode"] = _error(lambda: majority_vote(
        torch.ones(8), mode="allgather" if rank == 0 else "sharded", step=0))
    out["step"] = _error(lambda: majority_vote(torch.ones(8), step=rank))
    x = torch.ones(100)
    if rank == world_size - 1:
        x[17] = float("nan")
    out["nan_vote"] = _error(lambda: majority_vote(x))
    out["inf_async"] = _error(lambda: vote_async(
        torch.ones(9), finite=(rank != 0)).wait())
    agg = MajorityVote()
    out["agg_layout"] = _error(lambda: agg.reduce(
        [torch.ones(3), torch.ones(4 if rank == 0 else 5)]))
    out["agg_count"] = _error(lambda: agg.reduce([torch.ones(3)] * (1 + (rank == 1))))
    out["agg_step_after_errors"] = agg.step

    # NaN in one rank's gradient: every rank raises, no parameter or state changes.
    results = {}
    for name, make in (
        ("signum", lambda ps: signsgd.Signum(ps, lr=0.1, momentum=0.9, weight_decay=0.1,
                                             aggregator=MajorityVote())),
        ("efsgd", lambda ps: signsgd.EFSGD(ps, lr=0.25, aggregator=ErrorFeedbackAllReduce())),
        ("allreduce", lambda ps: signsgd.Signum(ps, lr=0.1, aggregator=AllReduce())),
    ):
        params = make_params()
        opt = make(params)
        for p, g in zip(params, grads_for(params, rank, 0)):
            p.grad = g
        opt.step()  # one good step creates state
        before = _snapshot(params)
        state_before = copy.deepcopy(opt.state_dict())
        for p, g in zip(params, grads_for(params, rank, 1)):
            p.grad = g
        if rank == 1:
            params[1].grad[3] = float("inf") if name == "efsgd" else float("nan")
        msg = _error(opt.step)
        same_params = all(torch.equal(a, b) for a, b in zip(before, _snapshot(params)))
        sd = opt.state_dict()
        same_state = _same(state_before, sd)
        results[name] = (msg, same_params, same_state)
    out["optim_nonfinite"] = results
    out["good_vote_after"] = majority_vote(torch.full((5,), 1.0 - 2 * (rank == 0)))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k])
                                                                     for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    return a == b


def die_in_vote(rank: int, world_size: int, timeout_s: float) -> str:
    """Rank 1 exits abruptly before the vote; the others must fail with a clear error
    within ``timeout_s``, the timeout of the group they vote on."""
    group = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=timeout_s))
    if rank == 1:
        os._exit(3)
    t0 = time.monotonic()
    try:
        majority_vote(torch.ones(1000), group)
    except NonFiniteGradientError:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"rank {rank} saw the dead peer after {time.monotonic() - t0:.1f}s: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return "no error"


# ----------------------------------------------------------------------------- zero chunks

#: tensors of the zero-chunk trajectories: dense, zero on every rank, zero on every rank in
#: its first 256 coordinates only (whole chunks), and one whose zeros differ across ranks.
ZERO_SHAPES = [(13, 11), (300,), (600,), (70,)]


def zero_grads(rank: int, step: int) -> list[torch.Tensor]:
    """A rank's float64 gradients for :data:`ZERO_SHAPES`: multiples of 1/2 (exact zeros
    here and there); tensor 1 zero everywhere, tensor 2 zero on ``[0, 256)`` everywhere,
    tensor 3 zero on rank 0 only."""
    g = torch.Generator().manual_seed(7919 * rank + step)
    out = [torch.round(torch.randn(s, generator=g, dtype=torch.float64) * 2) / 2
           for s in ZERO_SHAPES]
    out[1].zero_()
    out[2][:256] = 0.0
    out[2][256] = -0.0 if step % 2 else 0.0  # -0.0 is zero too
    if rank == 0:
        out[3].zero_()
    return out


def zero_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(99)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
            for s in ZERO_SHAPES]


class _ZeroNet(torch.nn.Module):
    """Parameters :data:`ZERO_SHAPES`; ``forward(grads)`` is a loss whose gradient is
    ``grads`` exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(zero_params())

    def forward(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * g).sum() for p, g in zip(self.ps, grads))


def zero_chunk_trajectories(rank: int, world_size: int, steps: int) -> dict[int, Any]:
    """Sub-groups of 1..world_size ranks: SignSGD and Signum (float64) with MajorityVote
    and the DDP hook with SGD, fed :func:`zero_grads`; the parameters after every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from signsgd.distributed import MajorityVoteHookState, majority_vote_hook

    groups = {m: (dist.new_group(list(range(m))), dist.new_group(list(range(m))))
              for m in range(1, world_size + 1)}
    out: dict[int, Any] = {}
    for m, (group, hook_group) in groups.items():
        if rank >= m:
            continue
        res: dict[str, Any] = {}
        for name, beta, mode in (("signsgd", 0.0, "sharded"), ("signum", 0.9, "allgather")):
            params = zero_params()
            opt = signsgd.Signum(params, lr=0.125, momentum=beta,
                                 aggregator=MajorityVote(group, mode=mode, seed=3))
            traj = []
            for step in range(steps):
                for p, g in zip(params, zero_grads(rank, step)):
                    p.grad = g
                opt.step()
                traj.append(_snapshot(params))
            res[name] = traj
        net = _ZeroNet()
        ddp = DDP(net, process_group=group, bucket_cap_mb=0.004)  # several buckets
        ddp.register_comm_hook(MajorityVoteHookState(hook_group, momentum=0.0, seed=3),
                               majority_vote_hook)
        sgd = torch.optim.SGD(ddp.parameters(), lr=0.125)
        traj = []
        for step in range(steps):
            sgd.zero_grad()
            ddp(zero_grads(rank, step)).backward()
            sgd.step()
            traj.append(_snapshot(list(net.ps)))
        res["hook"] = traj
        out[m] = res
    return out
