"""The ``signsgd`` command: ``train`` (:mod:`signsgd.train`; its options are the fields of
:class:`signsgd.config.TrainConfig`), ``compare`` (:mod:`signsgd.compare`), ``sample``
(text from a trained language model) and ``reproduce NAME`` (:mod:`signsgd.experiments`).

Exit status: 0 on success, 2 for bad input (the message says what to fix), 1 when a run
fails (a crashed worker's traceback is printed), 130 when interrupted.

Example:
    >>> build_parser().parse_args(["train", "--workers", "4"]).workers
    4
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signsgd import config
from signsgd.distributed.launch import WorkerError
from signsgd.errors import CheckpointError, ConfigError, DataError, OutputError

__all__ = ["main", "build_parser"]


def _cmd_train(a: argparse.Namespace) -> int:
    from signsgd.train import train

    s = train(config.from_args(a))
    if s.get("rank", 0) != 0 and "wall_time_s" not in s:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node that is not rank 0's
            print(f"signsgd train: this node's workers (from rank {s['rank']}) finished; rank 0 "
                  f"writes the outputs to {s['out']} on its own machine")
        return 0
    ev, out = "test" if "test_loss" in s else "val", Path(a.out)
    quality = (f"{ev} accuracy {100 * s[f'{ev}_accuracy']:.2f}%  {ev} loss {s[f'{ev}_loss']:.4f}"
               if "val_bpc" not in s else
               f"val loss {s['val_loss']:.4f} nats/char  {s['val_bpc']:.3f} bits/char")
    print(f"{s['name']} ({s['workers']} worker(s)): {quality}  wall time "
          f"{s['wall_time_s']:.1f}s  bytes/worker/step sent {s['bytes_sent_per_step']:,.0f} "
          f"received {s['bytes_received_per_step']:,.0f}")
    print(f"outputs: {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'curves.png'}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from signsgd.compare import DEFAULT_COMPARE, compare, parse_checks, parse_compare

    if a.config is None:
        text, source = DEFAULT_COMPARE, "<built-in default>"
    else:
        path = Path(a.config)
        if not path.is_file():
            raise ConfigError(f"compare config {path} not found (give a TOML file, or no "
                              "argument for the built-in default)")
        text, source = path.read_text(), str(path)
    if a.print_default:
        print(DEFAULT_COMPARE.strip())
        return 0
    overrides = {k: getattr(a, k) for k in ("epochs", "train_subset") if getattr(a, k) is not None}
    configs = [dataclasses.replace(c, **overrides) for c in parse_compare(text, source)]
    out, t0 = Path(a.out), time.perf_counter()
    summaries = compare(configs, out, progress=not a.no_progress, data_dir=a.data_dir,
                        checks=parse_checks(text, source), overwrite=a.overwrite)
    wall = time.perf_counter() - t0
    print("\n" + (out / "table.md").read_text())
    print(f"total wall time {wall:.1f}s ({wall / 60:.1f} min); CPU time of the training loops "
          f"{sum(s['cpu_time_s'] for s in summaries):.1f}s")
    print(f"table: {out / 'table.md'}\nplot: {out / 'compare.png'}")
    return 0


def _cmd_reproduce(a: argparse.Namespace) -> int:
    import signsgd.experiments as experiments

    if a.name not in experiments.EXPERIMENTS:
        raise ConfigError(f"unknown experiment {a.name!r}; valid experiments: "
                          f"{', '.join(experiments.EXPERIMENTS)}")
    experiments.run(a.name, quick=a.quick, out=Path(a.out) if a.out else None, seed=a.seed)
    return 0


def _cmd_sample(a: argparse.Namespace) -> int:
    from signsgd.sample import sample

    print(sample(Path(a.run), a.prompt, a.chars, temperature=a.temperature, seed=a.seed))
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``signsgd`` (``train``'s options come from the config).

    Example:
        >>> build_parser().parse_args(["train", "--betas", "0.9", "0.99"]).betas
        [0.9, 0.99]
    """
    from signsgd.experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="signsgd", description="Sign-based compressed "
                                     "optimisation: train, compare, reproduce.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("train", help="train one model with one optimiser (1 or M workers)")
    config.add_arguments(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("compare", help="run several configurations and tabulate them")
    p.add_argument("config", nargs="?", default=None,
                   help="TOML file (default: the built-in demo configuration)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--data-dir", default=None, help="folder holding the data")
    p.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    p.add_argument("--train-subset", type=int, default=None,
                   help="override: first N training examples only (quick checks)")
    p.add_argument("--print-default", action="store_true",
                   help="print the built-in configuration (a starting point) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier compare in --out")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("sample", help="print text generated by a trained language model")
    p.add_argument("--run", required=True, help="the run directory (its checkpoint.pt)")
    p.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    p.add_argument("--chars", type=int, default=400, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (0: the most likely character; default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("reproduce", help="run one of the paper experiments")
    p.add_argument("name", help=f"experiment: {', '.join(EXPERIMENTS)}")
    p.add_argument("--quick", action="store_true", help="the reduced version")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the experiment (default 0)")
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``signsgd`` console script; returns the exit status. SIGTERM
    (``kill PID``) unwinds like Ctrl-C, so the launcher stops its workers too.

    Example:
        >>> main(["reproduce", "nonsense"])  # the message goes to stderr
        2
    """
    args = build_parser().parse_args(argv)
    missing = [m for m in ("rich", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:  # the library needs torch and numpy only; the trainer needs the extra
        print(f"signsgd {args.command}: error: the trainer needs {' and '.join(missing)}: "
              "pip install 'signsgd[train]'", file=sys.stderr)
        return 2
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main else None
    try:
        return int(args.func(args))
    except (DataError, CheckpointError, OutputError, ValueError) as exc:
        print(f"signsgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"signsgd {args.command}: interrupted", file=sys.stderr)
        return 130
    except WorkerError as exc:
        cause = exc.failures.get(exc.cause, "") if exc.cause is not None else ""
        last = cause.strip().splitlines()[-1] if cause.strip() else ""
        if last.startswith("signsgd.errors.OutputError: "):  # e.g. the disk filled up
            print(f"signsgd {args.command}: error: {last.split(': ', 1)[1]}", file=sys.stderr)
            return 2
        print(f"signsgd {args.command}: a worker failed:\n{exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
