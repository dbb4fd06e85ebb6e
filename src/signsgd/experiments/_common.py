"""Shared pieces of the experiments: the verdict string and a headless pyplot."""

from __future__ import annotations

from typing import Any

__all__ = ["verdict", "pyplot"]


def verdict(ok: bool) -> str:
    """``"reproduced"`` if ``ok`` else ``"not reproduced"``.

    Example:
        >>> verdict(True)
        'reproduced'
    """
    return "reproduced" if ok else "not reproduced"


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend.

    Example:
        >>> pyplot().figure  # doctest: +ELLIPSIS
        <function figure at ...>
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
