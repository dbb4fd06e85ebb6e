r"""Karimireddy et al. 2019, generalisation: sign methods leave the span of the data.

Over-parameterised least squares :math:`\min_w \tfrac{1}{2n}\|Xw - y\|^2` with ``d > n``,
started at ``w = 0``. SGD's iterates stay in the row span of ``X`` and converge to the
minimum-norm interpolant; EF-SGD's do too, up to the error it still holds. signSGD and
Signum move every coordinate by ``±lr`` whatever the gradient's size, leave the span, and
reach a different interpolant that generalises worse.

The data is the construction of Wilson et al. (2017), used for exactly this point about
sign-like (adaptive) methods: ``n`` examples with label ``y = ±1`` (``+1`` with
probability 0.7) and ``d = 3 + 5n`` features: ``x₁ = y``, ``x₂ = x₃ = 1``, plus one feature
unique to the example if ``y = +1`` and five if ``y = −1``. A new example shares only the
first three features with the training set, so the prediction is ``w₁y + w₂ + w₃``. The
minimum-norm solution puts its weight on ``w₁``; sign methods grow ``w₂, w₃`` (and the
unique features) as fast as ``w₁`` and predict worse.

Every run uses the :mod:`signsgd.registry` optimisers of
:mod:`signsgd.experiments.counterexamples` (``sgd`` without momentum, ``signsgd``,
``signum``, ``ef-signsgd``) in float64, mini-batches of 8, and the schedule
``lr_t = lr / sqrt(1 + t/100)`` (``LambdaLR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from signsgd.experiments._common import pyplot, verdict
from signsgd.experiments.counterexamples import LABELS, METHODS, make_optimizer

PAPER = ("Karimireddy et al. 2019 (generalisation experiment): on over-parameterised least "
         "squares, signSGD and Signum converge to a solution outside the span of the data and "
         "generalise poorly, while SGD and EF-signSGD stay in the span and generalise well.")
LR = {"sgd": 0.1, "signsgd": 0.01, "signum": 0.01, "ef-signsgd": 0.1}
P_POS = 0.7


def wilson_data(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wilson et al. (2017) over-parameterised design: ``X (n, 3+5n)``, ``y (n,)``."""
    y = np.where(rng.random(n) < P_POS, 1.0, -1.0)
    x = np.zeros((n, 3 + 5 * n))
    x[:, 0], x[:, 1], x[:, 2] = y, 1.0, 1.0
    for i in range(n):
        base = 3 + 5 * i
        x[i, base: base + (1 if y[i] > 0 else 5)] = 1.0
    return torch.tensor(x), torch.tensor(y)


def _metrics(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             proj: torch.Tensor) -> dict[str, float]:
    """Train loss, test MSE / error (exact over the two test classes), distance from span."""
    train = 0.5 * float(((x @ w - y) ** 2).mean())
    pos = float(w[0] + w[1] + w[2])      # prediction for a new +1 example
    neg = float(-w[0] + w[1] + w[2])     # prediction for a new -1 example
    test_mse = P_POS * (pos - 1.0) ** 2 + (1 - P_POS) * (neg + 1.0) ** 2
    test_err = P_POS * (pos <= 0) + (1 - P_POS) * (neg >= 0)
    norm = float(w.norm())
    out = float((w - proj @ w).norm()) / norm if norm > 0 else 0.0
    return {"train_loss": train, "test_mse": test_mse, "test_error": float(test_err),
            "out_of_span": out}


def train(method: str, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int,
          batch: int = 8, record: int = 100) -> dict[str, list[float]]:
    """Train ``method`` from ``w = 0``; metrics every ``steps/record`` steps."""
    n, d = x.shape
    proj = x.T @ torch.linalg.pinv(x @ x.T) @ x
    w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = make_optimizer(method, [w], LR[method])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / np.sqrt(1.0 + t / 100.0))
    rng = np.random.default_rng(seed)
    every = max(1, steps // record)
    hist: dict[str, list[float]] = {k: [] for k in ("train_loss", "test_mse", "test_error",
                                                    "out_of_span")}
    for t in range(steps + 1):
        if t % every == 0:
            for k, v in _metrics(w.detach(), x, y, proj).items():
                hist[k].append(v)
        if t == steps:
            break
        idx = torch.from_numpy(rng.choice(n, batch, replace=False))
        loss = 0.5 * ((x[idx] @ w - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    hist["w123"] = w.detach()[:3].tolist()
    return hist


def run_experiment(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train the four methods on ``datasets`` random draws; return numbers and verdict."""
    n, steps, datasets = (40, 1500, 1) if quick else (40, 5000, 8)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for k in range(datasets):
        x, y = wilson_data(n, np.random.default_rng(seed + k))
        for m in METHODS:
            runs[m].append(train(m, x, y, steps, seed=seed + 1000 + k))
    final: dict[str, dict[str, float]] = {}
    for m in METHODS:
        final[m] = {key: float(np.mean([r[key][-1] for r in runs[m]]))
                    for key in ("train_loss", "test_mse", "test_error", "out_of_span")}
    curves = {m: {key: np.mean([r[key] for r in runs[m]], axis=0).tolist()
                  for key in ("train_loss", "test_mse", "out_of_span")} for m in METHODS}
    good = max(final["sgd"]["test_mse"], final["ef-signsgd"]["test_mse"])
    checks = {
        "all_fit_training_data": all(final[m]["train_loss"] < 1e-2 for m in METHODS),
        "sgd_ef_stay_in_span": max(final["sgd"]["out_of_span"],
                                   final["ef-signsgd"]["out_of_span"]) < 0.05,
        "sign_methods_leave_span": min(final["signsgd"]["out_of_span"],
                                       final["signum"]["out_of_span"]) > 0.3,
        "sign_methods_generalise_worse": min(final["signsgd"]["test_mse"],
                                             final["signum"]["test_mse"]) >= 3 * good,
    }
    return {
        "paper": PAPER, "n": n, "d": 3 + 5 * n, "steps": steps, "datasets": datasets,
        "lr": LR, "batch": 8, "final": final, "curves": curves, "checks": checks,
        "steps_axis": np.linspace(0, steps, len(curves["sgd"]["train_loss"])).tolist(),
        "criterion": ("all of: every method fits the training data (train loss < 1e-2); SGD "
                      "and EF-signSGD end with < 5% of ||w|| outside the data span, signSGD "
                      "and Signum with > 30%; test MSE of signSGD and Signum >= 3x the worse "
                      "of SGD and EF-signSGD (means over the data sets)"),
        "verdict": verdict(all(checks.values())),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Train loss, test MSE and out-of-span fraction against step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = np.asarray(result["steps_axis"])
    for ax, key, title, log in zip(
        axes, ("train_loss", "test_mse", "out_of_span"),
        ("training loss", "test MSE (new examples)", "||w - Pw|| / ||w|| (outside data span)"),
        (True, True, False),
    ):
        for m in METHODS:
            ax.plot(t, np.maximum(result["curves"][m][key], 1e-12), label=LABELS[m])
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"over-parameterised least squares (Wilson et al. design, n={result['n']}, "
                 f"d={result['d']}, {result['datasets']} data sets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """Final train loss, test MSE / error and out-of-span fraction per method."""
    lines = [f"paper: {result['paper']}",
             f"ours (n={result['n']}, d={result['d']}, {result['steps']} steps, "
             f"mean of {result['datasets']} data sets):"]
    for m in METHODS:
        f = result["final"][m]
        lines.append(f"  {LABELS[m]:<11} train {f['train_loss']:.1e}  test MSE "
                     f"{f['test_mse']:.3f}  test error {f['test_error']:.2f}  outside span "
                     f"{f['out_of_span']:.2f}")
    return "\n".join(lines)
