"""Conformance with ``torch.optim``: the generic contract of torch's own optimizer tests,
checked over every optimiser this library ships, one row each in :data:`ROWS`.

Written from torch's documented behaviour (``torch.optim.Optimizer``, ``torch.optim.
lr_scheduler``), not from torch's test file. Single process, tiny tensors, a few steps.
Adding an optimiser is one :class:`Row`; :func:`test_every_optimiser_has_a_row` fails until
every ``Optimizer`` class that ``signsgd``, ``signsgd.distributed`` or the registry hands
out has one.

Where we differ from torch on purpose (docs/design.md, "Differences from torch.optim"),
the case is skipped with the reason: a vote sends a zero as +1, so zero gradients move the
parameters of a voting optimiser.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.optim import Optimizer, lr_scheduler
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import signsgd
from signsgd import registry
from signsgd.compression import Identity, RandomK, ScaledSign, TopK
from signsgd.distributed import (
    AllReduce,
    AverageGradients,
    ErrorFeedbackAllReduce,
    LocalSteps,
    MajorityVote,
)
from signsgd.distributed.wrapper import Wrapper
from signsgd.optim import StagedOptimizer
from signsgd.outer import DampedMomentum

LR, LR2 = 0.01, 0.005       # the first and the second param group's learning rates
VOTE_ZERO = "a vote sends a zero as +1 (docs/design.md): zero gradients move the parameters"


# ----------------------------------------------------------------------------- the table
def _local_steps(inner: type[Optimizer], **outer: Any) -> Callable[..., Optimizer]:
    """LocalSteps over ``inner``: the wrapper's keywords go to the wrapper, the rest inward."""
    def make(params: Any, sync_every: int = 2, outer_lr: float = 0.05,
             outer_momentum: float = outer.get("outer_momentum", 0.0), **hp: Any) -> Optimizer:
        return LocalSteps(inner(params, **hp), sync_every=sync_every, outer_lr=outer_lr,
                          outer_momentum=outer_momentum)
    return make


def _diloco(params: Any, sync_every: int = 2, **hp: Any) -> Optimizer:
    """DiLoCo: AdamW inside, the mean of the pseudo-gradients, Nesterov SGD outside."""
    inner = torch.optim.AdamW(params, **hp)
    outer = torch.optim.SGD([{"params": g["params"]} for g in inner.param_groups], lr=0.7,
                            momentum=0.9, nesterov=True)
    return LocalSteps(inner, sync_every=sync_every, reducer=AllReduce(), outer_optimizer=outer)


def _average(inner: type[Optimizer]) -> Callable[..., Optimizer]:
    def make(params: Any, **hp: Any) -> Optimizer:
        return AverageGradients(inner(params, **hp), AllReduce())
    return make


def _with(cls: Callable[..., Optimizer], **fixed: Any) -> Callable[..., Optimizer]:
    """``cls`` with fresh ``fixed`` keywords (a compressor or a reducer) on every build."""
    def make(params: Any, **hp: Any) -> Optimizer:
        return cls(params, **{k: (v() if callable(v) else v) for k, v in fixed.items()}, **hp)
    return make


#: (keyword, bad value, a fragment the ValueError must show)
_LR_WD = (("lr", -1e-3, "learning rate: -0.001"), ("lr", float("nan"), "learning rate: nan"),
          ("weight_decay", -0.5, "weight_decay value: -0.5"))
_MOMENTUM = (("momentum", 1.0, "momentum value: 1.0"), ("momentum", -0.1, "momentum value: -0.1"))
_BETAS = (("betas", (1.0, 0.99), "beta parameter at index 0: 1.0"),
          ("betas", (0.9, -0.5), "beta parameter at index 1: -0.5"),
          ("betas", (0.9,), "betas: (0.9,)"))
_TORCH = (("lr", -1e-3, "learning rate: -0.001"),
          ("weight_decay", -0.5, "weight_decay value: -0.5"))
_OUTER = (("sync_every", 0, "sync_every: 0"), ("outer_lr", -0.5, "outer_lr: -0.5"),
          ("outer_momentum", 1.0, "outer_momentum: 1.0"))


@dataclass(frozen=True)
class Row:
    """One optimiser under test: ``make(params, **hyper)`` builds it."""

    id: str
    make: Callable[..., Optimizer]
    hyper: dict[str, Any]                   # every keyword but params (lr included)
    bad: tuple[tuple[str, Any, str], ...]   # error inputs: (keyword, value, message part)
    foreach: bool = True                    # takes foreach= (compared with the loop path)
    vote: bool = False                      # zero goes out as +1 (see VOTE_ZERO)
    ours: bool = True                       # validates add_param_group (torch's do not)
    steps: int = 3                          # steps per phase (LocalSteps: past a sync)
    lr_default: bool = False                # lr may be left out, as in torch.optim
    xfail: dict[str, str] = field(default_factory=dict)  # test → why it is known to fail


ROWS: tuple[Row, ...] = (
    Row("SignSGD", signsgd.SignSGD, {"lr": LR, "weight_decay": 0.1}, _LR_WD),
    Row("Signum", signsgd.Signum, {"lr": LR, "momentum": 0.9, "weight_decay": 0.1},
        _LR_WD + _MOMENTUM),
    Row("Lion", signsgd.Lion, {"lr": LR, "betas": (0.9, 0.99), "weight_decay": 0.1},
        _LR_WD + _BETAS, lr_default=True),
    Row("EFSGD-ScaledSign", _with(signsgd.EFSGD, compressor=ScaledSign),
        {"lr": LR, "momentum": 0.9, "weight_decay": 0.1}, _LR_WD + _MOMENTUM),
    Row("EFSGD-Identity-nesterov", _with(signsgd.EFSGD, compressor=Identity),
        {"lr": LR, "momentum": 0.9, "weight_decay": 0.1, "nesterov": True},
        _LR_WD + _MOMENTUM),
    Row("EFSGD-TopK", _with(signsgd.EFSGD, compressor=lambda: TopK(0.5)),
        {"lr": LR, "weight_decay": 0.1}, _LR_WD + _MOMENTUM),
    Row("EFSGD-RandomK", _with(signsgd.EFSGD, compressor=lambda: RandomK(0.5, seed=3)),
        {"lr": LR, "momentum": 0.5}, _LR_WD),
    # one process, with a reducer: the staged path (transform → reduce → commit)
    Row("Signum-vote", _with(signsgd.Signum, aggregator=MajorityVote),
        {"lr": LR, "momentum": 0.9, "weight_decay": 0.1}, _LR_WD + _MOMENTUM, vote=True),
    Row("Lion-vote", _with(signsgd.Lion, aggregator=MajorityVote),
        {"lr": LR, "betas": (0.9, 0.99)}, _BETAS, vote=True, lr_default=True),
    Row("EFSGD-allreduce", _with(signsgd.EFSGD, aggregator=ErrorFeedbackAllReduce),
        {"lr": LR, "momentum": 0.9, "weight_decay": 0.1}, _LR_WD + _MOMENTUM),
    Row("OneBitAdam", _with(signsgd.OneBitAdam, freeze_step=2),  # 2 steps per phase:
        {"lr": LR, "betas": (0.9, 0.99), "weight_decay": 0.1}, _LR_WD + _BETAS,  # the freeze
        lr_default=True, steps=2),
    Row("OneBitAdam-staged", _with(signsgd.OneBitAdam, freeze_step=2,
                                   aggregator=signsgd.distributed.OneBitAllReduce),
        {"lr": LR, "betas": (0.9, 0.99), "weight_decay": 0.1}, _LR_WD + _BETAS,
        lr_default=True, steps=2),
    Row("DampedMomentum", DampedMomentum, {"lr": LR, "momentum": 0.5},
        (("lr", -1e-3, "lr: -0.001"), ("momentum", 1.0, "momentum: 1.0")), foreach=False),
    Row("AverageGradients(SGD)", _average(torch.optim.SGD),
        {"lr": LR, "momentum": 0.9, "weight_decay": 0.1}, _TORCH, ours=False, lr_default=True),
    Row("LocalSteps(SGD)", _local_steps(torch.optim.SGD),
        {"lr": LR, "momentum": 0.9, "weight_decay": 0.1}, _TORCH + _OUTER, vote=True,
        ours=False, lr_default=True),
    Row("LocalSteps(AdamW)", _local_steps(torch.optim.AdamW, outer_momentum=0.5),
        {"lr": LR, "weight_decay": 0.1}, _TORCH + _OUTER, vote=True, ours=False,
        lr_default=True),
    Row("LocalSteps(AdamW)-DiLoCo", _diloco, {"lr": LR, "weight_decay": 0.1},
        _TORCH + (("sync_every", 0, "sync_every: 0"),), ours=False, lr_default=True),
)


def _rows(test: str, keep: Callable[[Row], bool] = lambda row: True) -> list[Any]:
    """The rows ``keep`` selects, with ``xfail`` marks for ``test`` where known."""
    return [pytest.param(row, id=row.id, marks=[pytest.mark.xfail(strict=False,
                                                                   reason=row.xfail[test])]
                         if test in row.xfail else [])
            for row in ROWS if keep(row)]


# ----------------------------------------------------------------------------- helpers
def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
            for shape in ((3, 2), (3,), (2, 2))]


def _groups(params: list[torch.Tensor], lr2: Any = LR2) -> list[dict[str, Any]]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr2}]


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _build(row: Row, params: list[torch.Tensor] | None = None, **over: Any) -> Optimizer:
    params = _params() if params is None else params
    if "weight_decay" not in row.hyper:
        over.pop("weight_decay", None)
    return row.make(_groups(params, over.pop("lr2", LR2)), **{**row.hyper, **over})


def _own(opt: Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _loss(params: list[torch.Tensor], k: int) -> torch.Tensor:
    """A quadratic with a target that depends on the step ``k``: non-trivial gradients."""
    gen = torch.Generator().manual_seed(100 + k)
    return sum(((p - torch.randn(p.shape, generator=gen, dtype=p.dtype)) ** 2).sum()
               for p in params)


def _run(opt: Optimizer, steps: int, start: int = 0,
         params: list[torch.Tensor] | None = None) -> None:
    params = _own(opt) if params is None else params
    for k in range(start, start + steps):
        opt.zero_grad()
        _loss(params, k).backward()
        opt.step()


def _same(a: Any, b: Any) -> bool:
    """Bit-identical nested structures of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k])
                                                                     for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)


def _without_groups(sd: Any) -> Any:
    """A state_dict without its param_groups (where the hyper-parameters differ on purpose)."""
    if not isinstance(sd, dict):
        return sd
    return {k: _without_groups(v) for k, v in sd.items() if k != "param_groups"}


def _assert_same(a: Optimizer, b: Optimizer, groups: bool = True) -> None:
    assert _same([p.detach() for p in _own(a)], [p.detach() for p in _own(b)]), "parameters"
    sa, sb = a.state_dict(), b.state_dict()
    assert _same(sa, sb) if groups else _same(_without_groups(sa), _without_groups(sb)), \
        "state_dict"


def _lrs(opt: Optimizer) -> list[float]:
    return [float(group["lr"]) for group in opt.param_groups]


# ----------------------------------------------------------------------------- coverage
def _subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in {sub} | _subclasses(sub)}


def test_every_optimiser_has_a_row():
    """Every public Optimizer class of signsgd (its abstract bases aside), and every one the
    registry builds, is some row's."""
    tested = {type(row.make(_groups(_params()), **row.hyper)) for row in ROWS}
    ours = {cls for cls in _subclasses(Optimizer) if cls.__module__.startswith("signsgd.")
            and not cls.__name__.startswith("_") and cls not in (StagedOptimizer, Wrapper)}
    built = {type(registry.build(name, _params(), lr=LR)) for name in registry.METHODS}
    missing = (ours | {cls for cls in built if cls.__module__.startswith("signsgd")}) - tested
    assert not missing, f"no row for {sorted(cls.__name__ for cls in missing)}"


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("row", _rows("state_dict"))
def test_state_dict_round_trip_is_deterministic(row):
    """Two optimisers loaded from one saved state take bit-identical steps, the same as
    the original's; a loaded state_dict reads back equal to the saved one."""
    a = _build(row)
    _run(a, row.steps)
    saved = copy.deepcopy(a.state_dict())
    twins = []
    for _ in range(2):
        b = _build(row, _clone(_own(a)))
        b.load_state_dict(copy.deepcopy(saved))
        assert _same(b.state_dict(), saved)
        twins.append(b)
    for opt in (a, *twins):
        _run(opt, row.steps, start=row.steps)
    _assert_same(a, twins[0])
    _assert_same(twins[0], twins[1])


@pytest.mark.parametrize("row", _rows("weights_only"))
def test_load_state_dict_from_weights_only_torch_load(row):
    a = _build(row)
    _run(a, row.steps)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _build(row, _clone(_own(a)))
    b.load_state_dict(torch.load(buf, weights_only=True))
    _run(a, 2, start=row.steps)
    _run(b, 2, start=row.steps)
    _assert_same(a, b)


@pytest.mark.parametrize("row", _rows("load_other"))
def test_load_state_dict_of_another_layout_raises_and_changes_nothing(row):
    """torch: a state_dict with other groups or group sizes is refused with ValueError."""
    a = _build(row)
    _run(a, row.steps)
    before = copy.deepcopy(a.state_dict())
    params = [p.detach().clone() for p in _own(a)]
    other = row.make([{"params": _params()[:1]}], **row.hyper)
    _run(other, row.steps)
    with pytest.raises(ValueError):
        a.load_state_dict(other.state_dict())
    assert _same(a.state_dict(), before)
    assert _same([p.detach() for p in _own(a)], params)


@pytest.mark.parametrize("row", _rows("lr_default"))
def test_lr_may_be_left_out(row):
    """torch.optim gives every optimiser a default lr; most of ours have none on purpose."""
    hyper = {k: v for k, v in row.hyper.items() if k != "lr"}
    if not row.lr_default:
        with pytest.raises(TypeError, match="lr"):
            row.make(_groups(_params()), **hyper)
        pytest.skip("no default lr on purpose (docs/design.md, Differences from torch.optim)")
    opt = row.make(_params(), **hyper)
    assert opt.param_groups[0]["lr"] == opt.defaults["lr"] > 0


def _floating(sd: Any, path: str = "") -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a nested state dict, by its path."""
    if isinstance(sd, torch.Tensor):
        return {path: sd} if sd.is_floating_point() else {}
    items = sd.items() if isinstance(sd, dict) else \
        enumerate(sd) if isinstance(sd, (list, tuple)) else ()
    return {k: t for key, v in items for k, t in _floating(v, f"{path}/{key}").items()}


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("target", ["float32", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("row", _rows("load_cast"))
def test_load_state_dict_casts_state_to_the_parameters(row, target):
    """torch: loaded state tensors take the dtype and device of their parameter, so a
    state saved from float64 (or CPU) parameters continues on float32 (or CUDA) ones."""
    a = _build(row, _params(torch.float64))
    _run(a, row.steps)
    dtype, device = (torch.float32, "cpu") if target == "float32" else (torch.float64, "cuda")
    params = [p.detach().to(dtype=dtype, device=device).requires_grad_() for p in _own(a)]
    b = _build(row, params)
    b.load_state_dict(a.state_dict())
    _run(b, row.steps, start=row.steps)
    wrong = {k: (t.dtype, t.device.type) for k, t in _floating(b.state_dict()).items()
             if (t.dtype, t.device.type) != (dtype, device)}
    assert not wrong


# ----------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("row", _rows("add_param_group"))
def test_param_group_added_later_equals_one_given_at_construction(row):
    """A group added by ``add_param_group`` before it has gradients behaves as if it had
    been given at construction (its own lr, the defaults for the rest)."""
    params = _params()
    a = _build(row, params)
    b_params = _clone(params)
    b = row.make([{"params": b_params[:2]}], **row.hyper)
    for opt, ps in ((a, params), (b, b_params)):  # the later group has no gradient yet
        for k in range(row.steps):
            opt.zero_grad()
            _loss(ps[:2], k).backward()
            opt.step()
    if isinstance(b, LocalSteps) and not b.owns_outer:  # an injected outer optimiser
        b.outer_optimizer.add_param_group({"params": b_params[2:]})  # takes the group first
    b.add_param_group({"params": b_params[2:], "lr": LR2})
    assert [g["lr"] for g in b.param_groups] == [g["lr"] for g in a.param_groups]
    _run(a, row.steps, start=row.steps)
    _run(b, row.steps, start=row.steps)
    _assert_same(a, b)


@pytest.mark.parametrize("row", _rows("group_lr"))
def test_each_group_steps_with_its_own_lr(row):
    """A group with lr = 0 stays where it is while the other group moves."""
    if row.vote and isinstance(_build(row), LocalSteps):
        pytest.skip(VOTE_ZERO + " (a group with lr = 0 sends Δ = 0)")
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = _build(row, params, lr2=0.0)
    _run(opt, row.steps)
    assert not torch.equal(params[0].detach(), before[0])
    assert torch.equal(params[2].detach(), before[2])


@pytest.mark.parametrize("row", _rows("add_param_group_bad", lambda r: r.ours))
def test_bad_param_group_is_refused_and_changes_nothing(row):
    opt = _build(row)
    groups = len(opt.param_groups)
    extra = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="-0.5"):
        opt.add_param_group({"params": [extra], "lr": -0.5})
    assert len(opt.param_groups) == groups


# ----------------------------------------------------------------------------- no gradients
@pytest.mark.parametrize("row", _rows("no_grad"))
def test_step_without_gradients_changes_nothing(row):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = _build(row, params)
    for _ in range(row.steps):
        opt.step()
    assert _same([p.detach() for p in params], before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("row", _rows("partial_grad"))
def test_parameter_without_gradient_is_left_alone(row):
    """A parameter whose ``.grad`` is None is not moved and gets no state, while the
    others step (torch skips it; the reducers leave a tensor absent everywhere alone)."""
    params = _params()
    before = params[1].detach().clone()
    opt = _build(row, params)
    for k in range(row.steps):
        opt.zero_grad()
        _loss([params[0], params[2]], k).backward()
        opt.step()
    assert params[1].grad is None
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state


@pytest.mark.parametrize("row", _rows("zero_grad_noop"))
def test_zero_gradients_move_nothing_without_weight_decay(row):
    if row.vote:
        pytest.skip(VOTE_ZERO)
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = _build(row, params, weight_decay=0.0)
    for _ in range(row.steps):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert _same([p.detach() for p in params], before)


# ----------------------------------------------------------------------------- closure
@pytest.mark.parametrize("row", _rows("closure"))
def test_closure_is_called_once_and_its_loss_returned(row):
    params = _params()
    opt = _build(row, params)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(params, len(calls))
        loss.backward()
        return loss

    for k in range(row.steps):
        loss = opt.step(closure)
        assert len(calls) == k + 1
        assert torch.is_tensor(loss) and loss.grad_fn is not None
    assert opt.step() is None


@pytest.mark.parametrize("row", _rows("direction"))
def test_steps_go_downhill(row):
    params = _params()
    opt = _build(row, params, weight_decay=0.0)
    start = _loss(params, 0).item()
    for _ in range(2 * row.steps):
        opt.zero_grad()
        _loss(params, 0).backward()
        opt.step()
    assert _loss(params, 0).item() < start


# ----------------------------------------------------------------------------- foreach, lr
@pytest.mark.parametrize("row", _rows("foreach", lambda r: r.foreach))
def test_foreach_matches_the_single_tensor_path(row):
    a = _build(row, foreach=True)
    b = _build(row, foreach=False)
    _run(a, 2 * row.steps)
    _run(b, 2 * row.steps)
    _assert_same(a, b, groups=False)


@pytest.mark.parametrize("row", _rows("tensor_lr"))
def test_tensor_lr_matches_float_lr(row):
    """A 0-dim tensor lr (in the defaults and in a group) steps exactly as the float."""
    a = _build(row)
    b = _build(row, lr=torch.tensor(LR, dtype=torch.float64),
               lr2=torch.tensor(LR2, dtype=torch.float64))
    _run(a, 2 * row.steps)
    _run(b, 2 * row.steps)
    _assert_same(a, b, groups=False)
    assert [float(g["lr"]) for g in b.param_groups] == [LR, LR2]


#: name → scheduler(optimizer); the schedulers torch's SGD entry runs, and the other common ones
SCHEDULERS: dict[str, Callable[[Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.4, total_iters=2),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.4, end_factor=0.8,
                                                total_iters=4),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=4, power=0.9),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.8 ** e),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=[0.02, 0.01], total_steps=8),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.01,
                                                step_size_up=2),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
            lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.StepLR(o, step_size=2, gamma=0.5), lr_scheduler.ExponentialLR(o, 0.9)]),
}


def _beta1(group: dict[str, Any]) -> float | None:
    return group["betas"][0] if "betas" in group else group.get("momentum")


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("row", _rows("scheduler"))
def test_lr_scheduler_sets_lr_as_for_torch_sgd_and_the_step_uses_it(row, name):
    """Each scheduler builds, steps, and sets the same lr (and cycled momentum) as on a
    ``torch.optim.SGD`` with the same groups; each step equals that of a twin whose lr is
    set by hand to the same value."""
    params = _params()
    opt = _build(row, params)
    twin = _build(row, _clone(params))
    ref = torch.optim.SGD(_groups(_clone(params)), lr=LR, momentum=0.9)
    scheds = [SCHEDULERS[name](o) for o in (opt, ref)]
    for k in range(4):
        for g, t in zip(opt.param_groups, twin.param_groups):
            t.update({key: g[key] for key in ("lr", "momentum", "betas") if key in g})
        _run(opt, 1, start=k)
        _run(twin, 1, start=k)
        ref.step()
        for sched in scheds:
            if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
                sched.step(1.0)
            else:
                sched.step()
        assert _lrs(opt) == pytest.approx(_lrs(ref), rel=1e-12, abs=0.0), f"step {k}"
        if name in ("OneCycleLR", "CyclicLR") and _beta1(opt.param_groups[0]) is not None:
            assert [_beta1(g) for g in opt.param_groups] == \
                pytest.approx([_beta1(g) for g in ref.param_groups])
        inner = getattr(opt, "optimizer", None)  # wrappers share the group dicts
        if inner is not None:
            assert _lrs(inner) == _lrs(opt)
    assert _same([p.detach() for p in _own(opt)], [p.detach() for p in _own(twin)])


# ----------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("row", _rows("step_hooks"))
def test_step_pre_and_post_hooks_run_and_a_pre_hook_may_replace_arguments(row):
    params = _params()
    opt = _build(row, params)
    events: list[str] = []

    def closure():
        events.append("closure")
        opt.zero_grad()
        loss = _loss(params, 0)
        loss.backward()
        return loss

    def pre(o, args, kwargs):
        assert o is opt
        events.append("pre")
        return args, {**kwargs, "closure": closure}

    handles = [opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, a, k: events.append("post")),
               register_optimizer_step_pre_hook(
                   lambda o, a, k: events.append("global pre") if o is opt else None),
               register_optimizer_step_post_hook(
                   lambda o, a, k: events.append("global post") if o is opt else None)]
    try:
        loss = opt.step()
    finally:
        for h in handles:
            h.remove()
    assert events == ["global pre", "pre", "closure", "post", "global post"]
    assert torch.is_tensor(loss)
    events.clear()
    opt.step(closure)
    assert events == ["closure"]


@pytest.mark.parametrize("row", _rows("state_dict_hooks"))
def test_state_dict_hooks_run_and_their_results_are_honoured(row):
    """torch: a state_dict pre hook runs before, with the optimiser; a post hook gets the
    state_dict and may return another, which state_dict() returns; a load pre hook may
    return the state_dict to load instead; a load post hook runs after the load.
    ``prepend=True`` runs a hook before the ones already registered."""
    opt = _build(row)
    _run(opt, row.steps)
    plain = opt.state_dict()
    events: list[Any] = []
    opt.register_state_dict_pre_hook(lambda o: events.append(("pre", o is opt)))

    def post(o, sd):
        events.append(("post", sorted(sd)))
        return {**sd, "marker": 1}

    opt.register_state_dict_post_hook(post)
    opt.register_state_dict_post_hook(lambda o, sd: events.append("first"), prepend=True)
    sd = opt.state_dict()
    assert events == [("pre", True), "first", ("post", sorted(plain))]
    assert sorted(sd) == sorted([*plain, "marker"])

    other = _build(row, _clone(_own(opt)))
    _run(other, row.steps + 1)
    wanted = copy.deepcopy(other.state_dict())
    _param_groups(wanted)[0]["lr"] = LR / 4
    events.clear()

    def load_pre(o, given):
        events.append(("load_pre", sorted(given)))
        return copy.deepcopy(wanted)

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(
        lambda o: events.append(("load_post", o.param_groups[0]["lr"])))
    opt.load_state_dict(copy.deepcopy(plain))
    assert events == [("load_pre", sorted(plain)), ("load_post", LR / 4)]
    events.clear()
    assert _same({k: v for k, v in opt.state_dict().items() if k != "marker"}, wanted)


def _param_groups(sd: dict[str, Any]) -> list[dict[str, Any]]:
    return sd["param_groups"] if "param_groups" in sd else _param_groups(sd["optimizer"])


# ----------------------------------------------------------------------------- copies
def _copy(opt: Optimizer, how: str) -> Optimizer:
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("row", _rows("copy"))
def test_copy_steps_as_the_original(row, how):
    """A copy of the optimiser (with its own copy of the parameters) has the original's
    public attributes, and its next steps equal the original's."""
    a = _build(row)
    _run(a, row.steps)
    b = _copy(a, how)
    public = {k for k in vars(a) if not k.startswith("_")}
    assert public <= set(vars(b)), f"lost attributes {sorted(public - set(vars(b)))}"
    assert all(p is not q for p, q in zip(_own(a), _own(b)))
    _run(a, row.steps, start=row.steps)
    _run(b, row.steps, start=row.steps)
    _assert_same(a, b)


# ----------------------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("row", _rows("zero_grad"))
def test_zero_grad(row, set_to_none):
    params = _params()
    opt = _build(row, params)
    _run(opt, 1)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=set_to_none)
    for p, g in zip(params, grads):
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is g and not p.grad.any()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("row,key,value,shown", [
    pytest.param(row, key, value, shown, id=f"{row.id}-{key}={value}")
    for row in ROWS for key, value, shown in row.bad])
def test_error_inputs_raise_value_error_naming_the_value(row, key, value, shown):
    params = _params()
    with pytest.raises(ValueError) as err:
        row.make(_groups(params), **{**row.hyper, key: value})
    assert shown in str(err.value)


@pytest.mark.parametrize("row", _rows("repr"))
def test_repr_names_the_class(row):
    opt = _build(row)
    assert type(opt).__name__ in repr(opt)
