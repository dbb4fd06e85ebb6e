"""The training checkpoint ``OUT/checkpoint.pt``: saved atomically, never trusted unchecked.

It holds the model, the scheduler, the step and wall time, the metrics so far, the config
and its fingerprint (the fields a resumed run must share with it: all but those whose
metadata says ``resume=False``, such as ``steps``, ``epochs`` and ``out``), and each rank's
own state (optimiser and reducer state, RNG state, byte counters, the running sums of the
current epoch and log window). On disk the whole payload is one blob with its sha256, and
inside it every rank's state is a blob with its own sha256: a damaged checkpoint — a single
flipped byte — is refused with a clear message before anything is loaded or overwritten.

Example:
    >>> import tempfile; from signsgd.config import TrainConfig
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = save(out, TrainConfig(), step=3, ranks=[{"rng": torch.zeros(1)}], model={},
    ...          scheduler={}, metrics=[], wall_time_s=1.0)
    >>> load(out, TrainConfig(), total_steps=10)["step"]
    3
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from signsgd.errors import CheckpointError
from signsgd.outputs import write_atomic

if TYPE_CHECKING:
    from signsgd.config import TrainConfig

__all__ = ["CHECKPOINT", "save", "read", "load"]

#: The checkpoint's file name in the run directory.
CHECKPOINT = "checkpoint.pt"
_FORMAT = "signsgd-checkpoint-v2"
_STATE = ("model", "scheduler", "ranks", "metrics", "step", "wall_time_s")


def _fingerprint(c: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
            if f.metadata.get("resume", True)}


def _bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _seal(obj: Any) -> dict[str, Any]:
    data = _bytes(obj)
    return {"sha256": hashlib.sha256(data).hexdigest(), "data": data}


def _open(sealed: Any, what: str, path: Path) -> Any:
    if not (isinstance(sealed, dict) and isinstance(sealed.get("data"), bytes)
            and hashlib.sha256(sealed["data"]).hexdigest() == sealed.get("sha256")):
        raise CheckpointError(
            f"--resume: checkpoint {path} is damaged ({what}: its sha256 does not match); "
            "nothing was loaded or overwritten — delete it or use another --out to start over")
    return torch.load(io.BytesIO(sealed["data"]), map_location="cpu", weights_only=True)


def save(out: Path, c: TrainConfig, **state: Any) -> Path:
    """Write ``out/checkpoint.pt`` atomically: the format tag and one sealed blob of the
    fingerprint, the config and ``state``, whose ``ranks`` list is sealed rank by rank. The
    file is serialised in memory first, so that a failing write is the OS's error.

    Raises:
        OutputError: the file cannot be written (e.g. a full disk: the message says so, in
            the OS's words); the previous checkpoint stays as it was and no temporary file
            is left behind.

    Example:
        >>> import tempfile; from signsgd.config import TrainConfig
        >>> save(Path(tempfile.mkdtemp()), TrainConfig(), step=1, ranks=[]).name
        'checkpoint.pt'
    """
    payload = {"fingerprint": _fingerprint(c), "config": c.to_dict(), **state,
               "ranks": [_seal(part) for part in state.get("ranks", [])]}
    data = _bytes({"format": _FORMAT, **_seal(payload)})
    return write_atomic(out / CHECKPOINT, lambda tmp: tmp.write_bytes(data))


def read(path: Path) -> dict[str, Any]:
    """The verified contents of a checkpoint file: the payload, every rank's state opened.

    Raises:
        CheckpointError: unreadable, foreign or damaged (a checksum that does not match).

    Example:
        >>> import tempfile; from signsgd.config import TrainConfig
        >>> p = save(Path(tempfile.mkdtemp()), TrainConfig(), step=2, ranks=[{"a": 1}])
        >>> read(p)["ranks"]
        [{'a': 1}]
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on bad files
        raise CheckpointError(
            f"--resume: checkpoint {path} is corrupt or unreadable (not a file torch can read: "
            f"{type(exc).__name__}); the run directory was left as it was — delete the file or "
            "use another --out to start over") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"--resume: {path} is not a signsgd training checkpoint of this version (format "
            f"{found!r}, expected {_FORMAT!r})")
    ckpt = _open(blob, "the payload", path)
    ckpt["ranks"] = [_open(part, f"the state of rank {r}", path)
                     for r, part in enumerate(ckpt.get("ranks", []))]
    return ckpt


def load(out: Path, cfg: TrainConfig, total_steps: int, steps_per_epoch: int | None = None
         ) -> dict[str, Any]:
    """Read ``out/checkpoint.pt``, verify its checksums and check it against ``cfg`` (the
    resolved config of the run that resumes) and its step budget (``steps_per_epoch``: the
    budget is ``--epochs`` of image data); return its dict with every rank's state opened.
    Nothing in ``out`` is touched.

    Raises:
        CheckpointError: no checkpoint; an unreadable, foreign or damaged one (a checksum
            that does not match); one from a different run (the message lists the
            differing fields); an incomplete one; or one that already reached
            ``total_steps``.

    Example:
        >>> import tempfile; from signsgd.config import TrainConfig
        >>> out = Path(tempfile.mkdtemp()); _ = save(out, TrainConfig(), step=1, ranks=[])
        >>> load(out, TrainConfig(lr=0.5), 10)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        signsgd.errors.CheckpointError: --resume: checkpoint ... is from a different run (lr: ...
    """
    path = out / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"--resume: no checkpoint at {path}; run without --resume to start a new run")
    ckpt = read(path)
    want, have = _fingerprint(cfg), ckpt.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r}, now {want[k]!r}" for k in want
             if have.get(k) != want[k]]
    if diffs:
        raise CheckpointError(
            f"--resume: checkpoint {path} is from a different run ({'; '.join(diffs)}); use "
            "the same options as that run, or another --out to start over")
    missing = [k for k in _STATE if k not in ckpt]
    if missing or len(ckpt.get("ranks", ())) != cfg.workers:
        raise CheckpointError(
            f"--resume: checkpoint {path} is incomplete (missing {missing} or not one state "
            f"per worker); delete it or use another --out to start over")
    if ckpt["step"] >= total_steps:
        if steps_per_epoch and cfg.steps is None:
            raise CheckpointError(
                f"--resume: the checkpoint in {path} already finished epoch "
                f"{ckpt['step'] // steps_per_epoch} of --epochs {cfg.epochs}; raise --epochs "
                "to train further")
        raise CheckpointError(
            f"--resume: the checkpoint in {path} already reached step {ckpt['step']} of "
            f"--steps {total_steps}; raise --steps to train further")
    return ckpt
