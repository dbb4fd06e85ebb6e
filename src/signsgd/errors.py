"""Every error this library raises on purpose, in one place (no torch.distributed import).

* :class:`NonFiniteGradientError` — a gradient (or a vote input) held a NaN or inf, on this
  rank or, in a distributed step, on another; nothing was changed.
* :class:`CollectiveError` — a collective failed: a peer died or did not arrive in time.
* :class:`ConfigError` — a bad training configuration (names the value, says how to fix it).

When the ranks of one step disagree (layouts, steps, seeds, configurations,
hyper-parameters) every rank raises a plain ``ValueError`` naming each rank's values.
* :class:`DataError` — a dataset is missing, corrupt or unknown.
* :class:`CheckpointError` — a checkpoint that cannot be trusted or resumed from.
* :class:`OutputError` — a run's outputs cannot be written where they were asked to go.

Example:
    >>> from signsgd.errors import NonFiniteGradientError
    >>> issubclass(NonFiniteGradientError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "NonFiniteGradientError",
    "CollectiveError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "OutputError",
]


class NonFiniteGradientError(ValueError):
    """A gradient held a NaN or inf (on this rank or, in a distributed step, on another)."""


class CollectiveError(RuntimeError):
    """A collective of a vote or reducer step failed (a peer died or timed out)."""


class ConfigError(ValueError):
    """A bad training configuration; the message names the value and how to fix it."""


class DataError(RuntimeError):
    """A dataset is missing, corrupt or unknown; the message says how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (damaged, or from a different run)."""


class OutputError(OSError):
    """The run directory cannot take the run's outputs (a file, read-only, full, occupied)."""
