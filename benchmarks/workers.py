"""What runs on every rank of the network benchmarks (``bench_comm.py``, ``bench_e2e.py``,
``bench_tta.py``), and the benchmarks' one table of training methods (:data:`METHODS`).

The scripts hand these functions to :func:`netem.launch`, which runs them in M Gloo
workers behind a shaped loopback; the workers import this module through the parent's
``sys.path`` (``benchmarks/`` is on it when a script runs).

**One aggregation step** (:func:`comm_worker`): for each vector size ``d`` and each method
of :data:`COMM_LABELS` it times the aggregation of one random ``d``-vector per rank:

===========================  ==================================================================
method                       what one step does
===========================  ==================================================================
``majority-vote``            ``MajorityVote().reduce([x])`` (sharded: 1 bit each way)
``majority-vote-allgather``  ``MajorityVote(mode="allgather").reduce([x])`` ((M−1)·d/8 in)
``ef-allreduce``             ``ErrorFeedbackAllReduce().reduce([x], compressor=ScaledSign())``
``fp16-allreduce``           cast to fp16, ``torch.distributed.all_reduce`` (Gloo), back, / M
``fp32-allreduce``           ``AllReduce().reduce([x])`` (one Gloo ``all_reduce`` of fp32, / M)
``fp32-ddp``                 DDP (default 25 MB buckets, no hook: its fp32 all-reduce)
``fp16-ddp``                 DDP + torch's ``fp16_compress_hook``
``powersgd-r1/-r2/-r4``      DDP (one bucket) + torch's ``powerSGD_hook``, rank 1 / 2 / 4
``noop-ddp``                 DDP + torch's ``noop_hook``: no communication (the floor)
===========================  ==================================================================

The DDP rows need matrices: their module holds ``d`` as the layout of
:func:`comm_layout` (as many 1024 × 1024 matrices as fit, then one 1024 × c with
``c = ⌈rest / 1024⌉``, so a little more than ``d``: +0.05 % at d = 1M), with the rank's
random vector as the parameters, and a negligible forward, ``loss = ½·Σ p²``, so that
backward yields the fixed gradient ``p`` and one DDP step is backward + DDP's copies +
the hook. That step costs O(d) elementwise work that the reducer rows do not have;
``noop-ddp`` measures it. PowerSGD runs its compressed steps in every timed call: its
``start_powerSGD_iter = 2`` warm-up iterations (torch's minimum with error feedback or warm
start) are taken untimed, before the measurement, with torch's ``noop_hook`` in place of the
vanilla fp32 all-reduce (a dispatching hook; the warm-up only advances the state's counter
and lets DDP rebuild its bucket, and the values of a timing run do not matter), so a slow
link does not pay two fp32 all-reduces per cell. Everything else is torch's hook as it is.

**The methods table** (:data:`METHODS`, labels in :data:`E2E_LABELS`): one row per
training method — label, how :class:`Trainer` builds it, default learning rate per
workload. Our optimisers come from :func:`signsgd.registry.build` (with ``world_size=M``
they communicate through their reducer); the peers are ``torch.nn.parallel.
DistributedDataParallel`` with a DDP route of the registry
(:data:`signsgd.registry.DDP_ROUTES`: our majority-vote hook, DDP's fp32 all-reduce,
torch's own communication hooks of ``torch.distributed.algorithms.ddp_comm_hooks``,
registered by :func:`signsgd.registry.register_ddp` with the route's defaults), and their
local optimiser from the registry with ``world_size=1`` (``torch.optim.SGD`` /
``torch.optim.AdamW``):

==========================  =======================================================================
``signum``                  ``build("signum", world_size=M)``: Signum(0.9) + sharded majority vote
``signum-ddp-hook``         DDP + ``majority_vote_hook`` (momentum 0.9 in the hook) +
                            ``torch.optim.SGD(momentum=0)``
``ef-signsgd``              ``build("ef-signsgd", world_size=M)``: ScaledSign + EF all-reduce
``lion``                    ``build("lion", world_size=M)``: Lion + sharded majority vote
``sgd``                     ``build("sgd", momentum=0.9, world_size=M)``: gradients averaged by one
                            fp32 ``AllReduce`` after backward (the same structure as ``signum``)
``adamw``                   ``build("adamw", world_size=M)``: AdamW + one fp32 all-reduce of the
                            gradients after backward (``AverageGradients``)
``sgd-ddp``                 DDP (fp32 bucketed all-reduce overlapping backward) +
                            ``torch.optim.SGD(momentum=0.9)``: what most users run today
``adamw-ddp``               DDP fp32 + ``torch.optim.AdamW``: what most language-model users run
``fp16-ddp``                DDP + ``default_hooks.fp16_compress_hook`` + SGD(momentum=0.9)
``powersgd-r1/-r2/-r4``     DDP with **one bucket** + ``powerSGD_hook`` with
                            ``PowerSGDState(process_group=None, matrix_approximation_rank=r,
                            start_powerSGD_iter=S, use_error_feedback=True, warm_start=True)``
                            + SGD(momentum=0.9), as torch's docs use it
``powersgd-r2-adamw``       the same hook (r = 2) + ``torch.optim.AdamW`` (for the language model,
                            where SGD is weak)
``noop-ddp``                DDP + ``debugging_hooks.noop_hook`` + SGD: no communication at all, the
                            ranks' models drift apart; a lower bound for step times only
``sgd-local``               ``build("sgd", momentum=0.9)``, no communication, no DDP: the
                            compute-only step time under the same CPU sharing
``local-adamw-hH``          ``build("adamw", local=LocalSpec(H, lr=outer_lr, momentum=β))``
``local-signum-hH``         (``LocalSteps`` voting): H local steps, then one voted outer step;
                            any H (the name is parsed), :data:`LOCAL_H` by default
==========================  =======================================================================

Facts about torch's hooks that the table relies on (read in torch 2.13's
``ddp_comm_hooks/powerSGD_hook.py``): PowerSGD views every gradient tensor as
``shape[0] × rest`` and compresses it only if ``(n + m)·r·min_compression_rate < n·m``
(``min_compression_rate = 2``; so biases and norm weights, ``n × 1``, never are) — bytes in
:func:`bandwidth.powersgd_nbytes`; it all-reduces the whole bucket in fp32 for the first
``start_powerSGD_iter`` steps (counted per DDP iteration, on the last bucket), and needs
``start_powerSGD_iter >= 2`` with error feedback or warm start (DDP rebuilds its buckets
after the first iteration); error feedback adds each rank's compression error to its next
gradient; warm start reuses the previous step's Q. Over Gloo with several buckets the hook
fails ("Received data size doesn't match expected size"), so its rows use one bucket
(``bucket_cap_mb`` above the model's size). ``bf16_compress_hook`` needs CUDA and NCCL (not
on a CPU-only machine), so it is not in the table.

DDP models are built with ``init_sync=False`` (every rank builds the same model from the
same seed), so constructing them does not broadcast the parameters over the slow link.

Timing: ranks meet at a barrier, each times its call, and a step's time is the slowest
rank's. Repetitions are adaptive: the first call is a warm-up that sets the number of
repetitions (about ``target_s`` seconds' worth, ``min_reps`` to ``max_reps``); a first call
slower than ``slow_s`` is instead the only measurement (one aggregation) or followed by one
timed step (a training step). The methods take turns in rounds, so drift of a shared
machine hits all of them alike; the median is reported. A LocalSteps method is timed in
whole rounds of H steps (its time per step is the round's / H); a PowerSGD method only
after its ``start_powerSGD_iter`` fp32 steps (taken untimed first).

Bytes: ``sent`` / ``received`` are the payload bytes of one rank per step (the reducers' and
the hook's counters, header included; for DDP fp32 / fp16 the ring volume
``2·(M−1)·⌈n/M⌉·size``; for PowerSGD :func:`bandwidth.powersgd_nbytes` once compressing, the
fp32 ring before; ``noop`` 0; LocalSteps the reducer's bytes of one synchronisation / H);
``wire`` is the namespace's loopback byte counter around each timed call, rank 0's reading:
every byte all ranks put on the wire in one step, TCP/IP headers and acknowledgements and
the small barrier and timing messages included (only meaningful inside a namespace).
"""

from __future__ import annotations

import math
import os
import re
import statistics
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from bandwidth import powersgd_nbytes
from common import ROOT, barrier, timed
from netem import read_lo_bytes
from torch import Tensor, nn

from signsgd import registry
from signsgd.compression import ScaledSign
from signsgd.distributed import (
    AllReduce,
    ErrorFeedbackAllReduce,
    LocalSteps,
    MajorityVote,
)
from signsgd.distributed.reducer import ring_nbytes
from signsgd.distributed.vote import vote_nbytes
from signsgd.errors import NonFiniteGradientError
from signsgd.reduction import Telemetry, comm_stats

__all__ = ["COMM_LABELS", "E2E_LABELS", "METHODS", "LOCAL_H", "WORKLOADS", "Method",
           "method", "method_arg", "comm_layout", "comm_worker", "payload_bytes", "make_op",
           "resnet18", "Trainer", "make_workload", "step_time_worker", "workload_step_worker",
           "curve_worker", "tta_worker"]

#: the aggregation methods of :func:`comm_worker` and their table labels.
COMM_LABELS: dict[str, str] = {
    "majority-vote": "sharded vote (1 bit)",
    "majority-vote-allgather": "allgather vote (1 bit)",
    "ef-allreduce": "EF all-reduce (1 bit)",
    "fp16-allreduce": "fp16 all-reduce",
    "fp32-allreduce": "fp32 all-reduce",
    "fp32-ddp": "DDP fp32 (buckets of 25 MB)",
    "fp16-ddp": "DDP + fp16 hook",
    "powersgd-r1": "DDP + PowerSGD r=1 (1 bucket)",
    "powersgd-r2": "DDP + PowerSGD r=2 (1 bucket)",
    "powersgd-r4": "DDP + PowerSGD r=4 (1 bucket)",
    "noop-ddp": "DDP + noop hook (no communication)",
}
#: The DDP rows of :func:`comm_worker` and the registry's DDP route of each.
_COMM_ROUTES: dict[str, str] = {"fp32-ddp": "fp32", "fp16-ddp": "fp16",
                                "powersgd-r1": "powersgd", "powersgd-r2": "powersgd",
                                "powersgd-r4": "powersgd", "noop-ddp": "noop"}
_COMM_DDP = tuple(_COMM_ROUTES)


# ------------------------------------------------------------------------------- timing
def _wire_step(op: Callable[[], Any], rank: int, in_namespace: bool) -> tuple[float, int]:
    """``(slowest rank's time, loopback bytes)`` of one call of ``op``, between barriers."""
    count = in_namespace and rank == 0
    barrier()
    lo_a = read_lo_bytes()[1] if count else 0
    t, _ = timed(op)
    barrier()
    return t, (read_lo_bytes()[1] - lo_a if count else 0)


def _measure(steps: dict[str, Callable[[], Any]], rank: int, in_namespace: bool, *,
             slow_s: float, target_s: float, min_reps: int, max_reps: int,
             keep_slow_first: bool) -> dict[str, dict[str, Any]]:
    """Adaptive, interleaved repetitions (module docstring) of every step; per name
    ``{"warmup_s", "times", "wire", "median_s", "reps", "wire_per_step"}``."""
    out: dict[str, dict[str, Any]] = {name: {"times": [], "wire": []} for name in steps}
    reps: dict[str, int] = {}
    for name, op in steps.items():
        first, wire = _wire_step(op, rank, in_namespace)
        out[name]["warmup_s"] = first
        if first > slow_s and keep_slow_first:
            out[name]["times"].append(first)
            out[name]["wire"].append(wire)
        else:
            reps[name] = 1 if first > slow_s else max(min_reps, min(
                max_reps, int(target_s / max(first, 1e-6))))
    for r in range(max(reps.values(), default=0)):
        for name, n in reps.items():
            if r < n:
                t, wire = _wire_step(steps[name], rank, in_namespace)
                out[name]["times"].append(t)
                out[name]["wire"].append(wire)
    for rec in out.values():
        rec["reps"] = len(rec["times"])
        rec["median_s"] = statistics.median(rec["times"])
        rec["wire_per_step"] = (statistics.median(rec["wire"])
                                if in_namespace and rank == 0 else None)
    return out


# ------------------------------------------------------------------------------- one step
def comm_layout(d: int, rows: int = 1024) -> list[tuple[int, int]]:
    """The matrices that hold ``d`` values for the DDP rows of :func:`comm_worker`: as many
    ``rows × rows`` as fit, then one ``rows × ⌈rest / rows⌉`` (a little more than ``d``).

    Example:
        >>> comm_layout(1_000_000)
        [(1024, 977)]
        >>> len(comm_layout(25_000_000)), comm_layout(25_000_000)[-1]
        (24, (1024, 863))
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d!r}")
    full, rest = divmod(int(d), rows * rows)
    return [(rows, rows)] * full + ([(rows, -(-rest // rows))] if rest else [])


def payload_bytes(method: str, d: int, world_size: int) -> tuple[int, int]:
    """Payload bytes one rank sends and receives in one step, from the wire formats alone.

    The votes from :func:`signsgd.distributed.vote.vote_nbytes`; EF all-reduce as the
    sharded vote (1 bit each way; the per-chunk scales are ignored here); the all-reduces
    as a ring, :func:`signsgd.distributed.reducer.ring_nbytes` (the DDP rows over the
    :func:`comm_layout` of ``d``); PowerSGD from :func:`bandwidth.powersgd_nbytes`.

    Example:
        >>> payload_bytes("fp32-allreduce", 1000, 4)
        (6000, 6000)
        >>> payload_bytes("powersgd-r1", 1_000_000, 4)    # (1024 + 977)·1 fp32 values, a ring
        (12024, 12024)
    """
    if method in ("majority-vote", "majority-vote-allgather", "ef-allreduce"):
        mode = "allgather" if method == "majority-vote-allgather" else "sharded"
        return vote_nbytes(d, world_size, mode)
    if method.startswith("powersgd-r") and method in COMM_LABELS:
        b = powersgd_nbytes(comm_layout(d), int(method[len("powersgd-r"):]), world_size)
        return b, b
    if method in _COMM_DDP:
        d = sum(n * m for n, m in comm_layout(d))
    width = {"fp32-allreduce": 4, "fp16-allreduce": 2, "fp32-ddp": 4, "fp16-ddp": 2,
             "noop-ddp": 0}.get(method)
    if width is None:
        raise ValueError(f"unknown method {method!r}; choose from {list(COMM_LABELS)}")
    b = ring_nbytes(d, world_size, width)
    return b, b


class _Held(nn.Module):
    """Parameters in a given layout; ``forward() = ½·Σ p²``, so each gradient is ``p``."""

    def __init__(self, values: Tensor, shapes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        flat = torch.zeros(sum(n * m for n, m in shapes))
        flat[:values.numel()] = values
        self.ps = nn.ParameterList(nn.Parameter(t.view(s).clone()) for t, s in zip(
            flat.split([n * m for n, m in shapes]), shapes))

    def forward(self) -> Tensor:
        return sum((0.5 * (p * p).sum() for p in self.ps), torch.zeros(()))


def _noop_warmup(hook: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``hook`` (torch's ``powerSGD_hook``), with torch's ``noop_hook`` in place of the
    vanilla all-reduce for the state's first ``start_powerSGD_iter`` iterations (the
    iteration counter advances exactly as in the hook's own vanilla branch)."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    def dispatch(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
        if state.iter < state.start_powerSGD_iter:
            state.maybe_increase_iter(bucket)
            return noop_hook(None, bucket)
        return hook(state, bucket)
    return dispatch


def _comm_ddp(method: str, x: Tensor) -> Callable[[], Any]:
    """One DDP step of ``method`` over the :func:`comm_layout` of ``x`` (module docstring):
    the registry's DDP route (PowerSGD: one bucket, S = 2, its hook behind
    :func:`_noop_warmup`, whose two warm-up iterations are taken here)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    shapes = comm_layout(x.numel())
    module = _Held(x, shapes)
    route = _COMM_ROUTES[method]
    if route == "powersgd":
        ddp = DDP(module, init_sync=False, bucket_cap_mb=_one_bucket_mb(module))
        state, hook = registry.ddp_hook(
            route, ddp, matrix_approximation_rank=int(method[len("powersgd-r"):]),
            start_powerSGD_iter=2)
        ddp.register_comm_hook(state, _noop_warmup(hook))
    else:
        ddp = DDP(module, init_sync=False)
        registry.register_ddp(ddp, route)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        ddp().backward()

    if route == "powersgd":
        for _ in range(2):
            step()
    return step


def make_op(method: str, x: Tensor, world_size: int
            ) -> tuple[Callable[[], Any], Callable[[], tuple[int, int]]]:
    """``(op, nbytes)``: ``op()`` does one aggregation of ``x``; ``nbytes()`` its payload.

    The DDP methods need an initialised process group.

    Example:
        >>> op, nbytes = make_op("majority-vote", torch.tensor([0.5, -2.0]), 1)  # 1 process
        >>> op(), nbytes()
        ([tensor([ 1., -1.])], (0, 0))
    """
    if method in ("majority-vote", "majority-vote-allgather", "ef-allreduce",
                  "fp32-allreduce"):
        if method == "ef-allreduce":
            reducer: Any = ErrorFeedbackAllReduce()
            kwargs: dict[str, Any] = {"compressor": ScaledSign()}
        else:
            reducer = (AllReduce() if method == "fp32-allreduce" else
                       MajorityVote(mode="allgather" if "allgather" in method else "sharded"))
            kwargs = {}
        return (lambda: reducer.reduce([x], **kwargs).update), (
            lambda: (reducer.bytes_sent, reducer.bytes_received))
    if method == "fp16-allreduce":
        def fp16() -> Tensor:
            buf = x.to(torch.float16)
            dist.all_reduce(buf)
            return buf.to(torch.float32).div_(world_size)

        return fp16, (lambda: payload_bytes(method, x.numel(), world_size))
    if method in _COMM_DDP:
        return _comm_ddp(method, x), (lambda: payload_bytes(method, x.numel(), world_size))
    raise ValueError(f"unknown method {method!r}; choose from {list(COMM_LABELS)}")


#: rough bytes per coordinate each method holds while its op exists (for the grouping).
_OP_BYTES = {"majority-vote": 2, "majority-vote-allgather": 4, "ef-allreduce": 8,
             "fp16-allreduce": 6, "fp32-allreduce": 8, "fp32-ddp": 12, "fp16-ddp": 14,
             "noop-ddp": 12, "powersgd-r1": 20, "powersgd-r2": 20, "powersgd-r4": 20}


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def _groups(methods: Sequence[str], d: int, world_size: int, budget: int | None
            ) -> list[list[str]]:
    """Consecutive groups of ``methods`` whose ops fit ``budget`` bytes per rank together
    (all in one group when they fit, or when the budget is unknown).

    Example:
        >>> _groups(["fp32-ddp", "powersgd-r1", "majority-vote"], 10**6, 4, 30 * 10**6)
        [['fp32-ddp'], ['powersgd-r1', 'majority-vote']]
    """
    if budget is None:
        return [list(methods)]
    out: list[list[str]] = [[]]
    used = 4 * d  # the vector itself
    for m in methods:
        need = _OP_BYTES.get(m, 8) * d
        if out[-1] and used + need > budget:
            out.append([])
            used = 4 * d
        out[-1].append(m)
        used += need
    return out


def comm_worker(
    rank: int,
    world_size: int,
    dims: Sequence[int],
    methods: Sequence[str],
    rate_bps: int | None = None,
    skip_above_s: float | None = None,
    slow_s: float = 2.0,
    target_s: float = 3.0,
    min_reps: int = 3,
    max_reps: int = 20,
    in_namespace: bool = True,
) -> list[dict[str, Any]]:
    """Time every ``(d, method)``; return one record per pair (the same on every rank).

    The methods of one ``d`` take turns (module docstring); when their buffers would not
    fit half the machine's available memory (``MemAvailable`` / M per rank) they are
    measured in consecutive groups that do, each group interleaved (``group`` in the
    record).

    Args:
        dims: vector sizes d.
        methods: names from :data:`COMM_LABELS`.
        rate_bps: the link rate, only to skip cells predicted to be too slow.
        skip_above_s: skip a cell whose wire time, predicted as
            ``M · payload · 1.1 · 8 / rate_bps``, exceeds this (``None``: never skip).
        slow_s, target_s, min_reps, max_reps: adaptive repetitions (module docstring).
        in_namespace: read the loopback counters (only meaningful inside a namespace).

    Returns:
        dicts with ``d, method, world_size, times, wire, median_s, reps, sent, received,
        wire_per_step`` (``None`` outside a namespace and on ranks > 0), ``group`` and
        ``status`` (``"ok"`` or ``"skipped: ..."``).

    Example:
        >>> comm_worker(0, 1, [8], ["fp32-allreduce"], in_namespace=False)[0]["sent"]
        0
    """
    records: list[dict[str, Any]] = []
    avail = _mem_available()
    # the same budget on every rank: the smallest reading
    budget_t = torch.tensor([avail if avail is not None else -1], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(budget_t, op=dist.ReduceOp.MIN)
    budget = int(budget_t) // (2 * world_size) if float(budget_t) > 0 else None
    for d in dims:
        x = torch.randn(int(d), generator=torch.Generator().manual_seed(1000 + rank))
        todo: list[str] = []
        cells: dict[str, dict[str, Any]] = {}
        for method in methods:
            sent, received = payload_bytes(method, int(d), world_size)
            rec: dict[str, Any] = {"d": int(d), "method": method, "world_size": world_size,
                                   "times": [], "wire": [], "median_s": None, "reps": 0,
                                   "sent": sent, "received": received,
                                   "wire_per_step": None, "group": None, "status": "ok"}
            records.append(rec)
            cells[method] = rec
            pred = world_size * sent * 1.1 * 8 / rate_bps if rate_bps else 0.0
            if skip_above_s is not None and pred > skip_above_s:
                rec["status"] = f"skipped: predicted {pred:.0f} s > {skip_above_s:g} s"
            else:
                todo.append(method)
        for g, group in enumerate(_groups(todo, int(d), world_size, budget)):
            ops = {m: make_op(m, x, world_size) for m in group}
            timing = _measure({m: op for m, (op, _) in ops.items()}, rank, in_namespace,
                              slow_s=slow_s, target_s=target_s, min_reps=min_reps,
                              max_reps=max_reps, keep_slow_first=True)
            for m, (_, nbytes) in ops.items():
                cells[m].update({k: v for k, v in timing[m].items() if k != "warmup_s"})
                cells[m]["sent"], cells[m]["received"] = nbytes()
                cells[m]["group"] = g
            del ops
        del x
    return records


# ------------------------------------------------------------------------------- model
class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.down(x))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2016, ImageNet layout): 7×7 stem, 4 stages of 2 basic blocks,
    64/128/256/512 channels, global pooling, a linear classifier; 11,689,512 parameters
    with 1000 classes — the same parameter shapes as ``torchvision.models.resnet18``.

    Example:
        >>> sum(p.numel() for p in resnet18().parameters())
        11689512
    """
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for i, c in enumerate((64, 128, 256, 512)):
        layers += [_Block(c_in, c, 1 if i == 0 else 2), _Block(c, c, 1)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, num_classes))


# ------------------------------------------------------------------------------- methods
#: Default learning rates per workload, tuned on held-out data (docs/tuning.md). ``cnn``: on
#: Fashion-MNIST with the small CNN at a global batch of 128 (AdamW takes Adam's). ``gpt``:
#: on the Shakespeare tuning split at a global batch of 32 sequences (configs/lm.toml's
#: values; Lion there also takes betas (0.95, 0.98), which this table does not, so the
#: ``gpt`` runs leave Lion out). PowerSGD takes its optimiser's rate (SGD's or AdamW's):
#: its error feedback makes it a compressed SGD, not tuned separately. The ``cnn`` rates are
#: the registry's defaults (``registry.METHODS[name].defaults["lr"]``), not copies.
def _lr(name: str, gpt: float) -> dict[str, float]:
    return {"cnn": float(registry.METHODS[name].defaults["lr"]), "gpt": gpt}


_LR_SGD = _lr("sgd", 0.1)
_LR_ADAMW = _lr("adamw", 1e-2)
_LR_SIGNUM = _lr("signum", 1e-3)
_LR_LION = _lr("lion", 1e-3)
_LR_EF = _lr("ef-signsgd", 1.0)

#: The H of the ``local-*-hH`` methods listed by default (any H >= 1 is accepted by name).
LOCAL_H: tuple[int, ...] = (4, 8, 16)
_LOCAL = re.compile(r"local-(adamw|signum)-h([1-9][0-9]*)")


@dataclass(frozen=True)
class Method:
    """One row of the methods table: its label, how :class:`Trainer` builds it, and its
    default learning rate per workload.

    ``build(trainer)`` sets ``trainer.model`` (what the forward pass calls: the model or
    its DDP wrapper), ``trainer.opt`` and ``trainer.counter`` (what :meth:`Trainer.bytes`
    reads). ``route``: the registry's DDP route (:data:`signsgd.registry.DDP_ROUTES`) of a
    method built on DDP (``None``: not on DDP); :attr:`ddp`: whether it is (it needs an
    initialised process group even for M = 1).
    ``tta``: the ranks' models stay identical, so it can be trained to a target.
    ``sync_every``: H of a LocalSteps method (1 otherwise). ``powersgd_rank``: r of a
    PowerSGD method.

    Example:
        >>> METHODS["powersgd-r2"].powersgd_rank, METHODS["noop-ddp"].tta
        (2, False)
    """

    name: str
    label: str
    build: Callable[[Trainer], None] = field(repr=False)
    lr: dict[str, float]
    route: str | None = None
    tta: bool = True
    sync_every: int = 1
    powersgd_rank: int | None = None
    inner: str | None = None  # the registry's optimiser this method runs

    @property
    def ddp(self) -> bool:
        """Whether the method is built on DDP (a :attr:`route`)."""
        return self.route is not None


def _counted(tr: Trainer) -> tuple[int, int]:
    stats = comm_stats(tr.counter)
    return stats.bytes_sent, stats.bytes_received


def _ours(name: str, *, local: bool = False, **hp: Any) -> Callable[[Trainer], None]:
    """``registry.build(name, world_size=M)`` (``local``: world_size 1, no communication)."""
    def build(tr: Trainer) -> None:
        tr.opt = registry.build(name, tr.module.parameters(),
                                world_size=1 if local else tr.world_size, lr=tr.lr, **hp)
        tr.counter = tr.opt  # its comm_stats(): the aggregator's or reducer's (zeros: local)
        tr.nbytes = _counted
    return build


def _one_bucket_mb(model: nn.Module) -> float:
    """A ``bucket_cap_mb`` that puts every parameter of ``model`` in one DDP bucket."""
    return math.ceil(sum(p.numel() * p.element_size() for p in model.parameters())
                     / 2**20) + 1


def _ddp(opt: str, route: str = "fp32", *, hook: Mapping[str, Any] | None = None,
         **hp: Any) -> Callable[[Trainer], None]:
    """DDP + the registry's DDP route ``route`` (:data:`signsgd.registry.DDP_ROUTES`, its
    hyper-parameters ``hook``; PowerSGD on one bucket with S = ``start_powersgd_iter``) +
    the registry's local ``opt`` (``torch.optim.SGD`` / ``AdamW``) with ``hp`` and the
    route's ``optimizer_hp``."""
    hook = dict(hook or {})
    hp = {**hp, **registry.DDP_ROUTES[route].optimizer_hp}

    def build(tr: Trainer) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        m = tr.module
        if route == "powersgd":  # over Gloo torch's hook needs one bucket
            tr.model = DDP(m, init_sync=False, bucket_cap_mb=_one_bucket_mb(m))
            tr.powersgd = registry.register_ddp(tr.model, route, **hook,
                                                start_powerSGD_iter=tr.start_powersgd_iter)
        else:
            tr.model = DDP(m, init_sync=False)
            state = registry.register_ddp(tr.model, route, **hook)
            if route == "vote":
                tr.counter = state
        tr.nbytes = _route_nbytes(route, tr)
        tr.opt = registry.build(opt, tr.model.parameters(), world_size=1, lr=tr.lr, **hp)
    return build


def _route_nbytes(route: str, tr: Trainer) -> Callable[[Trainer], tuple[int, int]]:
    """What one step of DDP route ``route`` sends and receives: the vote's counter, the
    fp32 / fp16 / bf16 ring, nothing (noop), PowerSGD by the phase of its last step."""
    if route == "vote":
        return _counted
    fp32 = ring_nbytes(tr.numel, tr.world_size, 4)
    if route == "powersgd":
        state = tr.powersgd
        compressed = powersgd_nbytes(tr.shapes, state.matrix_approximation_rank,
                                     tr.world_size)

        def nbytes(t: Trainer) -> tuple[int, int]:  # the hook's phase of the last step
            b = compressed if state.iter > state.start_powerSGD_iter else fp32
            return b, b
        return nbytes
    b = {"fp32": fp32, "fp16": ring_nbytes(tr.numel, tr.world_size, 2),
         "bf16": ring_nbytes(tr.numel, tr.world_size, 2), "noop": 0}[route]
    return lambda t: (b, b)


def _local(inner: str, h: int) -> Callable[[Trainer], None]:
    """``registry.build(inner, local=LocalSpec(h, ...))``: the registry's local steps with
    its default outer step (sign-momentum, ``outer_lr`` ``None``: ``lr``) and vote."""
    def build(tr: Trainer) -> None:
        opt = registry.build(inner, tr.module.parameters(), lr=tr.lr, local=registry.LocalSpec(
            h, lr=tr.outer_lr, momentum=tr.outer_momentum))
        assert isinstance(opt, LocalSteps)
        tr.opt, tr.counter = opt, opt.reducer  # the counter: the last synchronisation's bytes
        per_sync = vote_nbytes(tr.numel, tr.world_size)[0]

        def nbytes(t: Trainer) -> tuple[int, int]:  # one synchronisation's bytes / H
            c = comm_stats(t.counter)
            sent = c.bytes_sent or per_sync
            received = c.bytes_received or per_sync
            return round(sent / h), round(received / h)
        tr.nbytes = nbytes
    return build


def _on_ddp(name: str, label: str, opt: str, route: str, lr: dict[str, float], *,
            powersgd_rank: int | None = None, tta: bool = True, inner: str | None = None,
            **hp: Any) -> Method:
    """The row of a method on DDP: :func:`_ddp` of ``opt`` and ``route`` (PowerSGD with
    ``powersgd_rank``), the row's ``route``, ``powersgd_rank`` and ``inner`` (default:
    ``opt``) from the same arguments."""
    hook = None if powersgd_rank is None else {"matrix_approximation_rank": powersgd_rank}
    return Method(name, label, _ddp(opt, route, hook=hook, **hp), lr, route=route, tta=tta,
                  powersgd_rank=powersgd_rank, inner=opt if inner is None else inner)


def _rows() -> Iterator[Method]:
    yield Method("signum", "Signum + majority vote", _ours("signum", momentum=0.9), _LR_SIGNUM,
                 inner="signum")
    yield _on_ddp("signum-ddp-hook", "DDP + majority-vote hook", "sgd", "vote", _LR_SIGNUM,
                  inner="signum")
    yield Method("ef-signsgd", "EF-signSGD + EF all-reduce", _ours("ef-signsgd"), _LR_EF,
                 inner="ef-signsgd")
    yield Method("lion", "Lion + majority vote", _ours("lion"), _LR_LION, inner="lion")
    yield Method("sgd", "SGD + fp32 all-reduce", _ours("sgd", momentum=0.9), _LR_SGD,
                 inner="sgd")
    yield Method("adamw", "AdamW + fp32 all-reduce", _ours("adamw"), _LR_ADAMW, inner="adamw")
    yield _on_ddp("sgd-ddp", "SGD + DDP (fp32)", "sgd", "fp32", _LR_SGD, momentum=0.9)
    yield _on_ddp("adamw-ddp", "AdamW + DDP (fp32)", "adamw", "fp32", _LR_ADAMW)
    yield _on_ddp("fp16-ddp", "SGD + DDP + fp16 hook", "sgd", "fp16", _LR_SGD, momentum=0.9)
    yield _on_ddp("fp16-adamw-ddp", "AdamW + DDP + fp16 hook", "adamw", "fp16", _LR_ADAMW)
    for r in (1, 2, 4):
        yield _on_ddp(f"powersgd-r{r}", f"SGD + DDP + PowerSGD r={r} (1 bucket)", "sgd",
                      "powersgd", _LR_SGD, powersgd_rank=r, momentum=0.9)
    yield _on_ddp("powersgd-r2-adamw", "AdamW + DDP + PowerSGD r=2 (1 bucket)", "adamw",
                  "powersgd", _LR_ADAMW, powersgd_rank=2)
    yield _on_ddp("noop-ddp", "SGD + DDP + noop hook (no communication)", "sgd", "noop",
                  _LR_SGD, tta=False, momentum=0.9)
    yield Method("sgd-local", "no communication (compute only)",
                 _ours("sgd", local=True, momentum=0.9), _LR_SGD, tta=False, inner="sgd")


#: The fixed rows of the methods table (the ``local-*-hH`` rows come from :func:`method`).
METHODS: dict[str, Method] = {m.name: m for m in _rows()}


def method(name: str) -> Method:
    """The row of method ``name``: a fixed row of :data:`METHODS`, or
    ``local-adamw-hH`` / ``local-signum-hH`` for any H >= 1.

    Example:
        >>> m = method("local-signum-h8")
        >>> m.sync_every, m.label, m.lr["cnn"]
        (8, 'Signum, 8 local steps + voted outer step', 0.001)
    """
    row = METHODS.get(name)
    if row is not None:
        return row
    match = _LOCAL.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, "
                         "local-adamw-hH, local-signum-hH (H >= 1)")
    inner, h = match.group(1), int(match.group(2))
    return Method(name, f"{'AdamW' if inner == 'adamw' else 'Signum'}, {h} local steps + "
                  "voted outer step", _local(inner, h),
                  _LR_ADAMW if inner == "adamw" else _LR_SIGNUM, sync_every=h, inner=inner)


_lookup = method  # for Trainer, whose argument is called ``method``


def method_arg(text: str) -> str:
    """argparse type: a method name :func:`method` knows.

    Example:
        >>> method_arg("local-adamw-h32")
        'local-adamw-h32'
    """
    import argparse

    try:
        method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Labels(Mapping[str, str]):
    """Method name → table label: the fixed rows, then ``local-*-hH`` for H in
    :data:`LOCAL_H` when iterated; any ``local-*-hH`` when looked up."""

    def _names(self) -> list[str]:
        return [*METHODS, *(f"local-{inner}-h{h}" for inner in ("adamw", "signum")
                            for h in LOCAL_H)]

    def __getitem__(self, name: str) -> str:
        try:
            return method(name).label
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


#: the training methods of :class:`Trainer` and their table labels.
E2E_LABELS: Mapping[str, str] = _Labels()


# ------------------------------------------------------------------------------- training
def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


class Trainer:
    """One method's model, optimiser and training step (:func:`method`).

    Args:
        method: a name :func:`method` knows.
        make_model: builds the model (seeded identically on every rank).
        world_size: M; the DDP methods and M > 1 need ``torch.distributed`` initialised.
        lr: the learning rate (``None``: the row's default for ``workload``).
        workload: the key of the row's default learning rates (``cnn`` / ``gpt``).
        loss: ``loss(model, x, y)`` (default: cross-entropy of ``model(x)``).
        grad_clip: clip the gradient's global norm to this after backward (0: off): for
            DDP after its all-reduce, for our optimisers each rank's own gradient before
            the step aggregates it (as ``signsgd train --grad-clip`` does).
        schedule: ``factor(step)`` of the learning rate (``LambdaLR``; ``None``: constant).
        start_powersgd_iter: S of the PowerSGD rows (>= 2, torch's minimum with error
            feedback or warm start): fp32 all-reduce of the whole bucket for the first S
            steps, PowerSGD after. torch's advice (``PowerSGDState`` docstring): "To tune
            ``start_powerSGD_iter``, we suggest to start with 10% of total training steps,
            and increase it until a satisfactory accuracy is reached. If there is a warm-up
            stage in the training, ``start_powerSGD_iter`` typically should be no less than
            the number of warm-up steps." Time-to-target runs use about 10 % of the
            expected steps; step-time runs use 2 and time only the steps after it.
        outer_lr, outer_momentum: the LocalSteps rows' outer step (``None``: ``lr``, the
            default of ``signsgd train --outer-lr``).

    Example:
        >>> tr = Trainer("sgd-local", lambda: nn.Linear(2, 2), 1, lr=0.1)
        >>> loss = tr.step(torch.ones(4, 2), torch.zeros(4, dtype=torch.long)); tr.bytes()
        (0, 0)
    """

    def __init__(self, method: str, make_model: Callable[[], nn.Module], world_size: int,
                 lr: float | None = None, *, workload: str = "cnn",
                 loss: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
                 grad_clip: float = 0.0, schedule: Callable[[int], float] | None = None,
                 start_powersgd_iter: int = 2, outer_lr: float | None = None,
                 outer_momentum: float = 0.0) -> None:
        self.spec = _lookup(method)
        self.method = method
        self.world_size = world_size
        self.lr = float(lr if lr is not None else self.spec.lr[workload])
        self.start_powersgd_iter = int(start_powersgd_iter)
        self.outer_lr, self.outer_momentum = outer_lr, float(outer_momentum)
        self.loss_fn = loss or _cross_entropy
        self.grad_clip = float(grad_clip)
        torch.manual_seed(0)  # identical initial parameters on every rank
        self.module: nn.Module = make_model()
        self.model: nn.Module = self.module
        self.shapes = [tuple(p.shape) for p in self.module.parameters()]
        self.numel = sum(p.numel() for p in self.module.parameters())
        self.counter: Telemetry | None = None
        self.powersgd: Any = None
        self.nbytes: Callable[[Trainer], tuple[int, int]] = lambda t: (0, 0)
        self.opt: torch.optim.Optimizer
        self.spec.build(self)
        # LocalSteps: its outer optimiser follows the same schedule (its own LambdaLR)
        optimisers = [self.opt, getattr(self.opt, "outer_optimizer", None)]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimisers
                       if o is not None and schedule is not None]
        self.steps = 0

    @property
    def sync_every(self) -> int:
        """H: the steps of one LocalSteps round (1 for the other methods)."""
        return self.spec.sync_every

    @property
    def in_warmup(self) -> bool:
        """Whether the next step is one of PowerSGD's first S (fp32) steps."""
        return self.powersgd is not None and self.powersgd.iter < self.start_powersgd_iter

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on ``(x, y)``; returns the loss."""
        self.opt.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model, x, y)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.opt.step()
        with warnings.catch_warnings():  # an outer optimiser steps at synchronisations only
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            for sched in self.scheds:
                sched.step()
        self.steps += 1
        return float(loss.detach())

    def bytes(self) -> tuple[int, int]:
        """Payload bytes (sent, received) of this rank in the last step (LocalSteps: per
        step, averaged over a round)."""
        return self.nbytes(self)


def _time_trainers(trainers: dict[str, Trainer], batch: tuple[Tensor, Tensor], rank: int,
                   in_namespace: bool, *, slow_s: float, target_s: float, min_reps: int,
                   max_reps: int) -> dict[str, dict[str, Any]]:
    """Median step time of every trainer on ``batch``, interleaved (module docstring).

    PowerSGD trainers first take their S fp32 steps, untimed; a LocalSteps trainer is
    timed in whole rounds of H steps (``round_s``; ``median_s`` = ``round_s`` / H, and the
    per-round ``times`` and ``wire`` are divided by H too)."""
    x, y = batch
    for tr in trainers.values():
        while tr.in_warmup:
            tr.step(x, y)

    def op(tr: Trainer) -> Callable[[], None]:
        def run() -> None:
            for _ in range(tr.sync_every):
                tr.step(x, y)
        return run

    timing = _measure({m: op(tr) for m, tr in trainers.items()}, rank, in_namespace,
                      slow_s=slow_s, target_s=target_s, min_reps=min_reps,
                      max_reps=max_reps, keep_slow_first=False)
    for m, tr in trainers.items():
        rec, h = timing[m], tr.sync_every
        rec["round_s"] = rec["median_s"]
        rec["sync_every"] = h
        if h > 1:
            rec["median_s"] /= h
            rec["warmup_s"] /= h
            rec["times"] = [t / h for t in rec["times"]]
            rec["wire"] = [w / h for w in rec["wire"]]
            if rec["wire_per_step"] is not None:
                rec["wire_per_step"] /= h
        rec["start_powersgd_iter"] = tr.start_powersgd_iter if tr.powersgd is not None else None
    return timing


def step_time_worker(
    rank: int,
    world_size: int,
    methods: Sequence[str],
    batch: int = 16,
    image_size: int = 32,
    slow_s: float = 4.0,
    target_s: float = 6.0,
    min_reps: int = 2,
    max_reps: int = 8,
    in_namespace: bool = True,
) -> list[dict[str, Any]]:
    """Median step time of each method on ResNet-18 with synthetic inputs.

    Every method first takes one untimed warm-up step (PowerSGD: its S = 2 fp32 steps,
    then one); then a method whose warm-up took more than ``slow_s`` is timed for one step
    (a LocalSteps method: one round), the others for about ``target_s`` seconds
    (``min_reps`` to ``max_reps`` steps or rounds), interleaved across methods.

    Returns:
        One dict per method: ``method, world_size, batch, image_size, numel, warmup_s,
        times, wire, median_s, reps, sent, received, wire_per_step, round_s, sync_every,
        start_powersgd_iter``.

    Example:
        >>> recs = step_time_worker(0, 1, ["sgd-local"], batch=2, target_s=0.0,
        ...                         min_reps=1, max_reps=1, in_namespace=False)
        >>> recs[0]["method"], recs[0]["reps"]
        ('sgd-local', 1)
    """
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    trainers = {m: Trainer(m, resnet18, world_size, lr=1e-4, start_powersgd_iter=2)
                for m in methods}
    timing = _time_trainers(trainers, (x, y), rank, in_namespace, slow_s=slow_s,
                            target_s=target_s, min_reps=min_reps, max_reps=max_reps)
    records = []
    for m, tr in trainers.items():
        sent, received = tr.bytes()
        records.append({"method": m, "world_size": world_size, "batch": batch,
                        "image_size": image_size, "numel": tr.numel, **timing[m],
                        "sent": sent, "received": received})
    return records


# ------------------------------------------------------------------------------- workloads
#: The two workloads of the time-to-target benchmark: ``cnn`` (the small CNN on
#: Fashion-MNIST, batch 32 per worker, constant learning rate; metric: accuracy on the
#: 10,000 test images) and ``gpt`` (the character-level transformer ``gpt`` on Shakespeare,
#: 8 sequences of 128 characters per worker, linear warm-up then cosine, gradient clipping
#: 1.0; metric: validation loss in nats per character on fixed validation batches).
WORKLOADS: dict[str, dict[str, Any]] = {
    "cnn": {"data": "fashion-mnist", "model": "cnn", "batch_size": 32, "grad_clip": 0.0,
            "lr_schedule": "constant", "metric": "test_accuracy", "higher": True},
    "gpt": {"data": "shakespeare", "model": "gpt", "batch_size": 8, "block_size": 128,
            "grad_clip": 1.0, "lr_schedule": "cosine", "metric": "val_loss",
            "higher": False},
}


def make_workload(name: str, world_size: int, *, steps: int = 1000, warmup_steps: int = 0,
                  eval_batches: int = 16, seed: int = 0, data: Any = None
                  ) -> tuple[Any, Any, Callable[[int], float] | None]:
    """``(config, task, schedule)`` of workload ``name`` (:data:`WORKLOADS`) for M ranks:
    the library's own task (:func:`signsgd.tasks.make_task`, as ``signsgd train`` builds
    it: each rank's batch of step s is a pure function of (seed, rank, s)) and the
    trainer's learning-rate factor over ``steps`` steps (``None`` when constant).

    Example:
        >>> from signsgd.text import Corpus
        >>> corpus = Corpus.from_texts(["to be or not to be " * 40], ["not to be " * 40])
        >>> c, task, sched = make_workload("gpt", 2, steps=100, warmup_steps=10,
        ...                                eval_batches=1, data=corpus)
        >>> task.batch(0, 2, 0)[0].shape, round(sched(4), 2), round(sched(99), 4)
        (torch.Size([8, 128]), 0.5, 0.0003)
    """
    from signsgd.config import TrainConfig, validate
    from signsgd.tasks import make_task
    from signsgd.train import lr_schedule  # the trainer's schedule (warm-up, then cosine)

    spec = WORKLOADS[name]
    keys = ("data", "model", "batch_size", "block_size", "grad_clip", "lr_schedule")
    data_dir = (None if os.environ.get("SIGNSGD_DATA") or not (ROOT / "data").is_dir()
                else str(ROOT / "data"))  # the repository's data/, from any folder
    cfg = validate(TrainConfig(**{k: spec[k] for k in keys if k in spec}, steps=steps,
                               warmup_steps=warmup_steps, eval_batches=eval_batches,
                               workers=world_size, seed=seed, data_dir=data_dir))
    task = make_task(cfg, world_size, data=data)
    constant = cfg.lr_schedule == "constant" and not cfg.warmup_steps
    return cfg, task, None if constant else lr_schedule(cfg, steps)


def _trainer(name: str, world_size: int, workload: str, task: Any,
             schedule: Callable[[int], float] | None, lr: float | None,
             options: dict[str, Any]) -> Trainer:
    return Trainer(name, task.model, world_size, lr, workload=workload,
                   loss=lambda m, x, y: task.loss(m, x, y)[0],
                   grad_clip=WORKLOADS[workload]["grad_clip"], schedule=schedule,
                   start_powersgd_iter=options.get("start_powersgd_iter", 2),
                   outer_lr=options.get("outer_lr", {}).get(name),
                   outer_momentum=options.get("outer_momentum", 0.0))


def workload_step_worker(
    rank: int,
    world_size: int,
    workload: str,
    methods: Sequence[str],
    lrs: dict[str, float] | None = None,
    options: dict[str, Any] | None = None,
    slow_s: float = 4.0,
    target_s: float = 4.0,
    min_reps: int = 3,
    max_reps: int = 15,
    in_namespace: bool = True,
) -> list[dict[str, Any]]:
    """Median step time of every method on ``workload`` (a real batch of this rank),
    interleaved (:func:`_time_trainers`): PowerSGD timed after its S = 2 fp32 steps,
    LocalSteps in whole rounds.

    ``options``: ``outer_lr`` (per method), ``outer_momentum`` (the trainers'), ``steps``
    and ``warmup_steps`` (the schedule), ``data_seed``.

    Returns:
        One dict per method: ``workload, method, world_size, numel, lr, warmup_s, times,
        wire, median_s, round_s, sync_every, reps, sent, received, wire_per_step,
        start_powersgd_iter``.

    Example:
        >>> recs = workload_step_worker(0, 1, "cnn", ["sgd-local"], target_s=0.0,
        ...                             min_reps=1, max_reps=1)  # doctest: +SKIP
        >>> recs[0]["method"], recs[0]["sync_every"]   # doctest: +SKIP
        ('sgd-local', 1)
    """
    options = dict(options or {}, start_powersgd_iter=2)
    _, task, sched = make_workload(workload, world_size, steps=options.get("steps", 1000),
                                   warmup_steps=options.get("warmup_steps", 0),
                                   eval_batches=1, seed=options.get("data_seed", 0))
    batch = task.batch(rank, world_size, 0)
    trainers = {m: _trainer(m, world_size, workload, task, sched, (lrs or {}).get(m), options)
                for m in methods}
    timing = _time_trainers(trainers, batch, rank, in_namespace, slow_s=slow_s,
                            target_s=target_s, min_reps=min_reps, max_reps=max_reps)
    records = []
    for m, tr in trainers.items():
        sent, received = tr.bytes()
        records.append({"workload": workload, "method": m, "world_size": world_size,
                        "numel": tr.numel, "lr": tr.lr, **timing[m], "sent": sent,
                        "received": received})
    return records


def _better(metric: float, target: float, higher: bool) -> bool:
    return metric >= target if higher else metric <= target


def curve_worker(
    rank: int,
    world_size: int,
    workload: str,
    name: str,
    lr: float | None = None,
    steps: int = 1000,
    eval_every: int = 50,
    target: float | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``workload`` with method ``name`` until ``target`` or ``steps`` steps.

    Each rank trains on its own data (the task's batch of this rank and step); every
    ``eval_every`` steps (rounded up to a multiple of H for LocalSteps, so that the ranks'
    models agree) the held-out metric of :data:`WORKLOADS` is taken on all ranks together
    (:meth:`signsgd.tasks.Task.evaluate`). The clock counts training steps only: each step
    is timed between barriers (the slowest rank's time, :func:`common.timed`).

    ``options``: ``start_powersgd_iter`` (S, default 10 % of ``steps``, at least 2 and at
    least the schedule's warm-up), ``warmup_steps`` (of the schedule), ``outer_lr`` (per
    method), ``outer_momentum``, ``eval_batches``, ``data_seed``.

    Returns:
        ``{"workload", "method", "lr", "world_size", "numel", "metric", "target",
        "curve": [(step, metric, mean train loss since the last evaluation, train_s)],
        "steps_to_target", "steps", "train_s", "final", "bytes_sent_per_step",
        "start_powersgd_iter", "sync_every", "eval_every", "diverged"}``
        (``steps_to_target`` is ``None`` if the target was not reached).

    Example:
        >>> curve_worker(0, 1, "cnn", "sgd", steps=1, eval_every=1)["steps"]  # doctest: +SKIP
        1
    """
    spec = WORKLOADS[workload]
    options = dict(options or {})
    warm = int(options.get("warmup_steps", 0))
    options.setdefault("start_powersgd_iter", max(2, warm, round(0.1 * steps)))
    _, task, sched = make_workload(workload, world_size, steps=steps, warmup_steps=warm,
                                   eval_batches=int(options.get("eval_batches", 16)),
                                   seed=int(options.get("data_seed", 0)))
    tr = _trainer(name, world_size, workload, task, sched, lr, options)
    if not tr.spec.tta:
        raise ValueError(f"{name} is not usable for time to target (its ranks' models "
                         "differ)")
    h = tr.sync_every
    every = -(-int(eval_every) // h) * h
    key, higher = spec["metric"], spec["higher"]

    def evaluate() -> float:
        return float(task.evaluate(tr.module, rank, world_size)[key])

    curve: list[tuple[int, float, float | None, float]] = [(0, evaluate(), None, 0.0)]
    clock, sent, reached, diverged = 0.0, 0, None, None
    losses: list[float] = []
    step = 0
    while step < steps:
        x, y = task.batch(rank, world_size, step)
        try:
            clock += timed(lambda: losses.append(tr.step(x, y)))[0]  # noqa: B023
        except NonFiniteGradientError as exc:  # raised on every rank alike
            diverged = f"step {step + 1}: {exc}"
            break
        step += 1
        sent += tr.bytes()[0]
        if step % every == 0 or step == steps:
            loss_t = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
            if world_size > 1:
                dist.all_reduce(loss_t)
            metric = evaluate()
            curve.append((step, metric, float(loss_t[0] / max(loss_t[1], 1)), clock))
            losses = []
            if not math.isfinite(metric):
                diverged = f"step {step}: non-finite {key}"
                break
            if target is not None and _better(metric, target, higher):
                reached = step
                break
    return {"workload": workload, "method": name, "lr": tr.lr, "world_size": world_size,
            "numel": tr.numel, "metric": key, "target": target, "curve": curve,
            "steps_to_target": reached, "steps": step, "train_s": clock,
            "final": curve[-1][1], "bytes_sent_per_step": sent / max(step, 1),
            "start_powersgd_iter": tr.start_powersgd_iter if tr.powersgd is not None else None,
            "sync_every": h, "eval_every": every, "diverged": diverged,
            "outer_lr": (_outer_lr(tr.opt) if isinstance(tr.opt, LocalSteps) else None),
            "outer_momentum": tr.outer_momentum if h > 1 else None}


def _outer_lr(opt: LocalSteps) -> float:
    """The outer step's base learning rate (before its schedule) of a LocalSteps row."""
    group = opt.outer_optimizer.param_groups[0]
    return float(group.get("initial_lr", group["lr"]))


# ------------------------------------------------------------------------------- bench_e2e
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            correct += int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
    model.train(was)
    return correct / len(labels)


def tta_worker(
    rank: int,
    world_size: int,
    method: str,
    lr: float,
    batch: int = 32,
    budget_s: float = 120.0,
    eval_every: int = 25,
    eval_examples: int = 2000,
    target_acc: float = 0.85,
    max_steps: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the small CNN on Fashion-MNIST with ``method`` until ``target_acc`` or budget.

    Each rank takes its shard of every epoch (:func:`signsgd.data.shard_indices`) in
    batches of ``batch`` (global batch ``M·batch``). The clock counts training steps only
    (all ranks synchronised by a barrier before each step); every ``eval_every`` steps
    rank 0's model is evaluated on the first ``eval_examples`` test images (the models are
    identical on every rank for every method). Stops at the first evaluation at or above
    ``target_acc``, or when the training clock passes ``budget_s``.

    Returns:
        ``{"method", "lr", "batch", "world_size", "curve": [(train_s, step, acc, loss)],
        "reached_s", "target_acc", "steps", "bytes_sent_per_step", "numel"}``
        (``reached_s`` is ``None`` if the target was not reached).

    Example:
        >>> tta_worker(0, 1, "sgd", 0.05, budget_s=0.0)["steps"]  # doctest: +SKIP
        1
    """
    from signsgd.data import epoch_batches, load, shard_indices
    from signsgd.models import build

    train, test = load("fashion-mnist")
    xt, yt = test.batch(torch.arange(min(eval_examples, len(test))))
    tr = Trainer(method, lambda: build("cnn", train.shape, 10), world_size, lr=lr)
    module = tr.model.module if hasattr(tr.model, "module") else tr.model
    curve: list[tuple[float, int, float, float]] = [(0.0, 0, _accuracy(module, xt, yt), 0.0)]
    clock, step, epoch, sent = 0.0, 0, 0, 0
    reached: float | None = None
    losses: list[float] = []
    while True:
        idx = shard_indices(len(train), rank, world_size, seed=seed, epoch=epoch)
        for b in epoch_batches(idx, batch):
            if len(b) < batch:
                break  # equal batch sizes on every rank
            xb, yb = train.batch(b)
            clock += timed(lambda: losses.append(tr.step(xb, yb)))[0]  # noqa: B023
            step += 1
            sent += tr.bytes()[0]
            if step % eval_every == 0 or clock >= budget_s or step >= max_steps:
                acc = _accuracy(module, xt, yt)
                curve.append((clock, step, acc, statistics.fmean(losses[-eval_every:])))
                if reached is None and acc >= target_acc:
                    reached = clock
                if reached is not None or clock >= budget_s or step >= max_steps:
                    return {"method": method, "lr": lr, "batch": batch,
                            "world_size": world_size, "curve": curve, "reached_s": reached,
                            "target_acc": target_acc, "steps": step,
                            "bytes_sent_per_step": sent / max(step, 1), "numel": tr.numel}
        epoch += 1
