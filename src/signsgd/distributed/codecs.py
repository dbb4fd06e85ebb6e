"""Wire codecs: how ``C(v)`` of an error-feedback compressor travels between ranks.

:func:`codec_for` picks one per compressor, once, when a reducer is configured:
:class:`ScaledSignBits` (1 bit per coordinate plus one scale per chunk) for
:class:`~signsgd.compression.ScaledSign`, :class:`Summable` (a plain mean all-reduce) for
:class:`~signsgd.compression.Identity`, and :class:`Values` (the compressed values,
uncompressed on the wire: correct, not bandwidth-saving) for every other compressor. A
subclass that overrides ``__call__`` travels as :class:`Values`, so its own ``__call__``
is what runs.

Example:
    >>> from signsgd.compression import Identity, ScaledSign, TopK
    >>> codec_for(ScaledSign()), codec_for(Identity()).summable, codec_for(TopK(0.5))
    (ScaledSignBits(), True, Values(TopK(ratio=0.5)))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from signsgd.compression import Identity, ScaledSign
from signsgd.distributed.adversary import Adversary
from signsgd.packing import pack_signs_abs, sum_scaled_signs, unpack_scaled_signs
from signsgd.scratch import Scratch

__all__ = ["WireCodec", "Values", "Summable", "ScaledSignBits", "codec_for"]


def codec_for(compressor: Any) -> WireCodec:
    """The wire codec of ``compressor`` (see the module docstring).

    Example:
        >>> from signsgd.compression import Sign
        >>> codec_for(Sign()).name
        'values'
    """
    if type(compressor).__call__ is ScaledSign.__call__:
        return ScaledSignBits()
    if type(compressor).__call__ is Identity.__call__:
        return Summable()
    return Values(compressor)


class WireCodec(ABC):
    """How ``C(v)`` of one shard of a flat vector travels in the error-feedback all-reduce.

    A shard of ``shard`` coordinates (``n <= shard`` of them real) is cut into chunks (the
    pieces of the tensors it meets, of the given ``lengths``); ``C`` acts per chunk. A
    codec writes one shard's compressed form into a row of :meth:`row_nbytes` bytes and
    reads rows back. :attr:`summable` codecs (the identity) let the whole exchange be one
    mean ``all_reduce``.

    Example:
        >>> ScaledSignBits().summable, Summable().summable
        (False, True)
    """

    #: the name in the reducer's configuration (equal on every rank).
    name: str = ""
    #: ``C`` is the identity: one mean ``all_reduce`` replaces both stages.
    summable: bool = False

    @abstractmethod
    def row_nbytes(self, shard: int, chunks: int, dtype: torch.dtype) -> int:
        """Bytes of one row: a shard of ``shard`` coordinates in at most ``chunks`` chunks."""

    @abstractmethod
    def encode(self, v: Tensor, lengths: list[int], row: Tensor, decoded: Tensor, *,
               shard: int, scratch: Scratch) -> None:
        """Write ``C`` of each chunk of ``v`` into ``row`` and its values into ``decoded``."""

    @abstractmethod
    def decode(self, row: Tensor, lengths: list[int], out: Tensor, *, shard: int) -> None:
        """The values of a row (its chunks of the given lengths) into ``out``."""

    @abstractmethod
    def decode_sum(self, rows: list[Tensor], lengths: list[int], out: Tensor, *,
                   shard: int) -> None:
        """``out = ((decode(rows[0]) + decode(rows[1])) + …)``, added in row order."""

    @abstractmethod
    def corrupt(self, send: Tensor, adversary: Adversary, *, step: int, shard: int,
                dtype: torch.dtype) -> None:
        """Apply a Byzantine attack to the ``(M, row_nbytes)`` send buffer, in place."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Values(WireCodec):
    """``C(v)`` per chunk, sent as its values in the flat dtype (any compressor).

    Args:
        compressor: the operator, applied to each chunk (a 1-D view).

    Example:
        >>> from signsgd.compression import Sign
        >>> row, out = torch.empty(16, dtype=torch.uint8), torch.empty(2)
        >>> Values(Sign()).encode(torch.tensor([3.0, -2.0]), [2], row, out, shard=4,
        ...                       scratch=Scratch())
        >>> out, row.view(torch.float32)
        (tensor([ 1., -1.]), tensor([ 1., -1.,  0.,  0.]))
    """

    name = "values"

    def __init__(self, compressor: Any) -> None:
        self.compressor = compressor

    def row_nbytes(self, shard: int, chunks: int, dtype: torch.dtype) -> int:
        return shard * torch.empty(0, dtype=dtype).element_size()

    def encode(self, v: Tensor, lengths: list[int], row: Tensor, decoded: Tensor, *,
               shard: int, scratch: Scratch) -> None:
        off = 0
        for n in lengths:
            decoded[off:off + n] = self.compressor(v[off:off + n])
            off += n
        values = row.view(decoded.dtype)
        values[:off].copy_(decoded[:off])
        values[off:].zero_()

    def decode(self, row: Tensor, lengths: list[int], out: Tensor, *, shard: int) -> None:
        out.copy_(row.view(out.dtype)[:out.numel()])

    def decode_sum(self, rows: list[Tensor], lengths: list[int], out: Tensor, *,
                   shard: int) -> None:
        n = out.numel()
        out.copy_(rows[0].view(out.dtype)[:n])
        for row in rows[1:]:
            out += row.view(out.dtype)[:n]

    def corrupt(self, send: Tensor, adversary: Adversary, *, step: int, shard: int,
                dtype: torch.dtype) -> None:
        values = send.view(-1).view(dtype)
        values.copy_(adversary.corrupt_gradient(values, step=step))

    def __repr__(self) -> str:
        return f"Values({self.compressor!r})"


class Summable(Values):
    """The identity's codec: the values, summed on the wire by one mean ``all_reduce``.

    Example:
        >>> Summable().summable
        True
    """

    name = "sum"
    summable = True

    def __init__(self) -> None:
        super().__init__(Identity())

    def __repr__(self) -> str:
        return "Summable()"


class ScaledSignBits(WireCodec):
    """EF-signSGD on the wire: per chunk ``(‖v‖₁/n)·s`` with ``s = +1`` where ``v >= 0``.

    A row holds the shard's packed sign bits (``shard/8`` bytes; zero goes out as +1,
    unlike ``torch.sign``) followed by one scale per chunk in the flat dtype, padded to
    whole 64-bit words. The scale is computed as :class:`ScaledSign` computes it
    (``|v|`` summed, then divided by ``n``), and ``±scale`` is exact, so the decoded
    values equal ``ScaledSign()`` wherever ``v`` has no zero.

    Example:
        >>> codec, row, out = ScaledSignBits(), torch.empty(16, dtype=torch.uint8), torch.empty(2)
        >>> codec.row_nbytes(64, 1, torch.float32)
        16
        >>> codec.encode(torch.tensor([1.0, -3.0]), [2], row, out, shard=64, scratch=Scratch())
        >>> out
        tensor([ 2., -2.])
    """

    name = "scaled_sign_bits"

    def row_nbytes(self, shard: int, chunks: int, dtype: torch.dtype) -> int:
        item = torch.empty(0, dtype=dtype).element_size()
        return 8 * -(-(shard // 8 + chunks * item) // 8)

    def encode(self, v: Tensor, lengths: list[int], row: Tensor, decoded: Tensor, *,
               shard: int, scratch: Scratch) -> None:
        n = v.numel()
        nb = (n + 7) // 8
        sbytes = shard // 8
        row[nb:].zero_()
        if not n:
            return
        absv = scratch.get("abs", n, v.dtype, v.device)
        pack_signs_abs(v, out=row[:nb], abs_out=absv)
        sums = [part.sum() / ln for part, ln in zip(absv.split(lengths), lengths)]
        scales = torch.stack(sums).tolist()
        item = v.element_size()
        row[sbytes:sbytes + len(scales) * item] = torch.tensor(
            scales, dtype=v.dtype).view(torch.uint8)
        _unpack_scaled(row[:nb], lengths, scales, decoded[:n])

    def _scales(self, row: Tensor, k: int, dtype: torch.dtype, shard: int) -> list[float]:
        item = torch.empty(0, dtype=dtype).element_size()
        sbytes = shard // 8
        return row[sbytes:sbytes + k * item].view(dtype).tolist()

    def decode(self, row: Tensor, lengths: list[int], out: Tensor, *, shard: int) -> None:
        n = sum(lengths)
        if n:
            scales = self._scales(row, len(lengths), out.dtype, shard)
            _unpack_scaled(row[:(n + 7) // 8], lengths, scales, out[:n])

    def decode_sum(self, rows: list[Tensor], lengths: list[int], out: Tensor, *,
                   shard: int) -> None:
        n = sum(lengths)
        if not n:
            return
        bits = [row[:(n + 7) // 8] for row in rows]
        per_row = [self._scales(row, len(lengths), out.dtype, shard) for row in rows]
        off = 0
        for i, ln in enumerate(lengths):  # in row order, as q += Δ_w
            sum_scaled_signs(bits, off, ln, [sc[i] for sc in per_row], out=out[off:off + ln])
            off += ln

    def corrupt(self, send: Tensor, adversary: Adversary, *, step: int, shard: int,
                dtype: torch.dtype) -> None:
        sbytes = shard // 8
        for r in range(send.shape[0]):
            send[r, :sbytes] = adversary.corrupt_signs(send[r, :sbytes], step=step,
                                                       word_offset=r * shard // 64)


def _unpack_scaled(packed: Tensor, lengths: list[int], scales: list[float], out: Tensor
                   ) -> None:
    """``out`` (consecutive segments of the given lengths) = ±scale of its segment."""
    off = 0
    for n, scale in zip(lengths, scales):
        unpack_scaled_signs(packed, off, n, scale, out=out[off:off + n])
        off += n
