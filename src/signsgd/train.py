"""The trainer behind ``signsgd train`` and ``signsgd compare``: one process or M workers.

:func:`train` validates a :class:`TrainConfig` (names, sizes, data, checkpoint) before
anything starts, then runs the training loop in one process (``workers=1``), in
``workers`` local Gloo processes (:func:`signsgd.distributed.launch.spawn`), or — when the
``torchrun`` environment is set (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) — in the
process group ``torchrun`` started (Gloo; the trainer computes on CPU), so the same command
runs across machines.

Each worker reads its own shard of the training set (``DistributedSampler`` semantics:
:func:`signsgd.data.shard_indices`, seeded with ``seed + epoch``); ``batch_size`` is per
worker. Models with batch norm (``resnet20``, ``vgg``) keep per-worker running statistics
during an epoch; at the end of each epoch rank 0's buffers are broadcast before evaluation
and checkpointing (as DDP's ``broadcast_buffers`` does, once per epoch). No data
augmentation. Sign optimisers communicate through the library's aggregators
(``MajorityVote`` for ``signsgd``/``signum``, ``ErrorFeedbackAllReduce`` for
``ef-signsgd``/``efsgd``); ``sgd``/``adam``/``adamw`` average their gradients with the fp32
``AllReduce`` baseline. The bytes each worker sends and receives per step are logged.

Outputs in ``out``:

* ``metrics.jsonl`` — one JSON object per line: ``{"kind": "step", ...}`` every
  ``log_every`` steps (loss and accuracy averaged over the workers' batches since the last
  line, samples/s, bytes), ``{"kind": "epoch", ...}`` after each epoch (train and
  test/validation loss and accuracy) and ``{"kind": "density", ...}`` when asked;
* ``summary.json`` — final ``test_accuracy`` (a fraction), ``test_loss``, ``wall_time_s``,
  ``bytes_sent_per_step`` / ``bytes_received_per_step`` (mean per worker per step, and per
  rank in ``bytes_per_rank``), the model size and the full config;
* ``curves.png`` — loss and accuracy against steps and against wall time;
* ``checkpoint.pt`` — written atomically after every epoch: model, each rank's optimiser
  state (aggregator state included), scheduler, RNG states, epoch, metrics so far.
  ``resume=True`` continues from it bit-identically.

Fault injection for tests: ``SIGNSGD_INJECT_FAULT=RANK:STEP`` makes worker ``RANK`` raise
``RuntimeError`` at global step ``STEP``, to check that a crash ends the whole run with that
worker's traceback.

Example:
    >>> from signsgd.train import TrainConfig, train                       # doctest: +SKIP
    >>> summary = train(TrainConfig(optimizer="signum", lr=3e-4, workers=4,
    ...                             out="runs/signum4"))                   # doctest: +SKIP
    >>> summary["test_accuracy"]                                           # doctest: +SKIP
    0.90...
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from signsgd import compression
from signsgd.data import DATASETS, Dataset, epoch_batches, load, shard_indices
from signsgd.errors import CheckpointError, ConfigError
from signsgd.models import MODELS, build, count_parameters

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "DEFAULT_LR",
    "TrainConfig",
    "ConfigError",
    "CheckpointError",
    "train",
    "validate",
    "plot_curves",
    "read_metrics",
]

#: Optimiser names of ``--optimizer``.
OPTIMIZERS: tuple[str, ...] = ("signsgd", "signum", "ef-signsgd", "efsgd", "sgd", "adam", "adamw")
#: Learning-rate schedules of ``--lr-schedule`` (applied per step).
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
#: Learning rates used when none is given (tuned on Fashion-MNIST + cnn, see docs/tuning.md).
#: ``signsgd``, ``efsgd`` and ``adamw`` were not tuned: they take the value of their closest
#: tuned relative (Signum, EF-signSGD, Adam).
DEFAULT_LR: dict[str, float] = {
    "signsgd": 1e-3, "signum": 1e-3, "ef-signsgd": 0.3, "efsgd": 0.3,
    "sgd": 0.1, "adam": 3e-3, "adamw": 3e-3,
}
#: Momentum used when none is given.
DEFAULT_MOMENTUM: dict[str, float] = {
    "signsgd": 0.0, "signum": 0.9, "ef-signsgd": 0.0, "efsgd": 0.0,
    "sgd": 0.9, "adam": 0.9, "adamw": 0.9,
}
VOTES: tuple[str, ...] = ("sharded", "allgather")
ATTACKS: tuple[str, ...] = ("negate", "random")
COMPRESSORS: tuple[str, ...] = ("identity", "sign", "scaled-sign", "topk:R", "randomk:R")

CHECKPOINT = "checkpoint.pt"
_FORMAT = "signsgd-checkpoint-v1"
# Config fields that must match when resuming (epochs may grow; out/progress/... may differ).
_RESUME_KEYS = (
    "data", "model", "optimizer", "lr", "momentum", "weight_decay", "batch_size",
    "lr_schedule", "seed", "workers", "vote", "adversaries", "attack", "compressor",
    "train_subset", "validation",
)


@dataclass
class TrainConfig:
    """Everything one training run needs; the fields mirror ``signsgd train``'s options.

    ``lr`` / ``momentum`` ``None`` take :data:`DEFAULT_LR` / :data:`DEFAULT_MOMENTUM` of
    the optimiser. ``compressor`` (``efsgd`` only; ``ef-signsgd`` always uses
    ``scaled-sign``) is one of ``identity``, ``sign``, ``scaled-sign``, ``topk:R``,
    ``randomk:R`` with ``R`` in (0, 1]. ``train_subset`` keeps the first N training
    examples; ``validation`` holds out the last N of them and evaluates on those instead of
    the test set (for tuning). ``threads`` is ``torch.set_num_threads`` per worker
    (``None``: CPU cores // workers, at least 1).
    """

    data: str = "fashion-mnist"
    model: str = "cnn"
    optimizer: str = "signum"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 3
    lr_schedule: str = "constant"
    seed: int = 0
    workers: int = 1
    vote: str = "sharded"
    adversaries: int = 0
    attack: str = "negate"
    compressor: str = "topk:0.1"
    out: str = "runs/train"
    data_dir: str | None = None
    resume: bool = False
    train_subset: int | None = None
    validation: int = 0
    log_every: int = 20
    density_every: int = 0
    threads: int | None = None
    timeout_s: float = 7 * 24 * 3600.0
    progress: bool = True
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with ``lr`` and ``momentum`` filled in from the optimiser's defaults."""
        c = dataclasses.replace(self)
        if c.optimizer in OPTIMIZERS:
            if c.lr is None:
                c.lr = DEFAULT_LR[c.optimizer]
            if c.momentum is None:
                c.momentum = DEFAULT_MOMENTUM[c.optimizer]
        if c.optimizer == "ef-signsgd":
            c.compressor = "scaled-sign"
        return c

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg: TrainConfig, *, n_train: int | None = None) -> TrainConfig:
    """Check every field of ``cfg`` (and, given ``n_train``, the sizes against the data).

    Returns the resolved config (defaults filled in). Raises :class:`ConfigError` whose
    message names the bad value and lists the valid ones.
    """
    for value, valid, what, plural in (
        (cfg.optimizer, OPTIMIZERS, "optimizer", "optimizers"),
        (cfg.model, MODELS, "model", "models"),
        (cfg.data, DATASETS, "dataset", "datasets"),
        (cfg.lr_schedule, SCHEDULES, "lr schedule", "schedules"),
        (cfg.vote, VOTES, "vote mode", "modes"),
        (cfg.attack, ATTACKS, "attack", "attacks"),
    ):
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid {plural}: {', '.join(valid)}")
    c = cfg.resolved()
    for name, low in (("workers", 1), ("batch_size", 1), ("epochs", 1), ("log_every", 1)):
        v = getattr(c, name)
        if not _is_int(v) or v < low:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be an integer >= {low}, got {v!r}")
    for name in ("adversaries", "density_every", "validation", "seed"):
        v = getattr(c, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
    if c.train_subset is not None and (not _is_int(c.train_subset) or c.train_subset < 1):
        raise ConfigError(f"--train-subset must be an integer >= 1, got {c.train_subset!r}")
    if not _is_num(c.lr) or c.lr <= 0:  # type: ignore[operator]
        raise ConfigError(f"--lr must be a finite number > 0, got {c.lr!r}")
    if not _is_num(c.momentum) or not 0 <= c.momentum < 1:  # type: ignore[operator]
        raise ConfigError(f"--momentum must be in [0, 1), got {c.momentum!r}")
    if not _is_num(c.weight_decay) or c.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {c.weight_decay!r}")
    if c.threads is not None and (not _is_int(c.threads) or c.threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, got {c.threads!r}")
    if c.adversaries > c.workers:
        raise ConfigError(
            f"--adversaries {c.adversaries} is more than --workers {c.workers}; "
            "the adversaries are some of the workers"
        )
    if c.adversaries and c.workers == 1:
        raise ConfigError(
            f"--adversaries {c.adversaries} needs --workers >= 2 (the adversaries are some of "
            "the workers, and a single worker does not communicate)"
        )
    if c.optimizer in ("efsgd", "ef-signsgd"):
        compression.from_spec(c.compressor)
    if n_train is not None:
        n = n_train if c.train_subset is None else min(n_train, c.train_subset)
        n -= c.validation
        if c.validation and n < 1:
            raise ConfigError(
                f"--validation {c.validation} leaves no training examples (only "
                f"{n + c.validation} available)"
            )
        if c.workers > n:
            raise ConfigError(
                f"--workers {c.workers} is more than the {n} training examples; every worker "
                "needs at least one example — use fewer workers"
            )
    return c


# --------------------------------------------------------------------------- checkpoints
def _fingerprint(c: TrainConfig) -> dict[str, Any]:
    return {k: getattr(c, k) for k in _RESUME_KEYS}


def load_checkpoint(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Read and check ``out/checkpoint.pt`` against ``cfg``; raise :class:`CheckpointError`.

    Nothing in ``out`` is touched.
    """
    path = out / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"--resume: no checkpoint at {path}; run without --resume to start a new run"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on bad files
        raise CheckpointError(
            f"--resume: checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the run directory was left as "
            "it was — delete the checkpoint or use another --out to start over"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise CheckpointError(
            f"--resume: {path} is not a signsgd training checkpoint (format "
            f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
            f"expected {_FORMAT!r})"
        )
    want = _fingerprint(cfg)
    have = ckpt.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r}, now {want[k]!r}" for k in want
             if have.get(k) != want[k]]
    if diffs:
        raise CheckpointError(
            f"--resume: checkpoint {path} is from a different run ("
            + "; ".join(diffs)
            + "); use the same options as that run, or another --out to start over"
        )
    needed = ("model", "optimizer", "scheduler", "rng", "bytes", "metrics",
              "epoch", "step", "wall_time_s")
    missing = [k for k in needed if k not in ckpt]
    if missing or any(len(ckpt[k]) != cfg.workers for k in ("optimizer", "rng", "bytes")):
        raise CheckpointError(
            f"--resume: checkpoint {path} is incomplete (missing {missing} or not one state "
            f"per worker); delete it or use another --out to start over"
        )
    if ckpt["epoch"] >= cfg.epochs:
        raise CheckpointError(
            f"--resume: the checkpoint in {path} already finished epoch {ckpt['epoch']} of "
            f"--epochs {cfg.epochs}; raise --epochs to train further"
        )
    return ckpt


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the worker
def _make_optimizer(c: TrainConfig, model: nn.Module, rank: int, world: int
                    ) -> torch.optim.Optimizer:
    """This rank's optimiser from the registry (communicating when ``world > 1``)."""
    from signsgd import registry
    from signsgd.distributed.adversary import attack

    adversary = None
    if c.adversaries and rank >= world - c.adversaries:
        adversary = attack(c.attack, seed=c.seed * 1000 + rank)
    hp: dict[str, Any] = {"lr": float(c.lr), "weight_decay": float(c.weight_decay)}  # type: ignore[arg-type]
    takes = registry.METHODS[c.optimizer].defaults
    if "momentum" in takes:
        hp["momentum"] = float(c.momentum)  # type: ignore[arg-type]
    if "betas" in takes:
        hp["betas"] = (float(c.momentum), takes["betas"][1])  # type: ignore[arg-type]
    if "compressor" in takes:
        hp["compressor"] = c.compressor
    return registry.build(c.optimizer, list(model.parameters()), world_size=world,
                          adversary=adversary, vote=c.vote, seed=c.seed, **hp)


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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def _injected_fault() -> tuple[int, int] | None:
    spec = os.environ.get("SIGNSGD_INJECT_FAULT")
    if not spec:
        return None
    r, _, s = spec.partition(":")
    return int(r), int(s or 0)


def _progress(enabled: bool, total: int, done: int) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    p = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[sps]}/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
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
    n_local = math.ceil(len(train_ds) / world)
    steps_per_epoch = math.ceil(n_local / c.batch_size)
    total_steps = steps_per_epoch * c.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(c, total_steps))
    metrics: list[dict[str, Any]] = []
    start_epoch, step, time_offset = 0, 0, 0.0
    bytes_sent = bytes_recv = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"][rank])
        sched.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["torch"])
        metrics = list(ckpt["metrics"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        time_offset = float(ckpt["wall_time_s"])
        bytes_sent, bytes_recv = int(ckpt["bytes"][rank][0]), int(ckpt["bytes"][rank][1])

    fault = _injected_fault()
    density_fn = None
    if c.density_every and rank == 0:
        from signsgd.diagnostics import density as density_fn  # lazy: optional diagnostics
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        mpath = out / "metrics.jsonl"
        _atomic_write_text(mpath, "".join(json.dumps(m) + "\n" for m in metrics))
        mfile = open(mpath, "a")  # noqa: SIM115 - closed in finally
    prog = _progress(c.progress and is_main, total_steps, step)
    cpu0 = time.process_time()
    t0 = time.perf_counter() - time_offset
    try:
        model.train()
        for epoch in range(start_epoch, c.epochs):
            idx = shard_indices(len(train_ds), rank, world, seed=c.seed, epoch=epoch)
            ep_loss = ep_correct = ep_count = 0.0
            win_loss = win_correct = win_count = 0.0
            win_t = time.perf_counter()
            for b in epoch_batches(idx, c.batch_size):
                if fault is not None and fault == (rank, step):
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
                agg = getattr(opt, "aggregator", None) or getattr(opt, "reducer", None)
                if agg is not None:
                    bytes_sent += int(agg.bytes_sent)
                    bytes_recv += int(agg.bytes_received)
                step += 1
                n_b = float(len(b))
                bl = float(loss.detach()) * n_b
                bc = float((outp.detach().argmax(1) == y).sum())
                ep_loss += bl
                ep_correct += bc
                ep_count += n_b
                win_loss += bl
                win_correct += bc
                win_count += n_b
                if step % c.log_every == 0 or step == total_steps:
                    s_loss, s_correct, s_count = _allsum([win_loss, win_correct, win_count], world)
                    now = time.perf_counter()
                    sps = s_count / max(now - win_t, 1e-9)
                    rec = {
                        "kind": "step", "step": step,
                        "epoch": epoch + (step - epoch * steps_per_epoch) / steps_per_epoch,
                        "time_s": now - t0, "loss": s_loss / s_count,
                        "accuracy": s_correct / s_count, "samples_per_s": sps,
                        "lr": lr_used,
                        "bytes_sent": int(agg.bytes_sent) if agg is not None else 0,
                        "bytes_received": int(agg.bytes_received) if agg is not None else 0,
                    }
                    if is_main:
                        metrics.append(rec)
                        mfile.write(json.dumps(rec) + "\n")
                        mfile.flush()
                        if prog is not None:
                            prog.update(prog.task_ids[0], completed=step,
                                        description=f"epoch {epoch + 1}/{c.epochs}",
                                        loss=f"{rec['loss']:.4f}",
                                        acc=f"{rec['accuracy']:.3f}", sps=f"{sps:,.0f}")
                    win_loss = win_correct = win_count = 0.0
                    win_t = time.perf_counter()
                if density_fn is not None and step % c.density_every == 0:
                    batches = [train_ds.batch(bb) for bb in epoch_batches(idx[: 4 * c.batch_size],
                                                                          c.batch_size)]
                    d = density_fn(model, F.cross_entropy, batches)
                    rec = {"kind": "density", "step": step, "time_s": time.perf_counter() - t0,
                           **_jsonable(d)}
                    metrics.append(rec)
                    mfile.write(json.dumps(rec) + "\n")
                    mfile.flush()
            # ---- end of epoch: same buffers everywhere, evaluate, checkpoint
            if world > 1:
                for buf in model.buffers():
                    dist.broadcast(buf, 0)
            tr_loss, tr_correct, tr_count = _allsum([ep_loss, ep_correct, ep_count], world)
            ev_loss, ev_acc = _evaluate(model, eval_ds, rank, world, 1000)
            now = time.perf_counter()
            rec = {
                "kind": "epoch", "epoch": epoch + 1, "step": step, "time_s": now - t0,
                "train_loss": tr_loss / tr_count, "train_accuracy": tr_correct / tr_count,
                f"{eval_name}_loss": ev_loss, f"{eval_name}_accuracy": ev_acc,
            }
            states = [opt.state_dict()]
            rngs = [{"torch": torch.get_rng_state()}]
            byts = [[bytes_sent, bytes_recv]]
            if world > 1:
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, (states[0], rngs[0], byts[0]))
                states = [g[0] for g in gathered]
                rngs = [g[1] for g in gathered]
                byts = [g[2] for g in gathered]
            if is_main:
                metrics.append(rec)
                mfile.write(json.dumps(rec) + "\n")
                mfile.flush()
                _atomic_save({
                    "format": _FORMAT, "fingerprint": _fingerprint(c), "config": c.to_dict(),
                    "epoch": epoch + 1, "step": step, "wall_time_s": now - t0,
                    "model": model.state_dict(), "optimizer": states,
                    "scheduler": sched.state_dict(), "rng": rngs, "bytes": byts,
                    "metrics": metrics,
                }, out / CHECKPOINT)
                if prog is not None:
                    prog.console.print(
                        f"epoch {epoch + 1}/{c.epochs}: train loss {rec['train_loss']:.4f} "
                        f"acc {rec['train_accuracy']:.4f} | {eval_name} loss {ev_loss:.4f} "
                        f"acc {ev_acc:.4f} | {now - t0:.1f}s"
                    )
        wall = time.perf_counter() - t0
    finally:
        if prog is not None:
            prog.stop()
        if is_main:
            mfile.close()
    final = [p.detach().clone() for p in model.parameters()]
    total = [[bytes_sent, bytes_recv]]
    cpu = [time.process_time() - cpu0]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (total[0], cpu[0]))
        total = [g[0] for g in gathered]  # type: ignore[index]
        cpu = [g[1] for g in gathered]  # type: ignore[index]
    return {"rank": rank, "wall_time_s": wall, "steps": step, "bytes": total, "cpu_s": cpu,
            "params": final if is_main else None, "metrics": metrics if is_main else None,
            "n_params": count_parameters(model)}


# --------------------------------------------------------------------------- entry point
def _torchrun_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _datasets(c: TrainConfig) -> tuple[Dataset, Dataset, str]:
    train_ds, test_ds = load(c.data, c.data_dir)
    if c.train_subset is not None:
        train_ds = train_ds.subset(torch.arange(min(c.train_subset, len(train_ds))))
    if c.validation:
        n = len(train_ds)
        if c.validation >= n:
            raise ConfigError(
                f"--validation {c.validation} leaves no training examples (only {n} available)"
            )
        return (train_ds.subset(torch.arange(n - c.validation)),
                train_ds.subset(torch.arange(n - c.validation, n)), "val")
    return train_ds, test_ds, "test"


def train(cfg: TrainConfig, *, return_params: bool = False) -> dict[str, Any]:
    """Validate ``cfg``, train, write the outputs; return the summary dict.

    Everything that can be checked is checked before any worker starts or any file is
    written: names, sizes, the data (a missing dataset says how to get it) and, with
    ``resume``, the checkpoint (a corrupt or mismatched one raises
    :class:`CheckpointError` and leaves ``out`` as it was).

    Args:
        cfg: the run's configuration.
        return_params: also return rank 0's final parameters under ``"params"`` (tests).

    Raises:
        ConfigError, DataError, CheckpointError: bad input, before anything starts.
        signsgd.distributed.launch.WorkerError: a worker failed; its traceback is in the
            message.
    """
    torchrun = _torchrun_env() and not (dist.is_available() and dist.is_initialized())
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        if cfg.workers not in (1, world):
            raise ConfigError(
                f"--workers {cfg.workers} conflicts with torchrun's WORLD_SIZE={world}; "
                "under torchrun leave --workers out (or set it to the world size)"
            )
        cfg = dataclasses.replace(cfg, workers=world)
    c = validate(cfg)
    train_ds, eval_ds, eval_name = _datasets(c)
    c = validate(c, n_train=len(train_ds) + (c.validation if c.validation else 0))
    out = Path(c.out)
    ckpt = load_checkpoint(out, c) if c.resume else None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", c.workers)) if torchrun else c.workers
    threads = c.threads if c.threads is not None else _default_threads(local)

    t_start = time.perf_counter()
    if torchrun:
        rank = int(os.environ["RANK"])
        torch.set_num_threads(threads)
        dist.init_process_group("gloo")  # the trainer computes on CPU
        try:
            results = [_run(rank, c.workers, c, train_ds, eval_ds, eval_name, ckpt)]
            dist.barrier()  # nobody tears the group down while a peer still uses it
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return {"rank": rank}
        res0 = results[0]
        per_rank = res0["bytes"]
    elif c.workers == 1:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            res0 = _run(0, 1, c, train_ds, eval_ds, eval_name, ckpt)
        finally:
            torch.set_num_threads(prev)
        per_rank = res0["bytes"]
    else:
        from signsgd.distributed.launch import spawn

        results = spawn(_run, c.workers, (c, train_ds, eval_ds, eval_name, ckpt),
                        timeout=c.timeout_s, pg_timeout=min(c.timeout_s, 600.0),
                        threads=threads)
        res0 = results[0]
        per_rank = res0["bytes"]
    launch_wall = time.perf_counter() - t_start

    metrics = res0["metrics"]
    epochs = [m for m in metrics if m["kind"] == "epoch"]
    last = epochs[-1]
    steps = max(int(res0["steps"]), 1)
    sent = [s / steps for s, _ in per_rank]
    recv = [r / steps for _, r in per_rank]
    summary: dict[str, Any] = {
        "name": c.name or c.optimizer,
        "data": c.data, "model": c.model, "optimizer": c.optimizer, "workers": c.workers,
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
        "fp32_gradient_bytes": 4 * res0["n_params"],
        "n_params": res0["n_params"],
        "threads_per_worker": threads,
        "config": c.to_dict(),
    }
    _atomic_write_text(out / "summary.json", json.dumps(_jsonable(summary), indent=2) + "\n")
    plot_curves(metrics, out / "curves.png", title=f"{summary['name']} ({c.workers} worker"
                f"{'s' if c.workers > 1 else ''})")
    if return_params:
        summary["params"] = res0["params"]
    return summary


# --------------------------------------------------------------------------- plots
def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(metrics: list[dict[str, Any]]) -> dict[str, list[float]]:
    steps = [m for m in metrics if m["kind"] == "step"]
    epochs = [m for m in metrics if m["kind"] == "epoch"]
    ev = "test" if any("test_accuracy" in m for m in epochs) else "val"
    return {
        "step": [m["step"] for m in steps], "step_epoch": [m["epoch"] for m in steps],
        "step_time": [m["time_s"] for m in steps], "loss": [m["loss"] for m in steps],
        "acc": [m["accuracy"] for m in steps],
        "ep": [m["epoch"] for m in epochs], "ep_step": [m["step"] for m in epochs],
        "ep_time": [m["time_s"] for m in epochs],
        "ev_loss": [m[f"{ev}_loss"] for m in epochs],
        "ev_acc": [m[f"{ev}_accuracy"] for m in epochs],
        "ev": ev,  # type: ignore[dict-item]
    }


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Loss and accuracy against steps (top) and wall time (bottom); train lines, eval dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = _series(metrics)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, (xs, xe, label) in enumerate(((s["step"], s["ep_step"], "step"),
                                           (s["step_time"], s["ep_time"], "wall time (s)"))):
        ax_l, ax_a = axes[row]
        ax_l.plot(xs, s["loss"], label="train (running)")
        ax_l.plot(xe, s["ev_loss"], "o-", label=s["ev"])
        ax_a.plot(xs, s["acc"], label="train (running)")
        ax_a.plot(xe, s["ev_acc"], "o-", label=s["ev"])
        ax_l.set_xlabel(label)
        ax_a.set_xlabel(label)
        ax_l.set_ylabel("loss")
        ax_a.set_ylabel("accuracy")
        ax_l.set_yscale("log")
        for ax in (ax_l, ax_a):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
