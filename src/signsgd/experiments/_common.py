"""Shared pieces of the experiments: verdicts, plotting, Fashion-MNIST, small models."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["verdict", "pyplot", "load_fashion_mnist", "FashionMNISTMissing", "mlp",
           "synthetic_classification"]

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTMissing(FileNotFoundError):
    """Fashion-MNIST was not found; the message says how to fetch it."""


def verdict(ok: bool) -> str:
    """``"reproduced"`` if ``ok`` else ``"not reproduced"``."""
    return "reproduced" if ok else "not reproduced"


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _candidates() -> list[Path]:
    dirs = []
    if os.environ.get("SIGNSGD_DATA"):
        base = Path(os.environ["SIGNSGD_DATA"])
        dirs += [base / "fashion-mnist", base]
    dirs += [Path("data") / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    return dirs


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_pair(d: Path, img_name: str, lab_name: str) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(_read_idx(d / img_name).copy()).float().div_(255.0)
    x = (x - 0.2860) / 0.3530
    y = torch.from_numpy(_read_idx(d / lab_name).astype(np.int64))
    return x.unsqueeze(1), y


def load_fashion_mnist(split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as ``(x, y)``: x float32 ``(n, 1, 28, 28)`` in [0, 1] standardised, y int64.

    Looks in ``$SIGNSGD_DATA/fashion-mnist``, ``./data/fashion-mnist`` and
    ``/usr/share/datasets/fashion-mnist`` for the four idx ``.gz`` files.

    Raises:
        FashionMNISTMissing: no directory holds the files (the message says how to get them).
    """
    if split not in FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_name, lab_name = FASHION_FILES[split]
    try:  # the trainer's search order ($SIGNSGD_DATA, ./data, system folders) comes first
        from signsgd.data import DataError, locate
    except ImportError:  # pragma: no cover - signsgd.data ships with the package
        pass
    else:
        try:
            found = [locate("fashion-mnist")]
        except DataError:
            found = []
        for d in found:
            if (d / img_name).exists() and (d / lab_name).exists():
                return _load_pair(d, img_name, lab_name)
    for d in _candidates():
        if (d / img_name).exists() and (d / lab_name).exists():
            return _load_pair(d, img_name, lab_name)
    where = ", ".join(str(d) for d in _candidates())
    raise FashionMNISTMissing(
        f"Fashion-MNIST not found (looked in {where}). Fetch it with `make data`, or: "
        "apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb x "
        "&& mkdir -p data/fashion-mnist && cp x/usr/share/datasets/fashion-mnist/*.gz "
        "data/fashion-mnist/ ; or run the experiment with --quick (synthetic data)."
    )


def mlp(inputs: int = 784, hidden: int = 64, classes: int = 10, seed: int = 0) -> nn.Module:
    """A small ReLU MLP ``inputs → hidden → classes`` with a deterministic initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def synthetic_classification(n: int, d: int = 64, classes: int = 10, seed: int = 0,
                             noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """A Gaussian-mixture classification set: class means on a sphere, isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=g)
    means = 2.0 * means / means.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + noise * torch.randn(n, d, generator=g) / d ** 0.5 * 4
    return x, y
