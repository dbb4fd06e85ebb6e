"""``AverageGradients``: any ``torch.optim`` optimiser, its gradients reduced across ranks.

The baseline every sign method is compared with — SGD, Adam or AdamW on gradients averaged
by an fp32 all-reduce — through the same reducer protocol as the library's optimisers:
gather the gradients and check finiteness once, reduce them (one header, one
``all_reduce`` of one flat buffer), then the wrapped optimiser's own step on the mean.

Example:
    >>> import torch
    >>> from signsgd.distributed import AverageGradients
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = AverageGradients(torch.optim.SGD([w], lr=0.5))   # one process: the mean is g
    >>> w.grad = torch.tensor([1.0, -1.0]); opt.step()
    >>> w.data
    tensor([0.5000, 1.5000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from signsgd.distributed.reducer import AllReduce, Reducer
from signsgd.distributed.wrapper import Wrapper
from signsgd.errors import NonFiniteGradientError
from signsgd.functional import all_finite, first_nonfinite
from signsgd.reduction import CommStats, comm_stats, hyperparameters

__all__ = ["AverageGradients"]


class AverageGradients(Wrapper):
    """Wrap ``optimizer`` so that each ``step()`` first averages the gradients across ranks.

    The wrapper shares the wrapped optimiser's param groups and state (an LR scheduler on
    the wrapper drives both); ``state_dict()`` holds the optimiser's and the reducer's.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, ...).
        reducer: how the gradients are combined (default :class:`AllReduce`: the mean).

    Raises:
        NonFiniteGradientError: a gradient on any rank held a NaN or inf (raised on every
            rank; nothing changed).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = AverageGradients(torch.optim.Adam([w], lr=0.1))
        >>> w.grad = torch.ones(1); opt.step(); w.data
        tensor([-0.1000])
    """

    def __init__(self, optimizer: Optimizer, reducer: Reducer | None = None) -> None:
        self.reducer = AllReduce() if reducer is None else reducer
        self.reducer.check_compressor(None)
        super().__init__(optimizer)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Average the gradients across ranks, then step the wrapped optimiser."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        present = [g for g in grads if g is not None]
        try:
            red = self.reducer.reduce(grads, finite=all_finite(present), commit=False,
                                      settings=hyperparameters(self.param_groups))
        except NonFiniteGradientError as exc:
            bad = first_nonfinite(present)
            if bad is not None:
                raise NonFiniteGradientError(
                    f"{type(self.optimizer).__name__}: non-finite gradient (NaN or inf) in "
                    f"tensor {bad} with a gradient; parameters and state left unchanged; "
                    f"{exc}") from None
            raise
        for p, mean in zip(params, red.update):
            if mean is None:
                continue
            if p.grad is None:
                p.grad = mean.view_as(p).to(p.dtype).clone()
            else:
                p.grad.copy_(mean.view_as(p))
        self.optimizer.step()
        red.commit()  # the reducer's step counts only once the optimiser's has run
        return loss

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank sent in the last step."""
        return int(self.reducer.bytes_sent)

    @property
    def bytes_received(self) -> int:
        """Payload bytes this rank received in the last step."""
        return int(self.reducer.bytes_received)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of the last step's reduction in packing, collectives and unpacking."""
        return dict(self.reducer.timings)

    def comm_stats(self) -> CommStats:
        """The reducer's :class:`~signsgd.reduction.CommStats` (Telemetry).

        Example:
            >>> import torch
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> AverageGradients(torch.optim.SGD([w], lr=0.1)).comm_stats().bytes_received
            0
        """
        return comm_stats(self.reducer)

    def _state(self) -> dict[str, Any]:
        """``{"optimizer": ..., "reducer": ...}``."""
        return {"optimizer": self.optimizer.state_dict(), "reducer": self.reducer.state_dict()}

    def _load(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "reducer"}:
            raise ValueError("AverageGradients state must hold 'optimizer' and 'reducer'")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.reducer.load_state_dict(state_dict["reducer"])

    def __repr__(self) -> str:
        return f"AverageGradients({self.optimizer!r}, {self.reducer!r})"
