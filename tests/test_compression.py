"""Compressors: exact outputs, the δ-approximation bound on random inputs, validation."""

from __future__ import annotations

import copy
import math
import pickle
import re

import pytest
import torch

from signsgd.compression import Identity, RandomK, ScaledSign, Sign, TopK

D = torch.float64


@pytest.mark.parametrize("comp,v,expected", [
    (Identity(), [0.5, -2.0, 0.0], [0.5, -2.0, 0.0]),
    (Sign(), [0.1, 0.0, -3.0, -0.0], [1.0, 0.0, -1.0, 0.0]),
    # ‖v‖₁ / d = (1 + 3) / 2 = 2
    (ScaledSign(), [1.0, -3.0], [2.0, -2.0]),
    # (0.5 + 0 + 0.25 + 1.25) / 4 = 0.5; sign(0) = 0
    (ScaledSign(), [0.5, 0.0, -0.25, 1.25], [0.5, 0.0, -0.5, 0.5]),
    (ScaledSign(), [], []),
    # k = ceil(0.5·4) = 2 largest magnitudes
    (TopK(0.5), [1.0, -4.0, 2.0, 0.5], [0.0, -4.0, 2.0, 0.0]),
    # k = ceil(0.25·5) = 2
    (TopK(0.25), [3.0, 0.25, -0.5, -8.0, 1.0], [3.0, 0.0, 0.0, -8.0, 0.0]),
    # tiny ratio keeps at least one entry
    (TopK(1e-6), [1.0, -2.0, 0.5], [0.0, -2.0, 0.0]),
    (TopK(1.0), [1.0, -2.0, 0.5], [1.0, -2.0, 0.5]),
    (TopK(0.5), [], []),
    (RandomK(1.0), [1.0, -2.0, 0.5], [1.0, -2.0, 0.5]),
])
def test_exact_outputs(comp, v, expected):
    x = torch.tensor(v, dtype=D)
    before = x.clone()
    out = comp(x)
    assert out.dtype == D and out.shape == x.shape
    assert out.tolist() == expected
    assert torch.equal(x, before)  # input untouched
    assert out.data_ptr() != x.data_ptr() or x.numel() == 0


def test_randomk_keeps_k_entries_chosen_by_its_seeded_generator():
    v = torch.arange(1.0, 11.0, dtype=D)
    comp = RandomK(0.3, seed=4)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        keep = torch.randperm(10, generator=gen)[:3]
        expected = torch.zeros(10, dtype=D)
        expected[keep] = v[keep]
        assert torch.equal(comp(v), expected)


def test_randomk_same_seed_same_draws_and_state_roundtrip():
    a, b = RandomK(0.5, seed=3), RandomK(0.5, seed=3)
    v = torch.randn(50, dtype=D)
    assert torch.equal(a(v), b(v))
    state = a.state_dict()
    first = a(v)
    a(v)
    a.load_state_dict(copy.deepcopy(state))
    assert torch.equal(a(v), first)
    assert torch.equal(pickle.loads(pickle.dumps(b))(v), first)
    with pytest.raises(ValueError, match="RandomK state"):
        a.load_state_dict({"generator": "nope"})


@pytest.mark.parametrize("shape", [(4, 3), (2, 1, 5)])
@pytest.mark.parametrize("comp", [Identity(), Sign(), ScaledSign(), TopK(0.3), RandomK(0.3)],
                         ids=repr)
def test_shape_dtype_preserved(comp, shape):
    for dtype in (torch.float32, torch.float64):
        v = torch.randn(shape, dtype=dtype)
        out = comp(v)
        assert out.shape == v.shape and out.dtype == dtype


def _sq(x):
    return float((x * x).sum())


DELTA_CASES = [Identity(), ScaledSign(), TopK(0.1), TopK(0.5), TopK(0.9)]


@pytest.mark.parametrize("comp", DELTA_CASES, ids=repr)
@pytest.mark.parametrize("d", [1, 2, 7, 100, 1000])
def test_delta_bound_on_random_inputs(comp, d):
    gen = torch.Generator().manual_seed(d)
    delta = comp.delta(d)
    assert 0 < delta <= 1
    for trial in range(20):
        v = torch.randn(d, generator=gen, dtype=D)
        if trial % 4 == 1:  # sparse inputs: the hard case for ScaledSign
            v = v * (torch.rand(d, generator=gen, dtype=D) < 0.1)
        if trial % 4 == 2:  # heavy tails
            v = v ** 5
        err = _sq(comp(v) - v)
        assert err <= (1 - delta) * _sq(v) * (1 + 1e-12) + 1e-300


def test_scaled_sign_error_and_density():
    # No zero entries: ‖C(v) − v‖² = (1 − φ(v))·‖v‖² with φ(v) = ‖v‖₁² / (d·‖v‖₂²).
    v = torch.tensor([1.0, -3.0, 0.5, 0.5], dtype=D)  # ‖v‖₁ = 5, ‖v‖₂² = 10.5, d = 4
    phi = 25.0 / (4 * 10.5)
    assert _sq(ScaledSign()(v) - v) == pytest.approx((1 - phi) * 10.5, rel=1e-15)
    # With zeros (sign(0) = 0) the error is smaller: v = [2, 0, 0, 0], C(v) = [0.5, 0, 0, 0],
    # error 1.5² = 2.25 ≤ (1 − φ)·‖v‖² = (1 − 1/4)·4 = 3, and φ = 1/d is the worst case δ.
    e1 = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=D)
    assert _sq(ScaledSign()(e1) - e1) == 2.25
    assert 2.25 <= (1 - ScaledSign().delta(4)) * _sq(e1) == 3.0


@pytest.mark.parametrize("ratio,d", [(0.1, 50), (0.5, 10), (0.25, 7)])
def test_randomk_delta_in_expectation_and_per_draw(ratio, d):
    comp = RandomK(ratio, seed=1)
    v = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=D)
    k = math.ceil(ratio * d)
    assert comp.delta(d) == k / d
    draws = 4000
    total = 0.0
    for _ in range(draws):
        err = _sq(comp(v) - v)
        assert err <= _sq(v)  # every draw: ‖C(v) − v‖² ≤ ‖v‖²
        total += err
    mean = total / draws
    # E‖C(v) − v‖² = (1 − k/d)·‖v‖²; the sample mean is within 5 standard errors.
    expected = (1 - k / d) * _sq(v)
    per_coord = (v * v)
    var = float(((per_coord - per_coord.mean()) ** 2).sum()) * (k / d) * (1 - k / d)
    assert abs(mean - expected) <= 5 * math.sqrt(var / draws) + 1e-12


def test_sign_is_not_delta_approximate():
    # v = [0.1]: ‖sign(v) − v‖² = 0.81 > ‖v‖² = 0.01, so no δ > 0 (not even δ = 0) works.
    v = torch.tensor([0.1], dtype=D)
    assert _sq(Sign()(v) - v) > _sq(v)
    assert Sign().delta(1) is None


@pytest.mark.parametrize("cls", [TopK, RandomK])
@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_ratio_raises_naming_it(cls, ratio):
    shown = repr(ratio) if isinstance(ratio, str) else str(ratio)
    with pytest.raises(ValueError, match="Invalid ratio: " + re.escape(shown)):
        cls(ratio)


def test_bad_seed():
    with pytest.raises(TypeError, match="seed must be an int"):
        RandomK(0.5, seed=1.5)


def test_reprs():
    assert repr(TopK(0.25)) == "TopK(ratio=0.25)"
    assert repr(RandomK(0.5, seed=2)) == "RandomK(ratio=0.5, seed=2)"
    assert repr(ScaledSign()) == "ScaledSign()"
