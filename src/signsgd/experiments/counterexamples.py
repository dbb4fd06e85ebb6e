r"""Karimireddy et al. 2019: where signSGD fails and error feedback fixes it.

Three problems, each run with the :mod:`signsgd.registry` methods ``"sgd"``
(``torch.optim.SGD``, no momentum), ``"signsgd"``, ``"signum"`` (β = 0.9) and
``"ef-signsgd"`` (:class:`signsgd.EFSGD` with :class:`~signsgd.compression.ScaledSign`),
all in float64:

(a) :math:`f(x) = \langle a_1,x\rangle^2 + \langle a_2,x\rangle^2`,
    :math:`a_1 = [1, -1+\varepsilon]`, :math:`a_2 = [-1+\varepsilon, 1]`, ε = 0.5,
    :math:`x_0 = [1, 1]`; the stochastic gradient is ``2∇⟨a_i,x⟩²`` for one term ``i`` drawn
    at random (unbiased). Both ``sign(a_1)`` and ``sign(a_2)`` are ``±[1, −1]``, so every
    signSGD step keeps :math:`x_1 + x_2` fixed and signSGD cannot reach the optimum 0.
(b) :math:`f(x) = \varepsilon|x_1 + x_2| + |x_1 - x_2|`, full-batch (deterministic)
    sub-gradients, :math:`x_0 = [1, 0.39]`: the sign of the sub-gradient is ``±[1, −1]``
    whenever :math:`x_1 \ne x_2`, so sign descent zig-zags across :math:`x_1 = x_2` and
    stalls at :math:`f \approx \varepsilon|x_1+x_2|`.
(c) a one-dimensional problem with skewed noise, repeated on ``D = 16`` independent
    coordinates (in one dimension ``ScaledSign`` is lossless and EF-signSGD would *be*
    SGD): :math:`f(x) = \tfrac12(x-1)^2`, stochastic gradient :math:`x - 1 + \zeta` with
    ζ = −1 w.p. 0.8 and +4 w.p. 0.2 (mean 0). The median of the gradient vanishes at
    x = 2, so signSGD converges to 2: ``sign(E[g]) ≠ E[sign(g)]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from signsgd import registry
from signsgd.experiments._common import pyplot, verdict

PAPER = ("Karimireddy et al. 2019, Section 3 counterexamples: (a) signSGD never changes "
         "x1+x2 and does not converge, EF-signSGD converges to 0; (b) full-batch sign descent "
         "stalls on eps|x1+x2|+|x1-x2|; (c) with skewed noise sign(E[g]) != E[sign(g)] and "
         "signSGD converges to the wrong point. EF-signSGD behaves like SGD on all three.")
METHODS = ("sgd", "signsgd", "signum", "ef-signsgd")
LABELS = {"sgd": "SGD", "signsgd": "signSGD", "signum": "Signum", "ef-signsgd": "EF-signSGD"}
#: Hyper-parameters besides the learning rate (the registry's defaults for the rest).
HYPER: dict[str, dict[str, float]] = {"sgd": {"momentum": 0.0}, "signum": {"momentum": 0.9}}
EPS = 0.5


def make_optimizer(method: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The :func:`signsgd.registry.build` optimiser of ``method`` with :data:`HYPER`.

    Example:
        >>> make_optimizer("sgd", [torch.nn.Parameter(torch.ones(2))], 0.1).defaults["momentum"]
        0.0
    """
    return registry.build(method, params, lr=lr, **HYPER.get(method, {}))


def _run(method: str, x0: list[float], lr: float, steps: int,
         grad: Callable[[torch.Tensor, np.random.Generator], torch.Tensor],
         loss: Callable[[torch.Tensor], float], seed: int, record: int = 200) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = make_optimizer(method, [x], lr)
    every = max(1, steps // record)
    losses, traj = [loss(x.detach())], [x.detach().clone().tolist()]
    tail: list[np.ndarray] = []
    for t in range(1, steps + 1):
        x.grad = grad(x.detach(), rng)
        opt.step()
        if t % every == 0:
            losses.append(loss(x.detach()))
            traj.append(x.detach().clone().tolist())
        if t > steps - steps // 5:
            tail.append(x.detach().numpy().copy())
    return {"loss": losses, "trajectory": traj, "final": x.detach().tolist(),
            "final_loss": loss(x.detach()), "tail_mean": np.mean(tail, axis=0).tolist()}


def problem_a(method: str, steps: int, seed: int) -> dict[str, Any]:
    """Counterexample (a): stochastic sum of two squared linear forms."""
    a = torch.tensor([[1.0, -1.0 + EPS], [-1.0 + EPS, 1.0]], dtype=torch.float64)

    def grad(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        i = int(rng.integers(2))
        return 4.0 * (a[i] @ x) * a[i]  # 2 * grad of <a_i, x>^2: unbiased for f

    def loss(x: torch.Tensor) -> float:
        return float(((a @ x) ** 2).sum())

    out = _run(method, [1.0, 1.0], 0.01, steps, grad, loss, seed)
    out["sum_x1_x2"] = [p[0] + p[1] for p in out["trajectory"]]
    return out


def problem_b(method: str, steps: int, seed: int) -> dict[str, Any]:
    """Counterexample (b): eps|x1+x2| + |x1-x2| with full-batch sub-gradients."""

    def grad(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        s, d = torch.sign(x[0] + x[1]), torch.sign(x[0] - x[1])
        return torch.stack([EPS * s + d, EPS * s - d])

    def loss(x: torch.Tensor) -> float:
        return float(EPS * (x[0] + x[1]).abs() + (x[0] - x[1]).abs())

    return _run(method, [1.0, 0.39], 0.01, steps, grad, loss, seed)


def problem_c(method: str, steps: int, seed: int, dim: int = 16) -> dict[str, Any]:
    """Counterexample (c): skewed zero-mean noise on a 1-D quadratic, ``dim`` copies."""

    def grad(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        zeta = np.where(rng.random(dim) < 0.8, -1.0, 4.0)
        return x - 1.0 + torch.from_numpy(zeta)

    def loss(x: torch.Tensor) -> float:
        return float(0.5 * ((x - 1.0) ** 2).mean())

    out = _run(method, [0.0] * dim, 0.01, steps, grad, loss, seed)
    out["tail_point"] = float(np.mean(out["tail_mean"]))  # x where the method settles
    return out


def run_experiment(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the 3 problems × 4 methods; return numbers and verdict."""
    steps = 1000 if quick else 10_000
    res: dict[str, Any] = {"paper": PAPER, "steps": steps, "eps": EPS, "lr": 0.01,
                           "signum_momentum": 0.9}
    for name, fn in (("a", problem_a), ("b", problem_b), ("c", problem_c)):
        res[name] = {m: fn(m, steps, seed) for m in METHODS}
    a, b, c = res["a"], res["b"], res["c"]
    f0_b = 0.5 * 1.39 + 0.61
    checks = {
        "a_signsgd_keeps_x1_plus_x2": abs(a["signsgd"]["sum_x1_x2"][-1] - 2.0) < 1e-9,
        "a_signsgd_stuck": a["signsgd"]["final_loss"] > 0.1,
        "a_ef_converges": a["ef-signsgd"]["final_loss"] < 1e-3,
        "a_sgd_converges": a["sgd"]["final_loss"] < 1e-3,
        "b_signsgd_stalls": b["signsgd"]["final_loss"] > 0.5 * EPS * 1.39,
        "b_ef_converges": b["ef-signsgd"]["final_loss"] < 0.1 * f0_b,
        "c_signsgd_wrong_point": abs(c["signsgd"]["tail_point"] - 2.0) < 0.15,
        "c_ef_right_point": abs(c["ef-signsgd"]["tail_point"] - 1.0) < 0.15,
        "c_sgd_right_point": abs(c["sgd"]["tail_point"] - 1.0) < 0.15,
    }
    res["checks"] = checks
    res["criterion"] = ("all of: (a) signSGD keeps x1+x2 = 2 exactly and ends with f > 0.1 while "
                        "SGD and EF-signSGD end with f < 1e-3; (b) signSGD ends above half the "
                        "stall value eps|x1+x2|, EF-signSGD below 10% of f(x0); (c) signSGD's "
                        "late iterates average within 0.15 of the wrong point 2, SGD's and "
                        "EF-signSGD's within 0.15 of the optimum 1")
    res["verdict"] = verdict(all(checks.values()))
    for name in ("a", "b", "c"):  # keep result.json small: drop per-step trajectories of (c)
        for m in METHODS:
            if name == "c":
                res[name][m].pop("trajectory")
    return res


def plot(result: dict[str, Any], path: Path) -> None:
    """Three panels: loss against step for each problem and method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    titles = {"a": "(a) stochastic <a1,x>²+<a2,x>²", "b": "(b) eps|x1+x2|+|x1-x2| (full batch)",
              "c": "(c) skewed noise: mean |x - 1| of iterates"}
    for ax, name in zip(axes, ("a", "b", "c")):
        for m in METHODS:
            r = result[name][m]
            y = np.asarray(r["loss"], dtype=float)
            if name == "c":
                y = np.sqrt(2 * y)  # RMS distance to the optimum 1
            t = np.linspace(0, result["steps"], len(y))
            ax.plot(t, np.maximum(y, 1e-12), label=LABELS[m])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("f(x)" if name != "c" else "RMS |x - 1|")
        ax.set_title(titles[name])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """Final losses / points per problem and method."""
    lines = [f"paper: {result['paper']}"]
    for name in ("a", "b", "c"):
        key = "tail_point" if name == "c" else "final_loss"
        what = "settles at x =" if name == "c" else "final f ="
        vals = ", ".join(f"{LABELS[m]} {result[name][m][key]:.3g}" for m in METHODS)
        lines.append(f"({name}) {what} {vals}")
    lines.append("(a) signSGD x1+x2 at the end: "
                 f"{result['a']['signsgd']['sum_x1_x2'][-1]:.6f} (start 2)")
    return "\n".join(lines)
