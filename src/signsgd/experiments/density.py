r"""The ℓ₁/ℓ₂ geometry that decides between signSGD and SGD, measured during training.

A small CNN trains on Fashion-MNIST with Signum (registry ``"signum"``); every ``every`` steps
:func:`signsgd.diagnostics.density` measures, on a fixed subset of the training set,

* ``φ(g)`` of the full gradient,
* ``φ(σ)`` of the per-coordinate standard deviation of the per-example gradient (one
  Welford pass),
* ``φ(L)`` of the curvature ``|diag H|`` (Hutchinson, Rademacher probes),

with :math:`\varphi(v) = \|v\|_1^2/(d\|v\|_2^2) \in [1/d, 1]`. Reading them: signSGD's
bound beats SGD's when the gradient is dense (φ(g) near 1) relative to the noise and the
curvature; see :mod:`signsgd.diagnostics`.

``--quick`` uses synthetic 28×28 images and a few measurements so it needs no dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from signsgd import registry
from signsgd.data import gaussian_mixture, load
from signsgd.diagnostics import density
from signsgd.experiments._common import pyplot, verdict

PAPER = ("Bernstein et al. 2018, Sec. 3.1 and Fig. 2: measured during training of a deep "
         "network, the gradient and the gradient noise are dense (phi far above the one-hot "
         "floor 1/d), the regime in which signSGD's l1 bounds are competitive with SGD's l2 "
         "bounds.")
KEYS = ("phi_gradient", "phi_noise", "phi_curvature")
DENSE = 0.1


class TinyCNN(nn.Module):
    """conv 5×5 (8) → ReLU → max-pool → conv 5×5 (16) → ReLU → max-pool → linear (10)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 5)
        self.c2 = nn.Conv2d(8, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def _data(quick: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if quick:
        ds = gaussian_mixture(2048, (1, 28, 28), seed=seed, noise=2.0)
        what = "synthetic 28x28 Gaussian-mixture images"
    else:
        ds, what = load("fashion-mnist")[0], "Fashion-MNIST (60,000 training images)"
    x, y = ds.batch(torch.arange(len(ds)))
    return x, y, what


def run_experiment(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train and measure; the verdict asks for dense gradient and noise throughout."""
    steps, every, probe, batch = (60, 20, 256, 64) if quick else (1500, 100, 4096, 64)
    x, y, what = _data(quick, seed)
    g = torch.Generator().manual_seed(seed)
    probe_idx = torch.randperm(x.shape[0], generator=g)[:probe]
    loader = [(x[i], y[i]) for i in probe_idx.split(256)]
    torch.manual_seed(seed)
    model = TinyCNN()
    opt = registry.build("signum", model.parameters(), lr=1e-3, momentum=0.9)
    hist: dict[str, list[float]] = {k: [] for k in ("step", "loss", *KEYS,
                                                    "phi_curvature_linf")}
    d = sum(p.numel() for p in model.parameters())
    for t in range(steps + 1):
        if t % every == 0:
            m = density(model, F.cross_entropy, loader, hutchinson_samples=8,
                        hutchinson_batches=2, seed=seed + t)
            with torch.no_grad():
                loss = float(np.mean([float(F.cross_entropy(model(a), b)) for a, b in loader]))
            hist["step"].append(t)
            hist["loss"].append(loss)
            for k in (*KEYS, "phi_curvature_linf"):
                hist[k].append(m[k])
            unit = m["noise_unit"]
        if t == steps:
            break
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    med = {k: float(np.median(hist[k])) for k in (*KEYS, "phi_curvature_linf")}
    ok = min(hist["phi_gradient"]) > DENSE and min(hist["phi_noise"]) > DENSE
    return {
        "paper": PAPER, "data": what, "model": f"TinyCNN ({d} parameters)", "d": d,
        "sparse_limit": 1.0 / d, "steps": steps, "every": every, "probe_examples": probe,
        "batch": batch, "optimizer": "Signum(lr=1e-3, momentum=0.9)", "noise_unit": unit,
        "history": hist, "median": med,
        "criterion": (f"phi of the full gradient and of the noise std stay above {DENSE} "
                      f"(dense: >= {DENSE * d:.0f}x the one-hot floor 1/d) at every measurement"),
        "verdict": verdict(ok),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """φ of gradient, noise and curvature against training step, with the loss."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    h = result["history"]
    names = {"phi_gradient": "φ(gradient)", "phi_noise": "φ(noise std)",
             "phi_curvature": "φ(|Hessian diagonal|)",
             "phi_curvature_linf": "‖L‖₁/(d‖L‖∞) (curvature)"}
    for k, label in names.items():
        a.plot(h["step"], h[k], "o-", label=label, ms=4)
    a.axhline(result["sparse_limit"], color="grey", ls=":", lw=0.8, label="1/d (one-hot)")
    a.set_yscale("log")
    a.set_ylim(result["sparse_limit"] / 2, 1.5)
    a.set_xlabel("step")
    a.set_ylabel("density φ")
    a.set_title(f"densities during training ({result['model']})")
    a.legend(fontsize=8)
    b.plot(h["step"], h["loss"], "k-")
    b.set_xlabel("step")
    b.set_ylabel("training loss (probe set)")
    b.set_title(result["data"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """Median densities over training."""
    m = result["median"]
    return (f"paper: {result['paper']}\n"
            f"ours ({result['data']}, {result['model']}, 1/d = {result['sparse_limit']:.1e}): "
            f"median over training φ(g) = {m['phi_gradient']:.3f}, φ(σ) = {m['phi_noise']:.3f}, "
            f"φ(|diag H|) = {m['phi_curvature']:.3f}, ‖L‖₁/(d‖L‖∞) = "
            f"{m['phi_curvature_linf']:.3f} (noise per {result['noise_unit']})")
