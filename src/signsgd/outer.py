r"""``DampedMomentum``: the default outer optimiser of :class:`~signsgd.distributed.LocalSteps`.

.. math::
    u \leftarrow \beta\,u + (1-\beta)\,g,\qquad x \leftarrow x - \mathrm{lr}\,u

``u`` starts at 0, so the first step moves by ``lr·(1−β)·g`` — unlike
``torch.optim.SGD(momentum=β, dampening=β)``, which starts its buffer at ``g``; otherwise it
is that rule. Fed with the voted pseudo-gradient (±1 per coordinate), a coordinate whose
votes keep agreeing moves by up to ``lr`` per round and a disputed one by less; with β = 0
the step is ``lr·g`` itself.

Example:
    >>> import torch
    >>> x = torch.nn.Parameter(torch.zeros(2))
    >>> opt = DampedMomentum([x], lr=0.5, momentum=0.5)
    >>> x.grad = torch.tensor([1.0, -1.0]); opt.step()
    >>> x.data
    tensor([-0.2500,  0.2500])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["DampedMomentum"]


def _check(name: str, value: Any, high: float | None) -> None:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not math.isfinite(value) or value < 0 or (high is not None and value >= high):
        bound = "finite" if high is None else f"< {high}"
        raise ValueError(f"Invalid {name}: {value!r} (must be >= 0 and {bound})")


class DampedMomentum(Optimizer):
    """Momentum with dampening β and a zero start: ``u ← β·u + (1−β)·g; x ← x − lr·u``.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: the step size (>= 0).
        momentum: β in [0, 1) (0: ``x ← x − lr·g``).

    Example:
        >>> x = torch.nn.Parameter(torch.ones(1))
        >>> opt = DampedMomentum([x], lr=0.1)
        >>> x.grad = torch.ones(1); opt.step(); x.data
        tensor([0.9000])
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0) -> None:
        _check("lr", lr, None)
        _check("momentum", momentum, 1.0)
        super().__init__(params, dict(lr=lr, momentum=momentum))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its ``lr`` and ``momentum`` are validated first."""
        merged = {**self.defaults, **param_group}
        _check("lr", merged["lr"], None)
        _check("momentum", merged["momentum"], 1.0)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step on every parameter with a gradient (others are left alone)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = float(group["lr"]), float(group["momentum"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if beta:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    u = state["momentum_buffer"].lerp_(p.grad, 1.0 - beta)
                else:
                    u = p.grad
                p.sub_(u, alpha=lr)
        return loss
