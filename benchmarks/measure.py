"""Interleaved timing on every rank of a launch (:func:`interleaved`: the methods take turns, a
step's time is the slowest rank's, the loopback's bytes counted around each call) and the
communication benchmark's aggregation ops it times (:func:`make_op`, :func:`comm_worker`,
which ``bench_comm`` hands to :func:`benchmarks.netem.launch`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmarks.bandwidth import powersgd_nbytes
from benchmarks.common import barrier, timed
from benchmarks.methods import COMM_LABELS, one_bucket_mb
from benchmarks.netem import read_lo_bytes
from signsgd import registry
from signsgd.compression import ScaledSign
from signsgd.distributed import AllReduce, ErrorFeedbackAllReduce, MajorityVote
from signsgd.distributed.launch import memory_available
from signsgd.distributed.reducer import ring_nbytes
from signsgd.distributed.vote import vote_nbytes

__all__ = ["comm_layout", "comm_worker", "interleaved", "make_op", "payload_bytes"]

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


def interleaved(steps: dict[str, Callable[[], Any]], rank: int, in_namespace: bool, *,
                slow_s: float, target_s: float, min_reps: int, max_reps: int,
                keep_slow_first: bool) -> dict[str, dict[str, Any]]:
    """Adaptive, interleaved repetitions of every step; per name
    ``{"warmup_s", "times", "wire", "median_s", "reps", "wire_per_step"}``.

    Ranks meet at a barrier, each times its call, and a step's time is the slowest
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
    """One DDP step of ``method`` over the :func:`comm_layout` of ``x`` (:func:`make_op`):
    the registry's DDP route (PowerSGD: one bucket, S = 2, its hook behind
    :func:`_noop_warmup`, whose two warm-up iterations are taken here)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    shapes = comm_layout(x.numel())
    module = _Held(x, shapes)
    route = _COMM_ROUTES[method]
    if route == "powersgd":
        ddp = DDP(module, init_sync=False, bucket_cap_mb=one_bucket_mb(module))
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

    What one step of each method of :data:`~benchmarks.methods.COMM_LABELS` does
    (:func:`comm_worker` times it on one random ``d``-vector per rank):

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

    The methods of one ``d`` take turns (:func:`interleaved`); when their buffers would not
    fit half the machine's available memory (``MemAvailable`` / M per rank) they are
    measured in consecutive groups that do, each group interleaved (``group`` in the
    record).

    Args:
        dims: vector sizes d.
        methods: names from :data:`COMM_LABELS`.
        rate_bps: the link rate, only to skip cells predicted to be too slow.
        skip_above_s: skip a cell whose wire time, predicted as
            ``M · payload · 1.1 · 8 / rate_bps``, exceeds this (``None``: never skip).
        slow_s, target_s, min_reps, max_reps: adaptive repetitions (:func:`interleaved`).
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
    avail = memory_available()
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
            timing = interleaved({m: op for m, (op, _) in ops.items()}, rank, in_namespace,
                                 slow_s=slow_s, target_s=target_s, min_reps=min_reps,
                                 max_reps=max_reps, keep_slow_first=True)
            for m, (_, nbytes) in ops.items():
                cells[m].update({k: v for k, v in timing[m].items() if k != "warmup_s"})
                cells[m]["sent"], cells[m]["received"] = nbytes()
                cells[m]["group"] = g
            del ops
        del x
    return records
