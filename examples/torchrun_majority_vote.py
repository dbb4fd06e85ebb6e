"""Signum with 1-bit majority vote across processes, started by torchrun (Gloo, CPU).

Run (any number of processes; add --nnodes/--rdzv_endpoint for several machines):

    torchrun --nproc_per_node 2 examples/torchrun_majority_vote.py

Every process trains the same small classifier on its own shard of a synthetic data set.
Each step, every worker sends the sign of its own Signum momentum (1 bit per coordinate)
and applies the majority verdict (1 bit per coordinate back): Algorithm 3 of Bernstein
et al. (ICML 2018), with decoupled weight decay after the vote. On GPUs use
``init_process_group("nccl")`` and move the model and data to ``cuda:LOCAL_RANK``.
"""

import datetime
import os

import torch
import torch.distributed as dist

import signsgd
from signsgd.distributed import MajorityVote


def main() -> None:
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...; a dead or stalled rank ends in an
    # error on every rank after the timeout instead of a hang.
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))

    # The same seed on every rank: the same data set and the same initial model.
    torch.manual_seed(0)
    x = torch.randn(8192, 32)
    y = (x @ torch.randn(32, 10)).argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    mine = torch.arange(rank, len(x), world)  # this rank's shard of the data
    batch, steps_per_epoch = 64, len(x) // world // 64  # same number of steps everywhere

    agg = MajorityVote()  # mode="sharded": ~2·d/8 bytes each way per rank and step
    opt = signsgd.Signum(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
                         aggregator=agg)
    loss_fn = torch.nn.CrossEntropyLoss()
    d = sum(p.numel() for p in model.parameters())
    fp32 = 2 * (world - 1) * -(-d // world) * 4  # what torch.distributed.all_reduce sends
    gen = torch.Generator().manual_seed(1 + rank)  # each rank shuffles its own shard

    for epoch in range(5):
        perm = mine[torch.randperm(len(mine), generator=gen)]
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            logits = model(x)
            loss = loss_fn(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {loss:.4f}  accuracy {acc:.3f}  "
                  f"sent {agg.bytes_sent} B/step (an fp32 ring all-reduce: {fp32} B)",
                  flush=True)

    # Every rank applied the same verdicts, so the models are identical: check it.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    if rank == 0:
        same = all(torch.equal(flat, other) for other in everyone)
        print(f"{world} ranks, {d} parameters, identical on every rank: {same}; "
              f"total sent {agg.total_bytes_sent} B, received {agg.total_bytes_received} B")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
