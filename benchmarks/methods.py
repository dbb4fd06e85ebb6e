"""The benchmarks' tables of what they compare: the training methods (rows that extend the
library's registry, :mod:`signsgd.registry`: our optimisers and the DDP peers, with their
default learning rate per workload), the aggregation methods of the communication benchmark
(:data:`COMM_LABELS`) and the two workloads the rows' learning rates are keyed by
(:data:`WORKLOADS`)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from benchmarks.bandwidth import powersgd_nbytes
from signsgd import registry
from signsgd.distributed import LocalSteps
from signsgd.distributed.reducer import ring_nbytes
from signsgd.distributed.vote import vote_nbytes
from signsgd.reduction import comm_stats

if TYPE_CHECKING:
    from benchmarks.loops import Trainer

__all__ = ["COMM_LABELS", "E2E_LABELS", "METHODS", "LOCAL_H", "WORKLOADS", "BASELINES",
           "Method", "method", "method_arg", "one_bucket_mb", "warmup_reference"]

#: the aggregation methods of :func:`benchmarks.measure.comm_worker` and their table labels.
COMM_LABELS: dict[str, str] = {
    "majority-vote": "sharded vote (1 bit)",
    "majority-vote-allgather": "allgather vote (1 bit)",
    "ef-allreduce": "EF all-reduce (1 bit)",
    "fp16-allreduce": "fp16 all-reduce",
    "fp32-allreduce": "fp32 all-reduce",
    "fp32-ddp": "DDP fp32 (buckets of 25 MB)",
    "fp16-ddp": "DDP + fp16 hook",
    "powersgd-r1": "DDP + PowerSGD r=1 (1 bucket)",
    "powersgd-r2": "DDP + PowerSGD r=2 (1 bucket)",
    "powersgd-r4": "DDP + PowerSGD r=4 (1 bucket)",
    "noop-ddp": "DDP + noop hook (no communication)",
}


# ------------------------------------------------------------------------------- methods
#: Default learning rates per workload, tuned on held-out data (docs/tuning.md). ``cnn``: on
#: Fashion-MNIST with the small CNN at a global batch of 128 (AdamW takes Adam's). ``gpt``:
#: on the Shakespeare tuning split at a global batch of 32 sequences (configs/lm.toml's
#: values; Lion there also takes betas (0.95, 0.98), which this table does not, so the
#: ``gpt`` runs leave Lion out). PowerSGD takes its optimiser's rate (SGD's or AdamW's):
#: its error feedback makes it a compressed SGD, not tuned separately. The ``cnn`` rates are
#: the registry's defaults (``registry.METHODS[name].defaults["lr"]``), not copies.
def _lr(name: str, gpt: float) -> dict[str, float]:
    return {"cnn": float(registry.METHODS[name].defaults["lr"]), "gpt": gpt}


_LR_SGD = _lr("sgd", 0.1)
_LR_ADAMW = _lr("adamw", 1e-2)
_LR_SIGNUM = _lr("signum", 1e-3)
_LR_LION = _lr("lion", 1e-3)
_LR_EF = _lr("ef-signsgd", 1.0)

#: The H of the ``local-*-hH`` methods listed by default (any H >= 1 is accepted by name).
LOCAL_H: tuple[int, ...] = (4, 8, 16)
_LOCAL = re.compile(r"local-(adamw|signum)-h([1-9][0-9]*)")


@dataclass(frozen=True)
class Method:
    """One row of the methods table: its label, how :class:`~benchmarks.loops.Trainer`
    builds it, and its default learning rate per workload.

    ``build(trainer)`` sets ``trainer.model`` (what the forward pass calls: the model or
    its DDP wrapper), ``trainer.opt`` and ``trainer.counter`` (what ``Trainer.bytes``
    reads). ``route``: the registry's DDP route (:data:`signsgd.registry.DDP_ROUTES`) of a
    method built on DDP (``None``: not on DDP); :attr:`ddp`: whether it is (it needs an
    initialised process group even for M = 1).
    ``tta``: the ranks' models stay identical, so it can be trained to a target.
    ``sync_every``: H of a LocalSteps method (1 otherwise). ``powersgd_rank``: r of a
    PowerSGD method.

    Example:
        >>> METHODS["powersgd-r2"].powersgd_rank, METHODS["noop-ddp"].tta
        (2, False)
    """

    name: str
    label: str
    build: Callable[[Trainer], None] = field(repr=False)
    lr: dict[str, float]
    route: str | None = None
    tta: bool = True
    sync_every: int = 1
    powersgd_rank: int | None = None
    inner: str | None = None  # the registry's optimiser this method runs

    @property
    def ddp(self) -> bool:
        """Whether the method is built on DDP (a :attr:`route`)."""
        return self.route is not None


def _counted(tr: Trainer) -> tuple[int, int]:
    stats = comm_stats(tr.counter)
    return stats.bytes_sent, stats.bytes_received


def _ours(name: str, *, local: bool = False, **hp: Any) -> Callable[[Trainer], None]:
    """``registry.build(name, world_size=M)`` (``local``: world_size 1, no communication)."""
    def build(tr: Trainer) -> None:
        tr.opt = registry.build(name, tr.module.parameters(),
                                world_size=1 if local else tr.world_size, lr=tr.lr, **hp)
        tr.counter = tr.opt  # its comm_stats(): the aggregator's or reducer's (zeros: local)
        tr.nbytes = _counted
    return build


def one_bucket_mb(model: nn.Module) -> float:
    """A ``bucket_cap_mb`` that puts every parameter of ``model`` in one DDP bucket."""
    return math.ceil(sum(p.numel() * p.element_size() for p in model.parameters())
                     / 2**20) + 1


def _ddp(opt: str, route: str = "fp32", *, hook: Mapping[str, Any] | None = None,
         **hp: Any) -> Callable[[Trainer], None]:
    """DDP + the registry's DDP route ``route`` (:data:`signsgd.registry.DDP_ROUTES`, its
    hyper-parameters ``hook``; PowerSGD on one bucket with S = ``start_powersgd_iter``) +
    the registry's local ``opt`` (``torch.optim.SGD`` / ``AdamW``) with ``hp`` and the
    route's ``optimizer_hp``.

    Facts about torch's hooks that the table relies on (read in torch 2.13's
    ``ddp_comm_hooks/powerSGD_hook.py``): PowerSGD views every gradient tensor as
    ``shape[0] × rest`` and compresses it only if ``(n + m)·r·min_compression_rate < n·m``
    (``min_compression_rate = 2``; so biases and norm weights, ``n × 1``, never are) — bytes in
    :func:`~benchmarks.bandwidth.powersgd_nbytes`; it all-reduces the whole bucket in fp32 for
    the first ``start_powerSGD_iter`` steps (counted per DDP iteration, on the last bucket), and
    needs ``start_powerSGD_iter >= 2`` with error feedback or warm start (DDP rebuilds its buckets
    after the first iteration); error feedback adds each rank's compression error to its next
    gradient; warm start reuses the previous step's Q. Over Gloo with several buckets the hook
    fails ("Received data size doesn't match expected size"), so its rows use one bucket
    (``bucket_cap_mb`` above the model's size). ``bf16_compress_hook`` needs CUDA and NCCL (not
    on a CPU-only machine), so it is not in the table.

    DDP models are built with ``init_sync=False`` (every rank builds the same model from the
    same seed), so constructing them does not broadcast the parameters over the slow link.
    """
    hook = dict(hook or {})
    hp = {**hp, **registry.DDP_ROUTES[route].optimizer_hp}

    def build(tr: Trainer) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        m = tr.module
        if route == "powersgd":  # over Gloo torch's hook needs one bucket
            tr.model = DDP(m, init_sync=False, bucket_cap_mb=one_bucket_mb(m))
            tr.powersgd = registry.register_ddp(tr.model, route, **hook,
                                                start_powerSGD_iter=tr.start_powersgd_iter)
        else:
            tr.model = DDP(m, init_sync=False)
            state = registry.register_ddp(tr.model, route, **hook)
            if route == "vote":
                tr.counter = state
        tr.nbytes = _route_nbytes(route, tr)
        tr.opt = registry.build(opt, tr.model.parameters(), world_size=1, lr=tr.lr, **hp)
    return build


def _route_nbytes(route: str, tr: Trainer) -> Callable[[Trainer], tuple[int, int]]:
    """What one step of DDP route ``route`` sends and receives: the vote's counter, the
    fp32 / fp16 / bf16 ring, nothing (noop), PowerSGD by the phase of its last step."""
    if route == "vote":
        return _counted
    fp32 = ring_nbytes(tr.numel, tr.world_size, 4)
    if route == "powersgd":
        state = tr.powersgd
        compressed = powersgd_nbytes(tr.shapes, state.matrix_approximation_rank,
                                     tr.world_size)

        def nbytes(t: Trainer) -> tuple[int, int]:  # the hook's phase of the last step
            b = compressed if state.iter > state.start_powerSGD_iter else fp32
            return b, b
        return nbytes
    b = {"fp32": fp32, "fp16": ring_nbytes(tr.numel, tr.world_size, 2),
         "bf16": ring_nbytes(tr.numel, tr.world_size, 2), "noop": 0}[route]
    return lambda t: (b, b)


def _local(inner: str, h: int) -> Callable[[Trainer], None]:
    """``registry.build(inner, local=LocalSpec(h, ...))``: the registry's local steps with
    its default outer step (sign-momentum, ``outer_lr`` ``None``: ``lr``) and vote."""
    def build(tr: Trainer) -> None:
        opt = cast(LocalSteps, registry.build(
            inner, tr.module.parameters(), lr=tr.lr,
            local=registry.LocalSpec(h, lr=tr.outer_lr, momentum=tr.outer_momentum)))
        tr.opt, tr.counter = opt, opt.reducer  # the counter: the last synchronisation's bytes
        per_sync = vote_nbytes(tr.numel, tr.world_size)[0]

        def nbytes(t: Trainer) -> tuple[int, int]:  # one synchronisation's bytes / H
            c = comm_stats(t.counter)
            sent = c.bytes_sent or per_sync
            received = c.bytes_received or per_sync
            return round(sent / h), round(received / h)
        tr.nbytes = nbytes
    return build


def _on_ddp(name: str, label: str, opt: str, route: str, lr: dict[str, float], *,
            powersgd_rank: int | None = None, tta: bool = True, inner: str | None = None,
            **hp: Any) -> Method:
    """The row of a method on DDP: :func:`_ddp` of ``opt`` and ``route`` (PowerSGD with
    ``powersgd_rank``), the row's ``route``, ``powersgd_rank`` and ``inner`` (default:
    ``opt``) from the same arguments."""
    hook = None if powersgd_rank is None else {"matrix_approximation_rank": powersgd_rank}
    return Method(name, label, _ddp(opt, route, hook=hook, **hp), lr, route=route, tta=tta,
                  powersgd_rank=powersgd_rank, inner=opt if inner is None else inner)


def _rows() -> Iterator[Method]:
    """The rows of :data:`METHODS` (labels in :data:`E2E_LABELS`): one row per training
    method — label, how :class:`~benchmarks.loops.Trainer` builds it, default learning rate per
    workload. Our optimisers come from :func:`signsgd.registry.build` (with ``world_size=M``
    they communicate through their reducer); the peers are ``torch.nn.parallel.
    DistributedDataParallel`` with a DDP route of the registry
    (:data:`signsgd.registry.DDP_ROUTES`: our majority-vote hook, DDP's fp32 all-reduce,
    torch's own communication hooks of ``torch.distributed.algorithms.ddp_comm_hooks``,
    registered by :func:`signsgd.registry.register_ddp` with the route's defaults), and their
    local optimiser from the registry with ``world_size=1`` (``torch.optim.SGD`` /
    ``torch.optim.AdamW``):

    =======================  =======================================================================
    ``signum``               ``build("signum", world_size=M)``: Signum(0.9) + sharded majority vote
    ``signum-ddp-hook``      DDP + ``majority_vote_hook`` (momentum 0.9 in the hook) +
                             ``torch.optim.SGD(momentum=0)``
    ``ef-signsgd``           ``build("ef-signsgd", world_size=M)``: ScaledSign + EF all-reduce
    ``lion``                 ``build("lion", world_size=M)``: Lion + sharded majority vote
    ``sgd``                  ``build("sgd", momentum=0.9, world_size=M)``: gradients averaged by one
                             fp32 ``AllReduce`` after backward (the same structure as ``signum``)
    ``adamw``                ``build("adamw", world_size=M)``: AdamW + one fp32 all-reduce of the
                             gradients after backward (``AverageGradients``)
    ``sgd-ddp``              DDP (fp32 bucketed all-reduce overlapping backward) +
                             ``torch.optim.SGD(momentum=0.9)``: what most users run today
    ``adamw-ddp``            DDP fp32 + ``torch.optim.AdamW``: what most language-model users run
    ``fp16-ddp``             DDP + ``default_hooks.fp16_compress_hook`` + SGD(momentum=0.9)
    ``powersgd-r1/-r2/-r4``  DDP with **one bucket** + ``powerSGD_hook`` with
                             ``PowerSGDState(process_group=None, matrix_approximation_rank=r,
                             start_powerSGD_iter=S, use_error_feedback=True, warm_start=True)``
                             + SGD(momentum=0.9), as torch's docs use it
    ``powersgd-r2-adamw``    the same hook (r = 2) + ``torch.optim.AdamW`` (for the language model,
                             where SGD is weak)
    ``noop-ddp``             DDP + ``debugging_hooks.noop_hook`` + SGD: no communication at all, the
                             ranks' models drift apart; a lower bound for step times only
    ``sgd-local``            ``build("sgd", momentum=0.9)``, no communication, no DDP: the
                             compute-only step time under the same CPU sharing
    ``local-adamw-hH``       ``build("adamw", local=LocalSpec(H, lr=outer_lr, momentum=β))``
    ``local-signum-hH``      (``LocalSteps`` voting): H local steps, then one voted outer step;
                             any H (the name is parsed), :data:`LOCAL_H` by default
    =======================  =======================================================================
    """
    yield Method("signum", "Signum + majority vote", _ours("signum", momentum=0.9), _LR_SIGNUM,
                 inner="signum")
    yield _on_ddp("signum-ddp-hook", "DDP + majority-vote hook", "sgd", "vote", _LR_SIGNUM,
                  inner="signum")
    yield Method("ef-signsgd", "EF-signSGD + EF all-reduce", _ours("ef-signsgd"), _LR_EF,
                 inner="ef-signsgd")
    yield Method("lion", "Lion + majority vote", _ours("lion"), _LR_LION, inner="lion")
    yield Method("sgd", "SGD + fp32 all-reduce", _ours("sgd", momentum=0.9), _LR_SGD,
                 inner="sgd")
    yield Method("adamw", "AdamW + fp32 all-reduce", _ours("adamw"), _LR_ADAMW, inner="adamw")
    yield _on_ddp("sgd-ddp", "SGD + DDP (fp32)", "sgd", "fp32", _LR_SGD, momentum=0.9)
    yield _on_ddp("adamw-ddp", "AdamW + DDP (fp32)", "adamw", "fp32", _LR_ADAMW)
    yield _on_ddp("fp16-ddp", "SGD + DDP + fp16 hook", "sgd", "fp16", _LR_SGD, momentum=0.9)
    yield _on_ddp("fp16-adamw-ddp", "AdamW + DDP + fp16 hook", "adamw", "fp16", _LR_ADAMW)
    for r in (1, 2, 4):
        yield _on_ddp(f"powersgd-r{r}", f"SGD + DDP + PowerSGD r={r} (1 bucket)", "sgd",
                      "powersgd", _LR_SGD, powersgd_rank=r, momentum=0.9)
    yield _on_ddp("powersgd-r2-adamw", "AdamW + DDP + PowerSGD r=2 (1 bucket)", "adamw",
                  "powersgd", _LR_ADAMW, powersgd_rank=2)
    yield _on_ddp("noop-ddp", "SGD + DDP + noop hook (no communication)", "sgd", "noop",
                  _LR_SGD, tta=False, momentum=0.9)
    yield Method("sgd-local", "no communication (compute only)",
                 _ours("sgd", local=True, momentum=0.9), _LR_SGD, tta=False, inner="sgd")


#: The fixed rows of the methods table (the ``local-*-hH`` rows come from :func:`method`).
METHODS: dict[str, Method] = {m.name: m for m in _rows()}


def method(name: str) -> Method:
    """The row of method ``name``: a fixed row of :data:`METHODS`, or
    ``local-adamw-hH`` / ``local-signum-hH`` for any H >= 1.

    Example:
        >>> m = method("local-signum-h8")
        >>> m.sync_every, m.label, m.lr["cnn"]
        (8, 'Signum, 8 local steps + voted outer step', 0.001)
    """
    row = METHODS.get(name)
    if row is not None:
        return row
    match = _LOCAL.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, "
                         "local-adamw-hH, local-signum-hH (H >= 1)")
    inner, h = match.group(1), int(match.group(2))
    return Method(name, f"{'AdamW' if inner == 'adamw' else 'Signum'}, {h} local steps + "
                  "voted outer step", _local(inner, h),
                  _LR_ADAMW if inner == "adamw" else _LR_SIGNUM, sync_every=h, inner=inner)


def method_arg(text: str) -> str:
    """argparse type: a method name :func:`method` knows.

    Example:
        >>> method_arg("local-adamw-h32")
        'local-adamw-h32'
    """
    try:
        method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Labels(Mapping[str, str]):
    """Method name → table label: the fixed rows, then ``local-*-hH`` for H in
    :data:`LOCAL_H` when iterated; any ``local-*-hH`` when looked up."""

    def _names(self) -> list[str]:
        return [*METHODS, *(f"local-{inner}-h{h}" for inner in ("adamw", "signum")
                            for h in LOCAL_H)]

    def __getitem__(self, name: str) -> str:
        try:
            return method(name).label
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


#: the training methods of :class:`Trainer` and their table labels.
E2E_LABELS: Mapping[str, str] = _Labels()



# ------------------------------------------------------------------------------- workloads
#: The two workloads of the time-to-target benchmark: ``cnn`` (the small CNN on
#: Fashion-MNIST, batch 32 per worker, constant learning rate; metric: accuracy on the
#: 10,000 test images) and ``gpt`` (the character-level transformer ``gpt`` on Shakespeare,
#: 8 sequences of 128 characters per worker, linear warm-up then cosine, gradient clipping
#: 1.0; metric: validation loss in nats per character on fixed validation batches).
WORKLOADS: dict[str, dict[str, Any]] = {
    "cnn": {"data": "fashion-mnist", "model": "cnn", "batch_size": 32, "grad_clip": 0.0,
            "lr_schedule": "constant", "metric": "test_accuracy", "higher": True},
    "gpt": {"data": "shakespeare", "model": "gpt", "batch_size": 8, "block_size": 128,
            "grad_clip": 1.0, "lr_schedule": "cosine", "metric": "val_loss",
            "higher": False},
}

#: The fp32 DDP rows the time-to-target ratios are against.
BASELINES = ("sgd-ddp", "adamw-ddp")


def warmup_reference(name: str) -> str | None:
    """The fp32 DDP method whose step time PowerSGD's first S steps take: the same local
    optimiser (``None`` for the other methods).

    Example:
        >>> warmup_reference("powersgd-r1"), warmup_reference("powersgd-r2-adamw")
        ('sgd-ddp', 'adamw-ddp')
    """
    row = method(name)
    if row.powersgd_rank is None:
        return None
    return "adamw-ddp" if row.inner == "adamw" else "sgd-ddp"
