"""The training loop behind ``signsgd train`` and ``signsgd compare``: one process or M workers.

:func:`train` validates a :class:`~signsgd.config.TrainConfig` before anything starts, then
trains in one process, in ``workers`` local Gloo processes
(:func:`signsgd.distributed.launch.spawn`) or, when ``RANK``, ``WORLD_SIZE`` and
``MASTER_ADDR`` are set, in the Gloo group ``torchrun`` started (on CPU). Each worker reads
its own shard of the training set (:func:`signsgd.data.shard_indices`, seeded with
``seed + epoch``; ``batch_size`` per worker; no augmentation); batch-norm statistics stay
per worker until rank 0's are broadcast at the end of each epoch. Optimisers come from
:func:`signsgd.registry.build`. ``out`` receives ``metrics.jsonl`` (``"step"`` records every
``log_every`` steps: loss and accuracy over the workers' batches since the last one,
samples/s, bytes; ``"epoch"`` records: train and held-out loss and accuracy; ``"density"``
when asked), ``summary.json``, ``curves.png`` and, after every epoch, ``checkpoint.pt``
(``resume=True`` continues from it bit-identically). ``SIGNSGD_INJECT_FAULT=RANK:STEP``
makes worker ``RANK`` raise at global step ``STEP`` (tests of crashes).

Example:
    >>> from signsgd.config import TrainConfig
    >>> train(TrainConfig(optimizer="signum", workers=4, out="runs/s4"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from signsgd import checkpoint, registry
from signsgd.config import TrainConfig, validate
from signsgd.data import Dataset, epoch_batches, load, shard_indices
from signsgd.errors import ConfigError
from signsgd.models import build, count_parameters
from signsgd.outputs import MetricsLog, jsonable, plot_curves, write_atomic

__all__ = ["train"]


def _make_optimizer(c: TrainConfig, model: nn.Module, rank: int, world: int
                    ) -> torch.optim.Optimizer:
    """This rank's optimiser; without ``betas``, ``momentum`` is β1 (β2 the registry's)."""
    from signsgd.distributed.adversary import attack

    adversary = None
    if c.adversaries and rank >= world - c.adversaries:
        adversary = attack(c.attack, seed=c.seed * 1000 + rank)
    takes = registry.METHODS[c.optimizer].defaults
    hp = {"lr": float(c.lr), "weight_decay": float(c.weight_decay),  # type: ignore[arg-type]
          "momentum": float(c.momentum), "compressor": c.compressor,  # type: ignore[arg-type]
          "betas": tuple(map(float, c.betas or (c.momentum, takes.get("betas", (0, 0))[1])))}
    return registry.build(c.optimizer, list(model.parameters()), world_size=world,
                          adversary=adversary, vote=c.vote, seed=c.seed,
                          **{k: v for k, v in hp.items() if k in takes})


def _schedule(c: TrainConfig, total_steps: int) -> Callable[[int], float]:
    if c.lr_schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
    if c.lr_schedule == "step":
        return lambda s: 0.1 ** ((s >= total_steps // 2) + (s >= (3 * total_steps) // 4))
    return lambda s: 1.0


def _allsum(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def _evaluate(model: nn.Module, ds: Dataset, rank: int, world: int, batch: int
              ) -> tuple[float, float]:
    """Mean loss and accuracy over ``ds``; each rank takes every ``world``-th example."""
    model.eval()
    idx = torch.arange(rank, len(ds), world)
    loss_sum, correct = 0.0, 0.0
    for b in torch.split(idx, batch):
        x, y = ds.batch(b)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
    model.train()
    s_loss, s_correct = _allsum([loss_sum, correct], world)
    return s_loss / len(ds), s_correct / len(ds)


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


def _run(rank: int, world: int, c: TrainConfig, train_ds: Dataset, eval_ds: Dataset,
         eval_name: str, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    """The training loop of one rank (module-level so that ``spawn`` can pickle it)."""
    out = Path(c.out)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed % 2**32)
    model = build(c.model, train_ds.shape, train_ds.num_classes)
    opt = _make_optimizer(c, model, rank, world)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) / world) / c.batch_size)
    total_steps = steps_per_epoch * c.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(c, total_steps))
    start_epoch, step, time_offset, sent_recv = 0, 0, 0.0, [0, 0]
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"][rank])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"][rank]["torch"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        time_offset = float(ckpt["wall_time_s"])
        sent_recv = [int(ckpt["bytes"][rank][0]), int(ckpt["bytes"][rank][1])]

    r, _, s = os.environ.get("SIGNSGD_INJECT_FAULT", "").partition(":")  # RANK:STEP (tests)
    fault = (int(r), int(s or 0)) if r else None
    density_fn = None
    if c.density_every and rank == 0:
        from signsgd.diagnostics import density as density_fn  # lazy: optional diagnostics
    log = MetricsLog(out / "metrics.jsonl", ckpt["metrics"] if ckpt else ()) if rank == 0 else None
    prog = _progress(c.progress and log is not None, total_steps, step)
    agg = getattr(opt, "aggregator", None) or getattr(opt, "reducer", None)
    cpu0 = time.process_time()
    t0 = time.perf_counter() - time_offset
    try:
        model.train()
        for epoch in range(start_epoch, c.epochs):
            idx = shard_indices(len(train_ds), rank, world, seed=c.seed, epoch=epoch)
            ep, win = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]  # loss sum, correct, examples
            win_t = time.perf_counter()
            for b in epoch_batches(idx, c.batch_size):
                if fault == (rank, step):
                    raise RuntimeError(f"injected fault on rank {rank} at step {step} "
                                       "(SIGNSGD_INJECT_FAULT)")
                x, y = train_ds.batch(b)
                outp = model(x)
                loss = F.cross_entropy(outp, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lr_used = float(opt.param_groups[0]["lr"])
                sched.step()
                if agg is not None:
                    sent_recv[0] += int(agg.bytes_sent)
                    sent_recv[1] += int(agg.bytes_received)
                step += 1
                n_b = float(len(b))
                bl = float(loss.detach()) * n_b
                bc = float((outp.detach().argmax(1) == y).sum())
                for acc in (ep, win):
                    acc[0] += bl
                    acc[1] += bc
                    acc[2] += n_b
                if step % c.log_every == 0 or step == total_steps:
                    s_loss, s_correct, s_count = _allsum(win, world)
                    now = time.perf_counter()
                    sps = s_count / max(now - win_t, 1e-9)
                    rec = {"kind": "step", "step": step,
                           "epoch": epoch + (step - epoch * steps_per_epoch) / steps_per_epoch,
                           "time_s": now - t0, "loss": s_loss / s_count,
                           "accuracy": s_correct / s_count, "samples_per_s": sps, "lr": lr_used,
                           "bytes_sent": int(agg.bytes_sent) if agg is not None else 0,
                           "bytes_received": int(agg.bytes_received) if agg is not None else 0}
                    if log is not None:
                        log.write(rec)
                    if prog is not None:
                        prog.update(prog.task_ids[0], completed=step,
                                    description=f"epoch {epoch + 1}/{c.epochs}",
                                    loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}",
                                    sps=f"{sps:,.0f}")
                    win, win_t = [0.0, 0.0, 0.0], time.perf_counter()
                if density_fn is not None and log is not None and step % c.density_every == 0:
                    batches = [train_ds.batch(bb) for bb in epoch_batches(idx[: 4 * c.batch_size],
                                                                          c.batch_size)]
                    d = density_fn(model, F.cross_entropy, batches)
                    log.write({"kind": "density", "step": step,
                               "time_s": time.perf_counter() - t0, **jsonable(d)})
            # ---- end of epoch: same buffers everywhere, evaluate, checkpoint
            if world > 1:
                for buf in model.buffers():
                    dist.broadcast(buf, 0)
            tr_loss, tr_correct, tr_count = _allsum(ep, world)
            ev_loss, ev_acc = _evaluate(model, eval_ds, rank, world, 1000)
            now = time.perf_counter()
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": step, "time_s": now - t0,
                   "train_loss": tr_loss / tr_count, "train_accuracy": tr_correct / tr_count,
                   f"{eval_name}_loss": ev_loss, f"{eval_name}_accuracy": ev_acc}
            ranks = _gather((opt.state_dict(), {"torch": torch.get_rng_state()},
                             list(sent_recv)), world)
            if log is not None:
                log.write(rec)
                checkpoint.save(out, c, epoch=epoch + 1, step=step, wall_time_s=now - t0,
                                model=model.state_dict(), optimizer=[r[0] for r in ranks],
                                scheduler=sched.state_dict(), rng=[r[1] for r in ranks],
                                bytes=[r[2] for r in ranks], metrics=log.records)
            if prog is not None:
                prog.console.print(
                    f"epoch {epoch + 1}/{c.epochs}: train loss {rec['train_loss']:.4f} "
                    f"acc {rec['train_accuracy']:.4f} | {eval_name} loss {ev_loss:.4f} "
                    f"acc {ev_acc:.4f} | {now - t0:.1f}s")
        wall = time.perf_counter() - t0
    finally:
        if prog is not None:
            prog.stop()
        if log is not None:
            log.close()
    ranks = _gather((list(sent_recv), time.process_time() - cpu0), world)
    return {"rank": rank, "wall_time_s": wall, "steps": step, "bytes": [r[0] for r in ranks],
            "cpu_s": [r[1] for r in ranks],
            "params": [p.detach().clone() for p in model.parameters()] if log is not None else None,
            "metrics": log.records if log is not None else None,
            "n_params": count_parameters(model)}


def _gather(mine: Any, world: int) -> list[Any]:
    """Every rank's ``mine``, in rank order."""
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def _split(c: TrainConfig, train_ds: Dataset, test_ds: Dataset) -> tuple[Dataset, Dataset, str]:
    if c.train_subset is not None:
        train_ds = train_ds.subset(torch.arange(min(c.train_subset, len(train_ds))))
    if not c.validation:
        return train_ds, test_ds, "test"
    n = len(train_ds) - c.validation
    return (train_ds.subset(torch.arange(n)), train_ds.subset(torch.arange(n, n + c.validation)),
            "val")


def train(cfg: TrainConfig, *, return_params: bool = False) -> dict[str, Any]:
    """Validate ``cfg``, train, write the outputs; return the summary dict (with rank 0's
    final parameters under ``"params"`` when ``return_params``).

    Raises:
        ConfigError, DataError, CheckpointError: bad input (names, sizes, missing data, a
            corrupt or mismatched checkpoint), before any worker starts or any file is written.
        signsgd.distributed.launch.WorkerError: a worker failed; its traceback is in the
            message.

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
    train_ds, test_ds = load(c.data, c.data_dir)
    c = validate(c, n_train=len(train_ds))
    args = (c, *_split(c, train_ds, test_ds), checkpoint.load(Path(c.out), c) if c.resume else None)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", c.workers)) if torchrun else c.workers
    threads = c.threads if c.threads is not None else max(1, (os.cpu_count() or 1) // local)
    t_start = time.perf_counter()
    if torchrun:
        rank = int(os.environ["RANK"])
        torch.set_num_threads(threads)
        dist.init_process_group("gloo")  # the trainer computes on CPU
        try:
            res0 = _run(rank, c.workers, *args)
            dist.barrier()  # nobody tears the group down while a peer still uses it
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return {"rank": rank}
    elif c.workers == 1:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            res0 = _run(0, 1, *args)
        finally:
            torch.set_num_threads(prev)
    else:
        from signsgd.distributed.launch import spawn

        res0 = spawn(_run, c.workers, args, timeout=c.timeout_s,
                     pg_timeout=min(c.timeout_s, 600.0), threads=threads)[0]
    launch_wall = time.perf_counter() - t_start

    out, metrics, eval_name = Path(c.out), res0["metrics"], args[3]
    last = [m for m in metrics if m["kind"] == "epoch"][-1]
    steps = max(int(res0["steps"]), 1)
    sent = [s / steps for s, _ in res0["bytes"]]
    recv = [r / steps for _, r in res0["bytes"]]
    summary: dict[str, Any] = {
        "name": c.name or c.optimizer, "data": c.data, "model": c.model,
        "optimizer": c.optimizer, "workers": c.workers,
        f"{eval_name}_accuracy": last[f"{eval_name}_accuracy"],
        f"{eval_name}_loss": last[f"{eval_name}_loss"],
        "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"],
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
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(
        json.dumps(jsonable(summary), indent=2) + "\n"))
    plot_curves(metrics, out / "curves.png", title=f"{summary['name']} ({c.workers} worker"
                f"{'s' if c.workers > 1 else ''})")
    if return_params:
        summary["params"] = res0["params"]
    return summary


