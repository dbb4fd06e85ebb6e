"""Network emulator: run M Gloo workers behind a rate-limited loopback.

:func:`launch` runs ``fn(rank, world_size, *args)`` in ``world_size`` worker processes (via
:func:`signsgd.distributed.launch.spawn`, Gloo on ``127.0.0.1``) inside a fresh Linux
network namespace whose loopback is shaped with a token bucket filter::

    ip netns add signsgd-<pid>-<n>
    ip -n NS link set lo mtu 1500 up
    tc -n NS qdisc add dev lo root tbf rate R burst 256kb latency 400ms

What this emulates: **one shared link of rate R**. Every byte any rank sends crosses the
one shaped loopback, so the time of a collective is about (total bytes all ranks send) / R,
not (bytes one rank sends) / R as on a switched network where each machine has its own
link of rate R. Ratios between methods are comparable either way (each method's total is
M times its per-rank volume); absolute times are those of M machines behind one link of
rate R (e.g. a cross-site link, or one NIC shared by M GPUs). See ``docs/performance.md``.

Rates (:func:`parse_rate`): ``"unshaped"`` (also ``"none"``, ``"unlimited"``), or a number
with a decimal SI prefix and ``bit``, as ``tc`` writes them: ``"100mbit"``, ``"1gbit"``,
``"10Gbit/s"``, ``"2.5 Gbit/s"``, ``"500kbit"``; a bare number is bits per second.
``"bps"`` is refused because ``tc`` reads it as *bytes* per second.

Needs root and iproute2 (``ip``, ``tc``). Without them :func:`launch` says so (a
:class:`ShapingUnavailableWarning`) and runs the workers unshaped on the host loopback, or
raises :class:`ShapingUnavailableError` with ``strict=True``.

Clean-up: the namespace is deleted, and every process in it killed, on every exit path:
normal return, an exception, ``KeyboardInterrupt`` (Ctrl-C), SIGTERM / SIGHUP (turned into
an exception while a namespace is live), and interpreter exit (``atexit``). A namespace
left by a process killed with SIGKILL is swept by the next :class:`NetworkEmulator` (names
carry the creating pid; only names whose pid is dead are removed).

Command line: ``python -m signsgd.bench.netem --rate 100mbit -- CMD ...`` runs any command
(e.g. ``torchrun --standalone ...`` talking over 127.0.0.1) behind the shaped loopback.

Example:
    >>> from signsgd.bench.netem import launch
    >>> out = launch(my_module.work, 4, rate="100mbit")   # doctest: +SKIP
    >>> out.results, out.shaped, out.rate_bps             # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

__all__ = [
    "DEFAULT_RATES",
    "LaunchResult",
    "NetworkEmulator",
    "ShapingUnavailableError",
    "ShapingUnavailableWarning",
    "check_world_size",
    "format_rate",
    "launch",
    "parse_rate",
    "probe_throughput",
    "read_lo_bytes",
    "shaping_unavailable_reason",
]

#: The rates the benchmarks sweep, fastest first.
DEFAULT_RATES: tuple[str, ...] = ("unshaped", "10gbit", "1gbit", "100mbit")

NS_PREFIX = "signsgd-"

_UNSHAPED = {"unshaped", "none", "unlimited", "off", "inf"}
_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_RATE_RE = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<prefix>[kmgt]?)\s*"
    r"(?P<unit>bit(?:s)?(?:\s*/\s*s|ps)?|b/s)?\s*$",
    re.IGNORECASE,
)


class ShapingUnavailableError(RuntimeError):
    """Rate shaping was asked for but this machine cannot do it (no root or no iproute2)."""


class ShapingUnavailableWarning(UserWarning):
    """Rate shaping is unavailable here, so the workers run unshaped."""


# ------------------------------------------------------------------------------- rates
def parse_rate(rate: str | int | float | None) -> int | None:
    """Parse a link rate into bits per second; ``None`` means unshaped.

    Accepted: ``None`` / ``"unshaped"`` / ``"none"`` / ``"unlimited"``; a positive number of
    bits per second; or a string ``<number><k|m|g|t>bit`` with optional ``/s`` or ``s``
    (decimal prefixes, as ``tc``: 1 kbit = 1000 bit), case-insensitive, spaces allowed:
    ``"10gbit"``, ``"10Gbit/s"``, ``"1 Gbits/s"``, ``"100Mbit"``, ``"2.5gbit"``.

    Raises:
        ValueError: the value cannot be parsed (``"fast"``, ``"10 parsecs"``), is not
            positive, is below 8 kbit/s (tc's token bucket cannot shape that with a 256 kB
            burst in useful time), or uses ``bps`` (tc reads ``bps`` as *bytes*/s).
    """
    if rate is None:
        return None
    if isinstance(rate, bool):
        raise ValueError(f"cannot parse rate {rate!r}: expected e.g. '100mbit' or 'unshaped'")
    if isinstance(rate, (int, float)):
        value = float(rate)
        text = repr(rate)
    elif isinstance(rate, str):
        text = rate
        s = rate.strip().lower()
        if s in _UNSHAPED:
            return None
        if re.fullmatch(r"[\d.]+\s*[kmgt]?bps", s):
            raise ValueError(
                f"ambiguous rate {rate!r}: tc reads 'bps' as bytes per second; write bits, "
                f"e.g. '{s[:-3]}bit'"
            )
        m = _RATE_RE.match(s)
        if m is None:
            raise ValueError(
                f"cannot parse rate {rate!r}: expected 'unshaped' or a number with a unit "
                f"such as '100mbit', '1gbit', '10Gbit/s' (decimal k/m/g/t prefixes, bits)"
            )
        value = float(m.group("num")) * _PREFIX[m.group("prefix").lower()]
    else:
        raise ValueError(
            f"cannot parse rate {rate!r} of type {type(rate).__name__}: expected a string "
            f"such as '100mbit' or a number of bits per second"
        )
    if not value > 0 or value == float("inf"):
        raise ValueError(f"rate must be a positive finite bit rate, got {text}")
    if value < 8000:
        raise ValueError(f"rate {text} is below the 8 kbit/s this emulator supports")
    return int(round(value))


def format_rate(bps: int | None) -> str:
    """Human form of a rate in bits/s: ``None`` → ``"unshaped"``, 1e9 → ``"1 Gbit/s"``."""
    if bps is None:
        return "unshaped"
    for div, name in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if bps >= div:
            return f"{bps / div:g} {name}bit/s"
    return f"{bps:g} bit/s"


def _tc_rate(bps: int) -> str:
    return f"{bps}bit"


def check_world_size(world_size: Any) -> int:
    """Return ``world_size`` if it is an int >= 1, else raise ``ValueError`` naming it."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"number of workers M must be an integer >= 1, got {world_size!r}")
    return world_size


# ------------------------------------------------------------------------------- privilege
def shaping_unavailable_reason() -> str | None:
    """Why this machine cannot shape a namespace's loopback, or ``None`` if it can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    missing = [tool for tool in ("ip", "tc") if _which(tool) is None]
    if missing:
        return f"iproute2 is not installed ({' and '.join(missing)} not found); " \
               "install it, e.g. 'apt-get install iproute2'"
    if os.geteuid() != 0:
        return f"network namespaces and tc need root (running as uid {os.geteuid()})"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
         if os.access(p := os.path.join(d, tool), os.X_OK)), None)


def _ip() -> str:
    return _which("ip") or "ip"


def _tc() -> str:
    return _which("tc") or "tc"


def _run_checked(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed: '{' '.join(cmd)}' exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces on this machine (``ip netns list``)."""
    out = subprocess.run([_ip(), "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Pids of the processes inside namespace ``name`` (``ip netns pids``)."""
    out = subprocess.run([_ip(), "netns", "pids", name], capture_output=True, text=True,
                         timeout=30)
    return [int(x) for x in out.stdout.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def read_lo_bytes() -> tuple[int, int]:
    """(received, transmitted) byte counters of ``lo`` in this process's namespace.

    Inside a namespace of :class:`NetworkEmulator` all traffic is the workers' own, so the
    difference of two readings is the wire volume (TCP/IP headers included) in between.
    Every byte sent over loopback is also received on it: rx == tx.
    """
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise RuntimeError("no 'lo' interface in /proc/net/dev")


# ------------------------------------------------------------------------------- clean-up
_LIVE: dict[str, NetworkEmulator] = {}
_LIVE_LOCK = threading.RLock()
_COUNTER = itertools.count()
_PREV_HANDLERS: dict[int, Any] = {}
_ATEXIT_DONE = False


class _Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP while a namespace is live: unwinds like Ctrl-C, then exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received signal {signal.Signals(signum).name}")
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _install_handlers() -> None:
    global _ATEXIT_DONE
    if not _ATEXIT_DONE:
        atexit.register(_cleanup_all)
        _ATEXIT_DONE = True
    if threading.current_thread() is not threading.main_thread() or _PREV_HANDLERS:
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            _PREV_HANDLERS[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # pragma: no cover - not the main thread / no such signal
            pass


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_PREV_HANDLERS.items()):
        try:
            signal.signal(sig, prev)
        except (ValueError, OSError, TypeError):  # pragma: no cover
            pass
        del _PREV_HANDLERS[sig]


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        for emu in list(_LIVE.values()):
            emu.close()


def sweep_stale_namespaces() -> list[str]:
    """Delete ``signsgd-<pid>-<n>`` namespaces whose creating process is dead; return them."""
    removed = []
    for name in list_namespaces():
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-(\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace_processes(name)
            subprocess.run([_ip(), "netns", "delete", name], capture_output=True, timeout=30)
            removed.append(name)
    return removed


def _kill_namespace_processes(name: str, grace: float = 2.0) -> None:
    pids = [p for p in namespace_pids(name) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p)]
            if not pids:
                return
            time.sleep(0.05)


# ------------------------------------------------------------------------------- emulator
class NetworkEmulator:
    """A fresh network namespace with a rate-limited loopback; a context manager.

    Args:
        rate: link rate (see :func:`parse_rate`); ``"unshaped"`` gives a namespace whose
            loopback has no qdisc (still MTU ``mtu``, so shaped and unshaped runs differ
            only in the rate).
        burst: tbf bucket size, in tc syntax (must exceed the MTU or every packet drops).
        latency: tbf's longest queueing delay; packets beyond it are dropped.
        mtu: loopback MTU in the namespace.

    Raises:
        ShapingUnavailableError: on entering, if :func:`shaping_unavailable_reason` says so.
        RuntimeError: an ``ip`` / ``tc`` command failed (the message holds its stderr).

    Attributes:
        name: the namespace name, ``signsgd-<pid>-<n>``.
        rate_bps: the parsed rate (``None`` unshaped).
        prefix: the argv prefix that runs a command inside the namespace.
    """

    def __init__(
        self,
        rate: str | int | float | None = "unshaped",
        *,
        burst: str = "256kb",
        latency: str = "400ms",
        mtu: int = 1500,
    ) -> None:
        self.rate_bps = parse_rate(rate)
        if not isinstance(mtu, int) or mtu < 576:
            raise ValueError(f"mtu must be an int >= 576, got {mtu!r}")
        self.burst = burst
        self.latency = latency
        self.mtu = mtu
        self.name = f"{NS_PREFIX}{os.getpid()}-{next(_COUNTER)}"
        self.created = False

    @property
    def prefix(self) -> list[str]:
        """``["ip", "netns", "exec", name]``: prepend it to run a command in the namespace."""
        return [_ip(), "netns", "exec", self.name]

    def open(self) -> NetworkEmulator:
        """Create the namespace and shape its loopback (idempotent)."""
        if self.created:
            return self
        reason = shaping_unavailable_reason()
        if reason is not None:
            raise ShapingUnavailableError(reason)
        with _LIVE_LOCK:
            _install_handlers()
            sweep_stale_namespaces()
            _LIVE[self.name] = self
            self.created = True
        try:
            _run_checked([_ip(), "netns", "add", self.name], "creating the namespace")
            _run_checked([_ip(), "-n", self.name, "link", "set", "lo", "mtu", str(self.mtu),
                          "up"], "bringing up loopback")
            if self.rate_bps is not None:
                _run_checked(
                    [_tc(), "-n", self.name, "qdisc", "add", "dev", "lo", "root", "tbf",
                     "rate", _tc_rate(self.rate_bps), "burst", self.burst,
                     "latency", self.latency],
                    "shaping loopback with tc tbf",
                )
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every process in the namespace and delete it (idempotent, never raises)."""
        with _LIVE_LOCK:
            if not self.created:
                return
            try:
                _kill_namespace_processes(self.name)
            except Exception:  # noqa: BLE001 - clean-up must go on
                pass
            for _ in range(5):
                proc = subprocess.run([_ip(), "netns", "delete", self.name],
                                      capture_output=True, text=True, timeout=30)
                if proc.returncode == 0 or self.name not in list_namespaces():
                    break
                time.sleep(0.2)
            self.created = False
            _LIVE.pop(self.name, None)
            if not _LIVE:
                _restore_handlers()

    def qdisc(self) -> str:
        """``tc qdisc show dev lo`` inside the namespace (to check the shaping)."""
        return _run_checked([_tc(), "-n", self.name, "qdisc", "show", "dev", "lo"],
                            "reading the qdisc").strip()

    def __enter__(self) -> NetworkEmulator:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetworkEmulator({format_rate(self.rate_bps)!r}, name={self.name!r})"


_PROBE = """
import socket, sys, threading, time
N = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
got = []
def recv():
    c, _ = srv.accept(); n = 0
    while n < N:
        b = c.recv(1 << 20)
        if not b:
            break
        n += len(b)
    got.append(n); c.close()
t = threading.Thread(target=recv); t.start()
s = socket.create_connection(srv.getsockname())
buf = b"x" * min(N, 1 << 22); sent = 0
t0 = time.perf_counter()
while sent < N:
    k = min(len(buf), N - sent); s.sendall(buf[:k]); sent += k
s.close(); t.join()
print(time.perf_counter() - t0, got[0])
"""


def probe_throughput(emulator: NetworkEmulator, nbytes: int = 2_000_000) -> tuple[float, int]:
    """Send ``nbytes`` over one TCP connection on the namespace's loopback.

    Returns ``(seconds, bytes received)``; ``8·bytes/seconds`` is the link's throughput for
    one flow (the tbf burst lets the first 256 kB through at loopback speed).
    """
    if not emulator.created:
        raise ValueError(f"{emulator!r} is not open; use it as a context manager")
    if not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be an int >= 1, got {nbytes!r}")
    out = _run_checked(emulator.prefix + [sys.executable, "-c", _PROBE, str(nbytes)],
                       "the throughput probe")
    secs, got = out.split()
    return float(secs), int(got)


# ------------------------------------------------------------------------------- launch
@dataclass
class LaunchResult:
    """What :func:`launch` returns."""

    results: list[Any]
    """``fn``'s return value per rank."""
    rate_bps: int | None
    """The rate asked for, in bits/s (``None``: unshaped)."""
    shaped: bool
    """Whether the rate was really applied (False if shaping was unavailable)."""
    namespace: str | None
    """Namespace the workers ran in (``None``: the host's)."""
    note: str = ""
    """Why the run is not shaped as asked, if it is not."""
    wall_s: float = 0.0
    """Seconds from start to the last worker's result, process start-up included."""
    extra: dict[str, Any] = field(default_factory=dict)


def _spawn_kwargs(timeout: float, pg_timeout: float | None, threads: int | None,
                  env: dict[str, str] | None) -> dict[str, Any]:
    return {"timeout": timeout, "pg_timeout": pg_timeout, "threads": threads, "env": env}


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    rate: str | int | float | None = "unshaped",
    emulator: NetworkEmulator | None = None,
    strict: bool = False,
    timeout: float = 600.0,
    pg_timeout: float | None = None,
    threads: int | None = 1,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run ``fn(rank, world_size, *args)`` in M Gloo workers behind a link of ``rate``.

    The workers run in a child process ``ip netns exec NS python -m signsgd.bench._runner``
    that calls :func:`signsgd.distributed.launch.spawn`; ``fn`` and ``args`` are pickled to
    it (``fn`` must be module-level and importable with this process's ``sys.path``).

    Args:
        fn: the worker function.
        world_size: M >= 1.
        args: extra arguments for ``fn``.
        rate: link rate (:func:`parse_rate`); ignored if ``emulator`` is given.
        emulator: an open :class:`NetworkEmulator` to reuse (several launches in one
            namespace); by default a fresh one is made and removed around this call.
        strict: raise :class:`ShapingUnavailableError` instead of running unshaped when
            this machine cannot shape.
        timeout, pg_timeout, threads, env: passed to ``spawn``.

    Raises:
        ValueError: a bad ``rate`` or ``world_size``.
        ShapingUnavailableError: ``strict`` and no root / iproute2.
        signsgd.distributed.launch.WorkerError: a worker failed (re-raised from the child).
        KeyboardInterrupt: Ctrl-C / SIGTERM; the namespace and all workers are gone first.
    """
    check_world_size(world_size)
    rate_bps = emulator.rate_bps if emulator is not None else parse_rate(rate)
    kwargs = _spawn_kwargs(timeout, pg_timeout, threads, env)
    if emulator is None:
        reason = shaping_unavailable_reason()
        if reason is not None:
            if strict:
                raise ShapingUnavailableError(reason)
            note = f"running unshaped on the host loopback: {reason}"
            if rate_bps is not None:
                warnings.warn(f"cannot shape to {format_rate(rate_bps)}: {note}",
                              ShapingUnavailableWarning, stacklevel=2)
            from signsgd.distributed.launch import spawn

            t0 = time.monotonic()
            results = spawn(fn, world_size, args, **kwargs)
            return LaunchResult(results, rate_bps, False, None, note,
                                time.monotonic() - t0)
        with NetworkEmulator(rate_bps) as emu:
            return _launch_in(emu, fn, world_size, args, kwargs)
    if not emulator.created:
        raise ValueError(f"{emulator!r} is not open; use it as a context manager")
    return _launch_in(emulator, fn, world_size, args, kwargs)


def _launch_in(emu: NetworkEmulator, fn: Callable[..., Any], world_size: int,
               args: Sequence[Any], kwargs: dict[str, Any]) -> LaunchResult:
    with tempfile.TemporaryDirectory(prefix="signsgd-netem-") as tmp:
        job = os.path.join(tmp, "job.pkl")
        out = os.path.join(tmp, "out.pkl")
        with open(job, "wb") as f:
            pickle.dump(list(sys.path), f)
            pickle.dump((fn, world_size, tuple(args), kwargs), f)
        cmd = emu.prefix + [sys.executable, "-m", "signsgd.bench._runner", job, out]
        t0 = time.monotonic()
        # Own session: a Ctrl-C in the terminal reaches only us; we then end the whole group.
        proc = subprocess.Popen(cmd, start_new_session=True)
        limit = float(kwargs["timeout"]) + 60.0
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            emu.close()  # kills whatever is left in the namespace
            raise RuntimeError(
                f"the worker launcher in namespace {emu.name} did not finish within "
                f"{limit:g} s (timeout {kwargs['timeout']:g} s + 60 s); killed it and its "
                "workers"
            ) from None
        except BaseException:
            _kill_group(proc)
            emu.close()  # kills whatever is left in the namespace
            raise
        wall = time.monotonic() - t0
        if not os.path.exists(out):
            raise RuntimeError(
                f"the worker launcher in namespace {emu.name} exited {rc} without a result"
            )
        with open(out, "rb") as f:
            ok, payload = pickle.load(f)
    if not ok:
        if isinstance(payload, tuple) and payload and payload[0] == "WorkerError":
            from signsgd.distributed.launch import WorkerError

            raise WorkerError(payload[1], payload[2])
        raise payload
    return LaunchResult(payload, emu.rate_bps, emu.rate_bps is not None, emu.name, "", wall)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m signsgd.bench.netem --rate 100mbit -- CMD ...``: run CMD behind a link.

    CMD runs inside a fresh namespace whose loopback is shaped to the rate (e.g.
    ``torchrun --nproc-per-node 4 train.py``; it must use ``127.0.0.1`` / ``localhost``).
    Returns CMD's exit status; the namespace is removed on every exit path.
    """
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m signsgd.bench.netem",
        description="Run a command inside a network namespace whose loopback is "
                    "rate-limited with tc tbf (needs root and iproute2).")
    p.add_argument("--rate", default="100mbit",
                   help="unshaped, 10gbit, 1gbit, 100mbit, 10Gbit/s, ... (default 100mbit)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command given: python -m signsgd.bench.netem --rate 1gbit -- CMD ...")
    try:
        rate_bps = parse_rate(args.rate)
    except ValueError as exc:
        p.error(str(exc))
    reason = shaping_unavailable_reason()
    if reason is not None:
        p.error(f"cannot shape the network here: {reason}")
    with NetworkEmulator(rate_bps) as emu:
        print(f"[netem] {format_rate(rate_bps)} in namespace {emu.name}", file=sys.stderr)
        proc = subprocess.Popen(emu.prefix + cmd, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            _kill_group(proc)
            raise


if __name__ == "__main__":
    sys.exit(main())
