"""majority_vote / vote_async / MajorityVote against a numpy majority, on real Gloo groups.

One launch per world size M = 1, 2, 3, 4 runs every case; the parent recomputes the vote
with numpy (zero -> +1, ties from ``tie_bits(seed, step)``, 0 on a zero chunk that is zero
on every rank) and checks each rank's result. One more launch of 3 ranks checks float64
trajectories of the optimisers and the DDP hook where tensors and chunks are zero on every
rank (they stay exactly still; the rest moves as with zero -> +1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from signsgd.distributed.launch import spawn
from signsgd.distributed.vote import (
    HEADER_WORDS,
    ZERO_CHUNK,
    activity_words,
    majority_vote,
    segment_lengths,
    shard_nbytes,
    tie_bits,
    vote_nbytes,
    zero_chunks,
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


def still_mask(x: np.ndarray, lengths: tuple[int, ...], bucket: int) -> np.ndarray:
    """Coordinates whose zero chunk (:func:`zero_chunks` of each bucket) is zero on every
    rank of ``x`` ``(M, d)``."""
    d = x.shape[1]
    still = np.zeros(d, dtype=bool)
    for start in range(0, d, bucket):
        end, clipped, off = min(start + bucket, d), [], 0
        for n in lengths:
            lo, hi = max(off, start), min(off + n, end)
            if lo < hi:
                clipped.append(hi - lo)
            off += n
        for s, n, c, _ in zero_chunks(tuple(clipped)):
            for a in range(start + s, start + s + n, c):
                b = min(a + c, start + s + n)
                still[a:b] = not x[:, a:b].any()
    return still


def expected_vote(world_size: int, case: tuple, key: str = "votes") -> np.ndarray:
    numel, dtype, _, seed, step, data_seed = case
    x = W.case_inputs(world_size, numel, dtype, data_seed).double().numpy()
    votes = np.where(x >= 0, 1, -1).sum(axis=0)
    words = (numel + 63) // 64
    ties = np.unpackbits(tie_bits(seed, step, 0, words).numpy(), bitorder="little")[:numel]
    want = np.where(votes > 0, 1, np.where(votes < 0, -1, np.where(ties == 1, 1, -1)))
    layout = ((numel // 3, numel - numel // 3), 512) if key == "buckets" else ((numel,), 1 << 62)
    return np.where(still_mask(x, *layout), 0, want)
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
    for rank, res in enumerate(results):
        for key in ("votes", "async", "buckets"):
            want = expected_vote(m, case, key)
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
    [  # W = ⌈d/64⌉ sign words + ⌈d/4096⌉ + 1 activity words; S = 8·⌈W/M⌉
        (0, 4, "sharded", 0),
        (1, 1, "sharded", 0),
        (1_000_000, 1, "allgather", 0),
        (1, 2, "sharded", 2 * 1 * 16),                     # W = 1 + 2
        (1_000_000, 4, "sharded", 2 * 3 * 31_744),         # W = 15 625 + 246
        (1_000_000, 4, "allgather", 3 * 8 * 15_871),
        (25_000_000, 4, "sharded", 2 * 3 * 793_464),       # W = 390 625 + 6 105
        (100, 3, "allgather", 2 * 8 * 4),                  # W = 2 + 2
    ],
)
def test_vote_nbytes_formula(numel, m, mode, want):
    header = 0 if m == 1 else (m - 1) * 8 * HEADER_WORDS
    assert vote_nbytes(numel, m, mode, header=False) == (want, want)
    assert vote_nbytes(numel, m, mode) == (want + header, want + header)


@pytest.mark.parametrize(("numel", "m"), [(1_000_000, 4), (25_000_000, 4), (1 << 20, 2)])
def test_bits_per_coordinate_each_way_at_most_one(numel, m):
    # each leg (signs and activity bits out, verdicts back) carries (M-1)·S bytes, S the
    # vote's shard: <= 1.05 bits per coordinate; the signs alone are shard_nbytes
    leg = vote_nbytes(numel, m, header=False)[0] // 2
    assert leg * 8 / numel <= 1.05
    assert leg >= (m - 1) * shard_nbytes(numel, m)


@pytest.mark.parametrize(
    ("lengths", "want"),
    [
        ((), ()),
        ((0, 0), ()),
        ((1,), ((0, 1, 1, 0),)),
        ((600, 0, 10), ((0, 600, 64, 0), (600, 10, 10, 10))),
        # rows of 2^k coordinates stay whole chunks, wherever their tensor starts
        ((1000, 4096), ((0, 1000, 64, 0), (1000, 4096, 64, 16))),
        ((16_385,), ((0, 16_385, 64, 0),)),
        # 100 tensors of 65: 200 chunks of 64 do not fit in 192 bits (d = 6 500), so the
        # chunk doubles to 128, one chunk per tensor
        ((65,) * 100, tuple((65 * i, 65, 65, i) for i in range(100))),
        # more tensors (200) than bits (128): runs of 2 tensors share a chunk
        ((1,) * 200, tuple((2 * b, 2, 2, b) for b in range(100))),
    ],
)
def test_zero_chunks_table(lengths, want):
    runs = zero_chunks(lengths)
    assert runs == want
    d = sum(lengths)
    covered = [i for s, n, _, _ in runs for i in range(s, s + n)]
    assert covered == list(range(d))  # a partition of [0, d)
    bits = sum(-(-n // c) for _, n, c, _ in runs)
    assert bits <= 64 * activity_words(d) and all(c >= min(n, ZERO_CHUNK)
                                                   for _, n, c, _ in runs)


@pytest.mark.parametrize(
    ("views", "want"),
    [
        (lambda b: [b[2:5], b[6:10]], (2, 3, 1, 4)),
        (lambda b: [b[6:10], b[0:6]], (6, 4)),
        (lambda b: [b[0:6], b[4:8]], (10,)),      # overlapping: one tensor
        (lambda b: [b[::2]], (10,)),              # not a slice: one tensor
        (lambda b: [], (10,)),
    ],
)
def test_segment_lengths(views, want):
    b = torch.zeros(10)
    assert segment_lengths(b, views(b)) == want


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
        ([0.0, -0.0, 0.0], [0, 0, 0]),  # zero everywhere: still, as sign(0) = 0
    ],
)
def test_single_process_without_group_is_sign_with_zero_plus_one(values, want):
    t = torch.tensor(values, dtype=torch.float64)
    got = majority_vote(t.view(1, 3), step=0)
    assert got.dtype == torch.float64 and got.shape == (1, 3)
    np.testing.assert_array_equal(got.reshape(-1).numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16, torch.int32])
def test_single_process_zero_chunks_get_plus_zero_in_every_dtype(dtype):
    # chunks [0, 64), [64, 128), [128, 192), [192, 200): only the second holds a non-zero
    t = torch.zeros(200, dtype=dtype)
    t[100] = -3
    got = majority_vote(t, step=0)
    want = torch.zeros(200, dtype=dtype)
    want[64:128] = 1
    want[100] = -1
    assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.signbit(got).logical_and(got == 0).any()  # +0, not -0


@pytest.mark.parametrize("still_runs", [3, 2100])  # few runs are filled, many are masked
def test_single_process_many_still_chunks(still_runs):
    chunks = 2 * still_runs
    t = torch.randn(chunks, 64, generator=torch.Generator().manual_seed(1))
    t[::2] = 0.0  # every other chunk zero
    t[1::2, 5] = 0.0  # a zero inside a moving chunk counts as +1
    got = majority_vote(t.reshape(-1), step=0).view(chunks, 64)
    want = torch.where(t >= 0, 1.0, -1.0)
    want[::2] = 0.0
    assert torch.equal(got, want) and not torch.signbit(got[::2]).any()


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


# ------------------------------------------------------------------ zero chunks: trajectories
ZERO_STEPS = 6


def reference_trajectory(m: int, beta: float, zeros_still: bool) -> list[list[torch.Tensor]]:
    """Signum (lr 1/8, float64) with a majority vote of ``m`` ranks fed ``W.zero_grads``:
    zero -> +1, ties from ``tie_bits(3, step)`` over the flat layout, and, with
    ``zeros_still``, 0 on each ``ZERO_CHUNK``-coordinate chunk of a tensor (the chunk
    :func:`zero_chunks` gives this layout) that is zero on every rank."""
    params = [p.detach().clone() for p in W.zero_params()]
    bufs = [[torch.zeros_like(p) for p in params] for _ in range(m)]
    lengths = [p.numel() for p in params]
    d = sum(lengths)
    traj = []
    for step in range(ZERO_STEPS):
        dirs = []
        for r in range(m):
            gs = W.zero_grads(r, step)
            if beta:
                bufs[r] = [torch.lerp(b, g, 1.0 - beta) for b, g in zip(bufs[r], gs)]
                gs = bufs[r]
            dirs.append(torch.cat([g.reshape(-1) for g in gs]).numpy())
        x = np.stack(dirs)
        votes = np.where(x >= 0, 1, -1).sum(axis=0)
        ties = np.unpackbits(tie_bits(3, step, 0, (d + 63) // 64).numpy(),
                             bitorder="little")[:d]
        v = np.where(votes > 0, 1.0, np.where(votes < 0, -1.0, np.where(ties == 1, 1.0, -1.0)))
        if zeros_still:
            off = 0
            for n in lengths:
                for a in range(off, off + n, ZERO_CHUNK):
                    b = min(a + ZERO_CHUNK, off + n)
                    if not x[:, a:b].any():
                        v[a:b] = 0.0
                off += n
        off = 0
        for p, n in zip(params, lengths):
            p.add_(torch.from_numpy(v[off:off + n]).view_as(p), alpha=-0.125)
            off += n
        traj.append([p.clone() for p in params])
    return traj


@pytest.fixture(scope="module")
def zero_runs():
    return spawn(W.zero_chunk_trajectories, 3, (ZERO_STEPS,), timeout=180)


def _still(params: list[torch.Tensor], start: list[torch.Tensor]) -> bool:
    """Tensor 1, and tensor 2's first chunk, equal their start exactly."""
    return torch.equal(params[1], start[1]) and torch.equal(params[2][:256], start[2][:256])


@pytest.mark.parametrize("m", [1, 2, 3], ids=lambda m: f"M{m}")
@pytest.mark.parametrize(("case", "beta"), [("signsgd", 0.0), ("signum", 0.9)])
def test_zero_everywhere_stays_still_and_the_rest_moves_as_before(zero_runs, m, case, beta):
    start = [p.detach() for p in W.zero_params()]
    want = reference_trajectory(m, beta, zeros_still=True)
    before = reference_trajectory(m, beta, zeros_still=False)  # zero -> +1 everywhere
    for rank in range(m):
        got = zero_runs[rank][m][case]
        for step in range(ZERO_STEPS):
            for i, (g, w) in enumerate(zip(got[step], want[step])):
                assert torch.equal(g, w), (rank, step, i)
            assert _still(got[step], start)
    assert zero_chunks(tuple(p.numel() for p in start))[2][2] == ZERO_CHUNK
    # what does not stay still moves exactly as under zero -> +1: tensors 0 and 3 (zero
    # on rank 0 only, so zero everywhere for M = 1) and tensor 2 after its first chunk
    last, old = want[-1], before[-1]
    assert torch.equal(last[0], old[0]) and torch.equal(last[2][256:], old[2][256:])
    assert torch.equal(last[3], old[3] if m > 1 else start[3])
    assert not torch.equal(last[0], start[0]) and not torch.equal(old[3], start[3])
    assert not torch.equal(old[1], start[1])  # zero -> +1 would have moved tensor 1


@pytest.mark.parametrize("m", [1, 2, 3], ids=lambda m: f"M{m}")
def test_ddp_hook_keeps_zero_everywhere_still(zero_runs, m):
    start = [p.detach() for p in W.zero_params()]
    runs = [zero_runs[rank][m]["hook"] for rank in range(m)]
    for traj in runs:
        assert all(_still(step, start) for step in traj)
        assert all(torch.equal(a, b) for a, b in zip(traj[-1], runs[0][-1]))
    assert not torch.equal(runs[0][-1][0], start[0])
    if m % 2:  # no ties: the hook's buckets vote as the optimiser's flat buffer does
        for a, b in zip(runs[0][-1], zero_runs[0][m]["signsgd"][-1]):
            assert torch.equal(a, b)
