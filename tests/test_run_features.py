"""``signsgd train`` features on small real files: the language-model workload and
``sample``, step budgets and mid-run resume, local steps, and the failure paths a hostile
tester found (occupied, unwritable or full run directories, a damaged checkpoint, too many
workers, a stalled worker)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datafiles import SONNET, write_random_fashion_mnist, write_sonnet
from signsgd import checkpoint
from signsgd.cli import main
from signsgd.errors import CheckpointError
from signsgd.outputs import read_metrics


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_sonnet(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_random_fashion_mnist(root, 40, 16, seed=3)
    return root


def lm_args(text_file: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", f"text:{text_file}", "--model", "gpt", "--n-layer", "1",
            "--n-head", "2", "--d-model", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-batches", "2", "--log-every", "2", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


def image_args(image_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(image_dir), "--model", "mlp", "--batch-size", "8",
            "--log-every", "2", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def test_language_model_outputs_and_sample(text_file, tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(lm_args(text_file, out, "--optimizer", "adamw", "--lr", "3e-3", "--steps",
                        "12", "--eval-every", "4", "--warmup-steps", "3", "--grad-clip",
                        "1.0")) == 0
    assert "bits/char" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["val_bpc"] == pytest.approx(s["val_loss"] / math.log(2))
    assert 0 < s["val_loss"] < math.log(len(set(SONNET)) + 1) + 0.5 and s["steps"] == 12
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert (out / "curves.png").stat().st_size > 1000
    samples = []
    for seed in (1, 1, 2):
        assert main(["sample", "--run", str(out), "--prompt", "From", "--chars", "40",
                     "--seed", str(seed)]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] != samples[2]
    assert samples[0].startswith("From") and len(samples[0].rstrip("\n")) == 44


@pytest.mark.parametrize("name,make,opts", [
    ("lm-1", "lm", ("--optimizer", "lion", "--lr", "1e-3")),
    ("lm-2-vote", "lm", ("--optimizer", "signum", "--lr", "1e-3", "--workers", "2")),
    ("lm-2-local-steps", "lm", ("--optimizer", "adamw", "--lr", "1e-3", "--workers", "2",
                                "--sync-every", "4", "--outer-lr", "1e-3",
                                "--outer-momentum", "0.5")),
    ("image-mid-epoch", "image", ("--optimizer", "ef-signsgd", "--lr", "0.1", "--workers",
                                  "2")),
])
def test_interrupted_run_resumes_bit_identically(text_file, image_dir, tmp_path, monkeypatch,
                                                 name, make, opts):
    """A run killed mid-epoch (mid-round for local steps) and resumed from its last
    checkpoint ends exactly like the uninterrupted run: model, metrics, evaluations."""
    args = (lambda out: lm_args(text_file, out, *opts, "--steps", "10", "--eval-every", "5")
            ) if make == "lm" else (lambda out: image_args(image_dir, out, *opts, "--epochs",
                                                           "2"))
    common = ("--checkpoint-every", "2", "--lr-schedule", "cosine", "--warmup-steps", "2")
    assert main(args(tmp_path / "full") + list(common)) == 0
    dies, last = (7, 6) if make == "lm" else (5, 4)  # text: 10 steps; images: 2 epochs of 3
    monkeypatch.setenv("SIGNSGD_INJECT_FAULT", f"0:{dies}")  # after the checkpoint of `last`
    try:
        rc = main(args(tmp_path / "part") + list(common))
    except RuntimeError:  # one process: the injected fault itself
        rc = 1
    assert rc == 1
    monkeypatch.delenv("SIGNSGD_INJECT_FAULT")
    assert checkpoint.read(tmp_path / "part" / "checkpoint.pt")["step"] == last
    assert main(args(tmp_path / "part") + list(common) + ["--resume"]) == 0
    a, b = (checkpoint.read(tmp_path / run / "checkpoint.pt") for run in ("full", "part"))
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def untimed(ck):
        return [{k: v for k, v in m.items() if k not in ("time_s", "samples_per_s")}
                for m in ck["metrics"] if m["kind"] != "comm" or "time_collectives_s" not in m]
    assert untimed(a) == untimed(b)


def test_local_steps_send_one_hth_of_the_vote(text_file, tmp_path):
    sent = {}
    for h in (1, 4):
        out = tmp_path / f"h{h}"
        assert main(lm_args(text_file, out, "--optimizer", "signum", "--lr", "1e-3",
                            "--workers", "2", "--steps", "8", "--sync-every", str(h))) == 0
        sent[h] = json.loads((out / "summary.json").read_text())["bytes_sent_per_step"]
        comm = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"comm"' in line]
        synced = [r for r in comm if r["bytes_sent"]]  # windows with a synchronisation
        assert synced and all(r["compression_ratio"] > 1 and r["time_collectives_s"] > 0
                              for r in synced)
        assert all(r["compression_ratio"] is None for r in comm if not r["bytes_sent"])
        assert {"time_pack_s", "time_unpack_s", "bytes_sent_total"} <= set(comm[-1])
    assert sent[4] == pytest.approx(sent[1] / 4, rel=0.01)


def test_an_earlier_run_is_not_overwritten_silently(image_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(image_args(image_dir, out, "--epochs", "1")) == 0
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(image_args(image_dir, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main(image_args(image_dir, out, "--epochs", "1", "--overwrite")) == 0


def test_out_that_is_a_file_is_one_clear_line(image_dir, tmp_path, capsys):
    bad = tmp_path / "a_file"
    bad.write_text("x")
    assert main(image_args(image_dir, bad, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0]


def _tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a folder on a disk of ``size`` bytes (unmounted afterwards)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        if not _tmpfs(where, f"size={max(size // 1024, 4)}k"):
            pytest.skip("needs root and tmpfs to make a small disk")
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    where = tmp_path / "ro"
    if not _tmpfs(where, "ro,size=64k"):
        pytest.skip("needs root and tmpfs to mount a read-only directory")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_read_only_out_is_one_clear_line(image_dir, read_only_dir, capsys):
    assert main(image_args(image_dir, read_only_dir / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written" in err[0]


def _fill(disk: Path) -> None:
    """Write a file on ``disk`` until it is full."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while f.write(bytes(1 << 16)):
                pass
        except OSError:
            pass


@pytest.mark.parametrize("what, opts", [
    # The first checkpoint fits on a disk of 1.6 checkpoints; the second does not.
    ("checkpoint.pt", ("--steps", "10", "--checkpoint-every", "1")),
    # A 32 KiB disk fills with step records long before the one evaluation at the end.
    ("metrics.jsonl", ("--steps", "400", "--log-every", "1", "--eval-every", "400")),
    ("metrics.jsonl", ("--steps", "400", "--log-every", "1", "--eval-every", "400",
                       "--workers", "2")),
    # The disk fills up just before the summary is written.
    ("summary.json", ("--steps", "2",)),
], ids=["checkpoint", "metrics", "metrics-2-workers", "summary"])
def test_a_full_disk_is_one_clean_line_and_leaves_nothing(image_dir, tmp_path, small_disk,
                                                          monkeypatch, capsys, what, opts):
    """Whichever write finds the disk full: exit status 2, one line naming the file and the
    reason (no torch internals), no temporary file, and what was written before intact."""
    assert main(image_args(image_dir, tmp_path / "probe", "--steps", "1")) == 0
    size = (tmp_path / "probe" / "checkpoint.pt").stat().st_size
    out = small_disk(32 * 1024 if what == "metrics.jsonl" else int(1.6 * size)) / "run"
    if what == "summary.json":
        write_text = Path.write_text

        def fill_first(path, *args, **kwargs):
            if path.name.startswith(".summary.tmp"):
                _fill(path.parent.parent)
            return write_text(path, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", fill_first)
    capsys.readouterr()
    rc = main(image_args(image_dir, out, *opts))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"cannot write {out / what}: No space left on device" in err[0], err
    assert not [p.name for p in out.iterdir() if ".tmp." in p.name]  # no temporary files
    assert read_metrics(out / "metrics.jsonl")                      # whole lines only
    if what != "metrics.jsonl":
        assert checkpoint.read(out / "checkpoint.pt")["step"] >= 1  # the last good one


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("where", [0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98])
def test_a_flipped_byte_never_passes_silently(image_dir, tmp_path, where, capsys):
    """Every one-byte change is refused, or hit bytes that no stored value reads (then the
    checkpoint reads back exactly as saved): never a silently different state."""
    out = tmp_path / "run"
    assert main(image_args(image_dir, out, "--steps", "4", "--workers", "2")) == 0
    ck = out / "checkpoint.pt"
    original = checkpoint.read(ck)
    raw = bytearray(ck.read_bytes())
    raw[int(where * (len(raw) - 1))] ^= 0x10
    ck.write_bytes(bytes(raw))
    try:
        got = checkpoint.read(ck)
    except CheckpointError:
        capsys.readouterr()
        assert main(image_args(image_dir, out, "--steps", "8", "--workers", "2",
                               "--resume")) == 2
        err = capsys.readouterr().err
        assert "damaged" in err or "corrupt or unreadable" in err or "not a signsgd" in err, err
        assert ck.read_bytes() == bytes(raw)  # nothing overwritten
    else:
        assert _same(got, original)


def test_too_many_local_workers_are_refused(image_dir, tmp_path, capsys):
    many = 8 * (os.cpu_count() or 1) + 1  # fewer than the 40 examples on small machines
    if many > 40:
        pytest.skip(f"{os.cpu_count()} cores: {many} workers would exceed the 40 examples")
    assert main(image_args(image_dir, tmp_path / "run", "--workers", str(many))) == 2
    err = capsys.readouterr().err
    assert f"--workers {many} is more than this machine can hold" in err
    assert "--force-workers" in err
    assert not (tmp_path / "run").exists()


def test_a_stalled_worker_is_named_within_the_timeout(image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIGNSGD_INJECT_FAULT", "1:1:stall")
    start = time.monotonic()
    rc = main(image_args(image_dir, tmp_path / "run", "--workers", "3", "--epochs", "1",
                         "--timeout", "4"))
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 1 and took < 60, took
    first = err.splitlines()[1]
    assert "the cause: rank 1" in first and "did not arrive" in first, err[:500]


def test_second_node_of_two_says_where_rank_zero_writes(image_dir, tmp_path):
    from signsgd.distributed.launch import free_port

    port, out = free_port(), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
           "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    tail = ["-m", "signsgd.cli", *image_args(image_dir, out, "--epochs", "1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(r)] + tail, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert "rank 0 writes the outputs to" in outputs[1] and str(out) in outputs[1]
    assert (out / "summary.json").exists()


def test_bf16_autocast_trains(text_file, tmp_path):
    out = tmp_path / "bf16"
    assert main(lm_args(text_file, out, "--optimizer", "signum", "--lr", "1e-3", "--steps",
                        "4", "--precision", "bf16")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert math.isfinite(s["val_loss"])
    assert checkpoint.read(out / "checkpoint.pt")["model"]["tok.weight"].dtype == torch.float32


@pytest.mark.parametrize("outer", [
    ("--outer-optimizer", "sign-momentum", "--outer-reducer", "mean", "--outer-lr", "1e-3",
     "--outer-momentum", "0"),
    ("--outer-optimizer", "nesterov", "--outer-reducer", "mean", "--outer-lr", "0.7",
     "--outer-momentum", "0.9"),
])
def test_one_worker_local_steps_are_the_outer_step_alone(text_file, tmp_path, outer):
    """M = 1: local steps without communication (single-replica DiLoCo), the outer optimiser
    stepping on x0 - x every H steps. With outer lr 1 and no momentum on the mean,
    x0 - (x0 - x) is plain AdamW up to rounding; a real outer step changes the run."""
    base = ("--optimizer", "adamw", "--lr", "1e-3", "--steps", "8")
    runs = {"plain": (), "outer": ("--sync-every", "4", *outer),
            "identity": ("--sync-every", "4", "--outer-optimizer", "sign-momentum",
                         "--outer-reducer", "mean", "--outer-lr", "1", "--outer-momentum", "0")}
    models = {}
    for name, opts in runs.items():
        assert main(lm_args(text_file, tmp_path / name, *base, *opts)) == 0
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["workers"] == 1 and s["config"]["sync_every"] == (1 if name == "plain" else 4)
        models[name] = checkpoint.read(tmp_path / name / "checkpoint.pt")["model"]
    for k, v in models["plain"].items():
        torch.testing.assert_close(models["identity"][k], v, rtol=0, atol=1e-6)
    assert any(not torch.allclose(models["outer"][k], v) for k, v in models["plain"].items())
