"""The one training loop of the project: batch → objective → backward → step → schedules,
with callbacks around it.

``signsgd train`` (:mod:`signsgd.train`), the paper experiments
(:mod:`signsgd.experiments`) and the benchmarks all run :class:`Loop`; what differs between
them (logging, evaluation, checkpoints, a time budget, a target to stop at) lives in their
:class:`Callback` s, not in a copy of the loop. The loop needs torch only.

One step, :meth:`Loop.train_step`: the objective on the batch (under ``autocast`` when
given), ``zero_grad(set_to_none=True)``, backward, the gradient clipped to ``grad_clip``
(this rank's gradient, before the optimiser aggregates it), ``optimizer.step()``, on the
run's last step ``optimizer.synchronise()`` when it has one (local steps: the partial last
round, so that every rank ends with the same model), then one ``LambdaLR`` step of the
schedule on the optimiser and, for local steps, on its outer optimiser. The step is timed by
``clock`` (default: this process's wall time; the benchmarks pass one that takes the
slowest rank's time between barriers). :meth:`Loop.run` calls, in this order,
``before_step`` → the step → ``on_step`` → ``on_eval`` (every ``eval_every`` steps and at
the last) → ``on_checkpoint`` (at evaluations and every ``checkpoint_every`` steps); a
callback ends the run early with :meth:`Loop.stop`.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(2, 2)
    >>> loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy)
    >>> batch = (torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    >>> loop.run(lambda step: batch, steps=3)
    3
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from signsgd.reduction import CommStats, comm_stats

__all__ = ["Callback", "Loop", "StepOutput", "cross_entropy"]

#: ``objective(model, x, y) -> (loss, correct, count)``: the loss to differentiate, the
#: correct predictions in the batch and the batch's examples (as :meth:`signsgd.tasks.Task.loss`).
Objective = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, float, float]]


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float, float]:
    """The :data:`Objective` of a classifier: cross-entropy of ``model(x)`` against ``y``.

    Example:
        >>> loss, correct, count = cross_entropy(torch.nn.Identity(), torch.eye(2),
        ...                                      torch.tensor([0, 0]))
        >>> round(float(loss), 4), correct, count
        (0.8133, 1.0, 2.0)
    """
    out = model(x)
    return F.cross_entropy(out, y), float((out.argmax(1) == y).sum()), float(len(y))


@dataclass(frozen=True)
class StepOutput:
    """What one step of the loop did, on this rank.

    Example:
        >>> StepOutput(1, 0.5, 3.0, 4.0, 0.1, 0.01, CommStats()).count
        4.0
    """

    step: int          # steps done, this one included
    loss: float        # the objective's loss on this rank's batch
    correct: float     # correct predictions in the batch
    count: float       # examples in the batch
    lr: float          # the learning rate the step used (the first parameter group's)
    seconds: float     # the step's time by the loop's clock
    comm: CommStats    # the optimiser's communication in this step


class Callback:
    """The loop's events; a callback overrides the ones it needs (each a no-op here).

    Example:
        >>> class Count(Callback):
        ...     steps = 0
        ...     def on_step(self, loop, out):
        ...         self.steps += 1
        >>> Count().steps
        0
    """

    def before_step(self, loop: Loop, step: int) -> None:
        """Before step ``step`` (0-based: ``step`` steps are done)."""

    def on_step(self, loop: Loop, out: StepOutput) -> None:
        """After a step and its schedules."""

    def on_eval(self, loop: Loop, step: int) -> None:
        """After ``step`` steps, every ``eval_every`` and after the last."""

    def on_checkpoint(self, loop: Loop, step: int) -> None:
        """After ``on_eval``, and every ``checkpoint_every`` steps."""


def _wall_clock(op: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    op()
    return time.perf_counter() - t0


class Loop:
    """Training of ``model`` by ``optimizer`` on ``objective``, step by step.

    Args:
        model: what the objective runs (a DDP wrapper or the module itself).
        optimizer: any ``torch.optim.Optimizer`` (ours, torch's, :class:`LocalSteps`).
        objective: ``objective(model, x, y) -> (loss, correct, count)`` (:data:`Objective`).
        schedule: ``factor(step)`` of the learning rate, applied by one ``LambdaLR`` on the
            optimiser and one on its ``outer_optimizer`` (local steps) when it has one
            (``None``: constant).
        grad_clip: clip the gradient's global norm to this before the step (0: off).
        autocast: a context manager factory the objective runs under (e.g. bf16 autocast).
        clock: ``clock(op) -> seconds`` runs one step and times it (default: wall time).
        callbacks: the run's :class:`Callback` s, called in order.

    Attributes:
        step: steps done (set it to resume at a checkpointed step).
        schedulers: the ``LambdaLR`` s (the optimiser's first).
        clock, callbacks: as given (a runner may set them before :meth:`run`).
        train_seconds: the clock's sum over the steps of this process.

    Example:
        >>> w = torch.nn.Linear(1, 1, bias=False)
        >>> loop = Loop(w, torch.optim.SGD(w.parameters(), lr=0.5),
        ...             lambda m, x, y: (((m(x) - y) ** 2).mean(), 0.0, float(len(y))),
        ...             schedule=lambda step: 0.5 ** step)
        >>> out = loop.train_step(torch.ones(2, 1), torch.zeros(2, 1))
        >>> out.step, out.lr, loop.optimizer.param_groups[0]["lr"]
        (1, 0.5, 0.25)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 objective: Objective, *, schedule: Callable[[int], float] | None = None,
                 grad_clip: float = 0.0,
                 autocast: Callable[[], AbstractContextManager[Any]] | None = None,
                 clock: Callable[[Callable[[], object]], float] | None = None,
                 callbacks: Iterable[Callback] = ()) -> None:
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.grad_clip = float(grad_clip)
        self.autocast = autocast or nullcontext
        self.clock = clock or _wall_clock
        self.callbacks = list(callbacks)
        optimizers = [optimizer, getattr(optimizer, "outer_optimizer", None)]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizers
                           if o is not None and schedule is not None]
        self.step = 0
        self.train_seconds = 0.0
        self._stopped = False

    def stop(self) -> None:
        """End :meth:`run` once the current step's events are done."""
        self._stopped = True

    def load_schedule(self, state: dict[str, Any]) -> None:
        """Resume the schedules from the optimiser's scheduler ``state_dict`` (the outer
        optimiser's lr came back with the optimiser's own state; its counter follows)."""
        self.schedulers[0].load_state_dict(state)
        for sched in self.schedulers[1:]:
            sched.last_epoch = self.schedulers[0].last_epoch

    def train_step(self, x: Tensor, y: Tensor, *, last: bool = False) -> StepOutput:
        """One step on the batch ``(x, y)``; ``last``: the run's last step (local steps
        synchronise after it)."""
        result: list[Any] = []

        def op() -> None:
            with self.autocast():
                loss, correct, count = self.objective(self.model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            if last and hasattr(self.optimizer, "synchronise"):
                self.optimizer.synchronise()
            result.extend((float(loss.detach()), correct, count,
                           float(self.optimizer.param_groups[0]["lr"])))
            with warnings.catch_warnings():  # an outer optimiser steps at syncs only
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                for sched in self.schedulers:
                    sched.step()

        seconds = self.clock(op)
        self.step += 1
        self.train_seconds += seconds
        loss, correct, count, lr = result
        return StepOutput(self.step, loss, float(correct), float(count), lr, seconds,
                          comm_stats(self.optimizer))

    def run(self, batch_of: Callable[[int], tuple[Tensor, Tensor]], steps: int, *,
            eval_every: int = 0, checkpoint_every: int = 0) -> int:
        """Train from :attr:`step` to ``steps``, ``batch_of(step)`` giving each batch;
        returns the steps done (fewer when a callback stopped the run).

        Raises:
            whatever a step raises (e.g. :class:`~signsgd.errors.NonFiniteGradientError`):
            :attr:`step` then counts the steps that completed.
        """
        self._stopped = False
        while self.step < steps and not self._stopped:
            for cb in self.callbacks:
                cb.before_step(self, self.step)
            x, y = batch_of(self.step)
            out = self.train_step(x, y, last=self.step + 1 == steps)
            for cb in self.callbacks:
                cb.on_step(self, out)
            evaluate = bool(eval_every) and (out.step % eval_every == 0 or out.step == steps)
            if evaluate:
                for cb in self.callbacks:
                    cb.on_eval(self, out.step)
            if evaluate or checkpoint_every and out.step % checkpoint_every == 0:
                for cb in self.callbacks:
                    cb.on_checkpoint(self, out.step)
        return self.step
