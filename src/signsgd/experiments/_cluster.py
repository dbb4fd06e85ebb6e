"""M-worker training for ``majority`` and ``byzantine``: one real Gloo process per worker.

Every worker is a process of :func:`signsgd.distributed.launch.spawn` and builds its
optimiser with :func:`signsgd.registry.build` for its rank: ``"signsgd"`` / ``"signum"``
communicate through the majority vote (:class:`~signsgd.distributed.MajorityVote`),
``"sgd"`` is ``torch.optim.SGD`` on the fp32 mean
(:class:`~signsgd.distributed.AverageGradients` over :class:`~signsgd.distributed.AllReduce`).
The last ``k`` ranks get an adversary from :func:`signsgd.distributed.adversary.attack`.
:func:`run` trains a list of configurations one after the other in one launch, so process
start-up is paid once; a configuration with fewer ``workers`` runs on a subgroup of the
first ranks while the others wait. The ``--quick`` runs are the same code with fewer steps
on synthetic data.

Example:
    >>> data = synthetic_splits(256, 64, 64)
    >>> run(3, [Config("signum", lr=0.01, momentum=0.9, steps=4)], data)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from signsgd import models, registry
from signsgd.data import Dataset, gaussian_mixture, load
from signsgd.distributed.adversary import attack
from signsgd.errors import NonFiniteGradientError
from signsgd.loop import Callback, Loop, cross_entropy

__all__ = ["Config", "Splits", "fashion_splits", "synthetic_splits", "run"]


@dataclass
class Config:
    """One training run of an M-worker cluster.

    ``method`` is a :data:`signsgd.registry.METHODS` name; ``momentum`` ``None`` leaves the
    method's own (``"signsgd"`` takes none). ``workers`` is M, the first ranks of the launch
    (``None``: all of them). The adversaries are the *last* ``adversaries`` of the M
    ranks (rank 0, which reports, stays honest; all ranks hold the same parameters anyway);
    ``attack`` is an :data:`~signsgd.distributed.adversary.ATTACKS` name and
    ``attack_scale`` multiplies a corrupted gradient in a mean (votes ignore it).

    Example:
        >>> Config("signum", lr=5e-3, momentum=0.9, adversaries=2).attack
        'negate'

    The loss curve and the test accuracy of a local-steps run are those of the anchor x0
    (the parameters every rank agrees on), not of rank 0's local iterate.
    """

    method: str = "signsgd"
    lr: float = 1e-3
    momentum: float | None = None
    workers: int | None = None
    steps: int = 200
    batch: int = 16               # per worker
    hidden: int = 32
    adversaries: int = 0
    attack: str = "negate"
    attack_scale: float = 1.0
    eval_every: int = 20
    seed: int = 0
    label: str = ""
    # Local steps (sync_every = H > 1): ``method`` / ``lr`` / ``momentum`` are then the
    # inner optimiser's, and every H steps a LocalSteps round ends with a majority vote on
    # sign(x0 − x_m) (the adversary corrupts the signs this rank sends); the anchor moves by
    # outer_lr with outer momentum outer_momentum. ``steps`` counts gradient steps.
    sync_every: int = 1
    outer_lr: float = 0.0
    outer_momentum: float = 0.0


class Splits(NamedTuple):
    """The examples the workers draw batches from, the loss-curve set, and the test set.

    Example:
        >>> synthetic_splits(40, 10, 10).evaluate.shape
        (1, 1, 32)
    """

    train: Dataset
    evaluate: Dataset
    test: Dataset


def fashion_splits(train: int, evaluate: int, seed: int = 0) -> Splits:
    """``train`` + ``evaluate`` random Fashion-MNIST training images and the full test set.

    Raises:
        DataError: Fashion-MNIST is not installed (the message says how to get it).

    Example:
        >>> fashion_splits(20_000, 2000).train.shape  # doctest: +SKIP
        (1, 28, 28)
    """
    full, test = load("fashion-mnist")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    return Splits(full.subset(perm[:train]), full.subset(perm[train:train + evaluate]), test)


def synthetic_splits(train: int, evaluate: int, test: int, seed: int = 0,
                     d: int = 32) -> Splits:
    """The same three sets cut from one :func:`signsgd.data.gaussian_mixture` of dimension d.

    Example:
        >>> [len(s) for s in synthetic_splits(40, 10, 10)]
        [40, 10, 10]
    """
    full = gaussian_mixture(train + evaluate + test, (1, 1, d), seed=seed)
    cut = torch.arange(len(full)).split([train, evaluate, test])
    return Splits(*(full.subset(i) for i in cut))


def batch_indices(n: int, batch: int, rank: int, step: int, seed: int) -> Tensor:
    """Mini-batch of worker ``rank`` at ``step``: a deterministic draw with replacement.

    Example:
        >>> batch_indices(100, 4, rank=1, step=7, seed=0).shape
        torch.Size([4])
    """
    g = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + step) % 2**62)
    return torch.randint(0, n, (batch,), generator=g)


def _loss_acc(model: nn.Module, xy: tuple[Tensor, Tensor]) -> tuple[float, float]:
    with torch.no_grad():
        out = model(xy[0])
        return float(F.cross_entropy(out, xy[1])), float((out.argmax(1) == xy[1]).float().mean())


def _train(rank: int, world: int, group: Any, cfg: Config, sets: list[tuple[Tensor, Tensor]],
           data: Splits) -> dict[str, Any]:
    """One rank of one configuration on ``world`` ranks of ``group``; rank 0's history."""
    (x, y), evaluate, test = sets
    torch.manual_seed(cfg.seed)  # the same initial parameters on every rank
    model = models.build("mlp", data.train.shape, data.train.num_classes, hidden=(cfg.hidden,))
    bad = rank >= world - cfg.adversaries
    adversary = attack(cfg.attack, seed=1000 + rank, scale=cfg.attack_scale) if bad else None
    local = None if cfg.sync_every == 1 else registry.LocalSpec(
        cfg.sync_every, lr=cfg.outer_lr, momentum=cfg.outer_momentum)  # voted, sign-momentum
    opt: Any = registry.build(cfg.method, model.parameters(), world_size=world, group=group,
                              adversary=adversary, seed=cfg.seed, lr=cfg.lr,
                              momentum=cfg.momentum, local=local)

    def score(xy: tuple[Tensor, Tensor]) -> tuple[float, float]:
        if cfg.sync_every == 1:
            return _loss_acc(model, xy)
        with opt.at_anchor():
            return _loss_acc(model, xy)

    hist: dict[str, Any] = {"step": [], "train_loss": [], "label": cfg.label,
                            "diverged_at": None}

    class History(Callback):  # rank 0's loss on the evaluation set, at 0 and every eval_every
        def on_eval(self, loop: Loop, step: int) -> None:
            if rank == 0:
                hist["step"].append(step)
                hist["train_loss"].append(score(evaluate)[0])

    def batch_of(step: int) -> tuple[Tensor, Tensor]:
        idx = batch_indices(x.shape[0], cfg.batch, rank, step, cfg.seed)
        return x[idx], y[idx]

    history = History()
    loop = Loop(model, opt, cross_entropy, callbacks=[history])
    history.on_eval(loop, 0)
    try:
        loop.run(batch_of, cfg.steps, eval_every=cfg.eval_every)
    except NonFiniteGradientError:  # raised on every rank alike (local steps: at the
        # vote): all stop together
        hist["diverged_at"] = loop.step
        history.on_eval(loop, loop.step)
    hist["test_loss"], hist["test_acc"] = score(test) if rank == 0 else (0.0, 0.0)
    hist["diverged"] = hist["diverged_at"] is not None or not math.isfinite(hist["test_loss"])
    return hist


def _worker(rank: int, world: int, configs: list[Config], data: Splits
            ) -> list[dict[str, Any]]:
    """Module-level entry point for :func:`signsgd.distributed.launch.spawn`."""
    import torch.distributed as dist

    sizes = sorted({cfg.workers or world for cfg in configs})
    groups = {m: None if m == world else dist.new_group(list(range(m))) for m in sizes}
    sets = [d.batch(torch.arange(len(d))) for d in data]  # normalised once per process
    out = [_train(rank, m, groups[m], cfg, sets, data) for cfg in configs
           if rank < (m := cfg.workers or world)]
    return out if rank == 0 else []


def run(world: int, configs: list[Config], data: Splits, timeout: float = 1800.0
        ) -> list[dict[str, Any]]:
    """Train ``configs`` one after the other on ``world`` Gloo processes; rank 0's results.

    A configuration with ``workers = M < world`` runs on ranks ``0..M-1`` only.

    Each result holds ``step`` / ``train_loss`` (the loss on ``data.evaluate``),
    ``test_loss`` / ``test_acc``, ``diverged_at`` (the step whose gradient was not finite,
    or ``None``) and ``diverged``.

    Raises:
        ValueError: a configuration's ``workers`` is not in ``1..world``.
        signsgd.distributed.launch.WorkerError: a worker failed or the launch timed out.

    Example:
        >>> run(1, [Config(steps=2)], synthetic_splits(64, 16, 16))[0]["step"]  # doctest: +SKIP
        [0, 2]
    """
    from signsgd.distributed.launch import spawn

    for cfg in configs:
        if cfg.workers is not None and not 1 <= cfg.workers <= world:
            raise ValueError(f"configuration {cfg.label!r} asks for workers={cfg.workers}; "
                             f"the launch has {world} ranks")
    return spawn(_worker, world, (configs, data), timeout=timeout)[0]
