"""The hook's bookkeeping alone (:class:`IterationLedger`), without DDP or a process group.

Each case is a script of events and what each returns: ``("begin", index, last)`` returns
``(generation, vote)``; ``("done", k, results, bytes)`` and ``("fail", k)`` end the ``k``-th
bucket begun in the script (so an old generation can be replayed late) and return what
:meth:`~IterationLedger.bucket_done` returns (``None`` for a failure). Then the counters.
"""

import threading
from typing import Any

import pytest

from signsgd.distributed.ledger import IterationLedger

Counters = tuple[int, int, int, int, int, bool]  # step, votes, buckets, last bytes, total, open


def _play(ledger: IterationLedger[str], script: list[tuple[Any, ...]]) -> list[Any]:
    begun: list[int] = []  # generation of each bucket begun, in order
    returned = []
    for event, *args in script:
        if event == "begin":
            generation, vote = ledger.begin_bucket(*args)
            begun.append(generation)
            returned.append((generation, vote))
        elif event == "done":
            k, results, nbytes = args
            returned.append(ledger.bucket_done(begun[k], results, nbytes, nbytes))
        else:
            returned.append(ledger.bucket_failed(begun[args[0]]))
    return returned


def _counters(ledger: IterationLedger[str]) -> Counters:
    assert ledger.bytes_sent == ledger.bytes_received
    assert ledger.total_bytes_sent == ledger.total_bytes_received
    return (ledger.step, ledger.votes, ledger.buckets, ledger.bytes_sent,
            ledger.total_bytes_sent, ledger.is_open)


GOOD = [("begin", 0, False), ("begin", 1, False), ("begin", 2, True),
        ("done", 1, ["b"], 20), ("done", 0, ["a"], 10), ("done", 2, ["c"], 30)]
GOOD_RETURNS = [(1, 0), (1, 1), (1, 2), None, None, ["b", "a", "c"]]

CASES: dict[str, tuple[list[tuple[Any, ...]], list[Any], Counters]] = {
    "open an iteration": (
        [("begin", 0, False)], [(1, 0)], (0, 1, 0, 0, 0, True)),
    "one bucket, done": (
        [("begin", 0, True), ("done", 0, ["a"], 5)], [(1, 0), ["a"]], (1, 1, 1, 5, 5, False)),
    "buckets done in any order, committed once, results in end order": (
        GOOD, GOOD_RETURNS, (1, 3, 3, 60, 60, False)),
    "done before the last bucket began does not close": (
        [("begin", 0, False), ("done", 0, ["a"], 1), ("begin", 1, True),
         ("done", 1, ["b"], 2)], [(1, 0), None, (1, 1), ["a", "b"]], (1, 2, 2, 3, 3, False)),
    "bucket failed: nothing changes, the vote counter rolls back": (
        GOOD + [("begin", 0, False), ("begin", 1, True), ("fail", 4), ("done", 3, ["x"], 9)],
        GOOD_RETURNS + [(2, 3), (2, 4), None, None], (1, 3, 3, 60, 60, False)),
    "next iteration: counters go on, bytes are the last step's, totals add up": (
        GOOD + [("begin", 0, False), ("begin", 1, True), ("done", 3, ["d"], 1),
                ("done", 4, ["e"], 2)],
        GOOD_RETURNS + [(2, 3), (2, 4), None, ["d", "e"]], (2, 5, 2, 3, 63, False)),
    "a bucket begun while none is open opens an iteration of index + 1 buckets": (
        GOOD + [("begin", 1, True), ("done", 3, ["a"], 4)], GOOD_RETURNS + [(2, 3), None],
        (1, 4, 3, 60, 60, True)),
    "late callbacks of an abandoned iteration change nothing": (
        [("begin", 0, False), ("begin", 1, True), ("fail", 0), ("begin", 0, True),
         ("done", 1, ["late"], 7), ("fail", 1), ("done", 2, ["new"], 3)],
        [(1, 0), (1, 1), None, (2, 0), None, None, ["new"]], (1, 1, 1, 3, 3, False)),
}


@pytest.mark.parametrize("case", CASES)
def test_ledger_script(case: str) -> None:
    script, returns, counters = CASES[case]
    ledger: IterationLedger[str] = IterationLedger()
    assert _play(ledger, script) == returns
    assert _counters(ledger) == counters


@pytest.mark.parametrize("arrived", [0, 1, 2, 3])
def test_a_failed_step_restores_the_vote_counter_however_many_callbacks_arrived(
        arrived: int) -> None:
    # DDP raises at the first failed bucket and does not wait for the others, so a rank
    # may begin the next step before all of the failed step's callbacks have run. Every
    # rank must start the next step from the same vote counter (it travels in the header).
    ledger: IterationLedger[str] = IterationLedger()
    good = [ledger.begin_bucket(i, i == 2) for i in range(3)]
    for generation, _ in good:
        ledger.bucket_done(generation, [], 0, 0)
    assert (ledger.step, ledger.votes) == (1, 3)
    failed = [ledger.begin_bucket(i, i == 2) for i in range(3)]
    for generation, _ in failed[:arrived]:
        ledger.bucket_failed(generation)
    _, first_vote = ledger.begin_bucket(0, False)  # the next step
    for generation, _ in failed[arrived:]:  # late: ignored
        ledger.bucket_failed(generation)
    assert (first_vote, ledger.step, ledger.votes) == (3, 1, 4)


def test_restore_sets_counters_and_drops_the_iteration_in_flight() -> None:
    ledger: IterationLedger[str] = IterationLedger()
    _play(ledger, GOOD[:3])  # three buckets begun, none ended
    ledger.restore(step=7, votes=20, total_bytes_sent=100, total_bytes_received=100)
    assert ledger.bucket_done(1, ["late"], 5, 5) is None
    assert _counters(ledger) == (7, 20, 0, 0, 100, False)  # votes not rolled back
    assert ledger.begin_bucket(0, True) == (2, 20)


def test_buckets_ending_on_many_threads_commit_once() -> None:
    ledger: IterationLedger[int] = IterationLedger()
    begun = [ledger.begin_bucket(i, i == 63) for i in range(64)]
    committed: list[list[int]] = []

    def end(i: int) -> None:
        out = ledger.bucket_done(begun[i][0], [i], 1, 1)
        if out is not None:
            committed.append(out)
    threads = [threading.Thread(target=end, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(committed) == 1 and sorted(committed[0]) == list(range(64))
    assert _counters(ledger) == (1, 64, 64, 64, 64, False)
