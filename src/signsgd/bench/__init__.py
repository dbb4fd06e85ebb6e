"""Benchmark tooling: the loopback network emulator and the benchmark worker functions.

* :mod:`signsgd.bench.netem` — run M Gloo workers in a network namespace whose loopback
  is rate-limited with ``tc tbf`` (:func:`~signsgd.bench.netem.launch`).
* :mod:`signsgd.bench.comm` — per-step aggregation time and bytes of each method.
* :mod:`signsgd.bench.e2e` — end-to-end training step time and time-to-accuracy.
* :mod:`signsgd.bench.model` — the bandwidth model of ``docs/performance.md``.
"""

from signsgd.bench.netem import (
    LaunchResult,
    NetworkEmulator,
    ShapingUnavailableError,
    ShapingUnavailableWarning,
    check_world_size,
    format_rate,
    launch,
    parse_rate,
)

__all__ = [
    "LaunchResult",
    "NetworkEmulator",
    "ShapingUnavailableError",
    "ShapingUnavailableWarning",
    "check_world_size",
    "format_rate",
    "launch",
    "parse_rate",
]
