"""The step header: what every rank tells every other before any payload moves.

Every step of every reducer (and every vote of :func:`~signsgd.distributed.majority_vote`)
starts with one fixed-size ``all_gather`` of a :class:`StepHeader` per rank. Every rank then
checks the gathered headers the same way, so every rank raises the same error in the same
step — never a hang, never a silently wrong result:

* ``ValueError`` naming each rank's values
  when the protocol, the reducer configuration, the optimiser's hyper-parameters, the step
  counter, the tie seed, the number of tensors or their layouts differ;
* :class:`~signsgd.errors.NonFiniteGradientError` naming the ranks whose input held a NaN
  or inf — before any payload moves, so no rank changes anything.

Only when the headers show a tensor missing on some rank (a parameter without a gradient)
or a layout mismatch, a second ``all_gather`` of a per-tensor table (numel, dtype, shape)
follows — on every rank, since the decision is made from the gathered headers. A tensor
absent on every rank is left out of the step (``None`` in :attr:`Agreed.specs`).

On the wire a header is :data:`HEADER_WORDS` int64 words (:meth:`StepHeader.words`).

Example:
    >>> h = StepHeader(finite=True, count=1, numel=3, dtype_code=0, layout_crc=7,
    ...                all_present=True, max_ndim=1, step=0, seed=0, config_crc=1,
    ...                settings_crc=2)
    >>> StepHeader.from_words(h.words()) == h
    True
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from signsgd.distributed.collectives import all_gather, header_device, world
from signsgd.distributed.random_bits import to_int64
from signsgd.errors import NonFiniteGradientError

__all__ = ["HEADER_WORDS", "TensorSpec", "StepHeader", "Agreed", "spec_of", "exchange",
           "DTYPES"]

#: int64 words in the per-rank header of every step (the protocol tag and 11 fields).
HEADER_WORDS = 12
_MAGIC = 0x5167_5347_0002  # "SgSG" + protocol version 2 (votes carry activity bits)

#: dtypes a step may carry, in the order of their wire codes.
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.int16, torch.int32, torch.int64,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; ``TypeError`` for a dtype a step cannot carry."""
    code = _DTYPE_CODE.get(dtype)
    if code is None:
        raise TypeError(
            f"cannot communicate dtype {dtype}; supported: "
            + ", ".join(str(d) for d in DTYPES)
        )
    return code


def _dtype_name(code: int) -> str:
    if 0 <= code < len(DTYPES):
        return str(DTYPES[code]).replace("torch.", "")
    return "none" if code < 0 else f"code{code}"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a step's layout: numel, dtype and shape.

    Example:
        >>> TensorSpec(6, torch.float32, (2, 3)) == spec_of(torch.zeros(2, 3))
        True
    """

    numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def spec_of(t: Tensor) -> TensorSpec:
    """The :class:`TensorSpec` of ``t`` (``TypeError`` for a dtype a step cannot carry).

    Example:
        >>> spec_of(torch.zeros(3, dtype=torch.float16))
        TensorSpec(numel=3, dtype=torch.float16, shape=(3,))
    """
    dtype_code(t.dtype)
    return TensorSpec(t.numel(), t.dtype, tuple(t.shape))


def crc(obj: Any) -> int:
    """A 32-bit digest of ``repr(obj)`` (configurations, hyper-parameters, layouts)."""
    return zlib.crc32(repr(obj).encode())


@dataclass(frozen=True)
class StepHeader:
    """One rank's header of one step (the fields, in wire order after the protocol tag).

    Example:
        >>> len(StepHeader(True, 0, 0, -1, 0, True, 0, 0, 0, 0, 0).words()) == HEADER_WORDS
        True
    """

    finite: bool          # this rank's input holds no NaN / inf
    count: int            # number of tensors in the step
    numel: int            # total elements of the tensors this rank has
    dtype_code: int       # wire code of the first present tensor's dtype (-1: none)
    layout_crc: int       # digest of every tensor's (numel, dtype, shape), None for absent
    all_present: bool     # this rank has a value for every tensor
    max_ndim: int         # largest ndim of the present tensors (width of the table round)
    step: int             # the reducer's step counter (tie bits and attacks depend on it)
    seed: int             # the tie-breaking seed
    config_crc: int       # digest of the reducer's configuration (mode, buckets, codec)
    settings_crc: int     # digest of the optimiser's hyper-parameters (0: none given)

    def words(self) -> list[int]:
        """The header as :data:`HEADER_WORDS` int64 values."""
        values = [int(v) for v in dataclasses.astuple(self)]
        return [_MAGIC] + [to_int64(v) for v in values]

    @classmethod
    def from_words(cls, row: Sequence[int]) -> StepHeader:
        """Inverse of :meth:`words` (the tag is checked by :func:`exchange`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = dict(zip(names, row[1:]))
        values["finite"] = bool(values["finite"])
        values["all_present"] = bool(values["all_present"])
        return cls(**values)


@dataclass
class Agreed:
    """The layout every rank agreed on, and the header bytes that agreement cost.

    ``specs[i]`` is ``None`` when tensor ``i`` is absent on every rank; ``table`` says the
    per-tensor table round ran.

    Example:
        >>> Agreed([TensorSpec(3, torch.float32, (3,)), None], False, 0, 0).lengths
        [3]
    """

    specs: list[TensorSpec | None]
    table: bool
    sent: int
    received: int

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs if s is not None)

    @property
    def lengths(self) -> list[int]:
        """The numel of every tensor in the step, absent ones left out."""
        return [s.numel for s in self.specs if s is not None]


def exchange(
    specs: Sequence[TensorSpec | None],
    *,
    group: Any,
    finite: bool | Tensor,
    step: int,
    seed: int,
    config: Any,
    who: str,
    settings: Any = None,
    device: torch.device | None = None,
) -> Agreed:
    """Run the header protocol of one step and return the agreed layout.

    Every rank calls it with the same number of specs; ``None`` marks a tensor this rank
    has no value for (its layout then comes from the ranks that have it). ``config`` and
    ``settings`` are any ``repr``-able values that must be equal on every rank (the
    reducer's configuration; the optimiser's hyper-parameters, ``None`` for none).
    ``device`` is where the data lives: the header travels on it under NCCL. ``finite`` may
    be a 0-d bool tensor on that device (:func:`signsgd.functional.all_finite`): it goes into
    the header on the device, and reading the gathered headers back is then the step's one
    host synchronisation.

    Raises:
        ValueError: the ranks disagree (the message names each rank's values).
        NonFiniteGradientError: some rank passed ``finite=False``; on every rank.

    Example:
        >>> exchange([spec_of(torch.ones(2))], group=None, finite=True, step=0, seed=0,
        ...          config=(), who="demo").numel     # one process: nothing moves
        2
    """
    rank, m = world(group)
    if m == 1 or (isinstance(finite, Tensor) and finite.device.type == "cpu"):
        finite = bool(finite)
    present = [s for s in specs if s is not None]
    layout = [None if s is None else (s.numel, dtype_code(s.dtype), s.shape) for s in specs]
    mine = StepHeader(
        finite=finite if isinstance(finite, bool) else True, count=len(specs),
        numel=sum(s.numel for s in present),
        dtype_code=dtype_code(present[0].dtype) if present else -1, layout_crc=crc(layout),
        all_present=len(present) == len(specs),
        max_ndim=max((len(s.shape) for s in present), default=0), step=int(step),
        seed=int(seed), config_crc=crc(config),
        settings_crc=0 if settings is None else crc(settings),
    )
    if m == 1:
        if not finite:
            raise NonFiniteGradientError(
                f"{who}: non-finite input (NaN or inf) at step {step}; nothing was applied"
            )
        return Agreed(list(specs), False, 0, 0)
    dev = header_device(group, device)
    local = torch.tensor(mine.words(), dtype=torch.int64, device=dev)
    if isinstance(finite, Tensor):  # the device's flag, written without reading it back
        local[1] = finite.to(device=dev, dtype=torch.int64)
    gathered = torch.empty(m * HEADER_WORDS, dtype=torch.int64, device=dev)
    all_gather(gathered, local, group)
    rows = gathered.view(m, HEADER_WORDS).tolist()
    sent = received = (m - 1) * 8 * HEADER_WORDS
    if any(row[0] != _MAGIC for row in rows):
        tags = ", ".join(f"rank {r}: {hex(row[0])}" for r, row in enumerate(rows))
        raise ValueError(
            f"{who}: ranks are not running the same protocol (header tags {tags}); every "
            "rank must make the same call in the same order"
        )
    headers = [StepHeader.from_words(row) for row in rows]

    def column(field: str) -> str:
        return ", ".join(f"rank {r}: {getattr(h, field)}" for r, h in enumerate(headers))

    def differs(field: str) -> bool:
        return len({getattr(h, field) for h in headers}) > 1

    if differs("config_crc"):
        exc = ValueError(
            f"{who}: configuration differs across ranks (mode / reducer / bucket size / "
            f"compressor; config CRCs {column('config_crc')})"
        )
        exc.add_note(f"rank {rank} has configuration {config!r}")
        raise exc
    if differs("settings_crc"):
        exc = ValueError(
            f"{who}: the optimiser's hyper-parameters differ across ranks (digests "
            f"{column('settings_crc')}); every rank must use the same lr, momentum, betas "
            "and weight decay"
        )
        exc.add_note(f"rank {rank} has hyper-parameters {settings!r}")
        raise exc
    if differs("step"):
        raise ValueError(f"{who}: step counters differ across ranks ({column('step')})")
    if differs("seed"):
        raise ValueError(f"{who}: tie seeds differ across ranks ({column('seed')})")
    if differs("count"):
        raise ValueError(
            f"{who}: number of tensors differs across ranks ({column('count')}; total numel "
            f"{column('numel')})"
        )
    table = not (all(h.all_present for h in headers) and len(
        {(h.numel, h.dtype_code, h.layout_crc, h.max_ndim) for h in headers}) == 1)
    agreed: list[TensorSpec | None] = list(specs)
    if table:
        agreed, extra = _exchange_table(specs, max(h.max_ndim for h in headers), group=group,
                                        m=m, who=who, device=dev)
        sent += extra
        received += extra
    bad = [r for r, h in enumerate(headers) if not h.finite]
    if bad:
        raise NonFiniteGradientError(
            f"{who}: non-finite input (NaN or inf) on rank(s) {bad} at step {step}; "
            f"every rank raises and no rank applies this step"
        )
    return Agreed(agreed, table, sent, received)


def _exchange_table(specs: Sequence[TensorSpec | None], max_ndim: int, *, group: Any, m: int,
                    who: str, device: torch.device) -> tuple[list[TensorSpec | None], int]:
    """Second round: every rank's (numel, dtype, shape) per tensor; resolve or raise."""
    n = len(specs)
    width = 3 + max_ndim
    table = torch.zeros((n, width), dtype=torch.int64)
    for i, s in enumerate(specs):
        if s is None:
            table[i, :2] = -1
        else:
            table[i, 0], table[i, 1], table[i, 2] = s.numel, dtype_code(s.dtype), len(s.shape)
            if s.shape:
                table[i, 3:3 + len(s.shape)] = torch.tensor(s.shape, dtype=torch.int64)
    gathered = torch.empty(m * n * width, dtype=torch.int64, device=device)
    if n:
        all_gather(gathered, table.reshape(-1).to(device), group)
    rows = gathered.view(m, n, width).tolist() if n else []
    resolved: list[TensorSpec | None] = []
    problems: list[str] = []
    for i in range(n):
        seen: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        for r in range(m):
            numel, code, ndim = rows[r][i][0], rows[r][i][1], rows[r][i][2]
            if numel >= 0:
                seen[r] = (numel, code, tuple(rows[r][i][3:3 + ndim]))
        if not seen:
            resolved.append(None)
            continue
        if len(set(seen.values())) > 1:
            desc = "; ".join(
                f"rank {r}: " + (
                    f"numel={seen[r][0]} dtype={_dtype_name(seen[r][1])} shape={list(seen[r][2])}"
                    if r in seen else "absent")
                for r in range(m)
            )
            problems.append(f"tensor {i}: {desc}")
            continue
        numel, code, shape = next(iter(seen.values()))
        resolved.append(TensorSpec(numel, DTYPES[code], shape))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"{who}: inputs differ across ranks — " + " | ".join(problems[:5]) + more
        )
    return resolved, (m - 1) * 8 * n * width
