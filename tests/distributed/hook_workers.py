"""Worker functions for tests/distributed/test_hooks.py and test_byzantine.py.

Module level, because :func:`signsgd.distributed.launch.spawn` pickles them by name.

Each function runs on one rank of a real Gloo group started by
:func:`signsgd.distributed.launch.spawn` and returns plain tensors / numbers.
"""

import copy
import io
import pickle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import signsgd
from signsgd.distributed import NonFiniteGradientError
from signsgd.distributed.hooks import MajorityVoteHookState, majority_vote_hook


class Shuffled(nn.Module):
    """Parameters registered in another order than backward produces their gradients.

    DDP builds its first buckets in reverse registration order and rebuilds them after the
    first iteration in the order gradients became ready, so the bucket holding a given
    parameter (and its offset) changes: a hook that keys momentum by bucket index breaks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h) * self.scale)
        return self.head(h)


def _model(seed: int = 0) -> Shuffled:
    torch.manual_seed(seed)
    return Shuffled()


def _batches(rank: int, steps: int, seed: int = 100) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + rank)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(steps)]


def _recording_hook(
    state: MajorityVoteHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """majority_vote_hook that also records which parameters each bucket holds."""
    names = tuple(state._names.get(id(p), "?") for p in bucket.parameters())
    numel = bucket.buffer().numel()
    state.trace.append((state.step, bucket.index(), names, numel))  # type: ignore[attr-defined]
    return majority_vote_hook(state, bucket)


def _ddp(model: nn.Module, bucket_cap_mb: float, momentum: float, mode: str,
         record: bool = False, betas: tuple[float, float] | None = None
         ) -> tuple[DDP, MajorityVoteHookState]:
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = MajorityVoteHookState(momentum=momentum, mode=mode, module=ddp, betas=betas)
    if record:
        state.trace = []  # type: ignore[attr-defined]
        ddp.register_comm_hook(state, _recording_hook)
    else:
        ddp.register_comm_hook(state, majority_vote_hook)
    return ddp, state


def _train_ddp(ddp: DDP, opt: torch.optim.Optimizer,
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses


def hook_vs_signum(rank: int, world: int, steps: int, bucket_cap_mb: float, momentum: float,
                   lr: float, mode: str, weight_decay: float = 0.0,
                   byzantine_rank: int | None = None,
                   betas: tuple[float, float] | None = None) -> dict[str, Any]:
    """DDP + hook + SGD next to Signum(aggregator=MajorityVote()) on the same batches (with
    ``betas``: next to Lion(aggregator=MajorityVote()), the hook in its Lion mode).

    Returns, per step, the largest |difference| between the two models' parameters, the
    final DDP parameters, the hook's bucket trace and its byte counters.
    """
    from signsgd.distributed import MajorityVote
    from signsgd.distributed.adversary import Negate

    bad = Negate() if rank == byzantine_rank else None
    base = _model()
    ddp, state = _ddp(copy.deepcopy(base), bucket_cap_mb, momentum, mode, record=True,
                      betas=betas)
    state.adversary = bad
    sgd = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.0, weight_decay=weight_decay)
    ref = copy.deepcopy(base)
    vote = MajorityVote(mode=mode, adversary=bad)
    if betas is None:
        opt: torch.optim.Optimizer = signsgd.Signum(
            ref.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
            aggregator=vote)
    else:
        opt = signsgd.Lion(ref.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                           aggregator=vote)
    key = "momentum_buffer" if betas is None else "exp_avg"
    diffs = []
    bytes_per_step = []
    for x, y in _batches(rank, steps):
        sgd.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        sgd.step()
        bytes_per_step.append((state.bytes_sent, state.bytes_received))
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        diffs.append(max(
            float((a - b).abs().max())
            for a, b in zip(ddp.module.parameters(), ref.parameters())
        ))
    # Momentum: the hook's per-parameter momentum equals Signum's buffers bit for bit.
    mom_equal = all(
        torch.equal(state.momentum_of(p), opt.state[q][key])
        for p, q in zip(ddp.module.parameters(), ref.parameters())
    ) if momentum or betas else True
    return {
        "diffs": diffs,
        "params": [p.detach().clone() for p in ddp.module.parameters()],
        "trace": state.trace,  # type: ignore[attr-defined]
        "steps": state.step,
        "votes": state.votes,
        "buckets": state.buckets,
        "bytes_per_step": bytes_per_step,
        "total": (state.total_bytes_sent, state.total_bytes_received),
        "momentum_equal": mom_equal,
        "numel": sum(p.numel() for p in base.parameters()),
    }


def hook_checkpoint(rank: int, world: int, steps: int, split: int,
                    bucket_cap_mb: float) -> dict[str, Any]:
    """Train ``steps`` steps straight; and ``split`` steps, checkpoint, resume in a fresh
    DDP model with a fresh (loaded) hook state, then the rest. Also pickle the state."""
    batches = _batches(rank, steps, seed=7)
    lr, beta = 0.01, 0.8
    ddp, state = _ddp(_model(3), bucket_cap_mb, beta, "sharded")
    sgd = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.0)
    _train_ddp(ddp, sgd, batches[:split])
    ckpt = {"model": copy.deepcopy(ddp.module.state_dict()), "hook": state.state_dict()}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    _train_ddp(ddp, sgd, batches[split:])
    straight = [p.detach().clone() for p in ddp.module.parameters()]

    # Pickle round trip of the live state: no process group inside, momentum by name.
    blob = pickle.dumps(state)
    clone = pickle.loads(blob)
    clone.bind(ddp)
    pickled_ok = clone.process_group is None and all(
        torch.equal(clone.momentum_of(p), state.momentum_of(p)) for p in ddp.parameters()
    ) and (clone.step, clone.votes) == (state.step, state.votes)

    buf.seek(0)
    ckpt = torch.load(buf)
    model2 = _model(99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    ddp2, state2 = _ddp(model2, bucket_cap_mb, beta, "sharded")
    state2.load_state_dict(ckpt["hook"])
    sgd2 = torch.optim.SGD(ddp2.parameters(), lr=lr, momentum=0.0)
    _train_ddp(ddp2, sgd2, batches[split:])
    resumed = [p.detach().clone() for p in ddp2.module.parameters()]
    return {
        "identical": all(torch.equal(a, b) for a, b in zip(straight, resumed)),
        "pickled_ok": pickled_ok,
        "pickle_has_group": b"ProcessGroup" in blob,
        "steps": (state.step, state2.step),
        "ckpt_keys": sorted(ckpt["hook"]["momentum"]),
    }


def hook_nonfinite(rank: int, world: int, bad_rank: int) -> dict[str, Any]:
    """One good step, then ``bad_rank`` feeds a NaN: every rank's backward must raise and
    nothing may change. The loop skips that step and trains on: the result must equal
    ``Signum(aggregator=MajorityVote())`` fed the same batches (it also raises on every
    rank at the bad step and changes nothing)."""
    from signsgd.distributed import MajorityVote

    base = _model(5)
    ddp, state = _ddp(copy.deepcopy(base), 0.0002, 0.9, "sharded")
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.0)
    ref = copy.deepcopy(base)
    opt = signsgd.Signum(ref.parameters(), lr=0.01, momentum=0.9, aggregator=MajorityVote())
    batches = _batches(rank, 5, seed=40)
    if rank == bad_rank:
        x2 = batches[1][0].clone()
        x2[0, 0] = float("nan")
        batches[1] = (x2, batches[1][1])
    out: dict[str, Any] = {}
    for i, (x, y) in enumerate(batches):
        if i == 1:
            before = [p.detach().clone() for p in ddp.module.parameters()]
            mom_before = [state.momentum_of(p).clone() for p in ddp.module.parameters()]
        sgd.zero_grad()
        try:
            nn.functional.mse_loss(ddp(x), y).backward()
            sgd.step()
        except Exception as exc:  # noqa: BLE001 - the test inspects type and text
            out.setdefault("errors", []).append((i, f"{type(exc).__name__}: {exc}"))
        if i == 1:
            out["params_unchanged"] = all(
                torch.equal(a, b) for a, b in zip(before, ddp.module.parameters()))
            out["momentum_unchanged"] = all(
                torch.equal(a, state.momentum_of(p))
                for a, p in zip(mom_before, ddp.module.parameters()))
            out["step_after_error"] = state.step
        opt.zero_grad()
        try:
            nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
        except NonFiniteGradientError:
            out.setdefault("signum_errors", []).append(i)
    out["step"] = state.step
    out["params"] = [p.detach().clone() for p in ddp.module.parameters()]
    out["equals_signum"] = all(
        torch.equal(a, b) for a, b in zip(ddp.module.parameters(), ref.parameters()))
    return out


def hook_suite(rank: int, world: int) -> dict[str, Any]:
    """Everything test_hooks checks on one odd-sized group, in one launch (spawns are slow).

    """
    return {
        "vs_signum": hook_vs_signum(rank, world, 6, 0.0002, 0.9, 0.01, "sharded"),
        "vs_signum_allgather": hook_vs_signum(rank, world, 3, 0.0002, 0.5, 0.02, "allgather"),
        "vs_signum_wd": hook_vs_signum(rank, world, 4, 0.0002, 0.9, 0.01, "sharded", 0.5),
        "vs_signum_byzantine": hook_vs_signum(rank, world, 3, 0.0002, 0.9, 0.01, "sharded",
                                              byzantine_rank=2),
        "vs_lion": hook_vs_signum(rank, world, 5, 0.0002, 0.9, 0.01, "sharded",
                                  betas=(0.9, 0.99)),
        "vs_lion_allgather": hook_vs_signum(rank, world, 3, 0.0002, 0.9, 0.02, "allgather",
                                            betas=(0.5, 0.75)),
        "checkpoint": hook_checkpoint(rank, world, 6, 3, 0.0002),
        "nonfinite": hook_nonfinite(rank, world, bad_rank=1),
    }


def hook_even(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Even world (ties): a sharded and an allgather DDP model side by side, signSGD (β=0)
    and Signum; every rank and both modes must end with the same parameters."""
    out: dict[str, Any] = {}
    for beta in (0.0, 0.9):
        params = {}
        for mode in ("sharded", "allgather"):
            ddp, state = _ddp(_model(11), 0.0002, beta, mode)
            sgd = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.0, weight_decay=0.1)
            _train_ddp(ddp, sgd, _batches(rank, steps, seed=3))
            params[mode] = [p.detach().clone() for p in ddp.module.parameters()]
            out[f"bytes/{beta}/{mode}"] = (state.total_bytes_sent, state.total_bytes_received)
        out[f"params/{beta}"] = params["sharded"]
        out[f"modes_agree/{beta}"] = all(
            torch.equal(a, b) for a, b in zip(params["sharded"], params["allgather"]))
    return out


# --------------------------------------------------------------------------- Byzantine
def _regression(rank: int, dim: int, n: int) -> dict[str, torch.Tensor]:
    """A linear regression problem: a shared teacher and test set, this rank's own data."""
    shared = torch.Generator().manual_seed(2019)
    w_star = torch.randn(dim, 1, generator=shared)
    x_test = torch.randn(512, dim, generator=shared)
    own = torch.Generator().manual_seed(500 + rank)
    x = torch.randn(n, dim, generator=own)
    y = x @ w_star + 0.1 * torch.randn(n, 1, generator=own)
    return {"x": x, "y": y, "x_test": x_test, "y_test": x_test @ w_star}


def _fit(opt_name: str, data: dict[str, torch.Tensor], adversary: Any, group: Any,
         steps: int, rank: int) -> tuple[list[float], list[torch.Tensor]]:
    """Train a linear model; return the test loss at the start and after every
    ``steps // 5`` steps, and the final parameters."""
    from signsgd.compression import Identity
    from signsgd.distributed import AllReduce, MajorityVote

    torch.manual_seed(0)
    model = nn.Linear(data["x"].shape[1], 1)
    if opt_name == "signum_vote":
        opt: torch.optim.Optimizer = signsgd.Signum(
            model.parameters(), lr=0.04, momentum=0.9,
            aggregator=MajorityVote(group=group, adversary=adversary))
    elif opt_name == "local_vote":  # H = 4 local SGD steps, then a vote on sign(x0 - x_m)
        from signsgd.distributed import LocalSteps

        opt = LocalSteps(torch.optim.SGD(model.parameters(), lr=0.05), sync_every=4,
                         outer_lr=0.16, outer_momentum=0.5,
                         reducer=MajorityVote(group=group, adversary=adversary))
    else:  # mean all-reduce SGD: EF-SGD with the identity compressor is plain SGD
        opt = signsgd.EFSGD(model.parameters(), lr=0.05, compressor=Identity(),
                            aggregator=AllReduce(group=group, adversary=adversary))
    g = torch.Generator().manual_seed(900 + rank)
    x, y = data["x"], data["y"]

    def test_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(data["x_test"]), data["y_test"]).item()

    losses = [test_loss()]
    for step in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
        if (step + 1) % (steps // 5) == 0:
            losses.append(test_loss())
    return losses, [p.detach().clone() for p in model.parameters()]


def byzantine(rank: int, world: int, cases: list[tuple[str, int, tuple[int, ...], str, float]],
              steps: int) -> dict[str, Any]:
    """Run each ``(optimiser, ranks, bad ranks, attack, scale)`` case on the first
    ``ranks`` ranks (a sub-group; the others sit out); return test losses per case."""
    from signsgd.distributed.adversary import Negate, RandomSigns

    out: dict[str, Any] = {}
    groups = {m: (None if m == world else dist.new_group(list(range(m))))
              for m in sorted({c[1] for c in cases})}  # every rank creates every group
    data = _regression(rank, dim=20, n=256)
    for opt_name, m, bad, attack, scale in cases:
        if rank >= m:
            continue
        adversary = None
        if rank in bad:
            adversary = Negate(scale=scale) if attack == "negate" else RandomSigns(
                seed=rank, scale=scale)
        key = f"{opt_name}/{m}/{bad}/{attack}"
        out[key], out[key + "/params"] = _fit(opt_name, data, adversary, groups[m], steps, rank)
    return out
