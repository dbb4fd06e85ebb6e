"""majority_vote / vote_async / MajorityVote against a numpy majority, on real Gloo groups.

One launch per world size M = 1, 2, 3, 4 runs every case; the parent recomputes the vote
with numpy (zero -> +1, ties from ``tie_bits(seed, step)``) and checks each rank's result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from signsgd.distributed.launch import spawn
from signsgd.distributed.vote import (
    HEADER_WORDS,
    majority_vote,
    shard_nbytes,
    tie_bits,
    vote_nbytes,
)

from . import workers as W

NUMELS = [0, 1, 7, 64, 1001, 4099]
CASES = [
    (n, dtype, mode, seed, step, 100 + n)
    for n in NUMELS
    for mode in ("sharded", "allgather")
    for dtype, seed, step in ((torch.float32, 0, 0), (torch.float64, 5, 9))
] + [(20_000, torch.float32, mode, 1, 3, 77) for mode in ("sharded", "allgather")] + [
    (333, dtype, "sharded", 2, 1, 5) for dtype in (torch.float16, torch.bfloat16, torch.int32)
]
CASE_IDS = [f"n{c[0]}-{c[2]}-{str(c[1])[6:]}-s{c[4]}-{i}" for i, c in enumerate(CASES)]


def expected_vote(world_size: int, case: tuple) -> np.ndarray:
    numel, dtype, _, seed, step, data_seed = case
    x = W.case_inputs(world_size, numel, dtype, data_seed).double().numpy()
    votes = np.where(x >= 0, 1, -1).sum(axis=0)
    words = (numel + 63) // 64
    ties = np.unpackbits(tie_bits(seed, step, 0, words).numpy(), bitorder="little")[:numel]
    return np.where(votes > 0, 1, np.where(votes < 0, -1, np.where(ties == 1, 1, -1)))


def bucket_bytes(world_size: int, numel: int, mode: str) -> int:
    """Bytes of MajorityVote(bucket_bytes=64): header + each 512-coordinate bucket."""
    if world_size == 1:
        return 0
    total = (world_size - 1) * 8 * HEADER_WORDS
    for start in range(0, numel, 512):
        total += vote_nbytes(min(512, numel - start), world_size, mode, header=False)[0]
    return total


@pytest.fixture(scope="module")
def per_rank():
    """One launch of 4 ranks; sub-groups of 1, 2, 3 and 4 ranks vote every case."""
    return spawn(W.vote_cases, 4, (CASES,), timeout=180)


@pytest.fixture(scope="module")
def launch(per_rank):
    return {m: [per_rank[r][m] for r in range(m)] for m in (1, 2, 3, 4)}


def test_a_rank_outside_the_group_gets_a_clear_error(per_rank):
    # rank 3 belongs to no sub-group but the full one: 3 clear errors, no hang
    errors = per_rank[3]["non_member"]
    assert len(errors) == 3
    for e in errors:
        assert e.startswith("ValueError:") and "not a member of the process group" in e
    assert "non_member" not in per_rank[0]


@pytest.fixture(params=[1, 2, 3, 4], ids=lambda m: f"M{m}")
def run(request, launch):
    return request.param, launch[request.param]


@pytest.mark.parametrize("i", range(len(CASES)), ids=CASE_IDS)
def test_vote_matches_numpy_majority(run, i):
    m, results = run
    case = CASES[i]
    want = expected_vote(m, case)
    for rank, res in enumerate(results):
        for key in ("votes", "async", "buckets"):
            got = res[key][i]
            assert got.dtype == case[1], (rank, key)
            np.testing.assert_array_equal(got.double().numpy(), want, err_msg=f"rank {rank} {key}")


@pytest.mark.parametrize("i", range(len(CASES)), ids=CASE_IDS)
def test_majority_vote_aggregator_bytes_equal_formula(run, i):
    m, results = run
    numel, _, mode, _, step, _ = CASES[i]
    for res in results:
        sent, received, agg_step = res["counted"][i]
        assert sent == received == bucket_bytes(m, numel, mode)
        assert agg_step == step + 1


def test_ties_identical_on_every_rank_and_about_half_positive(run):
    m, results = run
    i = CASES.index((20_000, torch.float32, "sharded", 1, 3, 77))
    x = W.case_inputs(m, 20_000, torch.float32, 77).numpy()
    tied = np.where(x >= 0, 1, -1).sum(axis=0) == 0
    first = results[0]["votes"][i].numpy()
    for res in results[1:]:
        np.testing.assert_array_equal(res["votes"][i].numpy(), first)
    if m % 2:
        assert not tied.any()
        pytest.skip(f"odd M = {m} has no ties")
    # 20 000 coordinates, P(tie) = 0.48 (M=2) or 0.35 (M=4): thousands of ties; a fair
    # coin stays within 0.45..0.55 with probability > 1 - 1e-9.
    assert tied.sum() > 3000
    assert 0.45 < (first[tied] > 0).mean() < 0.55


@pytest.mark.parametrize(
    ("numel", "m", "mode", "want"),
    [
        (0, 4, "sharded", 0),
        (1, 1, "sharded", 0),
        (1_000_000, 1, "allgather", 0),
        (1, 2, "sharded", 2 * 1 * 8),
        (1_000_000, 4, "sharded", 2 * 3 * 31_256),
        (1_000_000, 4, "allgather", 3 * 125_000),
        (25_000_000, 4, "sharded", 2 * 3 * 781_256),
        (100, 3, "allgather", 2 * 16),
    ],
)
def test_vote_nbytes_formula(numel, m, mode, want):
    header = 0 if m == 1 else (m - 1) * 8 * HEADER_WORDS
    assert vote_nbytes(numel, m, mode, header=False) == (want, want)
    assert vote_nbytes(numel, m, mode) == (want + header, want + header)


@pytest.mark.parametrize(("numel", "m"), [(1_000_000, 4), (25_000_000, 4), (1 << 20, 2)])
def test_bits_per_coordinate_each_way_at_most_one(numel, m):
    # each leg (signs out, verdicts back) carries (M-1)·S bytes <= 1.05 bits per coordinate
    leg = (m - 1) * shard_nbytes(numel, m)
    assert leg * 8 / numel <= 1.05


@pytest.mark.parametrize(("start", "n"), [(0, 1), (3, 5), (1000, 64)])
def test_tie_bits_slices_are_consistent(start, n):
    whole = tie_bits(11, 4, 0, start + n)
    np.testing.assert_array_equal(tie_bits(11, 4, start, n).numpy(), whole[8 * start:].numpy())
    assert not torch.equal(tie_bits(11, 5, start, n), tie_bits(11, 4, start, n))


@pytest.mark.parametrize(
    ("values", "want"),
    [
        ([0.0, -0.0, -1e-30], [1, 1, -1]),
        ([2.0, -3.0, 5.0], [1, -1, 1]),
    ],
)
def test_single_process_without_group_is_sign_with_zero_plus_one(values, want):
    t = torch.tensor(values, dtype=torch.float64)
    got = majority_vote(t.view(1, 3), step=0)
    assert got.dtype == torch.float64 and got.shape == (1, 3)
    np.testing.assert_array_equal(got.reshape(-1).numpy(), want)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_single_process_non_finite_raises(bad):
    from signsgd.errors import NonFiniteGradientError

    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        majority_vote(torch.tensor([1.0, bad]), step=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "ring"}, "mode must be one of"), ({"seed": 1.5}, "seed must be an int")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        majority_vote(torch.ones(3), step=0, **kwargs)
