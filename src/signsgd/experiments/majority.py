r"""Majority vote reduces variance (Bernstein et al. 2018 Sec. 3.3; ICLR 2019 Sec. 3).

Part 1 — the probability that an M-worker vote gets a coordinate's sign wrong. Each worker
sees ``g + σξ`` with ξ unimodal and symmetric (Gaussian, uniform, Laplace, Student-t with
3 degrees of freedom), at signal-to-noise ratio ``S = |g|/σ``. We measure the error of the
vote ``sign(Σ_m sign(g + σξ_m))`` by Monte Carlo (ties, for even M, count one half) and
compare it with the bound of the paper's proof:

* one worker, Gauss's inequality: :math:`p \le \tfrac{1}{2} - \tfrac{S}{2\sqrt3}` for
  :math:`S \le 2/\sqrt3`, else :math:`p \le \tfrac{2}{9S^2}`;
* the vote, Cantelli's inequality on the number ``Z ~ Bin(M, 1−p)`` of right signs:
  :math:`P[Z \le M/2] \le \frac{p(1-p)}{p(1-p) + M(\tfrac12 - p)^2}`, which falls like
  ``1/M``: the vote behaves like a batch M times larger. (For M = 1 the Gauss bound itself
  is used; the curve is the smaller of the two.)

Part 2 — training with M = 1, 3, 7 workers at a fixed per-worker batch: signSGD with
majority vote (``signsgd.registry.build("signsgd", world_size=M)``: :class:`signsgd.SignSGD`
+ :class:`signsgd.distributed.MajorityVote`) on Fashion-MNIST, one real Gloo process per
worker (:mod:`signsgd.experiments._cluster`); more workers, faster convergence. The
``--quick`` version runs the same processes for fewer steps on synthetic data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from signsgd.experiments import _cluster as C
from signsgd.experiments._common import pyplot, verdict

PAPER = ("Bernstein et al. 2018 (Thm. 2) / ICLR 2019: under unimodal symmetric noise, the "
         "probability that the M-worker majority vote gets a sign wrong is bounded (Gauss's "
         "inequality + Cantelli) and falls with M like a batch M times larger, so majority "
         "vote converges like distributed SGD: faster as M grows at a fixed per-worker batch.")
NOISES = ("gaussian", "uniform", "laplace", "student_t3")
SNRS = (0.25, 0.5, 1.0, 2.0)
WORKERS = (1, 3, 7)


def gauss_bound(snr: float) -> float:
    """Gauss's inequality bound on one worker's sign-error probability at SNR ``S``."""
    if snr <= 2.0 / np.sqrt(3.0):
        return 0.5 - snr / (2.0 * np.sqrt(3.0))
    return 2.0 / (9.0 * snr * snr)


def vote_bound(snr: float, m: int) -> float:
    """Cantelli bound on the M-worker vote's error, from the one-worker Gauss bound."""
    p = gauss_bound(snr)
    if m == 1:
        return p
    var = p * (1 - p)
    return min(p, var / (var + m * (0.5 - p) ** 2))


def _noise(kind: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance symmetric unimodal noise."""
    if kind == "gaussian":
        return rng.standard_normal(shape)
    if kind == "uniform":
        return rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), shape)
    if kind == "laplace":
        return rng.laplace(0.0, 1.0 / np.sqrt(2.0), shape)
    if kind == "student_t3":
        return rng.standard_t(3, shape) / np.sqrt(3.0)
    raise ValueError(f"unknown noise {kind!r}; choose one of {NOISES}")


def vote_error(kind: str, snr: float, max_workers: int, trials: int,
               rng: np.random.Generator) -> np.ndarray:
    """Monte-Carlo error of the vote of the first M workers, M = 1..max_workers (g > 0)."""
    wrong = np.zeros(max_workers)
    chunk = 20_000
    done = 0
    while done < trials:
        n = min(chunk, trials - done)
        signs = np.where(snr + _noise(kind, rng, (n, max_workers)) >= 0, 1, -1)
        tally = np.cumsum(signs, axis=1)
        wrong += (tally < 0).sum(0) + 0.5 * (tally == 0).sum(0)
        done += n
    return wrong / trials


def part1(quick: bool, seed: int) -> dict[str, Any]:
    """Vote error against M for each noise and SNR, beside the bound."""
    trials = 20_000 if quick else 200_000
    rng = np.random.default_rng(seed)
    ms = np.arange(1, 32)
    out: dict[str, Any] = {"M": ms.tolist(), "trials": trials, "snr": list(SNRS),
                           "bound": {str(s): [vote_bound(s, int(m)) for m in ms] for s in SNRS},
                           "measured": {}}
    slack = []
    for kind in NOISES:
        out["measured"][kind] = {}
        for s in SNRS:
            err = vote_error(kind, s, 31, trials, rng)
            out["measured"][kind][str(s)] = err.tolist()
            bound = np.asarray(out["bound"][str(s)])
            se = np.sqrt(np.maximum(err * (1 - err), 1e-12) / trials)
            slack.append(float(np.max(err - bound - 4 * se)))
    out["max_excess_over_bound"] = max(slack)  # <= 0: bound holds within 4 standard errors
    odd = ms % 2 == 1
    out["decreasing_in_M"] = all(
        bool(np.all(np.diff(np.asarray(out["measured"][k][str(s)])[odd]) <= 2e-2))
        and (out["measured"][k][str(s)][30] < out["measured"][k][str(s)][0]
             or out["measured"][k][str(s)][0] == 0.0)
        for k in NOISES for s in SNRS
    )
    return out


def part2(quick: bool, seed: int) -> dict[str, Any]:
    """Train with M = 1, 3, 7 workers, one real Gloo process per worker (one launch)."""
    if quick:
        data = C.synthetic_splits(4000, 1000, 1000, seed=seed)
        cfg = dict(steps=150, batch=4, lr=3e-3, hidden=32, eval_every=10)
    else:
        data = C.fashion_splits(20_000, 2000, seed=seed)
        cfg = dict(steps=400, batch=8, lr=1e-3, hidden=32, eval_every=20)
    configs = [C.Config("signsgd", workers=m, seed=seed, label=f"M={m}", **cfg) for m in WORKERS]
    runs = dict(zip(map(str, WORKERS), C.run(max(WORKERS), configs, data)))
    final = {k: float(np.mean(r["train_loss"][-3:])) for k, r in runs.items()}
    area = {k: float(np.mean(r["train_loss"])) for k, r in runs.items()}
    return {"mode": "real: one Gloo process per worker (signsgd.distributed.launch.spawn)",
            "data": "synthetic Gaussian mixture, MLP 32-32-10" if quick else
            "Fashion-MNIST (20,000 training images, MLP 784-32-10)",
            "optimizer": "registry 'signsgd' (SignSGD + MajorityVote)", **cfg,
            "runs": runs, "final_train_loss": final, "mean_train_loss": area,
            "test_acc": {k: r["test_acc"] for k, r in runs.items()},
            "faster_with_more_workers": (area["7"] < area["3"] < area["1"]
                                         and final["7"] < final["3"] < final["1"])}


def run_experiment(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Both parts; the verdict needs the bound to hold and M to help."""
    p1, p2 = part1(quick, seed), part2(quick, seed)
    ok = p1["max_excess_over_bound"] <= 0 and p1["decreasing_in_M"] and \
        p2["faster_with_more_workers"]
    return {"paper": PAPER, "vote_error": p1, "training": p2,
            "criterion": ("all of: the measured vote error never exceeds the Gauss+Cantelli "
                          "bound by more than 4 Monte-Carlo standard errors (any noise, SNR, M); "
                          "it falls from M=1 to M=31 (and never rises by > 0.02 between odd "
                          "M); both the training loss averaged over the run (area under the "
                          "curve: speed) and the final training loss (mean of the last 3 "
                          "evaluations) are ordered M=7 < M=3 < M=1"),
            "verdict": verdict(bool(ok))}


def plot(result: dict[str, Any], path: Path) -> None:
    """Vote error against M (with the bound), and training loss for M = 1, 3, 7."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    p1 = result["vote_error"]
    ms = np.asarray(p1["M"])
    colours = dict(zip(map(str, SNRS), ("tab:red", "tab:orange", "tab:green", "tab:blue")))
    styles = dict(zip(NOISES, ("o", "s", "^", "x")))
    for s in map(str, SNRS):
        a.plot(ms, p1["bound"][s], "-", color=colours[s], label=f"bound, S={s}")
        for k in NOISES:
            a.plot(ms[::2], np.asarray(p1["measured"][k][s])[::2], styles[k], color=colours[s],
                   ms=4, label=k if s == str(SNRS[0]) else None, mfc="none")
    a.set_yscale("log")
    a.set_xlabel("workers M")
    a.set_ylabel("P[vote gets the sign wrong]")
    a.set_title("majority-vote error (markers: measured, odd M) vs bound")
    a.legend(fontsize=7, ncol=2)
    p2 = result["training"]
    for m, r in p2["runs"].items():
        b.plot(r["step"], r["train_loss"], label=f"M = {m}")
    b.set_xlabel("step")
    b.set_ylabel("training loss")
    b.set_title(f"signSGD + majority vote, batch {p2['batch']}/worker\n(real Gloo processes, "
                f"{p2['data']})", fontsize=9)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """The vote-error numbers at a few M and the final losses per M."""
    p1, p2 = result["vote_error"], result["training"]
    g = p1["measured"]["gaussian"]["0.5"]
    lines = [
        f"paper: {result['paper']}",
        f"vote error, Gaussian noise, S=0.5: M=1 {g[0]:.3f}, M=7 {g[6]:.3f}, M=31 {g[30]:.3f} "
        f"(bound {p1['bound']['0.5'][0]:.3f}, {p1['bound']['0.5'][6]:.3f}, "
        f"{p1['bound']['0.5'][30]:.3f}); largest excess over the bound "
        f"{p1['max_excess_over_bound']:.4f} (<= 0 means it holds)",
        "training (real processes): final loss " + ", ".join(
            f"M={m} {v:.3f}" for m, v in p2["final_train_loss"].items())
        + "; loss averaged over the run " + ", ".join(
            f"M={m} {v:.3f}" for m, v in p2["mean_train_loss"].items())
        + "; test accuracy " + ", ".join(
            f"M={m} {v:.3f}" for m, v in p2["test_acc"].items()),
    ]
    return "\n".join(lines)
