"""Renders the results files of the network benchmarks (``bench_comm``, ``bench_e2e``,
``bench_tta``) as markdown and plots; the scripts call it after measuring, and it runs on its
own on a results file: ``python -m benchmarks.report {comm,e2e,tta} RESULTS.json [--markdown
OUT.md]`` (standard output without ``--markdown``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.bandwidth import predicted
from benchmarks.common import emit, load_text, read_results
from benchmarks.methods import BASELINES, COMM_LABELS, E2E_LABELS, WORKLOADS, warmup_reference
from benchmarks.netem import format_rate, parse_rate

__all__ = ["comm_markdown", "comm_plot", "e2e_markdown", "e2e_plots", "tta_markdown",
           "tta_plot", "rows", "time_to_target", "main"]


# ------------------------------------------------------------------------------- bench_comm
def _index(cells: list[dict[str, Any]]) -> dict[tuple[str, int, int, str], dict[str, Any]]:
    return {(c["rate"], c["world_size"], c["d"], c["method"]): c for c in cells}


def _predicted(idx: dict[tuple[str, int, int, str], dict[str, Any]], c: dict[str, Any],
               loopback_bps: float | None) -> float | None:
    """Bandwidth-model time of cell ``c`` from the unshaped cell of the same (M, d, method)."""
    return predicted(c, idx.get(("unshaped", c["world_size"], c["d"], c["method"])),
                     loopback_bps)


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:.3g}"


def _preamble(title: str, data: dict[str, Any]) -> list[str]:
    """The lines every results file opens with: its title, command, date and the machine up
    to ``... 1 torch thread per worker`` (each report ends that line its own way)."""
    mach = data["machine"]
    return [f"# {title}", "", f"- Command: `{data['command']}`",
            f"- Date: {data['date']}; wall time {data.get('wall_s', '?')} s",
            f"- Machine: {mach['cpus']} CPU cores ({mach['processor']}), {mach['platform']}, "
            f"Python {mach['python']}, torch {mach['torch']}, Gloo on CPU, 1 torch thread per "
            "worker"]


def comm_markdown(data: dict[str, Any], extra: Sequence[str] = ()) -> str:
    """The results file of ``bench_comm``: header, goals, full table, what was skipped; then
    each results file of ``extra`` (another run, e.g. a focused re-run of the goal cell) as
    an "Additional run" section."""
    cells = data["cells"]
    idx = _index(cells)
    mach = data["machine"]
    lo_bps = data.get("loopback_bps")
    *lines, machine = _preamble("Communication benchmark: one aggregation step per method",
                                data)
    lines += [
        machine + ".",
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
    text = "\n".join(lines) + "\n"
    for path in extra:
        body = comm_markdown(read_results(path)).split("\n", 1)[1]
        body = "\n".join("#" + line if line.startswith("#") else line
                         for line in body.splitlines())
        text += (f"\n## Additional run ({Path(path).name})\n"
                 "\nA separate launch, with its own command, date and ratios; the grid above "
                 "is unchanged.\n" + body + "\n")
    return text


def comm_plot(data: dict[str, Any], path: str) -> None:
    """``bench_comm``'s plot: time against bandwidth, one line per method, one panel per (M, d)."""
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


# ------------------------------------------------------------------------------- bench_e2e
def _pred(data: dict[str, Any], rec: dict[str, Any]) -> float | None:
    """Bandwidth model (docs/performance.md) for a shaped step-time record."""
    base = next((r for r in data["steps"] if r["rate"] == "unshaped"
                 and r["method"] == rec["method"]), None)
    return predicted(rec, base, data.get("loopback_bps"))


def e2e_markdown(data: dict[str, Any]) -> str:
    """The results file of ``bench_e2e``."""
    mach = data["machine"]
    lo = data.get("loopback_bps")
    *lines, machine = _preamble("End-to-end benchmark: training steps on an emulated network",
                                data)
    lines += [
        machine + ".",
        "- **The machine may have been shared with other agents' builds and tests**"
        + load_text(mach) + ": compute-bound numbers are "
        f"noisy, and the M workers share its {mach['cpus']} cores (compute per step is "
        "several times what one worker on its own core would take).",
        f"- Network: {data['shaping']}; MTU 1500; `burst 256kb latency 400ms`; the M ranks "
        "share one link of the given rate"
        + (f"; unshaped loopback, one TCP flow: {lo / 1e9:.1f} Gbit/s" if lo else "") + ".",
        "",
    ]
    steps = data.get("steps", [])
    if steps:
        s0 = steps[0]
        lines += [
            f"## Step time: ResNet-18 ({s0['numel'] / 1e6:.2f}M parameters), "
            f"M = {s0['world_size']}, batch {s0['batch']} of {s0['image_size']}×"
            f"{s0['image_size']} random images per worker",
            "",
            "Median over steps of the slowest rank's step time (forward + backward + "
            "aggregation + update; one warm-up step first; a step slower than 4 s is timed "
            "once; PowerSGD (torch's hook, error feedback and warm start, one DDP bucket) after "
            "its 2 fp32 warm-up steps, LocalSteps in whole rounds / H). `× SGD` = time / "
            "(SGD + fp32 all-reduce) in the same launch; "
            "`pred.` = bandwidth model T0 + 8·M·sent/min(rate, R_lo) with T0 from the "
            "unshaped row (docs/performance.md).",
            "",
        ]
        goal = [r for r in steps if r["rate"] == "100mbit"]
        if goal:
            g = {r["method"]: r for r in goal}
            if "signum" in g and "sgd" in g:
                ratio = g["signum"]["median_s"] / g["sgd"]["median_s"]
                lines += [
                    f"**Goal** (100 Mbit/s, M = 4, ResNet-18): Signum + majority vote step "
                    f"= {g['signum']['median_s']:.2f} s vs SGD + fp32 all-reduce "
                    f"{g['sgd']['median_s']:.2f} s: **{ratio:.3f}×** (goal ≤ 0.25: "
                    f"{'met' if ratio <= 0.25 else 'not met'}).", ""]
        lines += ["| rate | method | step (s) | × SGD + all-reduce | × SGD + DDP | pred. (s) | "
                  "pred/meas | sent/rank/step (MB) | wire/step (MB) | steps timed |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in steps:
            same = {x["method"]: x for x in steps if x["rate"] == r["rate"]}
            b1 = same.get("sgd", {}).get("median_s")
            b2 = same.get("sgd-ddp", {}).get("median_s")
            p = _pred(data, r)
            rate = format_rate(r["rate_bps"]) + ("" if r.get("shaped") or r["rate_bps"] is None
                                                 else " (NOT shaped)")
            wire = "–" if r["wire_per_step"] is None else f"{r['wire_per_step'] / 1e6:.3g}"
            lines.append(
                f"| {rate} | {E2E_LABELS[r['method']]} | {r['median_s']:.3f} | "
                + (f"{r['median_s'] / b1:.3f}" if b1 else "–") + " | "
                + (f"{r['median_s'] / b2:.3f}" if b2 else "–") + " | "
                + ("–" if p is None else f"{p:.3f}") + " | "
                + ("–" if p is None else f"{p / r['median_s']:.2f}") + " | "
                + f"{r['sent'] / 1e6:.3g} | {wire} | {r['reps']} |")
        lines.append("")
    tta = data.get("tta", [])
    if tta:
        t0 = tta[0]
        lines += [
            f"## Time to accuracy: Fashion-MNIST, small CNN ({t0['numel'] / 1e6:.2f}M "
            f"parameters), M = {t0['world_size']}, {format_rate(t0['rate_bps'])}"
            + ("" if t0.get("shaped") else " (NOT shaped)"),
            "",
            f"Batch {t0['batch']} per worker (global {t0['batch'] * t0['world_size']}); "
            f"target: {t0['target_acc']:.0%} accuracy on the first 2000 test images, "
            "checked every 25 steps; the clock counts training steps only (evaluation "
            f"excluded); budget {data['settings']['tta_budget']:g} s of training per method. "
            "Learning rates were set once by hand, not tuned per method. Training loop: a "
            "minimal loop in `benchmarks/loops.py` (`tta_worker`) over the library pieces.",
            "",
            "| method | lr | time to target (s) | steps | final acc | at (s) | "
            "s/step | sent/rank/step (kB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in tta:
            last = r["curve"][-1]
            reached = "not reached" if r["reached_s"] is None else f"{r['reached_s']:.1f}"
            lines.append(
                f"| {E2E_LABELS[r['method']]} | {r['lr']:g} | {reached} | {r['steps']} | "
                f"{last[2]:.3f} | {last[0]:.1f} | {last[0] / max(r['steps'], 1):.3f} | "
                f"{r['bytes_sent_per_step'] / 1e3:.1f} |")
        base = next((r for r in tta if r["method"] == "sgd"), None)
        vote = next((r for r in tta if r["method"] == "signum"), None)
        if base and vote and base["reached_s"] and vote["reached_s"]:
            lines += ["", f"Signum + majority vote reached the target in "
                      f"{vote['reached_s'] / base['reached_s']:.3f}× the time of SGD + fp32 "
                      "all-reduce."]
        lines.append("")
    return "\n".join(lines) + "\n"


def e2e_plots(data: dict[str, Any], prefix: str) -> list[str]:
    """``bench_e2e``'s plots: ``<prefix>_step_time.png`` and ``<prefix>_fmnist_tta.png``;
    returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    steps = data.get("steps", [])
    if steps:
        rates = list(dict.fromkeys(r["rate"] for r in steps))
        shaped = [parse_rate(r) for r in rates if parse_rate(r) is not None]
        top = (max(shaped) if shaped else 10**9) * 10
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in dict.fromkeys(r["method"] for r in steps):
            pts = sorted(((r["rate_bps"] or top) / 1e9, r["median_s"]) for r in steps
                         if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=E2E_LABELS[m])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Gbit/s; rightmost = unshaped)")
        ax.set_ylabel("training step time (s)")
        ax.set_title(f"ResNet-18, M = {steps[0]['world_size']} (Gloo, {data['date']})",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{prefix}_step_time.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    tta = data.get("tta", [])
    if tta:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in tta:
            c = r["curve"]
            ax.plot([p[0] for p in c], [p[2] for p in c], marker=".",
                    label=f"{E2E_LABELS[r['method']]} (lr {r['lr']:g})")
        ax.axhline(tta[0]["target_acc"], color="grey", ls="--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_xlabel("training time (s, evaluation excluded)")
        ax.set_ylabel("test accuracy (2000 images)")
        ax.set_title(f"Fashion-MNIST, small CNN, M = {tta[0]['world_size']}, "
                     f"{format_rate(tta[0]['rate_bps'])}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{prefix}_fmnist_tta.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------- bench_tta
def time_to_target(curve: dict[str, Any], step_s: dict[str, float]) -> float | None:
    """Seconds of training to the target at one rate: the curve's steps to target, each at
    the step time (``step_s``: method → seconds per step at that rate) of the phase it was
    in (``bench_tta`` module docstring, (c)); ``None`` if the target was not reached or a
    needed step time is missing.

    Example:
        >>> c = {"method": "powersgd-r1", "steps_to_target": 100, "start_powersgd_iter": 10}
        >>> time_to_target(c, {"powersgd-r1": 0.1, "sgd-ddp": 1.0})   # 10 × 1.0 + 90 × 0.1
        19.0
        >>> time_to_target({"method": "signum", "steps_to_target": None}, {"signum": 0.1})
    """
    n = curve.get("steps_to_target")
    name = curve["method"]
    if n is None or name not in step_s:
        return None
    ref = warmup_reference(name)
    if ref is None:
        return n * step_s[name]
    if ref not in step_s:
        return None
    s = int(curve.get("start_powersgd_iter") or 0)
    return min(n, s) * step_s[ref] + max(n - s, 0) * step_s[name]


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, rate, method) of the step-time launches: step time, bytes,
    the curve's steps to target and final metric, the modelled time to target and its
    ratios against ``sgd-ddp`` / ``adamw-ddp`` at the same rate.

    Example:
        >>> data = {"curves": [{"workload": "cnn", "method": "signum", "steps_to_target": 50,
        ...                     "final": 0.86, "start_powersgd_iter": None}],
        ...         "steps": [{"workload": "cnn", "method": "signum", "rate": "1gbit",
        ...                    "median_s": 0.02, "sent": 100, "world_size": 4}]}
        >>> r = rows(data)[0]; r["tta_s"], r["vs"]
        (1.0, {'sgd-ddp': None, 'adamw-ddp': None})
    """
    curves = {(c["workload"], c["method"]): c for c in data.get("curves", [])}
    by_rate: dict[tuple[str, str], dict[str, float]] = {}
    for s in data.get("steps", []):
        by_rate.setdefault((s["workload"], s["rate"]), {})[s["method"]] = s["median_s"]
    out = []
    for s in data.get("steps", []):
        step_s = by_rate[(s["workload"], s["rate"])]
        c = curves.get((s["workload"], s["method"]))
        tta = time_to_target(c, step_s) if c else None
        base = {b: (time_to_target(curves[(s["workload"], b)], step_s)
                    if (s["workload"], b) in curves else None) for b in BASELINES}
        out.append({**s, "curve": c, "tta_s": tta,
                    "vs": {b: (tta / t if tta is not None and t else None)
                           for b, t in base.items()},
                    "step_vs": {b: (s["median_s"] / step_s[b] if b in step_s else None)
                                for b in BASELINES}})
    return out


def _fmt(x: float | None, spec: str = ".3g", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _rate_name(r: dict[str, Any]) -> str:
    return format_rate(r["rate_bps"]) + ("" if r.get("shaped") or r["rate_bps"] is None
                                         else " (NOT shaped)")


def _metric_name(workload: str) -> str:
    return {"cnn": "test accuracy (10,000 images)",
            "gpt": "validation loss (nats/char)"}.get(workload, WORKLOADS[workload]["metric"])


def tta_markdown(data: dict[str, Any]) -> str:
    """The results file of ``bench_tta``."""
    mach = data["machine"]
    lo = data.get("loopback_bps")
    st = data["settings"]
    *lines, machine = _preamble("Time to target: our methods and the peers, on an emulated "
                                "network", data)
    lines += [
        machine + load_text(mach) + f"; the M = {st['workers']} workers share the cores, and "
        "the machine may have been shared with other jobs: step times are noisy.",
        f"- Network: {data['shaping']}; MTU 1500; `burst 256kb latency 400ms`; the M ranks "
        "share one link of the given rate"
        + (f"; unshaped loopback, one TCP flow: {lo / 1e9:.1f} Gbit/s" if lo else "") + ".",
        "- Time to target (model): the steps to target of the unshaped training run, each "
        "at the step time measured at that rate for the phase it was in (PowerSGD's first S "
        "steps at the fp32 DDP step time of the same optimiser, LocalSteps at round time / H); "
        "evaluation excluded. `× sgd-ddp`, `× adamw-ddp`: ratios of times to target at the "
        "same rate (< 1: faster).",
        "- PowerSGD: torch's `powerSGD_hook` with error feedback and warm start, one DDP bucket "
        "(with several buckets the hook fails over Gloo); torch's `bf16_compress_hook` needs "
        "CUDA + NCCL and is not measured.",
        *(f"- Note: {n}" for n in data.get("notes", [])),
        "",
    ]
    for w in st["workloads"]:
        curves = [c for c in data.get("curves", []) if c["workload"] == w]
        ws = st["per_workload"][w]
        lines += [f"## Workload `{w}`: {_metric_name(w)}, target {ws['target']:g}", "",
                  f"Step budget {ws['steps']}, evaluated every {ws['eval_every']} steps "
                  f"(LocalSteps: rounded up to whole rounds); PowerSGD's S = "
                  f"{ws['start_powersgd']}; learning-rate warm-up {ws['warmup_steps']} steps"
                  + (", then cosine" if WORKLOADS[w]["lr_schedule"] == "cosine" else
                     ", constant rate") + f"; gradient clipping "
                  f"{WORKLOADS[w]['grad_clip'] or 'off'}; batch {WORKLOADS[w]['batch_size']} "
                  + ("sequences of 128 characters " if w == "gpt" else "") + "per worker.", ""]
        if curves:
            lines += ["### Training to the target (unshaped)", "",
                      "| method | lr | steps to target | final | steps run | training (s) | "
                      "sent/rank/step (kB, mean) | note |",
                      "|---|---:|---:|---:|---:|---:|---:|---|"]
            for c in curves:
                note = []
                if c.get("start_powersgd_iter"):
                    note.append(f"S = {c['start_powersgd_iter']}")
                if c.get("sync_every", 1) > 1:
                    note.append(f"H = {c['sync_every']}, outer lr {c['outer_lr']:.3g}")
                if c.get("diverged"):
                    note.append(f"diverged ({c['diverged'][:60]})")
                lines.append(
                    f"| {E2E_LABELS[c['method']]} | {c['lr']:g} | "
                    f"{c['steps_to_target'] or 'not reached'} | {c['final']:.4f} | "
                    f"{c['steps']} | {c['train_s']:.1f} | "
                    f"{c['bytes_sent_per_step'] / 1e3:.3g} | {'; '.join(note)} |")
            lines.append("")
        table = [r for r in rows(data) if r["workload"] == w]
        for rate in dict.fromkeys(r["rate"] for r in table):
            rr = [r for r in table if r["rate"] == rate]
            lines += [f"### {_rate_name(rr[0])}", "",
                      "| method | sent/rank/step (MB) | step (s) | × sgd-ddp step | "
                      "steps to target | time to target (s) | × sgd-ddp | × adamw-ddp | "
                      "final |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rr:
                c = r["curve"]
                steps = ("–" if c is None else str(c["steps_to_target"] or "not reached"))
                lines.append(
                    f"| {E2E_LABELS[r['method']]} | {r['sent'] / 1e6:.3g} | "
                    f"{r['median_s']:.3f} | {_fmt(r['step_vs']['sgd-ddp'], '.3f')} | {steps} | "
                    f"{_fmt(r['tta_s'], '.1f')} | {_fmt(r['vs']['sgd-ddp'], '.3f')} | "
                    f"{_fmt(r['vs']['adamw-ddp'], '.3f')} | "
                    f"{'–' if c is None else format(c['final'], '.4f')} |")
            lines.append("")
        val = [v for v in data.get("validate", []) if v["workload"] == w]
        if val:
            model = {(r["rate"], r["method"]): r for r in table}
            lines += ["### Check of the model: real training under the shaped link", "",
                      "| rate | method | steps to target | measured training time (s) | "
                      "model (s) | model / measured |", "|---|---|---:|---:|---:|---:|"]
            for v in val:
                m = model.get((v["rate"], v["method"]))
                pred = None
                if m is not None and v["steps_to_target"]:
                    step_s = {r["method"]: r["median_s"] for r in table
                              if r["rate"] == v["rate"]}
                    pred = time_to_target(v, step_s)
                meas = v["train_s"] if v["steps_to_target"] else None
                lines.append(
                    f"| {_rate_name(v)} | {E2E_LABELS[v['method']]} | "
                    f"{v['steps_to_target'] or 'not reached'} | {_fmt(meas, '.1f')} | "
                    f"{_fmt(pred, '.1f')} | "
                    f"{_fmt(pred / meas if pred and meas else None, '.2f')} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def tta_plot(data: dict[str, Any], path: str) -> None:
    """``bench_tta``'s plot: time to target against link rate, one line per method, one panel
    per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(data)
    ws = [w for w in data["settings"]["workloads"] if any(r["workload"] == w for r in table)]
    if not ws:
        return
    shaped = [r["rate_bps"] for r in table if r["rate_bps"] is not None]
    top = (max(shaped) if shaped else 10**9) * 10
    fig, axes = plt.subplots(1, len(ws), figsize=(6.4 * len(ws), 4.6), squeeze=False)
    for ax, w in zip(axes[0], ws):
        for m in dict.fromkeys(r["method"] for r in table if r["workload"] == w):
            pts = sorted(((r["rate_bps"] or top) / 1e9, r["tta_s"]) for r in table
                         if r["workload"] == w and r["method"] == m and r["tta_s"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=E2E_LABELS[m], ls="--" if m in BASELINES else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Gbit/s; rightmost = unshaped)")
        ax.set_ylabel("time to target (s, model; training only)")
        target = data["settings"]["per_workload"][w]["target"]
        ax.set_title(f"{w}: {_metric_name(w)} {'≥' if WORKLOADS[w]['higher'] else '≤'} "
                     f"{target:g}, M = {data['settings']['workers']} ({data['date']})",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

# ------------------------------------------------------------------------------- CLI
#: The markdown renderer of each benchmark's results files.
MARKDOWN: dict[str, Callable[[dict[str, Any]], str]] = {
    "comm": comm_markdown, "e2e": e2e_markdown, "tta": tta_markdown}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report {comm,e2e,tta} RESULTS.json [--markdown OUT.md]``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=list(MARKDOWN), help="the benchmark that wrote it")
    p.add_argument("results", metavar="RESULTS.json")
    p.add_argument("--markdown", default=None, help="write here (default: standard output)")
    args = p.parse_args(argv)
    emit(MARKDOWN[args.benchmark](read_results(args.results)), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
