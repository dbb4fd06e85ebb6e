"""``OneBitAllReduce``: the reducer of :class:`signsgd.OneBitAdam` — the fp32 mean during the
warm-up, the two-stage error-feedback all-reduce with scaled signs after the freeze.

Example:
    >>> import torch
    >>> from signsgd.compression import ScaledSign
    >>> OneBitAllReduce().reduce([torch.ones(2)], compressor=ScaledSign()).update
    [tensor([1., 1.])]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from signsgd.compression import ScaledSign
from signsgd.distributed.collectives import world
from signsgd.distributed.error_feedback import ErrorFeedbackAllReduce
from signsgd.distributed.reducer import AllReduce, Reducer
from signsgd.reduction import CommStats, Pending, Reduction

__all__ = ["OneBitAllReduce"]


class OneBitAllReduce:
    """:class:`signsgd.OneBitAdam`'s reducer: an fp32 mean for the warm-up and the two-stage
    error-feedback all-reduce with scaled signs after the freeze, on one process group.

    ``reduce`` with ``compressor=None`` is :class:`~signsgd.distributed.AllReduce`'s mean;
    with ``ScaledSign`` it is :class:`~signsgd.distributed.ErrorFeedbackAllReduce`'s 1 bit
    each way plus one scale per chunk (server error kept here) — on one process, where
    there is nothing to send, the exact mean (DeepSpeed compresses only with more than one
    rank). ``bytes_sent``, ``bytes_received`` and ``timings`` are the last step's reducer's;
    the state dict holds both reducers' states.

    Args:
        group: process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialised).
        adversary: a Byzantine attack on what this rank sends (both reducers).

    Example:
        >>> import torch
        >>> r = OneBitAllReduce()   # one process
        >>> r.reduce([torch.tensor([1.0, -3.0])], compressor=ScaledSign()).update
        [tensor([ 1., -3.])]
    """

    def __init__(self, group: Any = None, adversary: Any = None) -> None:
        self.group = group
        self.mean = AllReduce(group, adversary)
        self.ef = ErrorFeedbackAllReduce(group, adversary)
        self.last: Any = self.mean   # the reducer of the last step

    bytes_sent = property(lambda self: self.last.bytes_sent, doc="Bytes sent, last step.")
    bytes_received = property(lambda self: self.last.bytes_received,
                              doc="Bytes received in the last step.")
    timings = property(lambda self: self.last.timings, doc="The last step's time split.")
    total_bytes_sent = property(lambda self: self.mean.total_bytes_sent
                                + self.ef.total_bytes_sent, doc="Bytes sent, all steps.")
    total_bytes_received = property(lambda self: self.mean.total_bytes_received
                                    + self.ef.total_bytes_received,
                                    doc="Bytes received, all steps.")

    def comm_stats(self) -> CommStats:
        """The last step's reducer's bytes and time split; the totals of both (Telemetry).

        Example:
            >>> OneBitAllReduce().comm_stats().total_bytes_sent
            0
        """
        return CommStats(int(self.bytes_sent), int(self.bytes_received), dict(self.timings),
                         int(self.total_bytes_sent), int(self.total_bytes_received))

    def check_compressor(self, compressor: Any) -> None:
        """Refuse any compressor but ``None`` (the warm-up) and ``ScaledSign``."""
        if compressor is not None and type(compressor) is not ScaledSign:
            raise ValueError(f"OneBitAllReduce sends the mean (no compressor) or scaled signs "
                             f"(ScaledSign), not {compressor!r}")

    def reduce(self, tensors: list[Tensor | None], *, finite: Any = True,
               compressor: Any = None, settings: Any = None, commit: bool = True
               ) -> Reduction:
        """The mean of ``tensors`` (``compressor=None``), else their error-feedback 1-bit
        all-reduce; see :meth:`signsgd.distributed.Reducer.reduce`."""
        self.check_compressor(compressor)
        use = self.ef if compressor is not None and world(self.group)[1] > 1 else self.mean
        out = use.reduce(tensors, finite=finite, settings=settings, commit=False,
                         compressor=compressor if use is self.ef else None)
        out.pending = _Phase(self, use, out.pending)
        if commit:
            out.commit()
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"mean": ..., "ef": ...}``: both reducers' states (the server error in "ef")."""
        return {"mean": self.mean.state_dict(), "ef": self.ef.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) if malformed."""
        if not isinstance(state, dict) or set(state) != {"mean", "ef"}:
            raise ValueError(f"OneBitAllReduce state must be a dict with keys 'mean' and "
                             f"'ef', got {state!r}")
        old = self.mean.state_dict()
        self.mean.load_state_dict(state["mean"])
        try:
            self.ef.load_state_dict(state["ef"])
        except Exception:
            self.mean.load_state_dict(old)
            raise

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "group": None}

    def __repr__(self) -> str:
        return f"OneBitAllReduce(adversary={self.mean.adversary!r})"


@dataclass
class _Phase:
    """A step of :class:`OneBitAllReduce` not yet committed: its reducer's pending state."""

    owner: OneBitAllReduce     # whose last reducer becomes ``used`` on commit
    used: Reducer              # the reducer of this step (the mean or the EF all-reduce)
    inner: Pending | None      # its pending state

    def commit(self) -> None:
        if self.inner is not None:
            self.inner.commit()
        self.owner.last = self.used
