"""Benchmark: 1-bit majority vote vs fp32 all-reduce, M Gloo processes on this machine.

For a float32 vector of ``d`` coordinates on every rank it times, in the same run:

* ``dist.all_reduce`` of the fp32 tensor (the baseline),
* ``majority_vote(x, mode="sharded", out=buf)`` end to end (the finite check, header,
  pack, one ``all_to_all_single``, tally, one ``all_gather``, unpack into a reused buffer,
  as ``all_reduce`` works in place), and once more returning a fresh tensor (the
  allocation of ``4·d`` fresh bytes costs page faults),
* ``majority_vote(x, mode="allgather")``,
* ``MajorityVote().reduce([x])`` (the optimiser's path: the caller has checked
  finiteness, so no scan) and ``ErrorFeedbackAllReduce().reduce([x],
  compressor=ScaledSign())`` (EF-signSGD's two-stage 1-bit all-reduce, same volume plus
  the scales),
* the local phases of the sharded vote on their own (the finite check
  ``signsgd.functional.first_nonfinite``, pack alone, tally, unpack),

and prints median wall times over ``--reps`` repetitions (each op starts after a barrier;
the ops take turns within a rep; an op's wall time is the slowest rank's), the ratios
vote / all-reduce, the CPU time of each op summed over the ranks (``time.process_time``:
user + system time of every thread, so the kernel's loopback copies count) — on a shared
machine the CPU time is the steadier measure — and the bytes per rank each way from
:func:`signsgd.distributed.vote.vote_nbytes` as bits per coordinate.

Usage::

    .venv/bin/python -m benchmarks.bench_vote --world-size 4 --numel 25000000 --reps 7 \\
        --markdown benchmarks/results/vote.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import command_line, timed, utc_now, write_text
from signsgd.compression import ScaledSign
from signsgd.distributed import ErrorFeedbackAllReduce, MajorityVote
from signsgd.distributed.launch import spawn
from signsgd.distributed.vote import (
    HEADER_WORDS,
    majority_vote,
    shard_nbytes,
    tie_bits,
    vote_nbytes,
)
from signsgd.functional import first_nonfinite
from signsgd.packing import majority_tally, pack_signs, unpack_signs


def _interleaved(ops: dict[str, Any], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Per-rep wall time of each op, the ops taking turns within every rep (so a change in
    the machine's load hits all of them alike); each time is the slowest rank's."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    times.update({"cpu " + name: [] for name in ops})
    for rep in range(warmup + reps):
        for name, fn in ops.items():
            wall, cpu = timed(fn, cpu=True)
            if rep >= warmup:
                times[name].append(wall)
                times["cpu " + name].append(cpu)
    return times


def worker(rank: int, world_size: int, numel: int, reps: int) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(numel, generator=g)
    y = x.clone()
    dst = torch.empty_like(x)
    step = iter(range(10**9))
    vote_agg, ef_agg = MajorityVote(), ErrorFeedbackAllReduce()
    # local phases of the sharded vote, no communication
    s = shard_nbytes(numel, world_size)
    packed = torch.zeros(world_size * s, dtype=torch.uint8)
    rows = torch.randint(0, 256, (world_size, s), dtype=torch.uint8, generator=g)
    ties = tie_bits(0, 0, rank * s // 8, s // 8)
    gathered = torch.randint(0, 256, (world_size * s,), dtype=torch.uint8, generator=g)
    ops = {
        "all_reduce fp32": lambda: dist.all_reduce(y),
        "vote sharded": lambda: majority_vote(x, mode="sharded", step=next(step), out=dst),
        "vote allgather": lambda: majority_vote(x, mode="allgather", step=next(step), out=dst),
        "MajorityVote().reduce (sharded)": lambda: vote_agg.reduce([x]),
        "ErrorFeedbackAllReduce (ScaledSign)":
            lambda: ef_agg.reduce([x], compressor=ScaledSign()),
        "vote sharded, fresh result tensor":
            lambda: majority_vote(x, mode="sharded", step=next(step)),
        "  finite check (first_nonfinite)": lambda: first_nonfinite([x]),
        "  pack alone (local)": lambda: pack_signs(x, out=packed[: (numel + 7) // 8]),
        "  tally shard (local)": lambda: majority_tally(rows, ties),
        "  unpack (local)": lambda: unpack_signs(gathered, numel, out=dst),
    }
    return _interleaved(ops, reps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--markdown", default=None, help="write a results table here")
    args = ap.parse_args(argv)
    m, d = args.world_size, args.numel
    started = utc_now()
    t0 = time.perf_counter()
    results = spawn(worker, m, (d, args.reps), timeout=1800, threads=args.threads)
    wall = time.perf_counter() - t0
    res = results[0]  # every rank holds the same (max over ranks) times
    base = statistics.median(res["all_reduce fp32"])
    cpu_base = statistics.median(res["cpu all_reduce fp32"])
    lines = ["| what | wall: median s | wall: min s | wall: ratio of medians to fp32 "
             "all_reduce | wall: median of per-rep ratios | CPU s, all ranks: median | "
             "CPU: ratio to fp32 all_reduce |", "|---|---|---|---|---|---|---|"]
    for name, times in res.items():
        if name.startswith("cpu "):
            continue
        med = statistics.median(times)
        per_rep = statistics.median(t / b for t, b in zip(times, res["all_reduce fp32"]))
        cpu = statistics.median(res["cpu " + name])
        lines.append(f"| {name} | {med:.4f} | {min(times):.4f} | {med / base:.3f} | "
                     f"{per_rep:.3f} | {cpu:.3f} | {cpu / cpu_base:.3f} |")
    sent, received = {}, {}
    for mode in ("sharded", "allgather"):
        sent[mode], received[mode] = vote_nbytes(d, m, mode)
    s = shard_nbytes(d, m)
    leg = (m - 1) * s
    fp32_ring = 2 * (m - 1) * (-(-d // m)) * 4
    bytes_lines = [
        "| what | bytes sent per rank | bytes received per rank | bits / coordinate sent |",
        "|---|---|---|---|",
        f"| fp32 all_reduce (ring) | {fp32_ring} | {fp32_ring} | {fp32_ring * 8 / d:.3f} |",
        f"| vote sharded, total | {sent['sharded']} | {received['sharded']} | "
        f"{sent['sharded'] * 8 / d:.3f} |",
        f"| vote sharded, signs leg (all_to_all) | {leg} | {leg} | {leg * 8 / d:.3f} |",
        f"| vote sharded, verdicts leg (all_gather) | {leg} | {leg} | {leg * 8 / d:.3f} |",
        f"| vote allgather | {sent['allgather']} | {received['allgather']} | "
        f"{sent['allgather'] * 8 / d:.3f} |",
    ]
    def per_rep(name: str) -> float:
        return statistics.median(t / b for t, b in zip(res[name], res["all_reduce fp32"]))

    def cpu(name: str) -> float:
        return statistics.median(res["cpu " + name])

    wall_ratio = per_rep("vote sharded")
    cpu_ratio = cpu("vote sharded") / cpu("all_reduce fp32")
    local = sum(cpu(n) for n in ("  finite check (first_nonfinite)", "  pack alone (local)",
                                 "  tally shard (local)", "  unpack (local)"))
    bits_leg = leg * 8 / d
    verdict = [
        f"- sharded vote / fp32 all_reduce, wall time (median of per-rep ratios): "
        f"**{wall_ratio:.3f}** — target <= 0.2: **{'met' if wall_ratio <= 0.2 else 'not met'}**",
        f"- the same by CPU time summed over the ranks: **{cpu_ratio:.3f}**",
        f"- local work (finite check + pack + tally + unpack) is {local / cpu('vote sharded'):.0%}"
        f" of the sharded vote's CPU time; the rest is the header and the two collectives",
        f"- bits per coordinate per rank on each leg of the sharded vote (signs out, verdicts "
        f"back): **{bits_leg:.3f}** — target <= 1.05: "
        f"**{'met' if bits_leg <= 1.05 else 'not met'}**; both legs together "
        f"{2 * bits_leg:.3f} bits sent and as many received, vs 48 for the fp32 ring",
    ]
    header = [
        f"- command: `{command_line(__file__, argv)}`",
        f"- date: {started}; launch wall time {wall:.0f} s",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Gloo on 127.0.0.1, M = {m} processes, {args.threads} torch thread(s) each, "
        f"d = {d:,} float32",
        f"- load average at start: {os.getloadavg()[0]:.1f} — the machine was shared with "
        "other jobs, so absolute times are noisy; the ratios are measured in the same run",
        f"- a rep's time is the slowest rank's; the ops take turns within each rep; median "
        f"over {args.reps} reps (1 warm-up); "
        f"header = {HEADER_WORDS} int64 words per rank",
    ]
    text = "\n".join(header + ["", *verdict, "", *lines, "", *bytes_lines, ""])
    print(text)
    if args.markdown:
        write_text(args.markdown,
                   "# Majority vote vs fp32 all-reduce (benchmarks/bench_vote.py)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
