r"""ICLR 2019 fault tolerance: majority vote against k of M = 7 Byzantine workers.

M = 7 workers train a small MLP on Fashion-MNIST; the last ``k = 0…3`` of them are
adversaries from :mod:`signsgd.distributed.adversary`:

* ``negate`` — send the opposite of what an honest worker would (flipped sign bits in a
  vote; ``−scale·g`` in a mean all-reduce),
* ``random`` — send random signs (``scale·|g|·s`` with random ``s = ±1`` in a mean).

Two aggregation rules:

* **majority-vote Signum** (registry ``"signum"``: :class:`signsgd.Signum` +
  :class:`signsgd.distributed.MajorityVote`, β = 0.9): a Byzantine worker still casts one
  vote per coordinate, so ``k < M/2`` adversaries can only shift the vote, never decide it;
* **mean all-reduce SGD** (registry ``"sgd"``, momentum 0: ``torch.optim.SGD`` in
  :class:`signsgd.distributed.AverageGradients` over
  :class:`signsgd.distributed.AllReduce`), with the same attacks at ``scale = 1``
  (blind: the adversary sends a gradient of honest size) and negation at
  ``scale = M`` (one adversary cancels every honest worker: the ICLR 2019 point that "any
  faulty SGD worker can corrupt the entire model").

Both the full run and ``--quick`` (fewer steps, synthetic data) use one real Gloo process
per worker, all configurations in one launch (:mod:`signsgd.experiments._cluster`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from signsgd.experiments import _cluster as C
from signsgd.experiments._common import pyplot, verdict

PAPER = ("Bernstein et al., ICLR 2019: signSGD with majority vote is Byzantine fault "
         "tolerant: with M workers of which fewer than half are adversarial (blind negation "
         "or random signs), test accuracy degrades gracefully with the number of adversaries, "
         "whereas mean all-reduce SGD can be broken by a single adversary.")
WORLD = 7
KS = (0, 1, 2, 3)
ATTACKS = ("negate", "random")


def configs(quick: bool, seed: int) -> list[C.Config]:
    """Every (rule, attack, k) configuration of the experiment."""
    if quick:
        base = dict(steps=40, batch=32, hidden=32, eval_every=10, seed=seed)
    else:
        base = dict(steps=300, batch=16, hidden=32, eval_every=30, seed=seed)
    vote = dict(method="signum", lr=1e-2 if quick else 1e-3, momentum=0.9)
    mean = dict(method="sgd", lr=0.1, momentum=0.0)
    out = []
    for rule, hp in (("vote", vote), ("mean", mean)):
        out.append(C.Config(**hp, **base, adversaries=0, label=f"{rule}/none/0"))
        for attack in ATTACKS:
            for k in KS[1:]:
                out.append(C.Config(**hp, **base, adversaries=k, attack=attack,
                                    label=f"{rule}/{attack}/{k}"))
    for k in KS[1:]:
        out.append(C.Config(**mean, **base, adversaries=k, attack="negate",
                            attack_scale=float(WORLD), label=f"mean/negate_x{WORLD}/{k}"))
    return out


def run_experiment(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train every configuration; test accuracy against k per rule and attack."""
    cfgs = configs(quick, seed)
    data = (C.synthetic_splits(4000, 1000, 2000, seed=seed) if quick
            else C.fashion_splits(20_000, 2000, seed=seed))
    runs = C.run(WORLD, cfgs, data, timeout=3000.0)
    acc: dict[str, dict[str, list[float | None]]] = {}
    curves: dict[str, Any] = {}
    diverged: list[str] = []
    for c, r in zip(cfgs, runs):
        rule, attack, k = c.label.split("/")
        a = r["test_acc"] if math.isfinite(r["test_acc"]) else None
        curves[c.label] = {"step": r["step"], "train_loss": r["train_loss"],
                           "diverged_at": r["diverged_at"]}
        if r["diverged"]:
            diverged.append(c.label)
        if attack == "none":
            for att in ATTACKS:
                acc.setdefault(rule, {}).setdefault(att, [None] * 4)[0] = a
            if rule == "mean":
                acc[rule].setdefault(f"negate_x{WORLD}", [None] * 4)[0] = a
        else:
            acc.setdefault(rule, {}).setdefault(attack, [None] * 4)[int(k)] = a
    vote0 = acc["vote"]["negate"][0] or 0.0
    vote_worst = min((a if a is not None else 0.0) for att in ATTACKS
                     for a in acc["vote"][att])
    mean0 = acc["mean"]["negate"][0] or 0.0
    scaled1 = acc["mean"][f"negate_x{WORLD}"][1]
    scaled1_diverged = f"mean/negate_x{WORLD}/1" in diverged
    chance = 0.1
    checks = {
        "vote_keeps_80pct_of_clean_accuracy_up_to_k3":
            vote_worst - chance >= 0.8 * (vote0 - chance),
        "vote_learns": vote0 > 0.5,
        "mean_sgd_broken_by_one_scaled_negator":
            scaled1_diverged or scaled1 is None or scaled1 - chance < 0.5 * (mean0 - chance),
    }
    return {
        "paper": PAPER, "mode": "real: 7 Gloo processes (signsgd.distributed.launch.spawn)",
        "world": WORLD, "k": list(KS),
        "data": "synthetic Gaussian mixture" if quick else
                "Fashion-MNIST (20,000 training images, full 10,000 test images)",
        "model": "MLP 784-32-10" if not quick else "MLP 32-32-10",
        "configs": [c.__dict__ for c in cfgs], "test_acc": acc, "curves": curves,
        "diverged": diverged,
        "checks": checks,
        "criterion": ("all of: majority-vote Signum keeps >= 80% of its clean above-chance "
                      "accuracy (acc - 0.1) for every k <= 3 and both attacks; it learns "
                      "(clean accuracy > 0.5); one mean all-reduce SGD worker negating with "
                      f"scale {WORLD} cuts SGD's above-chance accuracy by more than half "
                      "(or makes it diverge: NaN gradients, run stopped; accuracy of the last "
                      "finite parameters is reported)"),
        "verdict": verdict(all(checks.values())),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Final test accuracy against the number of adversaries k."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = result["k"]
    styles = {("vote", "negate"): ("tab:red", "-o"), ("vote", "random"): ("tab:red", "--s"),
              ("mean", "negate"): ("tab:blue", "-o"), ("mean", "random"): ("tab:blue", "--s"),
              ("mean", f"negate_x{WORLD}"): ("tab:blue", ":^")}
    names = {"vote": "majority-vote Signum", "mean": "mean all-reduce SGD"}
    for (rule, attack), (colour, style) in styles.items():
        ys = [np.nan if a is None else a for a in result["test_acc"][rule][attack]]
        ax.plot(ks, ys, style, color=colour, label=f"{names[rule]}, {attack}")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax.set_xticks(ks)
    ax.set_xlabel(f"adversaries k (of M = {result['world']})")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Byzantine workers: {result['model']}, real Gloo processes\n{result['data']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """Test accuracy against k for each rule and attack."""
    lines = [f"paper: {result['paper']}",
             f"ours (real processes, {result['data']}): test accuracy for k = 0..3"]
    for rule in ("vote", "mean"):
        for attack, accs in result["test_acc"][rule].items():
            vals = " ".join("  nan" if a is None else f"{a:.3f}" for a in accs)
            lines.append(f"  {rule:<4} {attack:<10} {vals}")
    if result["diverged"]:
        lines.append("  diverged (NaN gradients, stopped): " + ", ".join(result["diverged"]))
    return "\n".join(lines)
