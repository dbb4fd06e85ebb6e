"""Time to target on an emulated network: our methods against the peers a user would pick.

For each workload (``cnn``: the small CNN on Fashion-MNIST, target = accuracy on the
10,000 test images; ``gpt``: the character-level transformer on Shakespeare, target =
validation loss in nats/char on fixed validation batches; ``workers.WORKLOADS``) and each
method of the benchmarks' methods table (``workers.METHODS``: Signum / Lion + majority
vote, EF-signSGD, AdamW and SGD with fp32 all-reduce, DDP fp32, DDP + torch's fp16 and
PowerSGD hooks, local steps with a voted outer step), with M = 4 Gloo workers:

(a) **curves**: one launch per method, unshaped, trains the real model (each rank on its
    own shard of the data) to the target or the step budget, evaluating every N steps, and
    records the curve (step, metric) and the steps to target;
(b) **step times**: one launch per link rate (unshaped, 10 Gbit/s, 1 Gbit/s, 100 Mbit/s;
    ``netem.NetworkEmulator``, M ranks sharing one shaped link, as
    ``bench_e2e.py``) times every method's training step on that workload, the methods
    taking turns (``workers._measure``): LocalSteps in whole rounds of H steps (per step =
    round / H), PowerSGD after its ``start_powerSGD_iter`` fp32 steps; ``noop-ddp`` (no
    communication) is the floor;
(c) **time to target** at a rate = Σ over the steps to target of the step time of the
    phase each step was in: PowerSGD's first S steps at the fp32 DDP step time of the
    same optimiser (``sgd-ddp`` or ``adamw-ddp``, measured in the same launch; its
    warm-up is exactly that vanilla all-reduce, one bucket instead of DDP's default
    buckets), the rest at its compressed step time; LocalSteps at its round time / H;
    evaluation costs nothing. Ratios are against ``sgd-ddp`` and ``adamw-ddp`` at the same
    rate.
(d) ``--validate RATE`` also trains the methods for real under that shaped rate (one
    launch per method, the clock counting training steps only), to check (c).

The model (c) assumes the number of steps to target does not depend on the rate (true:
the arithmetic is the same) and that a step's time does not depend on the data.

PowerSGD's S in (a) is about 10 % of the expected steps, after torch's advice ("we suggest
to start with 10% of total training steps", ``PowerSGDState`` docstring; and "no less than
the number of warm-up steps" when there is a learning-rate warm-up): the defaults below.
Learning rates: the methods table's defaults (``cnn``: tuned on Fashion-MNIST,
docs/tuning.md; ``gpt``: tuned on the Shakespeare tuning split, configs/lm.toml) unless
``--lr`` overrides them.
LocalSteps' outer step: ``outer_lr = --outer-lr-scale · H · lr`` (a sign step of up to
what H inner steps could move a coordinate, times the scale), ``--outer-momentum``.

Usage::

    .venv/bin/python benchmarks/bench_tta.py --quick                      # about a minute
    .venv/bin/python benchmarks/bench_tta.py --workloads cnn \\
        --markdown benchmarks/results/tta_cnn.md --plot docs/figures/tta_cnn.png
    .venv/bin/python benchmarks/bench_tta.py --workloads gpt \\
        --markdown benchmarks/results/tta_gpt.md --plot docs/figures/tta_gpt.png
    .venv/bin/python benchmarks/bench_tta.py --workloads cnn --part steps --rates 100mbit \\
        --validate 100mbit --methods signum sgd-ddp powersgd-r1 local-signum-h8 \\
        --markdown benchmarks/results/tta_validate.md
    .venv/bin/python benchmarks/bench_tta.py --render benchmarks/results/tta_cnn.json \\
        --markdown benchmarks/results/tta_cnn.md

Writes ``--json`` (raw records, rewritten after every launch; default next to
``--markdown``), ``--markdown`` and ``--plot``. Needs root and iproute2 to shape; without
them it says so and runs unshaped (every rate then measures the same link).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

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
from workers import (
    E2E_LABELS,
    LOCAL_H,
    WORKLOADS,
    curve_worker,
    method,
    method_arg,
    workload_step_worker,
)

_LOCALS = [f"local-{inner}-h{h}" for inner in ("adamw", "signum") for h in LOCAL_H]
#: The methods trained to the target, per workload (``noop-ddp`` joins the step times).
DEFAULT_METHODS: dict[str, list[str]] = {
    "cnn": ["signum", "lion", "ef-signsgd", "sgd", "adamw", "sgd-ddp", "adamw-ddp", "fp16-ddp",
            "powersgd-r1", "powersgd-r2", "powersgd-r4", "powersgd-r2-adamw", *_LOCALS],
    # gpt: SGD does not reach the target on this transformer (docs/lm.md), so the SGD-based
    # peers are represented by PowerSGD r=2 only; the 16-bit all-reduce runs with AdamW.
    "gpt": ["signum", "adamw-ddp", "fp16-adamw-ddp", "powersgd-r2", "powersgd-r2-adamw",
            "local-adamw-h4", "local-adamw-h8", "local-adamw-h16", "local-signum-h8"],
}
#: Per workload: step budget, evaluation period, target, PowerSGD's S, learning-rate
#: warm-up steps (then cosine, gpt), validation batches per evaluation (gpt: global
#: batches, as ``signsgd train --eval-batches`` counts them: 16 × 4 × 8 = 512 fixed windows
#: of 128 characters). The gpt target and budget come from a 600-step smoke run of AdamW
#: 5e-3 (one process, the global batch of 4 workers): validation loss 2.09 at step 300,
#: 1.96 at 400, 1.86 at 600.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"steps": 2000, "eval_every": 25, "target": 0.85, "start_powersgd": 40,
            "warmup_steps": 0, "eval_batches": 1},
    "gpt": {"steps": 1000, "eval_every": 50, "target": 2.0, "start_powersgd": 60,
            "warmup_steps": 50, "eval_batches": 16},
}
BASELINES = ("sgd-ddp", "adamw-ddp")
QUICK = {"workers": 2, "workloads": ["cnn"], "rates": ["unshaped", "100mbit"],
         "methods": ["sgd-ddp", "adamw-ddp", "signum", "powersgd-r1", "local-signum-h4"],
         "steps": 60, "eval_every": 20, "target": 0.6, "start_powersgd": 6, "target_s": 0.5}


# ------------------------------------------------------------------------------- the model
def warmup_reference(name: str) -> str | None:
    """The fp32 DDP method whose step time PowerSGD's first S steps take: the same local
    optimiser (``None`` for the other methods).

    Example:
        >>> warmup_reference("powersgd-r1"), warmup_reference("powersgd-r2-adamw")
        ('sgd-ddp', 'adamw-ddp')
    """
    row = method(name)
    if row.powersgd_rank is None:
        return None
    return "adamw-ddp" if row.inner == "adamw" else "sgd-ddp"


def time_to_target(curve: dict[str, Any], step_s: dict[str, float]) -> float | None:
    """Seconds of training to the target at one rate: the curve's steps to target, each at
    the step time (``step_s``: method → seconds per step at that rate) of the phase it was
    in (module docstring, (c)); ``None`` if the target was not reached or a needed step
    time is missing.

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


# ------------------------------------------------------------------------------- runs
def _options(args: argparse.Namespace, workload: str, name: str) -> dict[str, Any]:
    row = method(name)
    opts: dict[str, Any] = {"warmup_steps": args.warmup_steps[workload],
                            "eval_batches": args.eval_batches[workload],
                            "start_powersgd_iter": args.start_powersgd[workload],
                            "outer_momentum": args.outer_momentum,
                            "data_seed": args.data_seed, "steps": args.steps[workload]}
    if row.sync_every > 1:
        lr = _lr(args, workload, name)
        opts["outer_lr"] = {name: args.outer_lr_scale * row.sync_every * lr}
    return opts


def _lr(args: argparse.Namespace, workload: str, name: str) -> float:
    return args.lr.get((workload, name), args.lr.get((None, name), method(name).lr[workload]))


def run_curves(args: argparse.Namespace, data: dict[str, Any], key: str = "curves",
               rate: str = "unshaped", emu_ok: bool = True) -> None:
    """(a), or (d) with ``key="validate"`` at a shaped ``rate``."""
    rate_bps = parse_rate(rate)
    with shaped_link(rate_bps, emu_ok) as emu:
        for w in args.workloads:
            for name in args.methods[w]:
                if not method(name).tta:
                    continue
                t0 = time.monotonic()
                out = launch(curve_worker, args.workers,
                             (w, name, _lr(args, w, name), args.steps[w], args.eval_every[w],
                              args.target[w], _options(args, w, name)),
                             emulator=emu, rate=rate, timeout=args.timeout,
                             pg_timeout=args.timeout)
                rec = out.results[0]
                rec.update(rate=rate, rate_bps=rate_bps, shaped=out.shaped,
                           launch_wall_s=round(out.wall_s, 1))
                data[key].append(rec)
                hit = rec["steps_to_target"]
                print(f"[{time.monotonic() - t0:5.0f}s] {key} {w} {name} ({format_rate(rate_bps)}"
                      f"): {rec['steps']} steps, {rec['metric']} {rec['final']:.4f}, target "
                      f"{f'at step {hit}' if hit else 'not reached'}"
                      f"{', ' + rec['diverged'] if rec['diverged'] else ''}; training "
                      f"{rec['train_s']:.1f} s", file=sys.stderr)
                if args.json:
                    write_json(args.json, data)


def step_methods(methods: list[str]) -> list[str]:
    """The methods of a step-time launch: ``methods``, the baselines, the fp32 references of
    the PowerSGD rows and ``noop-ddp`` (the floor), each once.

    Example:
        >>> step_methods(["signum", "powersgd-r2-adamw"])
        ['signum', 'powersgd-r2-adamw', 'sgd-ddp', 'adamw-ddp', 'noop-ddp']
    """
    out = list(dict.fromkeys([*methods, *BASELINES,
                              *(r for r in map(warmup_reference, methods) if r),
                              "noop-ddp"]))
    return out


def run_steps(args: argparse.Namespace, data: dict[str, Any], emu_ok: bool) -> None:
    """(b): step times per rate and workload."""
    for rate in args.rates:
        rate_bps = parse_rate(rate)
        with shaped_link(rate_bps, emu_ok) as emu:
            for w in args.workloads:
                t0 = time.monotonic()
                names = step_methods(args.methods[w])
                lrs = {n: _lr(args, w, n) for n in names}
                opts = _options(args, w, names[0])
                opts["outer_lr"] = {n: _options(args, w, n).get("outer_lr", {}).get(n)
                                    for n in names if method(n).sync_every > 1}
                out = launch(workload_step_worker, args.workers,
                             (w, names, lrs, opts, args.slow_s, args.target_s, args.min_reps,
                              args.max_reps, emu is not None),
                             emulator=emu, rate=rate, timeout=args.timeout,
                             pg_timeout=args.timeout)
                got = {r["method"]: r["median_s"] for r in out.results[0]}
                for rec in out.results[0]:
                    ref = warmup_reference(rec["method"])  # PowerSGD's fp32 phase
                    rec.update(rate=rate, rate_bps=rate_bps, shaped=out.shaped,
                               warmup_ref=ref, warmup_step_s=got.get(ref) if ref else None)
                    data["steps"].append(rec)
                print(f"[{time.monotonic() - t0:5.0f}s] steps {w} {format_rate(rate_bps)}: "
                      + ", ".join(f"{r['method']}={r['median_s'] * 1e3:.0f}ms"
                                  for r in out.results[0]), file=sys.stderr)
                if args.json:
                    write_json(args.json, data)


# ------------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str = ".3g", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _rate_name(r: dict[str, Any]) -> str:
    return format_rate(r["rate_bps"]) + ("" if r.get("shaped") or r["rate_bps"] is None
                                         else " (NOT shaped)")


def _metric_name(workload: str) -> str:
    return {"cnn": "test accuracy (10,000 images)",
            "gpt": "validation loss (nats/char)"}.get(workload, WORKLOADS[workload]["metric"])


def markdown(data: dict[str, Any]) -> str:
    """The results file."""
    mach = data["machine"]
    lo = data.get("loopback_bps")
    st = data["settings"]
    lines = [
        "# Time to target: our methods and the peers, on an emulated network",
        "",
        f"- Command: `{data['command']}`",
        f"- Date: {data['date']}; wall time {data.get('wall_s', '?')} s",
        f"- Machine: {mach['cpus']} CPU cores ({mach['processor']}), {mach['platform']}, "
        f"Python {mach['python']}, torch {mach['torch']}, Gloo on CPU, 1 torch thread per "
        "worker" + load_text(mach) + f"; the M = {st['workers']} workers share the cores, and "
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


def plot(data: dict[str, Any], path: str) -> None:
    """Time to target against link rate, one line per method, one panel per workload."""
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
def _per_workload(kind: type) -> Any:
    """argparse type: ``WORKLOAD=VALUE``."""
    def parse(text: str) -> tuple[str, Any]:
        w, sep, v = text.partition("=")
        if not sep or w not in WORKLOADS:
            raise argparse.ArgumentTypeError(
                f"expected WORKLOAD=VALUE with WORKLOAD in {', '.join(WORKLOADS)}, got {text!r}")
        try:
            return w, kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value in {text!r}") from None
    return parse


def _lr_arg(text: str) -> tuple[tuple[str | None, str], float]:
    """argparse type: ``METHOD=LR`` or ``WORKLOAD:METHOD=LR``.

    Example:
        >>> _lr_arg("gpt:adamw-ddp=1e-3"), _lr_arg("signum=3e-4")
        ((('gpt', 'adamw-ddp'), 0.001), ((None, 'signum'), 0.0003))
    """
    key, sep, v = text.partition("=")
    w, colon, name = key.rpartition(":")
    try:
        if not sep or (colon and w not in WORKLOADS):
            raise ValueError
        method_arg(name)
        return (w or None, name), float(v)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected METHOD=LR or WORKLOAD:METHOD=LR, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="about a minute: cnn, M = 2, 60 steps, 5 methods, unshaped + 100mbit")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", type=method_arg, default=None,
                   help="methods for every workload (default: DEFAULT_METHODS per workload)")
    p.add_argument("--part", choices=("curves", "steps", "both", "none"), default="both")
    p.add_argument("--validate", type=rate_arg, default=None, metavar="RATE",
                   help="also train the methods for real under this shaped rate")
    p.add_argument("--workers", type=workers_arg, default=4)
    p.add_argument("--rates", type=rate_arg, nargs="+", default=list(DEFAULT_RATES))
    for flag, kind, text in (("steps", int, "step budget"), ("eval-every", int, "evaluate "
                             "every N steps"), ("target", float, "the target metric"),
                             ("start-powersgd", int, "PowerSGD's start_powerSGD_iter S"),
                             ("warmup-steps", int, "learning-rate warm-up steps"),
                             ("eval-batches", int, "gpt: global validation batches "
                              "(M × 8 windows each; the same windows for any M)")):
        p.add_argument(f"--{flag}", nargs="+", type=_per_workload(kind), default=[],
                       metavar="WORKLOAD=VALUE", help=f"{text} (default: DEFAULTS)")
    p.add_argument("--lr", nargs="+", type=_lr_arg, default=[],
                   metavar="[WORKLOAD:]METHOD=LR", help="override a default learning rate")
    p.add_argument("--outer-lr-scale", type=float, default=0.5,
                   help="LocalSteps: outer_lr = scale · H · lr (default %(default)s)")
    p.add_argument("--outer-momentum", type=float, default=0.0,
                   help="LocalSteps: the outer momentum (default %(default)s)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--target-s", type=float, default=4.0,
                   help="seconds of repetitions per method per step-time launch")
    p.add_argument("--slow-s", type=float, default=4.0)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per launch")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--render", metavar="JSON", help="only re-render from JSON")
    args = p.parse_args(argv)
    if args.render:
        data = read_results(args.render)
    else:
        per = {k: {w: DEFAULTS[w][k] for w in WORKLOADS} for k in DEFAULTS["cnn"]}
        methods = {w: list(DEFAULT_METHODS[w]) for w in WORKLOADS}
        if args.quick:
            args.workers, args.workloads, args.rates = (QUICK["workers"], QUICK["workloads"],
                                                        QUICK["rates"])
            methods = {w: list(QUICK["methods"]) for w in WORKLOADS}
            for k in ("steps", "eval_every", "target", "start_powersgd"):
                per[k]["cnn"] = QUICK[k]
            args.target_s, args.min_reps, args.max_reps = QUICK["target_s"], 2, 5
        for k in per:
            per[k].update(dict(getattr(args, k)))
        if args.methods:
            methods = {w: list(args.methods) for w in WORKLOADS}
        for k, v in per.items():
            setattr(args, k, v)
        args.methods = methods
        args.lr = dict(args.lr)
        for w in args.workloads:
            bad = [m for m in methods[w] if not method(m).tta]
            if bad and args.part in ("curves", "both"):
                print(f"note: {', '.join(bad)} cannot be trained to a target (the ranks' "
                      "models differ); step times only", file=sys.stderr)
        if args.json is None and args.markdown:
            args.json = str(Path(args.markdown).with_suffix(".json"))
        reason = shaping_unavailable_reason()
        data = {
            **run_record(command_line(__file__, argv), reason),
            "settings": {"workers": args.workers, "workloads": args.workloads,
                         "rates": args.rates, "methods": methods,
                         "per_workload": {w: {k: per[k][w] for k in per} for w in WORKLOADS},
                         "lr_overrides": [[w, m, v] for (w, m), v in args.lr.items()],
                         "outer_lr_scale": args.outer_lr_scale,
                         "outer_momentum": args.outer_momentum, "validate": args.validate},
            "curves": [], "steps": [], "validate": [],
        }
        if reason:
            print(f"NOTE: cannot shape the network here ({reason}); running unshaped.",
                  file=sys.stderr)
        elif args.part in ("steps", "both") or args.validate:
            data["loopback_bps"] = loopback_rate()
        t_start = time.monotonic()
        if args.part in ("curves", "both"):
            run_curves(args, data, emu_ok=reason is None)
        if args.part in ("steps", "both"):
            run_steps(args, data, reason is None)
        if args.validate:
            run_curves(args, data, "validate", args.validate, reason is None)
        data["wall_s"] = round(time.monotonic() - t_start, 1)
        if args.json:
            write_json(args.json, data)
    emit(markdown(data), args.markdown)
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
