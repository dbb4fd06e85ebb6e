"""``signsgd train`` and ``signsgd compare``'s runs: one process or M workers.

:func:`train` validates a :class:`~signsgd.config.TrainConfig` before anything starts, then
trains in one process, in ``workers`` local Gloo processes
(:func:`signsgd.distributed.launch.spawn`) or, when ``RANK``, ``WORLD_SIZE`` and
``MASTER_ADDR`` are set, in the process group ``torchrun`` started. What is learned comes
from :mod:`signsgd.tasks` (image classification, or a character-level language model);
the optimiser from :func:`signsgd.registry.build` (wrapped in
:class:`~signsgd.distributed.LocalSteps` when ``sync_every > 1``; the last step ends the
round, also a partial one, so the model evaluated and saved at the end is every rank's).
With ``shard > 1`` (FSDP2 / HSDP) the ranks form ``workers // shard`` replicas of ``shard``
ranks, the model is ``fully_shard``-ed inside each replica and the optimiser's reducer runs
on the replicate group (its bytes, the ones reported, are the cross-replica ones); the
checkpoint holds the full model and every rank's shards.
Each rank runs the project's :class:`~signsgd.loop.Loop` with the run's callbacks (the
records, the progress bar, the checkpoints). It is counted in steps: rank ``r``'s batch of
step ``s`` is a pure function of ``(seed, r, s)``, so a run resumed at any checkpointed step
continues bit-identically.
Under ``torchrun`` the ranks' first exchange is a digest of every option that fixes what
they exchange and when (all but :data:`PER_RANK_OPTIONS`): ranks started with different
ones all raise the same :class:`~signsgd.errors.ConfigError`, naming them.
Batch-norm statistics stay per worker until rank 0's are broadcast before each evaluation.

``out`` receives ``metrics.jsonl`` (``"step"`` records every ``log_every`` steps: loss and
accuracy over the workers' batches since the last one, samples/s, bytes and the
communication statistics of the reducer; ``"epoch"`` records of image runs and ``"eval"``
records of text runs with the held-out metrics; ``"density"`` when asked),
``summary.json``, ``curves.png`` and ``checkpoint.pt`` (at every evaluation and every
``checkpoint_every`` steps; each rank's part carries its own sha256).
``SIGNSGD_INJECT_FAULT=RANK:STEP`` makes worker ``RANK`` raise at global step ``STEP``, and
``RANK:STEP:stall`` makes it stop progressing there (tests of crashes and stalls).

Example:
    >>> from signsgd.config import TrainConfig
    >>> train(TrainConfig(optimizer="signum", workers=4, out="runs/s4"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from signsgd import checkpoint, registry
from signsgd.config import TrainConfig, freeze_step_of, validate
from signsgd.distributed import launch
from signsgd.errors import ConfigError
from signsgd.loop import Callback, Loop, StepOutput
from signsgd.models import count_parameters
from signsgd.outputs import MetricsLog, check_out, jsonable, lock_run, plot_curves, write_atomic
from signsgd.tasks import ImageClassification, Task, make_task, sum_over_ranks
from signsgd.transformer import SIZES

__all__ = ["train", "lr_schedule"]


def _make_optimizer(c: TrainConfig, model: nn.Module, rank: int, world: int, total: int,
                    group: Any = None) -> torch.optim.Optimizer:
    """This rank's optimiser; without ``betas``, ``momentum`` is β1 (β2 the registry's, for
    a language model its ``language_model`` value).
    ``group``: the reducer's process group (``--shard > 1``: the replicate group of the
    ``world`` replicas; ``None``: the default group)."""
    from signsgd.distributed.adversary import attack

    adversary = None
    if c.adversaries and rank >= world - c.adversaries:
        adversary = attack(c.attack, seed=c.seed * 1000 + rank)
    takes = registry.METHODS[c.optimizer].defaults_for(c.model in SIZES)
    hp = {"lr": float(c.lr), "weight_decay": float(c.weight_decay),  # type: ignore[arg-type]
          "momentum": float(c.momentum), "compressor": c.compressor,  # type: ignore[arg-type]
          "betas": tuple(map(float, c.betas or (c.momentum, takes.get("betas", (0, 0))[1]))),
          "freeze_step": freeze_step_of(c, total)}
    hp = {k: v for k, v in hp.items() if k in takes}
    return registry.build(c.optimizer, list(model.parameters()), world_size=world,
                          group=group, adversary=adversary, vote=c.vote, seed=c.seed,
                          local=_local_spec(c), **hp)


def _local_spec(c: TrainConfig) -> registry.LocalSpec | None:
    """The local steps ``c`` asks for (``None``: every step communicates); the registry
    resolves the outer defaults (``--lr`` and β = 0 for sign-momentum, DiLoCo's 0.7 and 0.9
    for nesterov)."""
    if c.sync_every == 1:
        return None
    return registry.LocalSpec(c.sync_every, c.outer_optimizer, c.outer_reducer, c.outer_lr,
                              c.outer_momentum)


def lr_schedule(c: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (for ``LambdaLR``): a linear warm-up of
    ``c.warmup_steps``, then ``c.lr_schedule`` (constant, cosine to 0, or two ×0.1 steps
    at 1/2 and 3/4) over the remaining steps.

    Example:
        >>> f = lr_schedule(TrainConfig(warmup_steps=2, lr_schedule="cosine"), 6)
        >>> [round(f(s), 2) for s in range(6)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    """
    warm, rest = c.warmup_steps, max(1, total_steps - c.warmup_steps)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        t = min(s - warm, rest)
        if c.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t / rest))
        if c.lr_schedule == "step":
            return 0.1 ** ((t >= rest // 2) + (t >= (3 * rest) // 4))
        return 1.0
    return factor


def _device(c: TrainConfig, rank: int) -> torch.device:
    if c.device == "cuda" or c.device == "auto" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _gather(mine: Any, world: int) -> list[Any]:
    """Every rank's ``mine``, in rank order."""
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def _progress(enabled: bool, total: int, done: int) -> Any:
    if not enabled:
        return None
    from rich import progress as rp

    p = rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(),
                    rp.MofNCompleteColumn(), rp.TextColumn(
                        "loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[sps]}/s"),
                    rp.TimeElapsedColumn(), rp.TimeRemainingColumn())
    p.start()
    p.add_task("train", total=total, completed=done, loss="-", acc="-", sps="-")
    return p


def _comm_record(step: int, totals: dict[str, float], counters: dict[str, Any],
                 model: nn.Module, world: int, shard: int = 1) -> dict[str, Any]:
    """The ``"comm"`` record of a log window: bytes this rank sent and received (in the
    window, and in all), the compression ratio against an fp32 ring all-reduce of the
    gradient, and the reducer's time in packing, collectives and unpacking. ``shard > 1``:
    the bytes across the ``world // shard`` replicas, against HSDP's fp32 cross-replica
    all-reduce of a rank's ``1/shard`` of the gradient."""
    replicas, n = world // shard, -(-count_parameters(model) // shard)
    fp32 = 2 * (replicas - 1) * -(-n // replicas) * 4
    sent = totals.get("bytes_sent", 0.0)
    steps = max(1.0, totals.get("steps", 1.0))
    return {"kind": "comm", "step": step, "bytes_sent": int(sent),
            "bytes_received": int(totals.get("bytes_received", 0.0)),
            "bytes_sent_total": counters["sent"],
            "compression_ratio": fp32 * steps / sent if sent else None,
            **{k: v for k, v in totals.items() if k.startswith("time_")}}


def _shard_model(model: nn.Module, c: TrainConfig, world: int, device: torch.device) -> Any:
    """``--shard > 1``: the replicate × shard ``DeviceMesh`` over the default group (rank
    ``r`` is replica ``r // shard``, shard ``r % shard``) and ``model`` sharded with FSDP2
    over its shard dimension, each transformer block then the root (as
    ``examples/fsdp2_hsdp.py``); returns the mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world // c.shard, c.shard),
                            mesh_dim_names=("replicate", "shard"))
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    return mesh


def _local_state(state: Any) -> Any:
    """``state`` with every DTensor replaced by a CPU copy of this rank's shard (what each
    rank's part of the checkpoint holds: gathered by pickling, without the mesh)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local().detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _local_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_local_state(v) for v in state)
    return state


class _FaultInjection(Callback):
    """``SIGNSGD_INJECT_FAULT=RANK:STEP[:stall]`` (tests of crashes and stalls): worker
    ``RANK`` raises before step ``STEP``, or with ``stall`` stops progressing there."""

    def __init__(self, spec: str, rank: int) -> None:
        r, _, s = spec.partition(":")
        s, _, stall = s.partition(":")
        self.at, self.rank, self.stall = (int(r), int(s or 0)), rank, bool(stall)

    def before_step(self, loop: Loop, step: int) -> None:
        if self.at == (self.rank, step):
            if self.stall:
                time.sleep(3600)  # alive, not progressing: the others time out
            raise RuntimeError(f"injected fault on rank {self.rank} at step {step} "
                               "(SIGNSGD_INJECT_FAULT)")


class _Report(Callback):
    """What a run writes and prints: the heartbeat, ``"step"`` / ``"comm"`` records every
    ``log_every`` steps, ``"density"``, the evaluation records, the progress bar, and
    the checkpoints; it holds the counters a checkpoint carries."""

    def __init__(self, c: TrainConfig, task: Task, model: nn.Module, opt: Any, rank: int,
                 world: int, ckpt: dict[str, Any] | None) -> None:
        self.c, self.task, self.model, self.opt, self.rank, self.world = (
            c, task, model, opt, rank, world)
        self.out = Path(c.out)
        self.counters: dict[str, Any] = {"sent": 0, "received": 0, "epoch": [0.0, 0.0, 0.0],
                                         "window": [0.0, 0.0, 0.0]}
        if ckpt is not None:
            self.counters = ckpt["ranks"][rank]["counters"]
        self.density: Any = None
        if c.density_every and rank == 0:
            from signsgd.diagnostics import density  # lazy: optional diagnostics
            self.density = density
        self.log = MetricsLog(self.out / "metrics.jsonl", ckpt["metrics"] if ckpt else ()) \
            if rank == 0 else None
        self.progress = _progress(c.progress and self.log is not None, task.total_steps,
                                  int(ckpt["step"]) if ckpt else 0)
        self.image = isinstance(task, ImageClassification)
        self.t0 = time.perf_counter() - (float(ckpt["wall_time_s"]) if ckpt else 0.0)
        self.window_t = time.perf_counter()
        self.comm_totals: dict[str, float] = {}

    def before_step(self, loop: Loop, step: int) -> None:
        launch.heartbeat(step)  # this rank reached step `step`

    def on_step(self, loop: Loop, out: StepOutput) -> None:
        c, counters, step = self.c, self.counters, out.step
        stats = {"bytes_sent": out.comm.bytes_sent, "bytes_received": out.comm.bytes_received,
                 **{f"time_{k}_s": v for k, v in out.comm.timings.items()}}
        counters["sent"] += stats["bytes_sent"]
        counters["received"] += stats["bytes_received"]
        for k, v in {**stats, "steps": 1}.items():
            self.comm_totals[k] = self.comm_totals.get(k, 0.0) + v
        for acc in (counters["epoch"], counters["window"]):
            acc[0] += out.loss * out.count
            acc[1] += out.correct
            acc[2] += out.count
        total = self.task.total_steps
        if step % c.log_every == 0 or step == total:
            s_loss, s_correct, s_count = sum_over_ranks(counters["window"], self.world)
            now = time.perf_counter()
            sps = s_count / max(now - self.window_t, 1e-9)
            rec = {"kind": "step", "step": step, "epoch": self.task.epoch_of(step),
                   "time_s": now - self.t0, "loss": s_loss / s_count,
                   "accuracy": s_correct / s_count, "samples_per_s": sps, "lr": out.lr,
                   "bytes_sent": stats["bytes_sent"], "bytes_received": stats["bytes_received"]}
            if self.log is not None:
                self.log.write(rec)
                if self.world > 1:  # what the communication cost in this window
                    self.log.write(_comm_record(step, self.comm_totals, counters, self.model,
                                                self.world, c.shard))
            if self.progress is not None:
                self.progress.update(self.progress.task_ids[0], completed=step, description=(
                    f"epoch {int(self.task.epoch_of(step - 1)) + 1}" if self.image
                    else "steps"), loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                    sps=f"{sps:,.0f}")
            counters["window"], self.window_t, self.comm_totals = [0.0, 0.0, 0.0], now, {}
        if self.density is not None and self.log is not None and step % c.density_every == 0:
            batches = [self.task.batch(self.rank, self.world, step + i) for i in range(4)]
            d = self.density(self.model, torch.nn.functional.cross_entropy, batches)
            self.log.write({"kind": "density", "step": step,
                            "time_s": time.perf_counter() - self.t0, **jsonable(d)})

    def on_eval(self, loop: Loop, step: int) -> None:
        model, world, counters = self.model, self.world, self.counters
        if world > 1:
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        tr_loss, tr_correct, tr_count = sum_over_ranks(counters["epoch"], world)
        at_anchor = getattr(self.opt, "at_anchor", None)  # local steps mid-round: x0,
        with at_anchor() if at_anchor is not None else nullcontext():  # every rank's
            # sharded: the ranks of a shard group run the same forwards (FSDP all-gathers),
            # each replica its share; the sums count each one c.shard times, which the
            # means cancel (--shard 1: a share per rank)
            held = self.task.evaluate(model, self.rank // self.c.shard, world // self.c.shard)
        counters["epoch"] = [0.0, 0.0, 0.0]
        now = time.perf_counter()
        rec = {"kind": "epoch" if self.image else "eval", "step": step, "time_s": now - self.t0,
               "train_loss": tr_loss / tr_count, "train_accuracy": tr_correct / tr_count,
               **held, "bytes_sent_total": counters["sent"]}
        if self.image:
            rec = {"kind": "epoch", "epoch": round(self.task.epoch_of(step)), **{
                k: v for k, v in rec.items() if k not in ("kind", "bytes_sent_total")}}
        if self.log is not None:
            self.log.write(rec)
        if self.progress is not None:
            self.progress.console.print(
                f"step {step}/{self.task.total_steps}: train loss {rec['train_loss']:.4f} | "
                + "  ".join(f"{k} {v:.4f}" for k, v in held.items()) + f" | {now - self.t0:.1f}s")

    def on_checkpoint(self, loop: Loop, step: int) -> None:
        _checkpoint(self.c, self.out, self.opt, loop.schedulers[0], self.model, self.counters,
                    step, time.perf_counter() - self.t0, self.log, self.world)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.log is not None:
            self.log.close()


def _run(rank: int, world: int, c: TrainConfig, task: Task, ckpt: dict[str, Any] | None
         ) -> dict[str, Any]:
    """One rank's run: the model, the optimiser and the :class:`~signsgd.loop.Loop` with
    the run's callbacks (module-level so that ``spawn`` can pickle it)."""
    device = _device(c, rank)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed % 2**32)
    model = task.model().to(device)
    total = task.total_steps
    group, replicas = None, world
    if c.shard > 1:  # FSDP2 / HSDP: the reducer runs across the replicas only
        mesh = _shard_model(model, c, world, device)
        group, replicas = mesh.get_group("replicate"), world // c.shard
    opt = _make_optimizer(c, model, rank, replicas, total, group)
    report = _Report(c, task, model, opt, rank, world, ckpt)
    fault = os.environ.get("SIGNSGD_INJECT_FAULT", "")
    loop = Loop(model, opt, task.loss, schedule=lr_schedule(c, total), grad_clip=c.grad_clip,
                autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                if c.precision == "bf16" else None,
                callbacks=([_FaultInjection(fault, rank)] if fault else []) + [report])
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        part = ckpt["ranks"][rank]
        with torch.no_grad():  # this rank's buffers (batch-norm statistics are per worker)
            for buf, saved in zip(model.buffers(), part["buffers"]):
                buf.copy_(saved)
        opt.load_state_dict(part["optimizer"])
        loop.load_schedule(ckpt["scheduler"])
        torch.set_rng_state(part["rng"])
        loop.step = int(ckpt["step"])

    def batch_of(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = task.batch(rank, world, step)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    cpu0 = time.process_time()
    try:
        model.train()
        step = loop.run(batch_of, total, eval_every=task.eval_every,
                        checkpoint_every=c.checkpoint_every)
        wall = time.perf_counter() - report.t0
    finally:
        report.close()
    counters, log = report.counters, report.log
    ranks = _gather(([counters["sent"], counters["received"]], time.process_time() - cpu0),
                    world)
    params = list(model.parameters())
    if c.shard > 1:  # the full parameters: a collective, on every rank
        params = [p.full_tensor() for p in params]
    params = [p.detach().cpu().clone() for p in params] if log is not None else None
    return {"rank": rank, "wall_time_s": wall, "steps": step, "bytes": [r[0] for r in ranks],
            "cpu_s": [r[1] for r in ranks],
            "params": params,
            "metrics": log.records if log is not None else None,
            "n_params": count_parameters(model)}


def _checkpoint(c: TrainConfig, out: Path, opt: Any, sched: Any, model: nn.Module,
                counters: dict[str, Any], step: int, wall: float, log: MetricsLog | None,
                world: int) -> None:
    """Every rank's state gathered to rank 0, which writes ``checkpoint.pt`` atomically.
    ``--shard > 1``: the model's full (unsharded) state dict, gathered on every rank, and in
    each rank's part its shards (``"shard"``: of each parameter; the optimiser's state:
    of its DTensors)."""
    part = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "buffers": [b.detach().cpu().clone() for b in model.buffers()],
            "counters": {k: (list(v) if isinstance(v, list) else v) for k, v in
                         counters.items()}}
    full = None
    if c.shard > 1:
        from torch.distributed.checkpoint import state_dict as dcp_sd

        full = dcp_sd.get_model_state_dict(model, options=dcp_sd.StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        part["optimizer"] = _local_state(part["optimizer"])
        part["shard"] = [_local_state(p.detach()) for p in model.parameters()]
    ranks = _gather(part, world)
    if log is not None:
        checkpoint.save(out, c, step=step, wall_time_s=wall,
                        model=model.state_dict() if full is None else full,
                        scheduler=sched.state_dict(), ranks=ranks, metrics=log.records,
                        vocabulary=getattr(model, "vocabulary", None))


#: Options that may differ between the ranks of a torchrun launch: where a rank reads and
#: writes, how it reports, its threads, device and timeout. Every other option changes what
#: the ranks exchange and when (cadences, steps, data, model, optimiser, workers...).
PER_RANK_OPTIONS = frozenset({"out", "data_dir", "progress", "threads", "device", "timeout_s",
                              "name", "overwrite", "force_workers", "extra"})


def _schedule(c: TrainConfig, task: Task, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    """What fixes the collective schedule of a rank: its options (by flag) but
    :data:`PER_RANK_OPTIONS`, and what the data and the checkpoint make of them."""
    sched = {f.metadata.get("flag") or "--" + f.name.replace("_", "-"): getattr(c, f.name)
             for f in dataclasses.fields(c) if f.name not in PER_RANK_OPTIONS}
    return {**sched, "the step budget": task.total_steps, "the evaluation interval":
            task.eval_every, "the checkpoint's step": 0 if ckpt is None else int(ckpt["step"])}


def _check_same_schedule(schedule: dict[str, Any], world: int, device: torch.device) -> None:
    """The first exchange of a torchrun launch: every rank's digest of ``schedule``
    (all-gathered, fixed size), so that ranks started with different options stop here,
    all with the same error, instead of timing out in mismatched collectives.

    Raises:
        ConfigError: on every rank, naming each differing option and every rank's value.
    """
    text = json.dumps(jsonable(schedule), sort_keys=True, default=repr)
    mine = torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()),
                            dtype=torch.uint8).to(device)
    digests = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(digests, mine)
    if all(torch.equal(d, mine) for d in digests):
        return
    every = _gather(schedule, world)
    differ = [k for k in schedule if len({repr(s.get(k)) for s in every}) > 1]
    flags = [k for k in differ if k.startswith("--")] or differ
    raise ConfigError(
        "the ranks were started with different options (under torchrun every rank needs the "
        "same ones): " + "; ".join(
            f"{k} is " + ", ".join(f"{s.get(k)!r} on rank {r}" for r, s in enumerate(every))
            for k in flags))


def _local_workers(c: TrainConfig, task: Task) -> None:
    """Refuse a local worker count the machine cannot hold (unless ``force_workers``)."""
    cores = os.cpu_count() or 1
    per_worker = 400e6 + 16 * _model_size(task) + _data_bytes(task)  # torch + model + data
    avail = launch.memory_available()
    need = c.workers * per_worker
    if c.force_workers or c.workers == 1:
        return
    if c.workers > 8 * cores or (avail is not None and need > 0.9 * avail):
        have = f"{avail / 1e9:.1f} GB available" if avail is not None else "unknown memory"
        raise ConfigError(
            f"--workers {c.workers} is more than this machine can hold: {cores} CPU cores and "
            f"{have}, about {per_worker / 1e6:,.0f} MB per worker ({need / 1e9:.1f} GB in all); "
            "use fewer workers, or --force-workers to start them anyway")


def _model_size(task: Task) -> int:
    torch.manual_seed(0)
    return count_parameters(task.model())


def _data_bytes(task: Task) -> int:
    if isinstance(task, ImageClassification):
        return task.train_ds.images.nbytes + task.eval_ds.images.nbytes
    corpus = getattr(task, "corpus", None)
    return 0 if corpus is None else corpus.train.nbytes + corpus.val.nbytes


def train(cfg: TrainConfig, *, return_params: bool = False) -> dict[str, Any]:
    """Validate ``cfg``, train, write the outputs; return the summary dict (with rank 0's
    final parameters under ``"params"`` when ``return_params``).

    Raises:
        ConfigError, DataError, CheckpointError: bad input (names, sizes, missing data, a
            corrupt or mismatched checkpoint, an unwritable or occupied ``out``), before any
            worker starts or any file is written.
        signsgd.distributed.launch.WorkerError: a worker failed; the message leads with the
            cause.

    Example:
        >>> from signsgd.config import TrainConfig
        >>> train(TrainConfig(optimizer="lion", out="runs/lion"))["test_accuracy"]  # doctest: +SKIP
        0.9...
    """
    torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")) and not (
        dist.is_available() and dist.is_initialized())
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if cfg.workers not in (1, world):
            raise ConfigError(
                f"--workers {cfg.workers} conflicts with torchrun's WORLD_SIZE={world}; "
                "under torchrun leave --workers out (or set it to the world size)"
            )
        cfg = dataclasses.replace(cfg, workers=world)
    c = validate(cfg)
    task = make_task(c)
    if isinstance(task, ImageClassification):
        c = validate(c, n_train=len(task.train_ds) + (c.validation or 0))
    rank = int(os.environ["RANK"]) if torchrun else 0
    if not torchrun:
        _local_workers(c, task)
    # Rank 0 holds the run directory for the whole run: another run into it refuses at once.
    with lock_run(Path(c.out), create=not c.resume) if rank == 0 else nullcontext():
        ckpt = checkpoint.load(Path(c.out), c, task.total_steps,
                               getattr(task, "steps_per_epoch", None)) if c.resume else None
        task.check_resume(ckpt)  # the same data (a text's digest and alphabet)
        if rank == 0 and not c.resume:
            check_out(Path(c.out), overwrite=c.overwrite)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", c.workers)) if torchrun else c.workers
        threads = c.threads if c.threads is not None else max(1, (os.cpu_count() or 1) // local)
        backend = c.backend if c.backend != "auto" else (
            "nccl" if _device(c, 0).type == "cuda" else "gloo")
        t_start = time.perf_counter()
        if torchrun:
            torch.set_num_threads(threads)
            dist.init_process_group(backend, timeout=timedelta(seconds=c.timeout_s))
            try:
                _check_same_schedule(_schedule(c, task, ckpt), c.workers, _device(c, rank)
                                     if backend == "nccl" else torch.device("cpu"))
                res0 = _run(rank, c.workers, c, task, ckpt)
                dist.barrier()  # nobody tears the group down while a peer still uses it
            finally:
                dist.destroy_process_group()
            if rank != 0:
                return {"rank": rank, "out": c.out}
        elif c.workers == 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                res0 = _run(0, 1, c, task, ckpt)
            finally:
                torch.set_num_threads(prev)
        else:
            res0 = launch.spawn(_run, c.workers, (c, task, ckpt), timeout=30 * 24 * 3600.0,
                                pg_timeout=c.timeout_s, threads=threads, backend=backend)[0]
        launch_wall = time.perf_counter() - t_start
        summary = _summary(c, task, res0, threads, launch_wall)
    if return_params:
        summary["params"] = res0["params"]
    return summary


def _summary(c: TrainConfig, task: Task, res0: dict[str, Any], threads: int,
             launch_wall: float) -> dict[str, Any]:
    """Write ``summary.json`` and ``curves.png``; return the summary."""
    out, metrics = Path(c.out), res0["metrics"]
    held = [m for m in metrics if m["kind"] in ("epoch", "eval")][-1]
    steps = max(int(res0["steps"]), 1)
    sent = [s / steps for s, _ in res0["bytes"]]
    recv = [r / steps for _, r in res0["bytes"]]
    summary: dict[str, Any] = {
        "name": c.name or c.optimizer, "data": c.data, "model": c.model,
        "optimizer": c.optimizer, "workers": c.workers,
        **{k: v for k, v in held.items() if k.startswith(task.eval_name + "_")},
        "train_loss": held["train_loss"], "train_accuracy": held["train_accuracy"],
        "wall_time_s": res0["wall_time_s"], "launch_wall_time_s": launch_wall,
        # CPU seconds of the training loops of all workers (this segment, if resumed): on a
        # machine with free cores the run needs about this much core time.
        "cpu_time_s": float(sum(res0["cpu_s"])),
        "steps": int(res0["steps"]), "epochs": c.epochs,
        "bytes_sent_per_step": sum(sent) / len(sent),
        "bytes_received_per_step": sum(recv) / len(recv),
        "bytes_per_rank": [{"rank": r, "sent_per_step": s, "received_per_step": v}
                           for r, (s, v) in enumerate(zip(sent, recv))],
        "fp32_gradient_bytes": 4 * res0["n_params"], "n_params": res0["n_params"],
        "threads_per_worker": threads, "config": c.to_dict(),
    }
    if c.shard > 1:  # FSDP2 / HSDP: what the bytes above count
        summary.update(replicas=c.workers // c.shard, shard=c.shard, bytes_counted=(
            "cross-replica: the optimiser's reducer on the replicate group, for this rank's "
            "shard; FSDP's all-gathers and reduce-scatters inside the shard groups are not "
            "counted"))
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(
        json.dumps(jsonable(summary), indent=2) + "\n"))
    plot_curves(metrics, out / "curves.png", title=f"{summary['name']} ({c.workers} worker"
                f"{'s' if c.workers > 1 else ''})")
    return summary
