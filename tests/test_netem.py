"""Tests of the loopback network emulator ``benchmarks/netem.py``, and of the benchmarks'
bandwidth model and results files (``benchmarks/bandwidth.py``, ``benchmarks/common.py``)."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import netem
from benchmarks.netem import (
    NetworkEmulator,
    ShapingUnavailableError,
    check_world_size,
    format_rate,
    launch,
    parse_rate,
)

REASON = netem.shaping_unavailable_reason()
needs_netns = pytest.mark.skipif(
    REASON is not None, reason=f"cannot create shaped namespaces here: {REASON}"
)
TESTS_DIR = str(Path(__file__).resolve().parent)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- rates
@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("10gbit", 10**10),
        ("10Gbit/s", 10**10),
        ("10 Gbit/s", 10**10),
        ("1gbit", 10**9),
        ("1 Gbits/s", 10**9),
        ("100mbit", 10**8),
        ("100Mbit/s", 10**8),
        ("2.5gbit", 2_500_000_000),
        ("500kbit", 500_000),
        ("10mbitps", 10**7),
    ],
)
def test_parse_rate(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["unshaped", "UNSHAPED", " none ", "unlimited", None])
def test_parse_unshaped(text: str | None) -> None:
    assert parse_rate(text) is None


def test_parse_numbers() -> None:
    assert parse_rate(1_000_000) == 1_000_000
    assert parse_rate(2.5e9) == 2_500_000_000
    assert parse_rate("64000") == 64000


@pytest.mark.parametrize(
    "bad", ["fast", "10 parsecs", "", "gbit", "10 gbyte", "-5mbit", "0mbit", "1..2gbit",
            "10xbit", "1e6"],
)
def test_bad_rates_name_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="rate") as info:
        parse_rate(bad)
    assert repr(bad) in str(info.value) or bad in str(info.value)


def test_bps_is_refused_as_ambiguous() -> None:
    with pytest.raises(ValueError, match=r"'100mbps'.*bytes per second.*100mbit"):
        parse_rate("100mbps")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 10, True, [1]])
def test_bad_numeric_rates(bad: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)  # type: ignore[arg-type]


def test_format_rate() -> None:
    assert format_rate(None) == "unshaped"
    assert format_rate(10**10) == "10 Gbit/s"
    assert format_rate(10**8) == "100 Mbit/s"
    assert format_rate(parse_rate("2.5gbit")) == "2.5 Gbit/s"


# ------------------------------------------------------------------------------- M
@pytest.mark.parametrize("bad", [0, -3, 2.0, "4", None, True])
def test_world_size_validation(bad: object) -> None:
    with pytest.raises(ValueError, match=r"M must be an integer >= 1, got " + repr(bad)):
        check_world_size(bad)
    with pytest.raises(ValueError, match="M must be"):
        launch(_echo, bad)  # type: ignore[arg-type]


def test_world_size_ok() -> None:
    assert check_world_size(1) == 1 and check_world_size(8) == 8


def test_bad_rate_in_launch_and_emulator() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        launch(_echo, 2, rate="fast")
    with pytest.raises(ValueError, match="'10 parsecs'"):
        NetworkEmulator("10 parsecs")


# ------------------------------------------------------------------------------- privilege
def test_missing_privilege_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netem, "shaping_unavailable_reason", lambda: "need root (uid 1000)")
    with pytest.raises(ShapingUnavailableError, match="need root"):
        NetworkEmulator("1gbit").open()
    with pytest.raises(ShapingUnavailableError, match="need root"):
        launch(_echo, 1, rate="1gbit", strict=True)


def test_without_privilege_runs_unshaped_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netem, "shaping_unavailable_reason", lambda: "need root (uid 1000)")
    with pytest.warns(netem.ShapingUnavailableWarning, match=r"1 Gbit/s.*need root"):
        out = launch(_echo, 1, rate="1gbit", timeout=90)
    assert out.results == [(0, 1)]
    assert not out.shaped and out.namespace is None and "need root" in out.note


def test_reason_mentions_root_or_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netem.os, "geteuid", lambda: 1000)
    reason = netem.shaping_unavailable_reason()
    assert reason is not None and ("root" in reason or "iproute2" in reason)


# ------------------------------------------------------------------------------- namespaces
def _echo(rank: int, world_size: int) -> tuple[int, int]:
    return rank, world_size


def _netns_id(rank: int, world_size: int) -> str:
    return os.readlink("/proc/self/ns/net")


def _sleeper(rank: int, world_size: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


def _boom(rank: int, world_size: int) -> None:
    raise RuntimeError(f"boom on rank {rank}")


@needs_netns
def test_namespace_created_shaped_and_removed() -> None:
    with NetworkEmulator("100mbit") as emu:
        assert emu.name in netem.list_namespaces()
        assert emu.name.startswith(f"signsgd-{os.getpid()}-")
        q = emu.qdisc()
        assert "tbf" in q and "100Mbit" in q
        out = subprocess.run(emu.prefix + ["cat", "/sys/class/net/lo/mtu"],
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "1500"
    assert emu.name not in netem.list_namespaces()
    emu.close()  # idempotent


@needs_netns
def test_namespace_removed_on_exception() -> None:
    with pytest.raises(ZeroDivisionError):  # noqa: PT012
        with NetworkEmulator("1gbit") as emu:
            name = emu.name
            1 / 0  # noqa: B018
    assert name not in netem.list_namespaces()


@needs_netns
def test_launch_worker_failure_cleans_up() -> None:
    from signsgd.distributed.launch import WorkerError

    before = set(netem.list_namespaces())
    with pytest.raises(WorkerError, match="boom on rank"):
        launch(_boom, 1, rate="1gbit", timeout=60)
    assert set(netem.list_namespaces()) <= before


@needs_netns
def test_shaped_transfer_is_slower_than_unshaped() -> None:
    times = {}
    for rate in ("unshaped", "10mbit"):
        with NetworkEmulator(rate) as emu:
            secs, n = netem.probe_throughput(emu, 2_000_000)
        assert n == 2_000_000
        times[rate] = secs
    # 2 MB = 16 Mbit at 10 Mbit/s: >= 1.6 s minus the 256 kB burst, so >= 1 s with margin;
    # unshaped loopback moves 2 MB in milliseconds (0.5 s allows a very busy machine).
    assert times["10mbit"] >= 1.0, times
    assert times["unshaped"] < 0.5, times
    assert times["10mbit"] > 3 * times["unshaped"], times


@needs_netns
def test_launch_runs_workers_inside_namespace() -> None:
    out = launch(_netns_id, 2, rate="1gbit", timeout=90)
    mine = os.readlink("/proc/self/ns/net")
    assert out.results[0] == out.results[1] != mine
    assert out.shaped and out.rate_bps == 10**9
    assert out.namespace not in netem.list_namespaces()


_SIGINT_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    # Ctrl-C's default, also when this suite runs in the background (a shell starts
    # background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[:0] = [{tests!r}, {root!r}]
    from benchmarks.netem import launch
    from test_netem import _sleeper
    launch(_sleeper, 2, (120.0,), rate="100mbit", timeout=150)
    """
)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_namespace_or_process(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SIGINT_SCRIPT.format(
        tests=TESTS_DIR, root=str(ROOT))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f"signsgd-{proc.pid}-"
    pids: list[int] = []
    name = None
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None:
            names = [n for n in netem.list_namespaces() if n.startswith(prefix)]
            if names:
                name = names[0]
                pids = netem.namespace_pids(name)
                if len(pids) >= 3:  # the launcher and both workers are up
                    break
            time.sleep(0.2)
        assert name is not None and len(pids) >= 3, (name, pids, proc.poll())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err or "SIGTERM" in err, err[-2000:]
    assert not [n for n in netem.list_namespaces() if n.startswith(prefix)]
    time.sleep(0.2)
    survivors = [p for p in pids if netem._pid_alive(p)]
    assert not survivors, survivors


@needs_netns
def test_cli_runs_a_command_behind_the_link(capsys: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.netem", "--rate", "10Gbit/s", "--",
         "sh", "-c", "cat /sys/class/net/lo/mtu; exit 3"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 3 and out.stdout.strip() == "1500", out
    assert "10 Gbit/s" in out.stderr
    with pytest.raises(SystemExit) as info:
        netem.main(["--rate", "fast", "--", "true"])
    assert info.value.code == 2 and "'fast'" in capsys.readouterr().err


@needs_netns
def test_stale_namespace_of_dead_process_is_swept() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    name = f"signsgd-{int(dead.stdout)}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netem.sweep_stale_namespaces()
        assert name not in netem.list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


# ------------------------------------------------------------------------------- the model
def test_bandwidth_model() -> None:
    from benchmarks.bandwidth import bottleneck_bytes, break_even_rate, predict_time

    assert bottleneck_bytes(1e6, 4) == 4e6
    assert bottleneck_bytes(1e6, 4, shared=False) == 1e6
    assert predict_time(0.5, 125_000_000, 10**9) == pytest.approx(1.5)  # 1 Gbit at 1 Gbit/s
    assert predict_time(0.5, 1e9, None) == 0.5
    # compressed: 0.3 s fixed, 1 MB; baseline: 0.1 s fixed, 101 MB -> equal at 4 Gbit/s
    assert break_even_rate(0.3, 1e6, 0.1, 101e6) == pytest.approx(4e9)
    assert break_even_rate(0.1, 1e6, 0.3, 101e6) == float("inf")
    assert break_even_rate(0.3, 200e6, 0.1, 101e6) == 0.0
    with pytest.raises(ValueError, match="rate_bps"):
        predict_time(0.1, 1.0, 0)
    with pytest.raises(ValueError, match="world_size"):
        bottleneck_bytes(1.0, 0)


@pytest.mark.parametrize(
    ("rate_bps", "loopback_bps", "effective"),
    [(10e9, 6e9, 6e9), (1e9, 6e9, 1e9), (None, 6e9, 6e9), (1e9, None, 1e9), (None, None, None)],
)
def test_effective_rate_is_capped_by_the_loopback(rate_bps: float | None,
                                                  loopback_bps: float | None,
                                                  effective: float | None) -> None:
    from benchmarks.bandwidth import effective_rate, fixed_cost

    assert effective_rate(rate_bps, loopback_bps) == effective
    # 1 Gbit of wire at the effective rate, on top of 0.5 s (no rate: nothing to subtract)
    wire = 125_000_000
    measured = 0.5 + (8 * wire / effective if effective else 0.0)
    assert fixed_cost(measured, wire, rate_bps, loopback_bps) == pytest.approx(0.5)
    assert fixed_cost(0.1, 10 * wire, 1e9) == 0.0  # never below zero


@pytest.mark.parametrize(
    ("cell", "unshaped", "expected"),
    [
        ({"rate_bps": 10**9, "shaped": True, "sent": 31_250_000, "world_size": 4}, 0.5, 1.5),
        ({"rate_bps": 10**9, "shaped": False, "sent": 31_250_000, "world_size": 4}, 0.5, None),
        ({"rate_bps": None, "shaped": False, "sent": 31_250_000, "world_size": 4}, 0.5, None),
        ({"rate_bps": 10**9, "shaped": True, "sent": None, "world_size": 4}, 0.5, None),
        ({"rate_bps": 10**9, "shaped": True, "sent": 31_250_000, "world_size": 4}, None, None),
    ],
)
def test_prediction_from_the_unshaped_record(cell: dict, unshaped: float | None,
                                             expected: float | None) -> None:
    from benchmarks.bandwidth import predicted

    base = None if unshaped is None else {"median_s": unshaped}
    got = predicted(cell, base, None)
    assert got == (None if expected is None else pytest.approx(expected))


# ------------------------------------------------------------------------------- results
#: The method names a schema-1 file may use and their names at schema 2 (the spec of the
#: one upgrade step; the benchmarks' own copy is common._v1_methods).
SCHEMA_1_NAMES = {
    "sharded_vote": "majority-vote", "allgather_vote": "majority-vote-allgather",
    "ef_allreduce": "ef-allreduce", "fp16_allreduce": "fp16-allreduce",
    "fp32_allreduce": "fp32-allreduce", "signum_vote": "signum",
    "signum_ddp_hook": "signum-ddp-hook", "ef_signsgd": "ef-signsgd", "sgd_allreduce": "sgd",
    "sgd_ddp": "sgd-ddp", "local": "sgd-local"}


@pytest.mark.parametrize(("key", "old"), [(k, m) for k in ("cells", "steps", "tta")
                                          for m in (*SCHEMA_1_NAMES, "majority-vote")])
def test_a_file_without_a_schema_is_schema_1_and_read_with_todays_method_names(
        tmp_path: Path, key: str, old: str) -> None:
    from benchmarks.common import RESULTS_SCHEMA, read_results

    path = tmp_path / "old.json"
    path.write_text(json.dumps({key: [{"method": old}], "settings": {"methods": [old]}}))
    data = read_results(path)
    new = SCHEMA_1_NAMES.get(old, old)  # today's names pass unchanged
    assert data == {key: [{"method": new}], "settings": {"methods": [new]},
                    "schema": RESULTS_SCHEMA}


def test_a_file_of_todays_schema_is_read_as_it_was_written(tmp_path: Path) -> None:
    from benchmarks.common import RESULTS_SCHEMA, read_results, write_json

    # "local" was a schema-1 name: at schema 2 no name is rewritten, whatever it is
    data = {"steps": [{"method": "local"}], "settings": {"methods": ["local"]}}
    write_json(tmp_path / "r.json", data)
    assert read_results(tmp_path / "r.json") == {"schema": RESULTS_SCHEMA, **data}


def test_every_results_file_the_benchmarks_write_carries_the_schema(tmp_path: Path) -> None:
    from benchmarks.common import RESULTS_SCHEMA, write_json

    data = {"command": "python x.py", "cells": []}
    write_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert list(json.loads(text)) == ["schema", "command", "cells"]  # the schema first
    assert json.loads(text)["schema"] == RESULTS_SCHEMA and "schema" not in data
    with pytest.raises(ValueError, match="results data of schema 1"):
        write_json(tmp_path / "s.json", {"schema": 1, "cells": []})


@pytest.mark.parametrize("schema", [3, 0, "2", True, None])
def test_a_schema_this_checkout_does_not_know_is_refused(tmp_path: Path, schema: Any) -> None:
    from benchmarks.common import read_results

    path = tmp_path / "new.json"
    path.write_text(json.dumps({"schema": schema, "cells": []}))
    with pytest.raises(ValueError, match=r"new\.json: results schema .*reads schemas 1 to 2"):
        read_results(path)


def test_every_schema_upgrades_to_the_next_and_schema_1_to_methods_the_benchmarks_run(
        ) -> None:
    from benchmarks.common import _UPGRADES, RESULTS_SCHEMA, schema_of
    from benchmarks.methods import COMM_LABELS, E2E_LABELS

    assert sorted(_UPGRADES) == list(range(1, RESULTS_SCHEMA))
    data = {"cells": [{"method": m} for m in SCHEMA_1_NAMES], "settings": {}}
    assert schema_of(data) == 1
    _UPGRADES[1](data)
    assert [c["method"] for c in data["cells"]] == list(SCHEMA_1_NAMES.values())
    assert set(SCHEMA_1_NAMES.values()) <= set(COMM_LABELS) | set(E2E_LABELS)


@pytest.mark.parametrize("name", sorted(p.name for p in (
    ROOT / "benchmarks" / "results").glob("*.json")))
def test_the_results_files_in_the_repository_read_at_todays_schema(name: str) -> None:
    from benchmarks.common import RESULTS_SCHEMA, read_results
    from benchmarks.methods import COMM_LABELS, method

    data = read_results(ROOT / "benchmarks" / "results" / name)
    assert data["schema"] == RESULTS_SCHEMA
    for key in ("cells", "steps", "tta", "curves", "validate"):
        for rec in data.get(key, []):
            assert rec["method"] in COMM_LABELS or method(rec["method"]), (key, rec["method"])


# ------------------------------------------------------------------------------- docs
@pytest.mark.parametrize("name", ["netem", "bandwidth", "common"])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0 and result.attempted > 0, result


@pytest.mark.parametrize("name", netem.__all__)
def test_every_public_name_is_documented_with_an_example(name: str) -> None:
    obj = getattr(netem, name)
    assert (obj.__doc__ or "").strip(), f"netem.{name} has no docstring"
    if not (isinstance(obj, type) and issubclass(obj, Warning | Exception)):
        assert ">>>" in obj.__doc__, f"netem.{name} has no runnable example"


def test_child_mode_without_a_job_file_fails_cleanly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, netem.__file__, "--child",
                          str(tmp_path / "missing.pkl"), str(tmp_path / "out.pkl")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "missing.pkl" in out.stderr
    assert not (tmp_path / "out.pkl").exists()
