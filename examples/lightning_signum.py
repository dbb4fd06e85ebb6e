"""PyTorch Lightning + signsgd: Signum from ``configure_optimizers``; majority vote over DDP.

    python examples/lightning_signum.py        # one process: Signum + a StepLR schedule
    python examples/lightning_signum.py 2      # Lightning starts 2 CPU processes (DDP):
                                               # the 1-bit majority-vote hook + SGD

``DDPStrategy(ddp_comm_hook=...)`` registers a hook on CUDA only (Lightning 2.6 drops it on
CPU without a word), so the hook is registered by a callback, which works on any device.
"""

import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import signsgd
from signsgd.distributed import MajorityVoteHookState, majority_vote_hook


class MajorityVote(L.Callback):
    """Replace DDP's gradient all-reduce by the majority-vote hook (Signum momentum 0.9)."""

    def __init__(self) -> None:
        self.state = MajorityVoteHookState(momentum=0.9)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ddp = trainer.strategy.model              # the DDP wrapper Lightning built
        self.state.bind(ddp)                      # names for state.state_dict()
        ddp.register_comm_hook(self.state, majority_vote_hook)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Let the hook's communication thread finish its last callback before the process
        # can exit (else it may abort at exit: docs/frameworks.md, "Exit").
        trainer.strategy.barrier()


class Classifier(L.LightningModule):
    def __init__(self, voted: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        self.voted = voted

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        if self.voted:  # the hook sends the ±1 vote as the gradient; SGD applies it
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.0)
        opt = signsgd.Signum(self.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(0)
    x = torch.randn(4096, 32)
    y = (x @ torch.randn(32, 10)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=world, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        strategy="ddp" if world > 1 else "auto",
                        callbacks=[MajorityVote()] if world > 1 else [])
    model = Classifier(voted=world > 1)
    trainer.fit(model, loader)
    with torch.no_grad():
        acc = (model.net(x).argmax(1) == y).float().mean().item()
    if trainer.global_rank == 0:
        print(f"{world} process(es): accuracy {acc:.3f} after {trainer.global_step} steps")
