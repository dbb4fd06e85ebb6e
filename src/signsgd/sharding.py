"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensors) under an
optimiser that communicates: the local shards it steps, the check that its reducer runs
across replicas only, and the finite flag agreed inside each shard group.

HSDP with a vote: the model is sharded over the ``"shard"`` dimension of a 2-D
``DeviceMesh`` (replicate × shard); FSDP's reduce-scatter averages the gradient inside the
shard group, and the reducer, on the ``"replicate"`` group, replaces HSDP's cross-replica
all-reduce. Every rank of a replicate group holds the same shard of every parameter, so the
optimiser reduces each rank's local shard (``p.to_local()``) as if it were a whole tensor.

Example:
    >>> import torch
    >>> local(torch.ones(2)).shape   # not a DTensor: the tensor itself
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["is_sharded", "local", "like", "check_replica_group", "agree_finite"]


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (an FSDP2 parameter)."""
    dtensor = _dtensor()
    return any(isinstance(t, dtensor) for t in tensors)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the DTensor), otherwise
    ``t`` itself."""
    return t.to_local() if isinstance(t, _dtensor()) else t


def _shard_dims(p: Any) -> list[int]:
    """The mesh dimensions over which ``p`` (a DTensor) is not replicated."""
    return [d for d, placement in enumerate(p.placements) if not placement.is_replicate()]


def check_replica_group(owner: str, reducer: Any, params: Iterable[Tensor]) -> None:
    """Raise ``ValueError`` unless every rank of ``reducer``'s group that is on a DTensor
    parameter's mesh holds the same shard of it as this rank (the group runs across the
    replicas, not across the shards). Ranks of the group outside a parameter's mesh (with
    ``fully_shard(model, mesh=mesh["shard"])`` the other replicas) hold the same shard of
    their own copy; the step header checks that the local shapes agree.

    Example:
        >>> import torch
        >>> check_replica_group("Signum", None, [torch.ones(1)])   # nothing sharded
    """
    dtensor = _dtensor()
    sharded = [p for p in params if isinstance(p, dtensor)]
    if not sharded:
        return
    import torch.distributed as dist

    group = getattr(reducer, "group", None)
    members = dist.get_process_group_ranks(dist.group.WORLD if group is None else group)
    me = dist.get_rank()
    seen: set[int] = set()
    for p in sharded:
        mesh = p.device_mesh
        if id(mesh) in seen:
            continue
        seen.add(id(mesh))
        here = mesh.get_coordinate()
        dims = _shard_dims(p)
        for q in members:
            where = (mesh.mesh == q).nonzero()
            if where.numel() == 0:
                continue
            there = where[0].tolist()
            if any(there[d] != here[d] for d in dims):
                raise ValueError(
                    f"{owner} cannot use aggregator {type(reducer).__name__} on its group "
                    f"(ranks {members}{', the default group' if group is None else ''}): "
                    f"rank {q} holds another shard than rank {me} of an FSDP2 parameter "
                    f"(DTensor on {mesh} with placements {tuple(p.placements)}). With FSDP2 "
                    "the reducer's group must run across the replicas only: shard the model "
                    "over one dimension of a 2-D mesh, fully_shard(model, "
                    "mesh=mesh['shard']), and give the reducer the other, e.g. "
                    "MajorityVote(group=mesh.get_group('replicate'))"
                )


def agree_finite(finite: bool | Tensor, params: Iterable[Tensor]) -> bool | Tensor:
    """``finite`` and-ed over every shard group of the DTensors in ``params`` (one tiny
    ``all_reduce`` per mesh and sharded dimension, the same on every rank), so that a NaN
    in one shard stops every replica's step, not only the replicas of that shard.
    ``finite`` unchanged when nothing is sharded."""
    dtensor = _dtensor()
    meshes: dict[int, tuple[Any, list[int]]] = {}
    for p in params:
        if isinstance(p, dtensor):
            meshes.setdefault(id(p.device_mesh), (p.device_mesh, _shard_dims(p)))
    if not meshes:
        return finite
    import torch.distributed as dist

    mesh = next(iter(meshes.values()))[0]
    device = finite.device if isinstance(finite, Tensor) else torch.device(mesh.device_type)
    flag = torch.as_tensor(finite, device=device).to(torch.int32).reshape(())
    for mesh, dims in meshes.values():
        for d in dims:
            if mesh.size(d) > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(d))
    return bool(flag.item()) if not isinstance(finite, Tensor) else flag.bool()


def like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` (a local shard of ``p``'s layout) as a tensor like ``p``: a DTensor with
    ``p``'s mesh and placements when ``p`` is one, otherwise ``t`` itself."""
    dtensor = _dtensor()
    if not isinstance(p, dtensor):
        return t
    return dtensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())
