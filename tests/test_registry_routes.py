"""The registry's routes: the named reducers and local steps as a modifier.

Each route is checked against the construction it replaced (the trainer's ``_local_steps``,
the experiments' and the benchmarks' hand-built ``LocalSteps``, the old four-argument
reducer factories, copied here as they were): the same objects, the same settings digest,
and bit-identical parameters over two rounds.
"""

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from signsgd import registry
from signsgd.config import OUTER_OPTIMIZERS, OUTER_REDUCERS, TrainConfig, validate
from signsgd.distributed import (
    AllReduce,
    ErrorFeedbackAllReduce,
    LocalSteps,
    MajorityVote,
    OneBitAllReduce,
    QuantizedMean,
)
from signsgd.distributed.adversary import attack
from signsgd.errors import ConfigError
from signsgd.reduction import hyperparameters


# ------------------------------------------------------------------ the old constructions
def _old_reducer(name: str, group: Any, adversary: Any, vote: str, seed: int) -> Any:
    return {"vote": lambda: MajorityVote(group, vote, seed=seed, adversary=adversary),
            "ef": lambda: ErrorFeedbackAllReduce(group, adversary=adversary),
            "onebit": lambda: OneBitAllReduce(group, adversary),
            "mean": lambda: AllReduce(group, adversary)}[name]()


def _old_train_local_steps(c: TrainConfig, inner: torch.optim.Optimizer, adversary: Any
                           ) -> LocalSteps:
    """train.py's ``_local_steps`` before the registry described local steps."""
    reducer = {"vote": lambda: MajorityVote(mode=c.vote, seed=c.seed, adversary=adversary),
               "ef": lambda: ErrorFeedbackAllReduce(adversary=adversary),
               "mean": lambda: AllReduce(adversary=adversary),
               "bf16": lambda: QuantizedMean("bf16"),
               "int8": lambda: QuantizedMean("int8")}[c.outer_reducer]()
    if c.outer_optimizer == "nesterov":
        params = [p for g in inner.param_groups for p in g["params"]]
        momentum = 0.9 if c.outer_momentum is None else float(c.outer_momentum)
        outer = torch.optim.SGD(params, lr=0.7 if c.outer_lr is None else float(c.outer_lr),
                                momentum=momentum, nesterov=True)
        return LocalSteps(inner, c.sync_every, reducer=reducer, outer_optimizer=outer)
    return LocalSteps(inner, c.sync_every, float(c.lr if c.outer_lr is None else c.outer_lr),
                      float(c.outer_momentum or 0.0), reducer)


def _reducer_config(r: Any) -> tuple[Any, ...]:
    out: tuple[Any, ...] = (type(r).__name__, r.group, type(r.adversary).__name__)
    if isinstance(r, MajorityVote):
        out += (r.mode, r.tie_seed, r.bucket_bytes)
    if isinstance(r, QuantizedMean):
        out += (r.precision, r.block)
    return out


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    return [nn.Parameter(torch.randn(6, 3, generator=g, dtype=torch.float64)),
            nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))]


def _run(opt: torch.optim.Optimizer, ps: list[nn.Parameter], steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in ps]


def _same_local_steps(old: LocalSteps, new: Any) -> None:
    assert type(new) is LocalSteps and new.sync_every == old.sync_every
    assert _reducer_config(new.reducer) == _reducer_config(old.reducer)
    assert type(new.outer_optimizer) is type(old.outer_optimizer)
    assert hyperparameters(new.outer_optimizer.param_groups) == \
        hyperparameters(old.outer_optimizer.param_groups)
    assert new._settings() == old._settings()  # the settings digest of a synchronisation
    assert repr(new) == repr(old)


# ------------------------------------------------------------------ the trainer
TRAINER_CASES = [
    *({"outer_optimizer": o, "outer_reducer": r}
      for o, r in itertools.product(OUTER_OPTIMIZERS, OUTER_REDUCERS)),
    {"outer_lr": 0.3, "outer_momentum": 0.5},
    {"outer_optimizer": "nesterov", "outer_lr": 0.5, "outer_momentum": 0.8},
    {"optimizer": "adamw", "lr": 0.01, "outer_reducer": "ef", "vote": "allgather", "seed": 3},
    {"optimizer": "lion", "outer_reducer": "vote", "vote": "allgather", "seed": 5},
]


@pytest.mark.parametrize("case", TRAINER_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_the_trainer_builds_the_local_steps_it_built_by_hand(case: dict[str, Any]) -> None:
    from signsgd.train import _make_optimizer

    c = validate(TrainConfig(sync_every=2, workers=2, **case))
    model = nn.Linear(3, 2).double()
    torch.manual_seed(0)
    old_model = nn.Linear(3, 2).double()
    old_model.load_state_dict(model.state_dict())
    new = _make_optimizer(c, model, rank=0, world=2, total=10)
    hp = {"lr": float(c.lr)}
    hp.update({"momentum": float(c.momentum)} if c.optimizer == "signum" else {})
    hp.update({"betas": tuple(map(float, c.betas or (c.momentum, registry.METHODS[
        c.optimizer].defaults["betas"][1])))} if "betas" in registry.METHODS[
        c.optimizer].defaults else {})
    hp.update({"weight_decay": 0.0})
    old = _old_train_local_steps(
        c, registry.build(c.optimizer, list(old_model.parameters()), **hp), None)
    _same_local_steps(old, new)
    new_p = _run(new, list(model.parameters()), 5)
    old_p = _run(old, list(old_model.parameters()), 5)
    assert all(torch.equal(a, b) for a, b in zip(new_p, old_p))


def test_the_trainer_gives_the_adversary_to_the_outer_reducer() -> None:
    from signsgd.train import _make_optimizer

    c = validate(TrainConfig(sync_every=2, workers=2, adversaries=1, attack="random",
                             outer_reducer="ef"))
    opt: Any = _make_optimizer(c, nn.Linear(3, 2), rank=1, world=2, total=10)
    assert type(opt.reducer.adversary).__name__ == type(attack("random", seed=1)).__name__


# ------------------------------------------------------------------ experiments, benchmarks
@pytest.mark.parametrize("method,momentum", [("signum", 0.9), ("signsgd", None)])
def test_the_experiments_and_benchmarks_local_steps_are_the_registrys(
        method: str, momentum: float | None) -> None:
    adversary = attack("negate", seed=1001)
    for outer_lr, outer_momentum, adv, seed in ((0.01, 0.0, None, 0), (0.02, 0.5, adversary, 4)):
        ps_old, ps_new = _params(), _params()
        old = LocalSteps(registry.build(method, ps_old, lr=1e-3, momentum=momentum), 3,
                         outer_lr, outer_momentum,
                         MajorityVote(None, seed=seed, adversary=adv))
        new = registry.build(method, ps_new, world_size=3, adversary=adv, seed=seed, lr=1e-3,
                             momentum=momentum, local=registry.LocalSpec(
                                 3, lr=outer_lr, momentum=outer_momentum))
        _same_local_steps(old, new)
        assert all(torch.equal(a, b) for a, b in zip(_run(old, ps_old, 7), _run(new, ps_new, 7)))


def test_an_outer_lr_of_zero_is_refused_as_before() -> None:
    with pytest.raises(ValueError, match="Invalid outer_lr: 0.0"):
        registry.build("signum", _params(), local=registry.LocalSpec(2, lr=0.0))


# ------------------------------------------------------------------ reducers, names
@pytest.mark.parametrize("name", ["vote", "ef", "onebit", "mean"])
def test_the_named_reducers_are_the_old_factories(name: str) -> None:
    adv = attack("negate", seed=3)
    for group, adversary, vote, seed in ((None, None, "sharded", 0), (None, adv, "allgather", 7)):
        old = _old_reducer(name, group, adversary, vote, seed)
        new = registry.reducer(name, registry.CommSpec(group, adversary, vote, seed))
        if name == "onebit":
            old, new = old.ef, new.ef
        assert _reducer_config(new) == _reducer_config(old)


def test_every_method_names_a_registered_reducer() -> None:
    assert {m.reducer for m in registry.METHODS.values()} <= set(registry.REDUCERS)
    assert set(OUTER_REDUCERS) <= set(registry.REDUCERS)
    assert OUTER_OPTIMIZERS == ("sign-momentum", "nesterov")


@pytest.mark.parametrize("spec,needle", [
    (registry.LocalSpec(2, optimizer="adam"), "unknown outer optimizer 'adam'"),
    (registry.LocalSpec(2, reducer="onebit"), "unknown outer reducer 'onebit'"),
])
def test_unknown_outer_names_are_refused_with_the_valid_ones(spec: registry.LocalSpec,
                                                             needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        registry.build("signum", _params(), local=spec)


def test_a_quantized_reducer_refuses_an_adversary() -> None:
    with pytest.raises(ConfigError, match="no Byzantine model"):
        registry.reducer("int8", registry.CommSpec(adversary=attack("negate", seed=0)))
    with pytest.raises(ConfigError, match="unknown reducer"):
        registry.reducer("nope")


def test_local_spec_resolves_its_defaults_once() -> None:
    assert registry.LocalSpec(4).resolved(0.02) == registry.LocalSpec(4, lr=0.02, momentum=0.0)
    assert registry.LocalSpec(4, "nesterov", lr=0.3).resolved(0.02).momentum == 0.9
    spec = registry.LocalSpec(4, "nesterov").resolved(1.0)
    assert spec.resolved(5.0) == spec
