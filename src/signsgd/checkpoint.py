"""The training checkpoint ``OUT/checkpoint.pt``: saved atomically, checked before resuming.

It holds the model, each rank's optimiser state (reducer state included), RNG state and
byte counters, the scheduler, the epoch, step and wall time, the metrics so far, the config
and its fingerprint: the fields a resumed run must share with it (all but those whose
metadata says ``resume=False``, such as ``epochs`` and ``out``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from signsgd.errors import CheckpointError
from signsgd.outputs import write_atomic

if TYPE_CHECKING:
    from signsgd.config import TrainConfig

__all__ = ["CHECKPOINT", "save", "load"]

#: The checkpoint's file name in the run directory.
CHECKPOINT = "checkpoint.pt"
_FORMAT = "signsgd-checkpoint-v1"
_STATE = ("model", "optimizer", "scheduler", "rng", "bytes", "metrics", "epoch", "step",
          "wall_time_s")


def _fingerprint(c: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
            if f.metadata.get("resume", True)}


def save(out: Path, c: TrainConfig, **state: Any) -> Path:
    """Write ``out/checkpoint.pt`` atomically (format, fingerprint, config, then ``state``);
    return its path.

    Example:
        >>> import tempfile; from signsgd.config import TrainConfig
        >>> save(Path(tempfile.mkdtemp()), TrainConfig(), epoch=1).name
        'checkpoint.pt'
    """
    return write_atomic(out / CHECKPOINT, lambda tmp: torch.save(
        {"format": _FORMAT, "fingerprint": _fingerprint(c), "config": c.to_dict(), **state}, tmp))


def load(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Read ``out/checkpoint.pt`` and check it against ``cfg`` (the resolved config of the
    run that resumes); return its dict. Nothing in ``out`` is touched.

    Raises:
        CheckpointError: no checkpoint, a corrupt or foreign one, one from a different run
            (the message lists the differing fields), an incomplete one, or one that already
            finished ``cfg.epochs``.

    Example:
        >>> import tempfile; from signsgd.config import TrainConfig
        >>> out = Path(tempfile.mkdtemp()); _ = save(out, TrainConfig(), epoch=1)
        >>> load(out, TrainConfig(lr=0.5))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        signsgd.errors.CheckpointError: --resume: checkpoint ... is from a different run (lr: ...
    """
    path = out / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"--resume: no checkpoint at {path}; run without --resume to start a new run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on bad files
        raise CheckpointError(
            f"--resume: checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the run directory was left as "
            "it was — delete the checkpoint or use another --out to start over") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise CheckpointError(
            f"--resume: {path} is not a signsgd training checkpoint (format "
            f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
            f"expected {_FORMAT!r})")
    want, have = _fingerprint(cfg), ckpt.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r}, now {want[k]!r}" for k in want
             if have.get(k) != want[k]]
    if diffs:
        raise CheckpointError(
            f"--resume: checkpoint {path} is from a different run ({'; '.join(diffs)}); use "
            "the same options as that run, or another --out to start over")
    missing = [k for k in _STATE if k not in ckpt]
    if missing or any(len(ckpt[k]) != cfg.workers for k in ("optimizer", "rng", "bytes")):
        raise CheckpointError(
            f"--resume: checkpoint {path} is incomplete (missing {missing} or not one state "
            f"per worker); delete it or use another --out to start over")
    if ckpt["epoch"] >= cfg.epochs:
        raise CheckpointError(
            f"--resume: the checkpoint in {path} already finished epoch {ckpt['epoch']} of "
            f"--epochs {cfg.epochs}; raise --epochs to train further")
    return ckpt
