"""Worker side of ``benchmarks/bench_e2e.py``: whole training steps, M workers.

Two measurements:

* :func:`step_time_worker` — the time of one training step (forward, backward,
  aggregation, update) of a ResNet-18 (:func:`resnet18`, 11.7M parameters, the ImageNet
  architecture of He et al. 2016) on small synthetic inputs (random 32×32 images, random
  labels, a fixed batch per rank), per method.
* :func:`tta_worker` — time-to-accuracy on Fashion-MNIST with the small CNN of
  :mod:`signsgd.models`: train for a wall-clock budget, evaluate test accuracy every few
  steps (the evaluation is not counted in the training time), report the curve.

Methods (:data:`E2E_METHODS`):

=====================  ======================================================================
``signum_vote``        ``signsgd.Signum(momentum=0.9, aggregator=MajorityVote())`` (sharded)
``signum_ddp_hook``    DDP + ``majority_vote_hook`` (momentum 0.9 in the hook) +
                       ``torch.optim.SGD(momentum=0)``
``ef_signsgd``         ``signsgd.EFSGD(ScaledSign, aggregator=ErrorFeedbackAllReduce())``
``sgd_allreduce``      ``torch.optim.SGD(momentum=0.9)`` on gradients averaged by one fp32
                       ``AllReduce`` after backward (the same structure as ``signum_vote``)
``sgd_ddp``            DDP (fp32 bucketed all-reduce overlapping backward) +
                       ``torch.optim.SGD(momentum=0.9)``: what most users run today
``local``              ``torch.optim.SGD`` with no communication at all: the compute-only
                       step time under the same CPU sharing, for the bandwidth model
=====================  ======================================================================

DDP models are built with ``init_sync=False`` (every rank builds the same model from the
same seed), so constructing them does not broadcast the parameters over the slow link.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from signsgd.bench.netem import read_lo_bytes

__all__ = ["E2E_METHODS", "E2E_LABELS", "resnet18", "step_time_worker", "tta_worker"]

E2E_METHODS: tuple[str, ...] = (
    "signum_vote", "signum_ddp_hook", "ef_signsgd", "sgd_allreduce", "sgd_ddp", "local",
)
E2E_LABELS: dict[str, str] = {
    "signum_vote": "Signum + majority vote",
    "signum_ddp_hook": "DDP + majority-vote hook",
    "ef_signsgd": "EF-signSGD + EF all-reduce",
    "sgd_allreduce": "SGD + fp32 all-reduce",
    "sgd_ddp": "SGD + DDP (fp32)",
    "local": "no communication (compute only)",
}


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


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016, ImageNet layout): 7×7 stem, 4 stages of 2 basic blocks,
    64/128/256/512 channels, global pooling, a linear classifier; 11,689,512 parameters
    with 1000 classes — the same parameter shapes as ``torchvision.models.resnet18``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        c_in = 64
        for i, c in enumerate((64, 128, 256, 512)):
            layers += [_Block(c_in, c, 1 if i == 0 else 2), _Block(c, c, 1)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 1000) -> ResNet18:
    """A ResNet-18 with ``num_classes`` outputs (11.69M parameters for 1000)."""
    return ResNet18(num_classes)


# ------------------------------------------------------------------------------- methods
def _ring_bytes(numel: int, world_size: int) -> int:
    return 2 * (world_size - 1) * numel * 4 // world_size


class _Trainer:
    """One method's model, optimiser and step; ``bytes()`` = payload per rank per step."""

    def __init__(self, method: str, make_model: Callable[[], nn.Module], world_size: int,
                 lr: float) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import signsgd
        from signsgd.compression import ScaledSign
        from signsgd.distributed import (
            AllReduce,
            ErrorFeedbackAllReduce,
            MajorityVote,
            MajorityVoteHookState,
            majority_vote_hook,
        )

        if method not in E2E_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {E2E_METHODS}")
        self.method = method
        self.world_size = world_size
        torch.manual_seed(0)  # identical initial parameters on every rank
        model = make_model()
        self.numel = sum(p.numel() for p in model.parameters())
        self.agg: Any = None
        self.hook_state: Any = None
        if method in ("signum_ddp_hook", "sgd_ddp"):
            self.model: nn.Module = DDP(model, init_sync=False)
            if method == "signum_ddp_hook":
                self.hook_state = MajorityVoteHookState(momentum=0.9, module=self.model)
                self.model.register_comm_hook(self.hook_state, majority_vote_hook)
                self.opt: torch.optim.Optimizer = torch.optim.SGD(
                    self.model.parameters(), lr=lr, momentum=0.0)
            else:
                self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        else:
            self.model = model
            if method == "signum_vote":
                self.agg = MajorityVote()
                self.opt = signsgd.Signum(model.parameters(), lr=lr, momentum=0.9,
                                          aggregator=self.agg)
            elif method == "ef_signsgd":
                self.agg = ErrorFeedbackAllReduce()
                self.opt = signsgd.EFSGD(model.parameters(), lr=lr, compressor=ScaledSign(),
                                         aggregator=self.agg)
            elif method == "sgd_allreduce":
                self.agg = AllReduce()
                self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            else:  # local
                self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on ``(x, y)``; returns the loss."""
        self.opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.method == "sgd_allreduce":
            params = [p for p in self.model.parameters() if p.grad is not None]
            mean = self.agg.reduce_gradients([p.grad for p in params])
            for p, g in zip(params, mean):
                p.grad.copy_(g)
        self.opt.step()
        return float(loss.detach())

    def bytes(self) -> tuple[int, int]:
        """Payload bytes (sent, received) of this rank in the last step."""
        if self.agg is not None:
            return int(self.agg.bytes_sent), int(self.agg.bytes_received)
        if self.hook_state is not None:
            return int(self.hook_state.bytes_sent), int(self.hook_state.bytes_received)
        if self.method == "sgd_ddp":
            b = _ring_bytes(self.numel, self.world_size)
            return b, b
        return 0, 0


def _timed_step(tr: _Trainer, x: Tensor, y: Tensor, rank: int, in_namespace: bool
                ) -> tuple[float, int]:
    dist.barrier()
    lo_a = read_lo_bytes()[1] if in_namespace and rank == 0 else 0
    t0 = time.perf_counter()
    tr.step(x, y)
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    dist.barrier()
    lo_b = read_lo_bytes()[1] if in_namespace and rank == 0 else 0
    return float(dt), lo_b - lo_a


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
    (``min_reps`` to ``max_reps`` steps), interleaved across methods. Returns one dict per
    method: ``method, times, median_s, reps, sent, received, wire_per_step, numel``.
    """
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    trainers = {m: _Trainer(m, resnet18, world_size, lr=1e-4) for m in methods}
    recs = {m: {"method": m, "world_size": world_size, "batch": batch,
                "image_size": image_size, "numel": trainers[m].numel, "times": [],
                "wire": [], "median_s": None, "reps": 0, "sent": None, "received": None,
                "wire_per_step": None} for m in methods}
    reps: dict[str, int] = {}
    for m, tr in trainers.items():
        first, _ = _timed_step(tr, x, y, rank, in_namespace)
        recs[m]["warmup_s"] = first
        reps[m] = 1 if first > slow_s else max(min_reps, min(max_reps,
                                                             int(target_s / max(first, 1e-6))))
    for r in range(max(reps.values(), default=0)):
        for m, n in reps.items():
            if r < n:
                t, wire = _timed_step(trainers[m], x, y, rank, in_namespace)
                recs[m]["times"].append(t)
                recs[m]["wire"].append(wire)
    for m, tr in trainers.items():
        rec = recs[m]
        rec["reps"] = len(rec["times"])
        rec["median_s"] = statistics.median(rec["times"])
        if in_namespace and rank == 0:
            rec["wire_per_step"] = statistics.median(rec["wire"])
        rec["sent"], rec["received"] = tr.bytes()
    return [recs[m] for m in methods]


# ------------------------------------------------------------------------------- accuracy
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
    (all ranks synchronised by a barrier before each evaluation); every ``eval_every``
    steps rank 0's model is evaluated on the first ``eval_examples`` test images (the
    models are identical on every rank for every method). Stops at the first evaluation
    at or above ``target_acc``, or when the training clock passes ``budget_s``.

    Returns ``{"method", "curve": [(train_s, step, acc, loss)], "reached_s", "steps",
    "bytes_sent_per_step"}`` (``reached_s`` is ``None`` if the target was not reached).
    """
    from signsgd.data import epoch_batches, load, shard_indices
    from signsgd.models import build

    train, test = load("fashion-mnist")
    xt, yt = test.batch(torch.arange(min(eval_examples, len(test))))
    tr = _Trainer(method, lambda: build("cnn", train.shape, 10), world_size, lr=lr)
    module = tr.model.module if hasattr(tr.model, "module") else tr.model
    curve: list[tuple[float, int, float, float]] = [(0.0, 0, _accuracy(module, xt, yt), 0.0)]
    clock = 0.0
    step = 0
    reached: float | None = None
    epoch = 0
    sent = 0
    losses: list[float] = []
    done = False
    while not done:
        idx = shard_indices(len(train), rank, world_size, seed=seed, epoch=epoch)
        for b in epoch_batches(idx, batch):
            xb, yb = train.batch(b)
            if len(b) < batch:
                break  # equal batch sizes on every rank
            dist.barrier()
            t0 = time.perf_counter()
            losses.append(tr.step(xb, yb))
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            clock += float(dt)
            step += 1
            sent += tr.bytes()[0]
            if step % eval_every == 0 or clock >= budget_s or step >= max_steps:
                acc = _accuracy(module, xt, yt)
                curve.append((clock, step, acc, statistics.fmean(losses[-eval_every:])))
                if reached is None and acc >= target_acc:
                    reached = clock
                if reached is not None or clock >= budget_s or step >= max_steps:
                    done = True
                    break
        epoch += 1
    return {"method": method, "lr": lr, "batch": batch, "world_size": world_size,
            "curve": curve, "reached_s": reached, "target_acc": target_acc, "steps": step,
            "bytes_sent_per_step": sent / max(step, 1), "numel": tr.numel}
