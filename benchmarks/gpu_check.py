"""The device check, one command on a machine with one GPU (``make gpu-check``), < 5 minutes.

1. the CUDA test subset (``tests/test_cuda.py`` and the CUDA cases of ``tests/test_packing.py``);
2. the kernels on the GPU against ``copy_`` of the same tensor: ``pack_signs``,
   ``unpack_signs(out=)`` of 100M float32 and ``majority_tally`` of 4 packed rows, GB/s and
   ratio (goal: pack and unpack <= 1.0x copy);
3. optimiser steps on the ``gpt-10m`` parameters: Signum, Lion and 1-bit Adam (past its
   freeze) against ``AdamW(fused=True)`` (goal <= 1.2x);
4. a short language-model run per optimiser with the ``gpt-10m`` size (AdamW, Lion,
   Signum, 1-bit Adam): validation loss after the same number of steps, and steps per
   second;
5. the trainer through an NCCL process group of world size 1 (``torchrun --nproc-per-node
   1 ... --backend nccl``), once per route: the vote, 1-bit Adam across its freeze, local
   steps with the Nesterov outer step.

It writes a markdown report (``--out``) with every figure and the machine it ran on.

Usage (from the repository root; needs torch with CUDA, no virtual environment)::

    PYTHONPATH=src python3 -m benchmarks.gpu_check --out gpu-report.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import signsgd  # noqa: E402
from signsgd.packing import majority_tally, pack_signs, unpack_signs  # noqa: E402
from signsgd.transformer import GPT, SIZES  # noqa: E402


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def kernels(n: int) -> list[str]:
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    packed = pack_signs(x)
    out = torch.empty_like(x)
    rows = torch.randint(0, 256, (4, packed.numel()), dtype=torch.uint8, device="cuda")
    copy = cuda_time(lambda: y.copy_(x))
    cases = {
        "copy_ (baseline)": (copy, 8 * n),
        "pack_signs": (cuda_time(lambda: pack_signs(x, out=packed)), 4 * n + n // 8),
        "unpack_signs(out=)": (cuda_time(lambda: unpack_signs(packed, n, out=out)),
                               4 * n + n // 8),
        "majority_tally, 4 rows": (cuda_time(lambda: majority_tally(rows)), 5 * n // 8),
    }
    lines = [f"{n:,} float32 elements on {torch.cuda.get_device_name()}", "",
             "| kernel | median time (ms) | GB/s (bytes read + written) | ratio to copy_ |",
             "|---|---:|---:|---:|"]
    for name, (t, nbytes) in cases.items():
        lines.append(f"| {name} | {t * 1e3:.3f} | {nbytes / t / 1e9:,.0f} | {t / copy:.2f}x |")
    return lines


def steps() -> list[str]:
    torch.manual_seed(0)
    model = GPT(85, **vars(SIZES["gpt-10m"])).cuda()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    makers = {
        "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "Signum": lambda ps: signsgd.Signum(ps, lr=1e-3, momentum=0.9),
        "Lion": lambda ps: signsgd.Lion(ps, lr=1e-4),
        "1-bit Adam (after the freeze)": lambda ps: signsgd.OneBitAdam(ps, lr=1e-3,
                                                                       freeze_step=1),
    }
    times = {name: cuda_time(make(params).step) for name, make in makers.items()}
    base = times["AdamW(fused=True)"]
    lines = [f"gpt-10m parameters ({sum(p.numel() for p in params):,} elements, "
             f"{len(params)} tensors), fixed random gradients", "",
             "| optimiser | step (ms) | ratio to AdamW(fused) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v * 1e3:.3f} | {v / base:.2f}x |" for k, v in times.items()]
    return lines


def lm_runs(steps_: int, out: Path) -> list[str]:
    lines = [f"`gpt-10m`, Shakespeare, batch 64 x 256 characters, {steps_} steps, warm-up 50 "
             "then cosine, bf16 autocast, one GPU", "",
             "| optimiser | lr | val loss (nats/char) | bits/char | steps/s |",
             "|---|---:|---:|---:|---:|"]
    for opt, lr in (("adamw", 1e-3), ("lion", 1e-4), ("signum", 3e-4), ("onebit-adam", 1e-3)):
        run = out / f"lm-{opt}"
        cmd = [sys.executable, "-m", "signsgd.cli", "train", "--data", "shakespeare",
               "--data-dir", str(ROOT / "data"), "--model", "gpt-10m", "--batch-size", "64",
               "--steps", str(steps_), "--warmup-steps", "50", "--lr-schedule", "cosine",
               "--grad-clip", "1.0", "--eval-every", str(steps_), "--eval-batches", "20",
               "--optimizer", opt, "--lr", str(lr), "--device", "cuda", "--precision", "bf16",
               "--no-progress", "--overwrite", "--out", str(run)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if done.returncode != 0:
            lines.append(f"| {opt} | {lr} | failed: {done.stderr.strip().splitlines()[-1:]} "
                         "| | |")
            continue
        s = json.loads((run / "summary.json").read_text())
        lines.append(f"| {opt} | {lr} | {s['val_loss']:.4f} | {s['val_bpc']:.3f} | "
                     f"{s['steps'] / s['wall_time_s']:.1f} (wall incl. start "
                     f"{time.perf_counter() - t0:.0f} s) |")
    return lines


# The trainer's communicating routes through an NCCL group of one process: the per-step
# vote, 1-bit Adam across its freeze, local steps with the Nesterov outer step on the EF
# all-reduce (tests/test_cuda.py checks LocalSteps with the other reducers).
NCCL_ROUTES = {
    "Signum + MajorityVote": ("--optimizer", "signum", "--lr", "1e-3"),
    "1-bit Adam, freeze at step 10": ("--optimizer", "onebit-adam", "--lr", "1e-3",
                                      "--freeze-step", "10"),
    "local steps H=4, Nesterov outer on the EF all-reduce": (
        "--optimizer", "adamw", "--lr", "1e-3", "--sync-every", "4",
        "--outer-optimizer", "nesterov", "--outer-reducer", "ef"),
}


def nccl_trainer(out: Path) -> list[str]:
    text = out / "tiny.txt"
    text.write_text("Now is the winter of our discontent\n" * 300)
    lines = ["| route (torchrun, 1 process, NCCL, CUDA) | exit code | last lines |",
             "|---|---:|---|"]
    for i, (name, opts) in enumerate(NCCL_ROUTES.items()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "-m", "signsgd.cli", "train", "--data", f"text:{text}", "--model", "gpt",
               "--n-layer", "2", "--block-size", "32", "--batch-size", "8", "--steps", "20",
               *opts, "--backend", "nccl", "--device", "cuda",
               "--no-progress", "--overwrite", "--out", str(out / f"nccl-{i}")]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        tail = (done.stdout + done.stderr).strip().splitlines()[-2:]
        lines.append(f"| {name} | {done.returncode} | `{' / '.join(tail)}` |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-report.md", help="the markdown report")
    ap.add_argument("--numel", type=int, default=100_000_000, help="kernel benchmark size")
    ap.add_argument("--lm-steps", type=int, default=300, help="steps of each LM run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work = out.parent / "gpu-check-runs"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = [f"# GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              "", f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}",
              f"- command: `{' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}`", ""]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_cuda.py"),
                            str(ROOT / "tests" / "test_packing.py"), "-k", "cuda"],
                           capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    report += ["## CUDA tests", "", "```", *tests.stdout.strip().splitlines()[-15:], "```", ""]
    for title, section in (("Kernels against copy_", lambda: kernels(args.numel)),
                           ("Optimiser steps", steps),
                           ("Language model, gpt-10m", lambda: lm_runs(args.lm_steps, work)),
                           ("NCCL process group of one", lambda: nccl_trainer(work))):
        try:
            lines = section()
        except Exception as exc:  # noqa: BLE001 - the report says what failed, the rest runs
            lines = [f"failed: {type(exc).__name__}: {exc}"]
        report += [f"## {title}", "", *lines, ""]
        out.write_text("\n".join(report) + "\n")
        print(f"[{time.perf_counter() - t0:5.0f}s] {title}", flush=True)
    report.append(f"Total: {time.perf_counter() - t0:.0f} s.")
    out.write_text("\n".join(report) + "\n")
    print(out.read_text())
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
