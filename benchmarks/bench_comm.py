"""Per-step aggregation time and bytes of every method, on an emulated network.

For each link rate (unshaped, 10 Gbit/s, 1 Gbit/s, 100 Mbit/s), number of workers M and
vector size d, M Gloo workers in a fresh network namespace (``benchmarks/netem.py``;
loopback shaped with ``tc tbf``, i.e. M ranks sharing one link of that rate) time one
aggregation of a random d-vector with: sharded majority vote, allgather majority vote,
EF all-reduce (1-bit ScaledSign), fp16 all-reduce and fp32 all-reduce — and the peers a
user would pick instead, through ``torch.nn.parallel.DistributedDataParallel`` and torch's
own communication hooks: DDP fp32 (no hook), DDP + ``fp16_compress_hook``, DDP +
``powerSGD_hook`` of rank 1, 2 and 4 (one bucket: with several, the hook fails over Gloo),
and DDP + ``noop_hook`` (no communication: DDP's own cost). The DDP rows hold d as
1024-row matrices (``workers.comm_layout``) with a negligible forward (``½·Σ p²``, so the
gradient is the rank's vector) and time backward + DDP + the hook; PowerSGD's two fp32
warm-up iterations are taken untimed before (``workers`` module docstring). Every ratio is
against fp32 all-reduce in the same launch (same rate, M, d). The predicted time is the
bandwidth model of docs/performance.md: unshaped time of the same cell + 8·M·sent / rate.
torch's ``bf16_compress_hook`` needs CUDA + NCCL and is not measured here.

Repetitions are adaptive (``benchmarks/workers.py``): an op slower than 2 s is measured once;
cells whose wire time is predicted above ``--skip-above`` seconds are skipped and listed.
When the methods' buffers of one d would not fit half the available memory, they are
measured in consecutive groups (each interleaved).

Usage::

    .venv/bin/python benchmarks/bench_comm.py --quick            # a few minutes
    .venv/bin/python benchmarks/bench_comm.py                    # the full grid
    .venv/bin/python benchmarks/bench_comm.py --methods fp32-allreduce majority-vote \\
        fp32-ddp fp16-ddp powersgd-r1 powersgd-r2 powersgd-r4 noop-ddp --workers 4 \\
        --markdown benchmarks/results/comm_peers.md      # the peers only, M = 4
    .venv/bin/python benchmarks/bench_comm.py --render benchmarks/results/comm.json

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

from bandwidth import predicted
from common import (
    DEFAULT_RATES,
    command_line,
    emit,
    load_text,
    loopback_rate,
    rate_arg,
    read_results,
    run_record,
    shaped_link,
    size_arg,
    workers_arg,
    write_json,
)
from netem import (
    format_rate,
    launch,
    parse_rate,
    shaping_unavailable_reason,
)
from workers import COMM_LABELS, comm_worker

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


# ------------------------------------------------------------------------------- report
def _index(cells: list[dict[str, Any]]) -> dict[tuple[str, int, int, str], dict[str, Any]]:
    return {(c["rate"], c["world_size"], c["d"], c["method"]): c for c in cells}


def _predicted(idx: dict[tuple[str, int, int, str], dict[str, Any]], c: dict[str, Any],
               loopback_bps: float | None) -> float | None:
    """Bandwidth-model time of cell ``c`` from the unshaped cell of the same (M, d, method)."""
    return predicted(c, idx.get(("unshaped", c["world_size"], c["d"], c["method"])),
                     loopback_bps)


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:.3g}"


def markdown(data: dict[str, Any]) -> str:
    """The results file: header, goals, full table, what was skipped."""
    cells = data["cells"]
    idx = _index(cells)
    mach = data["machine"]
    lo_bps = data.get("loopback_bps")
    lines = [
        "# Communication benchmark: one aggregation step per method",
        "",
        f"- Command: `{data['command']}`",
        f"- Date: {data['date']}; wall time {data.get('wall_s', '?')} s",
        f"- Machine: {mach['cpus']} CPU cores ({mach['processor']}), {mach['platform']}, "
        f"Python {mach['python']}, torch {mach['torch']}, Gloo on CPU, 1 torch thread "
        "per worker.",
        "- **The machine may have been shared with other agents' builds and tests**"
        + load_text(mach) + ": every number is noisy (compute-bound cells most), and the "
        f"M workers share its {mach['cpus']} cores.",
        f"- Network: {data['shaping']}; MTU 1500; `burst 256kb latency 400ms`. All M ranks "
        "share the one shaped link, so a step's wire time is (bytes all ranks send) / rate "
        "(see docs/performance.md).",
        "- Time: median over the repetitions of the slowest rank's time for one step "
        "(barrier before each step); an op slower than 2 s is measured once (reps = 1).",
        "- `× fp32`: time / fp32 all-reduce time in the same launch (same rate, M, d). "
        "`pred.`: bandwidth model (docs/performance.md) T0 + 8·M·sent/min(rate, R_lo), "
        "T0 = unshaped time of the same cell − 8·M·sent/R_lo, R_lo = the unshaped "
        "loopback's one-flow TCP throughput measured in this run"
        + (f" ({lo_bps / 1e9:.2f} Gbit/s)" if lo_bps else "")
        + "; `pred/meas` its ratio to the measurement.",
        "- Bytes: `sent`/`recv` = payload of one rank per step (the aggregators' counters; "
        "ring all-reduce 2(M−1)/M·4d for fp32; PowerSGD: its P and Q and the tensors it "
        "does not compress, fp32, three ring all-reduces, `bandwidth.powersgd_nbytes`); "
        "`wire` = the namespace's loopback byte counter per step, all ranks together, "
        "TCP/IP headers included.",
        "- DDP rows: `torch.nn.parallel.DistributedDataParallel` and torch's hooks over d "
        "held as 1024-row matrices (d = 1M: one 1024 × 977), timing backward of a "
        "negligible loss (½·Σ p², so the gradient is the rank's vector) + DDP's copies + the "
        "hook; `DDP + noop hook` is that cost without communication. PowerSGD: torch's "
        "`powerSGD_hook` with error feedback and warm start, one bucket, timed after its "
        "2 warm-up iterations. torch's bf16 hook needs CUDA + NCCL: not measured.",
        "",
    ]
    goal = [c for c in cells if c["rate"] in ("1gbit", "1Gbit/s") and c["world_size"] == 4
            and c["d"] == 25_000_000]
    if goal:
        g = {c["method"]: c for c in goal}
        base = g.get("fp32-allreduce", {}).get("median_s")
        lines += ["## Goals (1 Gbit/s, M = 4, d = 25M)", "",
                  "| method | time (ms) | × fp32 all-reduce | goal | met? |",
                  "|---|---:|---:|---:|---|"]
        for meth, target in (("majority-vote", 0.05), ("ef-allreduce", 0.08)):
            c = g.get(meth)
            if c is None or c["median_s"] is None or not base:
                lines.append(f"| {COMM_LABELS[meth]} | – | – | ≤ {target} | not measured "
                             f"({c['status'] if c else 'not run'}) |")
                continue
            ratio = c["median_s"] / base
            lines.append(f"| {COMM_LABELS[meth]} | {c['median_s'] * 1e3:.1f} | {ratio:.3f} | "
                         f"≤ {target} | {'yes' if ratio <= target else 'no'} |")
        note = ""
        b = g.get("fp32-allreduce")
        v = g.get("majority-vote")
        if base and b and v and b.get("rate_bps"):
            wb = 8 * 4 * b["sent"] / b["rate_bps"]
            wv = 8 * 4 * v["sent"] / v["rate_bps"]
            note = (f" Wire time alone (M·sent/rate): fp32 {wb:.2f} s, vote {wv:.3f} s, so "
                    f"the bytes allow {wv / wb:.3f}×; the rest of the vote's "
                    f"{v['median_s']:.2f} s is its fixed cost (pack, tally, unpack, "
                    "latency) on the shared CPU.")
        lines += ["", (f"fp32 all-reduce: {base * 1e3:.0f} ms." if base else "") + note, ""]
    # Model agreement summary, overall and by the share of predicted time that is wire time
    agree = []
    for c in cells:
        p = _predicted(idx, c, lo_bps)
        if p is not None and c["median_s"]:
            rate = min(c["rate_bps"], lo_bps) if lo_bps else c["rate_bps"]
            share = 8 * c["world_size"] * c["sent"] / rate / p if p > 0 else 1.0
            agree.append((share, p / c["median_s"], c["rate"]))
    if agree:
        lines += ["## Bandwidth model vs measurement", "",
                  "How many shaped cells the model predicts within ±25 %, overall, per rate, "
                  "and by the share of the predicted time that is wire time (8·M·sent/rate): "
                  "where the wire dominates the model is accurate; where the fixed cost T0 "
                  "dominates, the error is that of T0, measured in another launch on a machine "
                  "whose load varied several-fold during the run.", "",
                  "| cells | count | within ±25 % | median pred/meas | min | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        groups: list[tuple[str, list[float]]] = [("all", [a[1] for a in agree])]
        groups += [(format_rate(parse_rate(rate)), [a[1] for a in agree if a[2] == rate])
                   for rate in data["settings"]["rates"]]
        groups += [(f"wire share ≥ {thr:.0%}", [a[1] for a in agree if a[0] >= thr])
                   for thr in (0.5, 0.8)]
        groups += [("wire share < 50 %", [a[1] for a in agree if a[0] < 0.5])]
        for name, rs in groups:
            if not rs:
                continue
            rs = sorted(rs)
            lines.append(f"| {name} | {len(rs)} | {sum(1 for a in rs if 0.75 <= a <= 1.25)} | "
                         f"{rs[len(rs) // 2]:.2f} | {rs[0]:.2f} | {rs[-1]:.2f} |")
        lines.append("")
    lines += ["## All cells", "",
              "| rate | M | d | method | time (ms) | × fp32 | pred. (ms) | pred/meas | "
              "sent/rank (MB) | recv/rank (MB) | wire/step (MB) | reps |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for c in cells:
        rate = format_rate(c["rate_bps"]) + ("" if c.get("shaped") or c["rate_bps"] is None
                                             else " (NOT shaped)")
        if c["median_s"] is None:
            skipped.append(f"- {rate}, M={c['world_size']}, d={c['d'] / 1e6:g}M, "
                           f"{COMM_LABELS[c['method']]}: {c['status']}")
            continue
        base = idx.get((c["rate"], c["world_size"], c["d"], "fp32-allreduce"))
        ratio = (f"{c['median_s'] / base['median_s']:.3f}"
                 if base and base["median_s"] else "–")
        p = _predicted(idx, c, lo_bps)
        pm = "–" if p is None else f"{p / c['median_s']:.2f}"
        lines.append(
            f"| {rate} | {c['world_size']} | {c['d'] / 1e6:g}M | {COMM_LABELS[c['method']]} | "
            f"{c['median_s'] * 1e3:.1f} | {ratio} | "
            f"{'–' if p is None else f'{p * 1e3:.1f}'} | "
            f"{pm} | "
            f"{_mb(c['sent'])} | {_mb(c['received'])} | {_mb(c['wire_per_step'])} | "
            f"{c['reps']} |")
    if skipped:
        lines += ["", "## Not measured", "", *skipped]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: str) -> None:
    """Time against bandwidth, one line per method, one panel per (M, d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = data["cells"]
    ms = sorted({c["world_size"] for c in cells})
    ds = sorted({c["d"] for c in cells})
    rates = [r for r in data["settings"]["rates"]]
    # x axis: link rate in Gbit/s, unshaped drawn at the right edge
    shaped = [parse_rate(r) for r in rates if parse_rate(r) is not None]
    top = (max(shaped) if shaped else 10**9) * 10

    def x_of(bps: int | None) -> float:
        return (bps if bps is not None else top) / 1e9

    fig, axes = plt.subplots(len(ms), len(ds), figsize=(4.2 * len(ds), 3.3 * len(ms)),
                             squeeze=False, sharex=True)
    for i, m in enumerate(ms):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for meth in data["settings"]["methods"]:
                pts = sorted((x_of(c["rate_bps"]), c["median_s"]) for c in cells
                             if c["world_size"] == m and c["d"] == d and c["method"] == meth
                             and c["median_s"] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=COMM_LABELS[meth])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"M = {m}, d = {d / 1e6:g}M", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(ms) - 1:
                ax.set_xlabel("link rate (Gbit/s; rightmost = unshaped)")
            if j == 0:
                ax.set_ylabel("time per step (s)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Aggregation time vs bandwidth ({data['date']}, {data['machine']['cpus']} "
                 "shared cores, Gloo)", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    text = markdown(data)
    for path in args.extra:
        body = markdown(read_results(path)).split("\n", 1)[1]
        body = "\n".join("#" + line if line.startswith("#") else line
                         for line in body.splitlines())
        text += (f"\n## Additional run ({Path(path).name})\n"
                 "\nA separate launch, with its own command, date and ratios; the grid above "
                 "is unchanged.\n" + body + "\n")
    emit(text, args.markdown)
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
