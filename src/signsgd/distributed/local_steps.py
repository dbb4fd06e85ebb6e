r"""``LocalSteps``: H local steps of any optimiser, then a reduced outer step.

Every rank starts a round from the same anchor :math:`x_0` and takes ``sync_every`` = H
steps of its own inner optimiser (AdamW, Lion, Signum, SGD, ...) on its own data. Then the
ranks reduce the pseudo-gradients :math:`\Delta_m = x_0 - x_m` with the reducer, every
rank puts its parameters back at :math:`x_0`, sets the reduced pseudo-gradient as their
``.grad`` and takes one step of the **outer optimiser**; the result is the next anchor:

.. math::
    v = R(\Delta_1, \dots, \Delta_M),\quad x \leftarrow x_0,\quad
    x.\mathrm{grad} \leftarrow v,\quad \text{outer.step()},\quad x_0 \leftarrow x

The pieces are independent:

* **reducer** ``R``: :class:`MajorityVote` (default; ``sign(Σ sign Δ_m)``, 1 bit per
  coordinate each way), :class:`~signsgd.distributed.ErrorFeedbackAllReduce` (scaled signs;
  the worker error ``Δ − transmitted`` is kept here and added to the next round's Δ, the
  server error by the reducer) or :class:`~signsgd.distributed.AllReduce` (the fp32 mean).
* **outer optimiser**: any ``torch.optim.Optimizer`` over the same parameters. Given as
  ``outer_optimizer=``; otherwise :class:`~signsgd.outer.DampedMomentum` with ``outer_lr``
  and ``outer_momentum`` (``u ← β·u + (1−β)·v; x_0 ← x_0 − η_out·u``, ``u`` from 0): with
  β = 0 the outer step is the vote itself, so H = 1 with an inner ``SGD(lr=1)`` is exactly
  ``SignSGD(lr=η_out, aggregator=MajorityVote())``.

DiLoCo (Douillard et al. 2023), as torchft's ``DiLoCo`` computes it, is::

    LocalSteps(torch.optim.AdamW(params, lr), sync_every=H, reducer=AllReduce(),
               outer_optimizer=torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True))

**Schedules**: an LR scheduler on this wrapper drives the inner optimiser (they share the
group dicts); the outer step follows its own scheduler on :attr:`outer_optimizer` (a sign
step does not shrink by itself: without one, a decayed inner schedule ends on a constant
outer noise floor).

That is 1/H bit per coordinate per step each way with the vote; the vote's robustness to
Byzantine workers is kept (give the reducer an adversary). The inner optimisers' states
stay on each rank and are **not** reset at a round boundary (as in DiLoCo). Bytes: the
reducer's, in the step that synchronises; 0 in the others. A parameter that had no
gradient on this rank during the round sends nothing (``None``: zeros in the reduction);
one that had none on any rank is left alone everywhere.

Failures: a NaN or inf gradient in any local step (an inner optimiser of this library
raises; a torch one turns the parameters non-finite) is held until the next
synchronisation, where every rank raises the same
:class:`~signsgd.errors.NonFiniteGradientError`; the anchor is never corrupted, and every
rank restarts the round from it.

Reference: Douillard et al., DiLoCo: Distributed Low-Communication Training of Language
Models, 2023; Bernstein et al., signSGD with Majority Vote, ICLR 2019.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    >>> opt = LocalSteps(torch.optim.SGD([w], lr=0.5), sync_every=2, outer_lr=0.25)
    >>> for g in ([1.0, -2.0], [1.0, 0.0]):
    ...     w.grad = torch.tensor(g); opt.step()
    >>> w.data   # x0 − 0.25·sign(x0 − x_2) with zero → +1, one process
    tensor([ 0.7500, -0.7500])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from signsgd.compression import ScaledSign
from signsgd.distributed.reducer import Reducer
from signsgd.distributed.vote import MajorityVote
from signsgd.distributed.wrapper import Wrapper
from signsgd.errors import NonFiniteGradientError
from signsgd.functional import all_finite
from signsgd.outer import DampedMomentum
from signsgd.reduction import CommStats, comm_stats, hyperparameters
from signsgd.sharding import agree_finite, check_replica_group, like, local

__all__ = ["LocalSteps"]

_STATE_KEYS = {"optimizer", "outer", "outer_optimizer", "reducer", "params"}
_ROUND_KEYS = {"anchor", "error", "position", "failed", "touched"}


@dataclass
class Round:
    """The state of the current round (checkpointed, per rank)."""

    anchor: list[Tensor]                    # x0: where every rank started the round
    error: list[Tensor | None]              # worker error (a compressing reducer), else None
    position: int = 0                       # local steps taken in this round, < H
    failed: str | None = None               # this rank's non-finite error in the round
    touched: list[bool] = field(default_factory=list)  # had a gradient in this round

    def as_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self.anchor],
                "error": [None if e is None else e.clone() for e in self.error],
                "position": self.position, "failed": self.failed,
                "touched": list(self.touched)}


class LocalSteps(Wrapper):
    """Wrap a local ``optimizer``: every ``sync_every`` steps, a reduced outer step.

    Args:
        optimizer: the inner optimiser of this rank (no aggregator of its own).
        sync_every: H >= 1, local steps per round.
        outer_lr: η_out > 0 of the default outer optimiser
            (:class:`~signsgd.outer.DampedMomentum`); not with ``outer_optimizer``.
        outer_momentum: β in [0, 1) of the default outer optimiser (0: none).
        reducer: how the pseudo-gradients are combined: :class:`MajorityVote` (default),
            :class:`~signsgd.distributed.ErrorFeedbackAllReduce` or
            :class:`~signsgd.distributed.AllReduce`.
        outer_optimizer: a ``torch.optim.Optimizer`` over the same parameters, stepped on
            the reduced pseudo-gradient (DiLoCo: ``SGD(lr=0.7, momentum=0.9,
            nesterov=True)``).

    Raises:
        ValueError: a bad hyper-parameter (named), both or neither of ``outer_lr`` and
            ``outer_optimizer``, an outer optimiser over other parameters, or an inner
            optimiser that already communicates.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = LocalSteps(torch.optim.AdamW([w], lr=0.1), sync_every=4, outer_lr=0.01)
        >>> w.grad = torch.ones(2); opt.step(); opt.position
        1
    """

    def __init__(self, optimizer: Optimizer, sync_every: int, outer_lr: float | None = None,
                 outer_momentum: float = 0.0, reducer: Reducer | None = None, *,
                 outer_optimizer: Optimizer | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if getattr(optimizer, "aggregator", None) is not None:
            raise ValueError("the inner optimiser must be local (aggregator=None): LocalSteps "
                             "communicates only at the synchronisations")
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"Invalid sync_every: {sync_every!r} (must be an int >= 1)")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if outer_optimizer is None:
            if outer_lr is None:
                raise ValueError("LocalSteps needs outer_lr (the default outer optimiser's "
                                 "step) or an outer_optimizer")
            for name, value, low_open in (("outer_lr", outer_lr, True),
                                          ("outer_momentum", outer_momentum, False)):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                        not math.isfinite(value) or value < 0 or (low_open and value == 0):
                    raise ValueError(f"Invalid {name}: {value!r}")
            if outer_momentum >= 1:
                raise ValueError(f"Invalid outer_momentum: {outer_momentum!r} (must be < 1)")
            outer_optimizer = DampedMomentum([{"params": g["params"]}
                                              for g in optimizer.param_groups],
                                             lr=float(outer_lr),
                                             momentum=float(outer_momentum))
            self.owns_outer = True                          # groups added later join it
        else:
            if not isinstance(outer_optimizer, Optimizer):
                raise TypeError(f"outer_optimizer must be a torch.optim.Optimizer, got "
                                f"{type(outer_optimizer).__name__}")
            if outer_lr is not None or outer_momentum:
                raise ValueError("give outer_lr and outer_momentum to the outer_optimizer, "
                                 f"not to LocalSteps (got outer_lr={outer_lr!r}, "
                                 f"outer_momentum={outer_momentum!r})")
            self.owns_outer = False
            if getattr(outer_optimizer, "aggregator", None) is not None:
                raise ValueError("the outer optimiser must be local (aggregator=None): the "
                                 "reducer already combined the pseudo-gradients")
            outer_params = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
            if outer_params != {id(p) for p in params}:
                raise ValueError("outer_optimizer must hold the same parameters as the inner "
                                 f"optimiser ({len(outer_params)} vs {len(params)} tensors, "
                                 "or other tensors)")
        self.outer_optimizer = outer_optimizer              # steps on the reduced Δ
        self.reducer = MajorityVote() if reducer is None else reducer
        check_replica_group("LocalSteps", self.reducer, params)  # FSDP2: across replicas
        self.compressor = _compressor_for(self.reducer)     # EF: the residual is kept here
        self.sync_every = sync_every
        super().__init__(optimizer)                         # this rank's inner optimiser
        self.round = self._fresh_round()
        self.bytes_sent = 0                                 # of the last step (0: no sync)
        self.bytes_received = 0
        self.timings: dict[str, float] = {}                 # of the last step's sync

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _shards(self) -> list[Tensor]:
        """The parameters, or their local shards where they are DTensors (FSDP2): what the
        round (anchor, worker error) and the reduction hold."""
        return [local(p) for p in self._params()]

    def _fresh_round(self) -> Round:
        params = self._shards()
        return Round(anchor=[p.detach().clone() for p in params], error=[None] * len(params),
                     touched=[False] * len(params))

    @property
    def anchor(self) -> list[Tensor]:
        """x0, the parameters every rank started this round from (do not modify)."""
        return self.round.anchor

    @property
    def position(self) -> int:
        """Local steps taken in the current round (0 right after a synchronisation)."""
        return self.round.position

    @contextmanager
    def at_anchor(self) -> Iterator[None]:
        """Inside the block the parameters are the anchor (identical on every rank), e.g. to
        evaluate mid-round; this rank's own parameters come back afterwards.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(1))
            >>> opt = LocalSteps(torch.optim.SGD([w], lr=1.0), sync_every=2, outer_lr=0.1)
            >>> w.grad = torch.ones(1); opt.step()
            >>> with opt.at_anchor():
            ...     print(w.data)
            tensor([0.])
            >>> w.data
            tensor([-1.])
        """
        params = self._shards()
        with torch.no_grad():
            local = [p.detach().clone() for p in params]
            for p, a in zip(params, self.round.anchor):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(params, local):
                    p.copy_(v)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One local step; every ``sync_every``-th also reduces and takes the outer step.

        Raises:
            NonFiniteGradientError: at a synchronisation, on every rank, when some rank
                had a NaN or inf in a local step of the round (parameters go back to the
                anchor, which is unchanged).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rnd = self.round
        rnd.touched = [t or p.grad is not None for t, p in zip(rnd.touched, self._params())]
        if rnd.failed is None:
            try:
                self.optimizer.step()
            except NonFiniteGradientError as exc:
                rnd.failed = str(exc)
        rnd.position += 1
        self.bytes_sent = self.bytes_received = 0
        self.timings = {}
        if rnd.position == self.sync_every:
            self._synchronise()
        return loss

    def synchronise(self) -> bool:
        """End the current round now: reduce and take the outer step over the steps taken
        so far (every rank must call it at the same step). Returns whether it did; a no-op
        at a round boundary.

        Raises:
            NonFiniteGradientError: as :meth:`step`.
        """
        if self.round.position == 0:
            return False
        self.bytes_sent = self.bytes_received = 0
        self.timings = {}
        with torch.no_grad():
            self._synchronise()
        return True

    def _synchronise(self) -> None:
        rnd = self.round
        params = self._params()
        shards = [local(p) for p in params]
        deltas: list[Tensor | None] = []
        for a, p, e, used in zip(rnd.anchor, shards, rnd.error, rnd.touched):
            if not used and e is None:
                deltas.append(None)  # nothing to say about this tensor
                continue
            d = a - p.detach()
            deltas.append(d if e is None else d + e)
        present = [d for d in deltas if d is not None]
        finite = all_finite(present) if rnd.failed is None else False
        finite = agree_finite(finite, params)  # FSDP2: a NaN in one shard stops every replica
        failed = rnd.failed
        rnd.position, rnd.failed = 0, None
        rnd.touched = [False] * len(params)
        try:
            red = self.reducer.reduce(deltas, finite=finite, compressor=self.compressor,
                                      settings=self._settings(), commit=False)
        except NonFiniteGradientError as exc:
            for p, a in zip(shards, rnd.anchor):  # every rank restarts the round from x0
                p.copy_(a)
            here = f" (this rank: {failed})" if failed else ""
            raise NonFiniteGradientError(f"LocalSteps: {exc}{here}") from None
        errors = rnd.error
        if self.compressor is not None and red.transmitted is not None:
            errors = [None if d is None or t is None else d - t.view_as(d)
                      for d, t in zip(deltas, red.transmitted)]
        grads = [p.grad for p in params]
        for p, s, a, v in zip(params, shards, rnd.anchor, red.update):
            s.copy_(a)
            p.grad = None if v is None else like(p, v.view_as(s).to(s.dtype).clone())
        try:
            self.outer_optimizer.step()
        finally:
            for p, s, a, g in zip(params, shards, rnd.anchor, grads):
                a.copy_(s)
                p.grad = g
        rnd.error = errors  # the outer step succeeded: the round's state and the reducer's
        red.commit()
        self.bytes_sent, self.bytes_received = self.reducer.bytes_sent, self.reducer.bytes_received
        self.timings = dict(self.reducer.timings)

    def comm_stats(self) -> CommStats:
        """The last step's bytes and time split (zeros between synchronisations) and the
        reducer's totals (Telemetry).

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(1))
            >>> LocalSteps(torch.optim.SGD([w], lr=0.1), 2, outer_lr=1.0).comm_stats().timings
            {}
        """
        total = comm_stats(self.reducer)
        return CommStats(int(self.bytes_sent), int(self.bytes_received), dict(self.timings),
                         total.total_bytes_sent, total.total_bytes_received)

    def _settings(self) -> tuple[Any, ...]:
        """What every rank must share at a synchronisation (checked in the step header)."""
        return (self.sync_every, type(self.outer_optimizer).__name__,
                hyperparameters(self.outer_optimizer.param_groups),
                hyperparameters(self.param_groups))

    # ------------------------------------------------------------------ checkpoints
    def _check_new_group(self, param_group: dict[str, Any]) -> None:
        if self.owns_outer:
            return
        new = param_group["params"]
        new = [new] if isinstance(new, Tensor) else list(new)
        outer = {id(p) for g in self.outer_optimizer.param_groups for p in g["params"]}
        if any(id(p) not in outer for p in new):
            raise ValueError("add the group's parameters to the outer_optimizer first: "
                             "LocalSteps steps them with it at every synchronisation")

    def _group_added(self) -> None:
        rnd, new = self.round, self.param_groups[-1]["params"]
        rnd.anchor += [local(p).detach().clone() for p in new]
        rnd.error += [None] * len(new)
        rnd.touched += [False] * len(new)
        if self.owns_outer:
            self.outer_optimizer.add_param_group({"params": list(new)})

    def _state(self) -> dict[str, Any]:
        """The inner and outer optimisers' states, the round (anchor, worker error,
        position), this rank's parameters (they differ between ranks inside a round) and
        the reducer's state."""
        return {"optimizer": self.optimizer.state_dict(), "outer": self.round.as_dict(),
                "outer_optimizer": self.outer_optimizer.state_dict(),
                "reducer": self.reducer.state_dict(),
                "params": [p.detach().clone() for p in self._shards()]}

    def _load(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != _STATE_KEYS:
            raise ValueError(f"LocalSteps state must hold {sorted(_STATE_KEYS)}")
        outer = state_dict["outer"]
        params = self._shards()
        if not isinstance(outer, dict) or set(outer) != _ROUND_KEYS or \
                len(outer["anchor"]) != len(params) or len(outer["error"]) != len(params) or \
                len(outer["touched"]) != len(params) or \
                any(a.shape != p.shape for a, p in zip(outer["anchor"], params)) or \
                any(e is not None and e.shape != p.shape for e, p in zip(outer["error"], params)):
            raise ValueError("LocalSteps state: the anchor does not match the parameters")
        if not 0 <= int(outer["position"]) < self.sync_every:
            raise ValueError(f"LocalSteps state: position {outer['position']} is not in "
                             f"[0, {self.sync_every})")
        local = state_dict["params"]
        if len(local) != len(params) or any(a.shape != p.shape for a, p in zip(local, params)):
            raise ValueError("LocalSteps state: the parameters do not match")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.outer_optimizer.load_state_dict(state_dict["outer_optimizer"])
        self.reducer.load_state_dict(state_dict["reducer"])
        self.round = Round(anchor=[a.to(p, copy=True) for a, p in zip(outer["anchor"], params)],
                           error=[None if e is None else e.to(p, copy=True)
                                  for e, p in zip(outer["error"], params)],
                           position=int(outer["position"]), failed=outer["failed"],
                           touched=[bool(t) for t in outer["touched"]])
        with torch.no_grad():
            for p, v in zip(params, local):
                p.copy_(v)

    def __repr__(self) -> str:
        return (f"LocalSteps({self.optimizer!r}, sync_every={self.sync_every}, "
                f"outer_optimizer={self.outer_optimizer!r}, reducer={self.reducer!r})")


def _compressor_for(reducer: Reducer) -> ScaledSign | None:
    """What the pseudo-gradients are transmitted with: nothing for a reducer that takes the
    tensors as they are (a vote, the mean), scaled signs for one that needs a compressor
    (the EF all-reduce), whose residual this wrapper keeps as the worker error."""
    try:
        reducer.check_compressor(None)
        return None
    except ValueError:
        compressor = ScaledSign()
        reducer.check_compressor(compressor)
        return compressor
