"""Checkpoints of FSDP2 training the FSDP way: ``torch.distributed.checkpoint`` (DCP) with
``get_model_state_dict`` / ``get_optimizer_state_dict`` and their ``set_*``.

:class:`TrainState` is a DCP ``Stateful`` over a model and one of this library's
optimisers. DCP's optimiser state dict keeps only ``"state"`` and ``"param_groups"`` (the
momentum and error buffers: DTensors sharded like the parameters). Two things differ from
torch's optimisers under HSDP:

* the buffers are **per replica** (each replica votes with its own momentum), while a
  DTensor on the shard mesh looks the same on every replica and DCP would keep one
  replica's: :class:`TrainState` saves the optimiser's state under ``optim_replica{i}``,
  ``i`` this rank's index in the reducer's (replicate) group;
* the reducer's state (its step counter, the EF all-reduce's server error: per rank)
  would be dropped: it is saved beside, under a key of its own rank, and restored after
  ``set_optimizer_state_dict`` (which may take one step with zero gradients and
  ``lr = 0`` to create the state of a fresh optimiser, moving the reducer's counter).

The parameters are the same on every replica and saved once. Loading needs the same mesh
and world size.

Example (every rank)::

    import torch.distributed.checkpoint as dcp
    dcp.save({"train": TrainState(model, opt)}, checkpoint_id=path)
    dcp.load({"train": TrainState(model, opt)}, checkpoint_id=path)
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

__all__ = ["TrainState"]


class TrainState:
    """A ``torch.distributed.checkpoint.stateful.Stateful`` over ``model`` (FSDP2) and
    ``optimizer`` (its reducer's per-rank state included).

    Example:
        >>> import torch
        >>> TrainState(torch.nn.Linear(1, 1), torch.optim.SGD([torch.zeros(1)], lr=0.1)).model
        Linear(in_features=1, out_features=1, bias=True)
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def _key(self) -> str:
        return f"reducer_rank{dist.get_rank() if dist.is_initialized() else 0}"

    def _optim_key(self) -> str:
        reducer = self._reducer()
        if reducer is None or not dist.is_initialized():
            return "optim"
        return f"optim_replica{dist.get_rank(getattr(reducer, 'group', None))}"

    def _reducer(self) -> Any:
        return getattr(self.optimizer, "aggregator", None)

    def state_dict(self) -> dict[str, Any]:
        """``"model"`` and ``"optim_replica{i}"`` from DCP's ``get_state_dict`` and this
        rank's reducer state (as bytes: each rank's differs, DCP keeps every rank's key)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        out = {"model": model, self._optim_key(): optim}
        reducer = self._reducer()
        if reducer is not None:
            buf = io.BytesIO()
            torch.save(reducer.state_dict(), buf)
            out[self._key()] = buf.getvalue()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the model and optimiser (``set_state_dict``), then this rank's reducer
        state."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict[self._optim_key()])
        reducer = self._reducer()
        if reducer is not None:
            saved = state_dict.get(self._key())
            if not isinstance(saved, bytes):
                raise ValueError(f"the checkpoint holds no reducer state for {self._key()} "
                                 "(saved from another world size or without a reducer)")
            reducer.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False))
