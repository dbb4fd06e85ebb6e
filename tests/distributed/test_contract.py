"""The reducer contract, table-driven over every reducer and the DDP hook, on real Gloo
groups of 1, 2 and 3 ranks (one launch each; every property is its own test id).

Properties: ``None`` entries (zeros in, ``None`` back where absent on every rank); the byte
counters equal the traffic measured at the collectives; ``input == transmitted + residual``
(what a rank reports as transmitted is what the others received, at the worker stage and
at the server stage); a NaN on one rank raises the same error on every rank and changes no
state; a reducer loaded from ``state_dict()`` continues identically; with ``commit=False``
nothing changes until :meth:`Reduction.commit`; reducers and hook states pickle without
their process group.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from signsgd.distributed.launch import spawn

from . import contract_workers as CW

WORLDS = (1, 2, 3)
CASES = [name for name, _, _ in CW.REDUCERS]


@pytest.fixture(scope="module", params=WORLDS, ids=[f"M{m}" for m in WORLDS])
def suite(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    m = request.param
    return m, spawn(CW.contract_suite, m, timeout=180, pg_timeout=60)


def _ranks(suite: tuple[int, list[dict[str, Any]]], case: str) -> list[dict[str, Any]]:
    return [res[case] for res in suite[1]]


@pytest.mark.parametrize("case", CASES)
def test_none_entries(suite, case):
    m, _ = suite
    results = _ranks(suite, case)
    for res in results:
        assert res["update"][3] is None  # absent on every rank: left alone everywhere
        # tensor 2 is absent on rank 0 only: with M > 1 the others' values come back
        assert [u is None for u in res["update"][:3]] == [False, False, m == 1]
    for res in results[1:]:  # identical on every rank
        assert all(torch.equal(a, b) for a, b in zip(res["update"][:3],
                                                     results[0]["update"][:3]))
    first = results[0]["transmitted_none"]
    if first is not None:  # rank 0 had no tensor 2: nothing of it was transmitted
        assert first[2] and first[3]


@pytest.mark.parametrize("case", CASES + ["ddp-hook"])
def test_byte_counters_equal_measured_traffic(suite, case):
    for res in _ranks(suite, case):
        if case == "ddp-hook":
            for measured, counted in res["bytes"]:
                assert measured == counted
        else:
            assert res["counted"] == res["measured"]
            if suite[0] == 1:
                assert res["counted"] == (0, 0)


@pytest.mark.parametrize("case", CASES)
def test_input_equals_transmitted_plus_residual(suite, case):
    for res in _ranks(suite, case):
        if "invariant" not in res:
            pytest.skip(f"{case} keeps no account of what it transmitted (a vote sends signs)")
        kind, ok = res["invariant"]
        assert ok, f"{case}: {kind} invariant broken"


@pytest.mark.parametrize("case", CASES + ["ddp-hook"])
def test_nonfinite_on_one_rank_raises_everywhere(suite, case):
    m, _ = suite
    messages = [res["nonfinite"] for res in _ranks(suite, case)]
    assert all(msg is not None and "NonFiniteGradientError" in msg for msg in messages)
    assert f"rank(s) [{1 % m}]" in messages[0] or m == 1
    assert all(res["state_unchanged"] for res in _ranks(suite, case))


@pytest.mark.parametrize("case", CASES + ["ddp-hook"])
def test_state_dict_round_trip(suite, case):
    assert all(res["resume_equal"] for res in _ranks(suite, case))


@pytest.mark.parametrize("case", CASES)
def test_nothing_changes_until_the_caller_commits(suite, case):
    for res in _ranks(suite, case):
        assert res["uncommitted_unchanged"], f"{case}: an uncommitted reduction changed state"
        assert res["commit_equals_reduce"], f"{case}: commit() differs from a committed reduce"


@pytest.mark.parametrize("case", CASES + ["ddp-hook"])
def test_pickles_without_the_process_group(suite, case):
    for res in _ranks(suite, case):
        assert not res["pickle_has_group"]
        assert res["unpickled_group"] is None


@pytest.mark.parametrize("what", ["lr", "weight_decay"])
def test_hyperparameters_that_differ_raise_on_every_rank(suite, what):
    m, results = suite
    if m == 1:
        pytest.skip("one rank cannot disagree with itself")
    messages = [res["settings"][what][0] for res in results]
    assert len(set(messages)) == 1 and messages[0] is not None, messages
    assert messages[0].startswith("ValueError:") and "hyper-parameters differ" in messages[0]
    assert all(res["settings"][what][1] for res in results)  # nothing applied
