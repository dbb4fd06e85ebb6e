"""The telemetry protocol: every optimiser, wrapper, reducer and hook state has
``comm_stats()``, and its numbers are the old attributes' (``bytes_sent``,
``bytes_received``, ``timings``, the totals), on one process and on a 2-rank Gloo group.

Table-driven: every registry method (local and with its reducer), the wrappers over every
reducer, the reducers themselves and the DDP hook state.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from signsgd import registry
from signsgd.compression import ScaledSign
from signsgd.distributed import (
    AllReduce,
    AverageGradients,
    ErrorFeedbackAllReduce,
    LocalSteps,
    MajorityVote,
    OneBitAllReduce,
    QuantizedMean,
)
from signsgd.distributed.hooks import MajorityVoteHookState, majority_vote_hook
from signsgd.distributed.launch import spawn
from signsgd.reduction import CommStats, Telemetry, comm_stats


def _old(obj: Any) -> dict[str, Any]:
    """The attributes users read before ``comm_stats()`` existed."""
    return {"bytes_sent": int(obj.bytes_sent), "bytes_received": int(obj.bytes_received),
            "timings": dict(getattr(obj, "timings", {}))}


def _new(obj: Any) -> dict[str, Any]:
    s = obj.comm_stats()
    assert isinstance(s, CommStats)
    return {"bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
            "timings": dict(s.timings)}


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(4, generator=g))]


def _step(opt: torch.optim.Optimizer, params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


# ------------------------------------------------------------------- one process
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", list(registry.METHODS))
def test_every_registry_method_reports_its_old_attributes(name: str, world: int) -> None:
    # world 2 in one process: the method's reducer runs, as one process
    ps = _params()
    opt = registry.build(name, ps, world_size=world)
    for s in range(2):
        _step(opt, ps, s)
        if isinstance(opt, Telemetry):
            assert _new(opt) == _old(opt)
        else:  # a plain torch optimiser: it communicates nothing
            assert world == 1 and comm_stats(opt) == CommStats()


def _local(reducer: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    return lambda ps: LocalSteps(torch.optim.SGD(ps, lr=0.1), 2, outer_lr=1.0,
                                 reducer=reducer())


WRAPPERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "average-mean": lambda ps: AverageGradients(torch.optim.SGD(ps, lr=0.1), AllReduce()),
    "average-bf16": lambda ps: AverageGradients(torch.optim.SGD(ps, lr=0.1),
                                                QuantizedMean("bf16")),
    "local-vote": _local(MajorityVote),
    "local-ef": _local(ErrorFeedbackAllReduce),
    "local-mean": _local(AllReduce),
    "local-bf16": _local(lambda: QuantizedMean("bf16")),
    "local-int8": _local(lambda: QuantizedMean("int8")),
    "local-nesterov": lambda ps: LocalSteps(
        torch.optim.SGD(ps, lr=0.1), 2, reducer=AllReduce(),
        outer_optimizer=torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_every_wrapper_reports_its_old_attributes(name: str) -> None:
    ps = _params()
    opt = WRAPPERS[name](ps)
    assert isinstance(opt, Telemetry)
    for s in range(3):  # local steps: a local step, a synchronisation, a local step
        _step(opt, ps, s)
        assert _new(opt) == _old(opt)
        inner = getattr(opt, "reducer", None)
        assert opt.comm_stats().total_bytes_sent == int(inner.total_bytes_sent)


REDUCERS: dict[str, tuple[Callable[[], Any], Any]] = {
    "vote": (MajorityVote, None),
    "vote-allgather": (lambda: MajorityVote(mode="allgather"), None),
    "ef": (ErrorFeedbackAllReduce, ScaledSign()),
    "mean": (AllReduce, None),
    "bf16": (lambda: QuantizedMean("bf16"), None),
    "int8": (lambda: QuantizedMean("int8"), None),
    "onebit": (OneBitAllReduce, ScaledSign()),
}


@pytest.mark.parametrize("name", list(REDUCERS))
def test_every_reducer_reports_its_old_attributes(name: str) -> None:
    make, compressor = REDUCERS[name]
    reducer = make()
    assert isinstance(reducer, Telemetry)
    reducer.reduce([torch.tensor([1.0, -2.0, 0.5]), None], compressor=compressor)
    s = reducer.comm_stats()
    assert _new(reducer) == _old(reducer)
    assert (s.total_bytes_sent, s.total_bytes_received) == (
        reducer.total_bytes_sent, reducer.total_bytes_received)


def test_the_hook_state_and_a_plain_optimiser() -> None:
    state = MajorityVoteHookState()
    assert isinstance(state, Telemetry) and _new(state) == _old(state)
    assert comm_stats(None) == CommStats()


def test_comm_stats_reads_a_protocol_reducer_without_comm_stats() -> None:
    class Bare:  # the Reducer protocol's members, no comm_stats
        bytes_sent, bytes_received, timings = 3, 4, {"pack": 0.5}

        def check_compressor(self, compressor: Any) -> None: ...
        def reduce(self, tensors: Any, **kw: Any) -> Any: ...
        def state_dict(self) -> dict[str, Any]: return {}
        def load_state_dict(self, state: dict[str, Any]) -> None: ...

    assert comm_stats(Bare()) == CommStats(3, 4, {"pack": 0.5})


# ------------------------------------------------------------------- two ranks
def _two_rank_cases() -> dict[str, Callable[[list[nn.Parameter]], Any]]:
    return {
        "vote": lambda ps: registry.build("signum", ps, world_size=2),
        "ef": lambda ps: registry.build("ef-signsgd", ps, world_size=2),
        "mean": lambda ps: registry.build("sgd", ps, world_size=2),
        "onebit": lambda ps: registry.build("onebit-adam", ps, world_size=2, freeze_step=1),
        "quantized": lambda ps: LocalSteps(torch.optim.SGD(ps, lr=0.1), 2, outer_lr=1.0,
                                           reducer=QuantizedMean("int8")),
    }


def _two_rank_job(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in _two_rank_cases().items():
        ps = _params()
        opt = make(ps)
        out[name] = []
        for s in range(2):
            _step(opt, ps, 10 * rank + s)
            out[name].append((_new(opt), _old(opt), opt.comm_stats().total_bytes_sent))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 3))
    state = MajorityVoteHookState(module=model)
    model.register_comm_hook(state, majority_vote_hook)
    out["hook"] = []
    for s in range(2):
        model(torch.randn(2, 4, generator=torch.Generator().manual_seed(rank + s))).sum(
            ).backward()
        out["hook"].append((_new(state), _old(state), state.comm_stats().total_bytes_sent))
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return spawn(_two_rank_job, 2, timeout=240, pg_timeout=60)


@pytest.mark.parametrize("name", [*_two_rank_cases(), "hook"])
def test_on_two_ranks_comm_stats_are_the_old_attributes(two_ranks: list[dict[str, Any]],
                                                        name: str) -> None:
    for rank in two_ranks:
        steps = rank[name]
        for new, old, _ in steps:
            assert new == old
        assert steps[-1][0]["bytes_sent"] > 0 and steps[-1][0]["bytes_received"] > 0
        assert steps[-1][2] >= steps[-1][0]["bytes_sent"]
