"""Time our optimisers' ``step`` against the torch optimiser each one replaces.

Pairs (ours / baseline), each timed in the same run:

* ``Signum(momentum=0.9).step`` / ``torch.optim.SGD(momentum=0.9, foreach=True).step``;
* ``Lion(betas=(0.9, 0.99)).step`` / ``torch.optim.AdamW(foreach=True).step`` (Lion keeps
  one buffer per parameter where AdamW keeps two).

Two parameter sets, both float32 on CPU, gradients fixed (set once, never recomputed):

* ``resnet20``: the parameter shapes of a CIFAR ResNet-20 (3 stages x 3 basic blocks,
  16/32/64 channels, conv + BatchNorm weights/biases, 1x1 projection shortcuts where the
  stage changes, final linear layer): about 0.27M elements in about 65 tensors;
* ``flat25m``: one tensor of 25M elements.

For each set and pair the two optimisers are timed in interleaved rounds (so drift of a
shared machine hits both alike); each round times ``--inner`` back-to-back steps; the script
prints the median step time of each optimiser and the ratios ours / baseline (of median
wall time, of the fastest round, and of median process CPU time), all measured in this
run. With ``--markdown PATH`` it also writes the results as a markdown table.

Usage::

    .venv/bin/python -m benchmarks.bench_step
    .venv/bin/python -m benchmarks.bench_step --rounds 41 --markdown benchmarks/results/step.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import command_line, utc_now, write_text
from signsgd import registry


def resnet20_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """Parameter shapes of a CIFAR ResNet-20 (He et al. 2016, section 4.2)."""
    shapes: list[tuple[int, ...]] = [(16, 3, 3, 3), (16,), (16,)]  # stem conv + BN
    c_in = 16
    for c_out in (16, 32, 64):
        for block in range(3):
            shapes += [(c_out, c_in, 3, 3), (c_out,), (c_out,)]
            shapes += [(c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and c_in != c_out:  # projection shortcut: 1x1 conv + BN
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
            c_in = c_out
    shapes += [(num_classes, 64), (num_classes,)]
    return shapes


def make_params(shapes: list[tuple[int, ...]], seed: int) -> list[torch.nn.Parameter]:
    """Parameters with fixed random gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen))
        p.grad = torch.randn(s, generator=gen)
        params.append(p)
    return params


def time_rounds(steps: dict[str, Callable[[], object]], rounds: int,
                inner: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per-step (wall, process-CPU) seconds of each callable, in interleaved rounds."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                step()
            out[name][0].append((time.perf_counter() - t0) / inner)
            out[name][1].append((time.process_time() - c0) / inner)
    return out


#: (ours, baseline): registry name and hyper-parameters, and the torch baseline.
PAIRS: dict[str, tuple[str, dict[str, object], Callable[..., torch.optim.Optimizer]]] = {
    "Signum / SGD": ("signum", {"lr": 1e-4, "momentum": 0.9},
                     lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)),
    "Lion / AdamW": ("lion", {"lr": 1e-4, "betas": (0.9, 0.99)},
                     lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)),
}


def bench(shapes: list[tuple[int, ...]], rounds: int, inner: int, warmup: int,
          pair: str) -> dict[str, float]:
    """Step times of one pair on the same parameters, and their ratios.

    ``wall`` is the median wall time per step; ``min`` the fastest round (least disturbed
    by other jobs); ``cpu`` the median process CPU time per step (time this process ran,
    all its threads together, so time spent waiting for a busy CPU does not count).
    """
    method, hyper, baseline = PAIRS[pair]
    ours_p = make_params(shapes, seed=1)
    base_p = make_params(shapes, seed=1)
    ours = registry.build(method, ours_p, **hyper)
    base = baseline(base_p)
    steps = {"ours": ours.step, "base": base.step}
    time_rounds(steps, rounds=1, inner=warmup)
    times = time_rounds(steps, rounds=rounds, inner=inner)
    r: dict[str, float] = {"numel": sum(p.numel() for p in ours_p), "tensors": len(ours_p)}
    for name, (wall, cpu) in times.items():
        r[f"{name}_wall"] = statistics.median(wall)
        r[f"{name}_min"] = min(wall)
        r[f"{name}_cpu"] = statistics.median(cpu)
    for kind in ("wall", "min", "cpu"):
        r[f"ratio_{kind}"] = r[f"ours_{kind}"] / r[f"base_{kind}"]
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31, help="interleaved timing rounds")
    ap.add_argument("--inner-small", type=int, default=50, help="steps per round, resnet20")
    ap.add_argument("--inner-large", type=int, default=3, help="steps per round, flat25m")
    ap.add_argument("--large", type=int, default=25_000_000, help="elements of the big tensor")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch intra-op thread counts to run (each gives its own rows)")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS),
                    help="which (ours / baseline) pairs to time")
    ap.add_argument("--markdown", default=None, help="also write a markdown report here")
    args = ap.parse_args(argv)

    cases = [
        ("resnet20", resnet20_shapes(), args.inner_small, 20),
        (f"flat{args.large // 1_000_000}m", [(args.large,)], args.inner_large, 2),
    ]
    load_before = os.getloadavg()
    rows = []
    for pair in args.pairs:
        ours, base = pair.split(" / ")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, shapes, inner, warmup in cases:
                r = bench(shapes, rounds=args.rounds, inner=inner, warmup=warmup, pair=pair)
                rows.append((pair, name, threads, r))
                print(f"{pair:13s} {name:9s} {threads:2d} thr {r['tensors']:3d} tensors "
                      f"{r['numel']:>11,d} el | median wall {ours} {r['ours_wall'] * 1e3:8.3f} "
                      f"ms {base} {r['base_wall'] * 1e3:8.3f} ms ratio {r['ratio_wall']:.2f}x | "
                      f"best round {r['ratio_min']:.2f}x | median CPU time "
                      f"{r['ratio_cpu']:.2f}x", flush=True)

    if args.markdown:
        lines = [
            "# Optimiser step: Signum.step vs torch.optim.SGD(momentum=0.9, foreach=True).step,"
            " Lion.step vs torch.optim.AdamW(foreach=True).step",
            "",
            f"- command: `{command_line(__file__, argv)}`",
            f"- date: {utc_now()}",
            f"- machine: {platform.machine()}, `nproc` = {os.cpu_count()}, "
            f"torch {torch.__version__}, CPU, float32",
            "- the machine was shared with other jobs while this ran (1-minute load average "
            f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} "
            f"CPUs); medians over {args.rounds} interleaved rounds, gradients fixed",
            "- targets: Signum / SGD <= 1.2x; Lion / AdamW <= 1.0x",
            "",
            "Columns: median wall time per step of each optimiser and their ratio (ours / "
            "baseline); the ratio of the fastest rounds (least disturbed by other jobs); the "
            "ratio of median process CPU time per step (time spent waiting for a busy CPU "
            "excluded).",
            "",
            "| pair | parameters | torch threads | tensors | elements | ours.step (ms) "
            "| baseline.step (ms) | ratio (median wall) | ratio (best round) "
            "| ratio (median CPU) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for pair, name, threads, r in rows:
            lines.append(f"| {pair} | {name} | {threads} | {r['tensors']} | {r['numel']:,} "
                         f"| {r['ours_wall'] * 1e3:.3f} | {r['base_wall'] * 1e3:.3f} "
                         f"| {r['ratio_wall']:.2f}x | {r['ratio_min']:.2f}x "
                         f"| {r['ratio_cpu']:.2f}x |")
        write_text(args.markdown, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
