"""The bookkeeping of a step whose buckets end asynchronously: :class:`IterationLedger`.

The DDP hook (:mod:`signsgd.distributed.hooks`) votes one bucket at a time and learns of
each vote's end in a future's callback, on another thread. The ledger holds its counters
and the iteration in flight; it knows nothing of DDP, tensors or process groups.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["IterationLedger"]

Result = TypeVar("Result")


class IterationLedger(Generic[Result]):
    """Counters and the iteration in flight of a bucketed step whose buckets end on any
    thread, in any order.

    An iteration begins its buckets in index order ``0, 1, …, n−1``; the last one says so
    when it begins, so ``n`` is known from then on. Each bucket takes the next vote number
    as it begins (:meth:`begin_bucket`) and later ends as done, with its results and bytes
    (:meth:`bucket_done`), or failed (:meth:`bucket_failed`). Once all ``n`` have ended the
    iteration closes: if every bucket is done, ``step`` counts it, the bytes are recorded
    and :meth:`bucket_done` returns the results of all its buckets for the caller to
    commit; if any failed, nothing changes, the vote counter included.

    Beginning bucket 0, or any bucket while no iteration is open, opens a new iteration.
    One still open is abandoned like a failed one (DDP raises at a step's first failed
    bucket and does not wait for the others), so every rank opens the next iteration with
    the same vote counter whichever of its callbacks arrived in time. Every bucket carries
    the generation it began in; the end of a bucket of an earlier generation (a late
    callback) changes nothing.

    Thread-safe: every method holds the ledger's lock.

    Example:
        >>> ledger = IterationLedger()
        >>> [ledger.begin_bucket(i, last=i == 1) for i in range(2)]  # (generation, vote)
        [(1, 0), (1, 1)]
        >>> ledger.bucket_done(1, ["a"], sent=4, received=4) is None   # one bucket to go
        True
        >>> ledger.bucket_done(1, ["b"], sent=4, received=4)           # complete: commit these
        ['a', 'b']
        >>> ledger.step, ledger.votes, ledger.buckets, ledger.bytes_sent
        (1, 2, 2, 8)
    """

    def __init__(self) -> None:
        # counters (the owner checkpoints step, votes and the totals)
        self.step: int = 0                  # iterations closed with every bucket done
        self.votes: int = 0                 # bucket numbers handed out (tie-breaking counter)
        self.total_bytes_sent: int = 0      # bytes sent by all complete iterations
        self.total_bytes_received: int = 0  # bytes received by all complete iterations
        # the last complete iteration
        self.buckets: int = 0               # its number of buckets
        self.bytes_sent: int = 0            # its bytes sent, all buckets together
        self.bytes_received: int = 0        # its bytes received, all buckets together
        # the iteration in flight
        self._generation: int = 0           # its tag; 0 before the first iteration
        self._open: bool = False            # begun and not yet closed (nor abandoned)
        self._expected: int | None = None   # its number of buckets, once the last began
        self._ended: int = 0                # its buckets done or failed so far
        self._failed: bool = False          # one of its buckets failed
        self._results: list[Result] = []    # results of its done buckets, in end order
        self._sent: int = 0                 # bytes sent by its done buckets
        self._received: int = 0             # bytes received by its done buckets
        self._votes_before: int = 0         # the vote counter when it opened
        self._lock = threading.Lock()       # callbacks end buckets on other threads

    @property
    def is_open(self) -> bool:
        """Whether an iteration has begun and not yet closed."""
        return self._open

    def begin_bucket(self, index: int, last: bool) -> tuple[int, int]:
        """Begin bucket ``index`` (``last``: the iteration's final bucket); returns
        ``(generation, vote number)`` — pass the generation to the bucket's end."""
        with self._lock:
            if index == 0 or not self._open:
                self._abandon()
                self._generation += 1
                self._open, self._expected, self._ended, self._failed = True, None, 0, False
                self._results, self._sent, self._received = [], 0, 0
                self._votes_before = self.votes
            if last:
                self._expected = index + 1
            self.votes += 1
            return self._generation, self.votes - 1

    def bucket_done(self, generation: int, results: Iterable[Result], sent: int,
                    received: int) -> list[Result] | None:
        """A bucket of ``generation`` voted: its ``results`` and bytes join the iteration.

        Returns the results of every bucket when this closes a complete iteration (the
        caller commits them), else ``None`` (more to come, a failed iteration, or a late
        callback)."""
        with self._lock:
            if not self._current(generation):
                return None
            self._results.extend(results)
            self._sent += sent
            self._received += received
            self._ended += 1
            return self._close_if_ended()

    def bucket_failed(self, generation: int) -> None:
        """A bucket of ``generation`` failed: its iteration will change nothing."""
        with self._lock:
            if self._current(generation):
                self._failed = True
                self._ended += 1
                self._close_if_ended()

    def restore(self, *, step: int, votes: int, total_bytes_sent: int,
                total_bytes_received: int) -> None:
        """Set the checkpointed counters; the iteration in flight is dropped (its late
        callbacks change nothing)."""
        with self._lock:
            self._open = False
            self.step, self.votes = step, votes
            self.total_bytes_sent, self.total_bytes_received = total_bytes_sent, \
                total_bytes_received

    # ------------------------------------------------------------------ lock held
    def _current(self, generation: int) -> bool:
        return self._open and generation == self._generation

    def _abandon(self) -> None:
        if self._open:  # never closed: it changes nothing, like a failed one
            self.votes = self._votes_before
            self._open = False

    def _close_if_ended(self) -> list[Result] | None:
        if self._expected is None or self._ended < self._expected:
            return None
        self._open = False
        if self._failed:
            self.votes = self._votes_before
            return None
        self.step += 1
        self.buckets = self._expected
        self.bytes_sent, self.bytes_received = self._sent, self._received
        self.total_bytes_sent += self._sent
        self.total_bytes_received += self._received
        results, self._results = self._results, []
        return results
