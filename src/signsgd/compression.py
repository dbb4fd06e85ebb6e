"""Compression operators C for error feedback (Karimireddy et al., ICML 2019).

A compressor maps a tensor ``v`` to a tensor ``C(v)`` of the same shape and dtype.
It is *δ-approximate* (0 < δ ≤ 1) when, for every ``v``,

    ‖C(v) − v‖² ≤ (1 − δ)·‖v‖².

Each class states its δ through :meth:`Compressor.delta`; the bound is tested on random
inputs in ``tests/test_compression.py``. Every compressor works per tensor: the EF
optimiser applies it to each parameter tensor separately, and the distributed
error-feedback all-reduce applies it to each chunk of its flat buffer.

Each compressor also says how its output travels: :meth:`Compressor.codec` returns a
:class:`WireCodec` — :class:`ScaledSignBits` (1 bit per coordinate plus one scale per
chunk) for :class:`ScaledSign`, :class:`Summable` (a plain mean all-reduce) for
:class:`Identity`, and :class:`Values` (the compressed values, uncompressed on the wire:
correct, not bandwidth-saving) for every other one. A subclass that overrides
``__call__`` travels as :class:`Values`, so its own ``__call__`` is what runs.

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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from signsgd.packing import pack_signs_abs, sum_scaled_signs, unpack_scaled_signs

if TYPE_CHECKING:
    from signsgd.distributed.adversary import Adversary
    from signsgd.scratch import Scratch

__all__ = ["Compressor", "Identity", "Sign", "ScaledSign", "TopK", "RandomK", "WireCodec",
           "Values", "Summable", "ScaledSignBits", "SPECS", "from_spec"]


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

    def codec(self) -> WireCodec:
        """How ``C(v)`` travels in the error-feedback all-reduce (default: its values)."""
        return Values(self)

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

    def codec(self) -> WireCodec:
        """:class:`Summable`: the values themselves, summed by one ``all_reduce``."""
        return Summable() if type(self).__call__ is Identity.__call__ else Values(self)


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

    def codec(self) -> WireCodec:
        """:class:`ScaledSignBits`: 1 bit per coordinate plus one scale per chunk."""
        return ScaledSignBits() if type(self).__call__ is ScaledSign.__call__ else Values(self)


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


# --------------------------------------------------------------------------- wire codecs
class WireCodec(ABC):
    """How ``C(v)`` of one shard of a flat vector travels in the error-feedback all-reduce.

    A shard of ``shard`` coordinates (``n <= shard`` of them real) is cut into chunks (the
    pieces of the tensors it meets, of the given ``lengths``); ``C`` acts per chunk. A
    codec writes one shard's compressed form into a row of :meth:`row_nbytes` bytes and
    reads rows back. :attr:`summable` codecs (the identity) let the whole exchange be one
    mean ``all_reduce``.

    Example:
        >>> ScaledSign().codec(), Identity().codec().summable, TopK(0.5).codec()
        (ScaledSignBits(), True, Values(TopK(ratio=0.5)))
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
        >>> from signsgd.scratch import Scratch
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
        >>> from signsgd.scratch import Scratch
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
