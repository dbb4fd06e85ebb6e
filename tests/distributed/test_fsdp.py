"""FSDP2 / HSDP with a 1-bit cross-replica reduction, one launch of 6 Gloo ranks: a float64
model ``fully_shard``-ed over the shard dimension of replicate × shard meshes (3 × 2, and
the edge meshes 1 × 4 and 4 × 1 over the first 4 ranks; uneven shards, an empty one on a
rank), the optimiser's reducer on the replicate group. See fsdp_workers.py for the cases and
their references."""

from __future__ import annotations

import pytest
import torch

from signsgd.distributed.launch import spawn

from . import fsdp_workers as FW


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(FW.fsdp2, 6, (str(tmp_path_factory.mktemp("dcp")),), timeout=240,
                 pg_timeout=120)


def _members(results, name):
    return [res[name] for res in results if res[name] is not None]


@pytest.mark.parametrize("name", [c[0] for c in FW.CASES])
def test_parameters_equal_the_unsharded_reference_on_every_rank(results, name):
    members = _members(results, name)
    _, (r, s), _, reference = next(c for c in FW.CASES if c[0] == name)
    assert len(members) == r * s
    for out in members:  # every rank holds the same full parameters
        assert all(torch.equal(a, b) for a, b in zip(out["full"], members[0]["full"]))
        assert all(t.dtype == torch.float64 for t in out["full"])
        if reference == "central":  # the vote computed in one process, without FSDP
            assert all(torch.equal(a, b) for a, b in zip(out["full"], out["expected"]))
        else:  # each local shard equals the plain-tensor path at every step
            assert out["equal"] == [True] * (FW.STEPS + 1)
    if s == 4:  # uneven: 3 rows over 4 shards leave one rank an empty shard
        assert 0 in members[-1]["local_numel"]


def test_aggregator_on_a_group_across_the_shards_is_refused(results):
    for res in results:
        assert "holds another shard" in res["refusal"]
        assert "mesh['shard']" in res["refusal"]
        assert "get_group('replicate')" in res["refusal"]


@pytest.mark.parametrize("method", FW.NONFINITE)
def test_nan_in_one_shard_raises_on_every_rank_and_changes_nothing(results, method):
    # without an aggregator the replicas are independent: rank 0's shard group raises (rank
    # 1, whose own shard is finite, too), the other replicas step
    raised = {"error": "NonFiniteGradientError", "unchanged": True}
    stepped = {"error": None, "unchanged": False}
    want = [raised] * 2 + [stepped if method == "signum-local" else raised] * 4
    assert [res[f"nonfinite-{method}"] for res in results] == want


def test_mixed_precision_bf16_compute_keeps_the_replicas_identical(results):
    for res in results:
        assert all(torch.equal(a, b) for a, b in zip(res["mixed"], results[0]["mixed"]))
        assert all(t.dtype == torch.float32 for t in res["mixed"])


@pytest.mark.parametrize("method", FW.CHECKPOINTED)
def test_dcp_checkpoint_resumes_bit_identically(results, method):
    for res in results:
        assert res[f"checkpoint-{method}"] == {"equal": True, "step": 2}
