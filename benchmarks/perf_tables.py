"""Tables of docs/performance.md from the raw benchmark results.

Reads ``benchmarks/results/comm.json`` (``bench_comm.py``) and, if present,
``benchmarks/results/e2e.json`` (``bench_e2e.py``) and prints markdown:

1. the fixed (non-wire) cost ``T0`` of each method, per (M, d), from the unshaped runs;
2. predicted against measured times at every shaped rate (the bandwidth model);
3. the best observed fixed cost per cell (smallest measured − wire time over the rates) and,
   from it, the break-even rate above which each compressed method stops beating fp32
   all-reduce, on the emulated shared link and on a switched network (per-machine links);
4. the same for whole ResNet-18 training steps (the peers — DDP + torch's fp16 and
   PowerSGD hooks — against the same baselines; ``noop-ddp``, no communication, is a
   floor and has no break-even);
5. from ``benchmarks/results/tta_*.json`` (``bench_tta.py``), if present: time to target
   per workload, method and rate, as a multiple of DDP fp32's (SGD and AdamW), and the
   fastest method at each rate.

Usage::

    .venv/bin/python -m benchmarks.perf_tables [--comm PATH] [--e2e PATH] [--tta PATH ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.bandwidth import break_even_rate, fixed_cost, predicted
from benchmarks.common import read_results
from benchmarks.methods import COMM_LABELS, E2E_LABELS
from benchmarks.netem import format_rate, parse_rate
from benchmarks.report import rows

HERE = Path(__file__).resolve().parent


def _rate_text(bps: float) -> str:
    if bps == math.inf:
        return "never (always pays)"
    if bps == 0.0:
        return "never pays"
    for div, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bps >= div:
            return f"{bps / div:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def comm_tables(data: dict[str, Any], pred_m: int | None = None) -> str:
    """Sections 1–3 from the communication benchmark."""
    cells = data["cells"]
    lo = data.get("loopback_bps")
    idx = {(c["rate"], c["world_size"], c["d"], c["method"]): c for c in cells}
    ms = sorted({c["world_size"] for c in cells})
    ds = sorted({c["d"] for c in cells})
    methods = list(data["settings"]["methods"])
    out = [f"R_lo (unshaped loopback, one TCP flow, best of 3) = "
           f"{lo / 1e9:.1f} Gbit/s." if lo else "", "",
           "### Fixed cost T0 per step (s), from the unshaped runs", "",
           "| M | d | " + " | ".join(COMM_LABELS[m] for m in methods) + " |",
           "|---:|---:|" + "---:|" * len(methods)]
    t0: dict[tuple[int, int, str], float] = {}
    for m in ms:
        for d in ds:
            row = []
            for meth in methods:
                c = idx.get(("unshaped", m, d, meth))
                if c is None or c["median_s"] is None:
                    row.append("–")
                    continue
                t0[(m, d, meth)] = fixed_cost(c["median_s"], m * c["sent"], None, lo)
                row.append(f"{t0[(m, d, meth)]:.3f}")
            out.append(f"| {m} | {d / 1e6:g}M | " + " | ".join(row) + " |")
    out += ["", "### Predicted vs measured (s)", "",
            "| rate | M | d | method | measured | predicted | pred/meas |",
            "|---|---:|---:|---|---:|---:|---:|"]
    ratios: dict[str, list[float]] = {}
    for c in cells:
        p = predicted(c, idx.get(("unshaped", c["world_size"], c["d"], c["method"])), lo)
        if p is None or not c["median_s"]:
            continue
        r = p / c["median_s"]
        ratios.setdefault(c["rate"], []).append(r)
        if pred_m is not None and c["world_size"] != pred_m:
            continue
        out.append(f"| {format_rate(c['rate_bps'])} | {c['world_size']} | {c['d'] / 1e6:g}M | "
                   f"{COMM_LABELS[c['method']]} | {c['median_s']:.3f} | {p:.3f} | {r:.2f} |")
    out += ["", "| rate | cells | within ±25 % | median pred/meas |", "|---|---:|---:|---:|"]
    for rate, rs in ratios.items():
        out.append(f"| {format_rate(parse_rate(rate))} | {len(rs)} | "
                   f"{sum(1 for r in rs if 0.75 <= r <= 1.25)} | {statistics.median(rs):.2f} |")
    # Break-even from the best observed fixed cost: per cell, the smallest residual
    # (measured − wire time) over all rates — the method's cost on this machine when the
    # other agents' load was lowest, rather than one noisy unshaped sample.
    best: dict[tuple[int, int, str], float] = {}
    for c in cells:
        if c["median_s"] is None or c["sent"] is None:
            continue
        resid = fixed_cost(c["median_s"], c["world_size"] * c["sent"], c["rate_bps"], lo)
        key = (c["world_size"], c["d"], c["method"])
        best[key] = min(best.get(key, math.inf), resid)
    out += ["", "### Best observed fixed cost T0 per step (s)", "",
            "Per cell, the smallest (measured − 8·M·sent/min(rate, R_lo)) over the four "
            "rates.", "",
            "| M | d | " + " | ".join(COMM_LABELS[m] for m in methods) + " |",
            "|---:|---:|" + "---:|" * len(methods)]
    for m in ms:
        for d in ds:
            out.append(f"| {m} | {d / 1e6:g}M | " + " | ".join(
                f"{best[(m, d, meth)]:.3f}" if (m, d, meth) in best else "–"
                for meth in methods) + " |")
    out += ["", "### Break-even rate: above it the method is slower than fp32 all-reduce", "",
            "From the best observed T0 above and the payload bytes. *shared*: M machines "
            "behind one link of rate R (what the emulator does; W = M·sent); *switched*: "
            "every machine has its own link of rate R (W = sent).", "",
            "| M | d | method | shared link | switched network |", "|---:|---:|---|---:|---:|"]
    for m in ms:
        for d in ds:
            b = idx.get(("unshaped", m, d, "fp32-allreduce"))
            if b is None or (m, d, "fp32-allreduce") not in best:
                continue
            tb = best[(m, d, "fp32-allreduce")]
            for meth in methods:
                if meth == "fp32-allreduce" or (m, d, meth) not in best:
                    continue
                c = idx[("unshaped", m, d, meth)]
                shared = break_even_rate(best[(m, d, meth)], m * c["sent"], tb, m * b["sent"])
                switched = break_even_rate(best[(m, d, meth)], c["sent"], tb, b["sent"])
                out.append(f"| {m} | {d / 1e6:g}M | {COMM_LABELS[meth]} | {_rate_text(shared)} | "
                           f"{_rate_text(switched)} |")
    return "\n".join(out) + "\n"


def e2e_tables(data: dict[str, Any]) -> str:
    """Section 4 from the end-to-end benchmark (best observed fixed cost per method)."""
    steps = data.get("steps", [])
    if not steps:
        return ""
    lo = data.get("loopback_bps")
    m = steps[0]["world_size"]
    best: dict[str, float] = {}
    sent: dict[str, int] = {}
    for r in steps:
        resid = fixed_cost(r["median_s"], m * r["sent"], r["rate_bps"], lo)
        best[r["method"]] = min(best.get(r["method"], math.inf), resid)
        sent[r["method"]] = r["sent"]
    if "sgd" not in best:
        return ""
    out = [f"### ResNet-18 training step, M = {m}: break-even rates", "",
           "T0 = best observed fixed cost: per method, the smallest (measured step − "
           "8·M·sent/min(rate, R_lo)) over the rates. Break-even against SGD + fp32 "
           "all-reduce (one flat all-reduce after backward) and against SGD + DDP (bucketed "
           "fp32 all-reduce overlapping backward), on a shared link / a switched network.", "",
           "| method | T0 (s) | sent/rank (MB) | vs SGD + all-reduce: shared | switched | "
           "vs SGD + DDP: shared | switched |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    bases = [(b, best[b], sent[b]) for b in ("sgd", "sgd-ddp") if b in best]
    for meth, t0 in best.items():
        cols = []
        for _name, tb, wb in bases:
            if meth in ("sgd", "sgd-ddp", "sgd-local", "noop-ddp"):
                cols += ["–", "–"]
                continue
            cols += [_rate_text(break_even_rate(t0, m * sent[meth], tb, m * wb)),
                     _rate_text(break_even_rate(t0, sent[meth], tb, wb))]
        out.append(f"| {E2E_LABELS[meth]} | {t0:.3f} | {sent[meth] / 1e6:.3g} | "
                   + " | ".join(cols) + " |")
    return "\n".join(out) + "\n"


def tta_tables(data: dict[str, Any]) -> str:
    """Section 5 from a time-to-target run: per workload, time to target (s) per method and
    rate with its multiple of ``sgd-ddp``'s and ``adamw-ddp``'s, then the fastest method
    per rate."""
    table = rows(data)
    out: list[str] = []
    for w in data["settings"]["workloads"]:
        tr = [r for r in table if r["workload"] == w]
        if not tr:
            continue
        rates = list(dict.fromkeys(r["rate"] for r in tr))
        ws = data["settings"]["per_workload"][w]
        out += [f"### Time to target, `{w}` (target {ws['target']:g}), M = "
                f"{data['settings']['workers']}", "",
                "Cells: seconds of training to the target (model: steps to target × step "
                "time at that rate) / × SGD + DDP / × AdamW + DDP. `–`: not reached or not "
                "trained to a target.", "",
                "| method | " + " | ".join(format_rate(parse_rate(r)) for r in rates) + " |",
                "|---|" + "---:|" * len(rates)]
        for m in dict.fromkeys(r["method"] for r in tr):
            cells = []
            for rate in rates:
                r = next((x for x in tr if x["method"] == m and x["rate"] == rate), None)
                if r is None or r["tta_s"] is None:
                    cells.append("–")
                    continue
                vs = [f"{v:.2f}" if v is not None else "–"
                      for v in (r["vs"]["sgd-ddp"], r["vs"]["adamw-ddp"])]
                cells.append(f"{r['tta_s']:.1f} / {vs[0]} / {vs[1]}")
            out.append(f"| {E2E_LABELS[m]} | " + " | ".join(cells) + " |")
        fastest = []
        for rate in rates:
            done = sorted((r["tta_s"], r["method"]) for r in tr
                          if r["rate"] == rate and r["tta_s"] is not None)
            if not done:
                continue
            best = f"{E2E_LABELS[done[0][1]]} | {done[0][0]:.1f}"
            nxt = (f"{E2E_LABELS[done[1][1]]} | {done[1][0]:.1f}" if len(done) > 1
                   else "– | –")
            fastest.append(f"| {format_rate(parse_rate(rate))} | {best} | {nxt} |")
        if fastest:
            out += ["", "| rate | fastest to the target | time (s) | next | time (s) |",
                    "|---|---|---:|---|---:|", *fastest]
        out.append("")
    return "\n".join(out) + "\n"


#: The families the break-even table compares; a family stands for its fastest member at
#: 100 Mbit/s (``*`` matches any suffix).
FAMILIES = {"majority vote (per step)": ("signum", "lion"), "EF all-reduce": ("ef-signsgd",),
            "PowerSGD (best rank)": ("powersgd-*",), "16-bit all-reduce": ("fp16-*",),
            "fp32 DDP": ("sgd-ddp", "adamw-ddp"), "local steps + vote": ("local-*",)}


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``t = a + b·x`` through ``(x, t)`` points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    mt = sum(t for _, t in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (t - mt) for x, t in points) / sxx if sxx else 0.0
    return mt - b * mx, b


def tta_break_even(data: dict[str, Any]) -> str:
    """Break-even link rates of time to target between method families.

    Per method, the modelled times to target at the measured rates are fitted by
    ``T(R) = a + b / R`` (``a``: the compute and fixed costs of every step to the target,
    ``b``: its bits over the shared link; the unshaped loopback counts as its measured
    one-flow rate). Two families' lines cross at ``R* = (b₁ − b₂) / (a₂ − a₁)``: below R*
    the one with fewer bits to send is faster, above it the one with the smaller fixed
    cost. A family is its fastest member at 100 Mbit/s.
    """
    lo = float(data.get("loopback_bps") or 16e9)
    table = [r for r in rows(data) if r["tta_s"] is not None]
    out: list[str] = []
    for w in data["settings"]["workloads"]:
        tr = [r for r in table if r["workload"] == w]
        fits: dict[str, tuple[float, float]] = {}
        slow: dict[str, float] = {}
        for m in dict.fromkeys(r["method"] for r in tr):
            pts = [(1.0 / (parse_rate(r["rate"]) or lo), r["tta_s"]) for r in tr
                   if r["method"] == m]
            if len(pts) >= 2:
                a, b = _fit(pts)
                fits[m] = (a, b) if b >= 0 else (a + b / 1e8, 0.0)  # noise: no bits < 0
                slow[m] = fits[m][0] + fits[m][1] / 1e8
        best: dict[str, str] = {}
        for fam, pats in FAMILIES.items():
            members = [m for m in fits if any(m == p or p.endswith("*") and
                                              m.startswith(p[:-1]) for p in pats)]
            if members:
                best[fam] = min(members, key=lambda m: slow[m])
        if len(best) < 2:
            continue
        out += [f"### Break-even rates of time to target, `{w}`", "",
                "T(R) = a + b/R fitted per method over the measured rates; a family is its "
                "fastest member at 100 Mbit/s. Cell: the rates at which the *row* reaches the "
                "target before the column (`always` / `never`: the lines do not cross at a "
                "positive rate); b < 0 fitted from noise is taken as 0.", "",
                "| family (method) | a (s) | b (Gbit) | " + " | ".join(best) + " |",
                "|---|---:|---:|" + "---:|" * len(best)]
        for fam, m in best.items():
            a1, b1 = fits[m]
            cells = []
            for fam2, m2 in best.items():
                if fam2 == fam:
                    cells.append("–")
                    continue
                a2, b2 = fits[m2]
                if a1 == a2 or (b1 - b2) * (a2 - a1) <= 0:
                    faster = a1 + b1 / 1e8 < a2 + b2 / 1e8
                    cells.append("always" if faster else "never")
                else:  # fewer bits and a higher fixed cost: faster below R*, else above
                    side = "below" if b1 < b2 else "above"
                    cells.append(f"{side} {_rate_text((b1 - b2) / (a2 - a1))}")
            out.append(f"| {fam} ({m}) | {a1:.1f} | {b1 / 1e9:.2f} | " + " | ".join(cells)
                       + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comm", default=str(HERE / "results" / "comm.json"))
    p.add_argument("--e2e", default=str(HERE / "results" / "e2e.json"))
    p.add_argument("--tta", nargs="*", default=None,
                   help="bench_tta.py results (default: results/tta_*.json)")
    p.add_argument("--pred-m", type=int, default=None,
                   help="list predicted vs measured only for this M (summary: all)")
    args = p.parse_args(argv)
    print(comm_tables(read_results(args.comm), args.pred_m))
    if Path(args.e2e).exists():
        print(e2e_tables(read_results(args.e2e)))
    tta = args.tta if args.tta is not None else sorted(
        str(p) for p in (HERE / "results").glob("tta_*.json"))
    for path in tta:
        print(tta_tables(read_results(path)))
        print(tta_break_even(read_results(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
