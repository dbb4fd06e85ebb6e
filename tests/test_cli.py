"""The ``signsgd`` command on tiny real IDX files: train with 1 and 2 workers, resume across
workers, compare, reproduce, and every bad-input message."""

from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest
import torch

from signsgd import checkpoint
from signsgd import data as D
from signsgd.cli import build_parser, main
from signsgd.compare import DEFAULT_COMPARE, parse_compare
from signsgd.config import TrainConfig, from_args

N_TRAIN, N_TEST = 48, 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    rng = np.random.default_rng(1)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        D.write_idx(root / "fashion-mnist" / f"{split}-images-idx3-ubyte.gz",
                    rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        D.write_idx(root / "fashion-mnist" / f"{split}-labels-idx1-ubyte.gz",
                    rng.integers(0, 10, n, dtype=np.uint8))
    return root


def train_args(data_dir, out, *extra):
    return ["train", "--data-dir", str(data_dir), "--model", "mlp", "--batch-size", "8",
            "--log-every", "2", "--no-progress", "--out", str(out), *extra]


def test_train_one_worker(data_dir, tmp_path, capsys):
    rc = main(train_args(data_dir, tmp_path / "r1", "--optimizer", "signsgd", "--lr", "1e-3",
                         "--epochs", "1"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "summary.json" in printed
    s = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert s["workers"] == 1 and s["optimizer"] == "signsgd" and s["steps"] == N_TRAIN // 8


def test_two_workers_vote_and_resume_bit_identical(data_dir, tmp_path):
    """2 workers with majority vote; stopping after epoch 1 and resuming gives the same
    final parameters (aggregator state, per-rank momentum) as one uninterrupted run."""
    opts = ("--optimizer", "signum", "--lr", "1e-3", "--workers", "2")
    assert main(train_args(data_dir, tmp_path / "full", *opts, "--epochs", "2")) == 0
    assert main(train_args(data_dir, tmp_path / "part", *opts, "--epochs", "1")) == 0
    assert main(train_args(data_dir, tmp_path / "part", *opts, "--epochs", "2",
                           "--resume")) == 0
    a, b = (checkpoint.read(tmp_path / run / "checkpoint.pt") for run in ("full", "part"))
    a["optimizer"] = [r["optimizer"] for r in a["ranks"]]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["optimizer"]) == 2 and "aggregator" in a["optimizer"][0]
    s = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert s["workers"] == 2 and s["steps"] == 2 * (N_TRAIN // 2 // 8)
    # 1 bit per coordinate each way (sharded vote), plus small headers: far below fp32.
    assert 0 < s["bytes_sent_per_step"] < s["fp32_gradient_bytes"] / 16
    assert [r["rank"] for r in s["bytes_per_rank"]] == [0, 1]


@pytest.mark.parametrize(
    ("optimizer", "lr", "attack"),
    [("signum", "1e-3", "random"), ("ef-signsgd", "0.1", "negate")],
)
def test_byzantine_workers(data_dir, tmp_path, optimizer, lr, attack):
    """3 workers, the last one attacks (vote or EF all-reduce); the run completes and says so."""
    rc = main(train_args(data_dir, tmp_path / "byz", "--optimizer", optimizer, "--lr", lr,
                         "--workers", "3", "--adversaries", "1", "--attack", attack,
                         "--epochs", "1"))
    assert rc == 0
    s = json.loads((tmp_path / "byz" / "summary.json").read_text())
    assert s["config"]["adversaries"] == 1 and s["config"]["attack"] == attack
    assert s["workers"] == 3 and s["bytes_sent_per_step"] > 0


def test_compare_writes_table_and_plot(data_dir, tmp_path, capsys):
    toml = tmp_path / "cmp.toml"
    toml.write_text(
        '[defaults]\nmodel = "mlp"\nepochs = 1\nbatch-size = 8\nlog_every = 2\n\n'
        '[[run]]\nname = "Adam"\noptimizer = "adam"\nlr = 1e-3\n\n'
        '[[run]]\nname = "SGD 2w"\noptimizer = "sgd"\nlr = 0.01\nworkers = 2\n'
    )
    rc = main(["compare", str(toml), "--out", str(tmp_path / "cmp"), "--data-dir",
               str(data_dir), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert table in printed and "compare.png" in printed
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "| Adam | adam | 1 |" in lines[2]
    assert "| SGD 2w | sgd | 2 |" in lines[3]
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp" / "sgd-2w" / "summary.json").is_file()
    runs = json.loads((tmp_path / "cmp" / "table.json").read_text())["runs"]
    assert runs[1]["bytes_sent_per_step"] > 0 and runs[0]["bytes_sent_per_step"] == 0


def test_builtin_default_is_the_demo():
    runs = parse_compare(DEFAULT_COMPARE)
    got = [(c.optimizer, c.workers, c.epochs, c.data, c.model) for c in runs]
    assert got == [("adam", 1, 3, "fashion-mnist", "cnn"), ("sgd", 1, 3, "fashion-mnist", "cnn"),
                   ("signum", 1, 3, "fashion-mnist", "cnn"),
                   ("signum", 4, 3, "fashion-mnist", "cnn"),
                   ("ef-signsgd", 4, 3, "fashion-mnist", "cnn"),
                   ("lion", 1, 3, "fashion-mnist", "cnn"), ("lion", 4, 3, "fashion-mnist", "cnn")]
    assert runs[1].momentum == 0.9


def test_crashing_worker_ends_run_with_its_traceback(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIGNSGD_INJECT_FAULT", "1:1")
    rc = main(train_args(data_dir, tmp_path / "crash", "--workers", "2", "--epochs", "1"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "a worker failed" in err and "--- rank 1 ---" in err and "Traceback" in err
    assert "injected fault on rank 1 at step 1" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "lamb"], "unknown optimizer 'lamb'; valid optimizers: signsgd, signum"),
        (["--model", "bert"], "unknown model 'bert'; valid models: mlp, cnn, resnet20, vgg"),
        (["--data", "imagenet"], "valid datasets: fashion-mnist, mnist, cifar10"),
        (["--workers", "0"], "--workers must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--workers", str(N_TRAIN + 1)], "more than the 48 training examples"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_bad_train_input(data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    rc = main(train_args(data_dir, out, *args))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("signsgd train: error:")
    assert not out.exists()


def test_missing_data(tmp_path, capsys):
    rc = main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "make data" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("[defaults]\nepochs = 1\n", "no [[run]] tables"),
        ("[[run]]\noptimiser = 'adam'\n", "unknown option 'optimiser'"),
        ("[[run]]\nname = 'a'\n[[run]]\nname = 'a'\n", "two runs are named 'a'"),
        ("[[run]\n", "invalid TOML"),
        ("[[run]]\noptimizer = 'lamb'\n", "run 'lamb-1': unknown optimizer 'lamb'; valid"),
        # Wrong types: the key, the table and the value, never a traceback.
        ("[[run]]\nname = 123\n", "run 1: name must be a string, got 123"),
        ("[[run]]\nname = 'a'\nlr = '0.1'\n", "run 1 ('a'): lr must be a number, got '0.1'"),
        ("[defaults]\nworkers = 2.5\n[[run]]\n", "[defaults]: workers must be an integer, got "
         "2.5"),
        ("[[run]]\nseed = true\n", "run 1: seed must be an integer, got True"),
        ("[[run]]\nbetas = [0.9, 'x']\n", "run 1: betas must be two numbers, got [0.9, 'x']"),
        ("[[run]]\nforce_workers = 'yes'\n", "run 1: force_workers must be true or false"),
        ("run = [1]\n", "run 1 must be a table"),
        ("defaults = 1\n[[run]]\n", "[defaults] must be a table"),
        ("[[run]]\nname = 'a'\n[[check]]\nrun = 'a'\nmin_accuracy = '0.5'\n",
         "check 1: min_accuracy must be a number, got '0.5'"),
        ("[[run]]\nname = 'a'\n[[check]]\nrun = 1\nmin_accuracy = 0.5\n",
         "check 1: run must be the name of a run (a string), got 1"),
        ("[[run]]\nname = 'a'\ncheck = [1]\n", "unknown option 'check' in run 1"),
        ("check = [1]\n[[run]]\nname = 'a'\n", "check 1 must be a table"),
        ("[[run]]\nname = 'A b'\n[[run]]\nname = 'a-b'\n", "runs 'A b' and 'a-b' would both "
         "write to"),
    ],
)
def test_bad_compare_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    rc = main(["compare", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_compare_missing_file(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_reproduce_unknown_lists_experiments(capsys):
    experiments = pytest.importorskip("signsgd.experiments",
                                      reason="the experiments package is not installed")
    assert main(["reproduce", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nonsense'" in err
    for name in experiments.EXPERIMENTS:
        assert name in err


@pytest.mark.parametrize(
    "accs, verdicts",
    [
        ((0.90, 0.90, 0.895, 0.886, 0.899, 0.895, 0.89), [True] * 6),
        ((0.885, 0.90, 0.87, 0.875, 0.885, 0.87, 0.86), [False, False, True, False, False,
                                                         True]),
    ],
)
def test_quality_bar_checks(accs, verdicts):
    from signsgd.compare import evaluate_checks, parse_checks

    names = ["Adam", "SGD+momentum", "Signum", "Signum, majority vote", "EF-signSGD", "Lion",
             "Lion, majority vote"]
    rows = [dict(name=n, test_accuracy=a) for n, a in zip(names, accs)]
    got = evaluate_checks(parse_checks(DEFAULT_COMPARE), rows)
    assert [ok for ok, _ in got] == verdicts
    assert all(line.startswith("PASS" if ok else "FAIL") for ok, line in got)


@pytest.mark.parametrize(
    "check, message",
    [("[[check]]\nrun = 'a'\n", "use run + min_accuracy"),
     ("[[check]]\nrun = 'zz'\nmin_accuracy = 0.5\n", "no run named 'zz'")],
)
def test_bad_checks(tmp_path, capsys, check, message):
    path = tmp_path / "c.toml"
    path.write_text("[[run]]\nname = 'a'\n" + check)
    assert main(["compare", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_same_command_under_torchrun(data_dir, tmp_path):
    """Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) `signsgd train` joins that group."""
    import subprocess
    import sys

    from signsgd.distributed.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "signsgd.cli", *train_args(data_dir, tmp_path / "tr", "--optimizer", "signum",
                                            "--lr", "1e-3", "--epochs", "1")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert s["workers"] == 2 and s["bytes_sent_per_step"] > 0
    assert s["steps"] == N_TRAIN // 2 // 8


# Fields that are not options of `signsgd train` / keys of a compare file, and the flags not
# spelled --field-name: everything else is derived, so a new field gets both.
NOT_ON_CLI = {"extra"}
NOT_IN_COMPARE = {"extra", "out", "resume", "progress", "overwrite"}
FLAGS = {"progress": "--no-progress", "timeout_s": "--timeout"}
HINTS = typing.get_type_hints(TrainConfig)


def sample(name):
    """A non-default value of field ``name`` and its command-line spelling."""
    hint = HINTS[name]
    if hint is bool:
        return not getattr(TrainConfig(), name), []
    for kind, value, text in ((tuple, (0.5, 0.25), ["0.5", "0.25"]), (float, 0.5, ["0.5"]),
                              (int, 7, ["7"]), (str, "x", ["x"])):
        if kind in (typing.get_origin(a) or a for a in typing.get_args(hint) + (hint,)):
            return value, text
    raise AssertionError(f"no sample for {name}: {hint}")


@pytest.mark.parametrize("f", dataclasses.fields(TrainConfig), ids=lambda f: f.name)
def test_every_config_field_is_a_train_flag_and_a_compare_key(f, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helptext = capsys.readouterr().out
    value, text = sample(f.name) if f.name != "extra" else ({}, [])
    flag = FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
    if f.name in NOT_ON_CLI:
        assert flag not in helptext
    else:
        assert f" {flag}" in helptext
        a = build_parser().parse_args(["train", flag, *text])
        assert getattr(from_args(a), f.name) == value
    toml = f"[[run]]\n{f.name} = {json.dumps(value)}\n"
    if f.name in NOT_IN_COMPARE:
        with pytest.raises(ValueError, match=f"unknown option '{f.name}'"):
            parse_compare(toml)
    else:
        assert getattr(parse_compare(toml)[0], f.name) == value


def test_train_help_lists_every_optimizer_and_reproduce_help_every_experiment(capsys):
    experiments = pytest.importorskip("signsgd.experiments",
                                      reason="the experiments package is not installed")
    from signsgd.config import OPTIMIZERS

    for argv, names in ((["train", "--help"], OPTIMIZERS),
                        (["reproduce", "--help"], experiments.EXPERIMENTS)):
        with pytest.raises(SystemExit):
            main(argv)
        helptext = " ".join(capsys.readouterr().out.split())
        assert all(name in helptext for name in names)


def test_betas_from_the_command_line_train(data_dir, tmp_path):
    assert main(train_args(data_dir, tmp_path / "l", "--optimizer", "lion", "--lr", "1e-4",
                           "--betas", "0.95", "0.98", "--epochs", "1")) == 0
    s = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert s["config"]["betas"] == [0.95, 0.98] and s["config"]["momentum"] == 0.95


def test_every_option_is_in_exactly_one_group_and_help_section():
    import argparse

    from signsgd.config import GROUPS, add_arguments

    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(grouped) == len(set(grouped))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sections = parser.format_help().split("\n\n")
    comm = next(s for s in sections if s.startswith("communication options:"))
    assert "--sync-every" in comm and "--outer-reducer" in comm and "\n  --lr " not in comm


@pytest.mark.parametrize("optimizer, model, lr, betas", [
    ("signum", "gpt", 3e-3, None), ("signum", "cnn", 1e-3, None),
    ("adamw", "gpt", 1e-2, None), ("adamw", "cnn", 3e-3, None),
    ("lion", "gpt", 1e-3, (0.95, 0.98)), ("lion", "cnn", 1e-3, None),
    ("ef-signsgd", "gpt", 1.0, None), ("onebit-adam", "gpt", 1e-2, None),
    ("sgd", "gpt", 0.1, None),
])
def test_a_language_model_takes_the_rates_tuned_on_the_gpt(optimizer, model, lr, betas):
    from signsgd.config import validate

    data = "shakespeare" if model == "gpt" else "fashion-mnist"
    c = validate(TrainConfig(optimizer=optimizer, model=model, data=data))
    assert (c.lr, c.betas) == (lr, betas)
    if betas:  # β1 is the language model's too, and given values still win
        assert c.momentum == betas[0]
        assert validate(TrainConfig(optimizer=optimizer, model=model, data=data,
                                    momentum=0.9)).betas is None


def test_a_language_model_given_only_beta1_keeps_its_own_beta2():
    from signsgd.config import validate
    from signsgd.train import _make_optimizer

    c = validate(TrainConfig(optimizer="lion", model="gpt", data="shakespeare", momentum=0.9))
    opt = _make_optimizer(c, torch.nn.Linear(2, 1), 0, 1, 10)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)
