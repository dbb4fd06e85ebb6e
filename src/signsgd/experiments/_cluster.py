"""M-worker training for ``majority`` and ``byzantine``: real Gloo processes, or a simulation.

Both paths run the same update math on the same mini-batches:

* ``"vote"`` — :class:`signsgd.Signum` (β = 0 is signSGD) with
  :class:`signsgd.distributed.MajorityVote`: each worker sends the sign of its own momentum
  (zero counts as +1), every worker applies ``x ← x − lr·sign(Σ_workers sign)``.
* ``"mean"`` — SGD with :class:`signsgd.distributed.AllReduce`: :class:`signsgd.EFSGD` with
  the ``Identity`` compressor (exactly SGD) applied to the mean gradient.

Byzantine ranks get an adversary from :mod:`signsgd.distributed.adversary`; in the
simulation the same adversary objects corrupt the same packed bits / gradients.

:func:`run_real` spawns ``M`` processes (:func:`signsgd.distributed.launch.spawn`) and runs a
list of configurations in one launch, so process start-up is paid once.
:func:`simulate` runs the ``M`` workers one after the other in this process: it keeps one
momentum buffer per worker and votes with :func:`signsgd.packing.pack_signs`-packed bits,
so it matches the real aggregator bit for bit with an odd number of workers (with an even
number, ties are broken by the simulation's own coin, not the real tie bits).
``tests/test_experiments.py`` checks the two against each other on a few steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import signsgd
from signsgd import functional as SF
from signsgd.compression import Identity
from signsgd.distributed.adversary import Adversary, Negate, RandomSigns
from signsgd.errors import NonFiniteGradientError
from signsgd.packing import pack_signs, unpack_signs


@dataclass
class Config:
    """One training run of an M-worker cluster.

    ``adversaries`` ranks are the *last* ``k`` ranks (rank 0, which reports, stays honest;
    all ranks hold the same parameters anyway). ``attack`` is ``"negate"`` or ``"random"``;
    ``attack_scale`` multiplies a corrupted gradient in a mean all-reduce (votes ignore it).
    """

    rule: str = "vote"            # "vote" (Signum + MajorityVote) or "mean" (SGD + AllReduce)
    lr: float = 1e-3
    momentum: float = 0.0
    steps: int = 200
    batch: int = 16               # per worker
    hidden: int = 32
    adversaries: int = 0
    attack: str = "negate"
    attack_scale: float = 1.0
    eval_every: int = 20
    seed: int = 0
    label: str = ""


def make_model(inputs: int, classes: int, hidden: int, seed: int) -> nn.Module:
    """A one-hidden-layer ReLU MLP, initialised from ``seed`` (same on every rank)."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                              nn.Linear(hidden, classes))
    return model


def batch_indices(n: int, batch: int, rank: int, step: int, seed: int) -> Tensor:
    """Mini-batch of worker ``rank`` at ``step``: a deterministic draw (same in sim and real)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + step) % 2**62)
    return torch.randint(0, n, (batch,), generator=g)


def adversary_for(cfg: Config, rank: int, world: int) -> Adversary | None:
    """The attack of ``rank`` (the last ``cfg.adversaries`` ranks misbehave), or ``None``."""
    if rank < world - cfg.adversaries:
        return None
    if cfg.attack == "negate":
        return Negate(scale=cfg.attack_scale)
    if cfg.attack == "random":
        return RandomSigns(seed=1000 + rank, scale=cfg.attack_scale)
    raise ValueError(f"unknown attack {cfg.attack!r}; use 'negate' or 'random'")


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def _record(hist: dict[str, list[float]], step: int, model: nn.Module,
            data: dict[str, Tensor]) -> None:
    loss, _ = _evaluate(model, data["x_eval"], data["y_eval"])
    hist["step"].append(step)
    hist["train_loss"].append(loss)


def _finish(hist: dict[str, Any], model: nn.Module, data: dict[str, Tensor]) -> dict[str, Any]:
    loss, acc = _evaluate(model, data["x_test"], data["y_test"])
    hist["test_loss"], hist["test_acc"] = loss, acc
    hist["diverged"] = hist.get("diverged_at") is not None or not math.isfinite(loss)
    return hist


def _make_opt(cfg: Config, model: nn.Module, aggregator: Any) -> torch.optim.Optimizer:
    if cfg.rule == "vote":
        return signsgd.Signum(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              aggregator=aggregator)
    if cfg.rule == "mean":
        return signsgd.EFSGD(model.parameters(), lr=cfg.lr, compressor=Identity(),
                             momentum=cfg.momentum, aggregator=aggregator)
    raise ValueError(f"unknown rule {cfg.rule!r}; use 'vote' or 'mean'")


def _train_rank(rank: int, world: int, cfg: Config, data: dict[str, Tensor],
                report: bool) -> dict[str, Any]:
    """One rank of a real run (inside an initialised process group)."""
    from signsgd.distributed import AllReduce, MajorityVote

    x, y = data["x"], data["y"]
    model = make_model(x[0].numel(), int(data["classes"]), cfg.hidden, cfg.seed)
    adv = adversary_for(cfg, rank, world)
    agg = (MajorityVote(seed=cfg.seed, adversary=adv) if cfg.rule == "vote"
           else AllReduce(adversary=adv))
    opt = _make_opt(cfg, model, agg)
    hist: dict[str, Any] = {"step": [], "train_loss": [], "label": cfg.label,
                            "diverged_at": None}
    for t in range(cfg.steps):
        if report and t % cfg.eval_every == 0:
            _record(hist, t, model, data)
        idx = batch_indices(x.shape[0], cfg.batch, rank, t, cfg.seed)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        try:
            opt.step()
        except NonFiniteGradientError:  # raised on every rank alike: all stop together
            hist["diverged_at"] = t
            break
    if not report:
        return {}
    _record(hist, t + 1 if hist["diverged_at"] is None else t, model, data)
    hist["params"] = [p.detach().clone() for p in model.parameters()]
    return _finish(hist, model, data)


def _worker(rank: int, world: int, configs: list[Config], data: dict[str, Tensor]
            ) -> list[dict[str, Any]]:
    """Module-level entry point for :func:`signsgd.distributed.launch.spawn`."""
    torch.manual_seed(0)
    return [_train_rank(rank, world, cfg, data, report=rank == 0) for cfg in configs]


def run_real(world: int, configs: list[Config], data: dict[str, Tensor],
             timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Run ``configs`` one after the other on ``world`` real Gloo processes; rank 0's results."""
    from signsgd.distributed.launch import spawn

    out = spawn(_worker, world, (configs, data), timeout=timeout, pg_timeout=300.0)
    return out[0]


def simulate(world: int, cfg: Config, data: dict[str, Tensor]) -> dict[str, Any]:
    """The same run as one rank of :func:`run_real`, with the ``world`` workers in-process."""
    x, y = data["x"], data["y"]
    model = make_model(x[0].numel(), int(data["classes"]), cfg.hidden, cfg.seed)
    params = list(model.parameters())
    advs = [adversary_for(cfg, r, world) for r in range(world)]
    if cfg.rule == "vote":
        opt: torch.optim.Optimizer = signsgd.SignSGD(params, lr=cfg.lr)
        moms = [[torch.zeros_like(p) for p in params] for _ in range(world)]
    else:
        opt = signsgd.EFSGD(params, lr=cfg.lr, compressor=Identity(), momentum=cfg.momentum)
    coin = torch.Generator().manual_seed(cfg.seed)
    hist: dict[str, Any] = {"step": [], "train_loss": [], "label": cfg.label,
                            "diverged_at": None}
    t = 0
    for t in range(cfg.steps):
        if t % cfg.eval_every == 0:
            _record(hist, t, model, data)
        grads = []
        for r in range(world):
            idx = batch_indices(x.shape[0], cfg.batch, r, t, cfg.seed)
            model.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            grads.append([p.grad.detach().clone() for p in params])
        if SF.first_nonfinite([g for gs in grads for g in gs]) is not None:
            hist["diverged_at"] = t  # the real aggregators raise on every rank here
            break
        if cfg.rule == "vote":
            tally = torch.zeros(sum(p.numel() for p in params))
            for r in range(world):
                if cfg.momentum:
                    dirs = [SF.signum_direction([g], [m], momentum=cfg.momentum)[0]
                            for g, m in zip(grads[r], moms[r])]
                    for m, d in zip(moms[r], dirs):
                        m.copy_(d)
                else:
                    dirs = grads[r]
                flat = torch.cat([d.reshape(-1) for d in dirs])
                n = flat.numel()
                packed = pack_signs(flat)
                if advs[r] is not None:
                    pad = (-packed.numel()) % 8
                    padded = torch.cat([packed, torch.zeros(pad, dtype=torch.uint8)])
                    packed = advs[r].corrupt_signs(padded, step=t)[: packed.numel()]
                tally += unpack_signs(packed, n)
            ties = tally == 0
            vote = torch.sign(tally)
            if bool(ties.any()):
                coin_flip = torch.randint(0, 2, (int(ties.sum()),), generator=coin) * 2.0 - 1
                vote[ties] = coin_flip
            chunks = vote.split([p.numel() for p in params])
            for p, v in zip(params, chunks):
                p.grad = v.view_as(p).to(p.dtype)
        else:
            flats = []
            for r in range(world):
                flat = torch.cat([g.reshape(-1) for g in grads[r]])
                if advs[r] is not None:
                    flat = advs[r].corrupt_gradient(flat, step=t)
                flats.append(flat)
            mean = torch.stack(flats).sum(0) / world
            for p, v in zip(params, mean.split([p.numel() for p in params])):
                p.grad = v.view_as(p).clone()
        opt.step()
    else:
        t = cfg.steps - 1
    _record(hist, t + 1 if hist["diverged_at"] is None else t, model, data)
    hist["params"] = [p.detach().clone() for p in params]
    return _finish(hist, model, data)


def fashion_data(train: int, evaluate: int, seed: int = 0) -> dict[str, Tensor]:
    """A Fashion-MNIST subset, flattened: ``train`` examples, ``evaluate`` for the loss curve,
    and the full 10,000-image test set."""
    from signsgd.experiments._common import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    tr, ev = perm[:train], perm[train:train + evaluate]
    return {"x": x[tr].reshape(train, -1).contiguous(), "y": y[tr].contiguous(),
            "x_eval": x[ev].reshape(evaluate, -1).contiguous(), "y_eval": y[ev].contiguous(),
            "x_test": xt.reshape(xt.shape[0], -1).contiguous(), "y_test": yt.contiguous(),
            "classes": torch.tensor(10)}


def synthetic_data(train: int, evaluate: int, test: int, seed: int = 0, d: int = 32,
                   classes: int = 10) -> dict[str, Tensor]:
    """Gaussian-mixture stand-in for Fashion-MNIST (the --quick runs and the tests)."""
    from signsgd.experiments._common import synthetic_classification

    x, y = synthetic_classification(train + evaluate + test, d, classes, seed)
    a, b = train, train + evaluate
    return {"x": x[:a], "y": y[:a], "x_eval": x[a:b], "y_eval": y[a:b],
            "x_test": x[b:], "y_test": y[b:], "classes": torch.tensor(classes)}
