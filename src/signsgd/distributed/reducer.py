"""The reducers' shared front-end (:class:`Reducer`, implementing
:class:`signsgd.reduction.Reducer`) and :class:`AllReduce`, the plain fp32 mean that every
other reducer is measured against.

An optimiser step of this library is always: gather the gradients and check finiteness
once → the local transform, out of place (momentum, error compensation, weight decay) →
**reduce** → commit. A reducer turns each rank's local tensors into one result that is
identical on every rank. The optimisers never ask which reducer they hold.

:meth:`Reducer.reduce` is the shared front-end: it runs the step header
(:mod:`signsgd.distributed.header`: layout, finite flag, step counter, configuration and
the optimiser's hyper-parameters, checked on every rank), gathers the tensors into one
flat buffer (zeros where this rank has ``None``; a tensor absent on every rank is left
out), calls the reducer's core :meth:`Reducer.reduce_flat` and splits the result back.
The core works on a flat buffer plus the tensor lengths; the DDP hook calls it on a
bucket's buffer.

Contract every reducer keeps (``tests/distributed/test_contract.py`` checks it for each):

* ``None`` entries contribute zeros; a tensor that is ``None`` on every rank gets ``None``
  back on every rank (its parameter is left alone everywhere).
* Every rank issues the same collectives in the same order, whatever its inputs hold; a
  NaN or inf on any rank (``finite=False``) raises
  :class:`~signsgd.errors.NonFiniteGradientError` on every rank before any payload moves.
* A step that raises leaves the reducer's state (step counter, server error) unchanged;
  with ``reduce(..., commit=False)`` nothing changes until the caller's
  :meth:`Reduction.commit` (the optimisers commit only once their own step succeeded).
* ``input == transmitted + residual``: :attr:`Reduction.transmitted` is what this rank's
  codec kept of its input; the optimiser keeps the residual (EF-SGD's worker error).
* ``bytes_sent`` / ``bytes_received`` are the payload bytes this rank sent to / received
  from the other ranks in the last step, header included (an ``all_gather`` or
  ``all_to_all_single`` moves each block once between each pair of ranks; an
  ``all_reduce`` of ``n`` elements is counted as a ring, ``2·(M−1)·⌈n/M⌉`` elements each
  way); ``total_bytes_sent`` / ``total_bytes_received`` accumulate.
* ``state_dict()`` / ``load_state_dict()`` carry per-rank state (step counter, server
  error); reducers pickle without their process group and without scratch buffers.
* With ``M > 1`` the returned tensors may be views of buffers the reducer reuses: valid
  until its next call (the optimisers apply them at once).

Example:
    >>> import torch
    >>> r = AllReduce()                       # one process: the mean of one rank
    >>> r.reduce([torch.tensor([1.0, -2.0]), None]).update
    [tensor([ 1., -2.]), None]
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from signsgd.compression import Compressor
from signsgd.distributed import engine
from signsgd.distributed.adversary import Adversary
from signsgd.distributed.collectives import all_reduce, phase, timing, world
from signsgd.distributed.header import Agreed, TensorSpec, exchange, spec_of
from signsgd.reduction import CommStats, Reduction
from signsgd.reduction import Reducer as ReducerProtocol
from signsgd.scratch import Scratch

__all__ = ["Reducer", "Reduction", "FlatReduction", "Kind", "Step", "AllReduce",
           "ring_nbytes"]


class Kind(Enum):
    """What a reducer's core returns, and what it says this rank transmitted.

    Example:
        >>> Kind("vote") is Kind.VOTE
        True
    """

    MEAN = "mean"              # the mean of the inputs: this rank's input went out as it is
    COMPRESSED = "compressed"  # ``transmitted`` holds this rank's input after its codec
    VOTE = "vote"              # ±1 (0 on chunks zero everywhere); the input is not accounted


@dataclass
class FlatReduction:
    """What a reducer's core :meth:`Reducer.reduce_flat` returns.

    Example:
        >>> FlatReduction(torch.ones(2), Kind.MEAN).kind.value
        'mean'
    """

    update: Tensor                     # flat, identical on every rank
    kind: Kind
    transmitted: Tensor | None = None  # flat; only with Kind.COMPRESSED
    sent: int = 0                      # payload bytes, the header excluded
    received: int = 0
    state: Any = None                  # the core's state after this step, kept on commit


@dataclass
class Step:
    """A reducer's state after a step it has not committed (:class:`~signsgd.reduction.Pending`).

    Example:
        >>> r = AllReduce()
        >>> red = r.reduce([torch.ones(1)], commit=False)
        >>> r.step, red.pending.step, (red.commit(), r.step)[1]
        (0, 1, 1)
    """

    reducer: Reducer                   # whose state this is
    step: int                          # its step counter after the step
    sent: int                          # payload bytes of the step, header included
    received: int
    timings: dict[str, float]          # seconds in packing, collectives and unpacking
    state: Any = None                  # the core's own state (FlatReduction.state)

    def commit(self) -> None:
        """Make this step the reducer's (see :meth:`Reducer.commit`)."""
        self.reducer.commit(self)


def ring_nbytes(numel: int, m: int, itemsize: int) -> int:
    """Bytes each way of a ring all-reduce of ``numel`` elements: ``2·(M−1)·⌈n/M⌉·size``.

    Example:
        >>> ring_nbytes(1000, 4, 4)
        6000
    """
    return 0 if m == 1 or numel == 0 else 2 * (m - 1) * (-(-numel // m)) * itemsize


def check_adversary(adversary: Any) -> Adversary | None:
    """``adversary`` if it is an :class:`~signsgd.distributed.adversary.Adversary` or None."""
    if adversary is not None and not isinstance(adversary, Adversary):
        raise TypeError(
            f"adversary must be a signsgd.distributed.adversary.Adversary or None, "
            f"got {type(adversary).__name__}"
        )
    return adversary


def _specs(tensors: Any, who: str) -> list[TensorSpec | None]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{who}: expected a list of tensors or None, got {type(tensors).__name__}")
    out: list[TensorSpec | None] = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
        elif not isinstance(t, Tensor):
            raise TypeError(f"{who}: entry {i} is a {type(t).__name__}, not a tensor or None")
        else:
            out.append(spec_of(t))
    return out


def flat_dtype(agreed: Agreed) -> torch.dtype:
    """The dtype of a step's flat buffer: the promotion of every agreed dtype (sign- and
    value-preserving), the same on every rank."""
    dtype: torch.dtype | None = None
    for s in agreed.specs:
        if s is not None:
            dtype = s.dtype if dtype is None else torch.promote_types(dtype, s.dtype)
    return torch.float32 if dtype is None else dtype


def _device(tensors: list[Tensor | None]) -> torch.device:
    return next((t.device for t in tensors if t is not None), torch.device("cpu"))


def split(flat: Tensor, agreed: Agreed) -> list[Tensor | None]:
    """Views of ``flat`` shaped (and cast) like the agreed tensors; ``None`` where absent."""
    out: list[Tensor | None] = []
    off = 0
    for s in agreed.specs:
        if s is None:
            out.append(None)
            continue
        out.append(flat[off:off + s.numel].view(s.shape).to(s.dtype))
        off += s.numel
    return out


class Reducer(ReducerProtocol):
    """Base class of the reducers: the shared front-end, counters, checkpoints, pickling.

    Subclasses implement :meth:`reduce_flat` (the core), and may refine
    :meth:`check_compressor` and :meth:`config`.

    Args:
        group: process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialised).
        adversary: a Byzantine attack on what this rank sends (fault-tolerance experiments;
            give it only to the bad ranks).

    Example:
        >>> issubclass(AllReduce, Reducer), AllReduce().state_dict()
        (True, {'step': 0})
    """

    #: whether the core can run on a view of the caller's tensors (it never writes them).
    reads_only: ClassVar[bool] = True

    def __init__(self, group: Any = None, adversary: Adversary | None = None) -> None:
        # communication
        self.group = group                              # None: the default group
        self.adversary = check_adversary(adversary)     # Byzantine behaviour of this rank
        # state, checkpointed
        self.step = 0                                   # successful steps (ties, attacks)
        # byte counters: payload of the last step, and accumulated
        self.bytes_sent = 0
        self.bytes_received = 0
        self.total_bytes_sent = 0
        self.total_bytes_received = 0
        # seconds of the last step in packing, collectives and unpacking (not state)
        self.timings: dict[str, float] = {}
        # reused buffers (never state: not saved, not pickled)
        self.scratch = Scratch()

    # ------------------------------------------------------------------ the protocol
    def comm_stats(self) -> CommStats:
        """The last committed step's bytes and time split, and the totals (Telemetry).

        Example:
            >>> AllReduce().comm_stats().bytes_sent
            0
        """
        return CommStats(int(self.bytes_sent), int(self.bytes_received), dict(self.timings),
                         int(self.total_bytes_sent), int(self.total_bytes_received))

    def check_compressor(self, compressor: Compressor | None) -> None:
        """Raise ``ValueError`` if this reducer cannot serve an optimiser that transmits
        with ``compressor`` (``None``: a sign optimiser, which keeps no residual)."""

    def config(self, compressor: Compressor | None) -> tuple[Any, ...]:
        """What must be equal on every rank (its digest travels in the step header)."""
        return (type(self).__name__, None if compressor is None else repr(compressor))

    def seed(self) -> int:
        """The tie-breaking seed carried in the header (0 for reducers without ties)."""
        return 0

    def reduce_flat(self, flat: Tensor, agreed: Agreed, *, step: int,
                    compressor: Compressor | None, owned: bool) -> FlatReduction:
        """The core: reduce ``flat`` (the agreed tensors, concatenated) across the ranks.

        ``owned`` says ``flat`` is a buffer of this reducer (it may be overwritten);
        otherwise it may be a view of the caller's tensor and must be left unchanged.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ the front-end
    def reduce(self, tensors: list[Tensor | None], *, finite: bool | Tensor = True,
               compressor: Compressor | None = None, settings: Any = None,
               commit: bool = True) -> Reduction:
        """Reduce ``tensors`` across the ranks (see the module docstring).

        Args:
            tensors: this rank's tensors, ``None`` where it has no value; the same number
                (and, where present, the same layouts) on every rank.
            finite: ``False`` when this rank's input holds a NaN or inf (the caller checks;
                a 0-d bool tensor on an accelerator travels without a host read).
            compressor: the optimiser's compressor (EF-SGD), ``None`` for sign optimisers.
            settings: the optimiser's hyper-parameters (any ``repr``-able value), checked to
                be equal on every rank.
            commit: take the step's state at once; ``False``: only when the caller calls
                the result's :meth:`Reduction.commit` (nothing changes before).

        Raises:
            NonFiniteGradientError: ``finite=False`` on some rank (raised on every rank).
            ValueError: layouts, steps, configurations or settings differ.
            CollectiveError: a peer died or timed out.
        """
        who = type(self).__name__
        specs = _specs(tensors, who)
        step, group, device = self.step, self.group, _device(tensors)
        config = self.config(compressor)

        def job() -> tuple[Reduction, int, int, dict[str, float], Any]:
            with timing() as spent:
                agreed = exchange(specs, group=group, finite=finite, step=step,
                                  seed=self.seed(), config=config, who=who, settings=settings,
                                  device=device)
                with phase("pack"):
                    flat, owned = self._flatten(tensors, agreed, device)
                out = self.reduce_flat(flat, agreed, step=step, compressor=compressor,
                                       owned=owned)
            transmitted: list[Tensor | None] | None = None
            if out.kind is Kind.MEAN:
                transmitted = list(tensors)
            elif out.kind is Kind.COMPRESSED and out.transmitted is not None:
                transmitted = [None if t is None else v
                               for t, v in zip(tensors, split(out.transmitted, agreed))]
            reduction = Reduction(split(out.update, agreed), transmitted, out.kind is Kind.VOTE)
            return (reduction, agreed.sent + out.sent, agreed.received + out.received, spent,
                    out.state)

        reduction, sent, received, spent, state = engine.run(group, job, device)
        reduction.pending = Step(self, step + 1, sent, received, spent, state)
        if commit:
            reduction.commit()
        return reduction

    def commit(self, pending: Step) -> None:
        """Take the state of a reduction: its step counter, byte counts and timings (and
        the core's state, :meth:`keep`).

        Raises:
            RuntimeError: another reduction was committed since this one was computed.
        """
        if pending.step != self.step + 1:
            raise RuntimeError(
                f"{type(self).__name__}: a reduction of step {pending.step - 1} committed at "
                f"step {self.step} (commit each reduction before the next one)")
        self.step = pending.step
        self.timings = pending.timings
        self.bytes_sent, self.bytes_received = int(pending.sent), int(pending.received)
        self.total_bytes_sent += self.bytes_sent
        self.total_bytes_received += self.bytes_received
        self.keep(pending.state)

    def keep(self, state: Any) -> None:
        """Take the core's state of a committed step (:attr:`FlatReduction.state`)."""

    def _flatten(self, tensors: list[Tensor | None], agreed: Agreed, device: torch.device
                 ) -> tuple[Tensor, bool]:
        """The agreed tensors in one flat buffer (zeros where this rank has ``None``).

        A single present tensor of the flat dtype is used as it is (a view) when the core
        only reads it; otherwise the tensors are concatenated into a reused buffer."""
        dtype = flat_dtype(agreed)
        parts = [t for t, s in zip(tensors, agreed.specs) if s is not None]
        if (len(parts) == 1 and parts[0] is not None and parts[0].dtype == dtype
                and parts[0].is_contiguous() and self.reads_only):
            return parts[0].view(-1), False
        flat = self.scratch.get("flat", agreed.numel, dtype, device, exact=True)
        off = 0
        for t, s in zip(tensors, agreed.specs):
            if s is None:
                continue
            if t is None:
                flat[off:off + s.numel].zero_()
            else:
                flat[off:off + s.numel].copy_(t.reshape(-1))
            off += s.numel
        return flat, True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"step": int}``: the step counter (tie-breaking and adversary draws use it)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) if malformed."""
        self._check_state(state, set())
        self.step = int(state["step"])

    def _check_state(self, state: Any, extra: set[str]) -> None:
        name = type(self).__name__
        if not isinstance(state, dict):
            raise ValueError(f"{name} state must be a dict, got {type(state).__name__}")
        unknown = set(state) - {"step"} - extra
        if unknown or "step" not in state:
            raise ValueError(f"{name} state needs key 'step' (and may hold {sorted(extra)}), "
                             f"got keys {sorted(state)}")
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{name} state: invalid step {step!r}")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class AllReduce(Reducer):
    r"""fp32 mean all-reduce: the baseline every compressed reducer is measured against.

    .. math:: v = \frac{1}{M} \sum_{r=1}^{M} C(u_r)

    ``u_r`` is what rank ``r``'s optimiser sends (its direction for a sign optimiser, which
    then takes the sign of the mean; its error-compensated step for EF-SGD, compressed per
    tensor by the optimiser's compressor ``C`` when it has one — EF-SGD with exact mean
    aggregation and a worker error per rank). All tensors go into one flat buffer (the
    promoted dtype, e.g. fp32) and one ``all_reduce`` per step, after the header. Torch
    optimisers use it through :class:`~signsgd.distributed.AverageGradients`. Bytes are
    counted as a ring: ``2·(M−1)·⌈n/M⌉·itemsize`` each way, plus the header.

    Args:
        group: process group (``None``: the default group).
        adversary: Byzantine attack on the vector this rank contributes
            (``adversary.corrupt_gradient``, e.g. ``Negate(scale=...)``).

    Example:
        >>> AllReduce().reduce([torch.tensor([1.0, -2.0])]).update   # one process
        [tensor([ 1., -2.])]
    """

    reads_only = False

    def reduce_flat(self, flat: Tensor, agreed: Agreed, *, step: int,
                    compressor: Compressor | None, owned: bool) -> FlatReduction:
        _, m = world(self.group)
        transmitted = None
        if compressor is not None:
            with phase("pack"):
                off = 0
                for s in agreed.specs:
                    if s is not None:
                        seg = flat[off:off + s.numel]
                        seg.copy_(compressor(seg.view(s.shape)).reshape(-1))
                        off += s.numel
                transmitted = self.scratch.get("transmitted", flat.numel(), flat.dtype,
                                               flat.device).copy_(flat)
        wire = flat if self.adversary is None else self.adversary.corrupt_gradient(flat,
                                                                                   step=step)
        if m > 1 and wire.numel():
            all_reduce(wire, self.group)
            wire.div_(m)
        nbytes = ring_nbytes(wire.numel(), m, wire.element_size())
        kind = Kind.MEAN if transmitted is None else Kind.COMPRESSED
        return FlatReduction(wire, kind, transmitted, nbytes, nbytes)

    def __repr__(self) -> str:
        return f"AllReduce(adversary={self.adversary!r})"
