"""1-bit majority vote across ranks: ``majority_vote`` and the engine the aggregators share.

Algorithm 3 of Bernstein et al. (ICML 2018): each rank sends the signs of its vector, the
verdict is the elementwise sign of their sum, and every rank gets the same ±1 result.

Wire format (DESIGN.md): a coordinate travels as one bit, 1 for a value >= 0 (zero -> +1),
0 for a value < 0, packed little-endian with :func:`signsgd.packing.pack_signs`.

A vote is one *step* of three collectives on the process group, issued in the same order
on every rank:

1. **header** — a fixed-size ``all_gather`` of :data:`HEADER_WORDS` int64 words per rank:
   a protocol tag, the finite flag (does this rank's input hold a NaN/inf?), the layout
   (number of tensors, total numel, dtype, a CRC of every tensor's numel/dtype/shape), the
   step counter, the tie seed and a CRC of the configuration (mode, kind, bucket size).
   Every rank checks the gathered headers the same way, so every rank raises the same
   error in the same step: :class:`ValueError` naming each rank's values when layouts,
   steps, seeds or configurations differ (never a hang, never a silently wrong vote), and
   :class:`~signsgd.distributed.base.NonFiniteGradientError` naming the ranks whose input
   was not finite — before any payload moves, so no rank changes its parameters. Only
   when the headers show a tensor missing on some rank or a layout mismatch, one more
   ``all_gather`` of a per-tensor table (numel, dtype, shape) follows — on every rank,
   since the decision is made from the gathered headers.
2. **signs** — ``mode="sharded"``: the packed signs, padded to ``M·S`` bytes, go out with
   one ``all_to_all_single``; rank ``r`` receives the ``M`` rows of its shard of ``S``
   bytes (``S`` a multiple of 8 so the tally can work on 64-bit words).
   ``mode="allgather"``: one ``all_gather`` of all packed signs.
3. **verdicts** — ``mode="sharded"``: each rank tallies its shard with
   :func:`signsgd.packing.majority_tally` and one ``all_gather`` returns the packed
   verdicts; ``mode="allgather"`` needs no third collective (each rank tallies everything).

Ties (even M) are broken by pseudo-random bits from :func:`tie_bits`, a counter-based hash
of ``(seed, step, word index)``: unbiased (each tie bit is 1 with probability 1/2), equal
on every rank, and independent of the mode and of bucketing, so ``"sharded"`` and
``"allgather"`` give bit-identical verdicts.

Byte accounting (:func:`vote_nbytes`): payload bytes this rank sends to / receives from
*other* ranks, assuming each collective moves each block once between each pair of ranks
(direct exchange; a ring all-gather moves the same bytes per rank). For ``d`` coordinates
and ``M`` ranks with ``S = 8·ceil(ceil(ceil(d/8)/8)/M)``:
``sharded``: sent = received = ``2·(M−1)·S + (M−1)·8·HEADER_WORDS`` ≈ 2·(M−1)/M · d/8;
``allgather``: sent = received = ``(M−1)·P + (M−1)·8·HEADER_WORDS`` with
``P = 8·ceil(ceil(d/8)/8)``. With ``M = 1`` nothing moves (0 bytes) and no collective runs.

Concurrency: the votes on one process group run one at a time, in the order the calls
were made — :func:`vote_async` on the group's engine thread, a synchronous call
(:func:`majority_vote`, the aggregators) on the caller's thread when nothing is queued,
else behind the queue. So :func:`vote_async` can be called from a DDP comm hook (several
buckets in flight) while the collectives of different votes still go out in the same
order on every rank — chaining collectives inside ``Future.then`` callbacks would let
Gloo's worker threads reorder them. Other collectives on the same group must not run
concurrently from other threads.

Reference: Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed Optimisation
for Non-Convex Problems. ICML 2018 (Algorithm 3); Bernstein, Zhao, Azizzadenesheli,
Anandkumar. signSGD with Majority Vote is Communication Efficient and Fault Tolerant.
ICLR 2019.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from signsgd.distributed.base import NonFiniteGradientError
from signsgd.packing import _buffer as _scratch
from signsgd.packing import (
    majority_tally,
    pack_signs,
    pack_signs_finite,
    packed_nbytes,
    unpack_signs,
)

if TYPE_CHECKING:
    from signsgd.distributed.adversary import Adversary

__all__ = [
    "CollectiveError",
    "HEADER_WORDS",
    "MODES",
    "majority_vote",
    "vote_async",
    "vote_nbytes",
    "shard_nbytes",
    "tie_bits",
]

#: int64 words in the per-rank header of every step.
HEADER_WORDS = 12
#: the vote modes.
MODES = ("sharded", "allgather")

_MAGIC = 0x5167_5347_0001  # "SgSG" + protocol version 1
_MASK64 = (1 << 64) - 1

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.int16, torch.int32, torch.int64,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


def _dtype_code(dtype: torch.dtype) -> int:
    code = _DTYPE_CODE.get(dtype)
    if code is None:
        raise TypeError(
            f"cannot vote on dtype {dtype}; supported: {', '.join(str(d) for d in _DTYPES)}"
        )
    return code


def _dtype_name(code: int) -> str:
    if 0 <= code < len(_DTYPES):
        return str(_DTYPES[code]).replace("torch.", "")
    return "none" if code < 0 else f"code{code}"


# --------------------------------------------------------------------------- random bits
def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser on Python ints (exact 64-bit arithmetic)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 words viewed as uint64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def random_words(key: int, start: int, nwords: int, device: torch.device | str = "cpu") -> Tensor:
    """``nwords`` pseudo-random 64-bit words, as ``8·nwords`` uint8 bytes (little-endian).

    Word ``k`` is ``splitmix64(key' + start + k)`` with ``key' = splitmix64(key)``: a
    counter-based generator, so any slice can be drawn without drawing what precedes it,
    on any device, with the same result.

    Args:
        key: any Python int (reduced mod 2**64).
        start: index of the first word.
        nwords: number of words (>= 0).
        device: where the result lives.

    Returns:
        A flat ``torch.uint8`` tensor of ``8·nwords`` bytes.
    """
    if nwords < 0 or start < 0:
        raise ValueError(f"random_words needs start >= 0 and nwords >= 0, got {start}, {nwords}")
    base = _splitmix64(key & _MASK64)
    x = torch.arange(start, start + nwords, dtype=torch.int64, device=device)
    x += _signed(base + 0x9E3779B97F4A7C15)
    x = (x ^ _lsr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _lsr(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _lsr(x, 31)
    return x.view(torch.uint8)


def _tie_key(seed: int, step: int) -> int:
    return _splitmix64((_splitmix64(seed & _MASK64) ^ (step & _MASK64)) + 0x7469_6573)


def tie_bits(seed: int, step: int, start_word: int, nwords: int,
             device: torch.device | str = "cpu") -> Tensor:
    """Packed tie-breaking bits of a vote: ``8·nwords`` bytes for words ``start_word…``.

    Bit ``i`` of byte ``j`` breaks a tie at coordinate ``8·(8·start_word + j) + i`` of the
    step's flat vector (1 -> +1, 0 -> −1). Every rank draws the same bits from
    ``(seed, step)``; each bit is 1 with probability 1/2, so the tie-break is unbiased.

    Example:
        >>> tie_bits(0, 0, 0, 1).shape
        torch.Size([8])
    """
    return random_words(_tie_key(seed, step), start_word, nwords, device)


# --------------------------------------------------------------------------- sizes
def _words(nbytes: int) -> int:
    return (nbytes + 7) // 8


def shard_nbytes(numel: int, world_size: int) -> int:
    """Bytes of packed signs one rank owns in ``mode="sharded"``: ``S = 8·⌈⌈⌈d/8⌉/8⌉/M⌉``."""
    if numel < 0 or world_size < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got {numel}, {world_size}")
    return 8 * -(-_words(packed_nbytes(numel)) // world_size)


def vote_nbytes(numel: int, world_size: int, mode: str = "sharded", *,
                header: bool = True) -> tuple[int, int]:
    """Payload bytes ``(sent, received)`` of one rank in one vote of ``numel`` coordinates.

    Counts what this rank sends to and receives from the other ``M − 1`` ranks (see the
    module docstring): ``sharded``: ``2·(M−1)·S``; ``allgather``: ``(M−1)·P``; plus the
    header ``(M−1)·8·HEADER_WORDS`` when ``header``. Zero for ``M = 1``. Sent equals
    received for both modes.

    Example:
        >>> vote_nbytes(1_000_000, 4, header=False)
        (187536, 187536)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if numel < 0 or world_size < 1:
        raise ValueError(f"need numel >= 0 and world_size >= 1, got {numel}, {world_size}")
    m = world_size
    if m == 1:
        return (0, 0)
    if numel == 0:
        payload = 0
    elif mode == "sharded":
        payload = 2 * (m - 1) * shard_nbytes(numel, m)
    else:
        payload = (m - 1) * 8 * _words(packed_nbytes(numel))
    total = payload + ((m - 1) * 8 * HEADER_WORDS if header else 0)
    return (total, total)


# --------------------------------------------------------------------------- collectives
def _world(group: Any) -> tuple[int, int]:
    """(rank, world size) of ``group``; (0, 1) without an initialised default group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process "
            f"group it was asked to vote in"
        )
    return rank, dist.get_world_size(group)


def _header_device(group: Any, device: torch.device | None) -> torch.device:
    """CPU for Gloo (and others); the data's CUDA device for NCCL."""
    if device is not None and device.type == "cuda" and dist.get_backend(group) == "nccl":
        return device
    return torch.device("cpu")


class CollectiveError(RuntimeError):
    """A collective of a vote or aggregator step failed (a peer died or timed out)."""


def _failed(what: str, group: Any, exc: BaseException) -> CollectiveError:
    rank, m = _world(group)
    return CollectiveError(
        f"{what} failed on rank {rank} of {m} ({type(exc).__name__}: {exc}); a peer process "
        f"probably died, or did not make the same call within the process group's timeout"
    )


def _all_gather(out: Tensor, inp: Tensor, group: Any) -> None:
    """``all_gather`` into one tensor; a failure raises :class:`CollectiveError`."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        fn(out, inp, group=group)
    except RuntimeError as exc:
        raise _failed("all_gather", group, exc) from exc


def all_to_all(out: Tensor, inp: Tensor, group: Any) -> None:
    """``all_to_all_single`` with equal splits; a failure raises :class:`CollectiveError`."""
    try:
        dist.all_to_all_single(out, inp, group=group)
    except RuntimeError as exc:
        raise _failed("all_to_all_single", group, exc) from exc


def all_reduce(t: Tensor, group: Any) -> None:
    """Sum ``all_reduce`` in place; a failure raises :class:`CollectiveError`."""
    try:
        dist.all_reduce(t, group=group)
    except RuntimeError as exc:
        raise _failed("all_reduce", group, exc) from exc


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Entry:
    """One tensor of a step's layout: numel, dtype and shape."""

    numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def entry_of(t: Tensor) -> Entry:
    """The :class:`Entry` describing ``t`` (raises ``TypeError`` for unsupported dtypes)."""
    _dtype_code(t.dtype)
    return Entry(t.numel(), t.dtype, tuple(t.shape))


def _crc(obj: Any) -> int:
    return zlib.crc32(repr(obj).encode())


@dataclass
class Agreed:
    """The layout every rank agreed on: ``entries[i]`` is ``None`` when tensor ``i`` is
    absent on every rank; ``slow`` says the extra table exchange ran."""

    entries: list[Entry | None]
    slow: bool
    sent: int
    received: int

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries if e is not None)


def exchange_header(
    entries: Sequence[Entry | None],
    *,
    group: Any,
    finite: bool,
    step: int,
    seed: int,
    config: Any,
    who: str,
    device: torch.device | None = None,
) -> Agreed:
    """Run the step's header protocol (module docstring, 1.) and return the agreed layout.

    Every rank must call it with the same ``config``, ``step`` and ``seed`` and the same
    number of entries; ``None`` marks a tensor this rank has no value for (its layout then
    comes from the ranks that have it). ``device`` is where the data lives: the header
    travels on it under NCCL (which needs CUDA tensors), on the CPU otherwise.

    Raises:
        ValueError: layouts, steps, seeds or configurations differ across ranks (the
            message names each rank's values); raised on every rank.
        NonFiniteGradientError: some rank passed ``finite=False``; raised on every rank.
    """
    rank, m = _world(group)
    present = [e for e in entries if e is not None]
    local_hash = _crc([None if e is None else (e.numel, _dtype_code(e.dtype), e.shape)
                       for e in entries])
    header = [
        _MAGIC,
        1 if finite else 0,
        len(entries),
        sum(e.numel for e in present),
        _dtype_code(present[0].dtype) if present else -1,
        local_hash,
        1 if len(present) == len(entries) else 0,
        max((len(e.shape) for e in present), default=0),
        int(step),
        _signed(int(seed)),
        _crc(config),
        0,
    ]
    if m == 1:
        if not finite:
            raise NonFiniteGradientError(
                f"{who}: non-finite input (NaN or inf) at step {step}; nothing was applied"
            )
        return Agreed(list(entries), False, 0, 0)
    dev = _header_device(group, device)
    local = torch.tensor(header, dtype=torch.int64, device=dev)
    gathered = torch.empty(m * HEADER_WORDS, dtype=torch.int64, device=dev)
    _all_gather(gathered, local, group)
    h = gathered.view(m, HEADER_WORDS).tolist()
    sent = received = (m - 1) * 8 * HEADER_WORDS

    def column(i: int, fmt: Callable[[int], str] = str) -> str:
        return ", ".join(f"rank {r}: {fmt(h[r][i])}" for r in range(m))

    if any(row[0] != _MAGIC for row in h):
        raise ValueError(
            f"{who}: ranks are not running the same protocol (header tags "
            f"{column(0, hex)}); every rank must make the same call in the same order"
        )
    if len({row[10] for row in h}) > 1:
        exc = ValueError(
            f"{who}: configuration differs across ranks (mode / aggregator / bucket size / "
            f"compressor; config CRCs {column(10)})"
        )
        exc.add_note(f"rank {rank} has configuration {config!r}")
        raise exc
    if len({row[8] for row in h}) > 1:
        raise ValueError(f"{who}: step counters differ across ranks ({column(8)})")
    if len({row[9] for row in h}) > 1:
        raise ValueError(f"{who}: tie seeds differ across ranks ({column(9)})")
    if len({row[2] for row in h}) > 1:
        raise ValueError(
            f"{who}: number of tensors differs across ranks ({column(2)}; total numel "
            f"{column(3)})"
        )
    slow = not (all(row[6] == 1 for row in h)
                and len({(row[3], row[4], row[5], row[7]) for row in h}) == 1)
    agreed: list[Entry | None] = list(entries)
    if slow:
        agreed, s2 = _exchange_table(entries, h, group=group, rank=rank, m=m, who=who,
                                     device=dev)
        sent += s2
        received += s2
    bad = [r for r in range(m) if h[r][1] != 1]
    if bad:
        raise NonFiniteGradientError(
            f"{who}: non-finite input (NaN or inf) on rank(s) {bad} at step {step}; "
            f"every rank raises and no rank applies this step"
        )
    return Agreed(agreed, slow, sent, received)


def _exchange_table(
    entries: Sequence[Entry | None], h: list[list[int]], *, group: Any, rank: int, m: int,
    who: str, device: torch.device,
) -> tuple[list[Entry | None], int]:
    """Second header round: every rank's (numel, dtype, shape) per tensor; resolve them."""
    n = len(entries)
    width = 3 + max(row[7] for row in h)
    table = torch.full((n, width), 0, dtype=torch.int64)
    for i, e in enumerate(entries):
        if e is None:
            table[i, 0] = -1
            table[i, 1] = -1
        else:
            table[i, 0] = e.numel
            table[i, 1] = _dtype_code(e.dtype)
            table[i, 2] = len(e.shape)
            if e.shape:
                table[i, 3:3 + len(e.shape)] = torch.tensor(e.shape, dtype=torch.int64)
    gathered = torch.empty(m * n * width, dtype=torch.int64, device=device)
    if n:
        _all_gather(gathered, table.reshape(-1).to(device), group)
    rows = gathered.view(m, n, width).tolist() if n else []
    resolved: list[Entry | None] = []
    problems: list[str] = []
    for i in range(n):
        seen: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        for r in range(m):
            numel, code, ndim = rows[r][i][0], rows[r][i][1], rows[r][i][2]
            if numel >= 0:
                seen[r] = (numel, code, tuple(rows[r][i][3:3 + ndim]))
        if not seen:
            resolved.append(None)
            continue
        if len(set(seen.values())) > 1:
            desc = "; ".join(
                f"rank {r}: " + (
                    f"numel={seen[r][0]} dtype={_dtype_name(seen[r][1])} shape={list(seen[r][2])}"
                    if r in seen else "absent")
                for r in range(m)
            )
            problems.append(f"tensor {i}: {desc}")
            continue
        numel, code, shape = next(iter(seen.values()))
        resolved.append(Entry(numel, _DTYPES[code], shape))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"{who}: inputs differ across ranks — " + " | ".join(problems[:5]) + more
        )
    nbytes = (m - 1) * 8 * n * width
    return resolved, nbytes


# --------------------------------------------------------------------------- payload
def vote_flat(
    flat: Tensor,
    *,
    group: Any,
    mode: str,
    seed: int,
    step: int,
    word_offset: int = 0,
    adversary: Adversary | None = None,
    out: Tensor | None = None,
    packed: Tensor | None = None,
) -> tuple[Tensor, int, int]:
    """Phases 2–3 of a vote on a flat vector (the header must have run this step).

    Returns ``(verdict, sent, received)``: the ±1 vote as a flat tensor (written into
    ``out`` when given — it may be ``flat`` itself — else a new tensor of ``flat``'s dtype)
    and the payload bytes moved. ``word_offset`` is the index of the 64-bit word of the
    step's flat vector where ``flat`` starts (for buckets), so ties do not depend on
    bucketing. ``packed``: ``flat``'s signs already packed into the first
    ``ceil(d/8)`` bytes of a uint8 buffer of :func:`_send_nbytes` bytes (else they are
    packed here). The wire buffers are per-thread scratch reused across calls.
    """
    rank, m = _world(group)
    d = flat.numel()
    if out is None:
        out = torch.empty(d, dtype=flat.dtype, device=flat.device)
    if d == 0:
        return out, 0, 0
    nb = packed_nbytes(d)
    total = _send_nbytes(d, m, mode)
    s = total // m if mode == "sharded" and m > 1 else 0
    if packed is None:
        send = _scratch("vote_send", total, torch.uint8, flat.device)
        pack_signs(flat, out=send[:nb])
    else:
        send = packed
    if total > nb:
        send[nb:] = 0
    if adversary is not None:
        send = adversary.corrupt_signs(send, step=step, word_offset=word_offset)
    if m == 1:
        return unpack_signs(send, d, out=out), 0, 0
    if mode == "sharded":
        recv = _scratch("vote_recv", total, torch.uint8, flat.device)
        all_to_all(recv, send, group)
        ties = (tie_bits(seed, step, word_offset + rank * s // 8, s // 8, flat.device)
                if m % 2 == 0 else None)
        verdict = majority_tally(recv.view(m, s), ties,
                                 out=_scratch("vote_verdict", s, torch.uint8, flat.device))
        gathered = _scratch("vote_gathered", total, torch.uint8, flat.device)
        _all_gather(gathered, verdict, group)
        nbytes = 2 * (m - 1) * s
        return unpack_signs(gathered, d, out=out), nbytes, nbytes
    gathered = _scratch("vote_gathered", m * total, torch.uint8, flat.device)
    _all_gather(gathered, send, group)
    ties = tie_bits(seed, step, word_offset, total // 8, flat.device) if m % 2 == 0 else None
    verdict = majority_tally(gathered.view(m, total), ties)
    nbytes = (m - 1) * total
    return unpack_signs(verdict, d, out=out), nbytes, nbytes


def _send_nbytes(numel: int, m: int, mode: str) -> int:
    """Bytes of this rank's packed send buffer: ``M·S`` (sharded) or ``P`` (allgather)."""
    if mode == "sharded" and m > 1:
        return m * shard_nbytes(numel, m)
    return 8 * _words(packed_nbytes(numel))


# --------------------------------------------------------------------------- engine
class _Engine:
    """Runs the votes of one process group one at a time, in call order.

    Asynchronous calls (:func:`vote_async`) go to a daemon thread; a synchronous call made
    while nothing is queued runs at once on the caller's thread (no thread hand-off), and
    otherwise waits its turn behind the queued ones.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], torch.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._state = threading.Lock()  # guards _pending
        self._running = threading.Lock()  # held while a job runs
        self._pending = 0  # jobs submitted or running inline, not finished
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], Any]) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        with self._state:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="signsgd-vote",
                                                daemon=True)
                self._thread.start()
            self._jobs.put((job, fut))
        return fut

    def call(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` now on this thread if the queue is empty, else after the queue."""
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

    def _loop(self) -> None:
        while True:
            job, fut = self._jobs.get()
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
_ENGINES_LOCK = threading.Lock()


def _engine(group: Any) -> _Engine:
    key = id(group) if group is not None else 0
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = _Engine()
    return engine


def _on_stream(job: Callable[[], Any], device: torch.device | None) -> Callable[[], Any]:
    if device is None or device.type != "cuda":
        return job
    stream = torch.cuda.current_stream(device)

    def on_stream() -> Any:
        with torch.cuda.stream(stream):
            return job()
    return on_stream


def run_on_engine(group: Any, job: Callable[[], Any], device: torch.device | None = None
                  ) -> torch.futures.Future:
    """Run ``job()`` on ``group``'s engine thread (FIFO per group); return its future.

    On CUDA the job runs on the caller's current stream.
    """
    return _engine(group).submit(_on_stream(job, device))


def run_now(group: Any, job: Callable[[], Any], device: torch.device | None = None) -> Any:
    """Run ``job()`` in ``group``'s call order and return its result (synchronous)."""
    return _engine(group).call(_on_stream(job, device))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _check_out(out: Tensor | None, like: Tensor, who: str) -> Tensor | None:
    if out is None:
        return None
    if not isinstance(out, Tensor):
        raise TypeError(f"{who}: out must be a tensor, got {type(out).__name__}")
    if (out.numel() != like.numel() or out.dtype != like.dtype or out.device != like.device
            or not out.is_contiguous()):
        raise ValueError(
            f"{who}: out must be a contiguous tensor of {like.numel()} elements, dtype "
            f"{like.dtype} on {like.device}; got {out.numel()} elements, {out.dtype} on "
            f"{out.device}{'' if out.is_contiguous() else ', not contiguous'}"
        )
    return out.view(-1)


def vote_async(
    flat: Tensor,
    *,
    group: Any = None,
    mode: str = "sharded",
    seed: int = 0,
    step: int = 0,
    finite: bool = True,
    adversary: Adversary | None = None,
    out: Tensor | None = None,
) -> torch.futures.Future:
    """Start a majority vote of a flat tensor; the future yields the flat ±1 verdict.

    The engine behind :func:`majority_vote` and the aggregators, for callers that overlap
    communication with computation (the DDP comm hook). Runs the three phases of the
    module docstring on the group's engine thread; votes on one group run in call order.

    .. math:: v_j = \\operatorname{sign}\\Big(\\sum_{r=1}^{M} s_{r,j}\\Big),\\quad
              s_{r,j} = +1 \\text{ if } x_{r,j} \\ge 0 \\text{ else } -1

    with ties (even M) broken by :func:`tie_bits` ``(seed, step)``.

    Args:
        flat: 1-D tensor of a supported real dtype; the same numel and dtype on every rank.
        group: process group (``None``: the default group, or a world of one process when
            ``torch.distributed`` is not initialised).
        mode: ``"sharded"`` or ``"allgather"``.
        seed: tie-breaking seed, the same on every rank.
        step: step counter, the same on every rank (ties differ from step to step).
        finite: ``False`` when this rank's input holds a NaN or inf (the caller checks);
            then every rank's future raises :class:`NonFiniteGradientError`.
        adversary: a Byzantine attack applied to the packed signs this rank sends.
        out: optional contiguous tensor (numel and dtype of ``flat``; may be ``flat``
            itself) that receives the verdict, to avoid a fresh allocation per call.

    Returns:
        ``torch.futures.Future`` of a ±1 tensor shaped like ``flat`` with its dtype,
        identical on every rank. It raises ``ValueError`` (numel, dtype, step, seed or mode
        differ across ranks) or ``NonFiniteGradientError`` on every rank alike.

    Example:
        >>> vote_async(torch.tensor([0.5, -2.0, 0.0])).wait()   # one process: signs
        tensor([ 1., -1.,  1.])
    """
    _check_mode(mode)
    _check_int("seed", seed)
    _check_int("step", step)
    if not isinstance(flat, Tensor) or flat.dim() != 1:
        raise ValueError(
            f"vote_async needs a 1-D tensor, got "
            f"{tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__}"
        )
    entry = entry_of(flat)
    dst = _check_out(out, flat, "vote_async")
    _world(group)  # fail early (on the caller's thread) for a bad group

    def job() -> Tensor:
        exchange_header([entry], group=group, finite=bool(finite), step=step, seed=seed,
                        config=("vote", mode), who="majority_vote", device=flat.device)
        verdict, _, _ = vote_flat(flat, group=group, mode=mode, seed=seed, step=step,
                                  adversary=adversary, out=dst)
        return verdict

    return run_on_engine(group, job, flat.device)


def majority_vote(
    t: Tensor,
    group: Any = None,
    mode: str = "sharded",
    *,
    seed: int = 0,
    step: int | None = None,
    adversary: Adversary | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Elementwise majority of the signs of ``t`` across the ranks of ``group``.

    .. math::
        \\operatorname{vote}(t)_j
        = \\operatorname{sign}\\Big(\\sum_{r} \\operatorname{sign}(t_{r,j})\\Big)

    with zero counted as +1 and ties (even number of ranks) broken by pseudo-random bits
    every rank draws identically from ``(seed, step)``. 1 bit per coordinate each way.

    Args:
        t: a real tensor, same numel, shape and dtype on every rank.
        group: process group (``None``: default group; no group needed for one process).
        mode: ``"sharded"`` (default; each rank tallies 1/M of the coordinates) or
            ``"allgather"`` (each rank gathers all signs and tallies everything).
        seed: tie-breaking seed, the same on every rank.
        step: step counter for the tie bits; ``None`` uses a per-process call counter for
            ``(group, mode, seed)``, which stays in step when every rank makes the same calls.
        adversary: Byzantine attack on the signs this rank sends
            (:mod:`signsgd.distributed.adversary`).
        out: optional contiguous tensor of ``t``'s numel and dtype that receives the
            verdict (it may be ``t`` itself, like an in-place ``all_reduce``); saves the
            allocation of a fresh result, which dominates for large ``t``.

    Returns:
        A ±1 tensor of ``t``'s shape and dtype (``out`` when given, viewed as ``t``'s
        shape), identical on every rank.

    Raises:
        ValueError: ``t``'s numel, shape or dtype (or ``mode``, ``seed``, ``step``) differ
            across ranks — raised on every rank with each rank's values.
        NonFiniteGradientError: ``t`` holds a NaN or inf on some rank — on every rank.

    Example:
        >>> majority_vote(torch.tensor([0.5, -2.0, 0.0]))   # one process: sign, 0 -> +1
        tensor([ 1., -1.,  1.])

    Reference: Bernstein et al., signSGD, ICML 2018, Algorithm 3.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"majority_vote needs a tensor, got {type(t).__name__}")
    _check_mode(mode)
    flat = t.reshape(-1)
    entry = entry_of(t)
    dst = _check_out(out, t, "majority_vote")
    _check_int("seed", seed)
    _world(group)
    if step is None:
        key = (id(group) if group is not None else 0, mode, seed)
        with _ENGINES_LOCK:
            step = _CALLS.get(key, 0)
            _CALLS[key] = step + 1
    _check_int("step", step)

    def job() -> Tensor:
        # Pack first, checking finiteness in the same pass; the flag still travels in the
        # header, before any payload.
        _, m = _world(group)
        send = _scratch("vote_send", _send_nbytes(flat.numel(), m, mode), torch.uint8,
                        flat.device)
        _, finite = pack_signs_finite(flat, out=send[:packed_nbytes(flat.numel())])
        exchange_header([entry], group=group, finite=finite, step=step, seed=seed,
                        config=("vote", mode), who="majority_vote", device=t.device)
        verdict, _, _ = vote_flat(flat, group=group, mode=mode, seed=seed, step=step,
                                  adversary=adversary, out=dst, packed=send)
        return verdict

    result = run_now(group, job, t.device)
    return (out if out is not None else result).view(t.shape)


_CALLS: dict[tuple[int, str, int], int] = {}
