"""``Wrapper``: the base of the optimisers that wrap another one (``AverageGradients``,
``LocalSteps``) — what makes them behave as ``torch.optim`` optimisers themselves.

A wrapper shares the wrapped optimiser's list of param groups and its state (an LR
scheduler on the wrapper drives both; a group added to the wrapper is added to the wrapped
optimiser), runs ``torch.optim``'s four state-dict hooks as documented around its own
:meth:`Wrapper._state` / :meth:`Wrapper._load`, and pickles, deep-copies and
``torch.save``-s with everything it holds (hooks excepted, as in ``torch.optim``).

Example:
    >>> import torch
    >>> from signsgd.distributed import AverageGradients
    >>> w = torch.nn.Parameter(torch.ones(1))
    >>> opt = AverageGradients(torch.optim.SGD([w], lr=0.1))
    >>> opt.param_groups is opt.optimizer.param_groups
    True
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from signsgd.reduction import CommStats, comm_stats

__all__ = ["Wrapper"]


class Wrapper(Optimizer):
    """An optimiser over ``optimizer``'s param groups and state (see the module docstring).

    Subclasses implement :meth:`_state` and :meth:`_load` (checked before anything changes)
    and may refine :meth:`_check_new_group`.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> Wrapper(torch.optim.SGD([w], lr=0.1)).state is not None
        True
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer                          # the wrapped optimiser
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._share()

    def comm_stats(self) -> CommStats:
        """What the wrapper communicated (Telemetry); here, the wrapped optimiser's.

        Example:
            >>> import torch
            >>> w = torch.nn.Parameter(torch.ones(1))
            >>> Wrapper(torch.optim.SGD([w], lr=0.1)).comm_stats().bytes_sent
            0
        """
        return comm_stats(self.optimizer)

    def _share(self) -> None:
        """Share the wrapped optimiser's list of groups and its state (again: torch's
        ``load_state_dict`` replaces both)."""
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimiser (the wrapper shares its list of groups)."""
        if "optimizer" not in self.__dict__ or self.param_groups is not \
                self.optimizer.param_groups:  # Optimizer.__init__ registering the groups
            super().add_param_group(param_group)
            return
        self._check_new_group(param_group)
        self.optimizer.add_param_group(param_group)
        self._group_added()

    def _check_new_group(self, param_group: dict[str, Any]) -> None:
        """Raise before a group is added if this wrapper cannot take it."""

    def _group_added(self) -> None:
        """Extend this wrapper's own per-parameter state after a group was added."""

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """This wrapper's state (:meth:`_state`); the state-dict hooks run as in
        ``torch.optim``: pre hooks first, and a post hook's returned dict is returned."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a load pre hook's returned dict is what is loaded."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load(state_dict)
        self._share()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; a wrapper is
        # nothing without what it wraps (hooks are not pickled, as in torch.optim).
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_hooks")}
