"""AverageGradients and LocalSteps in one process: the wrapped optimiser's step, its state in
checkpoints, and an LR scheduler that keeps driving it after ``load_state_dict``."""

from __future__ import annotations

import copy

import pytest
import torch

import signsgd
from signsgd.distributed import AverageGradients, LocalSteps

WRAPPERS = {
    "average": lambda ps: AverageGradients(torch.optim.AdamW(ps, lr=0.1)),
    "local": lambda ps: LocalSteps(torch.optim.AdamW(ps, lr=0.1), sync_every=2, outer_lr=0.1),
    "local-lion": lambda ps: LocalSteps(signsgd.Lion(ps, lr=0.1), sync_every=3, outer_lr=0.05,
                                        outer_momentum=0.5),
}


def _run(opt, p, steps, sched=None):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_scheduler_drives_the_wrapped_optimiser_after_load_state_dict(name):
    p = torch.nn.Parameter(torch.ones(4))
    opt = WRAPPERS[name]([p])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _run(opt, p, 2, sched)
    # state_dict() returns live tensors (as torch.optim does): copy it, as a checkpoint would
    saved, sched_saved = copy.deepcopy(opt.state_dict()), sched.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = WRAPPERS[name]([q])
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh, step_size=1, gamma=0.5)
    fresh.load_state_dict(saved)
    fresh_sched.load_state_dict(sched_saved)
    _run(opt, p, 3, sched)
    _run(fresh, q, 3, fresh_sched)
    inner = fresh.optimizer.param_groups[0]["lr"]
    assert inner == fresh.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"]
    assert torch.equal(p, q)


@pytest.mark.parametrize("bad,needle", [
    (dict(sync_every=0), "sync_every"), (dict(outer_lr=0.0), "outer_lr"),
    (dict(outer_momentum=1.0), "outer_momentum"), (dict(outer_lr=float("nan")), "outer_lr"),
])
def test_local_steps_validates_its_hyper_parameters(bad, needle):
    p = torch.nn.Parameter(torch.ones(2))
    kwargs = {"sync_every": 2, "outer_lr": 0.1, **bad}
    with pytest.raises(ValueError, match=needle):
        LocalSteps(torch.optim.SGD([p], lr=0.1), **kwargs)


def test_local_steps_refuses_an_inner_optimiser_that_communicates():
    from signsgd.distributed import MajorityVote

    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="must be local"):
        LocalSteps(signsgd.Signum([p], lr=0.1, aggregator=MajorityVote()), 2, 0.1)


@pytest.mark.parametrize("factors", [(1.0, 1.0), (0.5, 0.25), (0.0, 1.0)])
def test_the_outer_step_follows_the_learning_rate_schedule(factors):
    """Round r's outer step is outer_lr · lr_r / lr_0 (one process: the vote of one rank is
    sign(x0 − x), zero → +1), computed by hand in float64."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    opt = LocalSteps(torch.optim.SGD([p], lr=0.2), sync_every=2, outer_lr=0.125)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < 2 else factors[0] if s < 4 else factors[1])
    x0 = p.detach().clone()
    grads = [[1.0, -2.0, 0.0], [0.5, 0.5, -1.0], [-1.0, 0.0, 2.0], [0.0, 1.0, 1.0],
             [1.0, 1.0, 1.0], [-2.0, 0.5, 0.0]]
    for r in range(3):
        lr = 0.2 * (1.0, *factors)[r]
        x = x0.clone()
        for t in range(2):
            g = torch.tensor(grads[2 * r + t], dtype=torch.float64)
            x -= lr * g
            p.grad = g.clone()
            opt.step()
            sched.step()
        vote = torch.where(x0 - x >= 0, 1.0, -1.0).to(torch.float64)
        x0 = x0 - 0.125 * (1.0, *factors)[r] * vote
        assert torch.equal(p.detach(), x0)
