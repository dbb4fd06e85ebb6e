"""PyTorch Lightning with signsgd: our optimisers (and LR schedulers) from
``configure_optimizers``, the majority-vote hook on Lightning's DDP model, and
``Signum(aggregator=MajorityVote())`` with one single-device Trainer per rank. Every run is
checked against the same training written with plain torch + signsgd on the same batches
(bit for bit), and across 2 Gloo ranks for identical parameters.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning", reason="the lightning extra is not installed "
                    "(pip install -e '.[lightning]')")

from signsgd.distributed.launch import spawn  # noqa: E402

from . import lightning_workers as W  # noqa: E402


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(("optimiser", "precision", "final_lr"), [
    ("signum_steplr", "32-true", 0.01 * 0.5 ** 3),
    ("signum_steplr", "bf16-mixed", 0.01 * 0.5 ** 3),
    ("lion_cosine", "32-true", 0.0),
    ("lion_cosine", "bf16-mixed", 0.0),
])
def test_configure_optimizers_equals_the_plain_loop(optimiser, precision, final_lr):
    res = W.fit_single(optimiser, precision)
    assert same(res["lightning"], res["plain"]), (optimiser, precision)
    assert res["lr"] == pytest.approx(final_lr, abs=1e-12)  # stepped once per step


@pytest.fixture(scope="module")
def distributed():
    return spawn(W.distributed_cases, 2, timeout=180, pg_timeout=60)


def test_hook_from_a_callback_votes_and_equals_torch_ddp_with_the_hook(distributed):
    for rank, res in enumerate(distributed):
        got = res["hook_by_callback"]
        assert (got["rank"], got["world"]) == (rank, 2)  # Lightning kept our group
        assert got["hook_steps"] == W.STEPS
        assert same(got["params"], distributed[0]["hook_by_callback"]["params"]), rank
        assert same(got["params"], res["plain_hook"]), rank
        assert got["momentum_names"] == ["module.net.0.bias", "module.net.0.weight",
                                         "module.net.2.bias", "module.net.2.weight"]


def test_ddp_strategy_drops_the_comm_hook_on_cpu(distributed):
    # Lightning 2.6 registers ddp_comm_hook only on CUDA (DDPStrategy._register_ddp_hooks);
    # on CPU DDP all-reduces as usual. If this starts failing, Lightning fixed it: update
    # docs/frameworks.md.
    for res in distributed:
        got = res["hook_by_strategy"]
        assert got["hook_steps"] == 0
        assert not same(got["params"], res["plain_hook"])


def test_voting_optimiser_with_a_trainer_per_rank(distributed):
    for rank, res in enumerate(distributed):
        got = res["voted"]
        assert (got["rank"], got["world"]) == (0, 1)  # each Trainer sees one process
        assert same(got["lightning"], got["plain"]), rank
        assert same(got["lightning"], distributed[0]["voted"]["lightning"]), rank
