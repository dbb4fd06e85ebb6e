"""The collectives of a step, each raising :class:`~signsgd.errors.CollectiveError`.

Thin wrappers of ``torch.distributed``: a failed collective (a peer died, or did not make
the same call within the group's timeout) becomes an error that names this rank and the
collective, instead of a backend message. :func:`world` is the (rank, size) of a group,
``(0, 1)`` when no process group exists, so one process needs no ``init_process_group``.

Example:
    >>> world(None)   # no process group initialised
    (0, 1)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from signsgd.errors import CollectiveError

__all__ = ["world", "all_gather", "all_to_all", "all_reduce", "broadcast", "header_device",
           "phase", "timing"]

#: The phases a reducer step's time is split into (the trainer logs them).
PHASES = ("pack", "collectives", "unpack")
_CLOCK = threading.local()


@contextmanager
def timing() -> Iterator[dict[str, float]]:
    """Collect the seconds this thread spends in each phase (:func:`phase`) of a step.

    Example:
        >>> with timing() as spent:
        ...     with phase("pack"):
        ...         pass
        >>> sorted(spent)
        ['collectives', 'pack', 'unpack']
    """
    spent = {p: 0.0 for p in PHASES}
    previous, _CLOCK.spent = getattr(_CLOCK, "spent", None), spent
    try:
        yield spent
    finally:
        _CLOCK.spent = previous


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time of the ``with`` block towards phase ``name`` of the current step
    (nothing happens outside :func:`timing`).

    Example:
        >>> with phase("unpack"):
        ...     pass
    """
    t0 = time.perf_counter()
    try:
        yield
    finally:
        spent = getattr(_CLOCK, "spent", None)
        if spent is not None:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0


def world(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` of ``group``; ``(0, 1)`` without an initialised default group.

    Raises:
        ValueError: this process is not a member of ``group``.
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process "
            f"group it was asked to communicate in"
        )
    return rank, dist.get_world_size(group)


def header_device(group: Any, device: torch.device | None) -> torch.device:
    """Where small control tensors travel: the data's CUDA device under NCCL, else CPU."""
    if device is not None and device.type == "cuda" and dist.get_backend(group) == "nccl":
        return device
    return torch.device("cpu")


def _failed(what: str, group: Any, exc: BaseException) -> CollectiveError:
    rank, m = world(group)
    return CollectiveError(
        f"{what} failed on rank {rank} of {m} ({type(exc).__name__}: {exc}); a peer process "
        f"probably died, or did not make the same call within the process group's timeout"
    )


def all_gather(out: Tensor, inp: Tensor, group: Any) -> None:
    """``all_gather_single``: ``out`` holds every rank's ``inp`` in rank order."""
    try:
        with phase("collectives"):
            dist.all_gather_single(out, inp, group=group)
    except RuntimeError as exc:
        raise _failed("all_gather", group, exc) from exc


def all_to_all(out: Tensor, inp: Tensor, group: Any) -> None:
    """``all_to_all_single`` with equal splits."""
    try:
        with phase("collectives"):
            dist.all_to_all_single(out, inp, group=group)
    except RuntimeError as exc:
        raise _failed("all_to_all_single", group, exc) from exc


def all_reduce(t: Tensor, group: Any) -> None:
    """Sum ``all_reduce`` in place."""
    try:
        with phase("collectives"):
            dist.all_reduce(t, group=group)
    except RuntimeError as exc:
        raise _failed("all_reduce", group, exc) from exc


def broadcast(t: Tensor, src: int, group: Any) -> None:
    """``broadcast`` of ``t`` from group rank ``src``, in place."""
    try:
        with phase("collectives"):
            dist.broadcast(t, group_src=src, group=group)
    except RuntimeError as exc:
        raise _failed("broadcast", group, exc) from exc
