"""End-to-end training on an emulated network: step time and time-to-accuracy.

Part 1 (``--part steps``): M = 4 Gloo workers in a fresh network namespace
(``benchmarks/netem.py``, loopback shaped with ``tc tbf``: the M ranks share one link of the
given rate) each run whole training steps — forward, backward, aggregation, update — of a
ResNet-18 (11.7M parameters; ``benchmarks/workers.py``, ``resnet18``) on a fixed batch of
random 32×32 images, for every method of :data:`STEP_METHODS` (rows of the methods table,
``workers.METHODS``; ``--methods`` takes any of its names) and every rate: ours, and the
peers a user would pick instead — DDP fp32 (``sgd-ddp``), DDP + torch's ``fp16_compress_hook``
(``fp16-ddp``), DDP + torch's ``powerSGD_hook`` of rank 1, 2, 4 (one bucket; timed after its
``start_powerSGD_iter = 2`` fp32 steps, which are taken untimed first) and DDP + torch's
``noop_hook`` (``noop-ddp``: no communication, the floor). Ratios are against ``sgd`` (SGD +
fp32 all-reduce: one flat all-reduce after backward) and ``sgd-ddp`` (bucketed, overlapping
backward) measured in the same launch. Time to target with the peers: ``bench_tta.py``.

Part 2 (``--part tta``): time-to-accuracy on Fashion-MNIST at 100 Mbit/s, M = 4, the small
CNN of ``signsgd.models`` (``cnn``), batch 32 per worker: Signum + majority vote against
SGD + fp32 all-reduce and against DDP + the majority-vote hook. The clock counts training
steps only; the test accuracy (first 2000 test images) is taken every 25 steps. This uses
a minimal training loop over the library pieces (``signsgd.data``, ``signsgd.models``,
the optimisers and aggregators), not ``signsgd train``.

Usage::

    .venv/bin/python benchmarks/bench_e2e.py --quick
    .venv/bin/python benchmarks/bench_e2e.py --markdown benchmarks/results/e2e.md \\
        --plot-prefix docs/figures/e2e

Needs root and iproute2 to shape; without them it says so and runs unshaped. Fashion-MNIST
is read by ``signsgd.data.load`` (``./data`` or Debian's ``dataset-fashion-mnist``).
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
    workers_arg,
    write_json,
)
from netem import (
    format_rate,
    launch,
    parse_rate,
    shaping_unavailable_reason,
)
from workers import E2E_LABELS, method_arg, step_time_worker, tta_worker

TTA_METHODS = {"signum": 1e-3, "sgd": 0.05, "signum-ddp-hook": 1e-3}
#: The step-time methods by default: ours, the fp32 baselines and torch's hooks.
STEP_METHODS = ["signum", "signum-ddp-hook", "ef-signsgd", "sgd", "sgd-ddp", "sgd-local",
                "fp16-ddp", "powersgd-r1", "powersgd-r2", "powersgd-r4", "noop-ddp"]


def run_steps(args: argparse.Namespace, data: dict[str, Any], emu_ok: bool) -> None:
    """Part 1: step times per rate and method."""
    for rate in args.rates:
        rate_bps = parse_rate(rate)
        t0 = time.monotonic()
        with shaped_link(rate_bps, emu_ok) as emu:
            out = launch(step_time_worker, args.workers,
                         (args.methods, args.batch, args.image_size, 4.0, args.target_s,
                          2, 8, emu is not None),
                         emulator=emu, rate=rate, timeout=args.timeout,
                         pg_timeout=args.timeout)
        for rec in out.results[0]:
            rec.update(rate=rate, rate_bps=rate_bps, shaped=out.shaped)
            data["steps"].append(rec)
        base = next((r["median_s"] for r in out.results[0]
                     if r["method"] == "sgd"), None)
        print(f"[{time.monotonic() - t0:5.0f}s] {format_rate(rate_bps)}: " + ", ".join(
            f"{r['method']}={r['median_s']:.3f}s"
            + (f" ({r['median_s'] / base:.3f}x)" if base else "")
            for r in out.results[0]), file=sys.stderr)
        if args.json:
            write_json(args.json, data)


def run_tta(args: argparse.Namespace, data: dict[str, Any], emu_ok: bool) -> None:
    """Part 2: time-to-accuracy on Fashion-MNIST at ``args.tta_rate``."""
    rate_bps = parse_rate(args.tta_rate)
    with shaped_link(rate_bps, emu_ok) as emu:
        for method in args.tta_methods:
            lr = TTA_METHODS[method]
            t0 = time.monotonic()
            out = launch(tta_worker, args.workers,
                         (method, lr, args.tta_batch, args.tta_budget, 25, 2000,
                          args.tta_target),
                         emulator=emu, rate=args.tta_rate, timeout=args.timeout,
                         pg_timeout=args.timeout)
            res = out.results[0]
            res.update(rate=args.tta_rate, rate_bps=rate_bps, shaped=out.shaped)
            data["tta"].append(res)
            last = res["curve"][-1]
            print(f"[{time.monotonic() - t0:5.0f}s] tta {method}: steps={res['steps']} "
                  f"acc={last[2]:.3f} at {last[0]:.1f}s, reached "
                  f"{res['target_acc']:.0%}: {res['reached_s']}", file=sys.stderr)
            if args.json:
                write_json(args.json, data)


# ------------------------------------------------------------------------------- report
def _pred(data: dict[str, Any], rec: dict[str, Any]) -> float | None:
    """Bandwidth model (docs/performance.md) for a shaped step-time record."""
    base = next((r for r in data["steps"] if r["rate"] == "unshaped"
                 and r["method"] == rec["method"]), None)
    return predicted(rec, base, data.get("loopback_bps"))


def markdown(data: dict[str, Any]) -> str:
    """The e2e results file."""
    mach = data["machine"]
    lo = data.get("loopback_bps")
    lines = [
        "# End-to-end benchmark: training steps on an emulated network",
        "",
        f"- Command: `{data['command']}`",
        f"- Date: {data['date']}; wall time {data.get('wall_s', '?')} s",
        f"- Machine: {mach['cpus']} CPU cores ({mach['processor']}), {mach['platform']}, "
        f"Python {mach['python']}, torch {mach['torch']}, Gloo on CPU, 1 torch thread per "
        "worker.",
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
            "minimal loop in `benchmarks/workers.py` (`tta_worker`) over the library pieces.",
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


def plots(data: dict[str, Any], prefix: str) -> list[str]:
    """``<prefix>_step_time.png`` and ``<prefix>_fmnist_tta.png``; returns the paths."""
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: unshaped and 1gbit, Signum + vote and SGD + "
                        "all-reduce only, TTA budget 10 s at --tta-rate")
    p.add_argument("--part", choices=("steps", "tta", "both"), default="both")
    p.add_argument("--workers", type=workers_arg, default=4)
    p.add_argument("--rates", type=rate_arg, nargs="+", default=list(DEFAULT_RATES))
    p.add_argument("--methods", nargs="+", type=method_arg, default=list(STEP_METHODS),
                   help="rows of workers.METHODS (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="images per worker per step")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--target-s", type=float, default=6.0)
    p.add_argument("--tta-rate", type=rate_arg, default="100mbit")
    p.add_argument("--tta-methods", nargs="+", choices=list(TTA_METHODS),
                   default=list(TTA_METHODS))
    p.add_argument("--tta-batch", type=int, default=32)
    p.add_argument("--tta-budget", type=float, default=150.0,
                   help="seconds of training per method")
    p.add_argument("--tta-target", type=float, default=0.85)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot-prefix", default=None)
    p.add_argument("--render", metavar="JSON", help="only re-render from JSON")
    args = p.parse_args(argv)
    if args.render:
        data = read_results(args.render)
    else:
        if args.quick:
            args.rates = ["unshaped", "1gbit"]
            args.methods = ["signum", "sgd"]
            args.tta_methods = ["signum", "sgd"]
            args.tta_budget = 10.0
            args.target_s = 2.0
        if args.json is None and args.markdown:
            args.json = str(Path(args.markdown).with_suffix(".json"))
        reason = shaping_unavailable_reason()
        data = {
            **run_record(command_line(__file__, argv), reason),
            "settings": {"rates": args.rates, "methods": args.methods,
                         "tta_budget": args.tta_budget, "tta_rate": args.tta_rate},
            "steps": [], "tta": [],
        }
        if reason:
            print(f"NOTE: cannot shape the network here ({reason}); running unshaped.",
                  file=sys.stderr)
        else:
            data["loopback_bps"] = loopback_rate()
        t_start = time.monotonic()
        if args.part in ("steps", "both"):
            run_steps(args, data, reason is None)
        if args.part in ("tta", "both"):
            run_tta(args, data, reason is None)
        data["wall_s"] = round(time.monotonic() - t_start, 1)
        if args.json:
            write_json(args.json, data)
    emit(markdown(data), args.markdown)
    if args.plot_prefix:
        plots(data, args.plot_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
