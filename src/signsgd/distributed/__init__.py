"""Distributed sign methods on ``torch.distributed``: aggregators, DDP hooks, adversaries.

See :mod:`signsgd.distributed.base` for the aggregator interface the optimisers call.
"""

from signsgd.distributed.base import Aggregator, NonFiniteGradientError

__all__ = ["Aggregator", "NonFiniteGradientError"]
