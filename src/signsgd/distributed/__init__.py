"""Distributed sign methods on ``torch.distributed``: aggregators, DDP hooks, adversaries.

* :func:`majority_vote` — the elementwise majority of signs across ranks, 1 bit each way.
* :class:`MajorityVote` — aggregator for ``SignSGD`` / ``Signum`` (Algorithm 3).
* :class:`ErrorFeedbackAllReduce` — two-stage compressed all-reduce for ``EFSGD``.
* :class:`AllReduce` — the fp32 mean all-reduce baseline.
* :func:`majority_vote_hook` / :class:`MajorityVoteHookState` — DDP communication hook.
* :mod:`signsgd.distributed.adversary` — Byzantine workers for fault-tolerance runs.
* :func:`signsgd.distributed.launch.spawn` — M local Gloo workers on 127.0.0.1.

See :mod:`signsgd.distributed.base` for the aggregator interface the optimisers call.
"""

from signsgd.distributed.aggregators import AllReduce, ErrorFeedbackAllReduce, MajorityVote
from signsgd.distributed.base import Aggregator, NonFiniteGradientError
from signsgd.distributed.hooks import MajorityVoteHookState, majority_vote_hook
from signsgd.distributed.vote import majority_vote

__all__ = [
    "Aggregator",
    "AllReduce",
    "ErrorFeedbackAllReduce",
    "MajorityVote",
    "MajorityVoteHookState",
    "NonFiniteGradientError",
    "majority_vote",
    "majority_vote_hook",
]
