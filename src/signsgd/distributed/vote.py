r"""1-bit majority vote across ranks: the vote core, :class:`MajorityVote` and
:func:`majority_vote` / :func:`vote_async`.

Algorithm 3 of Bernstein et al. (ICML 2018): each rank sends the signs of its vector, the
verdict is the elementwise sign of their sum, and every rank gets the same ±1 result.

.. math:: v_j = \operatorname{sign}\Big(\sum_{r=1}^{M} s_{r,j}\Big),\quad
          s_{r,j} = +1 \text{ if } x_{r,j} \ge 0 \text{ else } -1

except that ``v_j = 0`` where ``j``'s zero chunk is zero on every rank (below).

Wire format: a coordinate travels as one bit, 1 for a value >= 0 (zero → +1), 0 for a
value < 0, packed little-endian (:func:`signsgd.packing.pack_signs`); after the signs
come the activity bits, one per *zero chunk* (:func:`zero_chunks`: about ``ZERO_CHUNK``
coordinates, never spanning two tensors), 1 where this rank's chunk holds a non-zero
value. The activity bits are ORed over the ranks instead of voted, and the verdict is 0 on
every chunk that is zero on every rank: a tensor (or chunk) whose gradient is exactly zero
everywhere stays exactly still, as ``sign(0) = 0`` leaves it in single-process Signum,
where sending zero as +1 would move it by −lr each step. Inside a chunk with a non-zero
value somewhere, zero still counts as +1. The activity bits travel in the same buffers as
the signs (no extra collective), ``activity_words(d) = ⌈d/(64·ZERO_CHUNK)⌉`` words.

A vote is one step of three collectives on the process group, in the same order on every
rank: the step header (:mod:`signsgd.distributed.header`), then

* ``mode="sharded"`` (default): the packed words (signs, activity), padded to ``M·S``
  bytes, go out with one ``all_to_all_single``; rank ``r`` receives the ``M`` rows of its
  shard of ``S`` bytes (``S`` a multiple of 8 so the tally works on 64-bit words),
  tallies them with :func:`signsgd.packing.majority_tally` (ORs the activity bits), and
  one ``all_gather`` returns the packed verdicts. Each rank sends and receives about
  ``2·d/8`` bytes whatever M is.
* ``mode="allgather"``: one ``all_gather`` of all packed words; every rank tallies
  everything (``(M−1)·d/8`` bytes in): the simple reference.

Ties (even M) are broken by :func:`~signsgd.distributed.random_bits.tie_bits` of
``(seed, step, word index)``: unbiased, equal on every rank, and independent of the mode
and of bucketing, so ``"sharded"`` and ``"allgather"`` give bit-identical verdicts.

Bytes (:func:`vote_nbytes`): payload this rank sends to / receives from the other ranks,
each block moving once between each pair of ranks. For ``d`` coordinates and ``M`` ranks
with ``W = ⌈d/64⌉ + activity_words(d)`` words and ``S = 8·⌈W/M⌉``: ``sharded``
``2·(M−1)·S`` ≈ 2·(M−1)/M · d/8 each way; ``allgather`` ``(M−1)·8·W``; plus the header
``(M−1)·8·HEADER_WORDS``. With ``M = 1`` nothing moves and no collective runs.

Which to call: an optimiser holds a :class:`MajorityVote` (it reuses its buffers across
steps); :func:`majority_vote` is the vote as a function — in a loop give it ``out=`` (a
fresh result tensor costs page faults that can exceed the vote itself on large inputs);
:func:`vote_async` returns a future (the DDP hook).

Reference: Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed Optimisation
for Non-Convex Problems. ICML 2018 (Algorithm 3); Bernstein, Zhao, Azizzadenesheli,
Anandkumar. signSGD with Majority Vote is Communication Efficient and Fault Tolerant.
ICLR 2019.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from signsgd.compression import Compressor
from signsgd.distributed import engine
from signsgd.distributed.adversary import Adversary
from signsgd.distributed.collectives import all_gather, all_to_all, phase, world
from signsgd.distributed.header import HEADER_WORDS, Agreed, TensorSpec, exchange, spec_of
from signsgd.distributed.random_bits import tie_bits
from signsgd.distributed.reducer import FlatReduction, Kind, Reducer
from signsgd.functional import all_finite
from signsgd.packing import (
    majority_tally,
    pack_signs,
    pack_signs_nonzero,
    packed_nbytes,
    unpack_signs,
)
from signsgd.scratch import thread_scratch

__all__ = ["MODES", "MajorityVote", "majority_vote", "vote_async", "vote_nbytes",
           "shard_nbytes", "tie_bits", "check_seed", "HEADER_WORDS", "DEFAULT_BUCKET_BYTES",
           "ZERO_CHUNK", "activity_words", "zero_chunks", "segment_lengths"]

#: the vote modes.
MODES = ("sharded", "allgather")
#: default bucket size of :class:`MajorityVote`, in packed bytes (8 coordinates per byte).
DEFAULT_BUCKET_BYTES = 1 << 25
_ONE_BUCKET = 1 << 62


#: coordinates per zero chunk (:func:`zero_chunks`): a vote of d coordinates carries
#: :func:`activity_words` ``(d)`` 64-bit words of activity bits, one bit per chunk.
ZERO_CHUNK = 64

Runs = tuple[tuple[int, int, int, int], ...]
# Up to this many runs of still chunks, _hold_still fills them; beyond, it multiplies by a mask.
_STILL_RANGES = 1024


def _words(nbytes: int) -> int:
    return (nbytes + 7) // 8


def activity_words(numel: int) -> int:
    """64-bit words of activity bits in a vote of ``numel`` coordinates:
    ``⌈d / (64·ZERO_CHUNK)⌉ + 1`` (1/``ZERO_CHUNK`` bit per coordinate, plus 64 bits for
    the chunks that end a tensor early; 0 for ``d = 0``).

    Example:
        >>> activity_words(0), activity_words(1), activity_words(4096), activity_words(4097)
        (0, 2, 2, 3)
    """
    return -(-numel // (64 * ZERO_CHUNK)) + 1 if numel else 0


@functools.lru_cache(maxsize=256)
def zero_chunks(lengths: tuple[int, ...]) -> Runs:
    """The chunks of a vote of tensors of ``lengths`` coordinates (concatenated), as runs
    ``(start, length, chunk, bit)``: ``flat[start:start + length]`` is cut into chunks of
    ``chunk`` coordinates from the tensor's start (the last may be shorter) whose activity
    bits are ``bit, bit+1, …``.

    A chunk never spans two tensors. The chunk length is ``ZERO_CHUNK·2^j`` for the
    smallest ``j`` whose chunks fit in the ``64·activity_words(d)`` bits (``j = 0`` unless
    the tensors' last, partial chunks take more than the 64 spare bits), so the bits on the
    wire depend on ``d`` alone and rows of ``2^k`` coordinates stay whole chunks. If even
    one chunk per tensor does not fit (more tensors than bits), runs of consecutive
    tensors share one chunk. The same on every rank for the same layout.

    Example:
        >>> zero_chunks((150, 0, 10))
        ((0, 150, 64, 0), (150, 10, 10, 3))
    """
    capacity = 64 * activity_words(sum(lengths))
    segs, start = [], 0
    for n in lengths:
        if n:
            segs.append((start, n))
        start += n
    if not segs:
        return ()
    if len(segs) > capacity:
        per = -(-len(segs) // capacity)
        groups = [segs[i:i + per] for i in range(0, len(segs), per)]
        return tuple((g[0][0], g[-1][0] + g[-1][1] - g[0][0],
                      g[-1][0] + g[-1][1] - g[0][0], b) for b, g in enumerate(groups))
    c = ZERO_CHUNK
    while sum(-(-n // c) for _, n in segs) > capacity:
        c *= 2
    runs, bit = [], 0
    for s, n in segs:
        runs.append((s, n, min(c, n), bit))
        bit += -(-n // c)
    return tuple(runs)


def segment_lengths(flat: Tensor, views: Sequence[Tensor]) -> tuple[int, ...]:
    """The tensor lengths of ``flat`` for :func:`zero_chunks` when ``views`` are views of
    it (a DDP bucket's gradients): each view, and each gap between them, is one tensor.
    Views that are not disjoint slices of ``flat`` give ``(flat.numel(),)``.

    Example:
        >>> b = torch.zeros(10)
        >>> segment_lengths(b, [b[2:5], b[6:10]])
        (2, 3, 1, 4)
    """
    base, pos, out = flat.storage_offset(), 0, []
    for v in sorted(views, key=lambda t: t.storage_offset()):
        start = v.storage_offset() - base
        if start < pos or start + v.numel() > flat.numel() or not v.is_contiguous():
            return (flat.numel(),)
        if start > pos:
            out.append(start - pos)
        out.append(v.numel())
        pos = start + v.numel()
    if pos < flat.numel():
        out.append(flat.numel() - pos)
    return tuple(out)


def _bucket_lengths(lengths: Sequence[int], start: int, end: int) -> tuple[int, ...]:
    """``lengths`` clipped to the coordinates ``[start, end)`` of their concatenation."""
    out, off = [], 0
    for n in lengths:
        lo, hi = max(off, start), min(off + n, end)
        if lo < hi:
            out.append(hi - lo)
        off += n
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _chunk_index(runs: Runs) -> tuple[np.ndarray, np.ndarray]:
    """The start and the length of every chunk of ``runs``, in bit order (a partition)."""
    starts = [a for s, n, c, _ in runs for a in range(s, s + n, c)]
    ends = starts[1:] + ([runs[-1][0] + runs[-1][1]] if runs else [])
    return np.asarray(starts, dtype=np.int64), np.subtract(ends, starts, dtype=np.int64)


def _numpy_side(t: Tensor) -> bool:
    """Whether the activity work on ``t`` runs in numpy (CPU, a dtype numpy has)."""
    return t.device.type == "cpu" and t.dtype != torch.bfloat16


def _pack_activity(flat: Tensor, runs: Runs, out: Tensor, nonzero: Tensor | None,
                   dense: bool) -> None:
    """This rank's activity bits into ``out`` (uint8, ``8·activity_words`` bytes): bit 1 for
    a chunk with a value other than ±0; the pad bits are 0. On CPU ``nonzero`` holds
    ``flat != 0`` and ``dense`` says it is all True (:func:`pack_signs_nonzero`)."""
    act = torch.zeros(8 * out.numel(), dtype=torch.int8, device=flat.device)
    if not runs:
        pass
    elif nonzero is not None:  # an OR per chunk (numpy's reduceat), unless nothing is zero
        starts, _ = _chunk_index(runs)
        act.numpy()[:starts.size] = (
            1 if dense else np.maximum.reduceat(nonzero.numpy().view(np.uint8), starts))
    else:
        flat = flat.detach()
        for s, n, c, b in runs:
            f = n // c
            if f:
                act[b:b + f] = flat[s:s + f * c].reshape(f, c).any(dim=1)
            if n % c:
                act[b + f] = flat[s + f * c:s + n].any()
    act.sub_(1)  # active 1 -> 0 (packs as bit 1); inactive and pad 0 -> -1 (bit 0)
    pack_signs(act, out=out)


def _hold_still(out: Tensor, activity: Tensor, runs: Runs) -> None:
    """Zero the verdict ``out`` (as +0) on every chunk whose activity bit (OR over the
    ranks) is 0."""
    if not runs:
        return
    if _numpy_side(out):
        starts, lens = _chunk_index(runs)
        keep = np.unpackbits(activity.numpy(), count=starts.size, bitorder="little")
        if keep.all():
            return
        o = out.numpy()
        padded = np.ones(keep.size + 2, dtype=np.int8)
        padded[1:-1] = keep
        edge = np.diff(padded)
        first, stop = np.flatnonzero(edge == -1), np.flatnonzero(edge == 1)
        if first.size <= _STILL_RANGES:  # few runs of still chunks: fill them
            ends = np.append(starts, starts[-1] + lens[-1])
            for a, b in zip(starts[first].tolist(), ends[stop].tolist()):
                o[a:b] = 0
        else:
            np.multiply(o, np.repeat(keep.view(bool), lens), out=o)
            np.add(o, 0, out=o)  # -1·0 + 0 = +0
        return
    active = unpack_signs(activity, 8 * activity.numel(), torch.int8) > 0
    for s, n, c, b in runs:
        f, keep = n // c, active[b:b + -(-n // c)]
        if f:
            out[s:s + f * c].view(f, c).mul_(keep[:f, None]).add_(0)
        if n % c:
            out[s + f * c:s + n].mul_(keep[f]).add_(0)


def _or_activity(rows: Tensor, verdict: Tensor, lo: int, hi: int) -> None:
    """``verdict[lo:hi]`` ← the bitwise OR of ``rows[:, lo:hi]`` (activity bytes)."""
    if lo < hi:
        acc = verdict[lo:hi].copy_(rows[0, lo:hi])
        for r in range(1, rows.shape[0]):
            acc.bitwise_or_(rows[r, lo:hi])


def shard_nbytes(numel: int, world_size: int) -> int:
    """Bytes of packed signs in one rank's share of ``numel`` signs: ``8·⌈⌈⌈d/8⌉/8⌉/M⌉``
    (the shard of :class:`~signsgd.distributed.ErrorFeedbackAllReduce`; a vote's shard also
    carries the activity bits, :func:`vote_nbytes`).

    Example:
        >>> shard_nbytes(1000, 4)
        32
    """
    if numel < 0 or world_size < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got {numel}, {world_size}")
    return 8 * -(-_words(packed_nbytes(numel)) // world_size)


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r} (mode must be one of {MODES})")
    return mode


def _wire_words(numel: int, zeros: bool = True) -> int:
    """64-bit words of one rank's vote vector: the signs, then the activity bits."""
    return _words(packed_nbytes(numel)) + (activity_words(numel) if zeros else 0)


def vote_nbytes(numel: int, world_size: int, mode: str = "sharded", *,
                header: bool = True) -> tuple[int, int]:
    """Payload bytes ``(sent, received)`` of one rank in one vote of ``numel`` coordinates.

    With ``W = ⌈d/64⌉ + activity_words(d)`` words per rank (signs, then one activity bit
    per zero chunk) and ``S = 8·⌈W/M⌉``: ``sharded`` ``2·(M−1)·S``; ``allgather``
    ``(M−1)·8·W``; plus the header ``(M−1)·8·HEADER_WORDS`` when ``header``. Zero for
    ``M = 1``; sent equals received.

    Example:
        >>> vote_nbytes(1_000_000, 4, header=False)
        (190464, 190464)
    """
    _check_mode(mode)
    if numel < 0 or world_size < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got {numel}, {world_size}")
    m = world_size
    if m == 1:
        return (0, 0)
    total = (m - 1) * 8 * HEADER_WORDS if header else 0
    if numel:
        send = _send_nbytes(numel, m, mode)
        total += 2 * (m - 1) * (send // m) if mode == "sharded" else (m - 1) * send
    return (total, total)


def _send_nbytes(numel: int, m: int, mode: str, zeros: bool = True) -> int:
    """Bytes of this rank's send buffer: ``M·S`` (sharded) or ``8·W`` (allgather)."""
    w = _wire_words(numel, zeros)
    if mode == "sharded" and m > 1:
        return m * 8 * -(-w // m)
    return 8 * w


def vote_flat(flat: Tensor, *, group: Any, mode: str, seed: int, step: int,
              word_offset: int = 0, adversary: Adversary | None = None,
              out: Tensor, runs: Runs | None = None) -> tuple[int, int]:
    """The payload of one vote of a flat vector (the step's header has run): the verdict
    goes into ``out`` (it may be ``flat`` itself); returns the bytes ``(sent, received)``.

    ``word_offset`` is the index of the 64-bit word of the step's flat vector where
    ``flat`` starts (for buckets), so ties do not depend on bucketing. ``runs`` are the
    zero chunks of ``flat`` (:func:`zero_chunks`): their activity bits follow the signs on
    the wire, the owner of a bit ORs it over the ranks, and the verdict is 0 on a chunk
    that is zero on every rank (``None``: no activity bits, zero is +1 everywhere; for
    measurements). The adversary corrupts the signs only. The wire buffers are per-thread
    scratch reused across calls.
    """
    rank, m = world(group)
    d = flat.numel()
    if d == 0:
        return 0, 0
    scratch = thread_scratch()
    nb, ns = packed_nbytes(d), 8 * _words(packed_nbytes(d))  # sign bytes, sign words' bytes
    na = 0 if runs is None else 8 * activity_words(d)
    total = _send_nbytes(d, m, mode, runs is not None)
    send = scratch.get("vote_send", total, torch.uint8, flat.device)
    with phase("pack"):
        nonzero, dense = None, False
        if runs is not None and _numpy_side(flat):  # signs and ``!= 0`` in one pass
            nonzero = scratch.get("vote_nonzero", d, torch.bool, flat.device)
            dense = pack_signs_nonzero(flat.detach(), out=send[:nb], nonzero_out=nonzero)
        else:
            pack_signs(flat, out=send[:nb])
        send[nb:] = 0
        if adversary is not None:
            send[:ns] = adversary.corrupt_signs(send[:ns], step=step, word_offset=word_offset)
        if runs is not None:
            _pack_activity(flat, runs, send[ns:ns + na], nonzero, dense)
    if m == 1:
        with phase("unpack"):
            unpack_signs(send, d, out=out)
            if runs is not None:
                _hold_still(out, send[ns:ns + na], runs)
        return 0, 0
    if mode == "sharded":
        s = total // m
        recv = scratch.get("vote_recv", total, torch.uint8, flat.device)
        all_to_all(recv, send, group)
        with phase("unpack"):  # the tally of this rank's shard
            ties = (tie_bits(seed, step, word_offset + rank * s // 8, s // 8, flat.device)
                    if m % 2 == 0 else None)
            rows = recv.view(m, s)
            verdict = majority_tally(rows, ties, out=scratch.get(
                "vote_verdict", s, torch.uint8, flat.device))
            lo, hi = rank * s, (rank + 1) * s
            _or_activity(rows, verdict, max(ns, lo) - lo, min(ns + na, hi) - lo)
        gathered = scratch.get("vote_gathered", total, torch.uint8, flat.device)
        all_gather(gathered, verdict, group)
        nbytes = 2 * (m - 1) * s
    else:
        gathered = scratch.get("vote_gathered", m * total, torch.uint8, flat.device)
        all_gather(gathered, send, group)
        with phase("unpack"):
            rows = gathered.view(m, total)
            ties = (tie_bits(seed, step, word_offset, total // 8, flat.device)
                    if m % 2 == 0 else None)
            gathered = majority_tally(rows, ties)
            _or_activity(rows, gathered, ns, ns + na)
        nbytes = (m - 1) * total
    with phase("unpack"):
        unpack_signs(gathered, d, out=out)
        if runs is not None:
            _hold_still(out, gathered[ns:ns + na], runs)
    return nbytes, nbytes


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be an int >= 0)")
    return value


def check_seed(seed: Any) -> int:
    """The one rule for a tie-breaking seed: an int >= 0 (``ValueError`` naming it).

    Example:
        >>> check_seed(3)
        3
    """
    return _check_int("seed", seed)


class MajorityVote(Reducer):
    r"""Majority-vote reducer for ``SignSGD``, ``Signum`` and ``Lion`` (Algorithm 3).

    Each rank sends the signs of its direction (gradient for SignSGD, momentum for Signum,
    the interpolation ``c`` for Lion) and every rank gets back the ±1 verdict

    .. math:: v = \operatorname{sign}\Big(\sum_{r=1}^{M} \operatorname{sign}(u_r)\Big)

    with zero sent as +1, ties (even M) broken by bits every rank draws identically from
    ``(seed, step)``, and 0 on every zero chunk (about ``ZERO_CHUNK`` coordinates of one
    tensor, :func:`zero_chunks`) that is zero on every rank, so such a tensor stays still.
    All tensors of a step go into one flat buffer, voted in buckets of
    ``bucket_bytes`` packed bytes (``8·bucket_bytes`` coordinates, rounded down to whole
    64-bit words): per step one header ``all_gather`` plus, per bucket, one
    ``all_to_all_single`` and one ``all_gather`` (``"sharded"``) or one ``all_gather``
    (``"allgather"``). ``None`` entries contribute zeros.

    Args:
        group: process group (``None``: the default group, or one process when
            ``torch.distributed`` is not initialised).
        mode: ``"sharded"`` (default) or ``"allgather"``.
        bucket_bytes: packed bytes per bucket (>= 8; default 32 MiB, i.e. 2^28 coordinates).
        seed: tie-breaking seed, the same on every rank.
        adversary: Byzantine attack on the signs this rank sends (give it only to the bad
            ranks; :mod:`signsgd.distributed.adversary`).

    Example:
        >>> vote = MajorityVote()   # one process: sign with 0 -> +1, a zero tensor -> 0
        >>> vote.reduce([torch.tensor([0.0, -3.0]), None, torch.zeros(2)]).update
        [tensor([ 1., -1.]), None, tensor([0., 0.])]

    Reference: Bernstein et al., signSGD, ICML 2018, Algorithm 3; Bernstein et al.,
    signSGD with Majority Vote is Communication Efficient and Fault Tolerant, ICLR 2019.
    """

    def __init__(self, group: Any = None, mode: str = "sharded",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, seed: int = 0,
                 adversary: Adversary | None = None) -> None:
        _check_mode(mode)
        if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or \
                bucket_bytes < 8:
            raise ValueError(f"Invalid bucket_bytes: {bucket_bytes!r} (must be an int >= 8)")
        check_seed(seed)
        super().__init__(group, adversary)
        self.mode = mode                    # "sharded" or "allgather"
        self.bucket_bytes = bucket_bytes    # packed bytes per bucket
        self.tie_seed = seed                # shared seed of the tie-breaking bits

    @property
    def bucket_numel(self) -> int:
        """Coordinates per bucket: ``64·⌊bucket_bytes/8⌋``."""
        return 64 * (self.bucket_bytes // 8)

    def seed(self) -> int:
        return self.tie_seed

    def check_compressor(self, compressor: Compressor | None) -> None:
        if compressor is not None:
            raise ValueError(
                f"MajorityVote votes on the signs of what the optimiser sends and keeps no "
                f"residual, so it takes no compressor (got {compressor!r}); use "
                "ErrorFeedbackAllReduce (or AllReduce) with EFSGD"
            )

    def config(self, compressor: Compressor | None) -> tuple[Any, ...]:
        return ("MajorityVote", self.mode, self.bucket_numel)

    def reduce_flat(self, flat: Tensor, agreed: Agreed, *, step: int,
                    compressor: Compressor | None, owned: bool) -> FlatReduction:
        verdict = self.scratch.get("verdict", flat.numel(), flat.dtype, flat.device,
                                   exact=True)
        sent, received = self._vote(flat, step, verdict, agreed.lengths)
        return FlatReduction(verdict, Kind.VOTE, None, sent, received)

    def _vote(self, flat: Tensor, step: int, out: Tensor, lengths: Sequence[int]
              ) -> tuple[int, int]:
        sent = received = 0
        d, bucket = flat.numel(), self.bucket_numel
        for start in range(0, d, bucket):
            end = min(start + bucket, d)
            s, r = vote_flat(flat[start:end], group=self.group, mode=self.mode,
                             seed=self.tie_seed, step=step, word_offset=start // 64,
                             adversary=self.adversary, out=out[start:end],
                             runs=zero_chunks(_bucket_lengths(lengths, start, end)))
            sent += s
            received += r
        return sent, received

    def vote_job(self, flat: Tensor, spec: TensorSpec, *, step: int, finite: bool | Tensor,
                 out: Tensor, settings: Any = None, who: str = "majority_vote",
                 lengths: Sequence[int] | None = None) -> Any:
        """The job of one vote of one flat tensor (header and payload): returns a function
        that runs it and returns ``(verdict, sent, received)`` — for :func:`engine.run`
        or :func:`engine.submit`. ``lengths``: the tensors ``flat`` concatenates, for the
        zero chunks (default: one tensor)."""
        parts = (flat.numel(),) if lengths is None else tuple(lengths)

        def job() -> tuple[Tensor, int, int]:
            agreed = exchange([spec], group=self.group, finite=finite, step=step,
                              seed=self.tie_seed, config=(self.config(None), lengths),
                              who=who, settings=settings, device=flat.device)
            sent, received = self._vote(flat, step, out, parts)
            return out, agreed.sent + sent, agreed.received + received
        return job

    def __repr__(self) -> str:
        return (f"MajorityVote(mode={self.mode!r}, bucket_bytes={self.bucket_bytes}, "
                f"seed={self.tie_seed}, adversary={self.adversary!r})")


def _check_out(out: Tensor | None, like: Tensor, who: str) -> Tensor:
    if out is None:
        return torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    if not isinstance(out, Tensor):
        raise TypeError(f"{who}: out must be a tensor, got {type(out).__name__}")
    if (out.numel() != like.numel() or out.dtype != like.dtype or out.device != like.device
            or not out.is_contiguous()):
        raise ValueError(
            f"{who}: out must be a contiguous tensor of {like.numel()} elements, dtype "
            f"{like.dtype} on {like.device}; got {out.numel()} elements, {out.dtype} on "
            f"{out.device}{'' if out.is_contiguous() else ', not contiguous'}"
        )
    return out.view(-1)


_CALLS: dict[tuple[int, str, int], int] = {}
_CALLS_LOCK = threading.Lock()


def majority_vote(
    t: Tensor,
    group: Any = None,
    mode: str = "sharded",
    *,
    seed: int = 0,
    step: int | None = None,
    adversary: Adversary | None = None,
    out: Tensor | None = None,
) -> Tensor:
    r"""Elementwise majority of the signs of ``t`` across the ranks of ``group``.

    .. math::
        \operatorname{vote}(t)_j
        = \operatorname{sign}\Big(\sum_{r} \operatorname{sign}(t_{r,j})\Big)

    with zero counted as +1, ties (even number of ranks) broken by pseudo-random bits
    every rank draws identically from ``(seed, step)``, and 0 on every zero chunk of about
    ``ZERO_CHUNK`` coordinates that is zero on every rank (:func:`zero_chunks`). About 1
    bit per coordinate each way.
    In a loop pass ``out=`` (or hold a :class:`MajorityVote`): a fresh result tensor per
    call costs page faults, measured at 3× the vote itself on 25M coordinates.

    Args:
        t: a real tensor, same numel, shape and dtype on every rank.
        group: process group (``None``: default group; no group needed for one process).
        mode: ``"sharded"`` (default; each rank tallies 1/M of the coordinates) or
            ``"allgather"`` (each rank gathers all signs and tallies everything).
        seed: tie-breaking seed, the same on every rank.
        step: step counter for the tie bits; ``None`` uses a per-process call counter for
            ``(group, mode, seed)``, which stays in step when every rank makes the same calls.
        adversary: Byzantine attack on the signs this rank sends
            (:mod:`signsgd.distributed.adversary`).
        out: optional contiguous tensor of ``t``'s numel and dtype that receives the
            verdict (it may be ``t`` itself, like an in-place ``all_reduce``).

    Returns:
        A tensor of ±1 (0 on all-zero chunks) of ``t``'s shape and dtype (``out`` when
        given, viewed as ``t``'s shape), identical on every rank.

    Raises:
        ValueError: ``t``'s numel, shape or dtype (or ``mode``, ``seed``, ``step``)
            differ across ranks — raised on every rank with each rank's values.
        NonFiniteGradientError: ``t`` holds a NaN or inf on some rank — on every rank.

    Example:
        >>> majority_vote(torch.tensor([0.5, -2.0, 0.0]))   # one process: sign, 0 -> +1
        tensor([ 1., -1.,  1.])
        >>> majority_vote(torch.zeros(3))                    # zero everywhere: still
        tensor([0., 0., 0.])

    Reference: Bernstein et al., signSGD, ICML 2018, Algorithm 3.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"majority_vote needs a tensor, got {type(t).__name__}")
    voter = MajorityVote(group, mode, _ONE_BUCKET, seed, adversary)
    flat = t.reshape(-1)
    spec = spec_of(t)
    dst = _check_out(out, t, "majority_vote")
    world(group)
    if step is None:
        key = (id(group) if group is not None else 0, mode, seed)
        with _CALLS_LOCK:
            step = _CALLS.get(key, 0)
            _CALLS[key] = step + 1
    _check_int("step", step)
    finite = all_finite([flat])
    verdict, _, _ = engine.run(group, voter.vote_job(flat, spec, step=step, finite=finite,
                                                     out=dst), t.device)
    return verdict.view(t.shape)


def vote_async(
    flat: Tensor,
    *,
    group: Any = None,
    mode: str = "sharded",
    seed: int = 0,
    step: int = 0,
    finite: bool | Tensor = True,
    adversary: Adversary | None = None,
    out: Tensor | None = None,
) -> torch.futures.Future:
    """Start a majority vote of a flat tensor; the future yields the flat verdict.

    For callers that overlap communication with computation (the DDP comm hook): the
    vote runs on the group's engine thread (:mod:`signsgd.distributed.engine`); votes on
    one group run in call order.

    Args:
        flat: 1-D tensor of a supported real dtype; the same numel and dtype on every rank.
        group, mode, seed, adversary: as in :func:`majority_vote`.
        step: step counter, the same on every rank (ties differ from step to step).
        finite: ``False`` when this rank's input holds a NaN or inf (the caller checks);
            then every rank's future raises
            :class:`~signsgd.errors.NonFiniteGradientError`.
        out: optional contiguous tensor (numel and dtype of ``flat``; may be ``flat``
            itself) that receives the verdict.

    Returns:
        ``torch.futures.Future`` of the verdict (±1, 0 on all-zero chunks) shaped like
        ``flat`` with its dtype, identical on every rank.

    Example:
        >>> vote_async(torch.tensor([0.5, -2.0, 0.0])).wait()   # one process: signs
        tensor([ 1., -1.,  1.])
    """
    if not isinstance(flat, Tensor) or flat.dim() != 1:
        raise ValueError(
            f"vote_async needs a 1-D tensor, got "
            f"{tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__}"
        )
    voter = MajorityVote(group, mode, _ONE_BUCKET, seed, adversary)
    _check_int("step", step)
    spec = spec_of(flat)
    dst = _check_out(out, flat, "vote_async")
    world(group)  # fail early (on the caller's thread) for a bad group
    job = voter.vote_job(flat, spec, step=step, finite=finite, out=dst)
    return engine.submit(group, lambda: job()[0], flat.device)
