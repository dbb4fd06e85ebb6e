"""The DDP majority-vote comm hook on real Gloo groups (``spawn``), against ``Signum``.

Three launches (each a few seconds): a group of 3 ranks (odd: no ties) runs
``hook_workers.hook_suite`` — DDP + hook + SGD against ``Signum(aggregator=MajorityVote())``
on the same data, a checkpoint round trip, pickling and a NaN on one rank; and a group of 2
ranks (ties) checks that every rank and both modes agree; one rank alone is Signum. The
tests below only read the results, table-driven. The step bookkeeping alone (no DDP) is
tested in ``test_ledger.py``.
"""

import pickle
from typing import Any

import pytest
import torch

from signsgd.distributed.hooks import MajorityVoteHookState
from signsgd.distributed.launch import spawn
from signsgd.distributed.vote import vote_nbytes

from . import hook_workers as hw


@pytest.fixture(scope="module")
def suite() -> list[dict[str, Any]]:
    return spawn(hw.hook_suite, 3, timeout=120, pg_timeout=60)


@pytest.fixture(scope="module")
def even() -> list[dict[str, Any]]:
    return spawn(hw.hook_even, 2, (5,), timeout=120, pg_timeout=60)


# --------------------------------------------------------------------------- vs Signum
@pytest.mark.parametrize("case,mode", [("vs_signum", "sharded"),
                                       ("vs_signum_allgather", "allgather"),
                                       ("vs_signum_byzantine", "sharded"),
                                       ("vs_lion", "sharded"),
                                       ("vs_lion_allgather", "allgather")])
def test_hook_equals_signum_majority_vote(suite: list[dict[str, Any]], case: str,
                                          mode: str) -> None:
    for rank, res in enumerate(suite):
        r = res[case]
        assert r["diffs"] == [0.0] * len(r["diffs"]), (rank, r["diffs"])
        assert r["momentum_equal"], rank
        assert r["steps"] == len(r["diffs"])


def test_hook_with_sgd_weight_decay_is_decoupled_decay(suite: list[dict[str, Any]]) -> None:
    """SGD computes x − lr·(v + wd·x), Signum x·(1 − lr·wd) − lr·v: equal up to rounding."""
    for res in suite:
        diffs = res["vs_signum_wd"]["diffs"]
        assert max(diffs) < 1e-6, diffs


@pytest.mark.parametrize("case", ["vs_signum", "vs_signum_allgather", "vs_signum_wd",
                                  "vs_signum_byzantine", "vs_lion", "vs_lion_allgather"])
def test_parameters_identical_on_all_ranks(suite: list[dict[str, Any]], case: str) -> None:
    first = suite[0][case]["params"]
    for res in suite[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, res[case]["params"]))


def test_buckets_rebuilt_after_first_step(suite: list[dict[str, Any]]) -> None:
    """The test really exercises DDP's bucket rebuild and several buckets per step."""
    trace = suite[0]["vs_signum"]["trace"]
    by_step: dict[int, list[tuple[str, ...]]] = {}
    for step, index, names, _ in trace:
        by_step.setdefault(step, []).append(names)
        assert index == len(by_step[step]) - 1  # buckets arrive in index order
    assert by_step[0] != by_step[1], "DDP did not rebuild its buckets"
    assert all(len(by_step[s]) > 1 for s in by_step if s >= 1)  # several buckets per step
    assert all(by_step[s] == by_step[1] for s in by_step if s >= 1)
    # The bucket holding a given parameter changed index or offset between steps 0 and 1.
    assert by_step[0][0][0] != by_step[1][0][0]


@pytest.mark.parametrize("case,mode", [("vs_signum", "sharded"),
                                       ("vs_signum_allgather", "allgather")])
def test_byte_counts_equal_formula(suite: list[dict[str, Any]], case: str, mode: str) -> None:
    r = suite[0][case]
    per_step: dict[int, list[int]] = {}
    for step, _, _, numel in r["trace"]:
        per_step.setdefault(step, []).append(numel)
    expected = []
    for step in sorted(per_step):
        sent = sum(vote_nbytes(n, 3, mode)[0] for n in per_step[step])
        received = sum(vote_nbytes(n, 3, mode)[1] for n in per_step[step])
        expected.append((sent, received))
    assert r["bytes_per_step"] == expected
    assert r["total"] == tuple(map(sum, zip(*expected)))
    assert r["buckets"] == len(per_step[max(per_step)])
    assert r["votes"] == sum(len(v) for v in per_step.values())


# --------------------------------------------------------------------------- state
@pytest.mark.parametrize("key,want", [("identical", True), ("pickled_ok", True),
                                      ("pickle_has_group", False), ("steps", (6, 6))])
def test_checkpoint_and_pickle(suite: list[dict[str, Any]], key: str, want: Any) -> None:
    for res in suite:
        assert res["checkpoint"][key] == want


def test_checkpoint_keys_are_parameter_names(suite: list[dict[str, Any]]) -> None:
    assert suite[0]["checkpoint"]["ckpt_keys"] == sorted(
        f"module.{n}" for n, _ in hw.Shuffled().named_parameters())


# --------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_nonfinite_on_one_rank_raises_everywhere(suite: list[dict[str, Any]], rank: int) -> None:
    r = suite[rank]["nonfinite"]
    assert [i for i, _ in r["errors"]] == [1], r["errors"]  # the bad step, on every rank
    text = r["errors"][0][1]
    assert "NonFiniteGradientError" in text and "rank(s) [1]" in text, text
    assert r["params_unchanged"] and r["momentum_unchanged"]
    assert r["step_after_error"] == 1


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_training_goes_on_after_a_skipped_nonfinite_step(suite: list[dict[str, Any]],
                                                         rank: int) -> None:
    r = suite[rank]["nonfinite"]
    assert r["signum_errors"] == [1]
    assert r["step"] == 4  # 5 batches, one skipped
    assert r["equals_signum"]
    assert all(torch.equal(a, b) for a, b in zip(r["params"], suite[0]["nonfinite"]["params"]))


# --------------------------------------------------------------------------- even M
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_even_world_ranks_and_modes_agree(even: list[dict[str, Any]], beta: float) -> None:
    assert all(res[f"modes_agree/{beta}"] for res in even)
    a, b = (res[f"params/{beta}"] for res in even)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert even[0][f"bytes/{beta}/sharded"][0] > 0


# --------------------------------------------------------------------------- M = 1
def test_world_of_one_is_signum_and_sends_nothing() -> None:
    """One rank: the vote is the sign of the momentum (zero -> +1); no bytes move."""
    (r,) = spawn(hw.hook_vs_signum, 1, (4, 0.0002, 0.9, 0.01, "sharded"), timeout=120)
    assert r["diffs"] == [0.0] * 4 and r["momentum_equal"]
    assert r["total"] == (0, 0) and r["steps"] == 4


# --------------------------------------------------------------------------- no group
@pytest.mark.parametrize("kwargs,needle", [
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"mode": "ring"}, "mode"),
    ({"seed": -1}, "seed"),
    ({"betas": (1.0, 0.5)}, "beta1"),
    ({"betas": (0.9,)}, "betas"),
    ({"module": "model"}, "module"),
])
def test_state_validates_arguments(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MajorityVoteHookState(**kwargs)


def test_state_pickles_and_restores_by_name_without_a_group() -> None:
    model = hw.Shuffled()
    state = MajorityVoteHookState(momentum=0.8, mode="allgather", seed=4, module=model)
    p = model.head.weight
    state._momentum[id(p)] = torch.full_like(p, 0.25)
    state.step, state.votes = 3, 6
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None and clone.momentum_of(p) is None
    with pytest.raises(ValueError, match="bind"):
        clone._check_bound()
    clone.bind(model)
    assert torch.equal(clone.momentum_of(p), torch.full_like(p, 0.25))
    assert (clone.momentum, clone.mode, clone.seed, clone.step, clone.votes) == (
        0.8, "allgather", 4, 3, 6)


@pytest.mark.parametrize("change,needle", [
    ({"beta": 0.5}, "beta"),
    ({"betas": (0.9, 0.99)}, "betas"),
    ({"seed": 9}, "seed"),
    ({"momentum": {"nope": torch.zeros(1)}}, "nope"),
    ({"momentum": {"head.bias": torch.zeros(7)}}, "shape"),
])
def test_load_state_dict_rejects_mismatch(change: dict[str, Any], needle: str) -> None:
    model = hw.Shuffled()
    state = MajorityVoteHookState(momentum=0.9, module=model)
    state._momentum[id(model.mid.bias)] = torch.ones(16)
    state.step = 5
    sd = {**state.state_dict(), **change}
    with pytest.raises(ValueError, match=needle):
        state.load_state_dict(sd)
    # nothing changed
    assert torch.equal(state.momentum_of(model.mid.bias), torch.ones(16))
    assert state.step == 5 and len(state._momentum) == 1


def test_state_dict_without_names_is_a_clear_error() -> None:
    state = MajorityVoteHookState()
    state._momentum[123] = torch.zeros(2)
    with pytest.raises(ValueError, match="module="):
        state.state_dict()


def test_the_vote_is_validated_once_and_a_new_adversary_too() -> None:
    state = MajorityVoteHookState(mode="allgather", seed=2)
    voter = state._voter
    assert (state.mode, state.seed, state.adversary) == ("allgather", 2, None)
    with pytest.raises(TypeError, match="adversary"):
        state.adversary = "evil"
    assert state._voter is voter
    with pytest.raises(TypeError, match="adversary"):
        MajorityVoteHookState(adversary="evil")
