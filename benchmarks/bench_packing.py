"""Benchmark 1-bit packing against a plain copy, numpy, and the unpack-and-sum tally.

Every timing is the median over ``--reps`` rounds; within a round all contenders run one
after the other (interleaved), so a burst of load from other jobs hits them alike. Each ratio
is the median over rounds of (contender time / baseline time in the same round).

    .venv/bin/python -m benchmarks.bench_packing                 # 25M float32, 4-row tally
    .venv/bin/python -m benchmarks.bench_packing --threads 1 --markdown out.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from signsgd import packing
from signsgd.packing import majority_tally, pack_signs, packed_nbytes, unpack_signs


def torch_kernel(fn: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """Call ``fn`` with the numpy CPU kernels switched off (pure torch ops only)."""
    saved = packing._NUMPY_ON_CPU
    packing._NUMPY_ON_CPU = False
    try:
        return fn(*args, **kwargs)
    finally:
        packing._NUMPY_ON_CPU = saved


def unpack_and_sum_tally(rows: torch.Tensor, numel: int, tie_bits: torch.Tensor) -> torch.Tensor:
    """Baseline tally: unpack every row to float32 ±1, sum, compare with 0, pack the verdict."""
    signs = torch.stack([unpack_signs(r, numel) for r in rows])
    total = signs.sum(dim=0)
    ties = unpack_signs(tie_bits, numel) > 0
    return pack_signs(torch.where((total > 0) | ((total == 0) & ties), 1.0, -1.0))


def measure(contenders: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Run every contender once per round, ``reps`` rounds (plus one warm-up); seconds."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--rows", type=int, default=4, help="M for the tally benchmark")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--markdown", default="", help="append a markdown section here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.numel
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    y = torch.empty_like(x)
    x_np = x.numpy()
    bools_np = x_np >= 0
    packed = pack_signs(x)
    packed_out = torch.empty_like(packed)
    unpacked_out = torch.empty_like(x)

    # Correctness of what is timed.
    for got in (packed, torch_kernel(pack_signs, x)):
        if not np.array_equal(got.numpy(), np.packbits(bools_np, bitorder="little")):
            raise SystemExit("pack_signs disagrees with numpy.packbits")
    if not torch.equal(unpack_signs(packed, n), torch.where(x >= 0, 1.0, -1.0)):
        raise SystemExit("unpack_signs is not the sign of the input")

    pack_times = measure(
        {
            "y.copy_(x) (baseline)": lambda: y.copy_(x),
            "pack_signs(x)": lambda: pack_signs(x),
            "pack_signs(x, out=buf)": lambda: pack_signs(x, out=packed_out),
            "pack_signs(x, out=buf), pure-torch kernel": lambda: torch_kernel(
                pack_signs, x, out=packed_out
            ),
            "numpy.packbits(bool array)": lambda: np.packbits(bools_np, bitorder="little"),
            "numpy.packbits(x >= 0)": lambda: np.packbits(x_np >= 0, bitorder="little"),
            "unpack_signs(p, n, out=buf)": lambda: unpack_signs(packed, n, out=unpacked_out),
            "unpack_signs(p, n, out=buf), pure-torch kernel": lambda: torch_kernel(
                unpack_signs, packed, n, out=unpacked_out
            ),
            "x.clone() (fresh 4n-byte output)": lambda: x.clone(),
            "unpack_signs(p, n) (fresh 4n-byte output)": lambda: unpack_signs(packed, n),
            "numpy.unpackbits(p) (0/1 uint8 only)": lambda: np.unpackbits(
                packed.numpy(), bitorder="little"
            ),
        },
        args.reps,
    )

    m = args.rows
    rows = torch.stack([pack_signs(torch.randn(n, generator=gen)) for _ in range(m)])
    tie_bits = pack_signs(torch.randn(n, generator=gen))
    tally_out = torch.empty(packed_nbytes(n), dtype=torch.uint8)
    if not torch.equal(majority_tally(rows, tie_bits), unpack_and_sum_tally(rows, n, tie_bits)):
        raise SystemExit("majority_tally disagrees with the unpack-and-sum tally")
    tally_times = measure(
        {
            "unpack-and-sum tally (baseline)": lambda: unpack_and_sum_tally(rows, n, tie_bits),
            "majority_tally(rows, tie_bits)": lambda: majority_tally(rows, tie_bits),
            "majority_tally(..., out=buf)": lambda: majority_tally(rows, tie_bits, out=tally_out),
            "majority_tally(..., out=buf), pure-torch kernel": lambda: torch_kernel(
                majority_tally, rows, tie_bits, out=tally_out
            ),
        },
        max(3, args.reps // 3),
    )

    lines = [
        f"numel={n} float32, torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"nproc={os.cpu_count()}, {platform.processor() or platform.machine()}",
        "",
        "| operation | median ms | ratio vs baseline (same run) |",
        "|---|---:|---:|",
    ]
    base = "y.copy_(x) (baseline)"
    for name, ts in pack_times.items():
        ratio = paired_ratio(pack_times, name, base)
        lines.append(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {ratio:.3f}x |")
    fresh = paired_ratio(
        pack_times, "unpack_signs(p, n) (fresh 4n-byte output)", "x.clone() (fresh 4n-byte output)"
    )
    lines += [
        "",
        f"unpack_signs with a fresh output / x.clone() (both page-fault a new 4n-byte "
        f"buffer): {fresh:.3f}x",
    ]
    lines += [
        "",
        f"Tally of M={m} rows of {packed_nbytes(n)} bytes ({n} coordinates each):",
        "",
        "| operation | median ms | ratio vs baseline (same run) |",
        "|---|---:|---:|",
    ]
    base = "unpack-and-sum tally (baseline)"
    for name, ts in tally_times.items():
        ratio = paired_ratio(tally_times, name, base)
        lines.append(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {ratio:.4f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown, "a") as fh:
            fh.write(f"\n### Run at {stamp}, threads={torch.get_num_threads()}\n\n{text}\n")


if __name__ == "__main__":
    main()
