"""Byzantine workers for the fault-tolerance experiments of signSGD with majority vote.

An adversary corrupts what *this* rank sends; the caller gives one only to the ranks that
should misbehave::

    bad = {0}
    agg = MajorityVote(adversary=Negate() if rank in bad else None)
    base = AllReduce(adversary=Negate(scale=3.0) if rank in bad else None)

Two attacks, each with a sign form (for :class:`~signsgd.distributed.MajorityVote` and
:func:`~signsgd.distributed.majority_vote`: it rewrites the packed sign bits after packing,
so it also covers coordinates that were exactly zero) and a gradient form (for
:class:`~signsgd.distributed.AllReduce`: it rewrites the fp32 gradient before the mean):

* :class:`Negate` — sends the negated sign (every bit flipped, so zero, which travels as
  +1, goes out as −1), or the negated gradient times ``scale`` (``−scale·g``).
* :class:`RandomSigns` — sends uniformly random signs, or the gradient with uniformly
  random signs, ``scale·|g|·s`` with ``s ∈ {−1, +1}`` drawn per coordinate.

In a vote a Byzantine rank still sends one bit per coordinate, so ``k`` adversaries among
``M`` ranks can flip at most ``k`` of the ``M`` votes per coordinate; in a mean all-reduce a
single rank with a large ``scale`` can move the mean anywhere (ICLR 2019, Section 4).

Random draws are a counter-based hash of ``(seed, step, coordinate)``
(:func:`signsgd.distributed.random_bits.random_words`): stateless, so checkpoints need nothing and
a resumed run draws the same signs. Give each Byzantine rank its own seed (e.g.
``RandomSigns(seed=rank)``) unless they should collude.

Reference: Bernstein, Zhao, Azizzadenesheli, Anandkumar. signSGD with Majority Vote is
Communication Efficient and Fault Tolerant. ICLR 2019.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from signsgd.distributed.random_bits import random_words, splitmix64
from signsgd.packing import unpack_signs

__all__ = ["Adversary", "Negate", "RandomSigns", "ATTACKS", "attack"]


def _check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number, got {scale!r}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"Invalid scale: {scale} (must be finite and >= 0)")
    return float(scale)


class Adversary:
    """Base class: override :meth:`corrupt_signs` and :meth:`corrupt_gradient`."""

    def corrupt_signs(self, packed: Tensor, *, step: int, word_offset: int = 0) -> Tensor:
        """Return the packed sign bytes to send instead of ``packed``.

        Args:
            packed: flat uint8 tensor, ``8·k`` bytes (the step's words ``word_offset…``).
            step: the step counter (same on every rank).
            word_offset: index of the first 64-bit word in the step's flat vector.
        """
        raise NotImplementedError

    def corrupt_gradient(self, grad: Tensor, *, step: int) -> Tensor:
        """Return the (flat) gradient to send instead of ``grad``; ``grad`` is unchanged."""
        raise NotImplementedError


class Negate(Adversary):
    """Send the opposite: flipped sign bits, or ``−scale·g`` in a mean all-reduce.

    Args:
        scale: factor of the negated gradient (>= 0, default 1); signs have no magnitude,
            so it does not affect votes.

    Example:
        >>> Negate().corrupt_gradient(torch.tensor([1.0, -2.0]), step=0)
        tensor([-1.,  2.])
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = _check_scale(scale)

    def corrupt_signs(self, packed: Tensor, *, step: int, word_offset: int = 0) -> Tensor:
        return torch.bitwise_not(packed)

    def corrupt_gradient(self, grad: Tensor, *, step: int) -> Tensor:
        return grad * (-self.scale)

    def __repr__(self) -> str:
        return f"Negate(scale={self.scale})"


class RandomSigns(Adversary):
    """Send random signs: uniform random bits, or ``scale·|g|·s`` with random ``s = ±1``.

    Args:
        seed: seed of the draws (an int); the draw for a coordinate depends only on
            ``(seed, step, coordinate)``.
        scale: factor of the gradient magnitude (>= 0, default 1).

    Example:
        >>> RandomSigns(seed=1).corrupt_gradient(torch.ones(4), step=0).abs()
        tensor([1., 1., 1., 1.])
    """

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.scale = _check_scale(scale)

    def _key(self, step: int) -> int:
        return splitmix64(splitmix64(self.seed & ((1 << 64) - 1)) ^ int(step) ^ 0x0BAD_5EED)

    def corrupt_signs(self, packed: Tensor, *, step: int, word_offset: int = 0) -> Tensor:
        if packed.numel() % 8:
            raise ValueError(f"packed signs must be whole 64-bit words, got {packed.numel()} bytes")
        return random_words(self._key(step), word_offset, packed.numel() // 8, packed.device)

    def corrupt_gradient(self, grad: Tensor, *, step: int) -> Tensor:
        flat = grad.reshape(-1)
        n = flat.numel()
        bits = random_words(self._key(step), 0, (n + 63) // 64, grad.device)
        signs = unpack_signs(bits, n, grad.dtype).view_as(grad)
        return grad.abs() * signs * self.scale

    def __repr__(self) -> str:
        return f"RandomSigns(seed={self.seed}, scale={self.scale})"


#: The attack names of :func:`attack` (``signsgd train --attack``, the experiments).
ATTACKS: tuple[str, ...] = ("negate", "random")


def attack(name: str, *, seed: int = 0, scale: float = 1.0) -> Adversary:
    """The adversary called ``name``: ``"negate"`` (:class:`Negate`) or ``"random"``
    (:class:`RandomSigns` with ``seed``); ``scale`` multiplies a corrupted gradient.

    Example:
        >>> attack("random", seed=3)
        RandomSigns(seed=3, scale=1.0)
    """
    if name == "negate":
        return Negate(scale=scale)
    if name == "random":
        return RandomSigns(seed=seed, scale=scale)
    raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
