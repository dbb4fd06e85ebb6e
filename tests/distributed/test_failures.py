"""Bad input across ranks: every rank raises the same clear error in the same call, never a
hang and never a silently wrong vote; a dead rank makes the others fail within the
group's timeout. Real Gloo groups of 3 ranks."""

from __future__ import annotations

import pytest

from signsgd.distributed.launch import WorkerError, spawn

from . import workers as W


@pytest.fixture(scope="module")
def bad():
    """The bad-input cases run at the end of the shared 3-rank aggregator launch."""
    return [res["bad"] for res in W.suite_results(20)]


@pytest.mark.parametrize(
    ("case", "kind", "fragments"),
    [
        ("numel", "ValueError", ["differ across ranks", "rank 0: numel=10", "rank 1: numel=11",
                                 "rank 2: numel=12"]),
        ("dtype", "ValueError", ["differ across ranks", "rank 0: numel=10 dtype=float32",
                                 "rank 1: numel=10 dtype=float64"]),
        ("shape", "ValueError", ["rank 0: numel=10 dtype=float32 shape=[5, 2]",
                                 "rank 1: numel=10 dtype=float32 shape=[2, 5]"]),
        ("mode", "ValueError", ["configuration differs across ranks"]),
        ("step", "ValueError", ["step counters differ", "rank 0: 0, rank 1: 1, rank 2: 2"]),
        ("nan_vote", "NonFiniteGradientError", ["non-finite input", "rank(s) [2]"]),
        ("inf_async", "NonFiniteGradientError", ["non-finite input", "rank(s) [0]"]),
        ("agg_layout", "ValueError", ["tensor 1:", "rank 0: numel=4", "rank 1: numel=5"]),
        ("agg_count", "ValueError", ["number of tensors differs",
                                     "rank 0: 1, rank 1: 2, rank 2: 1"]),
    ],
)
def test_every_rank_raises_the_same_clear_error(bad, case, kind, fragments):
    messages = [res[case] for res in bad]
    assert len(set(messages)) == 1, messages  # the same error, word for word, everywhere
    assert messages[0].startswith(kind + ":"), messages[0]
    for fragment in fragments:
        assert fragment in messages[0], (fragment, messages[0])


def test_failed_steps_leave_aggregator_state_and_group_usable(bad):
    for rank, res in enumerate(bad):
        assert res["agg_step_after_errors"] == 0
        # ranks 1, 2 vote +1, rank 0 votes -1: the group still works after the errors
        assert res["good_vote_after"].tolist() == [1.0] * 5, rank


@pytest.mark.parametrize("optimiser", ["signum", "efsgd", "allreduce"])
def test_nonfinite_gradient_on_one_rank_stops_every_rank(bad, optimiser):
    for rank, res in enumerate(bad):
        msg, same_params, same_state = res["optim_nonfinite"][optimiser]
        assert msg.startswith("NonFiniteGradientError:"), (rank, msg)
        assert "rank(s) [1]" in msg, (rank, msg)
        assert same_params, f"rank {rank} changed its parameters"
        assert same_state, f"rank {rank} changed its optimiser state"


def test_dead_rank_makes_the_others_fail_within_the_group_timeout():
    with pytest.raises(WorkerError) as info:
        spawn(W.die_in_vote, 3, (2.0,), timeout=120)
    failures = info.value.failures
    assert set(failures) == {0, 1, 2}
    assert "died with exit code 3" in failures[1]
    for rank in (0, 2):
        # each survivor raised on its own (it was not killed by the launcher at the end),
        # from the collective that could not complete
        assert "saw the dead peer" in failures[rank], failures[rank]
        assert "CollectiveError: all_gather failed on rank" in failures[rank]
        assert "did not finish" not in failures[rank]
