"""One FIFO of communication jobs per process group, so collectives never interleave.

Every step of a reducer is a job of several collectives. The jobs of one group run one at
a time, in the order they were submitted: :func:`submit` queues a job on the group's
daemon thread and returns a future (the DDP hook, which has several buckets in flight);
:func:`run` runs a job on the caller's thread when nothing is queued, else waits its turn
(the optimisers). So collectives of different steps go out in the same order on every
rank — chaining collectives inside ``Future.then`` callbacks would let Gloo's worker
threads reorder them. Other collectives on the same group must not run concurrently from
other threads; the DDP hook therefore votes on a group of its own.

On CUDA a job runs on a stream of its own (one per device): it waits for an event recorded
on the caller's current stream at submission, and the caller's stream waits for an event
recorded when the job is done — no device-wide synchronisation; the tensors of the result
are marked as used by the caller's stream (``record_stream``), and :func:`submit` returns
a CUDA-aware future.

Example:
    >>> run(None, lambda: 1 + 1)
    2
    >>> submit(None, lambda: 3).wait()
    3
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["submit", "run"]


class _Engine:
    """The jobs of one process group: a daemon thread for queued ones, inline otherwise."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], torch.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._state = threading.Lock()   # guards _pending and _thread
        self._running = threading.Lock()  # held while a job runs
        self._pending = 0                # jobs submitted or running inline, not finished
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], Any], devices: list[torch.device] | None = None
               ) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future(devices=devices)
        with self._state:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="signsgd-engine",
                                                daemon=True)
                self._thread.start()
            self._jobs.put((job, fut))
        return fut

    def run(self, job: Callable[[], Any]) -> Any:
        with self._state:
            inline = self._pending == 0
            if inline:
                self._pending += 1
                self._running.acquire()
        if not inline:
            return self.submit(job).wait()
        try:
            return job()
        finally:
            self._running.release()
            with self._state:
                self._pending -= 1

    def stop(self, timeout: float = 10.0) -> None:
        """Let the thread finish its queued jobs and return (at interpreter exit: a thread
        still running a future's callback while Python shuts down aborts the process)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put((None, None))  # type: ignore[arg-type]
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job, fut = self._jobs.get()
            if job is None:  # stop()
                return
            with self._running:
                try:
                    result = job()
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    error: BaseException | None = exc
                else:
                    error = None
            with self._state:
                self._pending -= 1
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)


_ENGINES: dict[int, _Engine] = {}
_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LOCK:
        engines = list(_ENGINES.values())
    for engine in engines:
        engine.stop()


def _engine(group: Any) -> _Engine:
    key = id(group) if group is not None else 0
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = _Engine()
    return engine


_STREAMS: dict[torch.device, Any] = {}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    values = getattr(obj, "__dict__", None)
    return _tensors(values) if isinstance(values, dict) else []


def _on_stream(job: Callable[[], Any], device: torch.device | None) -> Callable[[], Any]:
    """``job`` run on the device's communication stream, ordered after the caller's work so
    far and before the caller's later work by events (see the module docstring)."""
    if device is None or device.type != "cuda":
        return job
    caller = torch.cuda.current_stream(device)
    with _LOCK:
        comm = _STREAMS.get(device)
        if comm is None:
            comm = _STREAMS[device] = torch.cuda.Stream(device)
    ready = torch.cuda.Event()
    ready.record(caller)

    def on_stream() -> Any:
        comm.wait_event(ready)
        with torch.cuda.stream(comm):
            result = job()
            done = torch.cuda.Event()
            done.record(comm)
        caller.wait_event(done)
        for t in _tensors(result):
            if t.is_cuda:
                t.record_stream(caller)
        return result
    return on_stream


def submit(group: Any, job: Callable[[], Any], device: torch.device | None = None
           ) -> torch.futures.Future:
    """Queue ``job()`` on ``group``'s engine thread; the future yields its result (on CUDA a
    future aware of ``device``).

    Example:
        >>> submit(None, lambda: "done").wait()
        'done'
    """
    cuda = [device] if device is not None and device.type == "cuda" else None
    return _engine(group).submit(_on_stream(job, device), cuda)


def run(group: Any, job: Callable[[], Any], device: torch.device | None = None) -> Any:
    """Run ``job()`` in ``group``'s order (inline when nothing is queued); its result.

    Example:
        >>> run(None, lambda: 6 * 7)
        42
    """
    return _engine(group).run(_on_stream(job, device))
