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


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # outer: at syncs
@pytest.mark.parametrize("factors", [(1.0, 1.0), (0.5, 0.25), (0.0, 1.0)])
def test_the_outer_step_follows_the_learning_rate_schedule(factors):
    """With the same LambdaLR on the wrapper and on its outer optimiser, round r's outer
    step is outer_lr · factor_r (one process: the vote of one rank is sign(x0 − x), zero →
    +1), computed by hand in float64."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    opt = LocalSteps(torch.optim.SGD([p], lr=0.2), sync_every=2, outer_lr=0.125)

    def factor(s: int) -> float:
        return 1.0 if s < 2 else factors[0] if s < 4 else factors[1]

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt, opt.outer_optimizer)]
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
            for sched in scheds:
                sched.step()
        vote = torch.where(x0 - x >= 0, 1.0, -1.0).to(torch.float64)
        x0 = x0 - 0.125 * (1.0, *factors)[r] * vote
        assert torch.equal(p.detach(), x0)


def _two_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5])),
            torch.nn.Parameter(torch.full((2,), 4.0))]


def _nesterov_local(ps: list[torch.nn.Parameter]) -> LocalSteps:
    return LocalSteps(torch.optim.AdamW(ps, lr=0.1), sync_every=2,
                      outer_optimizer=torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True))


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: __import__("pickle").loads(__import__("pickle").dumps(obj)),
    "torch.save": lambda obj: _torch_round_trip(obj),
}


def _torch_round_trip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("build", [WRAPPERS["local"], _nesterov_local])
def test_a_copied_local_steps_steps_like_the_original(how, build):
    """deepcopy, pickle and torch.save of a LocalSteps mid-round (with its model) give an
    object whose next steps equal the original's."""
    ps = _two_params()
    opt = build(ps)
    _run_all(opt, ps, 3)
    ps2, opt2 = COPIES[how]((ps, opt))
    _run_all(opt, ps, 3, seed=1)
    _run_all(opt2, ps2, 3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


def _run_all(opt, ps, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_local_steps_runs_the_four_state_dict_hooks():
    ps = _two_params()
    opt = WRAPPERS["local"](ps)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1} if calls.append(
        "save-post") is None and "tag" not in sd else None)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre") or
                                          {k: v for k, v in sd.items() if k != "tag"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    sd = opt.state_dict()
    assert sd["tag"] == 1
    opt.load_state_dict(sd)
    assert calls == ["save-pre", "save-post", "load-pre", "load-post"]


def test_a_parameter_without_a_gradient_is_left_alone_in_one_process():
    ps = _two_params()
    opt = LocalSteps(torch.optim.SGD(ps, lr=0.1), sync_every=2, outer_lr=0.25)
    for _ in range(4):
        ps[0].grad = torch.ones(3)
        opt.step()
    assert torch.equal(ps[1].detach(), torch.full((2,), 4.0))
    assert torch.equal(ps[0].detach(), torch.tensor([0.5, -2.5, 0.0]))  # two votes of +1


def test_synchronise_ends_a_partial_round_and_is_a_no_op_at_a_boundary():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LocalSteps(torch.optim.SGD([p], lr=0.5), sync_every=4, outer_lr=0.25)
    p.grad = torch.tensor([1.0, -2.0])
    opt.step()
    assert opt.position == 1 and opt.bytes_sent == 0
    assert opt.synchronise()
    assert opt.position == 0 and torch.equal(p.detach(), torch.tensor([0.75, -0.75]))
    assert torch.equal(opt.anchor[0], p.detach())
    assert not opt.synchronise()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(), "needs outer_lr"),
    (dict(outer_lr=0.1, outer_optimizer="sgd"), "must be a torch.optim.Optimizer"),
    (dict(outer_lr=0.1, outer_optimizer=True), "must be a torch.optim.Optimizer"),
])
def test_local_steps_outer_arguments_are_checked(kwargs, needle):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises((ValueError, TypeError), match=needle):
        LocalSteps(torch.optim.SGD([p], lr=0.1), 2, **kwargs)


def test_an_outer_optimizer_needs_the_same_parameters_and_its_own_lr():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="same parameters"):
        LocalSteps(inner, 2, outer_optimizer=torch.optim.SGD([q], lr=0.7))
    with pytest.raises(ValueError, match="give outer_lr"):
        LocalSteps(inner, 2, outer_lr=0.5, outer_optimizer=torch.optim.SGD([p], lr=0.7))
    with pytest.raises(ValueError, match="must be local"):
        LocalSteps(inner, 2, outer_optimizer=signsgd.Signum(
            [p], lr=0.1, aggregator=signsgd.distributed.MajorityVote()))


def test_a_group_for_an_injected_outer_optimiser_must_be_added_there_first():
    ps = _two_params()
    opt = _nesterov_local(ps[:1])
    with pytest.raises(ValueError, match="outer_optimizer first"):
        opt.add_param_group({"params": [ps[1]]})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 1  # nothing changed
    opt.outer_optimizer.add_param_group({"params": [ps[1]]})
    opt.add_param_group({"params": [ps[1]]})
    assert len(opt.optimizer.param_groups) == 2 and len(opt.anchor) == 2
