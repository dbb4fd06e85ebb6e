"""What the benchmarks train on every rank: :class:`Trainer` (one method's model, optimiser
and the library's :class:`~signsgd.loop.Loop`) and the worker functions that ``bench_e2e``
and ``bench_tta`` hand to :func:`benchmarks.netem.launch` (:func:`step_time_worker`,
:func:`workload_step_worker`, :func:`curve_worker`, :func:`tta_worker`). The step is the
loop's; a worker adds its clock (the slowest rank's time between barriers) and its
evaluations as the loop's callbacks."""

from __future__ import annotations

import itertools
import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmarks.common import ROOT, timed
from benchmarks.measure import interleaved as _measure  # the name _time_trainers calls
from benchmarks.methods import WORKLOADS
from benchmarks.methods import method as _lookup  # Trainer's argument is called ``method``
from benchmarks.models import resnet18
from signsgd.distributed import LocalSteps
from signsgd.errors import NonFiniteGradientError
from signsgd.loop import Callback, Loop, Objective, StepOutput, cross_entropy
from signsgd.reduction import Telemetry

__all__ = ["Trainer", "make_workload", "step_time_worker", "workload_step_worker",
           "curve_worker", "tta_worker"]


class Trainer:
    """One method's model, optimiser and training step (:func:`benchmarks.methods.method`).

    Args:
        method: a name :func:`benchmarks.methods.method` knows.
        make_model: builds the model (seeded identically on every rank).
        world_size: M; the DDP methods and M > 1 need ``torch.distributed`` initialised.
        lr: the learning rate (``None``: the row's default for ``workload``).
        workload: the key of the row's default learning rates (``cnn`` / ``gpt``).
        objective: ``objective(model, x, y) -> (loss, correct, count)`` (default:
            :func:`signsgd.loop.cross_entropy`; a task's ``loss``).
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
                 objective: Objective = cross_entropy,
                 grad_clip: float = 0.0, schedule: Callable[[int], float] | None = None,
                 start_powersgd_iter: int = 2, outer_lr: float | None = None,
                 outer_momentum: float = 0.0) -> None:
        self.spec = _lookup(method)
        self.method = method
        self.world_size = world_size
        self.lr = float(lr if lr is not None else self.spec.lr[workload])
        self.start_powersgd_iter = int(start_powersgd_iter)
        self.outer_lr, self.outer_momentum = outer_lr, float(outer_momentum)
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
        self.loop = Loop(self.model, self.opt, objective, schedule=schedule,
                         grad_clip=grad_clip)

    @property
    def sync_every(self) -> int:
        """H: the steps of one LocalSteps round (1 for the other methods)."""
        return self.spec.sync_every

    @property
    def in_warmup(self) -> bool:
        """Whether the next step is one of PowerSGD's first S (fp32) steps."""
        return self.powersgd is not None and self.powersgd.iter < self.start_powersgd_iter

    def step(self, x: Tensor, y: Tensor) -> float:
        """One training step on ``(x, y)`` (the loop's); returns the loss."""
        return self.loop.train_step(x, y).loss

    def bytes(self) -> tuple[int, int]:
        """Payload bytes (sent, received) of this rank in the last step (LocalSteps: per
        step, averaged over a round)."""
        return self.nbytes(self)


def _time_trainers(trainers: dict[str, Trainer], batch: tuple[Tensor, Tensor], rank: int,
                   in_namespace: bool, *, slow_s: float, target_s: float, min_reps: int,
                   max_reps: int) -> dict[str, dict[str, Any]]:
    """Median step time of every trainer on ``batch``, interleaved
    (:func:`benchmarks.measure.interleaved`).

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
                   objective=task.loss,
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
    sent, reached, diverged = 0, None, None
    losses: list[float] = []

    class Curve(Callback):  # the metric every `every` steps; stop at the target
        def on_step(self, loop: Loop, out: StepOutput) -> None:
            nonlocal sent
            losses.append(out.loss)
            sent += tr.bytes()[0]

        def on_eval(self, loop: Loop, step: int) -> None:
            nonlocal reached, diverged
            loss_t = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
            if world_size > 1:
                dist.all_reduce(loss_t)
            metric = evaluate()
            curve.append((step, metric, float(loss_t[0] / max(loss_t[1], 1)),
                          loop.train_seconds))
            losses.clear()
            if not math.isfinite(metric):
                diverged = f"step {step}: non-finite {key}"
                loop.stop()
            elif target is not None and _better(metric, target, higher):
                reached = step
                loop.stop()

    loop = tr.loop
    loop.clock, loop.callbacks = (lambda op: timed(op)[0]), [Curve()]
    try:
        loop.run(lambda step: task.batch(rank, world_size, step), steps, eval_every=every)
    except NonFiniteGradientError as exc:  # raised on every rank alike
        diverged = f"step {loop.step + 1}: {exc}"
    step, clock = loop.step, loop.train_seconds
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
    sent, reached = 0, None
    losses: list[float] = []

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for epoch in itertools.count():
            idx = shard_indices(len(train), rank, world_size, seed=seed, epoch=epoch)
            for b in epoch_batches(idx, batch):
                if len(b) < batch:
                    break  # equal batch sizes on every rank
                yield train.batch(b)

    class Budget(Callback):  # accuracy every eval_every steps; stop at the target or budget
        def on_step(self, loop: Loop, out: StepOutput) -> None:
            nonlocal sent, reached
            losses.append(out.loss)
            sent += tr.bytes()[0]
            clock, step = loop.train_seconds, out.step
            if step % eval_every == 0 or clock >= budget_s or step >= max_steps:
                acc = _accuracy(module, xt, yt)
                curve.append((clock, step, acc, statistics.fmean(losses[-eval_every:])))
                if reached is None and acc >= target_acc:
                    reached = clock
                if reached is not None or clock >= budget_s:
                    loop.stop()

    stream = batches()
    tr.loop.clock, tr.loop.callbacks = (lambda op: timed(op)[0]), [Budget()]
    step = tr.loop.run(lambda _: next(stream), max_steps)
    return {"method": method, "lr": lr, "batch": batch, "world_size": world_size,
            "curve": curve, "reached_s": reached, "target_acc": target_acc, "steps": step,
            "bytes_sent_per_step": sent / max(step, 1), "numel": tr.numel}
