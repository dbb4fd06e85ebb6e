"""The bandwidth model of ``docs/performance.md``: step time from bytes, rate and compute.

A step of method ``a`` on a link of rate ``R`` (bits/s) takes

.. math:: T_a(R) = T_a^{0} + 8 \\cdot W_a / R

where ``W_a`` is the number of bytes that cross the *bottleneck* link in one step and
``T_a^0`` is everything else: the forward/backward pass, packing, tallying, unpacking,
the optimiser update and the per-collective latency — measured once on an unshaped link
(which moves the bytes too, so ``T^0`` is an over-estimate by ``8·W/R_loopback``; small
next to the shaped term at the rates where the choice matters).

Which bytes cross the bottleneck:

* ``shared=True`` (what :mod:`signsgd.bench.netem` emulates: M ranks behind one link of
  rate R): ``W = M · (bytes one rank sends)``;
* ``shared=False`` (a switched network, every machine with its own full-duplex link of
  rate R): ``W = bytes one rank sends`` (the busiest rank's, for the symmetric collectives
  here).

Break-even: compression (method ``c``, fewer bytes, more compute) beats the baseline
(``b``) while ``T_c(R) < T_b(R)``, that is below

.. math:: R^* = 8 \\cdot (W_b - W_c) / (T_c^0 - T_b^0)

and never stops paying if ``T_c^0 <= T_b^0``.
"""

from __future__ import annotations

import math

__all__ = ["bottleneck_bytes", "predict_time", "break_even_rate"]


def bottleneck_bytes(sent_per_rank: float, world_size: int, *, shared: bool = True) -> float:
    """Bytes over the bottleneck link per step: ``M·sent`` on a shared link, else ``sent``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if sent_per_rank < 0:
        raise ValueError(f"sent_per_rank must be >= 0, got {sent_per_rank!r}")
    return float(sent_per_rank) * (world_size if shared else 1)


def predict_time(base_s: float, wire_bytes: float, rate_bps: float | None) -> float:
    """``T^0 + 8·W/R``; ``rate_bps=None`` (unshaped) gives ``T^0``."""
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
    """
    if base_c <= base_b:
        return math.inf if bytes_c <= bytes_b else 0.0
    if bytes_c >= bytes_b:
        return 0.0
    return 8.0 * (bytes_b - bytes_c) / (base_c - base_b)
