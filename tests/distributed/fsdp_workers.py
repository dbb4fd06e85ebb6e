"""Worker side of tests/distributed/test_fsdp.py (spawn pickles it by name).

One launch of 6 Gloo ranks runs every case. A case is a mesh of R replicas × S shards over
the first R·S ranks (3 × 2, and the edge meshes 1 × 4 and 4 × 1), a float64 model sharded
over the ``"shard"`` dimension with ``fully_shard(model, mesh=mesh["shard"])`` (uneven: 7
and 3 rows over 2 or 4 shards, an empty shard on some rank) and an optimiser whose reducer
runs on the ``"replicate"`` group. The position of a rank in the mesh (replica i, shard j)
picks its batches, so every reference below is computed from positions alone.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import signsgd
from signsgd.distributed import ErrorFeedbackAllReduce, LocalSteps, MajorityVote
from signsgd.errors import NonFiniteGradientError

LR = 0.01
STEPS = 4


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _batch(position: int, step: int, dtype: torch.dtype = torch.float64
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + position)
    return (torch.randn(4, 5, generator=g, dtype=dtype),
            torch.randn(4, 3, generator=g, dtype=dtype))


def _loss(model: nn.Module, position: int, step: int, dtype: torch.dtype = torch.float64
          ) -> torch.Tensor:
    x, y = _batch(position, step, dtype)
    return (model(x) - y).pow(2).mean()


@functools.cache
def _mesh(shape: tuple[int, int]) -> Any:
    """A replicate × shard DeviceMesh over the first R·S ranks (built on every rank, once
    per worker: creating process groups is the slow part)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(shape[0] * shape[1]).view(shape),
                      mesh_dim_names=("replicate", "shard"))


def _sharded(mesh: Any, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(kwargs.pop("dtype", torch.float64))
    fully_shard(model, mesh=mesh["shard"], **kwargs)
    return model


def _chunk(full: torch.Tensor, j: int, s: int) -> torch.Tensor:
    """Shard ``j`` of ``s`` of ``full`` as FSDP2 cuts it (torch.chunk on dim 0; empty past
    the last chunk)."""
    chunks = full.chunk(s, 0)
    return chunks[j] if j < len(chunks) else full[:0]


def _replica_grads(ref: nn.Module, replica: int, s: int, step: int, micro: int = 1
                   ) -> list[torch.Tensor]:
    """The mean over replica ``replica``'s S ranks of each rank's gradient (summed over its
    ``micro`` micro-batches, as autograd accumulates them) at ``ref``'s parameters."""
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for j in range(s):
        ref.zero_grad()
        for k in range(micro):
            _loss(ref, replica * s + j, step + 100 * k).backward()
        for t, p in zip(total, ref.parameters()):
            t.add_(p.grad)
    return [t / s for t in total]


def _micro(method: str) -> tuple[str, int]:
    """``"signum+accumulation"``: Signum over 2 micro-batches per step (FSDP's gradient
    sync off for the first)."""
    return (method.split("+")[0], 2) if method.endswith("+accumulation") else (method, 1)


def _vote(directions: list[torch.Tensor]) -> torch.Tensor:
    """The majority of the replicas' signs (zero goes out as +1; an odd count: no tie)."""
    return torch.stack([torch.where(d >= 0, 1.0, -1.0).to(d.dtype)
                        for d in directions]).sum(0).sign()


def _central(shape: tuple[int, int], method: str) -> list[torch.Tensor]:
    """Signum or Lion with the vote, computed in one process without FSDP: per replica the
    shard-group mean gradient and its own momentum, the vote across the replicas."""
    r, s = shape
    method, micro = _micro(method)
    ref = _model()
    moms = [[torch.zeros_like(p) for p in ref.parameters()] for _ in range(r)]
    for step in range(STEPS):
        grads = [_replica_grads(ref, i, s, step, micro) for i in range(r)]
        with torch.no_grad():
            for k, p in enumerate(ref.parameters()):
                if method == "signum":
                    for i in range(r):
                        moms[i][k].lerp_(grads[i][k], 1 - 0.9)
                    p.sub_(LR * _vote([moms[i][k] for i in range(r)]))
                else:  # lion, betas (0.9, 0.99)
                    p.sub_(LR * _vote([torch.lerp(moms[i][k], grads[i][k], 1 - 0.9)
                                       for i in range(r)]))
                    for i in range(r):
                        moms[i][k].lerp_(grads[i][k], 1 - 0.99)
    return [p.detach().clone() for p in ref.parameters()]


def _make(method: str, params: Any, group: Any) -> Any:
    if method == "signum":
        return signsgd.Signum(params, lr=LR, momentum=0.9, aggregator=MajorityVote(group=group))
    if method == "lion":
        return signsgd.Lion(params, lr=LR, aggregator=MajorityVote(group=group))
    if method == "efsgd":
        return signsgd.EFSGD(params, lr=0.05, momentum=0.5,
                             aggregator=ErrorFeedbackAllReduce(group=group))
    if method == "onebit-adam":  # 2 warm-up steps (the fp32 mean), then the 1-bit EF
        return signsgd.OneBitAdam(params, lr=LR, freeze_step=2,
                                  aggregator=signsgd.distributed.OneBitAllReduce(group=group))
    if method == "local":
        return LocalSteps(signsgd.Signum(params, lr=LR, momentum=0.9), sync_every=2,
                          outer_lr=LR, outer_momentum=0.5,
                          reducer=MajorityVote(group=group))
    raise ValueError(method)


def _run(shape: tuple[int, int], method: str, reference: str) -> dict[str, Any] | None:
    """``STEPS`` steps of ``method`` on the sharded model. ``reference="central"``: the
    full parameters against :func:`_central`; ``"plain"``: at every step each local shard
    against the same optimiser on plain tensors (this rank's chunks of an unsharded model
    whose gradient is the replica's mean gradient), with its own reducer on the same
    group. Ranks outside the mesh return None (after joining the mesh's groups)."""
    rank = dist.get_rank()
    mesh = _mesh(shape)
    r, s = shape
    if rank >= r * s:
        return None
    i, j = divmod(rank, s)
    model = _sharded(mesh)
    name, micro = _micro(method)
    group = mesh.get_group("replicate")
    opt = _make(name, model.parameters(), group)
    ref = _model()
    plain = [nn.Parameter(_chunk(p.detach(), j, s).clone()) for p in ref.parameters()]
    ref_opt = _make(name, plain, group) if reference == "plain" else None
    equal = []
    for step in range(STEPS):
        full = [p.full_tensor() for p in model.parameters()]
        if ref_opt is not None:
            equal.append(all(torch.equal(p.to_local(), q) for p, q in
                             zip(model.parameters(), plain)))
            with torch.no_grad():
                for p, f in zip(ref.parameters(), full):
                    p.copy_(f)
            for q, g in zip(plain, _replica_grads(ref, i, s, step, micro)):
                q.grad = _chunk(g, j, s).clone()
            ref_opt.step()
        for k in range(micro):
            model.set_requires_gradient_sync(k == micro - 1)
            _loss(model, rank, step + 100 * k).backward()
        opt.step()
        opt.zero_grad()
    out: dict[str, Any] = {"full": [p.full_tensor() for p in model.parameters()],
                           "local_numel": [p.to_local().numel() for p in model.parameters()]}
    if ref_opt is not None:
        equal.append(all(torch.equal(p.to_local(), q) for p, q in
                         zip(model.parameters(), plain)))
        out["equal"] = equal
    else:
        out["expected"] = _central(shape, method)
    return out


def _refusal(rank: int) -> str:
    """An aggregator on the default group (it spans the shard dimension) is refused."""
    mesh = _mesh((3, 2))
    model = _sharded(mesh)
    try:
        signsgd.Signum(model.parameters(), lr=LR, aggregator=MajorityVote())
    except ValueError as exc:
        return str(exc)
    return "not refused"


def _nonfinite(rank: int, method: str) -> dict[str, Any]:
    """A NaN in one shard of one rank's gradient (after FSDP's reduce-scatter): every rank
    raises NonFiniteGradientError and nothing changes (the parameters, and the state of
    the optimisers that raise in the step: LocalSteps' inner optimisers on the finite
    replicas have stepped, as without FSDP). ``"signum-local"``: no aggregator."""
    mesh = _mesh((3, 2))
    model = _sharded(mesh)
    if method == "signum-local":
        opt = signsgd.Signum(model.parameters(), lr=LR, momentum=0.9)
    elif method == "local":
        opt = LocalSteps(signsgd.Signum(model.parameters(), lr=LR, momentum=0.9),
                         sync_every=1, outer_lr=LR, reducer=MajorityVote(
                             group=mesh.get_group("replicate")))
    else:
        opt = _make(method, model.parameters(), mesh.get_group("replicate"))
    _loss(model, rank, 0).backward()
    opt.step()
    opt.zero_grad()
    _loss(model, rank, 1).backward()
    if rank == 0:
        model[0].weight.grad.to_local().view(-1)[0] = float("nan")
    before = [p.to_local().clone() for p in model.parameters()]
    state = [opt.state[p]["momentum_buffer"].to_local().clone() for p in model.parameters()]
    try:
        opt.step()
        error = None
    except NonFiniteGradientError as exc:
        error = type(exc).__name__
    return {"error": error,
            "unchanged": all(torch.equal(a, p.to_local()) for a, p in
                             zip(before, model.parameters())) and
            (method == "local" or all(torch.equal(a, opt.state[p]["momentum_buffer"].to_local())
                                      for a, p in zip(state, model.parameters())))}


def _mixed_precision(rank: int) -> list[torch.Tensor]:
    """bf16 compute, fp32 reduce-scatter: the vote runs on the fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = _mesh((3, 2))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _sharded(mesh, dtype=torch.float32, mp_policy=policy)
    opt = _make("lion", model.parameters(), mesh.get_group("replicate"))
    for step in range(2):
        _loss(model, rank, step, torch.bfloat16).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor() for p in model.parameters()]


def _checkpoint(rank: int, path: str, method: str) -> dict[str, Any]:
    """DCP save after K steps, load into fresh objects on the same mesh, continue: the
    result equals the uninterrupted run's, bit for bit."""
    import torch.distributed.checkpoint as dcp

    from signsgd.distributed.fsdp import TrainState

    mesh = _mesh((3, 2))
    group = mesh.get_group("replicate")

    def steps(model: nn.Module, opt: Any, start: int, stop: int) -> None:
        for step in range(start, stop):
            _loss(model, rank, step).backward()
            opt.step()
            opt.zero_grad()

    model = _sharded(mesh)
    opt = _make(method, model.parameters(), group)
    steps(model, opt, 0, 2)
    dcp.save({"train": TrainState(model, opt)}, checkpoint_id=path)
    steps(model, opt, 2, 4)
    want = [p.full_tensor() for p in model.parameters()]
    model2 = _sharded(mesh)
    opt2 = _make(method, model2.parameters(), group)
    with torch.no_grad():  # the fresh model starts elsewhere: the load must move it
        for p in model2.parameters():
            p.to_local().add_(1.0)
    dcp.load({"train": TrainState(model2, opt2)}, checkpoint_id=path)
    step_after_load = opt2.aggregator.state_dict()["step"]
    steps(model2, opt2, 2, 4)
    got = [p.full_tensor() for p in model2.parameters()]
    return {"equal": all(torch.equal(a, b) for a, b in zip(want, got)),
            "step": step_after_load}


def fsdp2(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Every case in order (every rank joins every mesh's groups)."""
    out: dict[str, Any] = {}
    for name, shape, method, reference in CASES:
        out[name] = _run(shape, method, reference)
    out["refusal"] = _refusal(rank)
    for method in NONFINITE:
        out[f"nonfinite-{method}"] = _nonfinite(rank, method)
    out["mixed"] = _mixed_precision(rank)
    for method in CHECKPOINTED:
        out[f"checkpoint-{method}"] = _checkpoint(rank, f"{tmp}/{method}", method)
    return out


#: (name, (replicas, shards), method, reference)
CASES = [
    ("signum 3x2", (3, 2), "signum", "central"),
    ("lion 3x2", (3, 2), "lion", "central"),
    ("signum 3x2, 2 micro-batches", (3, 2), "signum+accumulation", "central"),
    ("signum 1x4", (1, 4), "signum", "central"),
    ("signum 4x1", (4, 1), "signum", "plain"),
    ("efsgd 3x2", (3, 2), "efsgd", "plain"),
    ("local steps 3x2", (3, 2), "local", "plain"),
    ("onebit-adam 3x2", (3, 2), "onebit-adam", "plain"),
]

#: the optimisers the checkpoint case saves and resumes
CHECKPOINTED = ("signum", "efsgd")

#: the optimisers the NaN case steps (signum-local: without an aggregator)
NONFINITE = ("signum", "signum-local", "local")
