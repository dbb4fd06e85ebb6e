r"""Two-stage error-feedback all-reduce: EF-SGD / EF-signSGD across ranks, 1 bit each way.

Reference: Karimireddy, Rebjock, Stich, Jaggi. Error Feedback Fixes SignSGD and other
Gradient Compression Schemes. ICML 2019; the two-stage (worker + server error) scheme
follows Zheng, Huang, Kwok, Communication-Efficient Distributed Blockwise Momentum SGD
with Error-Feedback, NeurIPS 2019.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from signsgd.compression import Compressor
from signsgd.distributed.adversary import Adversary
from signsgd.distributed.codecs import WireCodec, codec_for
from signsgd.distributed.collectives import all_gather, all_reduce, all_to_all, phase, world
from signsgd.distributed.header import Agreed
from signsgd.distributed.reducer import FlatReduction, Kind, Reducer, ring_nbytes
from signsgd.distributed.vote import shard_nbytes
from signsgd.reduction import Reduction

__all__ = ["ErrorFeedbackAllReduce"]


def _chunks(lengths: list[int], d: int, c: int, m: int) -> list[list[int]]:
    """Per shard, the lengths of its chunks (its pieces of the tensors), in order."""
    bounds, off = [], 0
    for n in lengths:
        bounds.append((off, off + n))
        off += n
    out: list[list[int]] = []
    for r in range(m):
        lo, hi = r * c, min((r + 1) * c, d)
        out.append([min(b, hi) - max(a, lo) for a, b in bounds if max(a, lo) < min(b, hi)])
    return out


class ErrorFeedbackAllReduce(Reducer):
    r"""Two-stage error-feedback all-reduce for ``EFSGD``.

    Each rank hands over ``p = lr·g + e`` (its worker error already added by the
    optimiser). The flat buffer of all tensors is split into ``M`` shards of
    ``C = 64·⌈⌈d/64⌉/M⌉`` coordinates; a *chunk* is the intersection of one tensor with
    one shard.

    1. Worker: for each chunk ``c``, ``Δ_c = C(p_c)``; this rank's transmitted vector is
       returned so the optimiser keeps ``e ← p − Δ``. Shard ``r``'s chunks go to rank ``r``.
    2. Server (rank ``r``, its shard): ``q = (1/M)·Σ_w Δ_w + e_s``, then per chunk
       ``Δ'_c = C(q_c)`` and ``e_s ← q − Δ'``; ``Δ'`` goes back to every rank, and every
       rank applies the same update ``x ← x − Δ'``.

    How ``C(p)`` travels is :func:`~signsgd.distributed.codecs.codec_for` of the compressor:

    * :class:`~signsgd.compression.ScaledSign` (EF-signSGD): 1 bit per coordinate plus one
      scale per chunk each way (zero goes out as +1), in one ``all_to_all_single`` and one
      ``all_gather`` of uint8;
    * :class:`~signsgd.compression.Identity`: exactly an fp32 mean ``all_reduce`` (no
      error, no server state);
    * any other compressor (``Sign``, ``TopK``, ``RandomK``, a subclass with its own
      ``__call__``): the same two stages with ``C`` applied per chunk, sent as values in
      the flat dtype (correct, not bandwidth-saving);
    * ``M = 1``: no communication; ``Δ = C(p)`` per tensor, single-process EF-SGD.

    Bytes (each way, plus the header): ScaledSign ``2·(M−1)·B`` with ``B = C/8 + K·itemsize``
    rounded up to 8, ``K`` the most chunks in any shard; values ``2·(M−1)·C·itemsize``;
    Identity a ring all-reduce.

    The server error belongs to the agreed layout (per-tensor numels, dtype, M, codec); if
    the layout changes (e.g. a parameter gets its first gradient) it restarts from zero.
    Byzantine ranks (``adversary=``) corrupt what they send in the worker stage (the packed
    sign bits with ScaledSign, the float values otherwise; the update itself with
    ``M = 1``); their own worker error comes from the honest ``C(p)``.

    Args:
        group: process group (``None``: the default group).
        adversary: Byzantine attack on what this rank sends (give it only to bad ranks).

    Example:
        >>> from signsgd.compression import ScaledSign
        >>> ef = ErrorFeedbackAllReduce()   # one process
        >>> r = ef.reduce([torch.tensor([1.0, -3.0])], compressor=ScaledSign())
        >>> r.transmitted, r.update
        ([tensor([ 2., -2.])], [tensor([ 2., -2.])])
    """

    def __init__(self, group: Any = None, adversary: Adversary | None = None) -> None:
        super().__init__(group, adversary)
        self.server_error: Tensor | None = None        # this rank's shard of e_s
        self.layout: tuple[Any, ...] | None = None     # what server_error belongs to
        self.codec: tuple[Any, WireCodec] | None = None  # (compressor, its wire codec)

    def check_compressor(self, compressor: Compressor | None) -> None:
        if compressor is None:
            raise ValueError(
                "ErrorFeedbackAllReduce compresses with the optimiser's compressor and hands "
                "back the residual as the worker error: use it with EFSGD (SignSGD, Signum "
                "and Lion vote with MajorityVote)"
            )
        if not callable(compressor):
            raise ValueError(f"Invalid compressor: {compressor!r} (must be callable)")

    def config(self, compressor: Compressor | None) -> tuple[Any, ...]:
        return ("ErrorFeedbackAllReduce", self._codec(compressor).name,
                type(compressor).__name__)

    def _codec(self, compressor: Any) -> WireCodec:
        """The wire codec of ``compressor``, chosen once for the optimiser's compressor
        (again only if another compressor object comes)."""
        if self.codec is None or self.codec[0] is not compressor:
            self.codec = (compressor, codec_for(compressor))
        return self.codec[1]

    def reduce(self, tensors: list[Tensor | None], *, finite: bool | Tensor = True,
               compressor: Compressor | None = None, settings: Any = None,
               commit: bool = True) -> Reduction:
        self.check_compressor(compressor)
        return super().reduce(tensors, finite=finite, compressor=compressor,
                              settings=settings, commit=commit)

    def reduce_flat(self, flat: Tensor, agreed: Agreed, *, step: int,
                    compressor: Compressor | None, owned: bool) -> FlatReduction:
        rank, m = world(self.group)
        codec = self._codec(compressor)
        d, dtype, device = flat.numel(), flat.dtype, flat.device
        if m == 1:
            return self._single(flat, agreed, compressor, step)
        if codec.summable:
            mean = self.scratch.get("mean", d, dtype, device).copy_(flat)
            if self.adversary is not None:
                mean = self.adversary.corrupt_gradient(mean, step=step)
            if d:
                all_reduce(mean, self.group)
                mean.div_(m)
            nbytes = ring_nbytes(d, m, flat.element_size())
            return FlatReduction(mean, Kind.MEAN, None, nbytes, nbytes)
        if not flat.is_contiguous():
            flat = self.scratch.get("flat", d, dtype, device).copy_(flat)
        key = (codec.name, m, dtype, tuple(agreed.lengths))
        err = self.server_error if self.layout == key else None
        c = 8 * shard_nbytes(d, m)
        chunks = _chunks(agreed.lengths, d, c, m)
        n_of = [sum(ch) for ch in chunks]  # real coordinates per shard: min(c, d - r·c)
        block = codec.row_nbytes(c, max((len(ch) for ch in chunks), default=0), dtype)

        def buf(name: str, n: int, dt: torch.dtype = dtype) -> Tensor:
            return self.scratch.get(name, n, dt, device)

        # Worker stage: each shard's C(p) into its row of ``send``; the transmitted vector
        # is the honest C(p), decoded before any attack.
        send = buf("send", m * block, torch.uint8).view(m, block)
        tx = buf("tx", d)
        with phase("pack"):
            for r in range(m):
                lo, n = r * c, n_of[r]
                codec.encode(flat[lo:lo + n], chunks[r], send[r], tx[lo:lo + n], shard=c,
                             scratch=self.scratch)
            if self.adversary is not None:
                codec.corrupt(send, self.adversary, step=step, shard=c, dtype=dtype)
        recv = buf("recv", m * block, torch.uint8).view(m, block)
        if d:
            all_to_all(recv.view(-1), send.view(-1), self.group)

        # Server stage on this rank's shard: q = (Σ_w Δ_w) / M + e_s; Δ' = C(q); e_s = q − Δ'.
        # The new server error goes to the buffer the old one does not occupy, so a step
        # that raises or is not committed leaves the old one intact.
        n, mine = n_of[rank], chunks[rank]
        q = buf("server_b" if self.scratch.owns("server_a", err) else "server_a", c)
        out_row = buf("out_row", block, torch.uint8)
        upd = buf("update", d)
        lo = rank * c
        with phase("unpack"):
            codec.decode_sum([recv[w] for w in range(m)], mine, q[:n], shard=c)
            q[:n].div_(m)
            if err is not None:
                q[:n].add_(err[:n])
        with phase("pack"):
            codec.encode(q[:n], mine, out_row, upd[lo:lo + n], shard=c, scratch=self.scratch)
            q[:n].sub_(upd[lo:lo + n])
            q[n:].zero_()
        gathered = buf("gathered", m * block, torch.uint8).view(m, block)
        if d:
            all_gather(gathered.view(-1), out_row, self.group)
        with phase("unpack"):
            for r in range(m):
                if r != rank and n_of[r]:
                    codec.decode(gathered[r], chunks[r], upd[r * c:r * c + n_of[r]], shard=c)
        nbytes = 2 * (m - 1) * block if d else 0
        return FlatReduction(upd, Kind.COMPRESSED, tx, nbytes, nbytes, state=(q, key))

    def _single(self, flat: Tensor, agreed: Agreed, compressor: Any, step: int
                ) -> FlatReduction:
        """``M = 1``: ``Δ = C(p)`` per tensor, no communication."""
        out = self.scratch.get("tx", flat.numel(), flat.dtype, flat.device)
        off = 0
        for s in agreed.specs:
            if s is not None:
                seg = flat[off:off + s.numel]
                out[off:off + s.numel] = compressor(seg.view(s.shape)).reshape(-1)
                off += s.numel
        update = out
        if self.adversary is not None:
            update = self.adversary.corrupt_gradient(out, step=step)
        return FlatReduction(update, Kind.COMPRESSED, out)

    def keep(self, state: Any) -> None:
        """A committed sharded step's server error (and its layout) becomes this rank's."""
        if state is not None:
            self.server_error, self.layout = state

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "server_error", "layout"}``: a copy of this rank's server error."""
        return {
            "step": self.step,
            "server_error": None if self.server_error is None else self.server_error.clone(),
            "layout": self.layout,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) if malformed."""
        self._check_state(state, {"server_error", "layout"})
        err = state.get("server_error")
        if err is not None and not isinstance(err, Tensor):
            raise ValueError(f"server_error must be a tensor or None, got {type(err).__name__}")
        layout = state.get("layout")
        if layout is not None and not isinstance(layout, tuple):
            raise ValueError(f"layout must be a tuple or None, got {type(layout).__name__}")
        self.step = int(state["step"])
        self.server_error = None if err is None else err.clone()
        self.layout = layout

    def __repr__(self) -> str:
        return f"ErrorFeedbackAllReduce(adversary={self.adversary!r})"
