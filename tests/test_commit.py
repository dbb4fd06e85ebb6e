"""The two-phase commit between an optimiser and its reducer, in one process: a reduction
changes its reducer only when the caller commits it, and an optimiser commits its own state
and the reducer's in one place, after its update; a step that fails commits nothing."""

from __future__ import annotations

import pytest
import torch

import signsgd
from signsgd.compression import ScaledSign
from signsgd.distributed import AllReduce, ErrorFeedbackAllReduce, MajorityVote, OneBitAllReduce
from signsgd.optim import Plan

D = torch.float64


def test_reduce_commit_false_changes_nothing_until_commit():
    r = AllReduce()
    red = r.reduce([torch.ones(3)], commit=False)
    assert (r.step, r.total_bytes_sent, r.timings) == (0, 0, {})
    assert red.update[0].tolist() == [1.0, 1.0, 1.0]
    red.commit()
    red.commit()  # once only
    assert r.step == 1 and red.pending is None and set(r.timings)


def test_a_stale_reduction_is_refused():
    r = MajorityVote()
    first = r.reduce([torch.ones(2)], commit=False)
    r.reduce([torch.ones(2)])  # committed: step 1
    with pytest.raises(RuntimeError, match="reduction of step 0 committed at step 1"):
        first.commit()
    assert r.step == 1


def test_onebit_reducer_reports_its_last_reducer_only_on_commit():
    r = OneBitAllReduce()
    r.reduce([torch.ones(2)], compressor=ScaledSign())
    assert r.last is r.mean  # one process: the exact mean
    red = r.reduce([torch.ones(2)], commit=False)
    assert r.mean.step == 1
    red.commit()
    assert r.mean.step == 2 and r.last is r.mean


@pytest.mark.parametrize("make,reducer", [
    (lambda ps, agg: signsgd.EFSGD(ps, lr=0.5, momentum=0.5, aggregator=agg),
     ErrorFeedbackAllReduce),
    (lambda ps, agg: signsgd.Signum(ps, lr=0.5, momentum=0.5, aggregator=agg), AllReduce),
    (lambda ps, agg: signsgd.Lion(ps, lr=0.5, aggregator=agg), MajorityVote),
], ids=["efsgd", "signum", "lion"])
def test_a_step_that_fails_after_its_reduction_commits_no_reducer_state(make, reducer,
                                                                        monkeypatch):
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=D))
    agg = reducer()
    opt = make([x], agg)
    x.grad = torch.tensor([1.0, 1.0, -1.0], dtype=D)
    opt.step()
    before = (agg.step, agg.total_bytes_sent, dict(agg.state_dict()))

    def fail(*args: object) -> None:
        raise RuntimeError("update failed")

    monkeypatch.setattr(type(opt), "_update", fail)
    with pytest.raises(RuntimeError, match="update failed"):
        opt.step()
    assert (agg.step, agg.total_bytes_sent) == before[:2]
    assert agg.state_dict() == before[2]


def test_plan_holds_what_the_commit_writes():
    x = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=D))
    opt = signsgd.EFSGD([x], lr=1.0, momentum=0.5, aggregator=AllReduce())
    g = torch.tensor([2.0, 0.0], dtype=D)
    plan = opt._transform(opt.param_groups[0], [x], [g])
    assert isinstance(plan, Plan) and plan.params == [x]
    assert plan.sends[0].tolist() == [2.0, 0.0]  # p = lr·m' + e, m' = g
    assert len(plan.errors) == 1 and len(plan.momenta) == 1 and len(plan.fresh) == 2
    assert len(opt.state) == 0  # nothing is state before the commit


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_efsgd_local_step_equals_its_staged_step(foreach, nesterov):
    """The fused kernel (F.ef_sgd) and the staged path (transform → reduce → commit, with
    the one-process EF all-reduce) are one function: bit-identical."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=gen, dtype=D) for n in (5, 1, 7)]
    a = [torch.nn.Parameter(t.clone()) for t in xs]
    b = [torch.nn.Parameter(t.clone()) for t in xs]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, foreach=foreach, nesterov=nesterov)
    local = signsgd.EFSGD(a, **kw)
    staged = signsgd.EFSGD(b, aggregator=ErrorFeedbackAllReduce(), **kw)
    for _ in range(4):
        gs = [torch.randn(t.shape, generator=gen, dtype=D) for t in xs]
        for ps, opt in ((a, local), (b, staged)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in ("error", "momentum_buffer"):
            assert torch.equal(local.state[p][key], staged.state[q][key])
