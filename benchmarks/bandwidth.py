"""The bandwidth model of ``docs/performance.md``: step time from bytes, rate and compute.

A step of method ``a`` on a link of rate ``R`` (bits/s) takes

.. math:: T_a(R) = T_a^{0} + 8 \\cdot W_a / R

where ``W_a`` is the number of bytes that cross the *bottleneck* link in one step and
``T_a^0`` is everything else: the forward/backward pass, packing, tallying, unpacking,
the optimiser update and the per-collective latency — measured once on an unshaped link
(which moves the bytes too, so ``T^0`` is an over-estimate by ``8·W/R_loopback``; small
next to the shaped term at the rates where the choice matters).

Which bytes cross the bottleneck:

* ``shared=True`` (what :mod:`netem` emulates: M ranks behind one link of
  rate R): ``W = M · (bytes one rank sends)``;
* ``shared=False`` (a switched network, every machine with its own full-duplex link of
  rate R): ``W = bytes one rank sends`` (the busiest rank's, for the symmetric collectives
  here).

Break-even: compression (method ``c``, fewer bytes, more compute) beats the baseline
(``b``) while ``T_c(R) < T_b(R)``, that is below

.. math:: R^* = 8 \\cdot (W_b - W_c) / (T_c^0 - T_b^0)

and never stops paying if ``T_c^0 <= T_b^0``.

On the emulator the bytes also cross the namespace's loopback, whose one-flow throughput
``R_lo`` caps every rate (:func:`effective_rate`); :func:`fixed_cost` is a measured time
less its wire time at that rate.

PowerSGD (torch's ``powerSGD_hook``, Vogels et al. 2019), bytes per rank per step
(:func:`powersgd_nbytes`): every gradient tensor is viewed as a matrix ``n × m`` with
``n = shape[0]`` and ``m = numel / n`` (a 1-D tensor is ``n × 1``); with
``r' = min(n, m, r)`` it is compressed iff ``(n + m)·r'·min_compression_rate < n·m``
(torch's ``_should_compress``, ``min_compression_rate = 2`` by default; so vectors never
are). A compressed matrix sends ``P`` (``n·r'``) and ``Q`` (``m·r'``) fp32 values, each
all-reduced; the other tensors are all-reduced as they are, in fp32. Three ring
all-reduces (uncompressed, all P, all Q), so per rank

.. math:: W_{\\mathrm{PowerSGD}} = 2 \\cdot \\frac{M-1}{M} \\cdot 4 \\cdot
    \\Big(\\sum_{\\text{uncompressed}} n m + \\sum_{\\text{compressed}} (n + m)\\, r'\\Big)

bytes each way (each of the three counts rounded up to a multiple of M, as
:func:`signsgd.distributed.reducer.ring_nbytes` does). That holds from step
``start_powerSGD_iter`` on; before it the hook all-reduces the whole bucket in fp32.

Example:
    >>> predict_time(0.5, 125_000_000, 10**9)      # 1 Gbit at 1 Gbit/s, plus 0.5 s
    1.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from signsgd.distributed.reducer import ring_nbytes

__all__ = ["bottleneck_bytes", "predict_time", "break_even_rate", "effective_rate", "fixed_cost",
           "predicted", "powersgd_split", "powersgd_nbytes"]


def bottleneck_bytes(sent_per_rank: float, world_size: int, *, shared: bool = True) -> float:
    """Bytes over the bottleneck link per step: ``M·sent`` on a shared link, else ``sent``.

    Example:
        >>> bottleneck_bytes(1e6, 4), bottleneck_bytes(1e6, 4, shared=False)
        (4000000.0, 1000000.0)
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if sent_per_rank < 0:
        raise ValueError(f"sent_per_rank must be >= 0, got {sent_per_rank!r}")
    return float(sent_per_rank) * (world_size if shared else 1)


def predict_time(base_s: float, wire_bytes: float, rate_bps: float | None) -> float:
    """``T^0 + 8·W/R``; ``rate_bps=None`` (unshaped) gives ``T^0``.

    Example:
        >>> predict_time(0.5, 1e9, None)
        0.5
    """
    if base_s < 0 or wire_bytes < 0:
        raise ValueError(f"need base_s >= 0 and wire_bytes >= 0, got {base_s}, {wire_bytes}")
    if rate_bps is None:
        return float(base_s)
    if not rate_bps > 0:
        raise ValueError(f"rate_bps must be > 0, got {rate_bps!r}")
    return float(base_s) + 8.0 * float(wire_bytes) / float(rate_bps)


def break_even_rate(base_c: float, bytes_c: float, base_b: float, bytes_b: float) -> float:
    """Rate (bits/s) above which method ``c`` stops beating method ``b``.

    ``c`` is the compressed method (fewer bytes); returns ``math.inf`` when ``c`` is never
    slower (its fixed cost is no larger), and ``0.0`` when ``c`` never wins (it sends at
    least as many bytes and costs more).

    Example:
        >>> round(break_even_rate(0.3, 1e6, 0.1, 101e6))    # 100 MB saved for 0.2 s
        4000000000
    """
    if base_c <= base_b:
        return math.inf if bytes_c <= bytes_b else 0.0
    if bytes_c >= bytes_b:
        return 0.0
    return 8.0 * (bytes_b - bytes_c) / (base_c - base_b)


def effective_rate(rate_bps: float | None, loopback_bps: float | None) -> float | None:
    """The rate the bytes really see: ``min(R, R_lo)``; ``R_lo`` when unshaped.

    Example:
        >>> effective_rate(10e9, 6e9), effective_rate(None, 6e9), effective_rate(1e9, None)
        (6000000000.0, 6000000000.0, 1000000000.0)
    """
    if rate_bps is None:
        return loopback_bps
    return min(rate_bps, loopback_bps) if loopback_bps else rate_bps


def fixed_cost(measured_s: float, wire_bytes: float, rate_bps: float | None,
               loopback_bps: float | None = None) -> float:
    """``T^0``: a measured step time less its wire time ``8·W/effective_rate`` (>= 0).

    Example:
        >>> fixed_cost(1.5, 125_000_000, 10**9)
        0.5
    """
    rate = effective_rate(rate_bps, loopback_bps)
    return max(measured_s - (8 * wire_bytes / rate if rate else 0.0), 0.0)


def predicted(cell: dict[str, Any], unshaped: dict[str, Any] | None,
              loopback_bps: float | None) -> float | None:
    """The model's time of a shaped benchmark record, from its unshaped counterpart.

    ``T0 + 8·W/min(R, R_lo)`` with ``W = M·sent`` (payload, all ranks) and
    ``T0 = fixed_cost(unshaped time)``; ``None`` when ``cell`` is not shaped or there is no
    unshaped measurement. Records hold ``rate_bps, shaped, sent, world_size, median_s``.

    Example:
        >>> cell = {"rate_bps": 10**9, "shaped": True, "sent": 125_000_000 // 4,
        ...         "world_size": 4, "median_s": 1.6}
        >>> predicted(cell, {"median_s": 0.5}, None)
        1.5
    """
    if (cell["rate_bps"] is None or not cell.get("shaped") or cell["sent"] is None
            or unshaped is None or unshaped["median_s"] is None):
        return None
    wire = cell["world_size"] * cell["sent"]
    return predict_time(fixed_cost(unshaped["median_s"], wire, None, loopback_bps), wire,
                        effective_rate(cell["rate_bps"], loopback_bps))


def powersgd_split(shapes: Iterable[Sequence[int]], rank: int, *,
                   min_compression_rate: float = 2.0) -> tuple[int, int, int]:
    """``(uncompressed elements, P elements, Q elements)`` of one PowerSGD step over
    tensors of ``shapes``, with torch's rule (module docstring).

    Example:
        >>> powersgd_split([(16, 1, 3, 3), (16,), (128, 1568)], rank=1)  # conv, bias, linear
        (16, 144, 1577)
        >>> powersgd_split([(16, 1, 3, 3)], rank=4)   # (16 + 9)·4·2 > 144: not worth it
        (144, 0, 0)
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    unc = p = q = 0
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ValueError("a 0-dimensional tensor has no shape[0] (torch's hook fails too)")
        n = shape[0]
        m = math.prod(shape) // n if n else 0
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            p += n * r
            q += m * r
        else:
            unc += n * m
    return unc, p, q


def powersgd_nbytes(shapes: Iterable[Sequence[int]], rank: int, world_size: int, *,
                    min_compression_rate: float = 2.0) -> int:
    """Bytes one rank sends (and receives) in one compressed PowerSGD step: the ring
    volume of its three fp32 all-reduces (module docstring).

    Example:
        >>> shapes = [(1024, 1024), (1024,)]       # a 1024×1024 weight and its bias
        >>> powersgd_nbytes(shapes, 1, 4)          # 2·3/4·4·(1024 + 1024 + 1024) values
        18432
        >>> powersgd_nbytes(shapes, 1, 4) / ring_nbytes(1024 * 1025, 4, 4)   # vs fp32
        0.002926829268292683
    """
    unc, p, q = powersgd_split(shapes, rank, min_compression_rate=min_compression_rate)
    return sum(ring_nbytes(n, world_size, 4) for n in (unc, p, q))
