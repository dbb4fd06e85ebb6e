"""The configuration of one training run: :class:`TrainConfig`, its validation, its spellings.

Each field of :class:`TrainConfig` carries its own metadata, and everything else is derived
from it — ``signsgd train``'s options (:func:`add_arguments`, :func:`from_args`), the keys
of a ``signsgd compare`` file (:data:`COMPARE_KEYS`), the checks of :func:`validate` and
the fields a resumed run must share with its checkpoint — so a new option is one new field:

* ``help`` — its ``--help`` text (``{choices}`` is replaced by the valid names);
* ``choices`` — ``(names, what, plural)``: the value must be one of ``names``;
* ``rule`` — ``(predicate, text)``: else ``--flag must be TEXT, got VALUE`` (a field whose
  default is ``None`` may stay ``None``);
* ``resume=False`` — may differ when resuming (every other field must match);
* ``cli=False`` / ``compare=False`` — not an option of ``signsgd train`` / not a key of a
  compare file; ``flag`` / ``metavar`` — its spelling when not ``--field-name``.

Example:
    >>> c = validate(TrainConfig(optimizer="adam"))
    >>> c.lr, c.momentum, c.betas
    (0.003, 0.9, None)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from signsgd import compression, registry
from signsgd.data import DATASETS
from signsgd.distributed.adversary import ATTACKS
from signsgd.distributed.vote import MODES
from signsgd.errors import ConfigError
from signsgd.models import MODELS
from signsgd.text import is_text
from signsgd.transformer import SIZES

__all__ = ["OPTIMIZERS", "SCHEDULES", "COMPARE_KEYS", "GROUPS", "TrainConfig", "validate",
           "add_arguments", "from_args", "freeze_step_of"]

#: ``--optimizer`` names: :data:`signsgd.registry.METHODS`, the methods the trainer gained
#: later (``lion``) listed last, so that the order of the listing stays as it was.
OPTIMIZERS: tuple[str, ...] = tuple(registry.METHODS)
#: Learning-rate schedules of ``--lr-schedule`` (applied per step, after the warm-up).
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
#: ``--data`` names: image datasets, Shakespeare's works, and ``text:PATH``.
DATA: tuple[str, ...] = (*DATASETS, "shakespeare", "text:PATH")
#: ``--model`` names: image models and the named sizes of the language model.
MODEL_NAMES: tuple[str, ...] = (*MODELS, *SIZES)
#: The outer reducers of local steps (``--outer-reducer``): the registry's.
OUTER_REDUCERS: tuple[str, ...] = registry.OUTER_REDUCERS
#: The outer optimisers of local steps (``--outer-optimizer``): the registry's.
OUTER_OPTIMIZERS: tuple[str, ...] = tuple(registry.OUTER_OPTIMIZERS)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

#: ``--freeze-step``'s default as a fraction of the run's steps (DeepSpeed advises freezing
#: 1-bit Adam's variance after roughly 15-25 % of training).
FREEZE_FRACTION = 0.2

Rule = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low: int) -> Rule:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


_FRACTION: Rule = (lambda v: _is_num(v) and 0 <= v < 1, "in [0, 1)")
_BETAS: Rule = (lambda v: isinstance(v, tuple) and len(v) == 2 and all(map(_FRACTION[0], v)),
                "two numbers in [0, 1)")


def _option(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything one training run needs; each field is an option of ``signsgd train``.

    ``lr`` / ``momentum`` ``None`` take the optimiser's defaults from
    :data:`signsgd.registry.METHODS` (``momentum`` is β1 for the methods that take
    ``betas``). ``ef-signsgd`` always uses the ``scaled-sign`` compressor. Integers given
    for float fields become floats, lists for ``betas`` a tuple.

    Example:
        >>> TrainConfig(optimizer="lion", betas=[0.95, 0.98]).betas
        (0.95, 0.98)
    """

    data: str = _option("fashion-mnist", "dataset: {choices} (any UTF-8 text file; default "
                        "%(default)s)", choices=(DATA, "dataset", "datasets"))
    model: str = _option("cnn", "{choices} (gpt sizes for text data; default %(default)s)",
                         choices=(MODEL_NAMES, "model", "models"))
    optimizer: str = _option("signum", "{choices} (default %(default)s)",
                             choices=(OPTIMIZERS, "optimizer", "optimizers"))
    lr: float | None = _option(None, "learning rate (default: the tuned value of the optimiser)",
                               rule=(lambda v: _is_num(v) and v > 0, "a finite number > 0"))
    betas: tuple[float, float] | None = _option(
        None, "(β1, β2) of adam, adamw and lion (default: β1 from --momentum, else 0.9, and the "
        "optimiser's β2, as before this option existed)", rule=_BETAS, metavar=("B1", "B2"))
    momentum: float | None = _option(
        None, "momentum β (Signum, SGD, EF; β1 of Adam, AdamW and Lion when --betas is not "
        "given); default per optimiser", rule=_FRACTION)
    weight_decay: float = _option(0.0, "weight decay (default %(default)s)",
                                  rule=(lambda v: _is_num(v) and v >= 0, "a finite number >= 0"))
    freeze_step: int | None = _option(
        None, "onebit-adam: Adam steps with the fp32 mean before v is frozen and the momentum "
        "is sent with 1 bit (default: 20%% of the run's steps, DeepSpeed's advice being "
        "15-25%%)", rule=_at_least(1))
    batch_size: int = _option(128, "per worker (text: sequences per worker)",
                              rule=_at_least(1))
    epochs: int = _option(3, "epochs of image data (default %(default)s)", rule=_at_least(1),
                          resume=False)
    steps: int | None = _option(None, "the step budget (default: --epochs of image data; 1000 "
                                "steps of text)", rule=_at_least(1), resume=False)
    lr_schedule: str = _option("constant", "{choices}",
                               choices=(SCHEDULES, "lr schedule", "schedules"))
    warmup_steps: int = _option(0, "linear learning-rate warm-up over the first N steps, "
                                "then --lr-schedule", rule=_at_least(0))
    grad_clip: float = _option(0.0, "clip each worker's gradient to this global norm before "
                               "the step (0: off)", rule=(lambda v: _is_num(v) and v >= 0,
                                                          "a finite number >= 0"))
    eval_every: int | None = _option(None, "evaluate (and checkpoint) every N steps "
                                     "(default: every epoch of image data; 10 times per text "
                                     "run)", rule=_at_least(1), resume=False)
    eval_batches: int = _option(20, "text: validation batches per evaluation, of the global "
                                "batch (fixed, the same every time)", rule=_at_least(1))
    checkpoint_every: int = _option(0, "also checkpoint every N steps (0: at evaluations only)",
                                    rule=_at_least(0), resume=False)
    n_layer: int | None = _option(None, "gpt: transformer blocks (default: the size's)",
                                  rule=_at_least(1))
    n_head: int | None = _option(None, "gpt: attention heads (default: the size's)",
                                 rule=_at_least(1))
    d_model: int | None = _option(None, "gpt: width (default: the size's)", rule=_at_least(1))
    block_size: int | None = _option(None, "gpt: context length in characters (default: the "
                                     "size's)", rule=_at_least(1))
    sync_every: int = _option(1, "local steps: every H steps an outer step on the reduced "
                              "pseudo-gradients (1: communicate every step; with one worker "
                              "the outer step alone, single-replica DiLoCo)",
                              rule=_at_least(1))
    outer_lr: float | None = _option(None, "local steps: the outer step size (default: --lr "
                                     "with sign-momentum, 0.7 with nesterov)",
                                     rule=(lambda v: _is_num(v) and v > 0,
                                           "a finite number > 0"))
    outer_momentum: float | None = _option(None, "local steps: the outer momentum β (default: "
                                           "0 with sign-momentum, 0.9 with nesterov)",
                                           rule=_FRACTION)
    outer_reducer: str = _option("vote", "local steps: how pseudo-gradients travel: {choices} "
                                 "(vote: 1 bit each way; ef: scaled signs with error "
                                 "feedback; mean: fp32; bf16, int8: the quantized mean)",
                                 choices=(OUTER_REDUCERS, "outer reducer", "outer reducers"))
    outer_optimizer: str = _option("sign-momentum", "local steps: the outer optimiser: "
                                   "{choices} (sign-momentum: u ← βu + (1−β)v, x0 ← x0 − lr·u; "
                                   "nesterov: SGD with Nesterov momentum, as DiLoCo)",
                                   choices=(OUTER_OPTIMIZERS, "outer optimizer",
                                            "outer optimizers"))
    seed: int = _option(0, "random seed (default %(default)s)", rule=_at_least(0))
    workers: int = _option(1, "local Gloo worker processes (under torchrun: its world size)",
                           rule=_at_least(1))
    shard: int = _option(1, "FSDP2 / HSDP: shard the gpt model over groups of N ranks "
                         "(fully_shard over the shard dimension of a replicas x N mesh); the "
                         "--workers/N replicas are synchronised by the optimiser's reducer "
                         "across the replicas, and the bytes reported are those cross-replica "
                         "bytes (1: every rank holds the whole model)", rule=_at_least(1))
    vote: str = _option("sharded", "majority-vote mode: {choices}",
                        choices=(MODES, "vote mode", "modes"))
    adversaries: int = _option(0, "number of Byzantine workers (the last ranks)",
                               rule=_at_least(0))
    attack: str = _option("negate", "{choices}", choices=(ATTACKS, "attack", "attacks"))
    compressor: str = _option(
        "topk:0.1", f"efsgd's compressor: {', '.join(compression.SPECS)} (default %(default)s; "
        "ef-signsgd always uses scaled-sign)")
    out: str = _option("runs/train", "run directory (default %(default)s)", resume=False,
                       compare=False)
    data_dir: str | None = _option(
        None, "folder holding the data (default: $SIGNSGD_DATA, else ./data; Fashion-MNIST "
        "also /usr/share/datasets/fashion-mnist)", resume=False)
    resume: bool = _option(False, "continue from OUT/checkpoint.pt, bit-identically",
                           resume=False, compare=False)
    train_subset: int | None = _option(None, "use only the first N training examples",
                                       rule=_at_least(1))
    validation: int = _option(0, "hold out the last N training examples and evaluate on them "
                              "instead of the test set (for tuning)", rule=_at_least(0))
    log_every: int = _option(20, "steps between log lines", rule=_at_least(1), resume=False)
    density_every: int = _option(0, "log gradient/noise/curvature densities every N steps "
                                 "(0: never)", rule=_at_least(0), resume=False)
    threads: int | None = _option(None, "torch threads per worker (default: CPU cores // "
                                  "workers)", rule=_at_least(1), resume=False)
    device: str = _option("auto", "where each worker computes: {choices} (auto: CUDA when "
                          "present)", choices=(DEVICES, "device", "devices"), resume=False)
    backend: str = _option("auto", "process-group backend: {choices} (auto: NCCL for CUDA, "
                           "Gloo for CPU)", choices=(BACKENDS, "backend", "backends"),
                           resume=False)
    precision: str = _option("fp32", "{choices} (bf16: autocast of the forward pass; weights, "
                             "momentum and error buffers stay fp32)",
                             choices=(PRECISIONS, "precision", "precisions"))
    timeout_s: float = _option(300.0, "seconds a worker waits for the others in a collective "
                               "before the run fails, naming the worker that did not arrive "
                               "(the process group's timeout; default %(default)s)",
                               rule=(lambda v: _is_num(v) and v > 0, "a finite number > 0"),
                               resume=False, flag="--timeout", metavar="SECONDS")
    overwrite: bool = _option(False, "replace the outputs of an earlier run in --out",
                              resume=False, compare=False)
    force_workers: bool = _option(False, "start --workers even if the machine looks too "
                                  "small for them", resume=False)
    progress: bool = _option(True, "no progress bar", resume=False, compare=False,
                             flag="--no-progress")
    name: str = _option("", "the run's name in its summary (default: the optimiser's)",
                        resume=False)
    extra: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "free-form notes of the caller", "resume": False, "cli": False,
        "compare": False})

    def __post_init__(self) -> None:
        for name, base in _BASES.items():
            v = getattr(self, name)
            if base is float and _is_int(v) or isinstance(v, list) and get_origin(base) is tuple:
                setattr(self, name, (float if base is float else tuple)(v))

    def resolved(self) -> TrainConfig:
        """A copy with ``lr`` and ``momentum`` filled in from the optimiser's defaults
        (:meth:`signsgd.registry.Method.defaults_for`: a language model takes the rates tuned
        on the GPT, and Lion its betas (0.95, 0.98)).

        Example:
            >>> TrainConfig(optimizer="lion").resolved().momentum
            0.9
        """
        c, method = dataclasses.replace(self), registry.METHODS.get(self.optimizer)
        d = method.defaults_for(self.model in SIZES) if method else {"lr": None}
        c.lr = d["lr"] if c.lr is None else c.lr
        if c.betas is None and c.momentum is None and "betas" in d and d["betas"] != \
                method.defaults.get("betas"):  # type: ignore[union-attr]
            c.betas = d["betas"]  # a language model's own betas (Lion's 0.95, 0.98)
        if c.momentum is None:
            c.momentum = d.get("momentum", (c.betas or d.get("betas", (0.0,)))[0])
        if c.optimizer == "ef-signsgd":
            c.compressor = "scaled-sign"
        return c

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict.

        Example:
            >>> TrainConfig().to_dict()["optimizer"]
            'signum'
        """
        return dataclasses.asdict(self)


#: The run's concerns, each a group of fields (and a section of ``signsgd train --help``);
#: every field is in exactly one (a test holds this). A consumer takes the fields of its
#: concern, not the whole config (:class:`signsgd.tasks.TaskSpec`: what a task reads).
GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data", "data_dir", "train_subset", "validation", "batch_size"),
    "model": ("model", "n_layer", "n_head", "d_model", "block_size", "precision"),
    "optimiser": ("optimizer", "lr", "betas", "momentum", "weight_decay", "freeze_step",
                  "compressor", "grad_clip"),
    "communication": ("workers", "shard", "vote", "sync_every", "outer_optimizer", "outer_lr",
                      "outer_momentum", "outer_reducer", "adversaries", "attack", "backend",
                      "timeout_s"),
    "schedule": ("epochs", "steps", "lr_schedule", "warmup_steps", "eval_every",
                 "eval_batches", "checkpoint_every", "log_every", "density_every"),
    "run": ("seed", "out", "resume", "overwrite", "threads", "device", "force_workers",
            "progress", "name", "extra"),
}

# The type of each field, ``X`` for ``X | None``.
_BASES = {k: get_args(h)[0] if type(None) in get_args(h) else h
          for k, h in get_type_hints(TrainConfig).items()}
_ON_CLI = [f for f in fields(TrainConfig) if f.metadata.get("cli", True)]
#: The keys a ``signsgd compare`` file may set (``[defaults]`` and ``[[run]]`` tables).
COMPARE_KEYS: tuple[str, ...] = tuple(sorted(f.name for f in fields(TrainConfig)
                                             if f.metadata.get("compare", True)))


def freeze_step_of(c: TrainConfig, total_steps: int) -> int:
    """``c.freeze_step``, else :data:`FREEZE_FRACTION` of ``total_steps`` (at least 1).

    Example:
        >>> freeze_step_of(TrainConfig(optimizer="onebit-adam"), 600)
        120
    """
    return c.freeze_step or max(1, round(FREEZE_FRACTION * total_steps))


def _one_of(value: Any, names: tuple[str, ...]) -> bool:
    """``value`` is one of ``names``; a name ``PREFIX:PATH`` admits any ``PREFIX:...``."""
    return value in names or isinstance(value, str) and any(
        n.endswith(":PATH") and value.startswith(n[:-4]) and len(value) > len(n) - 4
        for n in names)


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def validate(cfg: TrainConfig, *, n_train: int | None = None) -> TrainConfig:
    """Check every field of ``cfg`` and, given the data's ``n_train`` training examples,
    the sizes; return the resolved config (:meth:`TrainConfig.resolved`).

    Raises:
        ConfigError: the message names the bad value and lists the valid ones.

    Example:
        >>> validate(TrainConfig(workers=0))
        Traceback (most recent call last):
        signsgd.errors.ConfigError: --workers must be an integer >= 1, got 0
    """
    c = cfg.resolved()
    for f in fields(c):
        v = getattr(c, f.name)
        if "choices" in f.metadata and not _one_of(v, f.metadata["choices"][0]):
            names, what, plural = f.metadata["choices"]
            raise ConfigError(f"unknown {what} {v!r}; valid {plural}: {', '.join(names)}")
        rule = f.metadata.get("rule")
        if rule and not (v is None and f.default is None) and not rule[0](v):
            raise ConfigError(f"{_flag(f)} must be {rule[1]}, got {v!r}")
    takes = registry.METHODS[c.optimizer].defaults
    for key, given in (("betas", c.betas is not None), ("momentum", bool(c.momentum))):
        if given and key not in takes and "betas" not in takes:
            raise ConfigError(f"--{key}: optimizer {c.optimizer!r} takes no {key} (it takes "
                              f"{', '.join(takes)}); leave --{key} out")
    if c.freeze_step is not None and "freeze_step" not in takes:
        raise ConfigError(f"--freeze-step: optimizer {c.optimizer!r} takes no freeze step (it "
                          "is the warm-up of onebit-adam); leave --freeze-step out")
    if c.betas is not None and c.momentum != c.betas[0]:
        raise ConfigError(f"--momentum {c.momentum} disagrees with --betas {c.betas[0]} "
                          f"{c.betas[1]} (--momentum is β1 of {c.optimizer}); give only one")
    if c.adversaries > c.workers:
        raise ConfigError(f"--adversaries {c.adversaries} is more than --workers {c.workers}; "
                          "the adversaries are some of the workers")
    if c.adversaries and c.workers == 1:
        raise ConfigError(f"--adversaries {c.adversaries} needs --workers >= 2 (the adversaries "
                          "are some of the workers, and a single worker does not communicate)")
    if c.optimizer in ("efsgd", "ef-signsgd"):
        compression.from_spec(c.compressor)
    _check_shard(c)
    text, lm = is_text(c.data), c.model in SIZES
    if text != lm:
        raise ConfigError(
            f"--model {c.model} does not fit --data {c.data}: text data trains a language "
            f"model ({', '.join(SIZES)}), image data an image model ({', '.join(MODELS)})")
    if c.resume and c.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues "
                          "the run in --out, --overwrite starts it again")
    outer_given = [flag for flag, given in (
        ("--outer-lr", c.outer_lr is not None), ("--outer-momentum", c.outer_momentum is not None),
        ("--outer-reducer", c.outer_reducer != "vote"),
        ("--outer-optimizer", c.outer_optimizer != "sign-momentum")) if given]
    if c.sync_every == 1 and outer_given:
        raise ConfigError(f"{', '.join(outer_given)} set the outer step of local steps: give "
                          "--sync-every H > 1 too (with --sync-every 1 every step communicates)")
    if c.outer_optimizer == "nesterov" and c.outer_momentum == 0:
        raise ConfigError("--outer-optimizer nesterov needs --outer-momentum > 0 (DiLoCo: "
                          "0.9); use sign-momentum for an outer step without momentum")
    if c.adversaries and c.sync_every > 1 and c.outer_reducer in ("bf16", "int8"):
        raise ConfigError(f"--adversaries needs --outer-reducer vote, ef or mean (the "
                          f"{c.outer_reducer} mean has no Byzantine model)")
    if n_train is not None:
        n = (n_train if c.train_subset is None else min(n_train, c.train_subset)) - c.validation
        if c.validation and n < 1:
            raise ConfigError(f"--validation {c.validation} leaves no training examples (only "
                              f"{n + c.validation} available)")
        if c.workers > n:
            raise ConfigError(f"--workers {c.workers} is more than the {n} training examples; "
                              "every worker needs at least one example — use fewer workers")
    return c


#: The optimisers ``--shard > 1`` runs with every step communicating: this library's,
#: whose reducer (the vote, the EF all-reduce, the 1-bit Adam all-reduce) takes FSDP2's
#: local shards on the replicate group (:mod:`signsgd.sharding`).
SHARDED_OPTIMIZERS: tuple[str, ...] = tuple(n for n, m in registry.METHODS.items() if m.library)


def _check_shard(c: TrainConfig) -> None:
    """Refuse what ``--shard > 1`` (FSDP2 / HSDP in the trainer) does not run, naming what
    it does."""
    if c.workers % c.shard:
        raise ConfigError(f"--workers {c.workers} is not a multiple of --shard {c.shard}: the "
                          "ranks form --workers/--shard replicas of --shard ranks each (e.g. "
                          f"--workers {2 * c.shard} --shard {c.shard})")
    if c.shard == 1:
        return
    if c.model not in SIZES:
        raise ConfigError(f"--shard {c.shard} shards the language model: give --model one of "
                          f"{', '.join(SIZES)} with text data (got --model {c.model})")
    if c.sync_every == 1 and c.optimizer not in SHARDED_OPTIMIZERS:
        raise ConfigError(
            f"--optimizer {c.optimizer} with --shard {c.shard}: the torch optimisers average "
            "their gradients with AverageGradients, which does not take FSDP2's sharded "
            f"parameters; with --shard > 1 use {', '.join(SHARDED_OPTIMIZERS)}, or local "
            f"steps (--sync-every H > 1) with any optimizer")
    for given, flag, why in (
            (c.adversaries > 0, f"--adversaries {c.adversaries}",
             "the Byzantine runs are unsharded"),
            (c.density_every > 0, f"--density-every {c.density_every}", "the densities run "
             "the model on rank 0 alone, and a sharded forward needs every rank of its shard "
             "group"),
            (c.resume, "--resume", "the trainer's checkpoint holds the full model and each "
             "rank's shard, not a DCP checkpoint to resume from "
             "(signsgd.distributed.fsdp.TrainState does that in a script)")):
        if given:
            raise ConfigError(f"{flag} is not supported with --shard {c.shard}: {why}; "
                              f"leave {flag.split()[0]} out or use --shard 1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add an option to ``parser`` for every field of :class:`TrainConfig` (``cli=False``
    excepted), in one argument group per concern (:data:`GROUPS`); :func:`from_args` turns
    the parsed options back into a config.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_arguments(p)
        >>> from_args(p.parse_args(["--betas", "0.9", "0.95", "--no-progress"])).betas
        (0.9, 0.95)
    """
    sections = {name: parser.add_argument_group(f"{name} options")
                for name in GROUPS}
    section = {field_name: sections[g] for g, names in GROUPS.items() for field_name in names}
    for f in _ON_CLI:
        meta, base = f.metadata, _BASES[f.name]
        choices = meta.get("choices", ((),))[0]
        kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta["help"].format(
            choices=", ".join(choices[:-1]) + " or " + choices[-1] if choices else "")}
        if base is bool:
            kw["action"] = "store_false" if f.default else "store_true"
        else:
            kw.update(type=base, metavar=meta.get("metavar"))
            if get_origin(base) is tuple:
                kw.update(type=get_args(base)[0], nargs=len(get_args(base)))
        section[f.name].add_argument(_flag(f), **kw)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of options parsed by a parser built with :func:`add_arguments`.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_arguments(p)
        >>> from_args(p.parse_args(["--lr", "1"])).lr
        1.0
    """
    return TrainConfig(**{f.name: getattr(args, f.name) for f in _ON_CLI})
