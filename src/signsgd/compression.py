"""Compression operators C for error feedback (Karimireddy et al., ICML 2019).

A compressor maps a tensor ``v`` to a tensor ``C(v)`` of the same shape and dtype.
It is *δ-approximate* (0 < δ ≤ 1) when, for every ``v``,

    ‖C(v) − v‖² ≤ (1 − δ)·‖v‖².

Each class states its δ through :meth:`Compressor.delta`; the bound is tested on random
inputs in ``tests/test_compression.py``. Every compressor works per tensor: the EF
optimiser applies it to each parameter tensor separately, and the distributed
error-feedback all-reduce applies it to each chunk of its flat buffer.

How a compressor's output travels between ranks is not its business: the reducers choose
a wire codec for it (:func:`signsgd.distributed.codecs.codec_for`).

Example:
    >>> import torch
    >>> from signsgd.compression import ScaledSign
    >>> ScaledSign()(torch.tensor([1.0, -3.0]))
    tensor([ 2., -2.])
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = ["Compressor", "Identity", "Sign", "ScaledSign", "TopK", "RandomK", "SPECS",
           "from_spec"]


def _check_ratio(ratio: Any) -> float:
    """``ratio`` as a float in (0, 1]; ValueError naming it otherwise."""
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise ValueError(f"Invalid ratio: {ratio!r} (must be a real number in (0, 1])")
    value = float(ratio)
    if not (0.0 < value <= 1.0):  # also false for NaN
        raise ValueError(f"Invalid ratio: {ratio} (must be in (0, 1])")
    return value


def _k_of(ratio: float, numel: int) -> int:
    """Number of kept coordinates: ceil(ratio·numel), at least 1 for a non-empty tensor."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


class Compressor(ABC):
    """A compression operator ``C``: ``C(v)`` is a new tensor of ``v``'s shape and dtype.

    Subclasses implement ``__call__`` and :meth:`delta` (the δ of the bound
    ``‖C(v) − v‖² ≤ (1 − δ)·‖v‖²``, or ``None`` if there is none). Any callable with the
    same contract can serve as a compressor for :class:`signsgd.EFSGD`.

    Example:
        >>> class Half(Compressor):
        ...     def __call__(self, v): return v / 2
        ...     def delta(self, numel): return 0.75
        >>> Half()(torch.tensor([1.0, -2.0]))
        tensor([ 0.5000, -1.0000])

    Reference: Karimireddy et al., Error Feedback Fixes SignSGD, ICML 2019 (Definition 1).
    """

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
    """No compression: ``C(v) = v`` (a copy); δ = 1. With it, EF-SGD is plain SGD.

    Example:
        >>> Identity()(torch.tensor([0.5, -2.0]))
        tensor([ 0.5000, -2.0000])
    """

    def __call__(self, v: Tensor) -> Tensor:
        return v.clone()

    def delta(self, numel: int) -> float:
        """Always 1: ``‖C(v) − v‖ = 0``."""
        return 1.0



class Sign(Compressor):
    """Unscaled sign: ``C(v) = sign(v)`` (``torch.sign``, so sign(0) = 0).

    Not δ-approximate: ``‖sign(v) − v‖²`` can exceed ``‖v‖²`` (take ``v = [0.1]``:
    ``‖C(v) − v‖² = 0.81 > 0.01 = ‖v‖²``), so ``delta`` returns ``None``. Error feedback
    with it still runs, but the EF theory does not cover it; :class:`ScaledSign` is the
    compressor of EF-signSGD.

    Example:
        >>> Sign()(torch.tensor([0.1, 0.0, -3.0]))
        tensor([ 1.,  0., -1.])

    Reference: Bernstein et al., signSGD, ICML 2018; Karimireddy et al., ICML 2019 (§3).
    """

    def __call__(self, v: Tensor) -> Tensor:
        return torch.sign(v)

    def delta(self, numel: int) -> None:
        """None: no δ > 0 bounds ``‖sign(v) − v‖²`` by ``(1 − δ)·‖v‖²``."""
        return None


class ScaledSign(Compressor):
    """Scaled sign of EF-signSGD: ``C(v) = (‖v‖₁ / d)·sign(v)`` with ``d = numel(v)``.

    δ-approximate with ``δ = φ(v) = ‖v‖₁² / (d·‖v‖₂²) ≥ 1/d``: in fact
    ``‖C(v) − v‖² = ‖v‖² − (2 − nnz(v)/d)·‖v‖₁²/d ≤ (1 − φ(v))·‖v‖²``, with equality when
    ``v`` has no zero entry, so the worst case over all ``v`` is δ = 1/d and dense vectors
    (φ near 1) are compressed almost losslessly. Sent as 1 bit per
    coordinate plus one scale per tensor.

    Example:
        >>> ScaledSign()(torch.tensor([1.0, -3.0]))
        tensor([ 2., -2.])

    Reference: Karimireddy et al., Error Feedback Fixes SignSGD, ICML 2019 (Lemma 8).
    """

    def __call__(self, v: Tensor) -> Tensor:
        if v.numel() == 0:
            return v.clone()
        scale = v.abs().sum() / v.numel()
        return torch.sign(v) * scale

    def delta(self, numel: int) -> float:
        """The worst case ``1/d``; a given ``v`` achieves ``φ(v) ≥ 1/d``."""
        return 1.0 / max(numel, 1)



class TopK(Compressor):
    """Keep the ``k = ceil(ratio·d)`` entries of largest magnitude, zero the rest.

    δ = k/d: the discarded entries are the d − k smallest, whose squared mass is at
    most (1 − k/d)·‖v‖².

    Args:
        ratio: fraction of entries kept, in (0, 1] (at least one entry of a non-empty
            tensor is kept).

    Raises:
        ValueError: ``ratio`` outside (0, 1], NaN, or not a real number.

    Example:
        >>> TopK(0.5)(torch.tensor([1.0, -4.0, 2.0, 0.5]))
        tensor([ 0., -4.,  2.,  0.])

    Reference: Stich, Cordonnier, Jaggi. Sparsified SGD with Memory, NeurIPS 2018.
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
        """``k/d`` for ``d = numel``."""
        return _k_of(self.ratio, numel) / max(numel, 1)

    def __repr__(self) -> str:
        return f"TopK(ratio={self.ratio})"


class RandomK(Compressor):
    """Keep ``k = ceil(ratio·d)`` entries chosen uniformly at random, zero the rest.

    Unscaled, so every draw satisfies ``‖C(v) − v‖² ≤ ‖v‖²`` and, in expectation over the
    draw, ``E‖C(v) − v‖² = (1 − k/d)·‖v‖²``: δ = k/d in expectation (the EF paper's
    definition for random operators). Draws come from a private CPU generator seeded with
    ``seed``, so two instances with the same seed choose the same coordinates; its state
    is in :meth:`state_dict` (and so in ``EFSGD.state_dict()``), and the object pickles.

    Args:
        ratio: fraction of entries kept, in (0, 1].
        seed: seed of the private generator.

    Raises:
        ValueError: ``ratio`` outside (0, 1], NaN, or not a real number.
        TypeError: ``seed`` is not an int.

    Example:
        >>> c = RandomK(0.5, seed=0)
        >>> int((c(torch.ones(8)) != 0).sum())
        4

    Reference: Stich, Cordonnier, Jaggi. Sparsified SGD with Memory, NeurIPS 2018;
    Karimireddy et al., ICML 2019 (Remark 5).
    """

    def __init__(self, ratio: float, seed: int = 0) -> None:
        self.ratio = _check_ratio(ratio)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

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
        """``k/d`` for ``d = numel``, in expectation over the draw."""
        return _k_of(self.ratio, numel) / max(numel, 1)

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state, so a resumed run draws the same coordinates."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        gen = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
            raise ValueError(f"RandomK state must be {{'generator': uint8 tensor}}, got {state!r}")
        self._generator.set_state(gen.cpu())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gen_state = state.pop("_generator")
        self.__dict__.update(state)
        self._generator = torch.Generator(device="cpu")
        self._generator.set_state(gen_state)

    def __repr__(self) -> str:
        return f"RandomK(ratio={self.ratio}, seed={self.seed})"


#: The spellings :func:`from_spec` accepts (``R`` a ratio in (0, 1]).
SPECS: tuple[str, ...] = ("identity", "sign", "scaled-sign", "topk:R", "randomk:R")


def from_spec(spec: str) -> Compressor:
    """A compressor from its command-line spelling: ``identity`` | ``sign`` |
    ``scaled-sign`` | ``topk:R`` | ``randomk:R``.

    Raises:
        ConfigError: an unknown name or a ratio outside (0, 1] (the message lists the
            valid spellings).

    Example:
        >>> from_spec("topk:0.25")
        TopK(ratio=0.25)
    """
    from signsgd.errors import ConfigError

    name, _, arg = str(spec).partition(":")
    if name in ("identity", "sign", "scaled-sign") and not arg:
        return {"identity": Identity, "sign": Sign, "scaled-sign": ScaledSign}[name]()
    if name in ("topk", "randomk"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = float("nan")
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(
                f"compressor {spec!r}: the ratio must be a number in (0, 1], e.g. {name}:0.1"
            )
        return TopK(ratio) if name == "topk" else RandomK(ratio)
    raise ConfigError(f"unknown compressor {spec!r}; valid compressors: {', '.join(SPECS)}")
