"""Network emulator: run M Gloo workers (or any command) behind a rate-limited loopback.

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

Command line: ``python -m benchmarks.netem --rate 100mbit -- CMD ...`` (from the repository
root) runs any command (e.g. ``torchrun --standalone ...`` talking over 127.0.0.1) behind the
shaped loopback. :func:`launch` runs its workers through the same entry point, this file run
by its path with ``--child JOB OUT`` inside the namespace (so from any folder).

Example:
    >>> format_rate(parse_rate("2.5 Gbit/s"))
    '2.5 Gbit/s'
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = [
    "LaunchResult",
    "NetworkEmulator",
    "ShapingUnavailableError",
    "ShapingUnavailableWarning",
    "check_world_size",
    "format_rate",
    "launch",
    "list_namespaces",
    "main",
    "namespace_pids",
    "parse_rate",
    "probe_throughput",
    "read_lo_bytes",
    "shaping_unavailable_reason",
    "sweep_stale_namespaces",
]

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

    Returns:
        The rate in bits per second, or ``None`` for unshaped.

    Raises:
        ValueError: the value cannot be parsed (``"fast"``, ``"10 parsecs"``), is not
            positive, is below 8 kbit/s (tc's token bucket cannot shape that with a 256 kB
            burst in useful time), or uses ``bps`` (tc reads ``bps`` as *bytes*/s).

    Example:
        >>> parse_rate("100mbit"), parse_rate("10Gbit/s"), parse_rate("unshaped")
        (100000000, 10000000000, None)
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
    """Human form of a rate in bits/s: ``None`` → ``"unshaped"``, 1e9 → ``"1 Gbit/s"``.

    Example:
        >>> format_rate(10**9), format_rate(None)
        ('1 Gbit/s', 'unshaped')
    """
    if bps is None:
        return "unshaped"
    for div, name in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if bps >= div:
            return f"{bps / div:g} {name}bit/s"
    return f"{bps:g} bit/s"


def check_world_size(world_size: Any) -> int:
    """Return ``world_size`` if it is an int >= 1, else raise ``ValueError`` naming it.

    Example:
        >>> check_world_size(4)
        4
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"number of workers M must be an integer >= 1, got {world_size!r}")
    return world_size


# ------------------------------------------------------------------------------- the tools
def shaping_unavailable_reason() -> str | None:
    """Why this machine cannot shape a namespace's loopback, or ``None`` if it can.

    Example:
        >>> reason = shaping_unavailable_reason()   # None with root and iproute2
        >>> reason is None or "root" in reason or "iproute2" in reason or "Linux" in reason
        True
    """
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


def _tool(tool: str) -> str:
    return _which(tool) or tool


def _run_checked(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed: '{' '.join(cmd)}' exited {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def _ip_netns(*args: str) -> str:
    """stdout of ``ip netns ARGS`` ('' without iproute2)."""
    if _which("ip") is None:
        return ""
    return subprocess.run([_tool("ip"), "netns", *args], capture_output=True, text=True,
                          timeout=30).stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces on this machine (``ip netns list``).

    Example:
        >>> isinstance(list_namespaces(), list)
        True
    """
    return [line.split()[0] for line in _ip_netns("list").splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Pids of the processes inside namespace ``name`` (``ip netns pids``).

    Example:
        >>> namespace_pids("signsgd-no-such-namespace")
        []
    """
    return [int(x) for x in _ip_netns("pids", name).split() if x.isdigit()]


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

    Example:
        >>> min(read_lo_bytes()) >= 0
        True
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
    """Delete ``signsgd-<pid>-<n>`` namespaces whose creating process is dead; return them.

    Example:
        >>> isinstance(sweep_stale_namespaces(), list)
        True
    """
    removed = []
    for name in list_namespaces():
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)-(\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace_processes(name)
            _ip_netns("delete", name)
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


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=3.0)
            return
        except subprocess.TimeoutExpired:
            continue


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
        ValueError: a bad ``rate`` or ``mtu``.
        ShapingUnavailableError: on entering, if :func:`shaping_unavailable_reason` says so.
        RuntimeError: an ``ip`` / ``tc`` command failed (the message holds its stderr).

    Attributes:
        name: the namespace name, ``signsgd-<pid>-<n>``.
        rate_bps: the parsed rate (``None`` unshaped).
        created: whether the namespace exists now.

    Example:
        >>> emu = NetworkEmulator("1gbit")      # nothing is created until it is entered
        >>> emu.rate_bps, emu.created, emu.name.startswith("signsgd-")
        (1000000000, False, True)
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
        return [_tool("ip"), "netns", "exec", self.name]

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
        ip, tc = _tool("ip"), _tool("tc")
        try:
            _run_checked([ip, "netns", "add", self.name], "creating the namespace")
            _run_checked([ip, "-n", self.name, "link", "set", "lo", "mtu", str(self.mtu),
                          "up"], "bringing up loopback")
            if self.rate_bps is not None:
                _run_checked(
                    [tc, "-n", self.name, "qdisc", "add", "dev", "lo", "root", "tbf",
                     "rate", f"{self.rate_bps}bit", "burst", self.burst,
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
                proc = subprocess.run([_tool("ip"), "netns", "delete", self.name],
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
        return _run_checked([_tool("tc"), "-n", self.name, "qdisc", "show", "dev", "lo"],
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

    Returns:
        ``(seconds, bytes received)``; ``8·bytes/seconds`` is the link's throughput for one
        flow (the tbf burst lets the first 256 kB through at loopback speed).

    Raises:
        ValueError: ``emulator`` is not open, or ``nbytes`` is not an int >= 1.

    Example:
        >>> probe_throughput(NetworkEmulator("1gbit"))     # open it first (needs root)
        Traceback (most recent call last):
        ...
        ValueError: NetworkEmulator('1 Gbit/s', name=...) is not open; use it as a context manager
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
    """What :func:`launch` returns.

    Example:
        >>> LaunchResult([0], None, False, None).shaped
        False
    """

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

    The workers run in a child process ``ip netns exec NS python .../netem.py --child`` that
    calls :func:`signsgd.distributed.launch.spawn`; ``fn`` and ``args`` are pickled to it
    together with this process's ``sys.path`` (``fn`` must be module-level and importable
    with it, e.g. ``benchmarks.loops.tta_worker``).

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

    Returns:
        A :class:`LaunchResult`: every rank's result, and whether the link was shaped.

    Raises:
        ValueError: a bad ``rate`` or ``world_size``, or ``emulator`` is not open.
        ShapingUnavailableError: ``strict`` and no root / iproute2.
        signsgd.distributed.launch.WorkerError: a worker failed (re-raised from the child).
        KeyboardInterrupt: Ctrl-C / SIGTERM; the namespace and all workers are gone first.

    Example:
        >>> import operator
        >>> launch(operator.add, 1).results       # rank + world_size on the one rank
        [1]
    """
    check_world_size(world_size)
    rate_bps = emulator.rate_bps if emulator is not None else parse_rate(rate)
    kwargs = {"timeout": timeout, "pg_timeout": pg_timeout, "threads": threads, "env": env}
    if emulator is not None:
        if not emulator.created:
            raise ValueError(f"{emulator!r} is not open; use it as a context manager")
        return _launch_in(emulator, fn, world_size, args, kwargs)
    reason = shaping_unavailable_reason()
    if reason is None:
        with NetworkEmulator(rate_bps) as emu:
            return _launch_in(emu, fn, world_size, args, kwargs)
    if strict:
        raise ShapingUnavailableError(reason)
    note = f"running unshaped on the host loopback: {reason}"
    if rate_bps is not None:
        warnings.warn(f"cannot shape to {format_rate(rate_bps)}: {note}",
                      ShapingUnavailableWarning, stacklevel=2)
    from signsgd.distributed.launch import spawn

    t0 = time.monotonic()
    results = spawn(fn, world_size, args, **kwargs)
    return LaunchResult(results, rate_bps, False, None, note, time.monotonic() - t0)


def _launch_in(emu: NetworkEmulator, fn: Callable[..., Any], world_size: int,
               args: Sequence[Any], kwargs: dict[str, Any]) -> LaunchResult:
    with tempfile.TemporaryDirectory(prefix="signsgd-netem-") as tmp:
        job = os.path.join(tmp, "job.pkl")
        out = os.path.join(tmp, "out.pkl")
        with open(job, "wb") as f:
            pickle.dump(list(sys.path), f)
            pickle.dump((fn, world_size, tuple(args), kwargs), f)
        cmd = emu.prefix + [sys.executable, os.path.abspath(__file__), "--child", job, out]
        t0 = time.monotonic()
        # Own session: a Ctrl-C in the terminal reaches only us; we then end the whole group.
        proc = subprocess.Popen(cmd, start_new_session=True)
        limit = float(kwargs["timeout"]) + 60.0
        try:
            rc = proc.wait(timeout=limit)
        except BaseException as exc:
            _kill_group(proc)
            emu.close()  # kills whatever is left in the namespace
            if isinstance(exc, subprocess.TimeoutExpired):
                raise RuntimeError(
                    f"the worker launcher in namespace {emu.name} did not finish within "
                    f"{limit:g} s (timeout {kwargs['timeout']:g} s + 60 s); killed it and "
                    "its workers") from None
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


def _child(job_path: str, out_path: str) -> int:
    """The launcher inside the namespace: run the pickled job, pickle its outcome.

    ``job_path`` holds the parent's ``sys.path`` then ``(fn, world_size, args, kwargs)``;
    ``out_path`` receives ``(True, results)``, ``(False, exception)`` or
    ``(False, ("WorkerError", message, failures))``.
    """
    # SIGTERM unwinds through spawn's finally (which terminates the workers), then exits.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with open(job_path, "rb") as f:
        for p in reversed(pickle.load(f)):
            if p not in sys.path:
                sys.path.insert(0, p)
        fn, world_size, args, kwargs = pickle.load(f)
    from signsgd.distributed.launch import WorkerError, spawn

    try:
        outcome: tuple[bool, object] = (True, spawn(fn, world_size, args, **kwargs))
    except WorkerError as exc:  # its __init__ takes two arguments: send them
        outcome = (False, ("WorkerError", str(exc), exc.failures))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        outcome = (False, exc)
    with open(out_path, "wb") as f:
        pickle.dump(outcome, f)
    return 0


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.netem --rate 100mbit -- CMD ...``: run CMD behind a shaped link.

    CMD runs inside a fresh namespace whose loopback is shaped to the rate (e.g.
    ``torchrun --nproc-per-node 4 train.py``; it must use ``127.0.0.1`` / ``localhost``).
    The namespace is removed on every exit path.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        CMD's exit status.

    Raises:
        SystemExit: a bad rate, no command, or no root / iproute2 (status 2, with a message).

    Example:
        >>> main(["--rate", "fast", "--", "true"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.netem",
        description="Run a command inside a network namespace whose loopback is "
                    "rate-limited with tc tbf (needs root and iproute2).")
    p.add_argument("--rate", default="100mbit",
                   help="unshaped, 10gbit, 1gbit, 100mbit, 10Gbit/s, ... (default 100mbit)")
    p.add_argument("--child", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = p.parse_args(argv)
    if args.child:
        return _child(*args.child)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command given: python -m benchmarks.netem --rate 1gbit -- CMD ...")
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
