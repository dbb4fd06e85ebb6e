r"""Bernstein et al. 2018, Figure A.1: sparse noise, dense gradient — signSGD beats SGD.

Problem: :math:`f(x) = \tfrac12\|x\|_2^2`, :math:`x\in\mathbb{R}^{100}`,
:math:`x_0\sim N(0, I)`; the stochastic gradient is :math:`x + \xi` where only
:math:`\xi_0 \sim N(0, 100^2)` and every other coordinate is exact. The noise is as sparse
as it can be (:math:`\varphi(\sigma) = 1/d`) while gradient and curvature (the identity) are
dense, the regime where signSGD's ℓ₁ bound beats SGD's ℓ₂ bound.

Thousands of tiny runs are needed (2 methods × 11 learning rates × 50 repeats × 10,000
steps), so the update rules are vectorised in float64 NumPy: :func:`step` applies exactly
``torch.optim.SGD`` (``x ← x − lr·g``) and :class:`signsgd.SignSGD` (``x ← x − lr·sign(g)``,
``sign(0) = 0``); ``tests/test_experiments.py`` checks it against both optimisers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from signsgd.experiments._common import pyplot, verdict

PAPER = ("Bernstein et al. 2018, Fig. A.1: on f(x)=||x||²/2 in R^100 with N(0,100²) noise on "
         "one coordinate only, signSGD (lr 0.01) ends far below SGD (lr 0.001) after 10,000 "
         "steps (the two learning rates are the paper's choice for each method).")
PAPER_LR = {"sgd": 1e-3, "signsgd": 1e-2}
METHODS = ("sgd", "signsgd")


def step(method: str, x: np.ndarray, g: np.ndarray, lr: np.ndarray | float) -> np.ndarray:
    """One update of ``method`` (``"sgd"`` or ``"signsgd"``) on ``x`` with gradient ``g``.

    ``lr`` broadcasts against ``x`` (one learning rate per leading row in the sweep).
    Returns the new ``x`` (float64).
    """
    if method == "sgd":
        return x - lr * g
    if method == "signsgd":
        return x - lr * np.sign(g)
    raise ValueError(f"unknown method {method!r}; use 'sgd' or 'signsgd'")


def simulate(method: str, lrs: np.ndarray, *, repeats: int, steps: int, d: int = 100,
             sigma: float = 100.0, seed: int = 0, record: int = 100) -> np.ndarray:
    """Loss ``f(x_t) = ||x_t||²/2`` every ``steps/record`` steps: shape ``(L, repeats, record+1)``.

    The same ``x_0`` and noise stream are used for every learning rate (common random
    numbers), so the sweep compares learning rates, not luck.
    """
    rng = np.random.default_rng(seed)
    lr = np.asarray(lrs, dtype=np.float64).reshape(-1, 1, 1)
    x0 = rng.standard_normal((1, repeats, d))
    x = np.repeat(x0, lr.shape[0], axis=0)
    every = max(1, steps // record)
    losses = [0.5 * (x * x).sum(-1)]
    for t in range(1, steps + 1):
        g = x.copy()
        g[:, :, 0] += sigma * rng.standard_normal((1, repeats))
        x = step(method, x, g, lr)
        if t % every == 0:
            losses.append(0.5 * (x * x).sum(-1))
    return np.stack(losses, axis=-1)


def run_experiment(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the sweep and the paper's two learning rates; return numbers and verdict."""
    steps, repeats = (2000, 10) if quick else (10_000, 50)
    sweep = np.logspace(-5, 0, 11)
    res: dict[str, Any] = {"paper": PAPER, "steps": steps, "repeats": repeats, "d": 100,
                           "sigma": 100.0, "implementation": "vectorised float64 NumPy "
                           "(checked against torch.optim.SGD and signsgd.SignSGD in tests)"}
    sweep_final: dict[str, list[float]] = {}
    curves: dict[str, Any] = {}
    for m in METHODS:
        lrs = np.concatenate([sweep, [PAPER_LR[m]]])
        loss = simulate(m, lrs, repeats=repeats, steps=steps, seed=seed)
        final = loss[:, :, -1]
        sweep_final[m] = final[:-1].mean(axis=1).tolist()
        paper = loss[-1]
        curves[m] = {"lr": PAPER_LR[m], "mean": paper.mean(0).tolist(),
                     "std": paper.std(0).tolist(), "final_mean": float(final[-1].mean()),
                     "final_std": float(final[-1].std())}
        best = int(np.nanargmin(final[:-1].mean(axis=1)))
        curves[m]["best_lr"] = float(sweep[best])
        curves[m]["best_final_mean"] = float(final[best].mean())
    res["steps_axis"] = np.linspace(0, steps, len(curves["sgd"]["mean"])).tolist()
    res["sweep"] = {"lr": sweep.tolist(), **sweep_final}
    res["curves"] = curves
    s, g = curves["signsgd"], curves["sgd"]
    res["ratio_paper_lr"] = g["final_mean"] / s["final_mean"]
    res["ratio_best_lr"] = g["best_final_mean"] / s["best_final_mean"]
    ok = res["ratio_paper_lr"] >= 2.0 and res["ratio_best_lr"] >= 2.0
    res["criterion"] = ("final mean loss of SGD / signSGD >= 2 both at the paper's learning "
                        "rates (0.001, 0.01) and at each method's best learning rate of the sweep")
    res["verdict"] = verdict(ok)
    return res


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss curves (mean ± 1 std over repeats) and the learning-rate sweep."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = np.asarray(result["steps_axis"])
    colours = {"sgd": "tab:blue", "signsgd": "tab:red"}
    names = {"sgd": "SGD", "signsgd": "signSGD"}
    for m in METHODS:
        c = result["curves"][m]
        mean, std = np.asarray(c["mean"]), np.asarray(c["std"])
        a.plot(t, mean, color=colours[m], label=f"{names[m]} (lr {c['lr']:g})")
        a.fill_between(t, mean - std, mean + std, color=colours[m], alpha=0.2)
        b.loglog(result["sweep"]["lr"], result["sweep"][m], "o-", color=colours[m],
                 label=names[m])
    top = max(c["final_mean"] + c["final_std"] for c in result["curves"].values())
    a.set_ylim(0, 2 * top)  # linear axis: a ± std band is honest there (f starts near 50)
    a.set_xlabel("step")
    a.set_ylabel("f(x) = ||x||²/2")
    a.set_title(f"toy problem, {result['repeats']} repeats (mean ± 1 std)")
    a.legend()
    b.set_xlabel("learning rate")
    b.set_ylabel(f"mean f after {result['steps']} steps")
    b.set_title("learning-rate sweep")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """A few lines comparing our numbers with the paper's claim."""
    c = result["curves"]
    return (
        f"paper: {result['paper']}\n"
        f"ours ({result['steps']} steps, {result['repeats']} repeats): final f = "
        f"{c['sgd']['final_mean']:.3g} ± {c['sgd']['final_std']:.2g} (SGD, lr 0.001) vs "
        f"{c['signsgd']['final_mean']:.3g} ± {c['signsgd']['final_std']:.2g} "
        f"(signSGD, lr 0.01), ratio {result['ratio_paper_lr']:.1f}x\n"
        f"sweep best: SGD lr {c['sgd']['best_lr']:.2g} -> {c['sgd']['best_final_mean']:.3g}; "
        f"signSGD lr {c['signsgd']['best_lr']:.2g} -> {c['signsgd']['best_final_mean']:.3g} "
        f"(ratio {result['ratio_best_lr']:.1f}x)"
    )
