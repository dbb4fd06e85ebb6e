"""Time to target on an emulated network: our methods against the peers a user would pick.

For each workload (``cnn``: the small CNN on Fashion-MNIST, target = accuracy on the
10,000 test images; ``gpt``: the character-level transformer on Shakespeare, target =
validation loss in nats/char on fixed validation batches; ``methods.WORKLOADS``) and each
method of the benchmarks' methods table (``methods.METHODS``: Signum / Lion + majority
vote, EF-signSGD, AdamW and SGD with fp32 all-reduce, DDP fp32, DDP + torch's fp16 and
PowerSGD hooks, local steps with a voted outer step), with M = 4 Gloo workers:

(a) **curves**: one launch per method, unshaped, trains the real model (each rank on its
    own shard of the data) to the target or the step budget, evaluating every N steps, and
    records the curve (step, metric) and the steps to target;
(b) **step times**: one launch per link rate (unshaped, 10 Gbit/s, 1 Gbit/s, 100 Mbit/s;
    ``netem.NetworkEmulator``, M ranks sharing one shaped link, as
    ``bench_e2e``) times every method's training step on that workload, the methods
    taking turns (``measure.interleaved``): LocalSteps in whole rounds of H steps (per step =
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

    .venv/bin/python -m benchmarks.bench_tta --quick                      # about a minute
    .venv/bin/python -m benchmarks.bench_tta --workloads cnn \\
        --markdown benchmarks/results/tta_cnn.md --plot docs/figures/tta_cnn.png
    .venv/bin/python -m benchmarks.bench_tta --workloads gpt \\
        --markdown benchmarks/results/tta_gpt.md --plot docs/figures/tta_gpt.png
    .venv/bin/python -m benchmarks.bench_tta --workloads cnn --part steps --rates 100mbit \\
        --validate 100mbit --methods signum sgd-ddp powersgd-r1 local-signum-h8 \\
        --markdown benchmarks/results/tta_validate.md
    .venv/bin/python -m benchmarks.bench_tta --render benchmarks/results/tta_cnn.json \\
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

from benchmarks.common import (
    DEFAULT_RATES,
    command_line,
    emit,
    loopback_rate,
    rate_arg,
    read_results,
    run_record,
    shaped_link,
    workers_arg,
    write_json,
)
from benchmarks.loops import curve_worker, workload_step_worker
from benchmarks.methods import (
    BASELINES,
    LOCAL_H,
    WORKLOADS,
    method,
    method_arg,
    warmup_reference,
)
from benchmarks.netem import format_rate, launch, parse_rate, shaping_unavailable_reason
from benchmarks.report import tta_markdown, tta_plot

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
QUICK = {"workers": 2, "workloads": ["cnn"], "rates": ["unshaped", "100mbit"],
         "methods": ["sgd-ddp", "adamw-ddp", "signum", "powersgd-r1", "local-signum-h4"],
         "steps": 60, "eval_every": 20, "target": 0.6, "start_powersgd": 6, "target_s": 0.5}


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
    emit(tta_markdown(data), args.markdown)
    if args.plot:
        tta_plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
