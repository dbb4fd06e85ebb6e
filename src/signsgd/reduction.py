"""The boundary between optimising and communicating: the :class:`Reducer` protocol, what a
reduction returns (:class:`Reduction`) and the settings every rank must share.

This module sits below both sides: the optimisers (:mod:`signsgd.optim`) depend on it and
nothing else of the distributed package; :mod:`signsgd.distributed` implements it
(:class:`~signsgd.distributed.MajorityVote`, :class:`~signsgd.distributed.AllReduce`,
:class:`~signsgd.distributed.ErrorFeedbackAllReduce`). An optimiser step with a reducer is:
gather the gradients and check finiteness once → the local transform, out of place →
``reducer.reduce(..., commit=False)`` → commit (the parameters, the optimiser's state and,
through :meth:`Reduction.commit`, the reducer's state change only now, in one place).

Telemetry is one protocol too: every optimiser, wrapper, reducer and hook state of the
library implements :class:`Telemetry` (``comm_stats() -> CommStats``), and
:func:`comm_stats` reads it from anything (zeros for a plain ``torch.optim`` optimiser).

Example:
    >>> hyperparameters([{"params": [], "lr": 0.1, "foreach": None}])
    ((('lr', 0.1),),)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["CommStats", "Pending", "Reducer", "Reduction", "Telemetry", "comm_stats",
           "hyperparameters"]


@runtime_checkable
class Pending(Protocol):
    """A reducer's state after a step, not yet its own: :meth:`commit` makes it so.

    Example:
        >>> import torch
        >>> from signsgd.distributed import AllReduce
        >>> isinstance(AllReduce().reduce([torch.ones(1)], commit=False).pending, Pending)
        True
    """

    def commit(self) -> None:
        """Make this step the reducer's (step counter, byte counts, server error)."""


@dataclass
class Reduction:
    """What :meth:`Reducer.reduce` returns, one entry per input tensor.

    Until :meth:`commit` the reducer is as it was before the step: a caller whose own step
    fails after the reduction (or that drops it) leaves the reducer unchanged.

    Example:
        >>> import torch
        >>> Reduction([torch.ones(1)], None, True).signs
        True
    """

    update: list[Tensor | None]        # identical on every rank; None: absent on every rank
    transmitted: list[Tensor | None] | None  # this rank's input after its codec (None
    #                                    entries: absent here); None: not accounted (a vote)
    signs: bool                        # a vote: ±1, or 0 on chunks zero on every rank
    pending: Pending | None = None     # the reducer's state after this step; None: committed

    def commit(self) -> None:
        """Commit the reducer's state of this step; a second call does nothing."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.commit()


@runtime_checkable
class Reducer(Protocol):
    """Turns each rank's local tensors into one result, identical on every rank.

    The contract (checked for every implementation by the distributed contract test):
    ``None`` entries contribute zeros and a tensor ``None`` on every rank gets ``None``
    back; every rank issues the same collectives in the same order; ``finite=False`` on
    any rank raises :class:`~signsgd.errors.NonFiniteGradientError` on every rank before
    any payload moves; a step that raises changes no state, and with ``commit=False``
    nothing changes until :meth:`Reduction.commit`; ``input == transmitted + residual``;
    ``bytes_sent`` / ``bytes_received`` count the last committed step's payload.

    Example:
        >>> from signsgd.distributed import AllReduce
        >>> isinstance(AllReduce(), Reducer)
        True
    """

    bytes_sent: int
    bytes_received: int
    timings: dict[str, float]

    def check_compressor(self, compressor: Any) -> None:
        """Raise ``ValueError`` if this reducer cannot serve an optimiser that transmits
        with ``compressor`` (``None``: a sign optimiser, which keeps no residual)."""

    def reduce(self, tensors: list[Tensor | None], *, finite: Any = True,
               compressor: Any = None, settings: Any = None, commit: bool = True
               ) -> Reduction:
        """Reduce ``tensors`` across the ranks; ``settings`` must be equal on every rank.
        ``commit=False``: the reducer changes only when the caller calls
        :meth:`Reduction.commit` (once its own step has succeeded)."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's reducer state (step counter, server error)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) if malformed."""


@dataclass(frozen=True)
class CommStats:
    """What one rank communicated: payload bytes of the last step, their totals, and the
    last step's time split (seconds in packing, collectives and unpacking; may be empty).

    A step that did not communicate (one process, or a local step between two
    synchronisations) has ``bytes_sent == bytes_received == 0``.

    Example:
        >>> CommStats(bytes_sent=8, bytes_received=8).total_bytes_sent
        0
    """

    bytes_sent: int = 0                 # payload bytes this rank sent in the last step
    bytes_received: int = 0             # ... and received
    timings: Mapping[str, float] = field(default_factory=dict)  # the last step's split
    total_bytes_sent: int = 0           # over every committed step
    total_bytes_received: int = 0


@runtime_checkable
class Telemetry(Protocol):
    """Anything that reports what it communicated through :meth:`comm_stats`.

    Example:
        >>> from signsgd.distributed import MajorityVote
        >>> isinstance(MajorityVote(), Telemetry)
        True
    """

    def comm_stats(self) -> CommStats:
        """The communication of the last committed step, and the totals."""


def comm_stats(obj: object) -> CommStats:
    """The :class:`CommStats` of ``obj``: its own (:class:`Telemetry`), those read from the
    :class:`Reducer` protocol's counters, or zeros (``None``, a plain torch optimiser).

    Example:
        >>> import torch
        >>> comm_stats(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
        CommStats(bytes_sent=0, bytes_received=0, ...)
    """
    if isinstance(obj, Telemetry):
        return obj.comm_stats()
    if isinstance(obj, Reducer):  # a protocol reducer of its own: the counters it must have
        return CommStats(int(obj.bytes_sent), int(obj.bytes_received), dict(obj.timings))
    return CommStats()


def hyperparameters(param_groups: list[dict[str, Any]]) -> tuple[Any, ...]:
    """Every group's hyper-parameters (not its parameters) as plain values, in order: what
    must be equal on every rank of a distributed step (its digest travels in the header).

    Example:
        >>> hyperparameters([{"params": [], "lr": 0.1, "betas": (0.9, 0.99)}])
        ((('betas', (0.9, 0.99)), ('lr', 0.1)),)
    """
    def plain(v: Any) -> Any:
        if isinstance(v, Tensor) and v.numel() == 1:
            return float(v.item())
        if isinstance(v, (tuple, list)):
            return tuple(plain(x) for x in v)
        return v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)

    return tuple(tuple((k, plain(v)) for k, v in sorted(group.items())
                       if k not in ("params", "foreach"))
                 for group in param_groups)
