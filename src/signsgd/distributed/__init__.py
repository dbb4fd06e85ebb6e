"""Distributed sign methods on ``torch.distributed``: aggregators, DDP hooks, adversaries.

* :func:`majority_vote` — the elementwise majority of signs across ranks, 1 bit each way.
* :class:`MajorityVote` — aggregator for ``SignSGD`` / ``Signum`` (Algorithm 3).
* :class:`ErrorFeedbackAllReduce` — two-stage compressed all-reduce for ``EFSGD``.
* :class:`AllReduce` — the fp32 mean all-reduce baseline.
* :func:`majority_vote_hook` / :class:`MajorityVoteHookState` — DDP communication hook.
* :mod:`signsgd.distributed.adversary` — Byzantine workers for fault-tolerance runs.

See :mod:`signsgd.distributed.base` for the aggregator interface the optimisers call.
"""

from signsgd.distributed.base import Aggregator, NonFiniteGradientError

__all__ = ["Aggregator", "NonFiniteGradientError"]

try:  # filled in as the modules land
    from signsgd.distributed.vote import majority_vote  # noqa: F401

    __all__ += ["majority_vote"]
except ImportError:  # pragma: no cover
    pass
try:
    from signsgd.distributed.aggregators import (  # noqa: F401
        AllReduce,
        ErrorFeedbackAllReduce,
        MajorityVote,
    )

    __all__ += ["AllReduce", "ErrorFeedbackAllReduce", "MajorityVote"]
except ImportError:  # pragma: no cover
    pass
try:
    from signsgd.distributed.hooks import MajorityVoteHookState, majority_vote_hook  # noqa: F401

    __all__ += ["MajorityVoteHookState", "majority_vote_hook"]
except ImportError:  # pragma: no cover
    pass
