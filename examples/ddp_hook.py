"""DistributedDataParallel + the majority-vote comm hook + plain ``torch.optim.SGD``.

Run with torchrun (one process per GPU or CPU slot):

    torchrun --nproc_per_node 3 examples/ddp_hook.py

or simply ``python examples/ddp_hook.py``, which starts 3 local Gloo processes itself.

The hook keeps each rank's Signum momentum and replaces DDP's gradient all-reduce by a
1-bit majority vote, bucket by bucket while backward is still running. The optimiser then
sees the ±1 verdict as the gradient, so ``SGD(lr, momentum=0, weight_decay=wd)`` applies
``x ← x − lr·(vote + wd·x)``: signSGD/Signum with majority vote (Algorithm 3, Bernstein et
al.), decoupled weight decay after the vote. Keep SGD's momentum at 0 — the momentum lives
in the hook, before the vote.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from signsgd.distributed import MajorityVoteHookState, majority_vote_hook


def train(rank: int, world: int) -> None:
    """One rank's training loop (the process group is already initialised)."""
    torch.manual_seed(0)  # same data and same initial model on every rank
    x = torch.randn(8192, 32)
    y = (x @ torch.randn(32, 10)).argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    # A small bucket cap so this small model gets several buckets (several votes that
    # overlap with backward); the default 25 MB suits real models.
    ddp = DDP(model, bucket_cap_mb=0.05)
    state = MajorityVoteHookState(momentum=0.9, module=ddp)  # module: names for checkpoints
    ddp.register_comm_hook(state, majority_vote_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.0, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    mine = torch.arange(rank, len(x), world)  # this rank's shard
    batch, steps = 64, len(x) // world // 64
    gen = torch.Generator().manual_seed(1 + rank)
    d = sum(p.numel() for p in model.parameters())
    fp32 = 2 * (world - 1) * -(-d // world) * 4  # what DDP's default all-reduce sends
    for epoch in range(4):
        perm = mine[torch.randperm(len(mine), generator=gen)]
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss_fn(ddp(x[idx]), y[idx]).backward()  # the votes run here
            opt.step()
        with torch.no_grad():
            logits = model(x)
            loss, acc = loss_fn(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {loss:.4f}  accuracy {acc:.3f}  "
                  f"{state.bytes_sent} B sent / {state.bytes_received} B received per step "
                  f"for {d} parameters (fp32 ring all-reduce: {fp32} B)", flush=True)

    # Per-rank checkpoint of the hook's momentum (save one file per rank next to the model).
    ckpt = state.state_dict()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    if rank == 0:
        print(f"{world} ranks, {state.step} steps, {state.votes} votes "
              f"({state.buckets} buckets in the last step); parameters identical "
              f"on every rank: {all(torch.equal(flat, o) for o in everyone)}; checkpoint "
              f"holds momentum for {len(ckpt['momentum'])} parameters")


def _spawned(rank: int, world: int) -> None:
    train(rank, world)


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        # A dead or stalled rank ends in an error on every rank after 5 minutes, not a hang.
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
        train(dist.get_rank(), dist.get_world_size())
        dist.destroy_process_group()
    else:  # plain `python examples/ddp_hook.py`: start 3 local Gloo processes
        from signsgd.distributed.launch import spawn

        spawn(_spawned, int(sys.argv[1]) if len(sys.argv) > 1 else 3, timeout=600)
