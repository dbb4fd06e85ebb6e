"""The aggregator interface the optimisers call: one object per rank, one job per stage.

An aggregator turns each rank's local tensors into one result that is identical on every
rank. It acts at exactly one point of the data flow, named by :attr:`Aggregator.stage`:

* ``"gradient"`` — before the optimiser's local transform: the gradients are averaged
  (:class:`~signsgd.distributed.AllReduce`, the fp32 baseline). Works with every
  optimiser of this library.
* ``"sign"`` — after the local transform (momentum): each rank sends the sign of its
  vector, every rank gets back the ±1 verdict of the vote
  (:class:`~signsgd.distributed.MajorityVote`, for ``SignSGD`` / ``Signum``).
* ``"error_feedback"`` — after error compensation: each rank hands over ``p = lr·g + e``
  and gets back what it transmitted (for its worker error) and the global update
  (:class:`~signsgd.distributed.ErrorFeedbackAllReduce`, for ``EFSGD``).

Contract every implementation keeps:

* Lists may hold ``None`` for a parameter without a gradient on this rank; the
  implementation decides what it contributes, identically on every rank, and issues the
  same collectives in the same order whatever the local list holds.
* ``finite=False`` says this rank's gradients hold a NaN or inf. Then every rank raises
  :class:`NonFiniteGradientError` in the same call, before returning anything, so no rank
  changes its parameters.
* ``bytes_sent`` / ``bytes_received``: payload bytes this rank sent / received in the last
  call; ``total_bytes_sent`` / ``total_bytes_received`` accumulate.
* ``state_dict()`` / ``load_state_dict()`` carry per-rank state (step counter, server
  error) and are saved inside the optimiser's ``state_dict``. Aggregators pickle without
  their process group.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from signsgd.compression import Compressor

__all__ = ["Aggregator", "NonFiniteGradientError"]


class NonFiniteGradientError(ValueError):
    """A gradient held a NaN or inf (on this rank or, in a distributed step, on another)."""


class Aggregator:
    """Base class of the distributed aggregators (see the module docstring)."""

    stage: ClassVar[str] = ""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.total_bytes_sent = 0
        self.total_bytes_received = 0

    # ----------------------------------------------------------------- the three stages
    def reduce_gradients(
        self, grads: list[Tensor | None], *, finite: bool = True
    ) -> list[Tensor | None]:
        """Stage ``"gradient"``: return the mean over ranks of each gradient."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce gradients")

    def reduce_signs(
        self, tensors: list[Tensor | None], *, finite: bool = True
    ) -> list[Tensor | None]:
        """Stage ``"sign"``: return ``sign(Σ_ranks sign(t))`` as ±1 tensors (zero → +1)."""
        raise NotImplementedError(f"{type(self).__name__} does not vote")

    def reduce_error_feedback(
        self, tensors: list[Tensor | None], compressor: Compressor, *, finite: bool = True
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Stage ``"error_feedback"``: return ``(transmitted, update)``.

        ``transmitted[i]`` is what this rank's compressor kept of ``tensors[i]`` (the
        worker error is ``tensors[i] − transmitted[i]``); ``update[i]`` is the aggregated
        step ``Δ`` every rank subtracts from parameter ``i``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not do error feedback")

    # ----------------------------------------------------------------- bookkeeping
    def _count(self, sent: int, received: int) -> None:
        self.bytes_sent = int(sent)
        self.bytes_received = int(received)
        self.total_bytes_sent += int(sent)
        self.total_bytes_received += int(received)

    def state_dict(self) -> dict[str, Any]:
        """Per-rank state to checkpoint (empty by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")
