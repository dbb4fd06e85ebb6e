"""Distributed sign methods on ``torch.distributed``: reducers, DDP hooks, adversaries.

* :class:`MajorityVote` — the 1-bit vote, for ``SignSGD`` / ``Signum`` / ``Lion``.
* :class:`ErrorFeedbackAllReduce` — two-stage compressed all-reduce, for ``EFSGD``.
* :class:`AllReduce` — the fp32 mean all-reduce baseline.
* :class:`OneBitAllReduce` — the mean, then 1-bit EF, for ``OneBitAdam``.
* :class:`QuantizedMean` — the mean sent in bf16 or int8 (the DiLoCo family's outer steps).
* :class:`AverageGradients` — any ``torch.optim`` optimiser on all-reduced gradients.
* :class:`LocalSteps` — H local steps of any optimiser, then a reduced outer step (DiLoCo).
* :func:`majority_vote` / :func:`vote_async` — the vote as a function / a future.
* :func:`majority_vote_hook` / :class:`MajorityVoteHookState` — DDP communication hook.
* :mod:`signsgd.distributed.adversary` — Byzantine workers for fault-tolerance runs.
* :func:`signsgd.distributed.launch.spawn` — M local Gloo workers on 127.0.0.1.

:mod:`signsgd.reduction` states the protocol every reducer implements.
"""

from signsgd.distributed.average import AverageGradients
from signsgd.distributed.error_feedback import ErrorFeedbackAllReduce
from signsgd.distributed.hooks import MajorityVoteHookState, majority_vote_hook
from signsgd.distributed.local_steps import LocalSteps
from signsgd.distributed.onebit import OneBitAllReduce
from signsgd.distributed.quantized import QuantizedMean
from signsgd.distributed.reducer import AllReduce, Reducer, Reduction
from signsgd.distributed.vote import MajorityVote, majority_vote, vote_async
from signsgd.errors import CollectiveError, NonFiniteGradientError

__all__ = [
    "AllReduce",
    "AverageGradients",
    "CollectiveError",
    "ErrorFeedbackAllReduce",
    "LocalSteps",
    "MajorityVote",
    "MajorityVoteHookState",
    "NonFiniteGradientError",
    "OneBitAllReduce",
    "QuantizedMean",
    "Reducer",
    "Reduction",
    "majority_vote",
    "majority_vote_hook",
    "vote_async",
]
