"""The ``signsgd`` command: ``train``, ``compare`` and ``reproduce``.

* ``signsgd train`` — train one model with one optimiser on one process or ``--workers M``
  local Gloo processes (or in a ``torchrun`` group); see :mod:`signsgd.train`.
* ``signsgd compare [CONFIG.toml]`` — several runs in sequence (the built-in default is the
  main demo: Adam, SGD+momentum, Signum, Signum majority vote over 4 workers and EF-signSGD
  over 4 workers on Fashion-MNIST); writes ``table.md`` and an overlay plot.
* ``signsgd reproduce NAME [--quick]`` — one of the paper experiments
  (:mod:`signsgd.experiments`).

A compare file is TOML: a ``[defaults]`` table with any ``signsgd train`` option (underscore
or dash spelling), one ``[[run]]`` table per run, each with a ``name`` and its options, and
optional ``[[check]]`` tables, printed as PASS/FAIL under the table: ``run`` with
``min_accuracy`` (a fraction), or ``run``, ``reference`` and ``max_gap`` (the run's accuracy
may be at most ``max_gap`` below the reference's)::

    [defaults]
    data = "fashion-mnist"
    model = "cnn"
    epochs = 3

    [[run]]
    name = "Adam"
    optimizer = "adam"
    lr = 3e-3

Exit status: 0 on success, 2 for bad input (the message says what to fix), 1 when a run
fails (a crashed worker's traceback is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "DEFAULT_COMPARE", "parse_compare", "parse_checks", "evaluate_checks",
           "compare", "format_table"]

#: The built-in ``signsgd compare`` configuration: the main demo (see docs/demo.md and
#: docs/tuning.md for how the learning rates were chosen). One thread per worker: on a
#: shared 2-core machine one thread is faster than two (measured in docs/tuning.md).
DEFAULT_COMPARE = """
[defaults]
data = "fashion-mnist"
model = "cnn"
epochs = 3
seed = 0
threads = 1

[[run]]
name = "Adam"
optimizer = "adam"
lr = 3e-3
batch_size = 128
workers = 1

[[run]]
name = "SGD+momentum"
optimizer = "sgd"
lr = 0.1
momentum = 0.9
batch_size = 128
workers = 1

[[run]]
name = "Signum"
optimizer = "signum"
lr = 1e-3
momentum = 0.9
batch_size = 128
workers = 1

[[run]]
name = "Signum, majority vote"
optimizer = "signum"
lr = 1e-3
momentum = 0.9
batch_size = 32
workers = 4

[[run]]
name = "EF-signSGD"
optimizer = "ef-signsgd"
lr = 0.3
momentum = 0.0
batch_size = 32
workers = 4

# The quality bar of the main job (issue 4), checked and printed after the table.
[[check]]
run = "Adam"
min_accuracy = 0.89

[[check]]
run = "Signum"
reference = "Adam"
max_gap = 0.01

[[check]]
run = "Signum, majority vote"
reference = "Signum"
max_gap = 0.01

[[check]]
run = "EF-signSGD"
reference = "SGD+momentum"
max_gap = 0.01
"""


class UsageError(ValueError):
    """Bad command-line or config-file input."""


# --------------------------------------------------------------------------- train
def _add_train_options(p: argparse.ArgumentParser) -> None:
    from signsgd.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", default=d.data,
                   help="dataset: fashion-mnist, mnist or cifar10 (default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the data (default: $SIGNSGD_DATA, else ./data; "
                        "Fashion-MNIST also /usr/share/datasets/fashion-mnist)")
    p.add_argument("--model", default=d.model,
                   help="mlp, cnn, resnet20 or vgg (default %(default)s)")
    p.add_argument("--optimizer", default=d.optimizer,
                   help="signsgd, signum, ef-signsgd, efsgd, sgd, adam or adamw "
                        "(default %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the tuned value of the optimiser)")
    p.add_argument("--momentum", type=float, default=None,
                   help="momentum β (Signum, SGD, EF; Adam's β1); default per optimiser")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--compressor", default=d.compressor,
                   help="efsgd's compressor: identity, sign, scaled-sign, topk:R, randomk:R "
                        "(default %(default)s; ef-signsgd always uses scaled-sign)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr-schedule", default=d.lr_schedule, help="constant, cosine or step")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers,
                   help="local Gloo worker processes (under torchrun: its world size)")
    p.add_argument("--vote", default=d.vote, help="majority-vote mode: sharded or allgather")
    p.add_argument("--adversaries", type=int, default=d.adversaries,
                   help="number of Byzantine workers (the last ranks)")
    p.add_argument("--attack", default=d.attack, help="negate or random")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N training examples")
    p.add_argument("--validation", type=int, default=0,
                   help="hold out the last N training examples and evaluate on them "
                        "instead of the test set (for tuning)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--density-every", type=int, default=0,
                   help="log gradient/noise/curvature densities every N steps (0: never)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: CPU cores // workers)")
    p.add_argument("--out", default=d.out, help="run directory (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt, bit-identically")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_from_args(a: argparse.Namespace) -> Any:
    from signsgd.train import TrainConfig

    return TrainConfig(
        data=a.data, data_dir=a.data_dir, model=a.model, optimizer=a.optimizer, lr=a.lr,
        momentum=a.momentum, weight_decay=a.weight_decay, compressor=a.compressor,
        batch_size=a.batch_size, epochs=a.epochs, lr_schedule=a.lr_schedule, seed=a.seed,
        workers=a.workers, vote=a.vote, adversaries=a.adversaries, attack=a.attack,
        train_subset=a.train_subset, validation=a.validation, log_every=a.log_every,
        density_every=a.density_every, threads=a.threads, out=a.out, resume=a.resume,
        progress=not a.no_progress,
    )


def _cmd_train(a: argparse.Namespace) -> int:
    from signsgd.train import train

    summary = train(_config_from_args(a))
    if summary.get("rank", 0) != 0 and "wall_time_s" not in summary:
        return 0
    ev = "test" if "test_accuracy" in summary else "val"
    print(
        f"{summary['name']} ({summary['workers']} worker(s)): {ev} accuracy "
        f"{100 * summary[f'{ev}_accuracy']:.2f}%  {ev} loss {summary[f'{ev}_loss']:.4f}  "
        f"wall time {summary['wall_time_s']:.1f}s  bytes/worker/step sent "
        f"{summary['bytes_sent_per_step']:,.0f} received {summary['bytes_received_per_step']:,.0f}"
    )
    print(f"outputs: {Path(a.out) / 'summary.json'}, {Path(a.out) / 'metrics.jsonl'}, "
          f"{Path(a.out) / 'curves.png'}")
    return 0


# --------------------------------------------------------------------------- compare
def _load_toml(text: str, source: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: invalid TOML: {exc}") from exc


def parse_compare(text: str, source: str = "<built-in default>") -> list[Any]:
    """Turn a compare TOML document into a list of ``TrainConfig`` (``out`` not yet set).

    Raises:
        UsageError: bad TOML, no ``[[run]]``, unknown keys (the message lists the valid
            ones) or values of the wrong type.
    """
    from signsgd.train import TrainConfig

    doc = _load_toml(text, source)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    allowed = sorted(set(fields) - {"out", "resume", "extra", "progress"})
    unknown_top = set(doc) - {"defaults", "run", "check"}
    if unknown_top:
        raise UsageError(f"{source}: unknown tables {sorted(unknown_top)}; use [defaults] and "
                         "[[run]]")
    runs = doc.get("run")
    if not isinstance(runs, list) or not runs:
        raise UsageError(f"{source}: no [[run]] tables; add at least one run")
    defaults = doc.get("defaults", {})

    def norm(table: dict[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for k, v in table.items():
            key = k.replace("-", "_")
            if key not in allowed:
                raise UsageError(
                    f"{source}: unknown option {k!r} in {where}; valid options: "
                    f"{', '.join(allowed)}"
                )
            out[key] = v
        return out

    base = norm(defaults, "[defaults]")
    configs = []
    names: set[str] = set()
    for i, run in enumerate(runs):
        opts = {**base, **norm(run, f"run {i + 1}")}
        opts.setdefault("name", f"{opts.get('optimizer', 'signum')}-{i + 1}")
        if opts["name"] in names:
            raise UsageError(f"{source}: two runs are named {opts['name']!r}; names must differ")
        names.add(opts["name"])
        if "lr" in opts and isinstance(opts["lr"], int):
            opts["lr"] = float(opts["lr"])
        configs.append(TrainConfig(**opts))
    return configs


def parse_checks(text: str, source: str = "<built-in default>") -> list[dict[str, Any]]:
    """The ``[[check]]`` tables of a compare document, validated against its run names."""
    doc = _load_toml(text, source)
    names = {r.get("name") for r in doc.get("run", []) if isinstance(r, dict)}
    checks = doc.get("check", [])
    if not isinstance(checks, list):
        raise UsageError(f"{source}: 'check' must be an array of tables ([[check]])")
    for i, ch in enumerate(checks):
        keys = set(ch)
        if keys not in ({"run", "min_accuracy"}, {"run", "reference", "max_gap"}):
            raise UsageError(
                f"{source}: check {i + 1} has keys {sorted(keys)}; use run + min_accuracy, or "
                "run + reference + max_gap"
            )
        for key in ("run", "reference"):
            if key in ch and ch[key] not in names:
                raise UsageError(f"{source}: check {i + 1}: no run named {ch[key]!r} "
                                 f"(runs: {', '.join(sorted(map(str, names)))})")
    return checks


def evaluate_checks(checks: list[dict[str, Any]], summaries: list[dict[str, Any]]
                    ) -> list[tuple[bool, str]]:
    """``(passed, line)`` for every check, from the runs' held-out accuracies."""
    ev = "test" if all("test_accuracy" in r for r in summaries) else "val"
    acc = {r["name"]: r[f"{ev}_accuracy"] for r in summaries}
    out = []
    for ch in checks:
        a = acc[ch["run"]]
        if "min_accuracy" in ch:
            ok = a >= ch["min_accuracy"]
            line = (f"{ch['run']}: {100 * a:.2f}% >= {100 * ch['min_accuracy']:.2f}%")
        else:
            b = acc[ch["reference"]]
            ok = a >= b - ch["max_gap"] - 1e-12
            line = (f"{ch['run']} ({100 * a:.2f}%) within {100 * ch['max_gap']:.1f} point(s) "
                    f"of {ch['reference']} ({100 * b:.2f}%): gap {100 * (b - a):+.2f}")
        out.append((ok, f"{'PASS' if ok else 'FAIL'}  {line}"))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``signsgd compare`` from the runs' summaries."""
    ev = "test" if all("test_accuracy" in r for r in rows) else "val"
    head = (f"| run | optimiser | workers | {ev} accuracy | {ev} loss | wall time (s) "
            "| CPU time (s) | bytes sent / worker / step | bytes received / worker / step |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = r.get(f"{ev}_accuracy", r.get("val_accuracy"))
        loss = r.get(f"{ev}_loss", r.get("val_loss"))
        lines.append(
            f"| {r['name']} | {r['optimizer']} | {r['workers']} | {100 * acc:.2f}% | "
            f"{loss:.4f} | {r['wall_time_s']:.1f} | {r.get('cpu_time_s', float('nan')):.1f} | "
            f"{r['bytes_sent_per_step']:,.0f} | "
            f"{r['bytes_received_per_step']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def _overlay_plot(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name, metrics in runs:
        steps = [m for m in metrics if m["kind"] == "step"]
        eps = [m for m in metrics if m["kind"] == "epoch"]
        ev = "test" if eps and "test_accuracy" in eps[0] else "val"
        (line,) = axes[0][0].plot([m["epoch"] for m in steps], [m["loss"] for m in steps],
                                  label=name, alpha=0.8)
        axes[0][1].plot([m["epoch"] for m in eps], [m[f"{ev}_accuracy"] for m in eps], "o-",
                        color=line.get_color(), label=name)
        axes[1][0].plot([m["time_s"] for m in steps], [m["loss"] for m in steps],
                        color=line.get_color(), label=name, alpha=0.8)
        axes[1][1].plot([m["time_s"] for m in eps], [m[f"{ev}_accuracy"] for m in eps], "o-",
                        color=line.get_color(), label=name)
    axes[0][0].set(xlabel="epoch", ylabel="train loss (running)", yscale="log")
    axes[0][1].set(xlabel="epoch", ylabel="held-out accuracy")
    axes[1][0].set(xlabel="wall time (s)", ylabel="train loss (running)", yscale="log")
    axes[1][1].set(xlabel="wall time (s)", ylabel="held-out accuracy")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(configs: list[Any], out: Path, *, progress: bool = True,
            data_dir: str | None = None, checks: list[dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
    """Validate every run (and the data) first, then train them in order; write
    ``out/table.md``, ``out/table.json`` and ``out/compare.png``; return the summaries."""
    from signsgd.data import load
    from signsgd.train import read_metrics, train, validate

    out = Path(out)
    prepared = []
    for c in configs:
        c = dataclasses.replace(c, out=str(out / _slug(c.name)), progress=progress)
        if data_dir is not None:
            c = dataclasses.replace(c, data_dir=data_dir)
        prepared.append(validate(c))
    sizes: dict[tuple[str, str | None], int] = {}
    for c in prepared:  # every dataset found and every size checked before the first run
        key = (c.data, c.data_dir)
        if key not in sizes:
            sizes[key] = len(load(c.data, c.data_dir)[0])
        validate(c, n_train=sizes[key])
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    t0 = time.perf_counter()
    for i, c in enumerate(prepared):
        print(f"[{i + 1}/{len(prepared)}] {c.name}: {c.optimizer}, {c.workers} worker(s), "
              f"lr {c.lr}, batch {c.batch_size}/worker, {c.epochs} epochs", flush=True)
        summaries.append(train(c))
    total = time.perf_counter() - t0
    table = format_table(summaries)
    results = evaluate_checks(checks or [], summaries)
    if results:
        table += "\nQuality bar:\n\n" + "".join(f"- {line}\n" for _, line in results)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(
        {"total_wall_time_s": total, "runs": [{k: v for k, v in s.items() if k != "params"}
                                              for s in summaries]}, indent=2, default=str))
    _overlay_plot([(s["name"], read_metrics(Path(s["config"]["out"]) / "metrics.jsonl"))
                   for s in summaries], out / "compare.png")
    return summaries


def _cmd_compare(a: argparse.Namespace) -> int:
    if a.config is None:
        text, source = DEFAULT_COMPARE, "<built-in default>"
    else:
        path = Path(a.config)
        if not path.is_file():
            raise UsageError(f"compare config {path} not found (give a TOML file, or no "
                             "argument for the built-in default)")
        text, source = path.read_text(), str(path)
    if a.print_default:
        print(DEFAULT_COMPARE.strip())
        return 0
    configs = parse_compare(text, source)
    checks = parse_checks(text, source)
    if a.epochs is not None:
        configs = [dataclasses.replace(c, epochs=a.epochs) for c in configs]
    if a.train_subset is not None:
        configs = [dataclasses.replace(c, train_subset=a.train_subset) for c in configs]
    out = Path(a.out)
    t0 = time.perf_counter()
    summaries = compare(configs, out, progress=not a.no_progress, data_dir=a.data_dir,
                        checks=checks)
    wall = time.perf_counter() - t0
    print()
    print((out / "table.md").read_text())
    print(f"total wall time {wall:.1f}s ({wall / 60:.1f} min); CPU time of the training loops "
          f"{sum(s['cpu_time_s'] for s in summaries):.1f}s")
    print(f"table: {out / 'table.md'}")
    print(f"plot: {out / 'compare.png'}")
    return 0


# --------------------------------------------------------------------------- reproduce
def _cmd_reproduce(a: argparse.Namespace) -> int:
    try:
        import signsgd.experiments as experiments
    except ImportError as exc:
        raise UsageError(f"the paper experiments are not available ({exc})") from exc
    names = tuple(experiments.EXPERIMENTS)
    if a.name not in names:
        raise UsageError(f"unknown experiment {a.name!r}; valid experiments: {', '.join(names)}")
    out = Path(a.out) if a.out else None
    experiments.run(a.name, quick=a.quick, out=out)
    return 0


# --------------------------------------------------------------------------- main
def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (``kill PID``) unwinds like Ctrl-C, so the launcher stops its workers too.

    Returns the previous handler (``None`` when not on the main thread)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    return None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``signsgd``."""
    parser = argparse.ArgumentParser(
        prog="signsgd",
        description="Sign-based compressed optimisation: train, compare, reproduce.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("train", help="train one model with one optimiser (1 or M workers)")
    _add_train_options(p)
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
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("reproduce", help="run one of the paper experiments")
    p.add_argument("name", help="experiment name (see signsgd.experiments.EXPERIMENTS)")
    p.add_argument("--quick", action="store_true", help="the reduced version")
    p.add_argument("--out", default=None, help="output directory")
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``signsgd`` console script; returns the exit status."""
    from signsgd.data import DataError
    from signsgd.train import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _sigterm_as_interrupt()
    try:
        return int(args.func(args))
    except (UsageError, DataError, CheckpointError, ValueError) as exc:
        print(f"signsgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"signsgd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report the failure (e.g. a worker traceback)
        from signsgd.distributed.launch import WorkerError

        if isinstance(exc, WorkerError):
            print(f"signsgd {args.command}: a worker failed:\n{exc}", file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
