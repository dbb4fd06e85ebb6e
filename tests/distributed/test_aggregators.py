"""Aggregators on real Gloo groups: Signum + MajorityVote, the two-stage EF all-reduce
against a float64 simulation, Identity-EF vs mean all-reduce SGD, byte formulas and
checkpoints. One launch of 3 ranks runs everything (sub-groups of 1, 2 and 3 ranks)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from signsgd.distributed import AllReduce, ErrorFeedbackAllReduce, MajorityVote
from signsgd.distributed.adversary import Negate, RandomSigns
from signsgd.distributed.vote import HEADER_WORDS, shard_nbytes

from . import workers as W

STEPS = 20


@pytest.fixture(scope="module")
def suite():
    return W.suite_results(STEPS)


def _ranks(suite, key):
    return [res[key] for res in suite if key in res]


def _assert_equal_lists(a, b, msg=""):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{msg} tensor {i}: max diff {(x - y).abs().max()}"


# ------------------------------------------------------------------ float64 simulation
def _chunks(numels, d, c, m):
    bounds, off = [], 0
    for n in numels:
        bounds.append((off, off + n))
        off += n
    return [[(max(a, r * c), min(b, (r + 1) * c, d)) for a, b in bounds
             if max(a, r * c) < min(b, (r + 1) * c, d)] for r in range(m)]


def _scaled_sign(v):
    scale = v.abs().sum() / v.numel()
    return torch.where(v >= 0, 1.0, -1.0).to(v.dtype) * scale


def simulate_ef(m, steps, compressor):
    """Single-process float64 simulation of the two-stage EF all-reduce (class docstring
    of ErrorFeedbackAllReduce): worker errors, per-chunk compression, server errors."""
    x = [p.detach().clone() for p in W.make_params(torch.float64)]
    numels = [t.numel() for t in x]
    d = sum(numels)
    c = 8 * shard_nbytes(d, m)
    chunks = _chunks(numels, d, c, m)
    comp = _scaled_sign if compressor == "scaled_sign" else torch.sign
    errors = [[torch.zeros_like(t) for t in x] for _ in range(m)]
    server = [torch.zeros(c, dtype=torch.float64) for _ in range(m)]
    traj = []
    for step in range(steps):
        sent = []
        for r in range(m):
            grads = W.grads_for(x, r, step, zeros=False)
            p = [e.add(g, alpha=0.25) for e, g in zip(errors[r], grads)]
            if m == 1:
                tx = [(_scaled_sign(v) if compressor == "scaled_sign" else torch.sign(v))
                      for v in p]
                errors[r] = [a - b for a, b in zip(p, tx)]
                sent.append(torch.cat([t.reshape(-1) for t in tx]))
                continue
            flat = torch.zeros(m * c, dtype=torch.float64)
            flat[:d] = torch.cat([t.reshape(-1) for t in p])
            tx = torch.zeros(m * c, dtype=torch.float64)
            for shard in chunks:
                for a, b in shard:
                    tx[a:b] = comp(flat[a:b])
            err = flat[:d] - tx[:d]
            errors[r] = [e.view(t.shape) for e, t in zip(torch.split(err, numels), x)]
            sent.append(tx)
        if m == 1:
            update = sent[0]
        else:
            update = torch.zeros(m * c, dtype=torch.float64)
            for r in range(m):
                q = torch.zeros(c, dtype=torch.float64)
                for w in range(m):
                    q += sent[w][r * c:(r + 1) * c]
                q = q / m + server[r]
                mine = torch.zeros(c, dtype=torch.float64)
                for a, b in chunks[r]:
                    mine[a - r * c:b - r * c] = comp(q[a - r * c:b - r * c])
                server[r] = q - mine
                n_real = sum(b - a for a, b in chunks[r])
                server[r][n_real:] = 0
                update[r * c:(r + 1) * c] = mine
            update = update[:d]
        for t, u in zip(x, torch.split(update, numels)):
            t.sub_(u.view(t.shape))
        traj.append([t.clone() for t in x])
    return traj, errors, server


@pytest.mark.parametrize(
    ("key", "m", "steps", "compressor"),
    [
        ("ef1", 1, 5, "scaled_sign"),
        ("ef2", 2, 5, "scaled_sign"),
        ("ef3", 3, 5, "scaled_sign"),
        ("ef3_sign", 3, 3, "sign"),
    ],
)
def test_ef_allreduce_matches_float64_simulation(suite, key, m, steps, compressor):
    traj, errors, server = simulate_ef(m, steps, compressor)
    results = _ranks(suite, key)
    assert len(results) == m
    for rank, res in enumerate(results):
        for step in range(steps):
            _assert_equal_lists(res["traj"][step], traj[step], f"rank {rank} step {step}")
        _assert_equal_lists(res["errors"], errors[rank], f"rank {rank} worker error")
        if m > 1:
            assert torch.equal(res["server_error"], server[rank]), f"rank {rank} server"
    # the simulation really moved: the update is not trivially zero
    assert not torch.equal(traj[-1][0], W.make_params(torch.float64)[0].detach())


def test_ef_scaled_sign_bytes_equal_formula(suite):
    # d = 185 coordinates (tensors 0..143, 143..180, 180..185), M = 3: C = 64 per shard;
    # shard 2 = [128, 185) meets all three tensors: K = 3 scales of float64 per block.
    d = sum(torch.Size(s).numel() for s in W.SHAPES)
    assert d == 185
    block = 8 * -(-(shard_nbytes(d, 3) + 3 * 8) // 8)
    want = 2 * 2 * block + 2 * 8 * HEADER_WORDS
    for res in _ranks(suite, "ef3"):
        assert res["bytes"] == (want, want)
    for res in _ranks(suite, "ef3_sign"):  # generic path: C floats each way
        want_generic = 2 * 2 * 64 * 8 + 2 * 8 * HEADER_WORDS
        assert res["bytes"] == (want_generic, want_generic)
    for res in _ranks(suite, "ef1"):
        assert res["bytes"] == (0, 0)


def test_identity_ef_equals_mean_allreduce_sgd(suite):
    for rank, res in enumerate(_ranks(suite, "identity3")):
        _assert_equal_lists(res["ef"], res["sgd"], f"rank {rank}")
        ring = 2 * 2 * 62 * 8 + 2 * 8 * HEADER_WORDS  # 2·(M−1)·⌈185/3⌉·8 + header
        assert res["bytes"]["allreduce"] == (ring, ring)
        assert res["bytes"]["ef_identity"] == (ring, ring)


@pytest.mark.parametrize(("key", "m"), [("signum2", 2), ("signum3", 3), ("signsgd3", 3)])
def test_params_bit_identical_on_every_rank_after_20_steps(suite, key, m):
    results = _ranks(suite, key)
    assert len(results) == m
    for res in results[1:]:
        _assert_equal_lists(res["params"], results[0]["params"], key)
    for res in results:
        assert res["step"] == STEPS
    start = W.make_params()
    moved = results[0]["params"]
    for a, b in zip(moved[:3], start):
        assert not torch.equal(a, b.detach())
    # a parameter with a gradient on rank 0 only is updated on every rank alike:
    # vote of (-1 from rank 0, zero -> +1 from the others) then decoupled weight decay
    assert not torch.equal(moved[3], torch.ones(6))
    # a parameter without a gradient anywhere is left alone everywhere (no decay either)
    assert torch.equal(moved[4], torch.full((4,), 2.0))


def test_majority_vote_bytes_in_signum_run(suite):
    from signsgd.distributed.vote import vote_nbytes

    d = 185 + 6 + 4 * 0  # the unused parameter is absent on every rank: not sent
    for key, m, mode in (("signum2", 2, "sharded"), ("signum3", 3, "allgather")):
        for res in _ranks(suite, key):
            # the partial parameter is missing on some ranks: the table round trip adds
            # (M−1)·8·n·width bytes with n = 5 tensors, width = 3 + max ndim (2)
            table = (m - 1) * 8 * 5 * 5
            want = vote_nbytes(d, m, mode)[0] + table
            assert res["bytes"] == (want, want)


def test_single_rank_equals_single_process_with_zero_as_plus_one(suite):
    res = _ranks(suite, "single")[0]
    assert res["zeros_seen"] > 0
    _assert_equal_lists(res["signsgd_vote"], res["signsgd_ref"], "SignSGD M=1")
    _assert_equal_lists(res["signum_vote"], res["signum_plain"], "Signum M=1 without zeros")


@pytest.mark.parametrize(("key", "m", "total"), [("ckpt_signum", 2, 10), ("ckpt_ef", 3, 8)])
def test_checkpoint_resume_equals_uninterrupted(suite, key, m, total):
    results = _ranks(suite, key)
    assert len(results) == m
    for rank, res in enumerate(results):
        _assert_equal_lists(res["resumed"], res["uninterrupted"], f"rank {rank}")
        assert res["step"] == (total, total)
        assert res["unpickled_group"] is None
        assert res["unpickled_step"] > 0


def test_ef_allreduce_with_every_rank_negating_moves_the_other_way(suite):
    results = _ranks(suite, "ef2_negated")
    assert len(results) == 2
    for rank, res in enumerate(results):
        honest, negated = res["honest"], res["negated"]
        assert any(bool(h.abs().sum() > 0) for h in honest)
        _assert_equal_lists(negated, [-h for h in honest], f"rank {rank}")
        # what a Byzantine rank keeps for its own worker error is its honest C(p)
        _assert_equal_lists(res["negated_sent"], res["honest_sent"], f"rank {rank}")


# ------------------------------------------------------------------ single process, no group
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MajorityVote(mode="ring"), "Invalid mode"),
        (lambda: MajorityVote(bucket_bytes=4), "Invalid bucket_bytes: 4"),
        (lambda: MajorityVote(seed=1.5), "Invalid seed: 1.5"),
        (lambda: MajorityVote(adversary="negate"), "adversary must be"),
        (lambda: AllReduce(adversary=3), "adversary must be"),
        (lambda: Negate(scale=-1.0), "Invalid scale: -1.0"),
        (lambda: RandomSigns(seed="x"), "seed must be an int"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    ("agg", "state", "match"),
    [
        (MajorityVote, {}, "needs key 'step'"),
        (MajorityVote, {"step": -1}, "invalid step -1"),
        (MajorityVote, {"step": 2, "server_error": None}, "needs key 'step'"),
        (AllReduce, {"step": "3"}, "invalid step '3'"),
        (ErrorFeedbackAllReduce, {"step": 1, "server_error": [1.0]}, "server_error must be"),
        (ErrorFeedbackAllReduce, {"step": 1, "layout": "x"}, "layout must be a tuple"),
    ],
)
def test_load_state_dict_rejects_bad_state_and_changes_nothing(agg, state, match):
    a = agg()
    before = a.state_dict()
    with pytest.raises(ValueError, match=match):
        a.load_state_dict(state)
    after = a.state_dict()
    assert after.keys() == before.keys() and after["step"] == before["step"] == 0


@pytest.mark.parametrize("agg", [MajorityVote, AllReduce, ErrorFeedbackAllReduce])
def test_pickles_without_group_and_keeps_state(agg):
    a = agg(group=object() if agg is not MajorityVote else None)
    a.step = 5
    b = pickle.loads(pickle.dumps(a))
    assert b.group is None and b.step == 5 and type(b) is agg


@pytest.mark.parametrize(
    ("adversary", "packed", "want"),
    [
        (Negate(), [0b1010_0101] + [0] * 7, [0b0101_1010] + [255] * 7),
        (Negate(scale=3.0), None, None),
    ],
)
def test_negate_flips_every_bit(adversary, packed, want):
    if packed is None:
        got = adversary.corrupt_gradient(torch.tensor([1.0, -2.0, 0.0]), step=0)
        assert got.tolist() == [-3.0, 6.0, -0.0]
        return
    got = adversary.corrupt_signs(torch.tensor(packed, dtype=torch.uint8), step=0)
    assert got.tolist() == want


def test_random_signs_are_reproducible_and_balanced():
    adv = RandomSigns(seed=4)
    a = adv.corrupt_signs(torch.zeros(8000, dtype=torch.uint8), step=2, word_offset=10)
    b = RandomSigns(seed=4).corrupt_signs(torch.ones(8000, dtype=torch.uint8), step=2,
                                          word_offset=10)
    assert torch.equal(a, b)
    assert not torch.equal(a, adv.corrupt_signs(a, step=3, word_offset=10))
    ones = int(torch.tensor(np.unpackbits(a.numpy())).sum())
    assert 0.48 < ones / 64000 < 0.52
    g = adv.corrupt_gradient(torch.full((10_000,), -2.0), step=0)
    assert torch.equal(g.abs(), torch.full((10_000,), 2.0))
    assert 0.45 < float((g > 0).double().mean()) < 0.55


def test_the_ef_reducer_chooses_its_wire_codec_once_per_compressor():
    from signsgd.compression import ScaledSign, TopK
    from signsgd.distributed import ErrorFeedbackAllReduce

    ef, sign, topk = ErrorFeedbackAllReduce(), ScaledSign(), TopK(0.5)
    ef.reduce([torch.tensor([1.0, -3.0])], compressor=sign)
    first = ef.codec[1]
    ef.reduce([torch.tensor([2.0, -1.0])], compressor=sign)
    assert ef.codec[1] is first and first.name == "scaled_sign_bits"
    ef.reduce([torch.tensor([2.0, -1.0])], compressor=topk)
    assert ef.codec[0] is topk and ef.codec[1].name == "values"
