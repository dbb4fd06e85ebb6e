"""Datasets for the trainer: Fashion-MNIST and MNIST (IDX ``.gz``), CIFAR-10 (python pickles).

Every dataset is read whole into memory as a ``uint8`` image tensor and an ``int64`` label
tensor (:class:`Dataset`); batches are normalised on the fly (:meth:`Dataset.batch`). No
``torch.utils.data.DataLoader``: the trainer indexes the tensors directly, which is fast and
deterministic, and shards them across workers with :func:`shard_indices` (the semantics of
``torch.utils.data.DistributedSampler``).

Where the files are looked up, first match wins (:func:`locate`):

1. ``data_dir`` (``--data-dir``), else ``$SIGNSGD_DATA``, else ``./data``, each tried as
   ``ROOT/<name>/``, ``ROOT/<torchvision folder>/raw/`` and ``ROOT/`` itself;
2. for Fashion-MNIST also ``/usr/share/datasets/fashion-mnist`` (Debian's
   ``dataset-fashion-mnist`` package).

File layouts (the standard distributions):

* ``fashion-mnist`` / ``mnist``: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
  ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``;
* ``cifar10``: ``cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``test_batch``.

Example:
    >>> from signsgd.data import load                                 # doctest: +SKIP
    >>> train, test = load("fashion-mnist")                           # doctest: +SKIP
    >>> x, y = train.batch(torch.arange(128))                         # doctest: +SKIP
    >>> x.shape, y.shape                                              # doctest: +SKIP
    (torch.Size([128, 1, 28, 28]), torch.Size([128]))
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from signsgd.errors import DataError

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "locate",
    "load",
    "read_idx",
    "shard_indices",
    "epoch_batches",
    "gaussian_mixture",
    "write_idx",
    "write_cifar_batch",
]

#: Dataset names accepted by :func:`load` and ``signsgd train --data``.
DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)

# Per-channel mean / std of the training images (standard values), used to normalise.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_SUBDIRS = {
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist"),
    "mnist": ("mnist", "MNIST/raw"),
    "cifar10": ("cifar10", "cifar-10", "."),
}
_SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}

_HOW_TO_GET = {
    "fashion-mnist": (
        "get it with `make data` (Debian's dataset-fashion-mnist package, no root needed: "
        "`apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb x` "
        "and copy x/usr/share/datasets/fashion-mnist/*.gz to ./data/fashion-mnist/), or download "
        "the four .gz files from https://github.com/zalandoresearch/fashion-mnist into "
        "./data/fashion-mnist/"
    ),
    "mnist": (
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (the standard MNIST files, "
        "e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/) into ./data/mnist/"
    ),
    "cifar10": (
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it "
        "into ./data/ (giving ./data/cifar-10-batches-py/data_batch_1 ...)"
    ),
}


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return name


def _roots(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get("SIGNSGD_DATA")
    return [Path(env)] if env else [Path("data")]


def _required(name: str) -> list[str]:
    if name == "cifar10":
        return [f"{_CIFAR_DIR}/{f}" for f in _CIFAR_TRAIN + _CIFAR_TEST]
    return [f for pair in _IDX_FILES.values() for f in pair]


def _candidates(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    out: list[Path] = []
    for root in _roots(data_dir):
        out += [root / sub for sub in _SUBDIRS[name]]
        if name != "cifar10":
            out.append(root)
    if data_dir is None:
        out += list(_SYSTEM_DIRS.get(name, ()))
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def locate(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding dataset ``name``'s files (see the module docstring for the order).

    Raises:
        DataError: unknown name, or no candidate folder holds all the files; the message
            lists where it looked and how to get the data.
    """
    _check_name(name)
    candidates = _candidates(name, data_dir)
    for folder in candidates:
        if all((folder / f).is_file() for f in _required(name)):
            return folder
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(
        f"dataset {name!r} not found (looked in: {looked}; set --data-dir or $SIGNSGD_DATA "
        f"to a folder that holds it). To get it: {_HOW_TO_GET[name]}"
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Supports the unsigned-byte type (``0x08``), which is what MNIST and Fashion-MNIST use.

    Raises:
        DataError: the file is truncated, not gzip, or not IDX; the message names the file.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc} (file corrupt or truncated?)") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file (only {len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file (magic bytes {raw[:4].hex()}, expected "
            "0000 08 01..04)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data (corrupt or truncated)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # noqa: S301 - the standard CIFAR format
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc} (corrupt?)") from exc
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (a pickled dict was expected)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR-10 batch (no 'data' / 'labels' keys)")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataError(
            f"{path}: CIFAR-10 data has shape {data.shape} and {len(labels)} labels; expected "
            "(N, 3072) and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


@dataclass
class Dataset:
    """One split in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    name: str
    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float32 images and labels at ``index``."""
        x = self.images[index].to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std), self.labels[index]

    def subset(self, index: Tensor) -> Dataset:
        """A new dataset with the examples at ``index`` (e.g. a validation split)."""
        return Dataset(self.name, self.images[index], self.labels[index], self.mean, self.std,
                       self.num_classes)


def load(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[Dataset, Dataset]:
    """Load dataset ``name`` (one of :data:`DATASETS`); return ``(train, test)``.

    Raises:
        DataError: unknown name, missing files (with how to get them), or corrupt files.
    """
    folder = locate(name, data_dir)
    mean, std = _STATS[name]
    splits = []
    if name == "cifar10":
        for files in (_CIFAR_TRAIN, _CIFAR_TEST):
            parts = [_read_cifar_batch(folder / _CIFAR_DIR / f) for f in files]
            x = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            splits.append((x, y))
    else:
        for split in ("train", "test"):
            img_file, lab_file = _IDX_FILES[split]
            x = read_idx(folder / img_file)
            y = read_idx(folder / lab_file)
            if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{folder}: {img_file} has shape {x.shape} and {lab_file} {y.shape}; "
                    "expected (N, H, W) images and N labels"
                )
            splits.append((x[:, None], y.astype(np.int64)))
    out = []
    for (x, y), split in zip(splits, ("train", "test")):
        if len(y) == 0:
            raise DataError(f"dataset {name!r} in {folder}: the {split} split is empty")
        if y.min() < 0 or y.max() > 9:
            raise DataError(
                f"dataset {name!r} in {folder}: {split} labels outside 0..9 "
                f"(min {y.min()}, max {y.max()}); the files are corrupt"
            )
        out.append(Dataset(name, torch.from_numpy(np.array(x, copy=True)),
                           torch.from_numpy(np.array(y, copy=True)), mean, std))
    return out[0], out[1]


def gaussian_mixture(n: int, shape: tuple[int, int, int], *, classes: int = 10, seed: int = 0,
                     noise: float = 1.0) -> Dataset:
    """A synthetic classification set: a Gaussian mixture, stored like every :class:`Dataset`.

    Class means lie on a sphere of radius 2 in ``d = C·H·W`` dimensions; each example is its
    class mean plus isotropic noise of per-coordinate std ``4·noise/√d``. The images are
    quantised to ``uint8`` with ``mean`` / ``std`` chosen so that :meth:`Dataset.batch`
    returns the mixture's values to within ``max|x|/255``. The same ``seed`` gives the same
    set.

    Args:
        n: number of examples (>= 1).
        shape: ``(C, H, W)`` of one example.
        classes: number of classes (>= 2).
        seed: seed of the means, labels and noise.
        noise: noise scale (>= 0).

    Returns:
        A :class:`Dataset` named ``"gaussian-mixture"``.

    Raises:
        ValueError: a size, shape or noise out of range.

    Example:
        >>> ds = gaussian_mixture(100, (1, 1, 32), seed=0)
        >>> len(ds), ds.shape, ds.batch(torch.arange(4))[0].shape
        (100, (1, 1, 32), torch.Size([4, 1, 1, 32]))
    """
    if n < 1 or classes < 2 or len(shape) != 3 or min(shape) < 1 or not noise >= 0:
        raise ValueError(f"bad gaussian_mixture request: n={n}, shape={shape!r}, "
                         f"classes={classes}, noise={noise}")
    d = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=g)
    means = 2.0 * means / means.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + noise * torch.randn(n, d, generator=g) / d ** 0.5 * 4
    scale = 127.5 / max(float(x.abs().max()), 1e-12)      # uint8 levels per unit of x
    images = (x * scale + 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return Dataset("gaussian-mixture", images.view(n, *shape), y, (127.5 / 255,),
                   (scale / 255,), classes)


def shard_indices(n: int, rank: int, world_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True) -> Tensor:
    """Rank ``rank``'s example indices for one epoch, as ``DistributedSampler`` picks them.

    The permutation is drawn from ``seed + epoch`` (the same on every rank), padded by
    wrapping around to a multiple of ``world_size``, and rank ``r`` takes every
    ``world_size``-th index starting at ``r``; so every rank gets ``ceil(n / world_size)``
    indices and the shards cover all ``n`` examples.
    """
    if n < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard request: n={n}, rank={rank}, world_size={world_size}")
    if shuffle:
        g = torch.Generator()
        g.manual_seed(int(seed) + int(epoch))
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        reps = math.ceil((total - n) / n)
        perm = torch.cat([perm] + [perm] * reps)[:total]
    return perm[rank:total:world_size]


def epoch_batches(index: Tensor, batch_size: int) -> list[Tensor]:
    """Split ``index`` into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(torch.split(index, batch_size))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    The inverse of :func:`read_idx`; useful to export a subset in the standard format.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or not 1 <= arr.ndim <= 4:
        raise ValueError(f"write_idx needs a uint8 array of 1 to 4 dimensions, got "
                         f"{arr.dtype} with shape {arr.shape}")
    raw = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += np.ascontiguousarray(arr).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def write_cifar_batch(path: str | os.PathLike[str], images: np.ndarray,
                      labels: np.ndarray) -> Path:
    """Write ``(N, 3, 32, 32)`` uint8 images and N labels as one CIFAR-10 python batch."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"CIFAR-10 images must be uint8 (N, 3, 32, 32), got {images.dtype} "
                         f"{images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"written by signsgd", b"labels": [int(v) for v in labels],
             b"data": images.reshape(len(images), -1),
             b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path
