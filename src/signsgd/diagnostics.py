r"""Density diagnostics: is this problem's geometry one where signSGD or SGD should win?

Bernstein et al. (ICML 2018, Section 3.1) compare the signSGD and SGD bounds through the
*density* of three vectors,

.. math::
    \varphi(v) = \frac{\|v\|_1^2}{d\,\|v\|_2^2} \in [1/d,\ 1],

which is 1 for a vector whose entries all have the same magnitude (fully dense) and
``1/d`` for a one-hot vector (fully sparse). The three vectors are

* the full gradient ``g`` (mean gradient over the training set),
* the per-coordinate standard deviation ``σ`` of the per-example gradient (the noise),
* the curvature ``L``, here the magnitude of the Hessian diagonal ``|diag H|`` estimated
  with Hutchinson's method (``E[z ⊙ Hz] = diag H`` for Rademacher ``z``).

How to read the numbers: signSGD's bound pays ``‖L‖₁`` and ``‖σ‖₁`` where SGD's pays
``d·‖L‖∞`` and ``√d·‖σ‖₂``, and it measures progress in ``‖g‖₁`` where SGD measures it in
``√d·‖g‖₂``. So signSGD is *relatively* favoured when the gradient is dense (``φ(g)`` near
1) while noise and curvature are sparse (``φ(σ)``, ``φ(L)`` small): then the ℓ₁ quantities
signSGD pays are small compared with the ℓ₁ progress it makes. When all three are of the
same order, the two methods have bounds of the same order; when the gradient is much
sparser than noise and curvature, prefer SGD (or EF-signSGD). The toy problem of
Bernstein et al. (Figure A.1; ``signsgd reproduce toy``) is the extreme case: dense
gradient, dense curvature (identity) and noise on one coordinate only (``φ(σ) = 1/d``).

Functions:

* :func:`phi` — the density of one vector.
* :class:`Welford` — one-pass, numerically stable per-coordinate mean and variance.
* :func:`hutchinson_diagonal` — Hutchinson estimate of the Hessian diagonal.
* :func:`density` — all three densities of a model on a data loader (used by
  ``signsgd train --density-every N`` and ``signsgd reproduce density``).

Reference: Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed Optimisation
for Non-Convex Problems. ICML 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from signsgd.functional import first_nonfinite

__all__ = ["phi", "phi_linf", "Welford", "hutchinson_diagonal", "density"]


def _flat(v: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach().reshape(-1)
    parts = [t.detach().reshape(-1) for t in v]
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def phi(v: Tensor | Sequence[Tensor]) -> float:
    r"""Density ``φ(v) = ‖v‖₁² / (d·‖v‖₂²)`` of a vector (or of a list of tensors, flattened).

    .. math:: \varphi(v) = \frac{\|v\|_1^2}{d\,\|v\|_2^2}

    Args:
        v: a tensor of any shape, or a sequence of tensors treated as one vector.

    Returns:
        A float in ``[1/d, 1]``: 1 when every entry has the same magnitude, ``1/d`` for a
        one-hot vector.

    Raises:
        ValueError: ``v`` is empty, all zero, or holds NaN / inf.

    Example:
        >>> import torch
        >>> phi(torch.ones(4)), phi(torch.tensor([0.0, 0.0, 3.0, 0.0]))
        (1.0, 0.25)

    Reference: Bernstein et al., ICML 2018, Section 3.1.
    """
    x = _flat(v).double()
    d = x.numel()
    if d == 0:
        raise ValueError("phi of an empty vector is undefined (d = 0)")
    if first_nonfinite([x]) is not None:
        raise ValueError("phi: the vector holds NaN or inf entries")
    l2sq = float((x * x).sum())
    if l2sq == 0.0:
        raise ValueError(f"phi of the zero vector is undefined (d = {d}, ‖v‖₂ = 0)")
    l1 = float(x.abs().sum())
    return min(1.0, l1 * l1 / (d * l2sq))


def phi_linf(v: Tensor | Sequence[Tensor]) -> float:
    r"""Curvature density of the paper, ``‖v‖₁ / (d·‖v‖∞)``, in ``[1/d, 1]``.

    Bernstein et al. measure the curvature vector ``L`` (per-coordinate smoothness) this
    way, since ``L`` enters the SGD bound as ``‖L‖∞`` and the signSGD bound as ``‖L‖₁``.

    Args:
        v: a tensor, or a sequence of tensors treated as one vector.

    Returns:
        ``‖v‖₁ / (d·‖v‖∞)``.

    Raises:
        ValueError: ``v`` is empty, all zero, or holds NaN / inf.

    Example:
        >>> import torch
        >>> phi_linf(torch.tensor([1.0, 1.0, 2.0, 0.0]))
        0.5
    """
    x = _flat(v).double()
    d = x.numel()
    if d == 0:
        raise ValueError("phi_linf of an empty vector is undefined (d = 0)")
    if first_nonfinite([x]) is not None:
        raise ValueError("phi_linf: the vector holds NaN or inf entries")
    top = float(x.abs().max())
    if top == 0.0:
        raise ValueError(f"phi_linf of the zero vector is undefined (d = {d})")
    return float(x.abs().sum()) / (d * top)


class Welford:
    r"""One-pass per-coordinate mean and variance (Welford / Chan et al. batch merge).

    .. math::
        n' = n + b,\quad \delta = \bar x_b - \mu,\quad \mu' = \mu + \delta\,b/n',\quad
        M_2' = M_2 + M_{2,b} + \delta^2\,n\,b/n'

    Works in float64 whatever the input dtype, so a pass over a whole training set does
    not lose precision.

    Args:
        shape: shape of one sample (``()`` or ``(d,)`` or any tensor shape).

    Example:
        >>> import torch
        >>> w = Welford((2,))
        >>> w.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> w.mean, w.variance(ddof=0)
        (tensor([2., 4.], dtype=torch.float64), tensor([1., 4.], dtype=torch.float64))

    Reference: Welford (1962); Chan, Golub, LeVeque (1979) for the batch merge.
    """

    def __init__(self, shape: Sequence[int] | torch.Size = ()) -> None:
        self.shape = torch.Size(shape)
        self.count = 0
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.m2 = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, batch: Tensor) -> None:
        """Add a batch of samples: ``batch`` has shape ``(b, *shape)``."""
        x = batch.detach().to(torch.float64)
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(
                f"Welford: batch of shape {tuple(x.shape)} does not hold samples of shape "
                f"{tuple(self.shape)} (expected (b, *{tuple(self.shape)}))"
            )
        b = x.shape[0]
        if b == 0:
            return
        if x.device != self.mean.device:
            self.mean = self.mean.to(x.device)
            self.m2 = self.m2.to(x.device)
        bmean = x.mean(dim=0)
        bm2 = ((x - bmean) ** 2).sum(dim=0)
        n = self.count
        total = n + b
        delta = bmean - self.mean
        self.mean = self.mean + delta * (b / total)
        self.m2 = self.m2 + bm2 + delta * delta * (n * b / total)
        self.count = total

    def variance(self, ddof: int = 1) -> Tensor:
        """Per-coordinate variance ``M₂ / (n − ddof)`` (``ddof=1``: unbiased)."""
        if self.count - ddof <= 0:
            raise ValueError(
                f"Welford: variance needs more than ddof={ddof} samples, have {self.count}"
            )
        return self.m2 / (self.count - ddof)

    def std(self, ddof: int = 1) -> Tensor:
        """Per-coordinate standard deviation ``√variance(ddof)``."""
        return self.variance(ddof).sqrt()


def hutchinson_diagonal(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    samples: int = 20,
    *,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    r"""Hutchinson estimate of the Hessian diagonal: ``diag H ≈ (1/S) Σ_s z_s ⊙ (H z_s)``.

    .. math:: \mathbb{E}_{z}\,[z \odot H z] = \operatorname{diag} H,
              \quad z_i \in \{-1, +1\} \text{ uniformly}

    Each sample costs one Hessian-vector product (double back-propagation).

    Args:
        loss_fn: returns the scalar loss, built from ``params`` with autograd enabled; called
            once (the graph is reused for every sample).
        params: the tensors to differentiate (``requires_grad=True``).
        samples: number of Rademacher probes ``S`` (>= 1).
        generator: random generator for the probes (default: the global one).

    Returns:
        One tensor per parameter, its estimated Hessian diagonal (same shape).

    Raises:
        ValueError: ``samples < 1``, no parameters, or the loss is not a scalar.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hutchinson_diagonal(lambda: (torch.tensor([3.0, 5.0]) * x ** 2).sum(), [x], 4)
        [tensor([ 6., 10.])]

    Reference: Hutchinson (1990); Bekas, Kokiopoulou, Saad (2007) for the diagonal.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"hutchinson_diagonal: samples must be an int >= 1, got {samples!r}")
    params = list(params)
    if not params:
        raise ValueError("hutchinson_diagonal: no parameters given")
    with torch.enable_grad():
        loss = loss_fn()
        if loss.numel() != 1:
            raise ValueError(
                f"hutchinson_diagonal: loss_fn must return a scalar, got shape {tuple(loss.shape)}"
            )
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        est = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        if not live:
            return [e.to(p.dtype) for e, p in zip(est, params)]
        for s in range(samples):
            zs = [
                (torch.randint(0, 2, params[i].shape, generator=generator)
                 .to(params[i].device, params[i].dtype) * 2 - 1)
                for i, _ in live
            ]
            hvs = torch.autograd.grad(
                [g for _, g in live], [params[i] for i, _ in live], grad_outputs=zs,
                retain_graph=s + 1 < samples, allow_unused=True,
            )
            for (i, _), z, hv in zip(live, zs, hvs):
                if hv is not None:
                    est[i] += (z * hv).double()
    return [(e / samples).to(p.dtype) for e, p in zip(est, params)]


def _per_example_grads(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                       names: list[str], x: Tensor, y: Tensor) -> Tensor | None:
    """Per-example gradients ``(b, d)`` via ``torch.func``; ``None`` if the model can't."""
    try:
        from torch.func import functional_call, grad, vmap
    except ImportError:  # pragma: no cover - torch >= 2.0 has torch.func
        return None
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    try:
        g = vmap(grad(one), in_dims=(None, 0, 0), randomness="same")(params, x, y)
    except Exception:  # noqa: BLE001 - batch norm, in-place ops...: fall back to mini-batches
        return None
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


def density(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    hutchinson_samples: int = 10,
    hutchinson_batches: int = 2,
    per_example: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Densities φ of the full gradient, the gradient noise and the curvature of a model.

    One pass over ``loader`` accumulates, with :class:`Welford`, the per-coordinate mean
    (the full gradient ``g``) and standard deviation (the noise ``σ``) of the per-example
    gradients (computed with ``torch.func.vmap``; models it cannot handle, e.g. batch norm
    in training mode, fall back to the per-batch gradients, and ``noise_unit`` says so: then
    ``σ`` is the std of a mini-batch gradient, which has the same density when batches are
    of equal size). Then Hutchinson's estimate of the Hessian diagonal on the first
    ``hutchinson_batches`` batches gives the curvature ``L = |diag H|``.

    See the module docstring for how to read the numbers: signSGD is relatively favoured
    when ``phi_gradient`` is large while ``phi_noise`` and ``phi_curvature`` are small.

    Args:
        model: the model; its parameters with ``requires_grad`` are measured. It is put in
            eval mode during the measurement and restored after; its parameters and
            ``.grad`` are left untouched.
        loss_fn: ``loss_fn(model(x), y)``, a mean over the batch (e.g. ``F.cross_entropy``).
        loader: iterable of ``(x, y)`` batches.
        max_batches: stop after this many batches (default: the whole loader).
        hutchinson_samples: Rademacher probes per batch for the curvature.
        hutchinson_batches: batches used for the curvature estimate.
        per_example: use per-example gradients for the noise (default) or per-batch ones.
        seed: seed of the Hutchinson probes.

    Returns:
        ``{"phi_gradient", "phi_noise", "phi_curvature", "phi_curvature_linf", "d",
        "examples", "batches", "noise_unit", "grad_norm_l2", "noise_norm_l2",
        "curvature_norm_l2", "sparse_limit"}``: ``sparse_limit = 1/d`` is the density of a
        one-hot vector, the floor of every φ.

    Raises:
        ValueError: the model has no trainable parameters or the loader is empty.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
        >>> out = density(model, torch.nn.functional.cross_entropy, data)
        >>> 1 / out["d"] <= out["phi_gradient"] <= 1
        True

    Reference: Bernstein et al., signSGD, ICML 2018, Section 3.1 and Figure 2.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("density: the model has no parameters with requires_grad=True")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    d = sum(p.numel() for p in params)
    was_training = model.training
    model.eval()
    saved_grads = [None if p.grad is None else p.grad.clone() for p in params]
    welford = Welford((d,))
    batches = 0
    examples = 0
    unit = "example" if per_example else "batch"
    mean_acc = torch.zeros(d, dtype=torch.float64)
    first: list[tuple[Tensor, Tensor]] = []
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            x, y = batch[0], batch[1]
            if len(first) < hutchinson_batches:
                first.append((x, y))
            g = None
            if unit == "example":
                g = _per_example_grads(model, loss_fn, names, x, y)
                if g is None:
                    if welford.count:
                        raise RuntimeError(
                            "density: per-example gradients failed after the first batch"
                        )
                    unit = "batch"
            if g is not None:
                welford.update(g)
                mean_acc += g.double().sum(dim=0)
            else:
                with torch.enable_grad():
                    loss = loss_fn(model(x), y)
                    gs = torch.autograd.grad(loss, params, allow_unused=True)
                flat = torch.cat([
                    (torch.zeros_like(p) if gi is None else gi).reshape(-1)
                    for gi, p in zip(gs, params)
                ]).double()
                welford.update(flat.unsqueeze(0))
                mean_acc += flat * x.shape[0]
            batches += 1
            examples += int(x.shape[0])
        if batches == 0:
            raise ValueError("density: the loader yielded no batches")
        full_grad = mean_acc / examples
        noise = welford.std(ddof=1) if welford.count > 1 else torch.zeros(d, dtype=torch.float64)

        gen = torch.Generator().manual_seed(seed)
        curv = torch.zeros(d, dtype=torch.float64)
        for x, y in first:
            diag = hutchinson_diagonal(lambda x=x, y=y: loss_fn(model(x), y), params,
                                       hutchinson_samples, generator=gen)
            curv += torch.cat([t.reshape(-1) for t in diag]).double()
        curv = (curv / len(first)).abs()
    finally:
        for p, g0 in zip(params, saved_grads):
            p.grad = g0
        model.train(was_training)

    def safe(f: Callable[[Tensor], float], v: Tensor) -> float:
        try:
            return f(v)
        except ValueError:
            return math.nan

    return {
        "phi_gradient": safe(phi, full_grad),
        "phi_noise": safe(phi, noise),
        "phi_curvature": safe(phi, curv),
        "phi_curvature_linf": safe(phi_linf, curv),
        "d": d,
        "examples": examples,
        "batches": batches,
        "noise_unit": unit,
        "grad_norm_l2": float(full_grad.norm()),
        "noise_norm_l2": float(noise.norm()),
        "curvature_norm_l2": float(curv.norm()),
        "sparse_limit": 1.0 / d,
    }
