"""What a training run learns: image classification or character-level language modelling.

A task turns its :class:`TaskSpec` (the fields of a :class:`~signsgd.config.TrainConfig`
that say what is learned, :meth:`TaskSpec.of`) into the pieces the training loop needs, the
same for every worker count:

* :meth:`Task.model` — the model (every rank builds the same one from the seed);
* :meth:`Task.batch` — rank ``r``'s batch of global step ``s``, a pure function of
  ``(seed, r, s)``, so a run resumed at any step sees exactly the batches it would have;
* :meth:`Task.evaluate` — the held-out metrics, each rank taking its share, summed;
* :attr:`Task.total_steps`, :attr:`Task.eval_every` — the budget and when to evaluate;
* :meth:`Task.check_resume` — refuse a checkpoint whose data is not this task's.

:class:`ImageClassification` shards each epoch's permutation across the workers
(``DistributedSampler`` semantics) and evaluates at the end of every epoch;
:class:`LanguageModelling` draws random windows of a text (:mod:`signsgd.text`), trains for
``steps`` steps and evaluates every ``eval_every`` steps on a fixed set of validation
batches, reporting nats per character and bits per character. Its model carries the
corpus's vocabulary and digest (``model.vocabulary``), which the checkpoint stores: ``signsgd
sample`` decodes with it, and a resumed run on a changed text is refused.

Example:
    >>> from signsgd.config import TrainConfig, validate
    >>> task = make_task(validate(TrainConfig(data="text:README.md", model="gpt", steps=10,
    ...                                       block_size=16, batch_size=2)))
    >>> task.total_steps, task.batch(rank=0, world=1, step=0)[0].shape
    (10, torch.Size([2, 16]))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from signsgd.data import Dataset, epoch_batches, load, shard_indices
from signsgd.errors import CheckpointError
from signsgd.models import build
from signsgd.text import Corpus, is_text, load_text
from signsgd.transformer import GPT, SIZES

__all__ = ["TaskSpec", "Task", "ImageClassification", "LanguageModelling", "make_task",
           "is_text", "gpt_shape", "sum_over_ranks"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads of a run's configuration: the fields of the same names of
    :class:`~signsgd.config.TrainConfig` (their meaning and checks are there).

    Example:
        >>> from signsgd.config import TrainConfig
        >>> TaskSpec.of(TrainConfig(model="gpt", workers=4)).workers
        4
    """

    data: str
    data_dir: str | None
    model: str
    n_layer: int | None       # the GPT's shape: None takes the named size's
    n_head: int | None
    d_model: int | None
    block_size: int | None
    batch_size: int           # per worker
    steps: int | None         # the budget (None: epochs of image data, 1000 steps of text)
    epochs: int
    eval_every: int | None
    eval_batches: int
    validation: int | None    # held out of the training data (text: the tuning split)
    train_subset: int | None
    seed: int
    workers: int

    @classmethod
    def of(cls, config: Any) -> TaskSpec:
        """The spec of ``config`` (any object with these fields, a ``TrainConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def gpt_shape(c: TaskSpec) -> dict[str, int]:
    """The GPT's ``n_layer``, ``n_head``, ``d_model`` and ``block_size``: the named size
    ``c.model`` of :data:`signsgd.transformer.SIZES`, overridden by the fields given.

    Example:
        >>> from signsgd.config import TrainConfig
        >>> gpt_shape(TaskSpec.of(TrainConfig(model="gpt", d_model=64)))["d_model"]
        64
    """
    size = SIZES[c.model]
    return {k: getattr(c, k) or getattr(size, k)
            for k in ("n_layer", "n_head", "d_model", "block_size")}


def sum_over_ranks(values: list[float], world: int) -> list[float]:
    """``values`` summed over the ``world`` ranks of the default group, in float64 (an
    evaluation's or a log window's sums; one process: ``values``).

    Example:
        >>> sum_over_ranks([1.0, 2.0], world=1)
        [1.0, 2.0]
    """
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


class Task:
    """The interface of a task (see the module docstring).

    Example:
        >>> issubclass(LanguageModelling, Task)
        True
    """

    eval_name: str = "val"     # prefix of the held-out metrics
    total_steps: int = 0       # the step budget
    eval_every: int = 0        # evaluate (and checkpoint) every so many steps

    def model(self) -> nn.Module:
        """The model, built from the seed (the same on every rank)."""
        raise NotImplementedError

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s inputs and targets of global step ``step``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float, float]:
        """``(mean loss, correct predictions, predictions)`` of a batch."""
        out = model(x)
        if out.dim() == 3:  # (batch, time, vocab): every position predicts the next token
            out, y = out.flatten(0, 1), y.flatten()
        return F.cross_entropy(out, y), float((out.detach().argmax(1) == y).sum()), \
            float(y.numel())

    def evaluate(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        """The held-out metrics (the same on every rank)."""
        raise NotImplementedError

    def epoch_of(self, step: int) -> float:
        """Training progress in epochs after ``step`` steps (a fraction for text)."""
        return 0.0

    def check_resume(self, ckpt: dict[str, Any] | None) -> None:
        """Raise :class:`~signsgd.errors.CheckpointError` when the checkpoint a run resumes
        from was trained on other data (nothing to check for image data)."""


class ImageClassification(Task):
    """Fashion-MNIST, MNIST or CIFAR-10 with an image model; epochs of sharded examples.

    Args:
        c: the task's spec.
        train_ds, eval_ds: the training set and the held-out set.
        eval_name: ``"test"`` (the test set) or ``"val"`` (examples held out of training).
        world: the number of workers.

    Example:
        >>> from signsgd.config import TrainConfig
        >>> from signsgd.data import gaussian_mixture
        >>> ds = gaussian_mixture(20, (1, 4, 4), classes=2, seed=0)
        >>> spec = TaskSpec.of(TrainConfig(batch_size=4, epochs=2, model="mlp"))
        >>> task = ImageClassification(spec, ds, ds, "val", world=2)
        >>> task.steps_per_epoch, task.total_steps, task.batch(0, 2, 3)[0].shape
        (3, 6, torch.Size([4, 1, 4, 4]))
    """

    def __init__(self, c: TaskSpec, train_ds: Dataset, eval_ds: Dataset, eval_name: str,
                 world: int) -> None:
        self.c, self.train_ds, self.eval_ds, self.eval_name = c, train_ds, eval_ds, eval_name
        self.steps_per_epoch = math.ceil(math.ceil(len(train_ds) / world) / c.batch_size)
        self.total_steps = c.steps or self.steps_per_epoch * c.epochs
        self.eval_every = c.eval_every or self.steps_per_epoch

    def model(self) -> nn.Module:
        return build(self.c.model, self.train_ds.shape, self.train_ds.num_classes)

    @lru_cache(maxsize=2)  # noqa: B019 - one task per run; the current epoch's batches
    def _epoch(self, rank: int, world: int, epoch: int) -> list[Tensor]:
        idx = shard_indices(len(self.train_ds), rank, world, seed=self.c.seed, epoch=epoch)
        return epoch_batches(idx, self.c.batch_size)

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.train_ds.batch(self._epoch(rank, world, epoch)[pos])

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        """Mean loss and accuracy over the held-out set; rank ``r`` takes every
        ``world``-th example."""
        model.eval()
        loss_sum = correct = 0.0
        for b in torch.split(torch.arange(rank, len(self.eval_ds), world), 1000):
            x, y = self.eval_ds.batch(b)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
        model.train()
        s_loss, s_correct = sum_over_ranks([loss_sum, correct], world)
        n = len(self.eval_ds)
        return {f"{self.eval_name}_loss": s_loss / n, f"{self.eval_name}_accuracy": s_correct / n}


class LanguageModelling(Task):
    """Next-character prediction with a :class:`~signsgd.transformer.GPT` on a text corpus.

    Args:
        c: the resolved configuration (``model`` is a named size of
            :data:`signsgd.transformer.SIZES`, overridden by ``n_layer`` / ``n_head`` /
            ``d_model`` / ``block_size`` when given).
        corpus: the text, split into training and validation streams.

    Example:
        >>> from signsgd.config import TrainConfig
        >>> corpus = Corpus.from_texts(["to be or not to be " * 20], ["to be " * 20])
        >>> task = LanguageModelling(TaskSpec.of(TrainConfig(
        ...     model="gpt", block_size=8, batch_size=2, steps=4, eval_batches=1)), corpus)
        >>> task.eval_every, sorted(task.evaluate(task.model(), 0, 1))
        (1, ['val_accuracy', 'val_bpc', 'val_loss'])
    """

    def __init__(self, c: TaskSpec, corpus: Corpus) -> None:
        self.c, self.corpus, self.shape = c, corpus, gpt_shape(c)
        self.vocabulary = {"chars": corpus.chars, "sha256": corpus.sha256}
        corpus.check(self.shape["block_size"])
        self.total_steps = c.steps or 1000
        self.eval_every = c.eval_every or max(1, self.total_steps // 10)
        # eval_batches global batches (batch_size·workers windows each), so runs with the
        # same global batch validate on the same windows whatever their number of workers.
        self._val = corpus.eval_batches(count=c.eval_batches * c.workers,
                                        batch_size=c.batch_size, block=self.shape["block_size"])

    def model(self) -> nn.Module:
        """The GPT, its ``vocabulary`` attribute the corpus's (for the checkpoint)."""
        model = GPT(self.corpus.vocab_size, **self.shape)
        model.vocabulary = self.vocabulary
        return model

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        return self.corpus.batch(batch_size=self.c.batch_size, block=self.shape["block_size"],
                                 seed=self.c.seed, rank=rank, step=step)

    def epoch_of(self, step: int) -> float:
        seen = step * self.c.batch_size * self.shape["block_size"] * self.c.workers
        return seen / max(1, self.corpus.train.numel())

    def check_resume(self, ckpt: dict[str, Any] | None) -> None:
        """Refuse a checkpoint trained on another text: the digest or the alphabet differ
        (a checkpoint that stored no vocabulary is not checked)."""
        saved = (ckpt or {}).get("vocabulary")
        if saved is None or saved == self.vocabulary:
            return
        old, new = saved["chars"], self.corpus.chars
        what = [f"sha256 {saved['sha256'][:12]}..., now {self.corpus.sha256[:12]}..."]
        if old == new:
            what.append(f"same alphabet of {len(new)} characters")
        else:
            diff = [f"{label}: " + ", ".join(map(repr, chars[:10])) + (", ..." if chars[10:]
                                                                       else "")
                    for label, chars in (("new", sorted(set(new) - set(old))),
                                         ("gone", sorted(set(old) - set(new)))) if chars]
            what.append(f"alphabet: {len(old)} characters, now {len(new)} ({'; '.join(diff)})")
        raise CheckpointError(
            f"--resume: --data {self.c.data} is not the text the checkpoint "
            f"was trained on ({'; '.join(what)}); resume on that text, or start a new run "
            "with another --out")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        """Validation loss in nats per character (and bits per character, accuracy) over
        the fixed validation batches; rank ``r`` takes every ``world``-th batch."""
        model.eval()
        loss_sum = correct = count = 0.0
        for x, y in self._val[rank::world]:
            out = model(x).flatten(0, 1)
            loss_sum += float(F.cross_entropy(out, y.flatten(), reduction="sum"))
            correct += float((out.argmax(1) == y.flatten()).sum())
            count += float(y.numel())
        model.train()
        s_loss, s_correct, s_count = sum_over_ranks([loss_sum, correct, count], world)
        loss = s_loss / s_count
        return {"val_loss": loss, "val_bpc": loss / math.log(2),
                "val_accuracy": s_correct / s_count}


def make_task(config: Any, world: int | None = None, *, data: Any = None) -> Task:
    """The task of a resolved configuration (its :class:`TaskSpec`): its data loaded (or
    ``data``: the ``(train, test)`` datasets or the corpus, already loaded) and split.

    Raises:
        DataError: the data is missing or unusable.

    Example:
        >>> from signsgd.config import TrainConfig, validate
        >>> corpus = Corpus.from_texts(["abc" * 100], ["cab" * 10])
        >>> type(make_task(validate(TrainConfig(data="text:x", model="gpt", block_size=4)),
        ...                data=corpus)).__name__
        'LanguageModelling'
    """
    c = TaskSpec.of(config)
    world = c.workers if world is None else world
    if is_text(c.data):
        corpus = data if data is not None else load_text(
            c.data, c.data_dir, split="tuning" if c.validation else "validation")
        return LanguageModelling(c, corpus)
    train_ds, test_ds = data if data is not None else load(c.data, c.data_dir)
    if c.train_subset is not None:
        train_ds = train_ds.subset(torch.arange(min(c.train_subset, len(train_ds))))
    if not c.validation:
        return ImageClassification(c, train_ds, test_ds, "test", world)
    n = len(train_ds) - c.validation
    return ImageClassification(c, train_ds.subset(torch.arange(n)),
                               train_ds.subset(torch.arange(n, n + c.validation)), "val", world)
