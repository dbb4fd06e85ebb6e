"""The bandwidth model of ``docs/performance.md``: step time from bytes, rate and compute.

A step of method ``a`` on a link of rate ``R`` (bits/s) takes

.. math:: T_a(R) = T_a^{0} + 8 \\cdot W_a / R

where ``W_a`` is the number of bytes that cross the *bottleneck* link in one step and
``T_a^0`` is everything else: the forward/backward pass, packing, tallying, unpacking,
the optimiser update and the per-collective latency — measured once on an unshaped link
(which moves the bytes too, so ``T^0`` is an over-estimate by ``8·W/R_loopback``; small
next to the shaped term at the rates where the choice matters).

Which bytes cross the bottleneck:

* ``shared=True`` (what :mod:`signsgd.netem` emulates: M ranks behind one link of
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

Example:
    >>> predict_time(0.5, 125_000_000, 10**9)      # 1 Gbit at 1 Gbit/s, plus 0.5 s
    1.5
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["bottleneck_bytes", "predict_time", "break_even_rate", "effective_rate", "fixed_cost",
           "predicted"]


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
