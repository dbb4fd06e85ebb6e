"""The benchmarks of signsgd (not installed with the library): each ``bench_*`` module is a
script run from the repository root as ``python -m benchmarks.bench_NAME ...``, ``netem``
runs M Gloo workers (or any command, ``python -m benchmarks.netem``) behind a shaped
loopback, and the other modules are what the scripts share (BENCHMARKS.md)."""
