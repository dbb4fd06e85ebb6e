"""Per-step aggregation time and bytes of every method, on an emulated network.

For each link rate (unshaped, 10 Gbit/s, 1 Gbit/s, 100 Mbit/s), number of workers M and
vector size d, M Gloo workers in a fresh network namespace (:mod:`benchmarks.netem`;
loopback shaped with ``tc tbf``, i.e. M ranks sharing one link of that rate) time one
aggregation of a random d-vector with: sharded majority vote, allgather majority vote,
EF all-reduce (1-bit ScaledSign), fp16 all-reduce and fp32 all-reduce — and the peers a
user would pick instead, through ``torch.nn.parallel.DistributedDataParallel`` and torch's
own communication hooks: DDP fp32 (no hook), DDP + ``fp16_compress_hook``, DDP +
``powerSGD_hook`` of rank 1, 2 and 4 (one bucket: with several, the hook fails over Gloo),
and DDP + ``noop_hook`` (no communication: DDP's own cost). The DDP rows hold d as
1024-row matrices (``measure.comm_layout``) with a negligible forward (``½·Σ p²``, so the
gradient is the rank's vector) and time backward + DDP + the hook; PowerSGD's two fp32
warm-up iterations are taken untimed before (``measure.make_op``). Every ratio is
against fp32 all-reduce in the same launch (same rate, M, d). The predicted time is the
bandwidth model of docs/performance.md: unshaped time of the same cell + 8·M·sent / rate.
torch's ``bf16_compress_hook`` needs CUDA + NCCL and is not measured here.

Repetitions are adaptive (``measure.interleaved``): an op slower than 2 s is measured once;
cells whose wire time is predicted above ``--skip-above`` seconds are skipped and listed.
When the methods' buffers of one d would not fit half the available memory, they are
measured in consecutive groups (each interleaved).

Usage::

    .venv/bin/python -m benchmarks.bench_comm --quick            # a few minutes
    .venv/bin/python -m benchmarks.bench_comm                    # the full grid
    .venv/bin/python -m benchmarks.bench_comm --methods fp32-allreduce majority-vote \\
        fp32-ddp fp16-ddp powersgd-r1 powersgd-r2 powersgd-r4 noop-ddp --workers 4 \\
        --markdown benchmarks/results/comm_peers.md      # the peers only, M = 4
    .venv/bin/python -m benchmarks.bench_comm --render benchmarks/results/comm.json

Writes ``--json`` (raw records, rewritten after every launch), ``--markdown`` and
``--plot`` (time against bandwidth, one line per method, one panel per (M, d)).
Needs root and iproute2 to shape; without them it says so and runs unshaped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_RATES,
    command_line,
    emit,
    loopback_rate,
    rate_arg,
    read_results,
    run_record,
    shaped_link,
    size_arg,
    workers_arg,
    write_json,
)
from benchmarks.measure import comm_worker
from benchmarks.methods import COMM_LABELS
from benchmarks.netem import format_rate, launch, parse_rate, shaping_unavailable_reason
from benchmarks.report import comm_markdown, comm_plot

FULL = {"dims": [1_000_000, 11_000_000, 25_000_000], "workers": [2, 4, 8],
        "rates": list(DEFAULT_RATES)}
QUICK = {"dims": [1_000_000], "workers": [4], "rates": ["unshaped", "1gbit", "100mbit"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the grid; return (and keep writing to ``args.json``) the raw results."""
    reason = shaping_unavailable_reason()
    data: dict[str, Any] = {
        **run_record(args.command_line, reason),
        "settings": {"dims": args.dims, "workers": args.workers, "rates": args.rates,
                     "methods": args.methods, "skip_above_s": args.skip_above,
                     "target_s": args.target_s},
        "cells": [],
    }
    if reason:
        print(f"NOTE: cannot shape the network here ({reason}); every rate runs unshaped.",
              file=sys.stderr)
    else:
        data["loopback_bps"] = loopback_rate()
        print(f"unshaped loopback, one TCP flow: {data['loopback_bps'] / 1e9:.2f} Gbit/s",
              file=sys.stderr)
    t_start = time.monotonic()
    for rate in args.rates:
        rate_bps = parse_rate(rate)
        with shaped_link(rate_bps, reason is None) as emu:
            for m in args.workers:
                t0 = time.monotonic()
                out = launch(
                    comm_worker, m,
                    (args.dims, args.methods, rate_bps, args.skip_above, 2.0, args.target_s,
                     args.min_reps, args.max_reps, emu is not None),
                    emulator=emu, rate=rate, timeout=args.timeout, pg_timeout=args.timeout,
                )
                for rec in out.results[0]:
                    rec.update(rate=rate, rate_bps=rate_bps, shaped=out.shaped)
                    data["cells"].append(rec)
                print(f"[{time.monotonic() - t_start:6.0f}s] {format_rate(rate_bps):>12} "
                      f"M={m}: {time.monotonic() - t0:.0f}s", file=sys.stderr)
                _summarise(out.results[0], rate, m)
                if args.json:
                    write_json(args.json, data)
    data["wall_s"] = round(time.monotonic() - t_start, 1)
    if args.json:
        write_json(args.json, data)
    return data


def _summarise(records: list[dict[str, Any]], rate: str, m: int) -> None:
    by_d: dict[int, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_d.setdefault(r["d"], {})[r["method"]] = r
    for d, cells in by_d.items():
        base = cells.get("fp32-allreduce", {}).get("median_s")
        parts = []
        for meth, r in cells.items():
            if r["median_s"] is None:
                parts.append(f"{meth}=-")
            else:
                ratio = f" ({r['median_s'] / base:.3f}x)" if base else ""
                parts.append(f"{meth}={r['median_s'] * 1e3:.1f}ms{ratio}")
        print(f"  {rate} M={m} d={d / 1e6:g}M: " + ", ".join(parts), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few-minute subset: d=1M, M=4, unshaped / 1gbit / 100mbit")
    p.add_argument("--dims", type=size_arg, nargs="+", help="vector sizes (e.g. 1m 11m 25m)")
    p.add_argument("--workers", type=workers_arg, nargs="+", help="numbers of workers M")
    p.add_argument("--rates", type=rate_arg, nargs="+",
                   help="link rates: unshaped, 10gbit, 1gbit, 100mbit, 10Gbit/s, ...")
    p.add_argument("--methods", nargs="+", choices=list(COMM_LABELS), default=list(COMM_LABELS))
    p.add_argument("--skip-above", type=float, default=30.0,
                   help="skip a cell whose wire time is predicted above this many seconds")
    p.add_argument("--target-s", type=float, default=2.0,
                   help="seconds of repetitions per fast cell")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--json", default=None, help="raw results (default: next to --markdown)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--render", metavar="JSON", help="only re-render markdown/plot from JSON")
    p.add_argument("--extra", metavar="JSON", nargs="+", default=[],
                   help="other runs' JSON to append to the markdown as 'Additional run' "
                        "sections (e.g. a focused re-run of the goal cell)")
    args = p.parse_args(argv)
    args.command_line = command_line(__file__, argv)
    if args.render:
        data = read_results(args.render)
    else:
        preset = QUICK if args.quick else FULL
        args.dims = args.dims or preset["dims"]
        args.workers = args.workers or preset["workers"]
        args.rates = args.rates or preset["rates"]
        if args.json is None and args.markdown:
            args.json = str(Path(args.markdown).with_suffix(".json"))
        data = run(args)
    emit(comm_markdown(data, args.extra), args.markdown)
    if args.plot:
        comm_plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
