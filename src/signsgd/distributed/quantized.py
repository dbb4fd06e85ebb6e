r"""``QuantizedMean``: the mean of the ranks' tensors sent in bf16 or in int8 with a scale per
block — the low-precision all-reduces of the DiLoCo family (INTELLECT-1's int8, Streaming
DiLoCo's low-precision outer gradients), with honest byte counts.

Two stages over shards of the flat buffer, as a ring all-reduce moves its data (each rank
owns one shard of ``c`` coordinates):

1. every rank quantizes each shard of its input and sends shard ``r`` to rank ``r``
   (``all_to_all_single``);
2. rank ``r`` decodes the M copies of its shard, sums them in the flat dtype in rank order,
   divides by M, quantizes the mean and sends it to every rank (``all_gather``); every rank
   (the owner too) decodes the same bytes, so the result is identical everywhere.

Codecs (``precision``):

* ``"bf16"``: each value as ``bfloat16`` (round to nearest even): 2 bytes per coordinate;
* ``"int8"``: per block of ``block`` coordinates, ``s = max|x| / 127`` and
  ``q = round(x / s)`` in [-127, 127] (``s = 0``: all zeros), sent as ``q`` (1 byte) plus
  ``s`` in the flat dtype: ``1 + itemsize/block`` bytes per coordinate.

Bytes each way per step: ``(M−1)`` rows of the shard's encoding in each stage (the header
excluded), the same volume as a ring all-reduce of the encoded values. No error feedback:
what quantization loses is lost (:attr:`Reduction.transmitted` is this rank's decoded
input, so a caller can keep the residual if it wants one).

Example:
    >>> import torch
    >>> QuantizedMean("int8", block=2).reduce([torch.tensor([1.0, -0.5, 0.0, 4.0])]).update
    [tensor([ 1.0000, -0.5039,  0.0000,  4.0000])]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from signsgd.compression import Compressor
from signsgd.distributed.collectives import all_gather, all_to_all, phase, world
from signsgd.distributed.header import Agreed
from signsgd.distributed.reducer import FlatReduction, Kind, Reducer

__all__ = ["QuantizedMean", "PRECISIONS", "quantized_nbytes"]

#: The codecs :class:`QuantizedMean` knows.
PRECISIONS = ("bf16", "int8")


def _shard(numel: int, m: int, block: int) -> int:
    """Coordinates per shard: ``⌈d/M⌉`` rounded up to whole blocks (and to 8 coordinates)."""
    unit = max(block, 8)
    per_rank = -(-numel // m)
    return unit * -(-per_rank // unit)


def _row_nbytes(c: int, precision: str, block: int, itemsize: int) -> int:
    """Bytes of one shard's encoding, padded to whole 64-bit words."""
    raw = 2 * c if precision == "bf16" else c + (c // block) * itemsize
    return 8 * -(-raw // 8)


def quantized_nbytes(numel: int, m: int, precision: str, block: int = 256,
                     itemsize: int = 4) -> int:
    """Payload bytes each way per step of :class:`QuantizedMean` (the header excluded):
    ``2·(M−1)·row`` with ``row`` one shard's encoding.

    Example:
        >>> quantized_nbytes(1_000_000, 4, "bf16"), quantized_nbytes(1_000_000, 4, "int8")
        (3001344, 1524144)
    """
    if m == 1 or numel == 0:
        return 0
    return 2 * (m - 1) * _row_nbytes(_shard(numel, m, block), precision, block, itemsize)


class QuantizedMean(Reducer):
    """The mean across ranks with the values sent in bf16 or in int8 with a scale per block.

    Args:
        precision: ``"bf16"`` or ``"int8"``.
        block: int8 only: coordinates per scale (>= 1; default 256).
        group: process group (``None``: the default group).

    Raises:
        ValueError: an unknown precision or a bad block, naming the value.

    Example:
        >>> QuantizedMean("bf16").reduce([torch.tensor([1.0, 1.0 / 3.0])]).update
        [tensor([1.0000, 0.3340])]
    """

    reads_only = True

    def __init__(self, precision: str, block: int = 256, group: Any = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"Invalid precision: {precision!r} (must be one of {PRECISIONS})")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"Invalid block: {block!r} (must be an int >= 1)")
        super().__init__(group)
        self.precision = precision          # the codec on the wire
        self.block = block                  # int8: coordinates per scale

    def config(self, compressor: Compressor | None) -> tuple[Any, ...]:
        return ("QuantizedMean", self.precision, self.block, super().config(compressor))

    # ------------------------------------------------------------------ the codec
    def _encode(self, x: Tensor, row: Tensor, decoded: Tensor, c: int) -> None:
        """Quantize ``x`` (``n <= c`` coordinates) into ``row``; its values into ``decoded``."""
        n = x.numel()
        row.zero_()
        if self.precision == "bf16":
            low = row[:2 * c].view(torch.bfloat16)
            low[:n].copy_(x)
            decoded.copy_(low[:n])
            return
        nblocks = c // self.block
        padded = torch.zeros(c, dtype=x.dtype, device=x.device)
        padded[:n].copy_(x)
        blocks = padded.view(nblocks, self.block)
        scale = blocks.abs().amax(dim=1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127)
        row[:c].view(torch.int8).copy_(q.view(-1))
        itemsize = x.element_size()
        row[c:c + nblocks * itemsize].view(x.dtype).copy_(scale)
        decoded.copy_((q * scale[:, None]).view(-1)[:n])

    def _decode(self, row: Tensor, out: Tensor, c: int) -> None:
        """The values of ``row`` into ``out`` (``n <= c`` coordinates)."""
        n = out.numel()
        if self.precision == "bf16":
            out.copy_(row[:2 * c].view(torch.bfloat16)[:n])
            return
        nblocks = c // self.block
        q = row[:c].view(torch.int8).to(out.dtype).view(nblocks, self.block)
        scale = row[c:c + nblocks * out.element_size()].view(out.dtype)
        out.copy_((q * scale[:, None]).view(-1)[:n])

    # ------------------------------------------------------------------ the core
    def reduce_flat(self, flat: Tensor, agreed: Agreed, *, step: int,
                    compressor: Compressor | None, owned: bool) -> FlatReduction:
        rank, m = world(self.group)
        d, dtype, device = flat.numel(), flat.dtype, flat.device
        c = _shard(d, m, self.block)
        block = _row_nbytes(c, self.precision, self.block, flat.element_size())
        n_of = [max(0, min(c, d - r * c)) for r in range(m)]

        def buf(name: str, n: int, dt: torch.dtype = dtype) -> Tensor:
            return self.scratch.get(name, n, dt, device)

        send = buf("send", m * block, torch.uint8).view(m, block)
        tx = buf("tx", d)
        with phase("pack"):
            for r in range(m):
                lo, n = r * c, n_of[r]
                self._encode(flat[lo:lo + n], send[r], tx[lo:lo + n], c)
        if m == 1:
            return FlatReduction(tx, Kind.COMPRESSED, tx)
        recv = buf("recv", m * block, torch.uint8).view(m, block)
        if d:
            all_to_all(recv.view(-1), send.view(-1), self.group)
        n, lo = n_of[rank], rank * c
        total = buf("total", c)[:n]
        part = buf("part", c)[:n]
        upd = buf("update", d)
        out_row = buf("out_row", block, torch.uint8)
        with phase("unpack"):
            self._decode(recv[0], total, c)
            for w in range(1, m):
                self._decode(recv[w], part, c)
                total.add_(part)
            total.div_(m)
        with phase("pack"):
            self._encode(total, out_row, upd[lo:lo + n], c)
        gathered = buf("gathered", m * block, torch.uint8).view(m, block)
        if d:
            all_gather(gathered.view(-1), out_row, self.group)
        with phase("unpack"):
            for r in range(m):
                if r != rank and n_of[r]:
                    self._decode(gathered[r], upd[r * c:r * c + n_of[r]], c)
        nbytes = 2 * (m - 1) * block if d else 0
        return FlatReduction(upd, Kind.COMPRESSED, tx, nbytes, nbytes)

    def __repr__(self) -> str:
        block = f", block={self.block}" if self.precision == "int8" else ""
        return f"QuantizedMean({self.precision!r}{block})"
