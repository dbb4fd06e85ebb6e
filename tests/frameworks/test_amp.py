"""AMP with signsgd: GradScaler skips an overflowing step (parameters and state unchanged,
the scale halves) and otherwise equals training without it; bf16 autocast keeps fp32
master weights; across 3 Gloo ranks, ``no_sync()`` accumulation with the majority-vote hook
equals ``Signum(aggregator=MajorityVote())``, and the GradScaler recipes for the
aggregator and the hook skip an inf on one rank together on every rank.

3 ranks, not 2: with an odd number of ranks a vote never ties, so the hook (which votes
DDP's buckets, in reverse parameter order) and the optimiser path agree bit for bit; with
2 they break ties at different coordinates (docs/frameworks.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import signsgd
from signsgd.distributed.launch import spawn

from . import amp_workers as W

OPTIMISERS = {
    "signsgd": lambda p: signsgd.SignSGD(p, lr=0.01),
    "signum": lambda p: signsgd.Signum(p, lr=0.01, momentum=0.9, weight_decay=1e-3),
    "lion": lambda p: signsgd.Lion(p, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1),
    "efsgd": lambda p: signsgd.EFSGD(p, lr=0.01, momentum=0.9),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four batches; the third overflows (an inf input, as an fp16 overflow would)."""
    out = [W.batch(0, step) for step in range(4)]
    out[2][0][0, 0] = float("inf")
    return out


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_grad_scaler_skips_the_inf_step_and_otherwise_equals_no_scaler(name):
    model, ref = W.net(), W.net()
    opt, plain = OPTIMISERS[name](model.parameters()), OPTIMISERS[name](ref.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for step, (x, y) in enumerate(_batches()):
        before, state, scale = W.snapshot(model), copy.deepcopy(opt.state_dict()), \
            scaler.get_scale()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:  # skipped: nothing changed, the scale halved
            assert W.same(before, W.snapshot(model)), name
            assert W.same_state(state, opt.state_dict()), name
            assert scaler.get_scale() == scale * 0.5
            continue
        assert scaler.get_scale() == scale
        nn.functional.mse_loss(ref(x), y).backward()  # the reference skips the bad batch
        plain.step()
        plain.zero_grad()
        # power-of-two scaling and unscaling are exact: the same bits as without a scaler
        assert W.same(W.snapshot(model), W.snapshot(ref)), (name, step)


def test_bf16_autocast_keeps_fp32_master_weights_and_steps_by_lr():
    model, lr = W.net(), 0.01
    opt = signsgd.SignSGD(model.parameters(), lr=lr)
    x, y = W.batch(0, 0)
    before = W.snapshot(model)
    W.loss_of(model, x, y).backward()  # forward under torch.autocast("cpu", bfloat16)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for b, g, p in zip(before, grads, model.parameters()):
        assert p.dtype == g.dtype == torch.float32
        assert torch.equal(p.detach(), b.add(g.sign(), alpha=-lr))


@pytest.mark.parametrize(("dtype", "moves"), [(torch.float32, True), (torch.bfloat16, False)])
def test_a_sign_step_below_half_an_ulp_is_lost_in_bf16_weights(dtype, moves):
    # Why the recipes keep fp32 weights under autocast: every coordinate moves by exactly
    # lr, and 1e-3 is below half of bf16's spacing at 1.0 (2**-7).
    w = nn.Parameter(torch.ones(4, dtype=dtype))
    opt = signsgd.Signum([w], lr=1e-3, momentum=0.9)
    w.grad = torch.ones_like(w)
    opt.step()
    assert bool((w.detach() != 1).all()) is moves


@pytest.fixture(scope="module")
def distributed():
    return spawn(W.cases, 3, timeout=120, pg_timeout=60)


def test_no_sync_accumulation_with_the_hook_equals_the_voting_optimiser(distributed):
    for rank, res in enumerate(distributed):
        got = res["accumulation"]
        assert W.same(got["hook"], got["optimiser"]), rank
        assert W.same(got["hook"], distributed[0]["accumulation"]["hook"]), rank


@pytest.mark.parametrize("recipe", ["scaler_with_aggregator", "scaler_with_hook"])
def test_an_inf_on_one_rank_is_skipped_on_every_rank(distributed, recipe):
    for rank, res in enumerate(distributed):
        got = res[recipe]
        assert got["unchanged"] is True, (recipe, rank)
        assert got["scales"] == [1024.0, 512.0, 512.0, 512.0], (recipe, rank)
        assert W.same(got["params"], distributed[0][recipe]["params"]), (recipe, rank)
    if recipe == "scaler_with_aggregator":
        assert all(res[recipe]["skipped"] == [W.BAD_STEP] for res in distributed)
        assert all(W.same(res[recipe]["params"], res[recipe]["reference"])
                   for res in distributed)
    else:  # backward() raised on every rank, with the hook's error in the message
        assert all(res[recipe]["errors"] == [(W.BAD_STEP, True)] for res in distributed)
        assert all(res[recipe]["hook_steps"] == W.STEPS - 1 for res in distributed)
