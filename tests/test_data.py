"""signsgd.data: real IDX .gz and CIFAR-10 pickle files written here, lookup, errors, shards."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from signsgd import data as D


def write_mnist_like(folder, n_train=40, n_test=20, size=28, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        D.write_idx(folder / f"{split}-images-idx3-ubyte.gz",
                    rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        D.write_idx(folder / f"{split}-labels-idx1-ubyte.gz",
                    rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def write_cifar(folder, per_batch=6, seed=0):
    rng = np.random.default_rng(seed)
    base = folder / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        D.write_cifar_batch(base / name, rng.integers(0, 256, (per_batch, 3, 32, 32),
                                                      dtype=np.uint8),
                            rng.integers(0, 10, per_batch))
    return folder


def test_idx_bytes_match_the_format(tmp_path):
    # Hand-built IDX: magic 0x00000803, dims 2x2x3, then the bytes.
    arr = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 2, 3) + arr.tobytes()
    with gzip.open(tmp_path / "hand.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "hand.gz"), arr)
    D.write_idx(tmp_path / "ours.gz", arr)
    assert gzip.decompress((tmp_path / "ours.gz").read_bytes()) == raw
    D.write_idx(tmp_path / "plain", arr)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "plain"), arr)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_load_idx_dataset(tmp_path, name):
    write_mnist_like(tmp_path / name, n_train=40, n_test=20)
    train, test = D.load(name, tmp_path)
    assert (len(train), len(test)) == (40, 20)
    assert train.shape == (1, 28, 28)
    raw = D.read_idx(tmp_path / name / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(train.images[:, 0], torch.from_numpy(raw.copy()))
    x, y = train.batch(torch.tensor([3, 5]))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 28, 28) and y.dtype == torch.int64
    mean, std = D._STATS[name]
    expect = (torch.from_numpy(raw[3].astype(np.float32)) / 255 - mean[0]) / std[0]
    torch.testing.assert_close(x[0, 0], expect)


def test_load_cifar(tmp_path):
    write_cifar(tmp_path, per_batch=6)
    train, test = D.load("cifar10", tmp_path)
    assert (len(train), len(test)) == (30, 6)
    assert train.shape == (3, 32, 32)
    x, _ = train.batch(torch.arange(4))
    assert x.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("sub", ["fashion-mnist", "FashionMNIST/raw", "."])
def test_lookup_layouts(tmp_path, sub):
    write_mnist_like(tmp_path / sub)
    assert D.locate("fashion-mnist", tmp_path) == (tmp_path / sub)


def test_lookup_env_and_cwd(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "env" / "mnist")
    monkeypatch.setenv("SIGNSGD_DATA", str(tmp_path / "env"))
    assert D.locate("mnist") == tmp_path / "env" / "mnist"
    monkeypatch.delenv("SIGNSGD_DATA")
    monkeypatch.chdir(tmp_path)
    write_mnist_like(tmp_path / "data" / "mnist")
    assert D.locate("mnist").resolve() == (tmp_path / "data" / "mnist").resolve()


@pytest.mark.parametrize(
    "name, hint",
    [("fashion-mnist", "make data"), ("mnist", "t10k-images-idx3-ubyte.gz"),
     ("cifar10", "cifar-10-python.tar.gz")],
)
def test_missing_data_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(D.DataError) as e:
        D.load(name, tmp_path)
    assert "not found" in str(e.value) and hint in str(e.value) and str(tmp_path) in str(e.value)


def test_unknown_dataset_lists_valid():
    with pytest.raises(D.DataError, match="valid datasets: fashion-mnist, mnist, cifar10"):
        D.load("imagenet")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "corrupt or truncated"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read|corrupt"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 20)),
         "not an unsigned-byte IDX"),
        (lambda p: p.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28)
                                               + b"\x00" * 10)),
         "header says shape"),
    ],
)
def test_corrupt_idx(tmp_path, damage, match):
    folder = write_mnist_like(tmp_path / "fashion-mnist")
    damage(folder / "train-images-idx3-ubyte.gz")
    with pytest.raises(D.DataError, match=match) as e:
        D.load("fashion-mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_mismatched_labels(tmp_path):
    folder = write_mnist_like(tmp_path / "mnist", n_train=40)
    D.write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(D.DataError, match="expected"):
        D.load("mnist", tmp_path)


def test_corrupt_cifar(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.load("cifar10", tmp_path)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (3, 4), (100, 2)])
@pytest.mark.parametrize("epoch", [0, 1])
def test_shards_match_distributed_sampler(n, world, epoch):
    got = []
    for rank in range(world):
        mine = D.shard_indices(n, rank, world, seed=5, epoch=epoch)
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
        s.set_epoch(epoch)
        assert mine.tolist() == list(s)
        got += mine.tolist()
    assert set(got) == set(range(n))


def test_batches():
    assert [b.tolist() for b in D.epoch_batches(torch.arange(5), 2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        D.epoch_batches(torch.arange(5), 0)


@pytest.mark.parametrize("shape, classes, noise", [((1, 1, 32), 10, 1.0), ((1, 28, 28), 10, 2.0),
                                                   ((3, 4, 4), 2, 0.0)])
def test_gaussian_mixture(shape, classes, noise):
    ds = D.gaussian_mixture(300, shape, classes=classes, seed=5, noise=noise)
    assert (len(ds), ds.shape, ds.num_classes) == (300, shape, classes)
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) < classes
    again = D.gaussian_mixture(300, shape, classes=classes, seed=5, noise=noise)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)
    x, y = ds.batch(torch.arange(300))
    d = x[0].numel()
    # Rebuild the mixture's exact values (same draws) and check the quantisation error.
    g = torch.Generator().manual_seed(5)
    means = torch.randn(classes, d, generator=g)
    means = 2.0 * means / means.norm(dim=1, keepdim=True)
    labels = torch.randint(0, classes, (300,), generator=g)
    exact = means[labels] + noise * torch.randn(300, d, generator=g) / d ** 0.5 * 4
    assert torch.equal(labels, y)
    step = float(exact.abs().max()) / 127.5
    assert float((x.reshape(300, -1) - exact).abs().max()) <= 0.5 * step + 1e-5


@pytest.mark.parametrize("kwargs", [dict(n=0, shape=(1, 1, 4)), dict(n=5, shape=(1, 4)),
                                    dict(n=5, shape=(1, 1, 4), classes=1),
                                    dict(n=5, shape=(1, 1, 4), noise=-1.0)])
def test_gaussian_mixture_rejects_bad_requests(kwargs):
    with pytest.raises(ValueError, match="bad gaussian_mixture request"):
        D.gaussian_mixture(**kwargs)
