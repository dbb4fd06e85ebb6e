"""Worker side of tests/distributed/test_contract.py: every reducer (and the DDP hook)
through the same contract, on one real Gloo group.

Each case returns plain data; the parent asserts (table-driven, one test id per reducer and
property). Traffic is measured by wrapping the ``torch.distributed`` collectives the library
calls and adding up the bytes of the tensors each rank hands to them, under the model the
counters document: an ``all_gather`` sends this rank's block to each of the M−1 others and
receives theirs; ``all_to_all_single`` with equal splits sends (M−1)/M of its input; an
``all_reduce`` is counted as a ring, 2·(M−1)·⌈n/M⌉ elements each way.
"""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from signsgd.compression import Identity, ScaledSign, TopK
from signsgd.distributed import (
    AllReduce,
    ErrorFeedbackAllReduce,
    MajorityVote,
    MajorityVoteHookState,
    majority_vote_hook,
)
from signsgd.distributed.vote import shard_nbytes

#: (name, reducer factory, compressor the optimiser would hand over)
REDUCERS: list[tuple[str, Callable[[], Any], Any]] = [
    ("vote-sharded", lambda: MajorityVote(mode="sharded", seed=7), None),
    ("vote-allgather", lambda: MajorityVote(mode="allgather", seed=7), None),
    ("vote-buckets", lambda: MajorityVote(bucket_bytes=8), None),
    ("ef-scaled-sign", ErrorFeedbackAllReduce, ScaledSign()),
    ("ef-topk", ErrorFeedbackAllReduce, TopK(0.5)),
    ("ef-identity", ErrorFeedbackAllReduce, Identity()),
    ("allreduce", AllReduce, None),
    ("allreduce-scaled-sign", AllReduce, ScaledSign()),
]
SHAPES = [(5, 3), (70,), (2,), (4,)]


class Traffic:
    """Counts the payload bytes this rank hands to the collectives (all threads)."""

    def __init__(self, world: int) -> None:
        self.m = world
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    def _add(self, sent: int, received: int) -> None:
        with self._lock:
            self.sent += sent
            self.received += received

    def __enter__(self) -> Traffic:
        m = self.m
        originals = {n: getattr(dist, n) for n in
                     ("all_gather_single", "all_to_all_single", "all_reduce")}
        self._saved = originals

        def all_gather(out: torch.Tensor, inp: torch.Tensor, *a: Any, **k: Any) -> Any:
            self._add((m - 1) * inp.nbytes, (m - 1) * inp.nbytes)
            return originals["all_gather_single"](out, inp, *a, **k)

        def all_to_all(out: torch.Tensor, inp: torch.Tensor, *a: Any, **k: Any) -> Any:
            self._add(inp.nbytes * (m - 1) // m, out.nbytes * (m - 1) // m)
            return originals["all_to_all_single"](out, inp, *a, **k)

        def all_reduce(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            ring = 2 * (m - 1) * -(-t.numel() // m) * t.element_size()
            self._add(ring, ring)
            return originals["all_reduce"](t, *a, **k)

        dist.all_gather_single = all_gather
        dist.all_to_all_single = all_to_all
        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _inputs(rank: int, step: int, *, missing: bool) -> list[torch.Tensor | None]:
    """Float64 multiples of 1/8 (exact sums); tensor 2 is None on rank 0 when ``missing``,
    tensor 3 is None on every rank when ``missing``."""
    g = torch.Generator().manual_seed(100 * rank + step)
    out: list[torch.Tensor | None] = [
        torch.round(torch.randn(s, generator=g, dtype=torch.float64) * 8) / 8 for s in SHAPES]
    if missing:
        if rank == 0:
            out[2] = None
        out[3] = None
    return out


def _error(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the parent inspects type and text
        return f"{type(exc).__name__}: {exc}"
    return None


def _state(reducer: Any) -> dict[str, Any]:
    sd = reducer.state_dict()
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    return a == b


def reducer_case(rank: int, world: int, name: str, make: Callable[[], Any], compressor: Any
                 ) -> dict[str, Any]:  # noqa: ARG001 - name kept for tracebacks
    """Every contract property of one reducer on this rank."""
    out: dict[str, Any] = {}
    reducer = make()

    # None entries: absent here -> zeros go in; absent everywhere -> None back everywhere.
    with Traffic(world) as traffic:
        red = reducer.reduce(_inputs(rank, 0, missing=True), compressor=compressor)
    out["update"] = [None if u is None else u.clone() for u in red.update]
    out["transmitted_none"] = None if red.transmitted is None else [
        t is None for t in red.transmitted]
    out["counted"] = (reducer.bytes_sent, reducer.bytes_received)
    out["measured"] = (traffic.sent, traffic.received)

    # input == transmitted + residual: what a rank reports as transmitted is what the
    # others received. Two steps of one layout (the second one carries a server error).
    for step in (1, 2):
        inputs = _inputs(rank, step, missing=False)
        err_old = getattr(reducer, "server_error", None)
        err_old = None if err_old is None else err_old.clone()
        red = reducer.reduce([t.clone() for t in inputs], compressor=compressor)
    if red.transmitted is not None:
        tx = torch.cat([t.reshape(-1) for t in red.transmitted])
        upd = torch.cat([u.reshape(-1) for u in red.update])
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, tx)
        q = everyone[0].clone()
        for t in everyone[1:]:
            q += t  # in worker order, as the server stage adds them
        q /= world
        err_new = getattr(reducer, "server_error", None)
        if err_new is not None and world > 1:
            d = q.numel()
            c = 8 * shard_nbytes(d, world)
            lo = min(d, rank * c)
            n = min(d, lo + c) - lo
            q_shard = q[lo:lo + n] + (0 if err_old is None else err_old[:n])
            out["invariant"] = ("server", bool(torch.equal(err_new[:n],
                                                          q_shard - upd[lo:lo + n])))
        else:  # an exact mean of what every rank transmitted (all_reduce orders the sum)
            out["invariant"] = ("mean", bool(torch.allclose(upd, q, rtol=1e-12, atol=0)))

    # A NaN on rank 1: every rank raises in the same step, nothing changes.
    before = _state(reducer)
    bad = _inputs(rank, 2, missing=False)
    if rank == 1 % world:
        bad[0][0, 0] = float("nan")  # type: ignore[index]
    out["nonfinite"] = _error(lambda: reducer.reduce(
        bad, finite=bool(all(torch.isfinite(t).all() for t in bad)),  # type: ignore[union-attr]
        compressor=compressor))
    out["state_unchanged"] = _same(before, _state(reducer))

    # state_dict round trip: a fresh reducer loaded from the state continues identically.
    clone = make()
    clone.load_state_dict(reducer.state_dict())
    nxt = _inputs(rank, 3, missing=False)
    a = reducer.reduce([t.clone() for t in nxt], compressor=compressor).update
    a = [u.clone() for u in a]
    b = clone.reduce([t.clone() for t in nxt], compressor=compressor).update
    out["resume_equal"] = all(torch.equal(x, y) for x, y in zip(a, b))

    # commit=False: nothing changes until the caller commits, then exactly what a committed
    # reduce does (the clone above is in the same state); a dropped reduction is forgotten.
    before, counted = _state(reducer), (reducer.bytes_sent, reducer.total_bytes_sent)
    nxt = _inputs(rank, 4, missing=False)
    reducer.reduce([t.clone() for t in nxt], compressor=compressor, commit=False)  # dropped
    held = reducer.reduce([t.clone() for t in nxt], compressor=compressor, commit=False)
    out["uncommitted_unchanged"] = _same(before, _state(reducer)) and counted == (
        reducer.bytes_sent, reducer.total_bytes_sent)
    held.commit()
    held.commit()  # a second commit does nothing
    want = clone.reduce([t.clone() for t in nxt], compressor=compressor)
    out["commit_equals_reduce"] = _same(_state(reducer), _state(clone)) and all(
        torch.equal(x, y) for x, y in zip(held.update, want.update)) and (
        reducer.bytes_sent == clone.bytes_sent == reducer.total_bytes_sent - counted[1])

    # Pickles without the process group (and without scratch buffers).
    blob = pickle.dumps(reducer)
    back = pickle.loads(blob)
    out["pickle_has_group"] = b"ProcessGroup" in blob
    out["unpickled_group"] = back.group
    out["unpickled_step"] = back.step == reducer.step
    return out


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def hook_case(rank: int, world: int) -> dict[str, Any]:
    """The DDP hook: byte counters against measured traffic, pickling, state_dict round
    trip, a NaN on one rank."""
    out: dict[str, Any] = {}
    model = TwoLayer()
    ddp = DDP(copy.deepcopy(model), bucket_cap_mb=0.0002)
    state = MajorityVoteHookState(momentum=0.9, module=ddp)
    ddp.register_comm_hook(state, majority_vote_hook)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g))
               for _ in range(4)]
    measured = []
    for x, y in batches[:2]:
        sgd.zero_grad()
        with Traffic(world) as traffic:
            nn.functional.mse_loss(ddp(x), y).backward()
        sgd.step()
        measured.append(((traffic.sent, traffic.received),
                         (state.bytes_sent, state.bytes_received)))
    out["bytes"] = measured
    blob = pickle.dumps(state)
    out["pickle_has_group"] = b"ProcessGroup" in blob
    clone = pickle.loads(blob)
    out["unpickled_group"] = clone.process_group
    saved = state.state_dict()
    twin = MajorityVoteHookState(momentum=0.9, module=ddp)
    twin.load_state_dict(saved)
    out["resume_equal"] = _same(twin.state_dict(), saved)
    x, y = batches[2]
    if rank == 1 % world:
        x = x.clone()
        x[0, 0] = float("nan")
    before = [p.detach().clone() for p in ddp.parameters()]
    sgd.zero_grad()
    out["nonfinite"] = _error(lambda: nn.functional.mse_loss(ddp(x), y).backward())
    out["state_unchanged"] = _same(state.state_dict(), saved) and all(
        torch.equal(a, p) for a, p in zip(before, ddp.parameters()))
    return out


def settings_case(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 has another learning rate / weight decay: every rank must refuse the step."""
    import signsgd

    out: dict[str, Any] = {}
    for name, hp in (("lr", {"lr": 0.1 * (1 + (rank == 1 % world))}),
                     ("weight_decay", {"lr": 0.1, "weight_decay": 0.01 * (rank == 1 % world)})):
        p = torch.nn.Parameter(torch.ones(3))
        opt = signsgd.Signum([p], **hp, aggregator=MajorityVote())
        p.grad = torch.ones(3)
        out[name] = (_error(opt.step), torch.equal(p.detach(), torch.ones(3)))
    return out


def contract_suite(rank: int, world: int) -> dict[str, Any]:
    """Every reducer and the hook, one after the other, on the whole group."""
    out: dict[str, Any] = {name: reducer_case(rank, world, name, make, compressor)
                           for name, make, compressor in REDUCERS}
    out["ddp-hook"] = hook_case(rank, world)
    out["settings"] = settings_case(rank, world)
    return out
