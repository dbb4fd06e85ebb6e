r"""``LocalSteps``: H local steps of any optimiser, then a majority-voted outer update.

Every rank starts a round from the same anchor :math:`x_0` and takes ``sync_every`` = H
steps of its own inner optimiser (AdamW, Lion, Signum, SGD, ...) on its own data. Then the
ranks reduce the pseudo-gradients :math:`\Delta_m = x_0 - x_m` — by default with the
majority vote, 1 bit per coordinate each way — and every rank applies the same outer
step:

.. math::
    v = \operatorname{sign}\Big(\sum_m \operatorname{sign}(\Delta_m)\Big),\quad
    u \leftarrow \beta\,u + (1-\beta)\,v,\quad
    x_0 \leftarrow x_0 - \eta_{\text{out}}\,u,\quad x_m \leftarrow x_0

Convention: the outer momentum ``u`` (``outer_momentum`` β, Signum-style, starts at 0) is
applied as it is, not through another sign: with β = 0 the outer step is the vote itself,
so H = 1 with an inner ``SGD(lr=1)`` is exactly ``SignSGD(lr=η_out,
aggregator=MajorityVote())``; with β > 0 a coordinate whose votes keep agreeing moves by
up to η_out per round and a disputed one by less. The same rule serves the comparison
variant ``reducer=ErrorFeedbackAllReduce()``: the pseudo-gradients travel as scaled signs
with a worker error (kept here, added to the next round's Δ) and a server error, and ``u``
smooths the real-valued update.

**The outer step follows the learning-rate schedule**: each param group's outer step is
``outer_lr · lr_t / lr_0``, where ``lr_0`` is the group's learning rate when ``LocalSteps``
was built and ``lr_t`` its current one — so a scheduler on this wrapper (or on the inner
optimiser: they share the group dicts) warms up and decays the outer sign steps with the
inner ones. Without a scheduler the factor is 1. (A sign step does not shrink by itself
as the pseudo-gradients do; a constant outer step would set a noise floor at the end of
a decayed schedule.)

That is 1/H bit per coordinate per step each way with the vote; the vote's robustness to
Byzantine workers is kept (give the reducer an adversary). The inner optimisers' states
stay on each rank and are **not** reset at a round boundary (as in DiLoCo). Bytes: the
reducer's, in the step that synchronises; 0 in the others.

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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from signsgd.compression import ScaledSign
from signsgd.distributed.reducer import Reducer
from signsgd.distributed.vote import MajorityVote
from signsgd.errors import NonFiniteGradientError
from signsgd.functional import all_finite
from signsgd.optim import hyperparameters

__all__ = ["LocalSteps"]


class LocalSteps(Optimizer):
    """Wrap a local ``optimizer``: every ``sync_every`` steps, a reduced outer update.

    Args:
        optimizer: the inner optimiser of this rank (no aggregator of its own).
        sync_every: H >= 1, local steps per round.
        outer_lr: η_out > 0, the outer step size (a sign step: it moves a coordinate by up
            to η_out per round).
        outer_momentum: β in [0, 1), the outer momentum on the reduced update (0: none).
        reducer: how the pseudo-gradients are combined: a :class:`MajorityVote` (default)
            or an :class:`~signsgd.distributed.ErrorFeedbackAllReduce`.

    Raises:
        ValueError: a bad hyper-parameter (named), or an inner optimiser that already
            communicates.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = LocalSteps(torch.optim.AdamW([w], lr=0.1), sync_every=4, outer_lr=0.01)
        >>> w.grad = torch.ones(2); opt.step(); opt.outer["position"]
        1
    """

    def __init__(self, optimizer: Optimizer, sync_every: int, outer_lr: float,
                 outer_momentum: float = 0.0, reducer: Reducer | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if getattr(optimizer, "aggregator", None) is not None:
            raise ValueError("the inner optimiser must be local (aggregator=None): LocalSteps "
                             "communicates only at the synchronisations")
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"Invalid sync_every: {sync_every!r} (must be an int >= 1)")
        for name, value, low_open in (("outer_lr", outer_lr, True),
                                      ("outer_momentum", outer_momentum, False)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not math.isfinite(value) or value < 0 or (low_open and value == 0):
                raise ValueError(f"Invalid {name}: {value!r}")
        if outer_momentum >= 1:
            raise ValueError(f"Invalid outer_momentum: {outer_momentum!r} (must be < 1)")
        self.optimizer = optimizer                          # this rank's inner optimiser
        self.reducer = MajorityVote() if reducer is None else reducer
        # the residual is ours to keep when the reducer compresses (EF); a vote keeps none
        self.compressor = None if isinstance(self.reducer, MajorityVote) else ScaledSign()
        self.reducer.check_compressor(self.compressor)
        self.sync_every = sync_every
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        super().__init__(optimizer.param_groups, optimizer.defaults)  # the same group dicts
        self.state = optimizer.state
        self.outer: dict[str, Any] = self._fresh_outer()
        self.bytes_sent = 0                                 # of the last step (0: no sync)
        self.bytes_received = 0
        self.timings: dict[str, float] = {}                 # of the last step's sync

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _fresh_outer(self) -> dict[str, Any]:
        """The outer state: anchor x0, outer momentum u, worker error, round position."""
        return {"anchor": [p.detach().clone() for p in self._params()],
                "momentum": None, "error": None, "position": 0, "failed": None,
                "base_lr": tuple(float(g["lr"]) for g in self.param_groups)}

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
        outer = self.outer
        if outer["failed"] is None:
            try:
                self.optimizer.step()
            except NonFiniteGradientError as exc:
                outer["failed"] = str(exc)
        outer["position"] += 1
        self.bytes_sent = self.bytes_received = 0
        self.timings = {}
        if outer["position"] == self.sync_every:
            self._synchronise()
        return loss

    def _synchronise(self) -> None:
        outer = self.outer
        params = self._params()
        anchor = outer["anchor"]
        deltas = [a - p.detach() for a, p in zip(anchor, params)]
        if outer["error"] is not None:
            deltas = [d + e for d, e in zip(deltas, outer["error"])]
        finite = all_finite(deltas) if outer["failed"] is None else False
        outer["position"], failed = 0, outer["failed"]
        outer["failed"] = None
        try:
            red = self.reducer.reduce(deltas, finite=finite, compressor=self.compressor,
                                      settings=(self.sync_every, self.outer_lr,
                                                self.outer_momentum,
                                                hyperparameters(self.param_groups)))
        except NonFiniteGradientError as exc:
            for p, a in zip(params, anchor):  # every rank restarts the round from x0
                p.copy_(a)
            here = f" (this rank: {failed})" if failed else ""
            raise NonFiniteGradientError(f"LocalSteps: {exc}{here}") from None
        beta = self.outer_momentum
        if beta:
            u = outer["momentum"] or [torch.zeros_like(a) for a in anchor]
            u = [torch.lerp(m, v.view_as(m).to(m.dtype), 1.0 - beta) for m, v in
                 zip(u, red.update)]
            outer["momentum"] = u
        else:
            u = [v.view_as(a).to(a.dtype) for v, a in zip(red.update, anchor)]
        if red.transmitted is not None:
            outer["error"] = [d - t.view_as(d) for d, t in zip(deltas, red.transmitted)]
        scale = [float(g["lr"]) / base if base else 1.0  # the schedule's factor, per group
                 for g, base in zip(self.param_groups, outer["base_lr"]) for _ in g["params"]]
        for a, p, step, f in zip(anchor, params, u, scale):
            a.sub_(step, alpha=self.outer_lr * f)
            p.copy_(a)
        self.bytes_sent, self.bytes_received = self.reducer.bytes_sent, self.reducer.bytes_received
        self.timings = dict(self.reducer.timings)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimiser's state, the outer state (anchor, momentum, worker error,
        position in the round), this rank's parameters (they differ between ranks inside a
        round) and the reducer's state."""
        outer = {k: ([t.clone() for t in v] if isinstance(v, list) else v)
                 for k, v in self.outer.items()}
        return {"optimizer": self.optimizer.state_dict(), "outer": outer,
                "reducer": self.reducer.state_dict(),
                "params": [p.detach().clone() for p in self._params()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked before anything changes)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "outer",
                                                                    "reducer", "params"}:
            raise ValueError("LocalSteps state must hold 'optimizer', 'outer', 'reducer' and "
                             "'params'")
        outer = state_dict["outer"]
        params = self._params()
        if set(outer) != set(self._fresh_outer()) or len(outer["anchor"]) != len(params) or \
                any(a.shape != p.shape for a, p in zip(outer["anchor"], params)):
            raise ValueError("LocalSteps state: the anchor does not match the parameters")
        if not 0 <= int(outer["position"]) < self.sync_every:
            raise ValueError(f"LocalSteps state: position {outer['position']} is not in "
                             f"[0, {self.sync_every})")
        local = state_dict["params"]
        if len(local) != len(params) or any(a.shape != p.shape for a, p in zip(local, params)):
            raise ValueError("LocalSteps state: the parameters do not match")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.reducer.load_state_dict(state_dict["reducer"])
        # torch's load_state_dict makes new group dicts: share them again (an LR scheduler
        # on this wrapper must keep driving the inner optimiser)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        self.outer = {k: ([t.clone() for t in v] if isinstance(v, list) else v)
                      for k, v in outer.items()}
        with torch.no_grad():
            for p, v in zip(params, local):
                p.copy_(v)

    def __repr__(self) -> str:
        return (f"LocalSteps({self.optimizer!r}, sync_every={self.sync_every}, "
                f"outer_lr={self.outer_lr}, outer_momentum={self.outer_momentum}, "
                f"reducer={self.reducer!r})")
