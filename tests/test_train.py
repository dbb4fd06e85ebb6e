"""signsgd.train on tiny real IDX files: outputs and their schema, resume, bad input, crashes."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from signsgd import checkpoint
from signsgd import data as D
from signsgd.config import TrainConfig, validate
from signsgd.errors import CheckpointError, ConfigError
from signsgd.outputs import read_metrics
from signsgd.tasks import make_task
from signsgd.train import PER_RANK_OPTIONS, _schedule, train

N_TRAIN, N_TEST = 64, 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny Fashion-MNIST in the real IDX .gz format; labels depend on the images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):  # a bright bar whose row encodes the class
            images[i, 2 + 2 * y] = 250
        D.write_idx(root / "fashion-mnist" / f"{split}-images-idx3-ubyte.gz", images)
        D.write_idx(root / "fashion-mnist" / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def cfg(data_dir, out, **kw):
    base = dict(data="fashion-mnist", data_dir=str(data_dir), model="mlp", optimizer="signum",
                lr=1e-3, batch_size=16, epochs=2, log_every=2, out=str(out), progress=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


STEP_KEYS = {"kind", "step", "epoch", "time_s", "loss", "accuracy", "samples_per_s", "lr",
             "bytes_sent", "bytes_received"}
EPOCH_KEYS = {"kind", "epoch", "step", "time_s", "train_loss", "train_accuracy", "test_loss",
              "test_accuracy"}
SUMMARY_KEYS = {"test_accuracy", "test_loss", "wall_time_s", "bytes_sent_per_step",
                "bytes_received_per_step", "bytes_per_rank", "config", "optimizer", "workers",
                "steps", "n_params"}


@pytest.mark.parametrize("optimizer", ["signum", "signsgd", "ef-signsgd", "efsgd", "sgd", "adam",
                                       "adamw", "lion"])
def test_one_worker_outputs_and_schema(data_dir, tmp_path, optimizer):
    lr = {"sgd": 0.05, "ef-signsgd": 0.05, "efsgd": 0.05}.get(optimizer, 1e-3)
    model = "cnn" if optimizer == "signum" else "mlp"
    s = train(cfg(data_dir, tmp_path / "run", optimizer=optimizer, lr=lr, model=model))
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 4 * 2 // 2 and len(epochs) == 2  # 4 steps/epoch, logged every 2
    for r in steps:
        assert set(r) == STEP_KEYS
        assert r["bytes_sent"] == 0 and r["loss"] > 0 and 0 <= r["accuracy"] <= 1
    for r in epochs:
        assert set(r) == EPOCH_KEYS
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_accuracy"] == s["test_accuracy"]
    assert summary["test_accuracy"] == epochs[-1]["test_accuracy"]
    assert summary["bytes_sent_per_step"] == 0 and summary["workers"] == 1
    assert summary["config"]["optimizer"] == optimizer and summary["config"]["lr"] == lr
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").is_file()


def test_resume_is_bit_identical(data_dir, tmp_path):
    full = train(cfg(data_dir, tmp_path / "full", epochs=3), return_params=True)
    train(cfg(data_dir, tmp_path / "part", epochs=1))
    resumed = train(cfg(data_dir, tmp_path / "part", epochs=3, resume=True), return_params=True)
    assert all(torch.equal(a, b) for a, b in zip(full["params"], resumed["params"]))
    assert resumed["test_loss"] == full["test_loss"]
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "part" / "metrics.jsonl")
    strip = [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in ("time_s", "samples_per_s")}
                     for r in b]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_lr_schedules(data_dir, tmp_path, schedule):
    # 64 examples / batch 16 = 4 steps per epoch, 2 epochs: 8 steps, logged every 2; the
    # logged lr is the one the last step used (step index s - 1).
    train(cfg(data_dir, tmp_path / "s", lr_schedule=schedule, lr=0.01))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "step"]
    steps = [2, 4, 6, 8]
    expect = {
        "constant": [0.01] * 4,
        "cosine": [0.01 * 0.5 * (1 + np.cos(np.pi * (s - 1) / 8)) for s in steps],
        "step": [0.01, 0.01, 0.001, 0.0001],
    }[schedule]
    np.testing.assert_allclose(lrs, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("data, model", [("cifar10", "resnet20"), ("cifar10", "vgg"),
                                         ("mnist", "cnn")])
def test_other_datasets_and_models(tmp_path, data, model):
    rng = np.random.default_rng(2)
    if data == "cifar10":
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            D.write_cifar_batch(tmp_path / "d" / "cifar-10-batches-py" / name,
                                rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
                                rng.integers(0, 10, 4))
    else:
        for split, n in (("train", 20), ("t10k", 8)):
            D.write_idx(tmp_path / "d" / "mnist" / f"{split}-images-idx3-ubyte.gz",
                        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            D.write_idx(tmp_path / "d" / "mnist" / f"{split}-labels-idx1-ubyte.gz",
                        rng.integers(0, 10, n, dtype=np.uint8))
    s = train(cfg(tmp_path / "d", tmp_path / "o", data=data, model=model, epochs=1,
                  batch_size=8))
    assert s["data"] == data and s["model"] == model and 0 <= s["test_accuracy"] <= 1
    if model == "resnet20":
        assert 0.26e6 < s["n_params"] < 0.28e6


def test_validation_split_and_subset(data_dir, tmp_path):
    s = train(cfg(data_dir, tmp_path / "v", validation=16, train_subset=48, epochs=1))
    assert "val_accuracy" in s and "test_accuracy" not in s
    assert s["steps"] == 2  # 48 - 16 = 32 examples, batch 16


def test_density_is_logged(data_dir, tmp_path):
    pytest.importorskip("signsgd.diagnostics", reason="diagnostics module not installed")
    train(cfg(data_dir, tmp_path / "d", density_every=2, epochs=1))
    dens = [r for r in read_metrics(tmp_path / "d" / "metrics.jsonl") if r["kind"] == "density"]
    assert [r["step"] for r in dens] == [2, 4]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(optimizer="lamb"), "valid optimizers: signsgd, signum, ef-signsgd, efsgd, sgd, "
                                 "adam, adamw"),
        (dict(model="resnet50"), "valid models: mlp, cnn, resnet20, vgg"),
        (dict(data="imagenet"), "valid datasets: fashion-mnist, mnist, cifar10"),
        (dict(workers=0), "--workers must be an integer >= 1, got 0"),
        (dict(batch_size=0), "--batch-size must be an integer >= 1, got 0"),
        (dict(workers=N_TRAIN + 1), f"--workers {N_TRAIN + 1} is more than the {N_TRAIN} "
                                    "training examples"),
        (dict(epochs=0), "--epochs must be"),
        (dict(lr=-1.0), "--lr must be"),
        (dict(momentum=1.0), "--momentum must be in"),
        (dict(lr_schedule="warmup"), "valid schedules"),
        (dict(vote="ring"), "valid modes: sharded, allgather"),
        (dict(attack="flip"), "valid attacks"),
        (dict(workers=2, adversaries=3), "more than --workers"),
        (dict(adversaries=1), "needs --workers >= 2"),
        (dict(optimizer="efsgd", compressor="topk:2"), "ratio must be"),
        (dict(optimizer="efsgd", compressor="zip"), "valid compressors"),
        (dict(validation=N_TRAIN), "leaves no training examples"),
        (dict(optimizer="signum", betas=(0.9, 0.99)), "--betas: optimizer 'signum' takes no betas"),
        (dict(optimizer="signsgd", momentum=0.5), "--momentum: optimizer 'signsgd' takes no "
                                                  "momentum"),
        (dict(optimizer="adam", momentum=0.8, betas=(0.9, 0.99)), "--momentum 0.8 disagrees with "
                                                                  "--betas 0.9 0.99"),
        (dict(optimizer="lion", betas=(1.0, 0.9)), "--betas must be two numbers in"),
        (dict(optimizer="lion", betas=(0.9,)), "--betas must be two numbers in"),
        (dict(threads=0), "--threads must be an integer >= 1, got 0"),
    ],
)
def test_bad_input_fails_before_anything_starts(data_dir, tmp_path, change, match):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        train(cfg(data_dir, out, **change))
    assert not out.exists()


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(D.DataError, match="make data"):
        train(cfg(tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_validate_fills_defaults():
    c = validate(TrainConfig(optimizer="ef-signsgd", lr=None, momentum=None))
    assert c.lr > 0 and c.momentum == 0.0 and c.compressor == "scaled-sign"


@pytest.fixture
def finished_run(data_dir, tmp_path):
    c = cfg(data_dir, tmp_path / "run", epochs=1)
    train(c)
    return c


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncate", "corrupt or unreadable"),
        ("garbage", "corrupt or unreadable"),
        ("other_lr", "different run .*lr: checkpoint 0.001, now 0.002"),
        ("other_workers", "different run .*workers: checkpoint 1, now 2"),
        ("done", "already finished epoch 1 of --epochs 1"),
        ("foreign", "not a signsgd training checkpoint"),
        ("missing", "no checkpoint"),
    ],
)
def test_bad_checkpoint_leaves_run_dir_alone(finished_run, how, match):
    out = finished_run.out
    from pathlib import Path

    ck = Path(out) / "checkpoint.pt"
    c = dataclasses.replace(finished_run, epochs=2, resume=True)
    if how == "truncate":
        ck.write_bytes(ck.read_bytes()[:1000])
    elif how == "garbage":
        ck.write_bytes(b"this is not a checkpoint")
    elif how == "other_lr":
        c = dataclasses.replace(c, lr=2e-3)
    elif how == "other_workers":
        c = dataclasses.replace(c, workers=2)
    elif how == "done":
        c = dataclasses.replace(c, epochs=1)
    elif how == "foreign":
        torch.save({"state_dict": {}}, ck)
    elif how == "missing":
        ck.unlink()
    before = snapshot(Path(out))
    with pytest.raises(CheckpointError, match=match):
        train(c)
    assert snapshot(Path(out)) == before


@pytest.mark.parametrize(
    "optimizer, implicit, explicit, same",
    [
        ("adam", {}, {"betas": (0.9, 0.999)}, True),
        ("adamw", {"momentum": 0.8}, {"betas": (0.8, 0.999)}, True),
        ("lion", {}, {"betas": (0.9, 0.99)}, True),
        ("lion", {"momentum": 0.95}, {"betas": (0.95, 0.99), "momentum": 0.95}, True),
        ("adam", {}, {"betas": (0.5, 0.9)}, False),
    ],
)
def test_momentum_is_beta1_when_betas_is_not_given(data_dir, tmp_path, optimizer, implicit,
                                                   explicit, same):
    """Without --betas, --momentum (default 0.9) is β1 and β2 the registry's: old adam/adamw
    runs are unchanged; with --betas both are used."""
    a = train(cfg(data_dir, tmp_path / "a", optimizer=optimizer, epochs=1, **implicit),
              return_params=True)
    b = train(cfg(data_dir, tmp_path / "b", optimizer=optimizer, epochs=1, **explicit),
              return_params=True)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])) == same
    assert b["config"]["betas"] == explicit["betas"] and a["config"]["betas"] is None
    assert (a["config"]["momentum"] == b["config"]["momentum"]) == same


@pytest.mark.parametrize("module", ["signsgd.config", "signsgd.checkpoint", "signsgd.outputs",
                                    "signsgd.train", "signsgd.compare", "signsgd.cli"])
def test_docstring_examples_run_and_every_public_name_has_one(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0 and result.attempted > 0
    for name in mod.__all__:
        obj = getattr(mod, name)
        if callable(obj):
            assert ">>>" in (obj.__doc__ or ""), f"{module}.{name} has no example"


def test_local_steps_end_with_a_synchronisation(data_dir, tmp_path):
    """--steps not a multiple of --sync-every: the last, partial round is synchronised, so
    every rank ends with the saved model and the summary reports that model (2 Gloo ranks)."""
    c = cfg(data_dir, tmp_path / "ls", optimizer="adamw", workers=2, sync_every=2, steps=3,
            outer_lr=1e-3)
    s = train(c)
    ck = checkpoint.read(tmp_path / "ls" / "checkpoint.pt")
    assert ck["step"] == 3
    task = make_task(validate(c))
    model = task.model()
    model.load_state_dict(ck["model"])
    saved = list(model.parameters())
    for rank, part in enumerate(ck["ranks"]):
        local = part["optimizer"]  # LocalSteps' state: this rank's parameters and anchor
        assert local["outer"]["position"] == 0, rank
        for got in (local["params"], local["outer"]["anchor"]):
            assert all(torch.equal(a, b) for a, b in zip(got, saved)), rank
    held = task.evaluate(model, 0, 1)  # the saved model, in one process
    summary = json.loads((tmp_path / "ls" / "summary.json").read_text())
    assert summary["test_accuracy"] == s["test_accuracy"] == held["test_accuracy"]
    assert summary["test_loss"] == pytest.approx(held["test_loss"], rel=1e-5)


@pytest.mark.parametrize(("change", "shared"), [
    # what changes the collective schedule: every torchrun rank must have the same
    (dict(eval_every=3), True), (dict(checkpoint_every=2), True), (dict(log_every=3), True),
    (dict(steps=5), True), (dict(epochs=3), True), (dict(batch_size=8), True),
    (dict(model="cnn"), True), (dict(optimizer="lion"), True), (dict(workers=2), True),
    (dict(data="mnist"), True), (dict(train_subset=32), True), (dict(resume=True), True),
    (dict(density_every=2), True), (dict(seed=1), True),
    # what each rank may have of its own
    (dict(out="elsewhere"), False), (dict(data_dir="copy"), False), (dict(threads=2), False),
    (dict(progress=True), False), (dict(timeout_s=5.0), False), (dict(name="x"), False),
    (dict(device="cpu"), False), (dict(overwrite=True), False),
])
def test_the_schedule_digest_holds_what_the_ranks_must_share(data_dir, tmp_path, change,
                                                             shared):
    if change.get("data_dir") == "copy":
        change = {"data_dir": str(shutil.copytree(data_dir, tmp_path / "copy"))}
    if change.get("data") == "mnist":
        shutil.copytree(data_dir / "fashion-mnist", tmp_path / "d" / "mnist")
        change = {**change, "data_dir": str(tmp_path / "d")}

    def schedule(c):
        c = validate(c)
        return _schedule(c, make_task(c), None)
    base = cfg(data_dir, tmp_path / "a")
    assert (schedule(base) != schedule(dataclasses.replace(base, **change))) == shared
    assert PER_RANK_OPTIONS <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_torchrun_ranks_with_different_options_stop_with_one_clear_error(data_dir, tmp_path):
    """Two torchrun nodes started with different --eval-every and --checkpoint-every: every
    rank raises the same error naming both (exit 2) in the first exchange; no Gloo timeout
    in a mismatched collective and no abort."""
    from signsgd.distributed.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
           "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    train_cmd = ["-m", "signsgd.cli", "train", "--data-dir", str(data_dir), "--model", "mlp",
                 "--batch-size", "8", "--epochs", "1", "--threads", "1", "--no-progress",
                 "--timeout", "20", "--out", str(tmp_path / "run")]
    own = [["--eval-every", "2"], ["--eval-every", "3", "--checkpoint-every", "2"]]
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(r)] + train_cmd + own[r],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=180)[0] for p in nodes]
    message = ("the ranks were started with different options (under torchrun every rank "
               "needs the same ones): --eval-every is 2 on rank 0, 3 on rank 1; "
               "--checkpoint-every is 0 on rank 0, 2 on rank 1")
    for p, output in zip(nodes, outputs):
        assert p.returncode != 0 and message in output, output[-3000:]
        assert "exitcode  : 2" in output and "Timed out" not in output, output[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# A crashing worker (2 Gloo processes) is tested through the CLI in tests/test_cli.py.
