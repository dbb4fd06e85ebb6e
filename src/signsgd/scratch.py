"""Scratch buffers reused across calls: the one cache every hot path of the library uses.

A fresh large CPU tensor costs page faults on every step (measured: allocating 100 MB
costs more than a loopback all-reduce of it), so the packing kernels, the optimisers'
sign temporaries and the reducers' flat buffers take their buffers from a
:class:`Scratch`. A scratch is never state: it is not saved, and it does not pickle.

* :class:`Scratch` — named buffers of one owner (an optimiser, a reducer), reused while
  their size and dtype fit; views of them are valid until the owner's next call.
* :func:`thread_scratch` — one :class:`Scratch` per thread, for stateless kernels
  (:mod:`signsgd.packing`) that may run on a vote engine thread and the main thread at
  once.

Example:
    >>> import torch
    >>> s = Scratch()
    >>> a = s.get("x", 4, torch.float32)
    >>> s.get("x", 3, torch.float32).data_ptr() == a.data_ptr()
    True
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

__all__ = ["Scratch", "thread_scratch"]


class Scratch:
    """Named, grow-only scratch tensors; ``get`` returns a view of the first ``numel``.

    Example:
        >>> s = Scratch()
        >>> s.get("a", 8, torch.uint8).numel(), s.owns("a", s.get("a", 2, torch.uint8))
        (8, True)
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype,
            device: torch.device | str = "cpu", *, exact: bool = False) -> Tensor:
        """A flat tensor of ``numel`` elements of ``dtype`` on ``device``.

        Off the CPU a fresh tensor every call (the caching allocator recycles memory).
        ``exact=True`` keeps a buffer of exactly ``numel`` elements (a view of a larger
        one is not wanted, e.g. a result handed out as a whole tensor).
        """
        device = torch.device(device)
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or (exact and buf.numel() != numel):
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def owns(self, name: str, tensor: Tensor | None) -> bool:
        """Whether ``tensor`` is (a view starting at) buffer ``name``."""
        if tensor is None:
            return False
        return any(k[0] == name and b.data_ptr() == tensor.data_ptr()
                   for k, b in self._buffers.items())

    def clear(self) -> None:
        """Drop every buffer."""
        self._buffers.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._buffers = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> Scratch:
        return Scratch()

    def __repr__(self) -> str:
        return f"Scratch({len(self._buffers)} buffers)"


_LOCAL = threading.local()


def thread_scratch() -> Scratch:
    """This thread's :class:`Scratch` (created on first use).

    Example:
        >>> thread_scratch() is thread_scratch()
        True
    """
    scratch = getattr(_LOCAL, "scratch", None)
    if scratch is None:
        scratch = _LOCAL.scratch = Scratch()
    return scratch
