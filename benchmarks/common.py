"""Helpers every benchmark script shares: argument types, the machine description, the
results files (JSON and markdown; JSON files carry a ``schema`` version, older versions
are upgraded on read) and timing.

Example:
    >>> size_arg("25m"), rate_arg("1gbit"), workers_arg("4")
    (25000000, '1gbit', 4)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.netem import NetworkEmulator, check_world_size, parse_rate, probe_throughput

__all__ = ["DEFAULT_RATES", "RESULTS_SCHEMA", "ROOT", "size_arg", "workers_arg", "rate_arg",
           "machine", "load_text", "loopback_rate", "command_line", "utc_now", "write_json",
           "write_text", "schema_of", "read_results", "barrier", "timed"]

ROOT = Path(__file__).resolve().parent.parent
#: The rates the network benchmarks sweep, fastest first.
DEFAULT_RATES: tuple[str, ...] = ("unshaped", "10gbit", "1gbit", "100mbit")
#: The version of the results files the benchmarks write: their ``schema`` field.
#:
#: - 1: no ``schema`` field. Files written before the methods took the registry's spelling
#:   name some methods the old way (``sharded_vote``, ``signum_vote``, ``local``, ...).
#: - 2: ``"schema": 2``; every method named as :mod:`benchmarks.methods` names it
#:   (``COMM_LABELS``, ``E2E_LABELS``).
#:
#: :func:`read_results` upgrades an older file one version at a time (``_UPGRADES``).
RESULTS_SCHEMA = 2


# ------------------------------------------------------------------------------- arguments
def size_arg(text: str) -> int:
    """argparse type: a vector size such as ``1m``, ``25m``, ``500k`` or ``1000``.

    Example:
        >>> size_arg("1.5k")
        1500
    """
    t = text.strip().lower()
    mult = {"k": 10**3, "m": 10**6}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (e.g. 1m, 25m)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1, got {text!r}")
    return value


def workers_arg(text: str) -> int:
    """argparse type: a number of workers M >= 1.

    Example:
        >>> workers_arg("8")
        8
    """
    try:
        return check_world_size(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"number of workers M must be an integer >= 1, got {text!r}") from None


def rate_arg(text: str) -> str:
    """argparse type: a link rate :func:`benchmarks.netem.parse_rate` accepts, kept as text.

    Example:
        >>> rate_arg("10Gbit/s")
        '10Gbit/s'
    """
    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# ------------------------------------------------------------------------------- the run
def machine() -> dict[str, Any]:
    """The facts a results file records about where it ran.

    Example:
        >>> machine()["cpus"] == os.cpu_count()
        True
    """
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def load_text(mach: dict[str, Any]) -> str:
    """``' (load average at start: 1, 5, 15 min)'`` where :func:`machine` recorded it.

    Example:
        >>> load_text({"loadavg_start": [1.23, 0.5, 0.25]})
        ' (load average at start: 1.2, 0.5, 0.2)'
    """
    load = mach.get("loadavg_start")
    if not load:
        return ""
    return " (load average at start: " + ", ".join(f"{x:.1f}" for x in load) + ")"


def loopback_rate(tries: int = 3, nbytes: int = 200_000_000) -> float:
    """Best of ``tries`` one-flow TCP transfers on an unshaped namespace loopback, bits/s.

    Needs root and iproute2 (:func:`benchmarks.netem.shaping_unavailable_reason`).
    """
    best = 0.0
    with NetworkEmulator("unshaped") as ns:
        for _ in range(tries):
            secs, got = probe_throughput(ns, nbytes)
            best = max(best, 8 * got / secs)
    return best


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How the script at path ``script`` was run: ``python -m benchmarks.NAME ARGS``
    (``argv`` default: ``sys.argv[1:]``), for the results file.

    Example:
        >>> command_line(str(ROOT / "benchmarks" / "bench_vote.py"), ["--reps", "2"])
        'python -m benchmarks.bench_vote --reps 2'
    """
    args = sys.argv[1:] if argv is None else argv
    module = ".".join(Path(script).resolve().relative_to(ROOT).with_suffix("").parts)
    return "python -m " + " ".join(shlex.quote(a) for a in [module, *args])


def utc_now() -> str:
    """The date and time, ``YYYY-MM-DD HH:MM UTC``.

    Example:
        >>> utc_now().endswith(" UTC")
        True
    """
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------- results
def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write the results ``data`` to ``path`` atomically (a temporary file, then a rename),
    creating its folder, with ``"schema":`` :data:`RESULTS_SCHEMA` first (``data`` is not
    changed); :func:`read_results` shows it in use.

    Raises:
        ValueError: ``data`` carries another ``schema`` (read it with :func:`read_results`,
            which upgrades it).
    """
    if data.get("schema", RESULTS_SCHEMA) != RESULTS_SCHEMA:
        raise ValueError(f"results data of schema {data['schema']!r}: write_json writes "
                         f"schema {RESULTS_SCHEMA} (read the file with read_results)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"schema": RESULTS_SCHEMA, **data}, f, indent=1)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def emit(text: str, path: str | Path | None) -> None:
    """A report: to ``path`` (:func:`write_text`), or to standard output without one."""
    if path:
        write_text(path, text)
    else:
        print(text)


def run_record(command: str, shaping_unavailable: str | None) -> dict[str, Any]:
    """The fields every results file starts with: the command, when, on what machine, and
    how the network was shaped (``shaping_unavailable``: why it could not be, or ``None``).

    Example:
        >>> sorted(run_record("python x.py", None))
        ['command', 'date', 'machine', 'shaping']
    """
    return {"command": command, "date": utc_now(), "machine": machine(),
            "shaping": shaping_unavailable
            or "tc tbf on the loopback of a fresh network namespace"}


def shaped_link(rate_bps: int | None, shape: bool
                ) -> AbstractContextManager[NetworkEmulator | None]:
    """A fresh :class:`NetworkEmulator` at ``rate_bps``, open inside the ``with`` and
    removed after it; ``None`` when ``shape`` is false (launches then run on the host's
    loopback).

    Example:
        >>> with shaped_link(None, False) as emu:
        ...     emu is None
        True
    """
    return NetworkEmulator(rate_bps) if shape else contextlib.nullcontext()


def _v1_methods(data: dict[str, Any]) -> list[str]:
    """Schema 1 → 2: the old method names of ``cells``, ``steps``, ``tta`` and the settings'
    ``methods`` / ``tta_methods`` in the registry's spelling; returns the notes."""
    names = {"sharded_vote": "majority-vote", "allgather_vote": "majority-vote-allgather",
             "ef_allreduce": "ef-allreduce", "fp16_allreduce": "fp16-allreduce",
             "fp32_allreduce": "fp32-allreduce", "signum_vote": "signum",
             "signum_ddp_hook": "signum-ddp-hook", "ef_signsgd": "ef-signsgd",
             "sgd_allreduce": "sgd", "sgd_ddp": "sgd-ddp", "local": "sgd-local"}
    old = set()
    for key in ("cells", "steps", "tta"):
        for rec in data.get(key, []):
            if rec.get("method") in names:
                old.add(rec["method"])
                rec["method"] = names[rec["method"]]
    settings = data.get("settings", {})
    for key in ("methods", "tta_methods"):
        if key in settings:
            old.update(m for m in settings[key] if m in names)
            settings[key] = [names.get(m, m) for m in settings[key]]
    return [f"read {m} as {names[m]}" for m in sorted(old)]


#: How a results file of schema ``v`` becomes one of ``v + 1``: it changes the data in
#: place and returns notes for stderr.
_UPGRADES: dict[int, Callable[[dict[str, Any]], list[str]]] = {1: _v1_methods}


def schema_of(data: dict[str, Any]) -> int:
    """The schema version of results ``data``: its ``schema`` field, 1 without one.

    Raises:
        ValueError: a ``schema`` that is not an int from 1 to :data:`RESULTS_SCHEMA` (a file
            written by a newer checkout, or not a results file).

    Example:
        >>> schema_of({"cells": []}), schema_of({"schema": RESULTS_SCHEMA})
        (1, 2)
    """
    version = data.get("schema", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not (
            1 <= version <= RESULTS_SCHEMA):
        raise ValueError(f"results schema {version!r}: this checkout reads schemas 1 to "
                         f"{RESULTS_SCHEMA}")
    return version


def read_results(path: str | Path) -> dict[str, Any]:
    """A results JSON file at schema :data:`RESULTS_SCHEMA`: a file of an older schema
    (:func:`schema_of`) is upgraded one version at a time, with a note on stderr for what
    changed (schema 1: old method names such as ``sharded_vote`` read in today's spelling).

    Raises:
        ValueError: a schema this checkout does not know (:func:`schema_of`), named with
            the path.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_json(f"{tmp}/r.json", {"cells": [{"method": "fp32-allreduce"}]})
        ...     read_results(f"{tmp}/r.json")
        {'schema': 2, 'cells': [{'method': 'fp32-allreduce'}]}
    """
    with open(path) as f:
        data = json.load(f)
    try:
        version = schema_of(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    notes = []
    for v in range(version, RESULTS_SCHEMA):
        notes += _UPGRADES[v](data)
    data["schema"] = RESULTS_SCHEMA
    if notes:
        print(f"note: {path} is of results schema {version} (now {RESULTS_SCHEMA}); "
              + "; ".join(notes), file=sys.stderr)
    return data


# ------------------------------------------------------------------------------- timing
def barrier() -> bool:
    """``torch.distributed.barrier()`` if a process group is initialised; return whether.

    Example:
        >>> barrier()          # one process, no group: nothing to wait for
        False
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def timed(op: Callable[[], object], *, cpu: bool = False) -> tuple[float, float]:
    """Run ``op`` on every rank after a barrier: ``(slowest rank's wall seconds, CPU
    seconds summed over the ranks)`` (the CPU sum only with ``cpu=True``, else 0.0).

    CPU time is ``time.process_time``: user + system time of every thread of the process.
    Without an initialised process group it times this process alone.

    Example:
        >>> wall, cpu = timed(lambda: sum(range(1000)), cpu=True)
        >>> wall >= 0.0 and cpu >= 0.0
        True
    """
    group = barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    op()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dc = torch.tensor([time.process_time() - c0 if cpu else 0.0], dtype=torch.float64)
    if group:
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if cpu:
            dist.all_reduce(dc, op=dist.ReduceOp.SUM)
    return float(dt), float(dc)
