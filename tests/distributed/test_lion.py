"""Distributed Lion (Lion + MajorityVote) on real Gloo groups of 1, 3 and 4 ranks, against
a numpy reference of the algorithm written out below:

    c_r ← β1·m_r + (1−β1)·g_r ;  s_r = +1 where c_r >= 0 else −1  (zero goes out as +1)
    v = sign(Σ_r s_r), ties (even M) from tie_bits(seed, step) ;  x ← x·(1 − lr·wd) − lr·v
    m_r ← β2·m_r + (1−β2)·g_r   (each rank with its own gradient)

Hyper-parameters and gradients are dyadic, so the float64 reference is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from signsgd.distributed.launch import spawn
from signsgd.distributed.random_bits import tie_bits

from . import workers as W

STEPS = 6


@pytest.fixture(scope="module")
def suite() -> list[dict[str, Any]]:
    return spawn(W.lion_suite, 4, (STEPS,), timeout=240)


def reference(m: int, steps: int, seed: int = 5) -> tuple[list[list[np.ndarray]], list]:
    lr, (b1, b2), wd = W.LION["lr"], W.LION["betas"], W.LION["weight_decay"]
    x = [p.detach().double().numpy().copy() for p in W.make_params(torch.float64)]
    moms = [[np.zeros_like(t) for t in x] for _ in range(m)]
    traj = []
    for step in range(steps):
        grads = [[g.numpy() for g in W.grads_for([torch.from_numpy(t) for t in x], r, step)]
                 for r in range(m)]
        flat_c = [np.concatenate([(b1 * mr + (1 - b1) * gr).ravel()
                                  for mr, gr in zip(moms[r], grads[r])]) for r in range(m)]
        tally = sum(np.where(c >= 0, 1, -1) for c in flat_c)
        d = tally.size
        ties = np.unpackbits(tie_bits(seed, step, 0, (d + 63) // 64).numpy(),
                             bitorder="little")[:d]
        vote = np.where(tally > 0, 1.0, np.where(tally < 0, -1.0,
                                                  np.where(ties == 1, 1.0, -1.0)))
        off = 0
        for i, t in enumerate(x):
            v = vote[off:off + t.size].reshape(t.shape)
            x[i] = t * (1 - lr * wd) - lr * v
            off += t.size
        for r in range(m):
            moms[r] = [b2 * mr + (1 - b2) * gr for mr, gr in zip(moms[r], grads[r])]
        traj.append([t.copy() for t in x])
    return traj, moms


@pytest.mark.parametrize(("key", "m"), [("lion1", 1), ("lion3", 3), ("lion4", 4)])
def test_distributed_lion_matches_numpy_reference(suite, key, m):
    traj, moms = reference(m, STEPS)
    results = [res[key] for res in suite if key in res]
    assert len(results) == m
    for rank, res in enumerate(results):
        for step in range(STEPS):
            for a, b in zip(res["traj"][step], traj[step]):
                assert np.array_equal(a.numpy(), b), f"rank {rank} step {step}"
        for a, b in zip(res["m"], moms[rank]):  # each rank keeps its own momentum
            assert np.array_equal(a.numpy(), b), f"rank {rank} momentum"
    if m > 1:
        assert not all(np.array_equal(a.numpy(), b.numpy())
                       for a, b in zip(results[0]["m"], results[1]["m"]))


@pytest.mark.parametrize(("key", "m"), [("lion3", 3), ("lion4", 4)])
def test_parameters_identical_on_every_rank(suite, key, m):
    results = [res[key] for res in suite if key in res]
    for res in results[1:]:
        for a, b in zip(res["traj"][-1], results[0]["traj"][-1]):
            assert torch.equal(a, b)


def test_one_rank_is_single_process_lion(suite):
    res = suite[0]["single"]
    assert all(torch.equal(a, b) for a, b in zip(res["voted"], res["plain"]))


def test_checkpoint_resume_is_bit_identical(suite):
    results = [res["ckpt_lion"] for res in suite if "ckpt_lion" in res]
    assert len(results) == 3
    for res in results:
        assert all(torch.equal(a, b) for a, b in zip(res["resumed"], res["uninterrupted"]))
        assert res["step"] == (8, 8) and res["unpickled_group"] is None
