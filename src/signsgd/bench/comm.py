"""Worker side of ``benchmarks/bench_comm.py``: time one aggregation step per method.

:func:`comm_worker` runs on every rank (inside a :class:`~signsgd.bench.netem.NetworkEmulator`
namespace, launched by :func:`~signsgd.bench.netem.launch`). For each vector size ``d`` and
each method it times the aggregation of one random ``d``-vector per rank:

==================  =========================================================================
method              what one step does
==================  =========================================================================
``sharded_vote``    ``MajorityVote(mode="sharded").reduce_signs`` (1 bit each way, DESIGN.md)
``allgather_vote``  ``MajorityVote(mode="allgather").reduce_signs`` ((M−1)·d/8 bytes in)
``ef_allreduce``    ``ErrorFeedbackAllReduce.reduce_error_feedback`` with ``ScaledSign``
``fp16_allreduce``  cast to fp16, ``torch.distributed.all_reduce`` (Gloo), cast back, / M
``fp32_allreduce``  ``AllReduce().reduce_gradients`` (one Gloo ``all_reduce`` of fp32, / M)
==================  =========================================================================

Per step, ranks first meet at a barrier, each rank times its call, and the step's time is
the slowest rank's (a max all-reduce after the clock stops). Repetitions are adaptive: a
first call longer than ``slow_s`` (2 s) is the only measurement; otherwise it is a
discarded warm-up and the op is repeated about ``target_s`` seconds' worth (at least
``min_reps``, at most ``max_reps`` calls). The methods' repetitions are interleaved in
rounds so that drift of a shared machine hits all of them alike; the median is reported.

Bytes: ``sent`` / ``received`` are the payload bytes of one rank (the aggregators' own
counters; for the raw all-reduce baselines the ring volume ``2·(M−1)/M·bytes``);
``wire`` is the loopback byte counter of the namespace around each timed call (median over
the calls; the small barrier and timing messages included): every byte all ranks put on
the wire in one step, TCP/IP headers and acknowledgements included (only meaningful inside
a namespace, where all traffic is ours).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from signsgd.bench.netem import read_lo_bytes

__all__ = ["METHODS", "LABELS", "comm_worker", "payload_bytes", "make_op"]

METHODS: tuple[str, ...] = (
    "sharded_vote", "allgather_vote", "ef_allreduce", "fp16_allreduce", "fp32_allreduce",
)
LABELS: dict[str, str] = {
    "sharded_vote": "sharded vote (1 bit)",
    "allgather_vote": "allgather vote (1 bit)",
    "ef_allreduce": "EF all-reduce (1 bit)",
    "fp16_allreduce": "fp16 all-reduce",
    "fp32_allreduce": "fp32 all-reduce",
}


def payload_bytes(method: str, d: int, world_size: int) -> tuple[int, int]:
    """Payload bytes one rank sends and receives in one step, from the wire formats alone.

    The vote numbers come from :func:`signsgd.distributed.vote.vote_nbytes`; EF all-reduce
    is the sharded vote's volume (1 bit each way; the per-chunk scales are ignored here);
    all-reduce is a ring all-reduce: ``2·(M−1)/M`` times the vector's bytes.
    """
    m = world_size
    if method in ("sharded_vote", "allgather_vote", "ef_allreduce"):
        from signsgd.distributed.vote import vote_nbytes

        mode = "allgather" if method == "allgather_vote" else "sharded"
        return vote_nbytes(d, m, mode)
    width = {"fp32_allreduce": 4, "fp16_allreduce": 2}.get(method)
    if width is None:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    b = (2 * (m - 1) * d * width) // m
    return b, b


def make_op(method: str, x: torch.Tensor, world_size: int
            ) -> tuple[Callable[[], Any], Callable[[], tuple[int, int]]]:
    """``(op, nbytes)``: ``op()`` does one aggregation of ``x``; ``nbytes()`` its payload.

    Raises:
        ValueError: unknown method.
        ImportError: the method's aggregator is not available in this build.
    """
    d = x.numel()
    m = world_size
    if method in ("sharded_vote", "allgather_vote"):
        mode = "sharded" if method == "sharded_vote" else "allgather"
        try:
            from signsgd.distributed import MajorityVote

            agg = MajorityVote(mode=mode)
            return (lambda: agg.reduce_signs([x])), (lambda: (agg.bytes_sent,
                                                               agg.bytes_received))
        except ImportError:
            from signsgd.distributed.vote import majority_vote

            return (lambda: majority_vote(x, mode=mode)), (lambda: payload_bytes(method, d, m))
    if method == "ef_allreduce":
        from signsgd.compression import ScaledSign
        from signsgd.distributed import ErrorFeedbackAllReduce

        ef = ErrorFeedbackAllReduce()
        comp = ScaledSign()
        return (lambda: ef.reduce_error_feedback([x], comp)), (lambda: (ef.bytes_sent,
                                                                         ef.bytes_received))
    if method == "fp32_allreduce":
        try:
            from signsgd.distributed import AllReduce

            ar = AllReduce()
            return (lambda: ar.reduce_gradients([x])), (lambda: (ar.bytes_sent,
                                                                  ar.bytes_received))
        except ImportError:
            pass

        def fp32() -> torch.Tensor:
            buf = x.clone()
            dist.all_reduce(buf)
            return buf.div_(m)

        return fp32, (lambda: payload_bytes(method, d, m))
    if method == "fp16_allreduce":
        def fp16() -> torch.Tensor:
            buf = x.to(torch.float16)
            dist.all_reduce(buf)
            return buf.to(torch.float32).div_(m)

        return fp16, (lambda: payload_bytes(method, d, m))
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _timed(op: Callable[[], Any]) -> float:
    """One step: barrier, time ``op`` on this rank, return the slowest rank's time."""
    dist.barrier()
    t0 = time.perf_counter()
    op()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def _step(op: Callable[[], Any], rank: int, in_namespace: bool) -> tuple[float, int]:
    """``(time, wire bytes)`` of one timed step; the bytes are bracketed by barriers."""
    dist.barrier()
    lo_a = read_lo_bytes()[1] if in_namespace and rank == 0 else 0
    t = _timed(op)
    dist.barrier()
    lo_b = read_lo_bytes()[1] if in_namespace and rank == 0 else 0
    return t, lo_b - lo_a


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

    Args:
        dims: vector sizes d.
        methods: names from :data:`METHODS`.
        rate_bps: the link rate, only to skip cells predicted to be too slow.
        skip_above_s: skip a cell whose wire time, predicted as
            ``M · payload · 1.1 · 8 / rate_bps``, exceeds this (``None``: never skip).
        slow_s, target_s, min_reps, max_reps: adaptive repetitions (module docstring).
        in_namespace: read the loopback counters (only meaningful inside a namespace).

    Returns:
        dicts with ``d, method, world_size, times, median_s, reps, sent, received,
        wire_per_step`` (``None`` outside a namespace), ``status`` (``"ok"``,
        ``"skipped: ..."`` or ``"unavailable: ..."``).
    """
    records: list[dict[str, Any]] = []
    for d in dims:
        gen = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(int(d), generator=gen)
        ops: dict[str, tuple[Callable[[], Any], Callable[[], tuple[int, int]]]] = {}
        recs: dict[str, dict[str, Any]] = {}
        for method in methods:
            rec: dict[str, Any] = {"d": int(d), "method": method, "world_size": world_size,
                                   "times": [], "median_s": None, "reps": 0, "sent": None,
                                   "received": None, "wire_per_step": None, "status": "ok",
                                   "wire": []}
            records.append(rec)
            recs[method] = rec
            sent, received = payload_bytes(method, int(d), world_size)
            if rate_bps is not None and skip_above_s is not None:
                pred = world_size * sent * 1.1 * 8 / rate_bps
                if pred > skip_above_s:
                    rec["status"] = f"skipped: predicted {pred:.0f} s > {skip_above_s:g} s"
                    rec["sent"], rec["received"] = sent, received
                    continue
            try:
                ops[method] = make_op(method, x, world_size)
            except ImportError as exc:
                rec["status"] = f"unavailable: {exc}"
        # First call of each method; a slow one (> slow_s) is its only measurement, a fast
        # one is a warm-up that sets the number of repetitions.
        reps: dict[str, int] = {}
        for method, (op, _) in ops.items():
            first, wire = _step(op, rank, in_namespace)
            if first > slow_s:
                recs[method]["times"].append(first)
                recs[method]["wire"].append(wire)
            else:
                reps[method] = max(min_reps, min(max_reps, int(target_s / max(first, 1e-6))))
        # Interleaved rounds, so drift on a shared machine hits every method alike.
        for r in range(max(reps.values(), default=0)):
            for method, n in reps.items():
                if r < n:
                    t, wire = _step(ops[method][0], rank, in_namespace)
                    recs[method]["times"].append(t)
                    recs[method]["wire"].append(wire)
        for method, (_, nbytes) in ops.items():
            rec = recs[method]
            rec["reps"] = len(rec["times"])
            rec["median_s"] = statistics.median(rec["times"])
            if in_namespace and rank == 0:
                rec["wire_per_step"] = statistics.median(rec["wire"])
            rec["sent"], rec["received"] = nbytes()
        del ops
        del x
    # Every rank returns its own view; rank 0's wire counters are the ones that count.
    return records
