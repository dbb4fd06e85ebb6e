"""FSDP2 (``fully_shard``) with our optimisers on 2 Gloo ranks: a local step on every shard
works; an aggregator is refused at construction with a message that says what is
supported (FSDP already reduce-scatters the gradients)."""

from __future__ import annotations

import pytest
import torch

from signsgd.distributed.launch import spawn

from . import fsdp_workers as FW


@pytest.fixture(scope="module")
def results():
    return spawn(FW.fsdp2, 2, timeout=120, pg_timeout=60)


def test_aggregator_with_dtensor_parameters_is_refused_clearly(results):
    for res in results:
        assert "DTensor parameters (FSDP2 fully_shard)" in res["error"]
        assert "without aggregator=" in res["error"]


def test_local_step_on_the_shards(results):
    for res in results:
        assert any(res["moved"])
    for a, b in zip(results[0]["full"], results[1]["full"]):
        assert torch.equal(a, b)  # one model: the shards assemble to the same tensors
