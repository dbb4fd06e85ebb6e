"""Run directories under contention (issue 23): one run at a time per ``--out``, ``compare``
never replacing earlier results or writing through links, and an interrupt that leaves no
temporary file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datafiles import write_random_fashion_mnist
from signsgd import checkpoint
from signsgd.cli import main
from signsgd.outputs import lock_run


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_random_fashion_mnist(root, 40, 16, seed=3)
    return root


def image_args(image_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(image_dir), "--model", "mlp", "--batch-size", "8",
            "--log-every", "2", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp." in p.name)


def test_a_running_run_holds_its_out(image_dir, tmp_path, capsys):
    """While a run is going, a second one into its ``--out`` refuses at once (also with
    --resume or --overwrite); once it stopped (SIGTERM), the directory is free. A temporary
    file that a killed run left behind is gone after the next run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.tmp.1.pt").write_bytes(b"left by a worker killed mid-write")
    cmd = [sys.executable, "-m", "signsgd.cli",
           *image_args(image_dir, out, "--steps", "100000", "--checkpoint-every", "1")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / checkpoint.CHECKPOINT).exists():
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main(image_args(image_dir, out, "--steps", "4", *extra)) == 2, extra
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"--out {out} is in use by another run" in err[0], err
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 130, first.communicate()[1]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert leftovers(out) == [] and checkpoint.read(out / checkpoint.CHECKPOINT)["step"] >= 1
    with lock_run(out):  # free again: the OS released the stopped run's lock
        pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_while_writing_a_checkpoint_leaves_no_temporary_file(
        image_dir, tmp_path, monkeypatch, capsys, signum):
    """The signal arrives after the new checkpoint's temporary file was written and before
    it replaced the previous one: the run ends with 130, the previous checkpoint intact."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == checkpoint.CHECKPOINT and Path(dst).exists():  # the second one
            os.kill(os.getpid(), signum)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        rc = main(image_args(image_dir, tmp_path / "run", "--steps", "6", "--checkpoint-every",
                             "1"))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path / "run") == []
    assert checkpoint.read(tmp_path / "run" / checkpoint.CHECKPOINT)["step"] == 1


COMPARE = '[defaults]\nmodel = "mlp"\nsteps = 2\nbatch-size = 8\n[[run]]\nname = "A"\n' \
          'optimizer = "sgd"\nlr = 0.01\n'


@pytest.mark.parametrize("earlier, message", [
    ("table.md", "holds the results of an earlier compare (table.md)"),
    ("a/metrics.jsonl", "holds the results of an earlier compare (a/)"),
    ("link:table.md", "table.md is a symbolic link"),
    ("link:a", "a is a symbolic link"),
])
def test_compare_refuses_earlier_results_and_links(image_dir, tmp_path, capsys, earlier,
                                                   message):
    """An --out with a compare's results is refused (--overwrite replaces them); a link in
    it is refused even with --overwrite, and what it points to stays as it was."""
    toml, out, elsewhere = tmp_path / "c.toml", tmp_path / "cmp", tmp_path / "elsewhere"
    toml.write_text(COMPARE)
    elsewhere.mkdir()
    (elsewhere / "table.md").write_text("another compare's table")
    out.mkdir()
    if earlier.startswith("link:"):
        (out / earlier[5:]).symlink_to(elsewhere / ("table.md" if "." in earlier else ""))
    else:
        (out / earlier).parent.mkdir(exist_ok=True)
        (out / earlier).write_text("earlier")
    base = ["compare", str(toml), "--out", str(out), "--data-dir", str(image_dir),
            "--no-progress"]
    for extra in ([], ["--overwrite"]) if earlier.startswith("link:") else ([],):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(out) in err[0], err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["table.md"]
    assert (elsewhere / "table.md").read_text() == "another compare's table"
    if not earlier.startswith("link:"):
        assert main(base + ["--overwrite"]) == 0
        assert "| A | sgd | 1 |" in (out / "table.md").read_text()
