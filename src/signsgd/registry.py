"""One registry of training methods: name → (optimiser, reducer, defaults).

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
(Adam's 3e-3 diverged after the freeze on a small MLP at 2 workers). The language-model rates
are in ``configs/lm.toml``. ``onebit-adam``'s ``freeze_step`` here is a placeholder:
``signsgd train`` sets it to a fraction of the run's steps (``--freeze-step``). Unlike
DeepSpeed (and :class:`signsgd.OneBitAdam`'s default) it bias-corrects: with a warm-up of
tens or hundreds of steps, the uncorrected ``v`` frozen at ``(1 − β2^T)·E[g²]`` makes every
later step ``1/√(1 − β2^T)`` times too long (×10 at ``T = 10``), and the runs diverge.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from signsgd import compression
from signsgd.errors import ConfigError

__all__ = ["Method", "METHODS", "build", "resolve"]


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
    reducer: Callable[..., Any]             # (group, adversary, vote, seed) -> its reducer
    defaults: dict[str, Any]                # every hyper-parameter it takes, with defaults
    library: bool = True                    # takes aggregator= (else: AverageGradients)


def _efsgd(params: Iterable[Any], *, compressor: Any, **hp: Any) -> Optimizer:
    import signsgd

    if isinstance(compressor, str):
        compressor = compression.from_spec(compressor)
    return signsgd.EFSGD(params, compressor=compressor, **hp)


def _ef_signsgd(params: Iterable[Any], **hp: Any) -> Optimizer:
    return _efsgd(params, compressor=compression.ScaledSign(), **hp)


def _vote(group: Any, adversary: Any, vote: str, seed: int) -> Any:
    from signsgd.distributed import MajorityVote

    return MajorityVote(group, vote, seed=seed, adversary=adversary)


def _error_feedback(group: Any, adversary: Any, vote: str, seed: int) -> Any:
    from signsgd.distributed import ErrorFeedbackAllReduce

    return ErrorFeedbackAllReduce(group, adversary=adversary)


def _onebit(group: Any, adversary: Any, vote: str, seed: int) -> Any:
    from signsgd.distributed import OneBitAllReduce

    return OneBitAllReduce(group, adversary)


def _mean(group: Any, adversary: Any, vote: str, seed: int) -> Any:
    from signsgd.distributed import AllReduce

    return AllReduce(group, adversary)


def _ours(name: str) -> Callable[..., Optimizer]:
    def make(params: Iterable[Any], **hp: Any) -> Optimizer:
        import signsgd

        return getattr(signsgd, name)(params, **hp)
    return make


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("signsgd", "signSGD: x ← x − lr·sign(g)", _ours("SignSGD"), _vote,
           {"lr": 1e-3, "weight_decay": 0.0}),
    Method("signum", "Signum: sign of momentum", _ours("Signum"), _vote,
           {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0}),
    Method("ef-signsgd", "EF-signSGD: scaled sign with error feedback", _ef_signsgd,
           _error_feedback, {"lr": 0.3, "momentum": 0.0, "weight_decay": 0.0}),
    Method("efsgd", "EF-SGD with any compressor", _efsgd, _error_feedback,
           {"lr": 0.3, "momentum": 0.0, "weight_decay": 0.0, "compressor": "topk:0.1"}),
    Method("sgd", "SGD with heavy-ball momentum (torch.optim.SGD)", torch.optim.SGD, _mean,
           {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, library=False),
    Method("adam", "Adam (torch.optim.Adam)", torch.optim.Adam, _mean,
           {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}, library=False),
    Method("adamw", "AdamW, decoupled weight decay (torch.optim.AdamW)", torch.optim.AdamW,
           _mean, {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}, library=False),
    Method("lion", "Lion: sign of an interpolation of momentum and gradient", _ours("Lion"),
           _vote, {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0}),
    Method("onebit-adam", "1-bit Adam(W): fp32 warm-up, then v frozen and the momentum sent "
           "as 1-bit signs with error feedback", _ours("OneBitAdam"), _onebit,
           {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "freeze_step": 100,
            "bias_correction": True}),
)}


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
          **hyper: Any) -> Optimizer:
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
        **hyper: hyper-parameters, see :func:`resolve`.

    Returns:
        A ``torch.optim.Optimizer``: ours with ``aggregator=`` set, or a torch one wrapped
        in :class:`~signsgd.distributed.AverageGradients` when ``world_size > 1``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> type(build("adamw", [w], lr=1e-3)).__name__
        'AdamW'
    """
    method = _method(name)
    hp = resolve(name, **hyper)
    if world_size <= 1:
        return method.optimizer(params, **hp)
    reducer = method.reducer(group, adversary, vote, seed)
    if method.library:
        return method.optimizer(params, aggregator=reducer, **hp)
    from signsgd.distributed import AverageGradients

    return AverageGradients(method.optimizer(params, **hp), reducer)
