"""HF accelerate + signsgd: Signum through ``accelerator.prepare``; with several processes,
the 1-bit majority-vote hook on the prepared DDP model.

    python examples/accelerate_signum.py                      # one process: Signum
    accelerate launch --cpu --num_processes 2 examples/accelerate_signum.py
    python examples/accelerate_signum.py 2                    # 2 local Gloo processes
"""

import os
import sys

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import signsgd
from signsgd.distributed import MajorityVoteHookState, majority_vote_hook


def train(rank: int = 0, world: int = 1) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)  # the same data and initial model on every process
    x = torch.randn(4096, 32)
    y = (x @ torch.randn(32, 10)).argmax(dim=1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    voted = accelerator.num_processes > 1
    opt = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.0) if voted  # applies the vote
           else signsgd.Signum(model.parameters(), lr=1e-3, momentum=0.9))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if voted:  # the prepared model is a DistributedDataParallel
        state = MajorityVoteHookState(momentum=0.9, module=model)
        model.register_comm_hook(state, majority_vote_hook)
    for _ in range(2):
        for xb, yb in loader:
            with accelerator.accumulate(model):  # no_sync() on the first micro-batch
                accelerator.backward(nn.functional.cross_entropy(model(xb), yb))
                opt.step()                       # runs on the second micro-batch only
                opt.zero_grad()
    with torch.no_grad():
        acc = (accelerator.unwrap_model(model)(x).argmax(1) == y).float().mean().item()
    accelerator.print(f"{accelerator.num_processes} process(es): accuracy {acc:.3f}"
                      + (f", {state.step} majority votes" if voted else ""))
    # Let the hook's communication thread finish its last callback before the interpreter
    # exits (else it may abort at exit: docs/frameworks.md, "Exit").
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    if len(sys.argv) > 1 and "RANK" not in os.environ:
        from signsgd.distributed.launch import spawn

        # OMP_NUM_THREADS: else accelerate sets torch's threads to cores / processes.
        spawn(train, int(sys.argv[1]), env={"OMP_NUM_THREADS": "1"}, timeout=600)
    else:
        train()
