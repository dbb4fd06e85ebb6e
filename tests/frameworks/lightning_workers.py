"""Lightning recipes (tests/frameworks/test_lightning.py), each next to the same training
written with plain torch + signsgd on the same batches.

The module is imported by spawned workers too, so it must not import pytest.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import signsgd
from signsgd.distributed import MajorityVote, MajorityVoteHookState, majority_vote_hook

STEPS = 6
BATCH = 8


def quiet() -> None:
    """Silence Lightning's banners and advice (they are not what the tests check)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")


def data(rank: int = 0, world: int = 1) -> TensorDataset:
    """A small regression problem; rank ``rank`` of ``world`` gets every world-th sample."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH * 2, 6, generator=gen)
    y = x @ torch.randn(6, 1, generator=gen) + 0.1 * torch.randn(len(x), 1, generator=gen)
    return TensorDataset(x[rank::world], y[rank::world])


def net() -> nn.Module:
    """The model, the same initial weights on every call and every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


MakeOptimizer = Callable[[Any], Any]


def signum_with_steplr(params: Any) -> dict[str, Any]:
    """Signum with a per-step StepLR schedule, as configure_optimizers returns it."""
    opt = signsgd.Signum(params, lr=0.01, momentum=0.9, weight_decay=1e-3)
    return {"optimizer": opt, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "interval": "step"}}


def lion_with_cosine(params: Any) -> dict[str, Any]:
    """Lion with a per-step cosine schedule."""
    opt = signsgd.Lion(params, lr=0.003, betas=(0.9, 0.99), weight_decay=0.1)
    return {"optimizer": opt, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
        "interval": "step"}}


def signum_voted(params: Any) -> dict[str, Any]:
    """Signum whose step majority-votes across the ranks (no DDP)."""
    opt = signsgd.Signum(params, lr=0.01, momentum=0.9, aggregator=MajorityVote())
    return {"optimizer": opt, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "interval": "step"}}


def sgd_after_vote(params: Any) -> Any:
    """What the DDP hook needs: plain SGD without momentum applies the ±1 verdict."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.0)


OPTIMISERS: dict[str, MakeOptimizer] = {
    "signum_steplr": signum_with_steplr, "lion_cosine": lion_with_cosine,
    "signum_voted": signum_voted, "sgd_after_vote": sgd_after_vote,
}


class Regressor(L.LightningModule):
    """A LightningModule whose configure_optimizers returns one of :data:`OPTIMISERS`."""

    def __init__(self, optimiser: str) -> None:
        super().__init__()
        self.net = net()
        self.optimiser = optimiser

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return OPTIMISERS[self.optimiser](self.parameters())


def trainer(**kwargs: Any) -> L.Trainer:
    """A CPU Trainer of STEPS steps without logging, checkpoints or progress bars."""
    return L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def plain_loop(model: nn.Module, optimiser: str, loader: DataLoader,
               precision: str = "32-true") -> list[torch.Tensor]:
    """The same training written by hand: zero_grad, forward (under bf16 autocast for
    ``precision="bf16-mixed"``), backward, step, scheduler step."""
    made = OPTIMISERS[optimiser](model.parameters())
    opt, sched = (made["optimizer"], made["lr_scheduler"]["scheduler"]) if isinstance(
        made, dict) else (made, None)
    batches = iter(loader)
    for _ in range(STEPS):
        x, y = next(batches)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach().clone() for p in model.parameters()]


def fit_single(optimiser: str, precision: str = "32-true") -> dict[str, Any]:
    """One process: Lightning fit vs the plain loop; the parameters of both and the lr."""
    quiet()
    loader = DataLoader(data(), batch_size=BATCH, shuffle=False)
    module = Regressor(optimiser)
    fresh = copy.deepcopy(module.net)
    trainer(devices=1, precision=precision).fit(module, loader)
    return {"lightning": [p.detach().clone() for p in module.net.parameters()],
            "plain": plain_loop(fresh, optimiser, loader, precision),
            "lr": module.optimizers().param_groups[0]["lr"]}


class VoteInDDP(L.Callback):
    """Registers the majority-vote hook on the DDP model Lightning built (any device).

    ``DDPStrategy(ddp_comm_hook=...)`` registers a hook only when the device is CUDA; on
    CPU it drops it without a word. ``on_fit_start`` runs after the strategy wrapped the
    model in DDP and before the first forward pass.
    """

    def __init__(self, state: MajorityVoteHookState) -> None:
        self.state = state

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ddp = trainer.strategy.model
        self.state.bind(ddp)  # parameter names key the momentum in state.state_dict()
        ddp.register_comm_hook(self.state, majority_vote_hook)


def fit_ddp(rank: int, world: int, hook_by: str) -> dict[str, Any]:
    """DDPStrategy with the majority-vote hook given by ``hook_by``: "callback"
    (:class:`VoteInDDP`) or "strategy" (``DDPStrategy(ddp_comm_hook=...)``)."""
    quiet()
    loader = DataLoader(data(rank, world), batch_size=BATCH, shuffle=False)
    module = Regressor("sgd_after_vote")
    state = MajorityVoteHookState(momentum=0.9)
    if hook_by == "callback":
        strategy, callbacks = DDPStrategy(process_group_backend="gloo"), [VoteInDDP(state)]
    else:
        strategy, callbacks = DDPStrategy(ddp_comm_hook=majority_vote_hook, ddp_comm_state=state,
                                          process_group_backend="gloo"), []
    fit = trainer(devices=world, strategy=strategy, callbacks=callbacks,
                  use_distributed_sampler=False)
    fit.fit(module, loader)
    return {"params": [p.detach().clone() for p in module.net.parameters()],
            "hook_steps": state.step,
            "momentum_names": sorted(state.state_dict()["momentum"]),
            "rank": fit.global_rank, "world": fit.world_size}


def plain_ddp_hook(rank: int, world: int) -> list[torch.Tensor]:
    """The same training by hand: torch DDP + the hook + SGD(momentum=0), same batches."""
    model = net()
    ddp = DDP(model)
    ddp.register_comm_hook(MajorityVoteHookState(momentum=0.9), majority_vote_hook)
    opt = sgd_after_vote(ddp.parameters())
    batches = iter(DataLoader(data(rank, world), batch_size=BATCH, shuffle=False))
    for _ in range(STEPS):
        x, y = next(batches)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def fit_voted(rank: int, world: int) -> dict[str, Any]:
    """Each rank its own single-device Trainer; Signum(aggregator=MajorityVote()) votes."""
    quiet()
    loader = DataLoader(data(rank, world), batch_size=BATCH, shuffle=False)
    module = Regressor("signum_voted")
    fresh = copy.deepcopy(module.net)
    fit = trainer(devices=1)
    fit.fit(module, loader)
    return {"lightning": [p.detach().clone() for p in module.net.parameters()],
            "plain": plain_loop(fresh, "signum_voted", loader),
            "rank": fit.global_rank, "world": fit.world_size}


def distributed_cases(rank: int, world: int) -> dict[str, Any]:
    """The multi-process recipes in one launch (importing Lightning takes seconds)."""
    return {"hook_by_callback": fit_ddp(rank, world, "callback"),
            "hook_by_strategy": fit_ddp(rank, world, "strategy"),
            "plain_hook": plain_ddp_hook(rank, world), "voted": fit_voted(rank, world)}
