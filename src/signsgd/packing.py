"""1-bit packing of signs: ``pack_signs`` / ``unpack_signs`` and the packed majority tally.

Wire convention (DESIGN.md): bit = 1 for a value >= 0 (so +0.0, -0.0 and +inf give 1),
bit = 0 for a value < 0; little-endian within a byte, i.e. byte-for-byte equal to
``numpy.packbits(x >= 0, bitorder="little")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_signs", "unpack_signs", "packed_nbytes", "majority_tally"]


def packed_nbytes(numel: int) -> int:
    """Number of bytes that ``numel`` packed signs occupy: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


_WEIGHTS: dict[torch.device, Tensor] = {}


def pack_signs(t: Tensor) -> Tensor:
    """Pack the signs of ``t`` into a flat ``torch.uint8`` tensor of ``ceil(t.numel()/8)`` bytes.

    Bit ``i`` of byte ``j`` is 1 where ``t.flatten()[8*j + i] >= 0``.

    Example:
        >>> pack_signs(torch.tensor([1.0, -2.0, 0.0]))
        tensor([5], dtype=torch.uint8)
    """
    flat = t.reshape(-1)
    n = flat.numel()
    nbytes = packed_nbytes(n)
    bits = flat >= 0
    pad = nbytes * 8 - n
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = _WEIGHTS.get(t.device)
    if weights is None:
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=t.device)
        _WEIGHTS[t.device] = weights
    return (bits.view(nbytes, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack ``numel`` signs from ``packed`` bytes into a ±1 tensor of ``dtype``.

    Example:
        >>> unpack_signs(torch.tensor([5], dtype=torch.uint8), 3)
        tensor([ 1., -1.,  1.])
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be torch.uint8, got {packed.dtype}")
    if numel < 0 or packed_nbytes(numel) > packed.numel():
        raise ValueError(
            f"cannot unpack numel={numel} signs from {packed.numel()} bytes "
            f"(need {packed_nbytes(numel)})"
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    out = bits.reshape(-1)[:numel].to(dtype) * 2 - 1
    return out


def majority_tally(packed: Tensor, tie_bits: Tensor | None = None) -> Tensor:
    """Bitwise majority of ``M`` packed sign vectors: ``packed`` is ``(M, nbytes)`` uint8.

    Returns ``nbytes`` packed verdicts: bit = 1 where more than half of the M rows have a 1,
    0 where fewer than half do, and ``tie_bits`` (packed, same length) where exactly half do
    (only possible for even M). Without ``tie_bits`` a tie gives 1.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"packed must be a 2-D torch.uint8 tensor (M, nbytes), got {packed.dtype} "
            f"with shape {tuple(packed.shape)}"
        )
    m, nbytes = packed.shape
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).to(torch.int16)  # (M, nbytes, 8)
    votes = bits.sum(dim=0) * 2 - m  # (nbytes, 8): positive = majority of ones
    verdict = votes > 0
    if m % 2 == 0:
        tie = votes == 0
        if tie_bits is None:
            verdict |= tie
        else:
            tb = ((tie_bits.reshape(-1, 1) >> shifts) & 1).bool()
            verdict |= tie & tb
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=packed.device)
    return (verdict.to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
