"""End-to-end training on an emulated network: step time and time-to-accuracy.

Part 1 (``--part steps``): M = 4 Gloo workers in a fresh network namespace
(:mod:`benchmarks.netem`, loopback shaped with ``tc tbf``: the M ranks share one link of the
given rate) each run whole training steps — forward, backward, aggregation, update — of a
ResNet-18 (11.7M parameters; ``benchmarks.models.resnet18``) on a fixed batch of
random 32×32 images, for every method of :data:`STEP_METHODS` (rows of the methods table,
``methods.METHODS``; ``--methods`` takes any of its names) and every rate: ours, and the
peers a user would pick instead — DDP fp32 (``sgd-ddp``), DDP + torch's ``fp16_compress_hook``
(``fp16-ddp``), DDP + torch's ``powerSGD_hook`` of rank 1, 2, 4 (one bucket; timed after its
``start_powerSGD_iter = 2`` fp32 steps, which are taken untimed first) and DDP + torch's
``noop_hook`` (``noop-ddp``: no communication, the floor). Ratios are against ``sgd`` (SGD +
fp32 all-reduce: one flat all-reduce after backward) and ``sgd-ddp`` (bucketed, overlapping
backward) measured in the same launch. Time to target with the peers: ``bench_tta``.

Part 2 (``--part tta``): time-to-accuracy on Fashion-MNIST at 100 Mbit/s, M = 4, the small
CNN of ``signsgd.models`` (``cnn``), batch 32 per worker: Signum + majority vote against
SGD + fp32 all-reduce and against DDP + the majority-vote hook. The clock counts training
steps only; the test accuracy (first 2000 test images) is taken every 25 steps. This uses
a minimal training loop over the library pieces (``signsgd.data``, ``signsgd.models``,
the optimisers and aggregators), not ``signsgd train``.

Usage::

    .venv/bin/python -m benchmarks.bench_e2e --quick
    .venv/bin/python -m benchmarks.bench_e2e --markdown benchmarks/results/e2e.md \\
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
from benchmarks.loops import step_time_worker, tta_worker
from benchmarks.methods import method_arg
from benchmarks.netem import format_rate, launch, parse_rate, shaping_unavailable_reason
from benchmarks.report import e2e_markdown, e2e_plots

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
                   help="rows of methods.METHODS (default: %(default)s)")
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
    emit(e2e_markdown(data), args.markdown)
    if args.plot_prefix:
        e2e_plots(data, args.plot_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
