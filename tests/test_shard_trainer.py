"""``signsgd train --shard S``: FSDP2 / HSDP in the trainer, M = R replicas × S shards of a
tiny GPT (4 Gloo ranks: 2 × 2). The replicas end identical (each rank's parameter shards are
in its part of the checkpoint), the checkpoint's model is the full one (``sample`` reads
it), the bytes are the cross-replica reducer's; local steps run; what is not supported is
refused before anything starts, naming the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datafiles import write_sonnet
from signsgd import checkpoint
from signsgd.cli import main
from signsgd.config import TrainConfig, validate
from signsgd.errors import ConfigError


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_sonnet(tmp_path_factory.mktemp("text"))


def lm_args(text_file: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", f"text:{text_file}", "--model", "gpt", "--n-layer", "1",
            "--n-head", "2", "--d-model", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-batches", "3", "--log-every", "2", "--threads", "1", "--no-progress",
            "--workers", "4", "--shard", "2", "--out", str(out), *extra]


def _check_replicas_identical(out: Path) -> dict:
    """Rank r is replica r // 2, shard r % 2: both replicas hold the same shards, and the
    shards put together are the checkpoint's full model."""
    ckpt = checkpoint.read(out / "checkpoint.pt")
    shards = [part["shard"] for part in ckpt["ranks"]]
    assert len(shards) == 4
    for j in range(2):  # shard j of replica 0 against shard j of replica 1
        assert all(torch.equal(a, b) for a, b in zip(shards[j], shards[2 + j]))
    full = list(ckpt["model"].values())
    assert len(full) == len(shards[0])
    for k, f in enumerate(full):  # FSDP2 cuts dim 0 in chunks
        assert torch.equal(torch.cat([shards[0][k], shards[1][k]]), f)
    assert all(not t.is_meta for t in full)
    return ckpt


def test_signum_two_replicas_of_two_shards(text_file, tmp_path, capsys):
    out = tmp_path / "hsdp"
    assert main(lm_args(text_file, out, "--optimizer", "signum", "--steps", "6",
                        "--eval-every", "3")) == 0
    _check_replicas_identical(out)
    s = json.loads((out / "summary.json").read_text())
    assert (s["workers"], s["replicas"], s["shard"], s["steps"]) == (4, 2, 2, 6)
    assert "cross-replica" in s["bytes_counted"] and s["config"]["shard"] == 2
    # the vote on a rank's half of the gradient, 1 bit each way, plus the header
    assert 0 < s["bytes_sent_per_step"] <= s["fp32_gradient_bytes"] / 16
    assert all(r["sent_per_step"] == s["bytes_sent_per_step"] for r in s["bytes_per_rank"])
    assert s["val_loss"] > 0
    capsys.readouterr()
    assert main(["sample", "--run", str(out), "--prompt", "From", "--chars", "20"]) == 0
    assert capsys.readouterr().out.startswith("From")


@pytest.mark.parametrize("opts", [
    ("--optimizer", "signum"),  # the vote of the pseudo-gradients, sign-momentum outer
    ("--optimizer", "adamw", "--outer-optimizer", "nesterov", "--outer-reducer", "mean"),
], ids=["signum-vote", "adamw-diloco"])
def test_local_steps_on_shards(text_file, tmp_path, opts):
    out = tmp_path / "local"
    assert main(lm_args(text_file, out, *opts, "--sync-every", "4", "--steps", "8",
                        "--eval-every", "4")) == 0
    ckpt = _check_replicas_identical(out)
    assert all(part["optimizer"]["outer"]["position"] == 0 for part in ckpt["ranks"])
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 8 and s["bytes_sent_per_step"] > 0
    if opts[1] == "signum":  # 1 bit per coordinate every H = 4 steps
        assert s["bytes_sent_per_step"] <= s["fp32_gradient_bytes"] / (16 * 4)


TEXT = {"data": "text:sonnet.txt", "model": "gpt"}


@pytest.mark.parametrize("kwargs,wants", [
    ({"workers": 3, "shard": 2}, ["--workers 3 is not a multiple of --shard 2"]),
    ({"workers": 1, "shard": 2}, ["--workers 1 is not a multiple of --shard 2"]),
    ({"workers": 4, "shard": 0}, ["--shard must be an integer >= 1, got 0"]),
    ({"workers": 4, "shard": 2, "data": "fashion-mnist", "model": "cnn"},
     ["--shard 2 shards the language model", "--model cnn"]),
    ({"workers": 4, "shard": 2, "optimizer": "adamw"},
     ["--optimizer adamw with --shard 2", "signum", "onebit-adam", "--sync-every H > 1"]),
    ({"workers": 4, "shard": 2, "optimizer": "sgd"}, ["--optimizer sgd with --shard 2"]),
    ({"workers": 4, "shard": 2, "adversaries": 1},
     ["--adversaries 1 is not supported with --shard 2"]),
    ({"workers": 4, "shard": 2, "density_every": 5},
     ["--density-every 5 is not supported with --shard 2"]),
    ({"workers": 4, "shard": 2, "resume": True},
     ["--resume is not supported with --shard 2", "TrainState"]),
], ids=["not-multiple", "one-worker", "zero", "image", "adamw", "sgd", "adversaries",
        "density", "resume"])
def test_refusals_name_the_value(kwargs, wants):
    with pytest.raises(ConfigError) as err:
        validate(TrainConfig(**{**TEXT, **kwargs}))
    for want in wants:
        assert want in str(err.value)


def test_supported_combinations_validate():
    for kwargs in ({"optimizer": "adamw", "sync_every": 4}, {"optimizer": "lion"},
                   {"optimizer": "onebit-adam"}, {"optimizer": "efsgd"}, {}):
        assert validate(TrainConfig(**TEXT, workers=4, shard=2, **kwargs)).shard == 2
    assert validate(TrainConfig(**TEXT, workers=3)).shard == 1  # the default: unsharded
