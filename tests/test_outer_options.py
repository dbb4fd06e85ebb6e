"""The trainer's local-steps outer options (``--outer-optimizer``, ``--outer-reducer``,
``--outer-lr``, ``--outer-momentum``): what each builds, their defaults, and the
combinations that are refused before any worker starts."""

from __future__ import annotations

import pytest
import torch

from signsgd.config import TrainConfig, validate
from signsgd.distributed import (
    AllReduce,
    ErrorFeedbackAllReduce,
    LocalSteps,
    MajorityVote,
    QuantizedMean,
)
from signsgd.errors import ConfigError
from signsgd.outer import DampedMomentum
from signsgd.registry import local_steps
from signsgd.train import _local_spec


def _config(**kw) -> TrainConfig:
    return validate(TrainConfig(workers=2, sync_every=4, lr=0.01, optimizer="adamw", **kw))


@pytest.mark.parametrize("outer_reducer,kind", [
    ("vote", MajorityVote), ("ef", ErrorFeedbackAllReduce), ("mean", AllReduce),
    ("bf16", QuantizedMean), ("int8", QuantizedMean)])
@pytest.mark.parametrize("outer_optimizer,lr,momentum,expected", [
    ("sign-momentum", None, None, (DampedMomentum, 0.01, 0.0)),
    ("sign-momentum", 0.05, 0.5, (DampedMomentum, 0.05, 0.5)),
    ("nesterov", None, None, (torch.optim.SGD, 0.7, 0.9)),
    ("nesterov", 0.4, 0.8, (torch.optim.SGD, 0.4, 0.8)),
])
def test_each_outer_option_builds_its_reducer_and_optimiser(outer_reducer, kind,
                                                            outer_optimizer, lr, momentum,
                                                            expected):
    c = _config(outer_reducer=outer_reducer, outer_optimizer=outer_optimizer, outer_lr=lr,
                outer_momentum=momentum)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = local_steps(torch.optim.AdamW([p], lr=0.01), _local_spec(c))
    assert isinstance(opt, LocalSteps) and opt.sync_every == 4
    assert isinstance(opt.reducer, kind)
    cls, want_lr, want_momentum = expected
    group = opt.outer_optimizer.param_groups[0]
    assert type(opt.outer_optimizer) is cls
    assert (group["lr"], group["momentum"]) == (want_lr, want_momentum)
    assert group.get("nesterov", False) == (outer_optimizer == "nesterov")
    if outer_reducer in ("bf16", "int8"):
        assert opt.reducer.precision == outer_reducer


@pytest.mark.parametrize("kw,needle", [
    (dict(sync_every=1, outer_optimizer="nesterov"), "--outer-optimizer set the outer step"),
    (dict(sync_every=1, outer_reducer="int8", outer_lr=0.1),
     "--outer-lr, --outer-reducer set the outer step"),
    (dict(outer_optimizer="nesterov", outer_momentum=0.0), "needs --outer-momentum > 0"),
    (dict(outer_reducer="int4"), "unknown outer reducer 'int4'; valid outer reducers: vote"),
    (dict(outer_optimizer="adam"), "unknown outer optimizer 'adam'"),
    (dict(outer_reducer="bf16", adversaries=1), "--adversaries needs --outer-reducer vote"),
    (dict(outer_momentum=1.0), "--outer-momentum must be"),
])
def test_outer_options_that_make_no_sense_are_refused(kw, needle):
    base = dict(workers=2, sync_every=4, lr=0.01, optimizer="adamw")
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        validate(TrainConfig(**{**base, **kw}))


def test_a_diloco_run_with_the_int8_mean_trains_and_saves_every_rank_alike(tmp_path):
    """2 Gloo workers, inner AdamW, H = 2 over 5 steps (a partial last round), outer
    Nesterov SGD on the int8 mean: the checkpoint's ranks all hold the saved model."""
    from datafiles import write_random_fashion_mnist
    from signsgd import checkpoint
    from signsgd.train import train

    root = write_random_fashion_mnist(tmp_path / "data", 64, 32, seed=0)
    c = TrainConfig(data="fashion-mnist", data_dir=str(root), model="mlp", optimizer="adamw",
                    lr=1e-3, batch_size=16, steps=5, log_every=5, out=str(tmp_path / "run"),
                    progress=False, threads=1, workers=2, sync_every=2,
                    outer_optimizer="nesterov", outer_reducer="int8")
    summary = train(c)
    assert summary["bytes_sent_per_step"] > 0
    ck = checkpoint.read(tmp_path / "run" / "checkpoint.pt")
    saved = list(ck["model"].values())
    for part in ck["ranks"]:
        local = part["optimizer"]
        assert local["outer_optimizer"]["param_groups"][0]["nesterov"] is True
        assert all(torch.equal(a, b) for a, b in zip(local["outer"]["anchor"], saved))


def test_an_evaluation_mid_round_is_of_the_anchor(tmp_path):
    """--eval-every 2 with rounds of 3: the evaluation at step 2 is of x0 — before the first
    synchronisation, the initial model — on every rank, not a mix of the ranks' models."""
    from signsgd.outputs import read_metrics
    from signsgd.tasks import make_task
    from signsgd.train import train

    text = tmp_path / "t.txt"
    text.write_text("".join(chr(97 + (i * 7) % 23) for i in range(6000)))
    c = TrainConfig(data=f"text:{text}", model="gpt", n_layer=1, d_model=16, n_head=2,
                    block_size=16, optimizer="adamw", lr=1e-2, batch_size=4, steps=4,
                    eval_every=2, eval_batches=2, log_every=4, out=str(tmp_path / "run"),
                    progress=False, threads=1, workers=2, sync_every=3)
    train(c)
    (first, *_) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                   if r["kind"] == "eval"]
    assert first["step"] == 2
    task = make_task(validate(c))
    torch.manual_seed(c.seed)
    held = task.evaluate(task.model(), 0, 1)
    assert first["val_loss"] == pytest.approx(held["val_loss"], rel=1e-6)
