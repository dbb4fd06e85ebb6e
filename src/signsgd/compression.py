"""Compression operators C for error feedback (Karimireddy et al., ICML 2019).

A compressor maps a tensor ``v`` to a tensor ``C(v)`` of the same shape and dtype.
It is *δ-approximate* (0 < δ ≤ 1) when, for every ``v``,

    ‖C(v) − v‖² ≤ (1 − δ)·‖v‖².

Each class states its δ through :meth:`Compressor.delta`; the bound is tested on random
inputs in ``tests/test_compression.py``. Every compressor works per tensor: the EF
optimiser applies it to each parameter tensor separately, and the distributed
error-feedback all-reduce applies it to each chunk of its flat buffer.

Example:
    >>> import torch
    >>> from signsgd.compression import ScaledSign
    >>> ScaledSign()(torch.tensor([1.0, -3.0]))
    tensor([ 2., -2.])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Compressor", "Identity", "Sign", "ScaledSign", "TopK", "RandomK"]


def _check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        raise TypeError(f"ratio must be a float in (0, 1], got {ratio!r}")
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"Invalid ratio: {ratio} (must be in (0, 1])")
    return float(ratio)


def _k_of(ratio: float, numel: int) -> int:
    """Number of kept coordinates: ceil(ratio·numel), at least 1 for a non-empty tensor."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


class Compressor(ABC):
    """A compression operator ``C``: ``C(v)`` has ``v``'s shape and dtype."""

    @abstractmethod
    def __call__(self, v: Tensor) -> Tensor:
        """Return ``C(v)`` as a new tensor; ``v`` is not modified."""

    @abstractmethod
    def delta(self, numel: int) -> float | None:
        """The δ for which ``C`` is δ-approximate on tensors of ``numel`` elements.

        ``None`` means the operator is not δ-approximate for any δ > 0.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Compressor):
    """No compression: ``C(v) = v``; δ = 1. With it, EF-SGD is plain SGD."""

    def __call__(self, v: Tensor) -> Tensor:
        return v.clone()

    def delta(self, numel: int) -> float:
        return 1.0


class Sign(Compressor):
    """Unscaled sign: ``C(v) = sign(v)`` (``torch.sign``, so sign(0) = 0).

    Not δ-approximate: ``‖sign(v) − v‖²`` can exceed ``‖v‖²`` (take ``v = [0.1]``), so
    ``delta`` returns ``None``. Error feedback with it still runs, but the EF theory does
    not cover it; :class:`ScaledSign` is the compressor of EF-signSGD.
    """

    def __call__(self, v: Tensor) -> Tensor:
        return torch.sign(v)

    def delta(self, numel: int) -> None:
        return None


class ScaledSign(Compressor):
    """Scaled sign of EF-signSGD: ``C(v) = (‖v‖₁ / d)·sign(v)`` with ``d = numel(v)``.

    δ-approximate with ``δ = φ(v) = ‖v‖₁² / (d·‖v‖₂²) ≥ 1/d``: in fact
    ``‖C(v) − v‖² = (1 − φ(v))·‖v‖²`` exactly, so the worst case over all ``v`` is δ = 1/d
    and dense vectors (φ near 1) are compressed almost losslessly.
    """

    def __call__(self, v: Tensor) -> Tensor:
        if v.numel() == 0:
            return v.clone()
        scale = v.abs().sum() / v.numel()
        return torch.sign(v) * scale

    def delta(self, numel: int) -> float:
        return 1.0 / max(numel, 1)


class TopK(Compressor):
    """Keep the ``k = ceil(ratio·d)`` entries of largest magnitude, zero the rest.

    δ = k/d: the discarded entries are the d − k smallest, whose squared mass is at
    most (1 − k/d)·‖v‖².
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = _check_ratio(ratio)

    def __call__(self, v: Tensor) -> Tensor:
        flat = v.reshape(-1)
        k = _k_of(self.ratio, flat.numel())
        out = torch.zeros_like(flat)
        if k:
            idx = flat.abs().topk(k, sorted=False).indices
            out[idx] = flat[idx]
        return out.view_as(v)

    def delta(self, numel: int) -> float:
        return _k_of(self.ratio, numel) / max(numel, 1)

    def __repr__(self) -> str:
        return f"TopK(ratio={self.ratio})"


class RandomK(Compressor):
    """Keep ``k = ceil(ratio·d)`` entries chosen uniformly at random, zero the rest.

    Unscaled, so every draw satisfies ``‖C(v) − v‖² ≤ ‖v‖²`` and, in expectation over the
    draw, ``E‖C(v) − v‖² = (1 − k/d)·‖v‖²``: δ = k/d in expectation (the EF paper's
    definition for random operators). Draws come from a private generator seeded with
    ``seed``, so two instances with the same seed choose the same coordinates.
    """

    def __init__(self, ratio: float, seed: int = 0) -> None:
        self.ratio = _check_ratio(ratio)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def __call__(self, v: Tensor) -> Tensor:
        flat = v.reshape(-1)
        d = flat.numel()
        k = _k_of(self.ratio, d)
        out = torch.zeros_like(flat)
        if k:
            idx = torch.randperm(d, generator=self._generator)[:k].to(flat.device)
            out[idx] = flat[idx]
        return out.view_as(v)

    def delta(self, numel: int) -> float:
        return _k_of(self.ratio, numel) / max(numel, 1)

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state, so a resumed run draws the same coordinates."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"RandomK(ratio={self.ratio}, seed={self.seed})"
