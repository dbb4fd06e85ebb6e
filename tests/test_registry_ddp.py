"""The registry's DDP communication routes (``registry.DDP_ROUTES``) and the benchmarks'
DDP rows built from them, on a 2-rank Gloo group (one ``spawn`` for the whole file).

Each route trains a small MLP on DDP with different data on each rank: the ranks end
identical (``noop``: they drift apart, each its own local SGD), and ``fp32`` equals SGD on
the mean of both ranks' gradients, computed on one rank. Each DDP row of
``benchmarks/methods.py`` is checked against the construction it replaced (copied below as
it was): the same hook, the same state settings, the same optimiser, and bit-identical
parameters over three steps (PowerSGD: two fp32 steps, then a compressed one).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.loops import Trainer
from benchmarks.measure import _COMM_DDP, _comm_ddp
from benchmarks.methods import METHODS, one_bucket_mb
from signsgd import registry
from signsgd.distributed.launch import spawn
from signsgd.errors import ConfigError

WORLD = 2
STEPS = 3
LR = 0.05
#: why a route cannot run here (CPU Gloo), or absent
SKIP = {"bf16": "torch registers bf16_compress_hook only with CUDA 11+ and NCCL 2.10+ "
                "(refused on CPU Gloo)"} if not torch.cuda.is_available() else {}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(STEPS)]


def _one_bucket(model: nn.Module) -> dict[str, Any]:
    return {"bucket_cap_mb": one_bucket_mb(model)}


def _state_config(state: Any) -> Any:
    """What a hook's state is configured with (not its running buffers)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from signsgd.distributed import MajorityVoteHookState

    if isinstance(state, PowerSGDState):
        return ("PowerSGDState", state.process_group, state.matrix_approximation_rank,
                state.start_powerSGD_iter, state.min_compression_rate,
                state.orthogonalization_epsilon, state.use_error_feedback, state.warm_start,
                state.batch_tensors_with_same_shape)
    if isinstance(state, MajorityVoteHookState):
        return ("MajorityVoteHookState", state.process_group, state.momentum, state.betas,
                state.mode, state.seed, state.adversary, sorted(state._names.values()))
    return state  # torch's stateless hooks: their process group (None: the default)


def _hooks(ddp: Any) -> list[tuple[str, Any]]:
    return [(hook.__qualname__, _state_config(state)) for hook, state in ddp._comm_hooks]


def _opt_config(opt: torch.optim.Optimizer) -> tuple[str, list[dict[str, Any]]]:
    return type(opt).__name__, [{k: v for k, v in g.items() if k != "params"}
                                for g in opt.param_groups]


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> list[float]:
    losses = []
    for x, y in _batches(rank):
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------ the routes
def _route(rank: int, name: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    module = _mlp()
    init = _params(module)
    ddp = DDP(module, init_sync=False, **(_one_bucket(module) if name == "powersgd" else {}))
    hp = {"start_powerSGD_iter": 2} if name == "powersgd" else {}
    state = registry.register_ddp(ddp, name, **hp)
    route = registry.DDP_ROUTES[name]
    opt = registry.build("sgd", ddp.parameters(), lr=LR, **{"momentum": 0.0,
                                                             **route.optimizer_hp})
    losses = _train(ddp, opt, rank)
    return {"init": init, "params": _params(module), "losses": losses, "hooks": _hooks(ddp),
            "iter": getattr(state, "iter", None)}


def _local_sgd(batches_of: list[int]) -> list[torch.Tensor]:
    """SGD on the mean gradient over the batches of ranks ``batches_of``, one process."""
    torch.manual_seed(0)
    module = _mlp()
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.0)
    data = [_batches(r) for r in batches_of]
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(F.cross_entropy(module(d[step][0]), d[step][1]) for d in data)
        (loss / len(data)).backward()
        opt.step()
    return _params(module)


def _refused(name: str) -> str | None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        registry.register_ddp(DDP(_mlp(), init_sync=False), name)
    except TypeError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------ the benchmarks' rows
#: each DDP row of the benchmarks: its route, the route's hyper-parameters, its optimiser
ROWS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "signum-ddp-hook": ("vote", {}, "sgd", {"momentum": 0.0}),
    "sgd-ddp": ("fp32", {}, "sgd", {"momentum": 0.9}),
    "adamw-ddp": ("fp32", {}, "adamw", {}),
    "fp16-ddp": ("fp16", {}, "sgd", {"momentum": 0.9}),
    "fp16-adamw-ddp": ("fp16", {}, "adamw", {}),
    **{f"powersgd-r{r}": ("powersgd", {"matrix_approximation_rank": r}, "sgd",
                          {"momentum": 0.9}) for r in (1, 2, 4)},
    "powersgd-r2-adamw": ("powersgd", {"matrix_approximation_rank": 2}, "adamw", {}),
    "noop-ddp": ("noop", {}, "sgd", {"momentum": 0.9}),
}


def _old_row(name: str, lr: float, start_powersgd_iter: int) -> tuple[Any, Any]:
    """methods._ddp's construction before the registry held the DDP routes, as it was."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from signsgd.distributed import MajorityVoteHookState, majority_vote_hook

    route, route_hp, opt, hp = ROWS[name]
    hook = {"vote": "vote", "fp32": None, "fp16": "fp16", "noop": "noop",
            "powersgd": "powersgd"}[route]
    torch.manual_seed(0)
    m = _mlp()
    if hook == "powersgd":
        model = DDP(m, init_sync=False, bucket_cap_mb=one_bucket_mb(m))
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=route_hp["matrix_approximation_rank"],
            start_powerSGD_iter=start_powersgd_iter, use_error_feedback=True,
            warm_start=True)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        model = DDP(m, init_sync=False)
        if hook == "vote":
            model.register_comm_hook(MajorityVoteHookState(momentum=0.9, module=model),
                                     majority_vote_hook)
        elif hook == "fp16":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook == "noop":
            model.register_comm_hook(None, noop_hook)
    return model, registry.build(opt, model.parameters(), world_size=1, lr=lr, **hp)


def _row(rank: int, world: int, name: str) -> dict[str, Any]:
    tr = Trainer(name, _mlp, world, start_powersgd_iter=2)
    for x, y in _batches(rank):
        tr.step(x, y)
    old, old_opt = _old_row(name, tr.lr, 2)
    old_config = (_hooks(old), old.bucket_bytes_cap, _opt_config(old_opt))
    _train(old, old_opt, rank)
    route, route_hp, _, _ = ROWS[name]
    state, hook = registry.ddp_hook(route, tr.model, **route_hp,
                                    **({"start_powerSGD_iter": 2} if route == "powersgd" else {}))
    return {"new": (_hooks(tr.model), tr.model.bucket_bytes_cap, _opt_config(tr.opt)),
            "old": old_config,
            "registry": [] if hook is None else [(hook.__qualname__, _state_config(state))],
            "new_params": _params(tr.module), "old_params": _params(old.module)}


def _comm_rows() -> dict[str, Any]:
    """The DDP rows of comm_worker: their hook and state, old and new."""
    import inspect

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
    out = {}
    for method in _COMM_DDP:
        ddp = inspect.getclosurevars(_comm_ddp(method, x)).nonlocals["ddp"]
        if method.startswith("powersgd"):  # as it was: behind _noop_warmup, S = 2
            old = [("_noop_warmup.<locals>.dispatch", _state_config(
                powerSGD_hook.PowerSGDState(
                    process_group=None, matrix_approximation_rank=int(method[-1]),
                    start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)))]
        else:
            hook = {"fp16-ddp": default_hooks.fp16_compress_hook, "noop-ddp": noop_hook}.get(
                method)
            old = [] if hook is None else [(hook.__qualname__, None)]
        out[method] = (_hooks(ddp), old)
    return out


def _job(rank: int, world: int) -> dict[str, Any]:
    return {"routes": {n: _route(rank, n) for n in registry.DDP_ROUTES if n not in SKIP},
            "local": {"mean": _local_sgd(list(range(world))), "own": _local_sgd([rank])},
            "refused": {n: _refused(n) for n in SKIP},
            "rows": {n: _row(rank, world, n) for n in ROWS},
            "comm": _comm_rows()}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return spawn(_job, WORLD, timeout=300)


# ------------------------------------------------------------------ tests: the routes
@pytest.mark.parametrize("name", list(registry.DDP_ROUTES))
def test_every_route_trains_a_model_and_keeps_the_ranks_equal(
        runs: list[dict[str, Any]], name: str) -> None:
    if name in SKIP:
        pytest.skip(SKIP[name])
    r0, r1 = runs[0]["routes"][name], runs[1]["routes"][name]
    assert all(math.isfinite(v) for v in r0["losses"] + r1["losses"])
    assert any(not torch.equal(a, b) for a, b in zip(r0["init"], r0["params"])), "no update"
    same = all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert same == (name != "noop"), f"{name}: the ranks' models {'' if same else 'differ'}"
    assert r0["hooks"] == r1["hooks"]
    if name == "fp32":
        assert r0["hooks"] == []  # nothing registered: DDP's own all-reduce
    else:
        assert len(r0["hooks"]) == 1


@pytest.mark.parametrize(("name", "against", "tol"), [
    ("fp32", "mean", 1e-6), ("fp16", "mean", 1e-3), ("noop", "own", 0.0)])
def test_a_route_computes_what_it_promises(runs: list[dict[str, Any]], name: str,
                                           against: str, tol: float) -> None:
    for run in runs:
        for a, b in zip(run["routes"][name]["params"], run["local"][against]):
            assert torch.allclose(a, b, rtol=0, atol=tol), (name, (a - b).abs().max())


def test_powersgd_compressed_after_its_start_iterations(runs: list[dict[str, Any]]) -> None:
    assert runs[0]["routes"]["powersgd"]["iter"] == STEPS  # S = 2 fp32 steps, then PowerSGD
    assert runs[0]["routes"]["powersgd"]["hooks"][0][0] == "powerSGD_hook"


@pytest.mark.skipif(not SKIP, reason="CUDA available: bf16 registers")
def test_a_route_torch_refuses_here_raises_its_type_error(runs: list[dict[str, Any]]) -> None:
    assert "NCCL" in (runs[0]["refused"]["bf16"] or ""), runs[0]["refused"]


def test_route_names_and_hyper_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="valid DDP routes: vote, fp32, fp16, bf16"):
        registry.ddp_hook("fp8")
    with pytest.raises(ConfigError, match="takes no 'rank'; it takes matrix_approximation"):
        registry.ddp_hook("powersgd", rank=2)
    with pytest.raises(ConfigError, match="'fp16' takes no 'momentum'; it takes nothing"):
        registry.ddp_hook("fp16", momentum=0.9)
    state, hook = registry.ddp_hook("vote", comm=registry.CommSpec(vote="allgather", seed=3),
                                    momentum=0.5)
    assert (state.mode, state.seed, state.momentum, hook.__name__) == (
        "allgather", 3, 0.5, "majority_vote_hook")


def test_the_votes_defaults_are_signums() -> None:
    route = registry.DDP_ROUTES["vote"]
    assert route.defaults["momentum"] == registry.METHODS["signum"].defaults["momentum"]
    assert route.optimizer_hp == {"momentum": 0.0}  # the hook holds the momentum


# ------------------------------------------------------------------ tests: the benchmarks
def test_every_ddp_row_of_the_benchmarks_is_listed_here() -> None:
    assert set(ROWS) == {n for n, m in METHODS.items() if m.ddp}
    for name, (route, route_hp, _, _) in ROWS.items():
        assert METHODS[name].route == route
        assert METHODS[name].powersgd_rank == route_hp.get("matrix_approximation_rank")


@pytest.mark.parametrize("name", list(ROWS))
def test_a_ddp_row_builds_what_it_built_before_and_what_the_registry_builds(
        runs: list[dict[str, Any]], name: str) -> None:
    for run in runs:
        r = run["rows"][name]
        assert r["new"] == r["old"]
        assert r["new"][0] == r["registry"]
        for a, b in zip(r["new_params"], r["old_params"]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("method", list(_COMM_DDP))
def test_a_ddp_row_of_comm_worker_registers_what_it_did_before(
        runs: list[dict[str, Any]], method: str) -> None:
    new, old = runs[0]["comm"][method]
    assert new == old
