"""Shared pseudo-random bits: the same on every rank, drawable in any slice, on any device.

A counter-based generator (SplitMix64 of ``key + index``): word ``k`` of a stream depends
only on ``(key, k)``, so every rank draws the same bits without communicating, a shard can
draw its slice without drawing what precedes it, and a resumed run draws what an
uninterrupted one would. Two users:

* the vote's tie-break (:func:`tie_bits`, keyed by ``(seed, step)``): with an even number
  of ranks a coordinate whose votes tie takes a bit that is 1 with probability 1/2 — the
  vote stays unbiased and every rank applies the same verdict;
* the Byzantine attacks of :mod:`signsgd.distributed.adversary` (:func:`stream_key`).

Example:
    >>> tie_bits(seed=0, step=0, start_word=0, nwords=1).shape
    torch.Size([8])
    >>> bool((random_words(7, 3, 2)[8:] == random_words(7, 4, 1)).all())
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["splitmix64", "random_words", "tie_bits", "stream_key"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def splitmix64(x: int) -> int:
    """The SplitMix64 finaliser of ``x + golden`` on Python ints (exact 64-bit arithmetic).

    Example:
        >>> hex(splitmix64(0))
        '0xe220a8397b1dcdaf'
    """
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def to_int64(x: int) -> int:
    """``x`` mod 2**64 as a signed 64-bit value (what an int64 tensor word holds)."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 words viewed as uint64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def random_words(key: int, start: int, nwords: int, device: torch.device | str = "cpu") -> Tensor:
    """``nwords`` pseudo-random 64-bit words of stream ``key``, as ``8·nwords`` uint8 bytes.

    Word ``k`` is ``splitmix64(splitmix64(key) + start + k)`` (little-endian bytes).

    Args:
        key: any Python int (reduced mod 2**64).
        start: index of the first word (>= 0).
        nwords: number of words (>= 0).
        device: where the result lives.

    Returns:
        A flat ``torch.uint8`` tensor of ``8·nwords`` bytes.

    Example:
        >>> random_words(0, 0, 2).shape
        torch.Size([16])
    """
    if nwords < 0 or start < 0:
        raise ValueError(f"random_words needs start >= 0 and nwords >= 0, got {start}, {nwords}")
    base = splitmix64(key & _MASK64)
    x = torch.arange(start, start + nwords, dtype=torch.int64, device=device)
    x += to_int64(base + _GOLDEN)
    x = (x ^ _lsr(x, 30)) * to_int64(_MUL1)
    x = (x ^ _lsr(x, 27)) * to_int64(_MUL2)
    x = x ^ _lsr(x, 31)
    return x.view(torch.uint8)


def stream_key(seed: int, step: int, salt: int) -> int:
    """The key of the stream of ``(seed, step)`` for one purpose (``salt``).

    Example:
        >>> stream_key(1, 2, 3) == stream_key(1, 2, 3) != stream_key(1, 3, 3)
        True
    """
    return splitmix64((splitmix64(seed & _MASK64) ^ (step & _MASK64)) + salt)


_TIES = 0x7469_6573  # "ties"


def tie_bits(seed: int, step: int, start_word: int, nwords: int,
             device: torch.device | str = "cpu") -> Tensor:
    """Packed tie-breaking bits of a vote: ``8·nwords`` bytes for words ``start_word…``.

    Bit ``i`` of byte ``j`` breaks a tie at coordinate ``8·(8·start_word + j) + i`` of the
    step's flat vector (1 → +1, 0 → −1). Every rank draws the same bits from
    ``(seed, step)``; each bit is 1 with probability 1/2.

    Example:
        >>> bool((tie_bits(5, 1, 0, 4)[8:] == tie_bits(5, 1, 1, 3)).all())
        True
    """
    return random_words(stream_key(seed, step, _TIES), start_word, nwords, device)
