"""Small files in the real formats of the two datasets, for tests (a clone has no data/)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from signsgd import data as D
from signsgd import text as T


def write_random_fashion_mnist(root: Path, n_train: int, n_test: int, seed: int) -> Path:
    """``root/fashion-mnist``: the four IDX .gz files, random images and labels."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        D.write_idx(root / "fashion-mnist" / f"{split}-images-idx3-ubyte.gz",
                    rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        D.write_idx(root / "fashion-mnist" / f"{split}-labels-idx1-ubyte.gz",
                    rng.integers(0, 10, n, dtype=np.uint8))
    return root / "fashion-mnist"


#: The opening of Sonnet 1: the text of the small language-model runs.
SONNET = ("From fairest creatures we desire increase,\nThat thereby beauty's rose might never "
          "die,\nBut as the riper should by time decease,\nHis tender heir might bear his memory\n")


def write_sonnet(folder: Path) -> Path:
    """``folder/sonnet.txt``: :data:`SONNET` 60 times (a ``text:PATH`` corpus)."""
    path = folder / "sonnet.txt"
    path.write_text(SONNET * 60)
    return path


def write_shakespeare(root: Path, text: Callable[[int, str], str]) -> list[str]:
    """``root/shakespeare``: 42 works named as in the real folder, the held-out ones first
    (then ``work_NN_gut``), work ``i`` called ``name`` holding ``text(i, name)``; returns the
    names in that order."""
    folder = root / "shakespeare"
    folder.mkdir()
    names = [*T.VALIDATION_WORKS, *T.TUNING_WORKS]
    names += [f"work_{i:02d}_gut" for i in range(42 - len(names))]
    for i, name in enumerate(names):
        (folder / f"{name}.txt").write_text(text(i, name))
    return names
