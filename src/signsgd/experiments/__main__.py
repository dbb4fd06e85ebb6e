"""``python -m signsgd.experiments NAME [--quick] [--out DIR] [--seed S]``: run one paper
experiment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from signsgd.errors import DataError
from signsgd.experiments import EXPERIMENTS, run


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the experiment; 2 if its data is missing, else 0.

    Example:
        >>> main(["toy", "--quick", "--seed", "1", "--out", "/tmp/toy"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m signsgd.experiments", description="Run one of the paper experiments."
    )
    parser.add_argument("name", choices=EXPERIMENTS)
    parser.add_argument("--quick", action="store_true", help="reduced version (< 1 minute)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/reproduce/NAME)")
    parser.add_argument("--seed", type=int, default=0, help="the experiment's seed (default 0)")
    args = parser.parse_args(argv)
    try:
        result = run(args.name, quick=args.quick, out=args.out, seed=args.seed)
    except DataError as exc:  # Fashion-MNIST absent: the message says how to get it
        print(f"error: {exc} (or run with --quick: synthetic data)", file=sys.stderr)
        return 2
    del result  # the verdict is printed and written; a non-reproduction is not an error
    return 0


if __name__ == "__main__":
    sys.exit(main())
