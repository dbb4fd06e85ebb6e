"""The one training loop (:mod:`signsgd.loop`): its events and their order, stopping, the
schedules (also an outer optimiser's), clipping, the last step's synchronisation, the clock
and a failing step, on tiny float64 problems computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signsgd.loop import Callback, Loop, StepOutput, cross_entropy


class Events(Callback):
    """Records every event; stops the loop after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[tuple[str, int]] = []
        self.stop_at = stop_at

    def before_step(self, loop, step):
        self.seen.append(("before", step))

    def on_step(self, loop, out):
        self.seen.append(("step", out.step))
        if out.step == self.stop_at:
            loop.stop()

    def on_eval(self, loop, step):
        self.seen.append(("eval", step))

    def on_checkpoint(self, loop, step):
        self.seen.append(("checkpoint", step))


def _square(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Loss ½‖w − x‖²: its gradient is ``w − x``."""
    w = model.weight
    return 0.5 * ((w - x) ** 2).sum(), 0.0, 1.0


def _model(values: list[float]) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    return m


@pytest.mark.parametrize("steps, eval_every, checkpoint_every, stop_at, expected", [
    (3, 0, 0, None, "b0 s1 b1 s2 b2 s3"),
    (3, 2, 0, None, "b0 s1 b1 s2 e2 c2 b2 s3 e3 c3"),
    (4, 0, 3, None, "b0 s1 b1 s2 b2 s3 c3 b3 s4"),
    (5, 2, 0, 3, "b0 s1 b1 s2 e2 c2 b2 s3"),
    (4, 2, 0, 2, "b0 s1 b1 s2 e2 c2"),  # stopped in on_step: that step's events still run
])
def test_events_in_order(steps, eval_every, checkpoint_every, stop_at, expected):
    model = _model([0.0])
    events = Events(stop_at)
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), _square, callbacks=[events])
    done = loop.run(lambda s: (torch.ones(1, dtype=torch.float64), None), steps,
                    eval_every=eval_every, checkpoint_every=checkpoint_every)
    short = {"before": "b", "step": "s", "eval": "e", "checkpoint": "c"}
    assert " ".join(f"{short[k]}{v}" for k, v in events.seen) == expected
    assert done == loop.step == (stop_at or steps)


def test_the_trajectory_with_a_schedule_and_clipping_in_float64():
    """w ← w − lr·f(s)·clip(w − x): x = 0, w₀ = (3, 4), lr 0.5, f = (1, 0.5, 0.25),
    clip to norm 1 (the gradient's norm is 5, then 4.5, then 4.25)."""
    model = _model([3.0, 4.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loop = Loop(model, opt, _square, schedule=lambda s: 0.5 ** s, grad_clip=1.0)
    outs: list[StepOutput] = []
    for _ in range(3):
        outs.append(loop.train_step(torch.zeros(2, dtype=torch.float64), None))
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    for s in range(3):  # by hand: the gradient w times torch's clip factor 1 / (‖w‖ + 1e-6)
        w = w - 0.5 * 0.5 ** s * (w * (1.0 / (w.norm() + 1e-6)))
    assert torch.equal(model.weight.detach(), w)
    assert [o.lr for o in outs] == [0.5, 0.25, 0.125]
    assert [o.step for o in outs] == [1, 2, 3]
    assert outs[0].loss == 12.5 and outs[0].comm.bytes_sent == 0


class Outer(torch.optim.SGD):
    """An optimiser with an outer optimiser and a ``synchronise`` (as LocalSteps)."""

    def __init__(self, params):
        params = list(params)
        super().__init__(params, lr=0.1)
        self.outer_optimizer = torch.optim.SGD(params, lr=0.7)
        self.synchronised = 0

    def synchronise(self):
        self.synchronised += 1


def test_the_outer_optimiser_follows_the_schedule_and_the_last_step_synchronises():
    model = _model([1.0])
    opt = Outer(model.parameters())
    loop = Loop(model, opt, _square, schedule=lambda s: 1.0 / (s + 1))
    loop.run(lambda s: (torch.zeros(1, dtype=torch.float64), None), 3)
    assert opt.synchronised == 1  # after the last step only
    assert len(loop.schedulers) == 2
    assert opt.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.7 / 4)
    state = loop.schedulers[0].state_dict()
    resumed = Loop(model, Outer(model.parameters()), _square, schedule=lambda s: 1.0)
    resumed.load_schedule(state)
    assert [s.last_epoch for s in resumed.schedulers] == [3, 3]


def test_the_clock_times_each_step():
    model = _model([1.0])
    ticks: list[int] = []

    def clock(op):
        op()
        ticks.append(1)
        return 0.25

    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), _square, clock=clock)
    loop.run(lambda s: (torch.zeros(1, dtype=torch.float64), None), 4)
    assert ticks == [1] * 4 and loop.train_seconds == 1.0


def test_a_failing_step_propagates_and_counts_only_completed_steps():
    model = _model([1.0])

    def objective(m, x, y):
        if x.item() == 2:
            raise FloatingPointError("step 2 fails")
        return _square(m, x, y)

    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), objective)
    with pytest.raises(FloatingPointError, match="step 2 fails"):
        loop.run(lambda s: (torch.tensor([float(s)], dtype=torch.float64), None), 5)
    assert loop.step == 2


def test_cross_entropy_counts_the_correct_predictions():
    loss, correct, count = cross_entropy(nn.Identity(), torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
                                         torch.tensor([0, 0]))
    assert (correct, count) == (1.0, 2.0)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(
        torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])).item())
