"""One registry of training methods: name → (optimiser, reducer, defaults), and the local
steps modifier.

``signsgd train --optimizer NAME``, ``signsgd compare``, the paper experiments and the
benchmarks all build their optimisers through :func:`build`, so every method has one
spelling and one definition:

===============  =============================================  ================================
name             optimiser                                      with ``world_size > 1``
===============  =============================================  ================================
``signsgd``      :class:`signsgd.SignSGD`                       :class:`MajorityVote`
``signum``       :class:`signsgd.Signum`                        :class:`MajorityVote`
``ef-signsgd``   :class:`signsgd.EFSGD` (``ScaledSign``)        :class:`ErrorFeedbackAllReduce`
``efsgd``        :class:`signsgd.EFSGD` (any compressor)        :class:`ErrorFeedbackAllReduce`
``sgd``          ``torch.optim.SGD``                            :class:`AverageGradients` (fp32)
``adam``         ``torch.optim.Adam``                           :class:`AverageGradients` (fp32)
``adamw``        ``torch.optim.AdamW``                          :class:`AverageGradients` (fp32)
``lion``         :class:`signsgd.Lion`                          :class:`MajorityVote`
``onebit-adam``  :class:`signsgd.OneBitAdam`                    :class:`OneBitAllReduce`
===============  =============================================  ================================

The default learning rates were tuned on Fashion-MNIST with the small CNN
(``docs/tuning.md``); ``signsgd``, ``efsgd`` and ``adamw`` take their closest tuned
relative's (Signum, EF-signSGD, Adam); ``onebit-adam`` takes DeepSpeed's default, 1e-3
(Adam's 3e-3 diverged after the freeze on a small MLP at 2 workers). With a language model
(``--model gpt``) a method takes its ``language_model`` values instead, tuned on the GPT on
Shakespeare's tuning split (``docs/tuning.md``): AdamW and 1-bit Adam lr 1e-2, Signum lr
3e-3 (its majority vote over 4 workers, 600 steps; 4e-3 was far worse there, so lower it,
not raise it, on another setting), EF-signSGD lr 1.0, Lion betas (0.95, 0.98); the others
keep the CNN's. ``onebit-adam``'s ``freeze_step`` here is a placeholder:
``signsgd train`` sets it to a fraction of the run's steps (``--freeze-step``). Unlike
DeepSpeed (and :class:`signsgd.OneBitAdam`'s default) it bias-corrects: with a warm-up of
tens or hundreds of steps, the uncorrected ``v`` frozen at ``(1 − β2^T)·E[g²]`` makes every
later step ``1/√(1 − β2^T)`` times too long (×10 at ``T = 10``), and the runs diverge.

The reducers are named too (:data:`REDUCERS`, each built from a :class:`CommSpec`). Local
steps are a modifier of any method: ``build(name, params, local=LocalSpec(H, ...))`` wraps
the method's local optimiser in :class:`~signsgd.distributed.LocalSteps` with an outer
optimiser of :data:`OUTER_OPTIMIZERS` and an outer reducer of :data:`OUTER_REDUCERS`; the
outer defaults are resolved once, by :meth:`LocalSpec.resolved`.

The DDP peers communicate through a route of :data:`DDP_ROUTES` (our majority-vote hook,
DDP's fp32 all-reduce, torch's fp16 / bf16 / noop / PowerSGD hooks), registered on a
``DistributedDataParallel`` model by :func:`register_ddp` (its defaults resolved once, by
:meth:`DDPRoute.resolved`), with a local optimiser of :data:`METHODS` (``world_size=1``).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> build("signum", [w], lr=1e-3)
    Signum (...
    >>> METHODS["lion"].defaults["betas"]
    (0.9, 0.99)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.optim import Optimizer

from signsgd import compression
from signsgd.errors import ConfigError

__all__ = ["Method", "METHODS", "CommSpec", "REDUCERS", "reducer", "LocalSpec",
           "OUTER_OPTIMIZERS", "OUTER_REDUCERS", "local_steps", "build", "resolve",
           "DDPRoute", "DDP_ROUTES", "ddp_hook", "register_ddp"]


@dataclass(frozen=True)
class CommSpec:
    """How this rank communicates: its process group, its Byzantine attack, the vote mode
    and the vote's tie-breaking seed (each reducer reads only what it uses).

    Example:
        >>> CommSpec(seed=3).vote
        'sharded'
    """

    group: Any = None          # None: the default group
    adversary: Any = None      # a Byzantine attack for this rank, or None
    vote: str = "sharded"      # the majority-vote mode
    seed: int = 0              # the vote's tie-breaking seed


def _vote(comm: CommSpec) -> Any:
    from signsgd.distributed import MajorityVote

    return MajorityVote(comm.group, comm.vote, seed=comm.seed, adversary=comm.adversary)


def _error_feedback(comm: CommSpec) -> Any:
    from signsgd.distributed import ErrorFeedbackAllReduce

    return ErrorFeedbackAllReduce(comm.group, adversary=comm.adversary)


def _onebit(comm: CommSpec) -> Any:
    from signsgd.distributed import OneBitAllReduce

    return OneBitAllReduce(comm.group, comm.adversary)


def _mean(comm: CommSpec) -> Any:
    from signsgd.distributed import AllReduce

    return AllReduce(comm.group, comm.adversary)


def _quantized(precision: str) -> Callable[[CommSpec], Any]:
    def make(comm: CommSpec) -> Any:
        from signsgd.distributed import QuantizedMean

        if comm.adversary is not None:
            raise ConfigError(f"the {precision} mean has no Byzantine model: give it no "
                              "adversary (use the vote, ef or mean reducer)")
        return QuantizedMean(precision, group=comm.group)
    return make


#: The reducers by name, each built from a :class:`CommSpec`: ``vote``
#: (:class:`~signsgd.distributed.MajorityVote`), ``ef``
#: (:class:`~signsgd.distributed.ErrorFeedbackAllReduce`), ``mean``
#: (:class:`~signsgd.distributed.AllReduce`, fp32), ``bf16`` / ``int8``
#: (:class:`~signsgd.distributed.QuantizedMean`) and ``onebit``
#: (:class:`~signsgd.distributed.OneBitAllReduce`).
REDUCERS: dict[str, Callable[[CommSpec], Any]] = {
    "vote": _vote, "ef": _error_feedback, "mean": _mean, "bf16": _quantized("bf16"),
    "int8": _quantized("int8"), "onebit": _onebit}


def reducer(name: str, comm: CommSpec | None = None) -> Any:
    """The reducer ``name`` of :data:`REDUCERS` for this rank (``comm``: default group,
    honest, sharded vote, seed 0).

    Raises:
        ConfigError: an unknown name (the message lists the valid ones), or an adversary
            for a reducer without a Byzantine model.

    Example:
        >>> reducer("vote", CommSpec(vote="allgather")).mode
        'allgather'
    """
    make = REDUCERS.get(name)
    if make is None:
        raise ConfigError(f"unknown reducer {name!r}; valid reducers: {', '.join(REDUCERS)}")
    return make(CommSpec() if comm is None else comm)


@dataclass(frozen=True)
class Method:
    """One training method: how to build its optimiser, and how it communicates.

    Example:
        >>> METHODS["sgd"].library, METHODS["signum"].defaults["momentum"]
        (False, 0.9)
    """

    name: str                               # the one spelling
    summary: str                            # one line for --help and tables
    optimizer: Callable[..., Optimizer]     # (params, **hyper-parameters[, aggregator])
    reducer: str                            # its reducer with world_size > 1: a REDUCERS key
    defaults: dict[str, Any]                # every hyper-parameter it takes, with defaults
    library: bool = True                    # takes aggregator= (else: AverageGradients)
    language_model: dict[str, Any] = field(default_factory=dict)  # tuned on the GPT, over
    # ``defaults`` when the model is a language model (docs/tuning.md; the CNN's stay)

    def defaults_for(self, language_model: bool) -> dict[str, Any]:
        """:attr:`defaults`, with :attr:`language_model`'s values for a language model.

        Example:
            >>> METHODS["adamw"].defaults_for(True)["lr"], METHODS["adamw"].defaults["lr"]
            (0.01, 0.003)
        """
        return {**self.defaults, **(self.language_model if language_model else {})}


def _efsgd(params: Iterable[Any], *, compressor: Any, **hp: Any) -> Optimizer:
    import signsgd

    if isinstance(compressor, str):
        compressor = compression.from_spec(compressor)
    return signsgd.EFSGD(params, compressor=compressor, **hp)


def _ef_signsgd(params: Iterable[Any], **hp: Any) -> Optimizer:
    return _efsgd(params, compressor=compression.ScaledSign(), **hp)


def _ours(name: str) -> Callable[..., Optimizer]:
    def make(params: Iterable[Any], **hp: Any) -> Optimizer:
        import signsgd

        return getattr(signsgd, name)(params, **hp)
    return make


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("signsgd", "signSGD: x ← x − lr·sign(g)", _ours("SignSGD"), "vote",
           {"lr": 1e-3, "weight_decay": 0.0}),
    Method("signum", "Signum: sign of momentum", _ours("Signum"), "vote",
           {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0}, language_model={"lr": 3e-3}),
    Method("ef-signsgd", "EF-signSGD: scaled sign with error feedback", _ef_signsgd,
           "ef", {"lr": 0.3, "momentum": 0.0, "weight_decay": 0.0},
           language_model={"lr": 1.0}),
    Method("efsgd", "EF-SGD with any compressor", _efsgd, "ef",
           {"lr": 0.3, "momentum": 0.0, "weight_decay": 0.0, "compressor": "topk:0.1"}),
    Method("sgd", "SGD with heavy-ball momentum (torch.optim.SGD)", torch.optim.SGD, "mean",
           {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, library=False),
    Method("adam", "Adam (torch.optim.Adam)", torch.optim.Adam, "mean",
           {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}, library=False),
    Method("adamw", "AdamW, decoupled weight decay (torch.optim.AdamW)", torch.optim.AdamW,
           "mean", {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}, library=False,
           language_model={"lr": 1e-2}),
    Method("lion", "Lion: sign of an interpolation of momentum and gradient", _ours("Lion"),
           "vote", {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0},
           language_model={"betas": (0.95, 0.98)}),
    Method("onebit-adam", "1-bit Adam(W): fp32 warm-up, then v frozen and the momentum sent "
           "as 1-bit signs with error feedback", _ours("OneBitAdam"), "onebit",
           {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "freeze_step": 100,
            "bias_correction": True}, language_model={"lr": 1e-2}),
)}


#: The outer optimisers of local steps and their defaults (``lr`` ``None``: the inner
#: optimiser's ``lr``). ``sign-momentum``: :class:`~signsgd.outer.DampedMomentum`,
#: ``u ← βu + (1−β)v; x0 ← x0 − lr·u``; ``nesterov``: ``torch.optim.SGD`` with Nesterov
#: momentum, DiLoCo's outer step (lr 0.7, momentum 0.9).
OUTER_OPTIMIZERS: dict[str, dict[str, float | None]] = {
    "sign-momentum": {"lr": None, "momentum": 0.0},
    "nesterov": {"lr": 0.7, "momentum": 0.9},
}
#: The outer reducers of local steps: the :data:`REDUCERS` a pseudo-gradient can take.
OUTER_REDUCERS: tuple[str, ...] = ("vote", "ef", "mean", "bf16", "int8")


@dataclass(frozen=True)
class LocalSpec:
    """Local steps: ``sync_every`` = H local steps per round, then an outer step of
    ``optimizer`` (:data:`OUTER_OPTIMIZERS`) on the pseudo-gradients reduced by ``reducer``
    (:data:`OUTER_REDUCERS`); ``lr`` / ``momentum`` ``None``: the outer optimiser's default.

    Example:
        >>> LocalSpec(8, "nesterov").resolved(inner_lr=1e-3)
        LocalSpec(sync_every=8, optimizer='nesterov', reducer='vote', lr=0.7, momentum=0.9)
    """

    sync_every: int
    optimizer: str = "sign-momentum"
    reducer: str = "vote"
    lr: float | None = None
    momentum: float | None = None

    def resolved(self, inner_lr: float) -> LocalSpec:
        """A copy with ``lr`` and ``momentum`` filled in from the outer optimiser's defaults
        (``sign-momentum``'s ``lr``: ``inner_lr``).

        Raises:
            ConfigError: an unknown outer optimiser or reducer (the valid ones listed).

        Example:
            >>> LocalSpec(4).resolved(inner_lr=0.01).lr
            0.01
        """
        defaults = OUTER_OPTIMIZERS.get(self.optimizer)
        if defaults is None:
            raise ConfigError(f"unknown outer optimizer {self.optimizer!r}; valid outer "
                              f"optimizers: {', '.join(OUTER_OPTIMIZERS)}")
        if self.reducer not in OUTER_REDUCERS:
            raise ConfigError(f"unknown outer reducer {self.reducer!r}; valid outer "
                              f"reducers: {', '.join(OUTER_REDUCERS)}")
        lr = defaults["lr"] if defaults["lr"] is not None else inner_lr
        return replace(self, lr=lr if self.lr is None else self.lr,
                       momentum=defaults["momentum"] if self.momentum is None else self.momentum)


def local_steps(inner: Optimizer, spec: LocalSpec, comm: CommSpec | None = None
                ) -> Optimizer:
    """``LocalSteps(inner, spec.sync_every, ...)`` with the outer optimiser and reducer
    ``spec`` names (its defaults resolved against ``inner``'s first group's ``lr``), the
    reducer built from ``comm``.

    Raises:
        ConfigError: an unknown outer optimiser or reducer.
        ValueError: what :class:`~signsgd.distributed.LocalSteps` refuses (named).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = local_steps(torch.optim.AdamW([w], lr=0.1), LocalSpec(4, reducer="mean"))
        >>> opt.sync_every, type(opt.reducer).__name__
        (4, 'AllReduce')
    """
    from signsgd.distributed import LocalSteps

    spec = spec.resolved(inner.param_groups[0]["lr"])
    outer_reducer = reducer(spec.reducer, comm)
    if spec.optimizer == "nesterov":
        params = [p for g in inner.param_groups for p in g["params"]]
        outer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=True)
        return LocalSteps(inner, spec.sync_every, reducer=outer_reducer, outer_optimizer=outer)
    return LocalSteps(inner, spec.sync_every, spec.lr, spec.momentum, outer_reducer)


def _method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise ConfigError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(METHODS)}")
    return method


def resolve(name: str, **given: Any) -> dict[str, Any]:
    """The hyper-parameters of method ``name``: its defaults, overridden by ``given``
    (``None`` values are ignored).

    Raises:
        ConfigError: an unknown method, or a hyper-parameter the method does not take
            (the message lists the ones it does).

    Example:
        >>> resolve("signum", lr=3e-4)
        {'lr': 0.0003, 'momentum': 0.9, 'weight_decay': 0.0}
    """
    method = _method(name)
    out = dict(method.defaults)
    for key, value in given.items():
        if value is None:
            continue
        if key not in out:
            raise ConfigError(
                f"optimizer {name!r} takes no {key!r}; it takes "
                f"{', '.join(method.defaults)}"
            )
        out[key] = value
    return out


def build(name: str, params: Iterable[Any], *, world_size: int = 1, group: Any = None,
          adversary: Any = None, vote: str = "sharded", seed: int = 0,
          local: LocalSpec | None = None, **hyper: Any) -> Optimizer:
    """The optimiser of method ``name`` for this rank of a ``world_size``-rank run.

    Args:
        name: a key of :data:`METHODS`.
        params: parameters or param-group dicts.
        world_size: the number of ranks; with more than one the optimiser communicates
            through the method's reducer (on ``group``).
        group: the process group (``None``: the default group).
        adversary: a Byzantine attack for this rank (fault-tolerance runs), or ``None``.
        vote: the majority-vote mode (``"sharded"`` or ``"allgather"``).
        seed: the vote's tie-breaking seed.
        local: local steps (:class:`LocalSpec`): the method's local optimiser wrapped in
            :class:`~signsgd.distributed.LocalSteps`, its outer reducer on ``group``
            (``world_size`` is then not used).
        **hyper: hyper-parameters, see :func:`resolve`.

    Returns:
        A ``torch.optim.Optimizer``: ours with ``aggregator=`` set, or a torch one wrapped
        in :class:`~signsgd.distributed.AverageGradients` when ``world_size > 1``, or the
        local optimiser in ``LocalSteps`` with ``local``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> type(build("adamw", [w], lr=1e-3)).__name__
        'AdamW'
    """
    method = _method(name)
    hp = resolve(name, **hyper)
    comm = CommSpec(group, adversary, vote, seed)
    if local is not None:
        local = local.resolved(hp["lr"])  # before anything is built
        return local_steps(method.optimizer(params, **hp), local, comm)
    if world_size <= 1:
        return method.optimizer(params, **hp)
    red = reducer(method.reducer, comm)
    if method.library:
        return method.optimizer(params, aggregator=red, **hp)
    from signsgd.distributed import AverageGradients

    return AverageGradients(method.optimizer(params, **hp), red)


# ------------------------------------------------------------------ DDP communication
def _vote_hook(model: Any, comm: CommSpec, hp: dict[str, Any]) -> tuple[Any, Any]:
    from signsgd.distributed import MajorityVoteHookState, majority_vote_hook

    state = MajorityVoteHookState(comm.group, hp["momentum"], comm.vote, comm.seed,
                                  module=model, adversary=comm.adversary, betas=hp["betas"])
    return state, majority_vote_hook


def _fp32_hook(model: Any, comm: CommSpec, hp: dict[str, Any]) -> tuple[Any, Any]:
    return None, None  # DDP's own bucketed fp32 all-reduce


def _torch_hook(module: str, name: str) -> Callable[[Any, CommSpec, dict[str, Any]],
                                                    tuple[Any, Any]]:
    def make(model: Any, comm: CommSpec, hp: dict[str, Any]) -> tuple[Any, Any]:
        import importlib

        hooks = importlib.import_module(f"torch.distributed.algorithms.ddp_comm_hooks.{module}")
        return comm.group, getattr(hooks, name)  # their state: the process group
    return make


def _powersgd_hook(model: Any, comm: CommSpec, hp: dict[str, Any]) -> tuple[Any, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    return powerSGD_hook.PowerSGDState(process_group=comm.group, **hp), \
        powerSGD_hook.powerSGD_hook


@dataclass(frozen=True)
class DDPRoute:
    """One way a ``torch.nn.parallel.DistributedDataParallel`` model communicates its
    gradients: a DDP communication hook and its state, built by ``make(model, comm, hp)``
    from the route's hyper-parameters ``hp`` (its :attr:`defaults`, see :meth:`resolved`)
    and this rank's :class:`CommSpec` (the hooks read its group; the vote its mode, seed
    and adversary too). A hook of ``None``: DDP's own fp32 all-reduce, nothing registered.
    ``optimizer_hp``: hyper-parameters the local optimiser stepping after the hook must take
    (the vote's hook applies the momentum and returns signs, so ``torch.optim.SGD`` runs
    with momentum 0).

    Example:
        >>> DDP_ROUTES["powersgd"].defaults["matrix_approximation_rank"]
        1
    """

    name: str                                   # the one spelling
    summary: str                                # one line for tables
    make: Callable[[Any, CommSpec, dict[str, Any]], tuple[Any, Any]] = field(repr=False)
    defaults: dict[str, Any] = field(default_factory=dict)  # every hyper-parameter it takes
    optimizer_hp: dict[str, Any] = field(default_factory=dict)  # what the local optimiser
    #                                         must take with it (vote: momentum 0)

    def resolved(self, **given: Any) -> dict[str, Any]:
        """The route's hyper-parameters: :attr:`defaults` overridden by ``given``
        (``None`` values are ignored).

        Raises:
            ConfigError: a hyper-parameter the route does not take (the valid ones listed).

        Example:
            >>> DDP_ROUTES["vote"].resolved(momentum=0.5)
            {'momentum': 0.5, 'betas': None}
        """
        out = dict(self.defaults)
        for key, value in given.items():
            if value is None:
                continue
            if key not in out:
                raise ConfigError(f"DDP route {self.name!r} takes no {key!r}; it takes "
                                  f"{', '.join(self.defaults) or 'nothing'}")
            out[key] = value
        return out


#: The DDP communication routes by name: ``vote`` (our
#: :func:`~signsgd.distributed.majority_vote_hook`, Signum's momentum in the hook; run with
#: ``torch.optim.SGD(momentum=0)``), ``fp32`` (no hook: DDP's own bucketed all-reduce),
#: ``fp16`` / ``bf16`` (torch's ``default_hooks.fp16_compress_hook`` /
#: ``bf16_compress_hook``; bf16 needs CUDA and NCCL), ``noop`` (torch's
#: ``debugging_hooks.noop_hook``: no communication, the ranks drift apart) and ``powersgd``
#: (torch's ``powerSGD_hook`` with a ``PowerSGDState``, torch's defaults; over Gloo it needs
#: every parameter in one DDP bucket).
DDP_ROUTES: dict[str, DDPRoute] = {r.name: r for r in (
    DDPRoute("vote", "DDP + majority-vote hook (Signum's momentum in the hook)", _vote_hook,
             {"momentum": METHODS["signum"].defaults["momentum"], "betas": None},
             optimizer_hp={"momentum": 0.0}),
    DDPRoute("fp32", "DDP's own fp32 all-reduce (no hook)", _fp32_hook),
    DDPRoute("fp16", "DDP + torch's fp16 compression hook",
             _torch_hook("default_hooks", "fp16_compress_hook")),
    DDPRoute("bf16", "DDP + torch's bf16 compression hook (CUDA and NCCL)",
             _torch_hook("default_hooks", "bf16_compress_hook")),
    DDPRoute("noop", "DDP + torch's noop hook (no communication)",
             _torch_hook("debugging_hooks", "noop_hook")),
    DDPRoute("powersgd", "DDP + torch's PowerSGD hook", _powersgd_hook,
             {"matrix_approximation_rank": 1, "start_powerSGD_iter": 1000,
              "min_compression_rate": 2, "use_error_feedback": True, "warm_start": True}),
)}


def _ddp_route(name: str) -> DDPRoute:
    route = DDP_ROUTES.get(name)
    if route is None:
        raise ConfigError(f"unknown DDP route {name!r}; valid DDP routes: "
                          f"{', '.join(DDP_ROUTES)}")
    return route


def ddp_hook(name: str, model: Any = None, comm: CommSpec | None = None, **hyper: Any
             ) -> tuple[Any, Any]:
    """``(state, hook)`` of DDP route ``name`` (:data:`DDP_ROUTES`) for this rank, not
    registered: pass them to ``model.register_comm_hook(state, hook)`` (``hook`` ``None``:
    register nothing). ``model``: the DDP model (the vote's state names its momentum by
    its parameter names; ``None``: bind it later); ``comm``: default group, honest,
    sharded vote, seed 0; ``**hyper``: see :meth:`DDPRoute.resolved`.

    Raises:
        ConfigError: an unknown route or hyper-parameter (the valid ones listed).

    Example:
        >>> state, hook = ddp_hook("powersgd", matrix_approximation_rank=2)
        >>> state.matrix_approximation_rank, state.start_powerSGD_iter, hook.__name__
        (2, 1000, 'powerSGD_hook')
    """
    route = _ddp_route(name)
    return route.make(model, CommSpec() if comm is None else comm, route.resolved(**hyper))


def register_ddp(model: Any, name: str, comm: CommSpec | None = None, **hyper: Any) -> Any:
    """Register DDP route ``name``'s hook (:func:`ddp_hook`) on the DDP ``model``; return
    its state (``None`` for ``fp32``, and the process group for torch's stateless hooks).
    Call it before the first backward, once per model.

    Raises:
        ConfigError: an unknown route or hyper-parameter.
        TypeError: what DDP refuses (``bf16`` without CUDA and NCCL).

    Example:
        >>> import tempfile, torch.distributed as dist
        >>> from torch.nn.parallel import DistributedDataParallel as DDP
        >>> store = dist.FileStore(tempfile.mktemp(), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> model = DDP(torch.nn.Linear(2, 1))
        >>> register_ddp(model, "vote").momentum
        0.9
        >>> dist.destroy_process_group()
    """
    state, hook = ddp_hook(name, model, comm, **hyper)
    if hook is not None:
        model.register_comm_hook(state, hook)
    return state
