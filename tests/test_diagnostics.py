"""Density diagnostics: φ on hand-computed vectors, Welford against NumPy, Hutchinson on
quadratics with a known Hessian diagonal, and :func:`density` against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from signsgd.diagnostics import Welford, density, hutchinson_diagonal, phi, phi_linf


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        (torch.ones(7), 1.0),
        (-3.0 * torch.ones(5), 1.0),
        (torch.tensor([0.0, 0.0, 2.5, 0.0]), 1 / 4),
        (torch.eye(10)[3], 1 / 10),
        (torch.tensor([1.0, -1.0, 2.0]), 16 / 18),        # ‖v‖₁ = 4, ‖v‖₂² = 6, d = 3
        (torch.tensor([[3.0, 4.0]]), 49 / 50),            # shape does not matter
        ([torch.tensor([1.0]), torch.tensor([0.0, 0.0, 0.0])], 1 / 4),  # list = one vector
    ],
)
def test_phi_hand_computed(v: torch.Tensor, expected: float) -> None:
    assert phi(v) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("v", "expected"),
    [(torch.ones(3), 1.0), (torch.tensor([1.0, 1.0, 2.0, 0.0]), 0.5), (torch.eye(8)[0], 1 / 8)],
)
def test_phi_linf_hand_computed(v: torch.Tensor, expected: float) -> None:
    assert phi_linf(v) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(torch.zeros(4), "zero vector"), (torch.zeros(0), "empty"),
     (torch.tensor([1.0, math.nan]), "NaN")],
)
def test_phi_rejects_bad_vectors(bad: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        phi(bad)
    with pytest.raises(ValueError):
        phi_linf(bad)


@pytest.mark.parametrize("splits", [[1] * 9, [9], [2, 3, 4], [4, 0, 5], [1, 8]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_welford_matches_numpy(splits: list[int], dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(5.0, 2.0, size=(9, 4, 3)) + 1e3  # a large offset tests stability
    w = Welford((4, 3))
    start = 0
    for s in splits:
        w.update(torch.tensor(data[start:start + s], dtype=dtype))
        start += s
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    ref = data.astype(np.float32).astype(np.float64) if dtype == torch.float32 else data
    assert w.count == 9
    np.testing.assert_allclose(w.mean.numpy(), ref.mean(0), rtol=tol)
    np.testing.assert_allclose(w.variance(ddof=1).numpy(), ref.var(0, ddof=1), rtol=tol)
    np.testing.assert_allclose(w.std(ddof=0).numpy(), ref.std(0), rtol=tol)


def test_welford_errors() -> None:
    w = Welford((3,))
    with pytest.raises(ValueError, match="samples of shape"):
        w.update(torch.zeros(2, 4))
    w.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ddof=1"):
        w.variance(ddof=1)


@pytest.mark.parametrize("samples", [1, 3])
def test_hutchinson_exact_on_diagonal_quadratic(samples: int) -> None:
    # f = Σ a_i x_i² / 2 → H = diag(a); z ⊙ Hz = a exactly for every Rademacher z.
    a = torch.tensor([3.0, -1.0, 0.5, 10.0], dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    (est,) = hutchinson_diagonal(lambda: 0.5 * (a * x * x).sum(), [x], samples,
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, a, rtol=0, atol=1e-12)


def test_hutchinson_converges_on_dense_quadratic() -> None:
    # f = xᵀAx/2 with A dense: each probe is unbiased; 4000 probes average to diag(A).
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = b @ b.T
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)   # shaped parameter
    est = hutchinson_diagonal(lambda: 0.5 * w.reshape(-1) @ a @ w.reshape(-1), [w], 4000,
                              generator=torch.Generator().manual_seed(1))[0]
    off = (a - torch.diag(torch.diag(a))).pow(2).sum(1).sqrt()  # per-probe std of entry i
    err = (est.reshape(-1) - torch.diag(a)).abs()
    assert torch.all(err <= 5 * off / math.sqrt(4000) + 1e-12)


def test_hutchinson_errors() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="samples"):
        hutchinson_diagonal(lambda: (x * x).sum(), [x], 0)
    with pytest.raises(ValueError, match="scalar"):
        hutchinson_diagonal(lambda: x * x, [x], 1)


def _batches(n: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def test_density_matches_direct_computation() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    loader = _batches(24, 8, 0)
    model.weight.grad = torch.full_like(model.weight, 7.0)     # must survive the call
    before = [p.detach().clone() for p in model.parameters()]
    out = density(model, F.cross_entropy, loader, hutchinson_samples=3)
    # Direct: per-example gradients one at a time.
    rows = []
    for x, y in loader:
        for i in range(x.shape[0]):
            gs = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                     list(model.parameters()))
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
    per = torch.stack(rows).numpy()
    assert out["d"] == 18 and out["examples"] == 24 and out["noise_unit"] == "example"
    assert out["phi_gradient"] == pytest.approx(phi(torch.tensor(per.mean(0))), rel=1e-9)
    assert out["phi_noise"] == pytest.approx(phi(torch.tensor(per.std(0, ddof=1))), rel=1e-9)
    assert 1 / 18 <= out["phi_curvature"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 7.0))
    assert model.bias.grad is None


def test_density_per_batch_noise_has_same_full_gradient() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    loader = _batches(24, 8, 2)
    per_ex = density(model, F.cross_entropy, loader, hutchinson_samples=1)
    per_b = density(model, F.cross_entropy, loader, hutchinson_samples=1, per_example=False)
    assert per_b["noise_unit"] == "batch"
    # Equal batches of a mean loss: the mean of batch gradients is the full gradient.
    assert per_b["phi_gradient"] == pytest.approx(per_ex["phi_gradient"], rel=1e-9)
    assert per_b["grad_norm_l2"] == pytest.approx(per_ex["grad_norm_l2"], rel=1e-9)


def test_density_errors() -> None:
    with pytest.raises(ValueError, match="no batches"):
        density(torch.nn.Linear(2, 2), F.cross_entropy, [])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        density(frozen, F.cross_entropy, _batches(4, 2, 0))


def test_docstring_examples_run() -> None:
    import doctest

    import signsgd.diagnostics as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0 and result.attempted >= 5
