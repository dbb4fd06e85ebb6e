"""FSDP2 / HSDP with a 1-bit vote across the replicas (Gloo, CPU).

    python examples/fsdp2_hsdp.py 4                        # 4 local Gloo processes: 2 × 2
    torchrun --nproc_per_node 4 examples/fsdp2_hsdp.py

The ranks form a replicate × shard mesh (2 shards per replica). The model is sharded with
FSDP2 inside each replica, whose reduce-scatter averages the gradient over the shard group
(the fast link); across the replicas (the slow link) Signum's 1-bit majority vote on each
rank's local shard replaces HSDP's all-reduce. Compared with an HSDP script, two lines
change: ``fully_shard`` gets the shard dimension of the mesh, and the optimiser gets the
replicate group.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import signsgd
from signsgd.distributed import MajorityVote

SHARDS = 2


def train(rank: int = 0, world: int = 1) -> None:
    if not dist.is_initialized():  # torchrun: join its process group
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // SHARDS, SHARDS),
                            mesh_dim_names=("replicate", "shard"))

    torch.manual_seed(0)  # the same data set and initial model on every rank
    x = torch.randn(4096, 32)
    y = (x @ torch.randn(32, 10)).argmax(dim=1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    fully_shard(model, mesh=mesh["shard"])                           # HSDP: mesh=mesh
    vote = MajorityVote(group=mesh.get_group("replicate"))           # added
    opt = signsgd.Signum(model.parameters(), lr=5e-3, momentum=0.9,  # was torch.optim.AdamW
                         aggregator=vote)

    gen = torch.Generator().manual_seed(1 + rank)  # each rank draws its own batches
    for _ in range(60):
        idx = torch.randint(len(x), (32,), generator=gen)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()

    full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(everyone, full)
    shard = sum(p.to_local().numel() for p in model.parameters())
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    replicas = mesh.size(0)
    bf16 = 2 * (replicas - 1) * -(-shard // replicas) * 2  # HSDP's bf16 ring all-reduce
    if rank == 0:
        print(f"{replicas} replicas x {SHARDS} shards: accuracy {acc:.3f}, identical on "
              f"every rank: {all(torch.equal(full, o) for o in everyone)}, cross-replica "
              f"bytes sent per step {vote.bytes_sent} (bf16 HSDP all-reduce: {bf16})",
              flush=True)
    dist.barrier()


if __name__ == "__main__":
    if len(sys.argv) > 1 and "RANK" not in os.environ:
        from signsgd.distributed.launch import spawn

        spawn(train, int(sys.argv[1]), timeout=600)
    else:
        train()
