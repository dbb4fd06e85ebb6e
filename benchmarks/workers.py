"""What runs on every rank of the network benchmarks (``bench_comm.py``, ``bench_e2e.py``).

The scripts hand these functions to :func:`signsgd.netem.launch`, which runs them in M Gloo
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
===========================  ==================================================================

**Whole training steps** (:func:`step_time_worker`, :func:`tta_worker`) of the methods of
:data:`E2E_LABELS`; the optimisers come from :func:`signsgd.registry.build`:

=====================  ======================================================================
``signum``             ``build("signum", world_size=M)``: Signum(0.9) + sharded majority vote
``signum-ddp-hook``    DDP + ``majority_vote_hook`` (momentum 0.9 in the hook) +
                       ``torch.optim.SGD(momentum=0)``
``ef-signsgd``         ``build("ef-signsgd", world_size=M)``: ScaledSign + EF all-reduce
``sgd``                ``build("sgd", momentum=0.9, world_size=M)``: gradients averaged by one
                       fp32 ``AllReduce`` after backward (the same structure as ``signum``)
``sgd-ddp``            DDP (fp32 bucketed all-reduce overlapping backward) +
                       ``torch.optim.SGD(momentum=0.9)``: what most users run today
``sgd-local``          ``build("sgd", momentum=0.9)`` with no communication at all: the
                       compute-only step time under the same CPU sharing
=====================  ======================================================================

DDP models are built with ``init_sync=False`` (every rank builds the same model from the
same seed), so constructing them does not broadcast the parameters over the slow link.

Timing: ranks meet at a barrier, each times its call, and a step's time is the slowest
rank's. Repetitions are adaptive: the first call is a warm-up that sets the number of
repetitions (about ``target_s`` seconds' worth, ``min_reps`` to ``max_reps``); a first call
slower than ``slow_s`` is instead the only measurement (one aggregation) or followed by one
timed step (a training step). The methods take turns in rounds, so drift of a shared
machine hits all of them alike; the median is reported.

Bytes: ``sent`` / ``received`` are the payload bytes of one rank (the reducers' and the
hook's counters, header included; for fp16 and DDP the ring volume ``2·(M−1)·⌈n/M⌉·size``);
``wire`` is the namespace's loopback byte counter around each timed call, rank 0's reading:
every byte all ranks put on the wire in one step, TCP/IP headers and acknowledgements and
the small barrier and timing messages included (only meaningful inside a namespace).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import barrier, timed
from torch import Tensor, nn

from signsgd import registry
from signsgd.compression import ScaledSign
from signsgd.distributed import (
    AllReduce,
    ErrorFeedbackAllReduce,
    MajorityVote,
    MajorityVoteHookState,
    majority_vote_hook,
)
from signsgd.distributed.reducer import ring_nbytes
from signsgd.distributed.vote import vote_nbytes
from signsgd.netem import read_lo_bytes

__all__ = ["COMM_LABELS", "E2E_LABELS", "comm_worker", "payload_bytes", "make_op", "resnet18",
           "Trainer", "step_time_worker", "tta_worker"]

#: the aggregation methods of :func:`comm_worker` and their table labels.
COMM_LABELS: dict[str, str] = {
    "majority-vote": "sharded vote (1 bit)",
    "majority-vote-allgather": "allgather vote (1 bit)",
    "ef-allreduce": "EF all-reduce (1 bit)",
    "fp16-allreduce": "fp16 all-reduce",
    "fp32-allreduce": "fp32 all-reduce",
}
#: the training methods of :class:`Trainer` and their table labels.
E2E_LABELS: dict[str, str] = {
    "signum": "Signum + majority vote",
    "signum-ddp-hook": "DDP + majority-vote hook",
    "ef-signsgd": "EF-signSGD + EF all-reduce",
    "sgd": "SGD + fp32 all-reduce",
    "sgd-ddp": "SGD + DDP (fp32)",
    "sgd-local": "no communication (compute only)",
}


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
def payload_bytes(method: str, d: int, world_size: int) -> tuple[int, int]:
    """Payload bytes one rank sends and receives in one step, from the wire formats alone.

    The votes from :func:`signsgd.distributed.vote.vote_nbytes`; EF all-reduce as the
    sharded vote (1 bit each way; the per-chunk scales are ignored here); the all-reduces
    as a ring, :func:`signsgd.distributed.reducer.ring_nbytes`.

    Example:
        >>> payload_bytes("fp32-allreduce", 1000, 4)
        (6000, 6000)
    """
    if method in ("majority-vote", "majority-vote-allgather", "ef-allreduce"):
        mode = "allgather" if method == "majority-vote-allgather" else "sharded"
        return vote_nbytes(d, world_size, mode)
    width = {"fp32-allreduce": 4, "fp16-allreduce": 2}.get(method)
    if width is None:
        raise ValueError(f"unknown method {method!r}; choose from {list(COMM_LABELS)}")
    b = ring_nbytes(d, world_size, width)
    return b, b


def make_op(method: str, x: Tensor, world_size: int
            ) -> tuple[Callable[[], Any], Callable[[], tuple[int, int]]]:
    """``(op, nbytes)``: ``op()`` does one aggregation of ``x``; ``nbytes()`` its payload.

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
    raise ValueError(f"unknown method {method!r}; choose from {list(COMM_LABELS)}")


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
        methods: names from :data:`COMM_LABELS`.
        rate_bps: the link rate, only to skip cells predicted to be too slow.
        skip_above_s: skip a cell whose wire time, predicted as
            ``M · payload · 1.1 · 8 / rate_bps``, exceeds this (``None``: never skip).
        slow_s, target_s, min_reps, max_reps: adaptive repetitions (module docstring).
        in_namespace: read the loopback counters (only meaningful inside a namespace).

    Returns:
        dicts with ``d, method, world_size, times, wire, median_s, reps, sent, received,
        wire_per_step`` (``None`` outside a namespace and on ranks > 0) and ``status``
        (``"ok"`` or ``"skipped: ..."``).

    Example:
        >>> comm_worker(0, 1, [8], ["fp32-allreduce"], in_namespace=False)[0]["sent"]
        0
    """
    records: list[dict[str, Any]] = []
    for d in dims:
        x = torch.randn(int(d), generator=torch.Generator().manual_seed(1000 + rank))
        ops: dict[str, tuple[Callable[[], Any], Callable[[], tuple[int, int]]]] = {}
        for method in methods:
            sent, received = payload_bytes(method, int(d), world_size)
            rec: dict[str, Any] = {"d": int(d), "method": method, "world_size": world_size,
                                   "times": [], "wire": [], "median_s": None, "reps": 0,
                                   "sent": sent, "received": received,
                                   "wire_per_step": None, "status": "ok"}
            records.append(rec)
            pred = world_size * sent * 1.1 * 8 / rate_bps if rate_bps else 0.0
            if skip_above_s is not None and pred > skip_above_s:
                rec["status"] = f"skipped: predicted {pred:.0f} s > {skip_above_s:g} s"
            else:
                ops[method] = make_op(method, x, world_size)
        timing = _measure({m: op for m, (op, _) in ops.items()}, rank, in_namespace,
                          slow_s=slow_s, target_s=target_s, min_reps=min_reps,
                          max_reps=max_reps, keep_slow_first=True)
        for rec in records[-len(methods):]:
            if rec["method"] in ops:
                rec.update({k: v for k, v in timing[rec["method"]].items() if k != "warmup_s"})
                rec["sent"], rec["received"] = ops[rec["method"]][1]()
        del ops, x
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


# ------------------------------------------------------------------------------- training
class Trainer:
    """One method's model, optimiser and training step (:data:`E2E_LABELS`).

    Args:
        method: a key of :data:`E2E_LABELS`.
        make_model: builds the model (seeded identically on every rank).
        world_size: M; the DDP methods and M > 1 need ``torch.distributed`` initialised.
        lr: the learning rate.

    Example:
        >>> tr = Trainer("sgd-local", lambda: nn.Linear(2, 2), 1, lr=0.1)
        >>> loss = tr.step(torch.ones(4, 2), torch.zeros(4, dtype=torch.long)); tr.bytes()
        (0, 0)
    """

    def __init__(self, method: str, make_model: Callable[[], nn.Module], world_size: int,
                 lr: float) -> None:
        if method not in E2E_LABELS:
            raise ValueError(f"unknown method {method!r}; choose from {list(E2E_LABELS)}")
        self.method = method
        self.world_size = world_size
        torch.manual_seed(0)  # identical initial parameters on every rank
        model = make_model()
        self.numel = sum(p.numel() for p in model.parameters())
        self.hook_state: MajorityVoteHookState | None = None
        self.model: nn.Module = model
        if method in ("signum-ddp-hook", "sgd-ddp"):
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, init_sync=False)
            if method == "signum-ddp-hook":
                self.hook_state = MajorityVoteHookState(momentum=0.9, module=self.model)
                self.model.register_comm_hook(self.hook_state, majority_vote_hook)
            momentum = 0.0 if method == "signum-ddp-hook" else 0.9
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                self.model.parameters(), lr=lr, momentum=momentum)
        else:
            name = "sgd" if method == "sgd-local" else method
            hp = {"momentum": 0.9} if name in ("sgd", "signum") else {}
            self.opt = registry.build(name, model.parameters(),
                                      world_size=1 if method == "sgd-local" else world_size,
                                      lr=lr, **hp)
        self.reducer = getattr(self.opt, "aggregator", None) or getattr(self.opt, "reducer",
                                                                        None)

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on ``(x, y)``; returns the loss."""
        self.opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def bytes(self) -> tuple[int, int]:
        """Payload bytes (sent, received) of this rank in the last step."""
        counter = self.reducer if self.reducer is not None else self.hook_state
        if counter is not None:
            return int(counter.bytes_sent), int(counter.bytes_received)
        if self.method == "sgd-ddp":
            b = ring_nbytes(self.numel, self.world_size, 4)
            return b, b
        return 0, 0


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

    Every method first takes one untimed warm-up step; then a method whose warm-up took
    more than ``slow_s`` is timed for one step, the others for about ``target_s`` seconds
    (``min_reps`` to ``max_reps`` steps), interleaved across methods.

    Returns:
        One dict per method: ``method, world_size, batch, image_size, numel, warmup_s,
        times, wire, median_s, reps, sent, received, wire_per_step``.

    Example:
        >>> recs = step_time_worker(0, 1, ["sgd-local"], batch=2, target_s=0.0,
        ...                         min_reps=1, max_reps=1, in_namespace=False)
        >>> recs[0]["method"], recs[0]["reps"]
        ('sgd-local', 1)
    """
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    trainers = {m: Trainer(m, resnet18, world_size, lr=1e-4) for m in methods}
    timing = _measure({m: (lambda tr=tr: tr.step(x, y)) for m, tr in trainers.items()},
                      rank, in_namespace, slow_s=slow_s, target_s=target_s,
                      min_reps=min_reps, max_reps=max_reps, keep_slow_first=False)
    records = []
    for m, tr in trainers.items():
        sent, received = tr.bytes()
        records.append({"method": m, "world_size": world_size, "batch": batch,
                        "image_size": image_size, "numel": tr.numel, **timing[m],
                        "sent": sent, "received": received})
    return records


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
