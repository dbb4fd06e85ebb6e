"""What runs write: ``metrics.jsonl`` records, JSON summaries and plots, each atomically,
into a run directory that one run at a time holds (:func:`lock_run`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from signsgd.errors import OutputError

__all__ = ["write_atomic", "lock_run", "check_out", "jsonable", "MetricsLog", "read_metrics",
           "plot_curves", "plot_overlay"]

#: The files a run writes into its directory.
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "checkpoint.pt")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``
    (readers see the old file or the new one, never half of one). Whatever stops it — an
    error, a full disk, Ctrl-C or SIGTERM — the temporary file is removed.

    Raises:
        OutputError: ``write`` or the rename failed with an ``OSError`` (e.g. a full disk);
            the message names ``path`` and the reason.

    Example:
        >>> import tempfile
        >>> p = write_atomic(Path(tempfile.mkdtemp()) / "a.txt", lambda t: t.write_text("hi"))
        >>> p.read_text()
        'hi'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; the previous version "
                          "of the file, if any, is unchanged") from None
    return path


#: The lock file in a run directory: the run that writes there holds an exclusive ``flock``
#: on it (and wrote its pid into it).
LOCK = ".lock"


def _unwritable(out: Path, exc: OSError) -> OutputError:
    return OutputError(f"--out {out} cannot be written ({exc.strerror or exc}); give a "
                       "directory you can write to")


def _make_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, exc) from None


def _sweep(out: Path) -> None:
    """Remove the temporary files of :func:`write_atomic` (and of the probe of
    :func:`check_out`) that an interrupted or killed writer left in ``out``."""
    for tmp in out.glob(".*.tmp.*"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def lock_run(out: Path, *, create: bool = True) -> Iterator[None]:
    """Hold the run directory ``out`` (created, unless ``create`` is false: then a missing
    ``out`` is left missing and nothing is held) for the ``with`` block: an exclusive,
    non-blocking ``flock`` on ``out/.lock``, which the OS releases when the process ends,
    however it ends. Holding it, no other process writes in ``out``, so the temporary files
    an interrupted or killed run left there are removed, on entry and on exit.

    Raises:
        OutputError: another process holds ``out`` (the message names ``out`` and that
            process's pid), or ``out`` is a file or cannot be written.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with lock_run(d), lock_run(d):
        ...     pass
        Traceback (most recent call last):
        signsgd.errors.OutputError: --out ... is in use by another run (pid ...); ...
    """
    out = Path(out)
    if not create and not out.is_dir():
        yield
        return
    _make_dir(out)
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unwritable(out, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise OutputError(f"--out {out} is in use by another run (pid {pid}); wait for it "
                              "to end or give another --out") from None
        with contextlib.suppress(OSError):  # the pid only serves the message above
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _sweep(out)
        try:
            yield
        finally:
            _sweep(out)
    finally:
        os.close(fd)


def check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse a run directory that cannot take a new run, before anything starts: a file,
    a folder that cannot be written, or one holding an earlier run (unless ``overwrite``,
    which removes that run's files). Call it holding :func:`lock_run`.

    Raises:
        OutputError: with the one-line reason and what to do.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "metrics.jsonl").write_text("")
        0
        >>> check_out(d, overwrite=False)
        Traceback (most recent call last):
        signsgd.errors.OutputError: ... an earlier run (metrics.jsonl); add --resume to ...
    """
    out = Path(out)
    _make_dir(out)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not overwrite:
        raise OutputError(f"--out {out} holds an earlier run ({', '.join(earlier)}); add "
                          "--resume to continue it or --overwrite to replace it")
    try:
        probe = out / f".write-test.tmp.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise _unwritable(out, exc) from None
    for name in earlier:
        (out / name).unlink()


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors and numpy values as plain JSON types, NaN and inf as ``None``,
    anything else unknown as its ``repr``.

    Example:
        >>> jsonable({"a": torch.tensor(2.0), "b": (float("nan"), np.int64(3))})
        {'a': 2.0, 'b': [None, 3]}
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


class MetricsLog:
    """The records of a run, kept in ``records`` and appended to a ``metrics.jsonl`` file
    (its folder created) that starts with ``records`` (those of a resumed run's checkpoint).
    The file always holds whole lines: a record that does not fit (a full disk) is taken
    back out of it.

    Example:
        >>> import tempfile
        >>> log = MetricsLog(Path(tempfile.mkdtemp()) / "m.jsonl", [{"kind": "epoch"}])
        >>> log.write({"kind": "step"}); log.close()
        >>> [r["kind"] for r in read_metrics(log.path)]
        ['epoch', 'step']
    """

    def __init__(self, path: Path, records: Iterable[dict[str, Any]] = ()) -> None:
        self.path, self.records = Path(path), list(records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda tmp: tmp.write_text(
            "".join(json.dumps(r) + "\n" for r in self.records)))
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the file (unbuffered) and keep it.

        Raises:
            OutputError: the line could not be written (e.g. a full disk); the file is as
                it was before.
        """
        line, end = (json.dumps(record) + "\n").encode(), self._file.tell()
        try:
            if self._file.write(line) != len(line):  # a short write: the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            self._file.truncate(end)
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}; the records "
                              "before this one are kept") from None
        self.records.append(record)

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order.

    Example:
        >>> import tempfile
        >>> p = write_atomic(Path(tempfile.mkdtemp()) / "m.jsonl", lambda t: t.write_text(
        ...     '{"kind": "epoch", "epoch": 1}\\n\\n'))
        >>> read_metrics(p)
        [{'kind': 'epoch', 'epoch': 1}]
    """
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [m for m in metrics if m["kind"] == "step"]
    epochs = [m for m in metrics if m["kind"] == "epoch"]
    ev = "test" if any("test_accuracy" in m for m in epochs) else "val"
    return {
        "step": [m["step"] for m in steps], "step_epoch": [m["epoch"] for m in steps],
        "step_time": [m["time_s"] for m in steps], "loss": [m["loss"] for m in steps],
        "acc": [m["accuracy"] for m in steps],
        "ep": [m["epoch"] for m in epochs], "ep_step": [m["step"] for m in epochs],
        "ep_time": [m["time_s"] for m in epochs],
        "ev_loss": [m[f"{ev}_loss"] for m in epochs],
        "ev_acc": [m[f"{ev}_accuracy"] for m in epochs], "ev": ev,
    }


def _figure(*size: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(2, 2, figsize=size)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def _plot_lm(runs: list[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> Path:
    """Validation loss against steps, wall time and bytes sent per worker, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, metrics in runs:
        evals = [m for m in metrics if m["kind"] == "eval"]
        for ax, key in zip(axes, ("step", "time_s", "bytes_sent_total")):
            ax.plot([m[key] for m in evals], [m["val_loss"] for m in evals], "o-", ms=3,
                    label=name)
    for ax, label in zip(axes, ("step", "wall time (s)", "bytes sent per worker")):
        ax.set(xlabel=label, ylabel="validation loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_xscale("symlog")
    fig.suptitle(title)
    return _save(fig, path)


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Plot one run's loss and accuracy against steps (top) and wall time (bottom): train
    lines, held-out dots (a language model: validation loss against steps, wall time and
    bytes sent); write ``path`` (PNG) and return it.

    Example:
        >>> import tempfile
        >>> plot_curves([], Path(tempfile.mkdtemp()) / "curves.png").name
        'curves.png'
    """
    if any(m["kind"] == "eval" for m in metrics):
        return _plot_lm([("validation", metrics)], path, title)
    s = _series(metrics)
    fig, axes = _figure(10, 7)
    for row, (xs, xe, label) in enumerate(((s["step"], s["ep_step"], "step"),
                                           (s["step_time"], s["ep_time"], "wall time (s)"))):
        ax_l, ax_a = axes[row]
        for ax, train_y, eval_y, name in ((ax_l, s["loss"], s["ev_loss"], "loss"),
                                          (ax_a, s["acc"], s["ev_acc"], "accuracy")):
            ax.plot(xs, train_y, label="train (running)")
            ax.plot(xe, eval_y, "o-", label=s["ev"])
            ax.set(xlabel=label, ylabel=name)
            ax.grid(alpha=0.3)
            ax.legend()
        ax_l.set_yscale("log")
    fig.suptitle(title)
    return _save(fig, path)


def plot_overlay(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Plot several runs' ``(name, metrics)`` on one figure (``signsgd compare``): train
    loss and held-out accuracy against epochs (top) and wall time (bottom); write ``path``.

    Example:
        >>> import tempfile
        >>> plot_overlay([("a", []), ("b", [])], Path(tempfile.mkdtemp()) / "o.png").name
        'o.png'
    """
    if runs and all(any(m["kind"] == "eval" for m in ms) for _, ms in runs):
        return _plot_lm(runs, path, "")
    fig, axes = _figure(11, 8)
    for name, metrics in runs:
        s = _series(metrics)
        (line,) = axes[0][0].plot(s["step_epoch"], s["loss"], label=name, alpha=0.8)
        axes[0][1].plot(s["ep"], s["ev_acc"], "o-", color=line.get_color(), label=name)
        axes[1][0].plot(s["step_time"], s["loss"], color=line.get_color(), label=name,
                        alpha=0.8)
        axes[1][1].plot(s["ep_time"], s["ev_acc"], "o-", color=line.get_color(), label=name)
    axes[0][0].set(xlabel="epoch", ylabel="train loss (running)", yscale="log")
    axes[0][1].set(xlabel="epoch", ylabel="held-out accuracy")
    axes[1][0].set(xlabel="wall time (s)", ylabel="train loss (running)", yscale="log")
    axes[1][1].set(xlabel="wall time (s)", ylabel="held-out accuracy")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
