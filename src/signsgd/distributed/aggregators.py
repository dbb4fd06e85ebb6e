"""The distributed aggregators: ``MajorityVote``, ``AllReduce``, ``ErrorFeedbackAllReduce``.

Each is one object per rank, handed to an optimiser of :mod:`signsgd.optim` through
``aggregator=``; :mod:`signsgd.distributed.base` describes the contract (stages, ``None``
entries, the finite flag, byte counters, checkpoints).

Every step of every aggregator issues the same collectives in the same order on every rank:

1. the header ``all_gather`` of :func:`signsgd.distributed.vote.exchange_header` (layout,
   finite flag, step counter, configuration), plus a per-tensor table exchange only when a
   tensor is missing on some rank or layouts differ — a decision every rank makes from the
   same gathered headers. A NaN/inf on any rank raises
   :class:`~signsgd.distributed.base.NonFiniteGradientError` on every rank here, before any
   payload moves; mismatched layouts raise ``ValueError`` naming each rank's values.
2. a fixed number of payload collectives that depends only on the agreed total numel.

``None`` entries (no gradient on this rank) contribute zeros. A tensor that is ``None`` on
*every* rank gets ``None`` back on every rank, so the optimiser leaves that parameter
alone everywhere (no update, no weight decay), like a single-process optimiser does.

Steps that raise leave the aggregator's state (step counter, server error) unchanged.

Byte counters (``bytes_sent`` / ``bytes_received`` of the last step, ``total_*``) count
payload bytes this rank sends to / receives from the other ranks, including the header,
under these algorithms: an ``all_gather`` or ``all_to_all_single`` moves each block once
between each pair of ranks; an ``all_reduce`` of ``n`` elements is counted as a ring,
``2·(M−1)·⌈n/M⌉`` elements each way.

Aggregators pickle without their process group (it comes back as ``None``, the default
group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from signsgd.compression import Compressor, Identity, ScaledSign
from signsgd.distributed.adversary import Adversary
from signsgd.distributed.base import Aggregator
from signsgd.distributed.vote import (
    MODES,
    Agreed,
    Entry,
    _all_gather,
    _world,
    all_reduce,
    all_to_all,
    entry_of,
    exchange_header,
    run_now,
    shard_nbytes,
    vote_flat,
)
from signsgd.packing import pack_signs_abs, sum_scaled_signs, unpack_scaled_signs

__all__ = ["MajorityVote", "AllReduce", "ErrorFeedbackAllReduce", "DEFAULT_BUCKET_BYTES"]

#: default bucket size of :class:`MajorityVote`, in packed bytes (8 coordinates per byte).
DEFAULT_BUCKET_BYTES = 1 << 25


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an int >= {low})")
    return value


def _check_adversary(adversary: Any) -> Adversary | None:
    if adversary is not None and not isinstance(adversary, Adversary):
        raise TypeError(
            f"adversary must be a signsgd.distributed.adversary.Adversary or None, "
            f"got {type(adversary).__name__}"
        )
    return adversary


def _entries(tensors: list[Tensor | None], who: str, floating: bool) -> list[Entry | None]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{who}: expected a list of tensors or None, got {type(tensors).__name__}")
    out: list[Entry | None] = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: entry {i} is a {type(t).__name__}, not a tensor or None")
        if floating and not t.is_floating_point():
            raise TypeError(f"{who}: entry {i} has dtype {t.dtype}; a floating dtype is needed")
        out.append(entry_of(t))
    return out


def _flat_dtype(agreed: Agreed) -> torch.dtype:
    """The dtype of the step's flat buffer: the promotion of every agreed dtype (sign- and
    value-preserving), the same on every rank."""
    dtype: torch.dtype | None = None
    for e in agreed.entries:
        if e is not None:
            dtype = e.dtype if dtype is None else torch.promote_types(dtype, e.dtype)
    return torch.float32 if dtype is None else dtype


def _device(tensors: list[Tensor | None]) -> torch.device:
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


def _flatten(tensors: list[Tensor | None], agreed: Agreed, dtype: torch.dtype,
             device: torch.device, copy: bool = True, out: Tensor | None = None) -> Tensor:
    """Concatenate the agreed tensors (zeros where this rank has ``None``) into one buffer
    (``out`` when given, unless one tensor can be used as it is and ``copy`` is false)."""
    parts = []
    for t, e in zip(tensors, agreed.entries):
        if e is None:
            continue
        if t is None:
            parts.append(torch.zeros(e.numel, dtype=dtype, device=device))
        else:
            parts.append(t.reshape(-1).to(dtype))
    if not parts:
        return torch.zeros(0, dtype=dtype, device=device)
    if len(parts) == 1 and not copy:
        return parts[0]
    if out is not None:
        return out.copy_(parts[0]) if len(parts) == 1 else torch.cat(parts, out=out)
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _split(flat: Tensor, agreed: Agreed) -> list[Tensor | None]:
    """Views of ``flat`` shaped (and cast) like the agreed entries; ``None`` where absent."""
    out: list[Tensor | None] = []
    off = 0
    for e in agreed.entries:
        if e is None:
            out.append(None)
            continue
        out.append(flat[off:off + e.numel].view(e.shape).to(e.dtype))
        off += e.numel
    return out


def _ring_bytes(numel: int, m: int, itemsize: int) -> int:
    return 0 if m == 1 else 2 * (m - 1) * (-(-numel // m)) * itemsize


class _Common(Aggregator):
    """Group, step counter, pickling without the process group."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group = group
        self.step = 0
        self._buffers: dict[tuple[Any, ...], Tensor] = {}

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device
                ) -> Tensor:
        """A buffer kept across steps (fresh large allocations cost page faults)."""
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["group"] = None
        state["_buffers"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _run(self, tensors: list[Tensor | None], job: Any) -> Any:
        return run_now(self.group, job, _device(tensors))

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int}``: the step counter (tie-breaking and adversary draws use it)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) if malformed."""
        self._load_step(state, set())
        self.step = int(state["step"])

    def _load_step(self, state: dict[str, Any], extra: set[str]) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"{type(self).__name__} state must be a dict, got {type(state)}")
        unknown = set(state) - {"step"} - extra
        if unknown or "step" not in state:
            raise ValueError(
                f"{type(self).__name__} state needs key 'step' (and may hold {sorted(extra)}), "
                f"got keys {sorted(state)}"
            )
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{type(self).__name__} state: invalid step {step!r}")


class MajorityVote(_Common):
    r"""Majority-vote aggregator for ``SignSGD`` / ``Signum`` (stage ``"sign"``; Algorithm 3).

    Each rank sends the signs of its direction (gradient for SignSGD, momentum for Signum)
    and every rank gets back the ±1 verdict

    .. math:: v = \operatorname{sign}\Big(\sum_{r=1}^{M} \operatorname{sign}(m_r)\Big)

    with zero sent as +1 and ties (even M) broken by bits every rank draws identically from
    ``(seed, step)``. All tensors of a step go into one flat buffer, voted in buckets of
    ``bucket_bytes`` packed bytes (``8·bucket_bytes`` coordinates, rounded down to whole
    64-bit words): per step one header ``all_gather`` plus, per bucket, one
    ``all_to_all_single`` and one ``all_gather`` (``"sharded"``) or one ``all_gather``
    (``"allgather"``). See :mod:`signsgd.distributed.vote` for the protocol and bytes.

    ``None`` entries contribute zeros, which go out as +1; a tensor absent on every rank
    gets ``None`` (its parameter is not updated anywhere). The returned tensors are views
    of a buffer the aggregator reuses: valid until its next call (the optimisers apply
    them at once).

    Args:
        group: process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialised).
        mode: ``"sharded"`` (default) or ``"allgather"``.
        bucket_bytes: packed bytes per bucket (>= 8; default 32 MiB, i.e. 2^28 coordinates).
        seed: tie-breaking seed, the same on every rank.
        adversary: Byzantine attack on the signs this rank sends (give it only to the bad
            ranks; :mod:`signsgd.distributed.adversary`).

    Example:
        >>> agg = MajorityVote()   # one process: the vote is sign with 0 -> +1
        >>> agg.reduce_signs([torch.tensor([0.0, -3.0]), None])
        [tensor([ 1., -1.]), None]

    Reference: Bernstein et al., signSGD, ICML 2018, Algorithm 3; Bernstein et al.,
    signSGD with Majority Vote is Communication Efficient and Fault Tolerant, ICLR 2019.
    """

    stage = "sign"

    def __init__(self, group: Any = None, mode: str = "sharded",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, seed: int = 0,
                 adversary: Adversary | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r} (must be one of {MODES})")
        _check_int("bucket_bytes", bucket_bytes, 8)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Invalid seed: {seed!r} (must be an int)")
        super().__init__(group)
        self.mode = mode
        self.bucket_bytes = bucket_bytes
        self.seed = seed
        self.adversary = _check_adversary(adversary)

    @property
    def bucket_numel(self) -> int:
        """Coordinates per bucket: ``64·⌊bucket_bytes/8⌋``."""
        return 64 * (self.bucket_bytes // 8)

    def reduce_signs(self, tensors: list[Tensor | None], *, finite: bool = True
                     ) -> list[Tensor | None]:
        """Return the ±1 majority verdict of each tensor (``None`` where absent everywhere).

        Raises:
            NonFiniteGradientError: ``finite=False`` on some rank (raised on every rank).
            ValueError: layouts differ across ranks (every rank; names each rank's values).
        """
        entries = _entries(tensors, "MajorityVote", floating=False)
        step, mode, seed = self.step, self.mode, self.seed
        bucket = self.bucket_numel
        group, adversary = self.group, self.adversary
        device = _device(tensors)

        def job() -> tuple[list[Tensor | None], int, int]:
            agreed = exchange_header(entries, group=group, finite=bool(finite), step=step,
                                     seed=seed, config=("MajorityVote", mode, bucket),
                                     who="MajorityVote", device=device)
            dtype = _flat_dtype(agreed)
            d = agreed.numel
            flat = _flatten(tensors, agreed, dtype, device, copy=False,
                            out=self._buffer("flat", d, dtype, device))
            verdict = self._buffer("verdict", d, dtype, device)
            sent, received = agreed.sent, agreed.received
            for start in range(0, d, bucket):
                end = min(start + bucket, d)
                _, s, r = vote_flat(flat[start:end], group=group, mode=mode, seed=seed,
                                    step=step, word_offset=start // 64, adversary=adversary,
                                    out=verdict[start:end])
                sent += s
                received += r
            return _split(verdict, agreed), sent, received

        result, sent, received = self._run(tensors, job)
        self.step = step + 1
        self._count(sent, received)
        return result

    def __repr__(self) -> str:
        return (f"MajorityVote(mode={self.mode!r}, bucket_bytes={self.bucket_bytes}, "
                f"seed={self.seed}, adversary={self.adversary!r})")


class AllReduce(_Common):
    r"""fp32 mean all-reduce of the gradients (stage ``"gradient"``): the baseline.

    .. math:: \bar g = \frac{1}{M} \sum_{r=1}^{M} g_r

    All gradients go into one flat buffer (promoted dtype, e.g. fp32) and one
    ``dist.all_reduce`` per step (after the header). Works with every optimiser of this
    library. A ``None`` entry contributes zeros to the mean; a tensor absent on every rank
    gets ``None``. Bytes are counted as a ring all-reduce: ``2·(M−1)·⌈n/M⌉·itemsize`` each
    way, plus the header. With ``M > 1`` the returned tensors are views of a buffer the
    aggregator reuses: valid until its next call (the optimisers use them at once).

    Args:
        group: process group (``None``: the default group).
        adversary: Byzantine attack on the gradient this rank contributes
            (``adversary.corrupt_gradient``, e.g. ``Negate(scale=...)``).

    Example:
        >>> AllReduce().reduce_gradients([torch.tensor([1.0, -2.0])])   # one process
        [tensor([ 1., -2.])]
    """

    stage = "gradient"

    def __init__(self, group: Any = None, adversary: Adversary | None = None) -> None:
        super().__init__(group)
        self.adversary = _check_adversary(adversary)

    def reduce_gradients(self, grads: list[Tensor | None], *, finite: bool = True
                         ) -> list[Tensor | None]:
        """Return the mean over ranks of each gradient (``None`` where absent everywhere).

        Raises:
            NonFiniteGradientError: ``finite=False`` on some rank (raised on every rank).
            ValueError: layouts differ across ranks.
        """
        entries = _entries(grads, "AllReduce", floating=True)
        step, group, adversary = self.step, self.group, self.adversary
        device = _device(grads)

        def job() -> tuple[list[Tensor | None], int, int]:
            agreed = exchange_header(entries, group=group, finite=bool(finite), step=step,
                                     seed=0, config=("AllReduce",), who="AllReduce",
                                     device=device)
            _, m = _world(group)
            dtype = _flat_dtype(agreed)
            # M > 1: into a buffer kept across steps (a fresh 4·d-byte tensor per step
            # costs page faults, more than the loopback all-reduce itself at d = 25M).
            out = self._buffer("flat", agreed.numel, dtype, device) if m > 1 else None
            flat = _flatten(grads, agreed, dtype, device, out=out)
            if adversary is not None:
                flat = adversary.corrupt_gradient(flat, step=step)
            if m > 1 and flat.numel():
                all_reduce(flat, group)
                flat.div_(m)
            ring = _ring_bytes(flat.numel(), m, flat.element_size()) if flat.numel() else 0
            return _split(flat, agreed), agreed.sent + ring, agreed.received + ring

        result, sent, received = self._run(grads, job)
        self.step = step + 1
        self._count(sent, received)
        return result

    def __repr__(self) -> str:
        return f"AllReduce(adversary={self.adversary!r})"


class ErrorFeedbackAllReduce(_Common):
    r"""Two-stage error-feedback all-reduce for ``EFSGD`` (stage ``"error_feedback"``).

    Each rank hands over ``p = lr·g + e`` (its worker error already added by the optimiser).
    The flat buffer of all tensors is split into ``M`` shards of ``C = 64·⌈⌈d/64⌉/M⌉``
    coordinates; a *chunk* is the intersection of one tensor with one shard.

    1. Worker: for each chunk ``c``, ``Δ_c = C(p_c)``; this rank's transmitted vector is
       returned so the optimiser keeps ``e ← p − Δ``. Shard ``r``'s chunks go to rank ``r``.
    2. Server (rank ``r``, its shard): ``q = (1/M)·Σ_w Δ_w + e_s``, then per chunk
       ``Δ'_c = C(q_c)`` and ``e_s ← q − Δ'``; ``Δ'`` goes back to every rank, and every
       rank applies the same update ``x ← x − Δ'``.

    Compressors:

    * :class:`~signsgd.compression.ScaledSign` (EF-signSGD): on the wire 1 bit per
      coordinate plus one scale per chunk each way: ``Δ_c = (‖p_c‖₁/|c|)·s`` with
      ``s = +1`` where ``p ≥ 0`` and −1 elsewhere — note zero goes out as +1, unlike
      ``torch.sign`` — in one ``all_to_all_single`` and one ``all_gather`` of uint8.
    * :class:`~signsgd.compression.Identity`: exactly an fp32 mean ``all_reduce`` (no
      error, no server state).
    * any other compressor (``Sign``, ``TopK``, ``RandomK``, ...): the same two-stage
      algorithm with ``C`` applied per chunk, sent uncompressed in the flat dtype (correct,
      not bandwidth-saving).
    * ``M = 1``: no communication; ``Δ = C(p)`` per tensor, exactly single-process EF-SGD.

    Bytes (each way, plus the header): ScaledSign ``2·(M−1)·B`` with ``B = C/8 + K·itemsize``
    rounded up to 8, ``K`` the most chunks in any shard; generic ``2·(M−1)·C·itemsize``;
    Identity a ring all-reduce.

    The server error belongs to the agreed layout (per-tensor numels, dtype, M); if the
    layout changes (e.g. a parameter gets its first gradient) it restarts from zero.
    With ``M > 1`` the returned tensors are views of buffers the aggregator reuses: valid
    until its next call (the optimiser applies them at once).

    Byzantine ranks (``adversary=``) corrupt what they send in the worker stage: the packed
    sign bits (``corrupt_signs``; the scales stay honest) with ScaledSign, the float vector
    (``corrupt_gradient``) otherwise; with ``M = 1`` the update itself. Their own worker
    error is computed from the honest ``C(p)``.

    Args:
        group: process group (``None``: the default group).
        adversary: Byzantine attack on what this rank sends (give it only to bad ranks).

    Example:
        >>> from signsgd.compression import ScaledSign
        >>> agg = ErrorFeedbackAllReduce()   # one process
        >>> agg.reduce_error_feedback([torch.tensor([1.0, -3.0])], ScaledSign())
        ([tensor([ 2., -2.])], [tensor([ 2., -2.])])

    Reference: Karimireddy, Rebjock, Stich, Jaggi. Error Feedback Fixes SignSGD and other
    Gradient Compression Schemes. ICML 2019; the two-stage (worker + server error) scheme
    follows Zheng, Huang, Kwok, Communication-Efficient Distributed Blockwise Momentum SGD
    with Error-Feedback, NeurIPS 2019.
    """

    stage = "error_feedback"

    def __init__(self, group: Any = None, adversary: Adversary | None = None) -> None:
        super().__init__(group)
        self.adversary = _check_adversary(adversary)
        self.server_error: Tensor | None = None
        self._layout: tuple[Any, ...] | None = None

    def reduce_error_feedback(
        self, tensors: list[Tensor | None], compressor: Compressor, *, finite: bool = True
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Return ``(transmitted, update)`` (see the class docstring).

        ``transmitted[i]`` is ``None`` where this rank has no tensor; ``update[i]`` is
        ``None`` only where every rank has none.

        Raises:
            NonFiniteGradientError: ``finite=False`` on some rank (raised on every rank).
            ValueError: layouts differ across ranks.
        """
        if not callable(compressor):
            raise TypeError(f"compressor must be callable, got {compressor!r}")
        entries = _entries(tensors, "ErrorFeedbackAllReduce", floating=True)
        if isinstance(compressor, ScaledSign):
            kind = "scaled_sign"
        elif isinstance(compressor, Identity):
            kind = "identity"
        else:
            kind = "generic"
        step, group, adversary = self.step, self.group, self.adversary
        device = _device(tensors)
        server_error, layout = self.server_error, self._layout

        def job() -> tuple[Any, ...]:
            agreed = exchange_header(
                entries, group=group, finite=bool(finite), step=step, seed=0,
                config=("ErrorFeedbackAllReduce", kind, type(compressor).__name__),
                who="ErrorFeedbackAllReduce", device=device,
            )
            rank, m = _world(group)
            dtype = _flat_dtype(agreed)
            if m == 1:
                tx = [None if t is None else compressor(t) for t in tensors]
                upd = [None if e is None else t for t, e in zip(tx, agreed.entries)]
                if adversary is not None:
                    upd = [None if u is None else adversary.corrupt_gradient(u, step=step)
                           for u in upd]
                return tx, upd, 0, 0, server_error, layout
            if kind == "identity":
                flat = _flatten(tensors, agreed, dtype, device)
                mean = flat
                if adversary is not None:
                    mean = adversary.corrupt_gradient(mean, step=step)
                if mean.numel():
                    all_reduce(mean, group)
                    mean.div_(m)
                ring = _ring_bytes(flat.numel(), m, flat.element_size())
                tx = [None if t is None else t.clone() for t in tensors]
                return (tx, _split(mean, agreed), agreed.sent + ring, agreed.received + ring,
                        server_error, layout)
            key = (kind, m, dtype, tuple(None if e is None else e.numel
                                         for e in agreed.entries))
            err = server_error if (layout == key and server_error is not None) else None
            d = agreed.numel
            c = 8 * shard_nbytes(d, m)
            if kind == "scaled_sign":
                flat = _flatten(tensors, agreed, dtype, device, copy=False,
                                out=self._buffer("flat", d, dtype, device)
                                if _needs_copy(tensors, agreed, dtype) else None)
                if not flat.is_contiguous():
                    flat = self._buffer("flat", d, dtype, device).copy_(flat)
                tx_flat, upd_flat, new_err, nbytes = _two_stage_scaled_sign(
                    flat, c, agreed, err, group=group, rank=rank, m=m,
                    adversary=adversary, step=step, owner=self)
                tx = [None if t is None else v
                      for t, v in zip(tensors, _split(tx_flat, agreed))]
                return (tx, _split(upd_flat, agreed), agreed.sent + nbytes,
                        agreed.received + nbytes, new_err, key)
            padded = self._buffer("padded", m * c, dtype, device)
            _flatten(tensors, agreed, dtype, device, out=padded[:d])
            padded[d:].zero_()
            tx_flat, upd_flat, new_err, nbytes = _two_stage(
                padded, d, agreed, compressor, kind, err, group=group, rank=rank, m=m,
                adversary=adversary, step=step,
                buffer=lambda name, n: self._buffer(name, n, dtype, device))
            tx = [None if t is None else v for t, v in zip(tensors, _split(tx_flat, agreed))]
            return (tx, _split(upd_flat, agreed), agreed.sent + nbytes,
                    agreed.received + nbytes, new_err, key)

        tx, upd, sent, received, new_err, new_layout = self._run(tensors, job)
        self.server_error, self._layout = new_err, new_layout
        self.step = step + 1
        self._count(sent, received)
        return tx, upd

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "server_error", "layout"}``: a copy of this rank's server error."""
        return {
            "step": self.step,
            "server_error": None if self.server_error is None else self.server_error.clone(),
            "layout": self._layout,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) if malformed."""
        self._load_step(state, {"server_error", "layout"})
        err = state.get("server_error")
        if err is not None and not isinstance(err, Tensor):
            raise ValueError(f"server_error must be a tensor or None, got {type(err).__name__}")
        layout = state.get("layout")
        if layout is not None and not isinstance(layout, tuple):
            raise ValueError(f"layout must be a tuple or None, got {type(layout).__name__}")
        self.step = int(state["step"])
        self.server_error = None if err is None else err.clone()
        self._layout = layout

    def __repr__(self) -> str:
        return f"ErrorFeedbackAllReduce(adversary={self.adversary!r})"


def _chunks(agreed: Agreed, d: int, c: int, m: int) -> list[list[tuple[int, int]]]:
    """Per shard, the (start, end) global coordinates of its chunks, in order."""
    bounds = []
    off = 0
    for e in agreed.entries:
        if e is not None:
            bounds.append((off, off + e.numel))
            off += e.numel
    out: list[list[tuple[int, int]]] = []
    for r in range(m):
        lo, hi = r * c, min((r + 1) * c, d)
        out.append([(max(a, lo), min(b, hi)) for a, b in bounds
                    if max(a, lo) < min(b, hi)])
    return out


def _scaled_sign_chunk(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, ±1 signs)`` of a chunk: scale ``‖v‖₁/|v|``, sign +1 for ``v >= 0``."""
    scale = v.abs().sum() / v.numel()
    signs = torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
    return scale, signs


def _two_stage(
    padded: Tensor, d: int, agreed: Agreed, compressor: Compressor, kind: str,
    err: Tensor | None, *, group: Any, rank: int, m: int, adversary: Adversary | None,
    step: int, buffer: Callable[[str, int], Tensor],
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The worker + server stages for a generic compressor (ScaledSign has its own,
    :func:`_two_stage_scaled_sign`) on ``padded`` (the flat p of ``d`` coordinates, zero
    padded to ``M·C``); returns (transmitted, update, new server error, bytes). The first
    two are views of reused buffers."""
    dtype, device = padded.dtype, padded.device
    flat = padded[:d]
    c = padded.numel() // m  # coordinates per shard, a multiple of 64
    chunks = _chunks(agreed, d, c, m)
    if err is None:
        err = torch.zeros(c, dtype=dtype, device=device)
    tx = buffer("tx", m * c)
    tx[d:].zero_()  # chunks cover [0, d)
    for r in range(m):
        for a, b in chunks[r]:
            tx[a:b] = compressor(padded[a:b])
    recv = torch.empty(m * c, dtype=dtype, device=device)
    wire = tx if adversary is None else adversary.corrupt_gradient(tx, step=step)
    if d:
        all_to_all(recv, wire, group)
    rows = recv.view(m, c)
    q = rows[0].clone()
    for w in range(1, m):
        q += rows[w]
    q.div_(m)
    q += err
    mine = torch.zeros(c, dtype=dtype, device=device)
    base = rank * c
    for a, b in chunks[rank]:
        mine[a - base:b - base] = compressor(q[a - base:b - base])
    new_err = q - mine
    new_err[sum(b - a for a, b in chunks[rank]):] = 0
    upd = buffer("update", m * c)
    if d:
        _all_gather(upd, mine, group)
    nbytes = 2 * (m - 1) * c * flat.element_size() if d else 0
    return tx[:d], upd[:d], new_err, nbytes


def _needs_copy(tensors: list[Tensor | None], agreed: Agreed, dtype: torch.dtype) -> bool:
    """Whether the step's flat vector must be assembled in a buffer (else: one tensor's view)."""
    present = [(t, e) for t, e in zip(tensors, agreed.entries) if e is not None]
    if len(present) != 1:
        return True
    t = present[0][0]
    return t is None or t.dtype != dtype or not t.is_contiguous()


def _pack_and_scales(v: Tensor, lengths: list[int], scratch: Tensor, packed: Tensor
                     ) -> list[float]:
    """Pack the signs of ``v`` into ``packed`` and return, per chunk (consecutive segments
    of ``v`` of the given lengths), the scale ``‖v_c‖₁/|c|`` computed exactly as
    :func:`_scaled_sign_chunk` does (``|v|`` summed, then divided); ``|v|`` is written
    into ``scratch`` in the pack's pass."""
    absv = scratch[:v.numel()]
    pack_signs_abs(v, out=packed, abs_out=absv)
    sums = [part.sum() / n for part, n in zip(absv.split(lengths), lengths)]
    return torch.stack(sums).tolist() if sums else []


def _unpack_scaled(packed: Tensor, lengths: list[int], scales: list[float], out: Tensor
                   ) -> None:
    """``out`` (consecutive segments of the given lengths) = ±scale of its segment, from the
    packed bits of ``out``'s coordinates (the same values as ±1 · scale)."""
    off = 0
    for n, scale in zip(lengths, scales):
        unpack_scaled_signs(packed, off, n, scale, out=out[off:off + n])
        off += n


def _two_stage_scaled_sign(
    flat: Tensor, c: int, agreed: Agreed, err: Tensor | None, *, group: Any, rank: int,
    m: int, adversary: Adversary | None, step: int, owner: _Common,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The worker + server stages of EF-signSGD on ``flat`` (the contiguous p of ``d``
    coordinates; shards of ``c``); returns (transmitted, update, new server error, bytes).

    The same arithmetic as the per-chunk definition (``scale = |v|.sum() / n``;
    ``Δ = ±1·scale``; ``q = ((Σ_w Δ_w) / M) + e_s``), without per-coordinate expansion of
    the scales: the ±1 signs are unpacked straight into reused buffers and each chunk (a
    contiguous segment) is scaled through a view. Every large buffer is kept across steps;
    the new server error goes to the buffer the old one does not occupy, so a step that
    raises leaves the old one intact.
    """
    dtype, device = flat.dtype, flat.device
    d = flat.numel()

    def buf(name: str, n: int, dt: torch.dtype = dtype) -> Tensor:
        return owner._buffer(name, n, dt, device)

    chunks = _chunks(agreed, d, c, m)
    lens = [[b - a for a, b in ch] for ch in chunks]
    n_of = [sum(ln) for ln in lens]  # real coordinates per shard: min(c, d - r·c)
    kmax = max((len(ch) for ch in chunks), default=0)
    item = flat.element_size()
    sbytes = c // 8
    block = 8 * -(-(sbytes + kmax * item) // 8)
    scratch = buf("abs", max(n_of, default=0))

    # Worker stage: per shard, scales and packed signs into its row of ``send``; the
    # transmitted vector is the honest ±scale (unpacked from the row before any attack).
    send = buf("send", m * block, torch.uint8).view(m, block)
    send[:, sbytes:].zero_()
    tx = buf("tx", d)
    for r in range(m):
        n = n_of[r]
        row = send[r]
        nb = (n + 7) // 8
        if n:
            seg = flat[r * c:r * c + n]
            scales = _pack_and_scales(seg, lens[r], scratch, row[:nb])
            if kmax:
                row[sbytes:sbytes + len(scales) * item] = torch.tensor(
                    scales, dtype=dtype).view(torch.uint8)
            _unpack_scaled(row[:nb], lens[r], scales, tx[r * c:r * c + n])
        row[nb:sbytes].zero_()
        if adversary is not None:
            row[:sbytes] = adversary.corrupt_signs(row[:sbytes], step=step,
                                                   word_offset=r * c // 64)
    recv = buf("recv", m * block, torch.uint8).view(m, block)
    if d:
        all_to_all(recv.view(-1), send.view(-1), group)

    # Server stage on this rank's shard: q = (Σ_w Δ_w) / M + e_s over its n real coordinates.
    n = n_of[rank]
    mine_lens = lens[rank]
    k = len(mine_lens)
    nb = (n + 7) // 8
    q_name = "q0"
    if err is not None and owner._buffers.get(("q0", dtype, device)) is err:
        q_name = "q1"
    q = buf(q_name, c)
    qn = q[:n]
    if n:
        rows = [recv[w, :nb] for w in range(m)]
        per_w = [recv[w, sbytes:sbytes + k * item].view(dtype).tolist() for w in range(m)]
        off = 0
        for i, ln in enumerate(mine_lens):  # in worker order, as q += Δ_w
            sum_scaled_signs(rows, off, ln, [sc[i] for sc in per_w], out=qn[off:off + ln])
            off += ln
    qn.div_(m)
    if err is not None:
        qn.add_(err[:n])
    out_block = buf("out_block", block, torch.uint8)
    out_block.zero_()
    upd = buf("update", m * c)
    if n:
        scales = _pack_and_scales(qn, mine_lens, scratch, out_block[:nb])
        out_block[sbytes:sbytes + k * item] = torch.tensor(scales, dtype=dtype).view(torch.uint8)
        mine = upd[rank * c:rank * c + n]
        _unpack_scaled(out_block[:nb], mine_lens, scales, mine)
        qn.sub_(mine)  # q becomes the new server error e_s = q - Δ'
    q[n:].zero_()
    gathered = buf("gathered", m * block, torch.uint8).view(m, block)
    if d:
        _all_gather(gathered.view(-1), out_block, group)
    for r in range(m):
        nr = n_of[r]
        if r == rank or not nr:
            continue
        nbr = (nr + 7) // 8
        scales = gathered[r, sbytes:sbytes + len(lens[r]) * item].view(dtype).tolist()
        _unpack_scaled(gathered[r, :nbr], lens[r], scales, upd[r * c:r * c + nr])
    nbytes = 2 * (m - 1) * block if d else 0
    return tx[:d], upd[:d], q, nbytes
