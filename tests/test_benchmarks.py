"""Tests of the benchmarks' methods table, timing and training loops
(``benchmarks/methods.py``, ``benchmarks/measure.py``, ``benchmarks/loops.py``), the PowerSGD
bandwidth model (``benchmarks/bandwidth.py``), the time-to-target benchmark
(``benchmarks/bench_tta.py``) and its report (``benchmarks/report.py``); the distributed ones
run 2 Gloo processes on 127.0.0.1."""

from __future__ import annotations

import doctest
import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks import bench_tta, report
from benchmarks.bandwidth import powersgd_nbytes, powersgd_split
from benchmarks.loops import Trainer, curve_worker, workload_step_worker
from benchmarks.measure import _COMM_DDP, comm_layout, comm_worker, payload_bytes
from benchmarks.methods import E2E_LABELS, LOCAL_H, METHODS, WORKLOADS, method
from datafiles import write_random_fashion_mnist, write_shakespeare
from signsgd.distributed.launch import spawn
from signsgd.distributed.reducer import ring_nbytes
from signsgd.distributed.vote import vote_nbytes

#: every fixed row, and the local-steps pattern with two values of H
TABLE = [*METHODS, "local-adamw-h2", "local-signum-h3"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _cnn() -> nn.Module:
    from signsgd.models import build

    return build("cnn", (1, 28, 28), 10)


def _steps_of(name: str) -> int:
    """2 steps; whole rounds for LocalSteps; S + 1 for PowerSGD (one compressed step)."""
    row = method(name)
    if row.powersgd_rank is not None:
        return 3
    return max(2, row.sync_every)


# ------------------------------------------------------------------------------- workers
def _table_job(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for name in TABLE:
        gen = torch.Generator().manual_seed(10 + rank)  # different data on every rank
        tr = Trainer(name, _mlp, world, start_powersgd_iter=2)
        init = [p.detach().clone() for p in tr.module.parameters()]
        losses, nbytes = [], []
        for _ in range(_steps_of(name)):
            x = torch.randn(8, 8, generator=gen)
            y = torch.randint(0, 4, (8,), generator=gen)
            losses.append(tr.step(x, y))
            nbytes.append(tr.bytes())
        out[name] = {"losses": losses, "bytes": nbytes, "init": init, "numel": tr.numel,
                     "shapes": tr.shapes,
                     "params": [p.detach().clone() for p in tr.module.parameters()]}
    return out


def _count_all_reduce_job(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """Every ``torch.distributed.all_reduce`` of each step of torch's hooks, counted."""
    import torch.distributed as dist

    calls: list[tuple[int, int]] = []
    real = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tensor.numel(), tensor.element_size()))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        out = {}
        gen = torch.Generator().manual_seed(rank)
        for name in names:
            tr = Trainer(name, _cnn, world, start_powersgd_iter=2)
            steps = []
            for _ in range(4):
                del calls[:]
                tr.step(torch.randn(4, 1, 28, 28, generator=gen),
                        torch.randint(0, 10, (4,), generator=gen))
                steps.append({"calls": list(calls), "bytes": tr.bytes()})
            out[name] = {"steps": steps, "shapes": tr.shapes, "numel": tr.numel,
                         "buckets": (len(tr.powersgd.error_dict) if tr.powersgd is not None
                                     else None)}
        return out
    finally:
        dist.all_reduce = real


def _comm_job(rank: int, world: int) -> list[dict[str, Any]]:
    return comm_worker(rank, world, [300_000], ["fp32-allreduce", *_COMM_DDP],
                       target_s=0.0, min_reps=1, max_reps=2, in_namespace=False)


def _workload_job(rank: int, world: int) -> dict[str, Any]:
    curves = [curve_worker(rank, world, "cnn", name, steps=4, eval_every=2, target=0.99,
                           options={"start_powersgd_iter": 2})
              for name in ("powersgd-r1", "local-signum-h2")]
    curves.append(curve_worker(rank, world, "gpt", "adamw-ddp", steps=2, eval_every=1,
                               options={"warmup_steps": 1, "eval_batches": 1}))
    steps = workload_step_worker(rank, world, "gpt", ["powersgd-r2-adamw", "local-adamw-h2"],
                                 options={"steps": 10, "warmup_steps": 2}, target_s=0.0,
                                 min_reps=1, max_reps=1, in_namespace=False)
    return {"curves": curves, "steps": steps}


@pytest.fixture(scope="module")
def table() -> list[dict[str, Any]]:
    return spawn(_table_job, 2, timeout=240)


# ------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("name", TABLE)
def test_every_method_of_the_table_trains_on_a_two_process_gloo_group(
        table: list[dict[str, Any]], name: str) -> None:
    r0, r1 = table[0][name], table[1][name]
    row = method(name)
    assert all(math.isfinite(v) for v in r0["losses"] + r1["losses"])
    assert any(not torch.equal(a, b) for a, b in zip(r0["init"], r0["params"])), "no update"
    same = all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    # the ranks saw different data: only a method that communicates keeps them equal
    assert same == row.tta, f"{name}: ranks' models {'equal' if same else 'differ'}"
    numel, shapes = r0["numel"], r0["shapes"]
    sent = r0["bytes"][-1][0]
    if row.powersgd_rank is not None:
        assert r0["bytes"][0][0] == r0["bytes"][1][0] == ring_nbytes(numel, 2, 4)  # S = 2
        assert sent == powersgd_nbytes(shapes, row.powersgd_rank, 2)
    elif row.sync_every > 1:
        assert sent == round(vote_nbytes(numel, 2)[0] / row.sync_every)
    else:
        expected = {"sgd-ddp": ring_nbytes(numel, 2, 4), "adamw-ddp": ring_nbytes(numel, 2, 4),
                    "fp16-ddp": ring_nbytes(numel, 2, 2), "noop-ddp": 0, "sgd-local": 0}
        if name in expected:
            assert sent == expected[name]
        else:  # our reducers count their own bytes
            assert sent > 0


# (not Signum against the majority-vote hook: with M = 2 every split vote is a tie, broken by
# each reducer's own pseudo-random bits)
@pytest.mark.parametrize(("ours", "peer", "tol"), [
    ("sgd", "sgd-ddp", 1e-6), ("adamw", "adamw-ddp", 1e-6), ("sgd", "fp16-ddp", 1e-3)])
def test_the_same_algorithm_through_ddp_and_through_our_reducers_agrees(
        table: list[dict[str, Any]], ours: str, peer: str, tol: float) -> None:
    for a, b in zip(table[0][ours]["params"], table[0][peer]["params"]):
        assert torch.allclose(a, b, rtol=0, atol=tol), (ours, peer, (a - b).abs().max())


def test_local_steps_rows_come_from_the_pattern_for_any_h() -> None:
    row = method("local-adamw-h12")
    assert (row.sync_every, row.inner, row.lr) == (12, "adamw", METHODS["adamw"].lr)
    assert list(E2E_LABELS)[-6:] == [f"local-{i}-h{h}" for i in ("adamw", "signum")
                                     for h in LOCAL_H]
    assert E2E_LABELS["local-signum-h5"].startswith("Signum, 5 local steps")
    for bad in ("local-adamw-h0", "local-sgd-h4", "local-adamw-4", "powersgd-r3"):
        with pytest.raises(ValueError, match="unknown method"):
            method(bad)
        assert bad not in E2E_LABELS


def test_every_row_has_a_learning_rate_for_both_workloads() -> None:
    for name in E2E_LABELS:
        assert set(method(name).lr) >= set(WORKLOADS), name


# ------------------------------------------------------------------------------- PowerSGD
def test_powersgd_split_follows_torchs_min_compression_rate_rule() -> None:
    shapes = [tuple(p.shape) for p in _cnn().parameters()]
    # conv1 16×9 compresses at r=1 ((16+9)·1·2 < 144) but not at r=4 ((16+9)·4·2 > 144)
    unc1, p1, q1 = powersgd_split(shapes, 1)
    unc4, p4, q4 = powersgd_split(shapes, 4)
    assert unc1 == 16 + 32 + 128 + 10 and unc4 == unc1 + 16 * 9
    assert (p1, q1) == (16 + 32 + 128 + 10, 9 + 144 + 1568 + 128)
    assert powersgd_nbytes(shapes, 1, 1) == 0
    with pytest.raises(ValueError):
        powersgd_split([()], 1)


def test_powersgd_nbytes_is_what_torchs_hook_all_reduces() -> None:
    names = ["powersgd-r1", "powersgd-r2", "powersgd-r4", "powersgd-r2-adamw", "fp16-ddp",
             "noop-ddp"]
    res = spawn(_count_all_reduce_job, 2, (names,), timeout=240)[0]
    for name in names:
        r = res[name]
        counted = [sum(ring_nbytes(n, 2, size) for n, size in s["calls"]) for s in r["steps"]]
        reported = [s["bytes"][0] for s in r["steps"]]
        assert counted == reported, (name, counted, reported)
        rank = method(name).powersgd_rank
        if rank is None:
            continue
        assert r["buckets"] == 1, "PowerSGD must run on one DDP bucket"
        fp32 = ring_nbytes(r["numel"], 2, 4)
        compressed = powersgd_nbytes(r["shapes"], rank, 2)
        assert counted == [fp32, fp32, compressed, compressed]
        # the three all-reduces of a compressed step: uncompressed tensors, all P, all Q
        assert [n for n, _ in r["steps"][3]["calls"]] == list(powersgd_split(r["shapes"], rank))


# ------------------------------------------------------------------------------- workers
def test_comm_worker_times_torchs_hooks_on_the_matrix_layout() -> None:
    recs = spawn(_comm_job, 2, timeout=240)[0]
    assert {r["method"] for r in recs} == {"fp32-allreduce", *_COMM_DDP}
    for r in recs:
        assert r["status"] == "ok" and r["median_s"] > 0 and r["reps"] >= 1, r
        expected = payload_bytes(r["method"], 300_000, 2)
        if r["method"] in _COMM_DDP:
            assert (r["sent"], r["received"]) == expected
        else:  # the reducer's counter includes its header
            assert 0 <= r["sent"] - expected[0] <= 1024
    by = {r["method"]: r["sent"] for r in recs}
    assert by["noop-ddp"] == 0 < by["powersgd-r1"] < by["powersgd-r4"] < by["fp16-ddp"]
    assert by["fp16-ddp"] * 2 == by["fp32-ddp"]


def test_comm_layout_holds_d_in_1024_row_matrices() -> None:
    for d in (1, 1000, 1024 * 1024, 11_000_000):
        shapes = comm_layout(d)
        total = sum(n * m for n, m in shapes)
        assert all(n == 1024 for n, _ in shapes) and d <= total < d + 1024


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder of both workloads' formats, small enough for a test (a clone has none):
    Fashion-MNIST as IDX .gz files, and 42 works named as Shakespeare's, the held-out ones
    among them."""
    root = tmp_path_factory.mktemp("data")
    write_random_fashion_mnist(root, 256, 64, seed=0)
    write_shakespeare(root, lambda i, _: f"ACT {i}. To be, or not to be, that is the question.\n"
                      * 40)
    return root


@pytest.mark.slow
def test_curves_and_step_times_of_both_workloads(small_data: Path) -> None:
    out = spawn(_workload_job, 2, timeout=300, env={"SIGNSGD_DATA": str(small_data)})
    c0, c1 = out[0]["curves"], out[1]["curves"]
    assert [c["curve"] for c in c0] == [c["curve"] for c in c1]  # every rank agrees
    psgd, local, gpt = c0
    assert psgd["start_powersgd_iter"] == 2 and psgd["steps"] == 4
    assert [p[0] for p in psgd["curve"]] == [0, 2, 4]
    assert 0.0 <= psgd["final"] <= 1.0 and psgd["metric"] == "test_accuracy"
    assert local["sync_every"] == 2 and local["eval_every"] == 2
    assert gpt["metric"] == "val_loss" and 0 < gpt["final"] < 6 and gpt["steps"] == 2
    assert all(p[3] >= 0 for p in gpt["curve"])
    steps = {r["method"]: r for r in out[0]["steps"]}
    assert steps["local-adamw-h2"]["round_s"] == pytest.approx(
        2 * steps["local-adamw-h2"]["median_s"])
    assert steps["powersgd-r2-adamw"]["start_powersgd_iter"] == 2
    assert steps["powersgd-r2-adamw"]["sent"] < ring_nbytes(steps["powersgd-r2-adamw"]["numel"],
                                                             2, 4) / 10


# ------------------------------------------------------------------------------- bench_tta
def _fake_data() -> dict[str, Any]:
    curves = [{"workload": "cnn", "method": m, "lr": 0.1, "steps_to_target": n, "final": f,
               "steps": n or 100, "train_s": 1.0, "bytes_sent_per_step": 1e3,
               "start_powersgd_iter": s, "sync_every": h, "outer_lr": 0.01 if h > 1 else None,
               "diverged": None, "curve": [[0, 0.1, None, 0.0], [n or 100, f, 1.0, 1.0]],
               "metric": "test_accuracy"}
              for m, n, f, s, h in (("sgd-ddp", 80, 0.86, None, 1),
                                    ("adamw-ddp", 40, 0.87, None, 1),
                                    ("powersgd-r1", 100, 0.85, 10, 1),
                                    ("local-signum-h4", 60, 0.855, None, 4),
                                    ("signum", None, 0.80, None, 1))]
    steps = []
    for rate, bps, fp32 in (("unshaped", None, 0.02), ("100mbit", 10**8, 0.5)):
        for m, t in (("sgd-ddp", fp32), ("adamw-ddp", fp32), ("powersgd-r1", 0.03),
                     ("local-signum-h4", 0.025), ("signum", 0.03), ("noop-ddp", 0.01)):
            steps.append({"workload": "cnn", "method": m, "rate": rate, "rate_bps": bps,
                          "shaped": bps is not None, "median_s": t, "sent": 1000,
                          "world_size": 4})
    return {"command": "python -m benchmarks.bench_tta", "date": "today",
            "machine": {"cpus": 2, "processor": "x86_64", "platform": "Linux",
                        "python": "3.11", "torch": "2.13", "loadavg_start": [1.0, 1.0, 1.0]},
            "shaping": "tc", "settings": {
                "workers": 4, "workloads": ["cnn"], "rates": ["unshaped", "100mbit"],
                "per_workload": {"cnn": {"steps": 100, "eval_every": 20, "target": 0.85,
                                         "start_powersgd": 10, "warmup_steps": 0,
                                         "eval_batches": 1}}},
            "curves": curves, "steps": steps,
            "validate": [{**curves[0], "rate": "100mbit", "rate_bps": 10**8, "shaped": True,
                          "train_s": 44.0}]}


def test_time_to_target_charges_each_phase_its_own_step_time() -> None:
    rows = {(r["rate"], r["method"]): r for r in report.rows(_fake_data())}
    slow = rows[("100mbit", "powersgd-r1")]
    assert slow["tta_s"] == pytest.approx(10 * 0.5 + 90 * 0.03)  # S steps at fp32 DDP's time
    assert rows[("100mbit", "sgd-ddp")]["tta_s"] == pytest.approx(40.0)
    assert slow["vs"]["sgd-ddp"] == pytest.approx(7.7 / 40.0)
    assert rows[("100mbit", "local-signum-h4")]["tta_s"] == pytest.approx(60 * 0.025)
    assert rows[("100mbit", "signum")]["tta_s"] is None          # target not reached
    assert rows[("100mbit", "noop-ddp")]["curve"] is None        # step time only


def test_markdown_and_plot_render(tmp_path: Path) -> None:
    data = _fake_data()
    text = report.tta_markdown(data)
    assert "| SGD + DDP + PowerSGD r=1 (1 bucket) | 0.001 | 0.030 |" in text
    assert "### Check of the model" in text and "| 100 Mbit/s | SGD + DDP (fp32) | 80 |" in text
    assert "load average at start" in text
    (tmp_path / "r.json").write_text(json.dumps(data))
    rc = bench_tta.main(["--render", str(tmp_path / "r.json"), "--markdown",
                         str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")])
    assert rc == 0 and (tmp_path / "r.png").stat().st_size > 1000
    assert (tmp_path / "r.md").read_text() == text


def test_bench_tta_arguments() -> None:
    assert bench_tta._lr_arg("cnn:local-adamw-h4=1e-3") == (("cnn", "local-adamw-h4"), 1e-3)
    for bad in ("adamw", "gpu:adamw=1", "nonsense=1", "adamw=x"):
        with pytest.raises(Exception, match="METHOD=LR"):
            bench_tta._lr_arg(bad)
    assert bench_tta.step_methods(["powersgd-r1"]) == ["powersgd-r1", "sgd-ddp", "adamw-ddp",
                                                       "noop-ddp"]
    for w, methods in bench_tta.DEFAULT_METHODS.items():
        assert w in WORKLOADS and all(method(m).tta for m in methods)


@pytest.mark.parametrize("name", ["bench_tta", "bandwidth", "methods", "measure", "loops",
                                  "models", "report"])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0 and result.attempted > 0, result


def test_perf_tables_summarise_a_time_to_target_run() -> None:
    from benchmarks import perf_tables

    text = perf_tables.tta_tables(_fake_data())
    assert "| SGD + DDP (fp32) | 1.6 / 1.00 / 2.00 | 40.0 / 1.00 / 2.00 |" in text
    assert "| 100 Mbit/s | Signum, 4 local steps + voted outer step | 1.5 |" in text
