"""1-bit packing of signs: ``pack_signs`` / ``unpack_signs`` and the packed majority tally.

Wire convention: bit = 1 for a value >= 0 (so +0.0, -0.0 and +inf give 1), bit = 0 for a
value < 0 or NaN (``NaN >= 0`` is false, as in numpy); little-endian within a byte, i.e.
byte-for-byte equal to ``numpy.packbits(x >= 0, bitorder="little")``. The pad bits of the
last byte are 0. Only little-endian hosts are supported: importing this module on any other
raises ImportError (the torch kernels view 8 bytes as one int64 word).

Two kernel families give identical outputs byte for byte; :func:`_numpy_kernel` is the one
place that chooses between them:

- numpy (CPU, float32/float64 values, and the tally's bytes): numpy ufuncs on zero-copy
  views, in cache-sized chunks. numpy's compare-to-bool is vectorised where torch's is not,
  and numpy is single-threaded, so there is no intra-op thread barrier per chunk, which on
  a loaded machine costs more than the work itself (benchmarks/bench_packing.py). Pack is
  ``x >= 0`` into a bool buffer and ``numpy.packbits``; unpack gathers rows of a (256, 8)
  table of ±1 *in the output dtype* by byte straight into the output (``unpack_scaled_signs``
  uses the same with ±scale).
- torch (any device and dtype): pack is ``x >= 0`` into a buffer of the input dtype (the
  vectorised kernel), narrowed to bools; 8 bools viewed as one int64 word;
  ``word * 0x0102040810204080`` gathers byte ``k``'s bit into bit ``56 + k``, so the top
  byte of the product is the packed byte. Unpack maps a byte through a 256-entry int64
  table to eight int8 values ±1 (byte ``k`` of the word is the sign of element ``k``),
  widened into the output.

The tally adds the M packed rows as bit-sliced binary counters (bitwise half/full adders on
whole words, in a pairwise tree), then compares the counts with M/2 bitwise. CPU scratch
buffers come from :func:`signsgd.scratch.thread_scratch`.

Example:
    >>> import torch
    >>> x = torch.tensor([1.0, -2.0, 0.0])
    >>> unpack_signs(pack_signs(x), 3)
    tensor([ 1., -1.,  1.])
"""

from __future__ import annotations

import operator
import sys

import numpy as np
import torch
from torch import Tensor

from signsgd.scratch import thread_scratch

if sys.byteorder != "little":
    raise ImportError(
        f"signsgd.packing supports little-endian hosts only; this host is {sys.byteorder}-endian"
    )

__all__ = ["pack_signs", "unpack_signs", "packed_nbytes", "majority_tally", "pack_signs_abs",
           "pack_signs_nonzero", "unpack_scaled_signs", "sum_scaled_signs"]

# Input dtypes whose ``x >= 0`` is well defined, and the output dtypes of unpack_signs.
_PACKABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
             torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_UNPACKABLE = _PACKABLE[:-1]

# Elements per chunk and per CPU thread of the torch kernels (each thread's share of the
# intermediates stays in its L2; scaling with the thread count keeps the number of parallel
# regions, each a barrier, low), and per chunk on other devices (bounded scratch memory).
_CPU_CHUNK = 1 << 19
_DEVICE_CHUNK = 1 << 24
# Elements per chunk of the (single-threaded) numpy pack kernel; its bool buffer fills L2.
_NUMPY_PACK_CHUNK = 1 << 20
# Elements per block of sum_scaled_signs (its output and one row's values stay in L2).
_SUM_BLOCK = 1 << 15
# Bytes per CPU thread in one chunk of the (M, words) tally input.
_TALLY_CHUNK_BYTES = 1 << 19

# Byte k of (8 bools viewed as a little-endian int64) * _GATHER lands in bit 56 + k.
_GATHER = 0x0102040810204080
# CPU kernels through numpy (see the module docstring); False: the torch kernels everywhere.
_NUMPY_ON_CPU = True
# Value dtypes of the numpy pack / unpack kernels.
_NUMPY_DTYPES = (torch.float32, torch.float64)
# (256, 8) bool: entry ``[b, k]`` is bit ``k`` (little-endian) of byte ``b``.
_BIT_TABLE = ((np.arange(256, dtype=np.uint8)[:, None] >> np.arange(8, dtype=np.uint8)) & 1
              ).astype(bool)
_TABLES: dict[torch.device, Tensor] = {}


def _numpy_kernel(values: Tensor | None, *packed: Tensor) -> bool:
    """Whether the numpy kernels run (else the torch ones): the one place that chooses.

    True when ``_NUMPY_ON_CPU`` is set, ``values`` (the unpacked side; None for the tally)
    is float32/float64 and every tensor given is on the CPU.
    """
    tensors = packed if values is None else (values, *packed)
    return (_NUMPY_ON_CPU and (values is None or values.dtype in _NUMPY_DTYPES)
            and all(t.device.type == "cpu" for t in tensors))


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's scratch buffer ``packing.<name>`` (a fresh tensor off the CPU)."""
    return thread_scratch().get(f"packing.{name}", numel, dtype, device)


def packed_nbytes(numel: int) -> int:
    """Number of bytes that ``numel`` packed signs occupy: ``ceil(numel / 8)``.

    Args:
        numel: number of signs, an int >= 0.

    Returns:
        ``(numel + 7) // 8``.

    Example:
        >>> packed_nbytes(17)
        3
    """
    if isinstance(numel, bool):
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    try:
        count = operator.index(numel)
    except TypeError:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}") from None
    if count < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    return (count + 7) // 8


def _describe(x: object) -> str:
    """A tensor's dtype, else the type name (for error messages)."""
    return str(x.dtype) if isinstance(x, Tensor) else type(x).__name__


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), 8))


def _chunk(device: torch.device) -> int:
    return _CPU_CHUNK * _threads() if device.type == "cpu" else _DEVICE_CHUNK


def _check_out(
    out: Tensor, numel: int, dtype: torch.dtype, device: torch.device, what: str
) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out for {what} must have dtype {dtype}, got {out.dtype}")
    if out.numel() != numel:
        raise ValueError(f"out for {what} must have {numel} elements, got {out.numel()}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the input is on {device}")
    if not out.is_contiguous():
        raise ValueError(f"out for {what} must be contiguous, got strides {out.stride()}")


def pack_signs(t: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Pack the signs of ``t`` into a flat ``torch.uint8`` tensor of ``ceil(t.numel()/8)`` bytes.

    Bit ``i`` (little-endian) of byte ``j`` is 1 where ``t.flatten()[8*j + i] >= 0`` and 0
    where it is < 0 or NaN; pad bits of the last byte are 0. Byte-identical to
    ``numpy.packbits(t.numpy() >= 0, bitorder="little")``.

    Args:
        t: a real tensor (float16/bfloat16/float32/float64 or an integer type) of any shape,
            flattened in C order; CPU or CUDA; need not be contiguous.
        out: optional contiguous uint8 tensor of ``ceil(t.numel()/8)`` elements on ``t``'s
            device to write into (no allocation).

    Returns:
        The packed bytes, a 1-D uint8 tensor (``out`` when given).

    Example:
        >>> pack_signs(torch.tensor([1.0, -2.0, 0.0, -0.0, float("-inf")]))
        tensor([13], dtype=torch.uint8)
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"pack_signs expects a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _PACKABLE:
        raise TypeError(
            f"pack_signs cannot pack dtype {t.dtype}; supported: "
            + ", ".join(str(d) for d in _PACKABLE)
        )
    flat = t.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    nbytes = (n + 7) // 8
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=t.device)
    else:
        _check_out(out, nbytes, torch.uint8, t.device, f"pack_signs of {n} elements")
    if n == 0:
        return out
    (_pack_numpy if _numpy_kernel(flat) else _pack_torch)(flat, out.view(-1))
    return out


def _pack_numpy(flat: Tensor, out_flat: Tensor, abs_out: Tensor | None = None,
                nonzero_out: Tensor | None = None) -> bool:
    """CPU float32/float64: numpy's SIMD ``>=`` into a bool buffer, then ``numpy.packbits``.

    Single-threaded, in cache-sized chunks. With ``abs_out`` (a tensor like ``flat``), also
    writes ``|flat|`` there in the same pass; with ``nonzero_out`` (bools like ``flat``),
    ``flat != 0``. Returns whether every value is non-zero (True without ``nonzero_out``).
    """
    n = flat.numel()
    x = flat.detach().resolve_neg().numpy()
    dst = out_flat.numpy()
    absx = None if abs_out is None else abs_out.detach().numpy()
    nz = None if nonzero_out is None else nonzero_out.numpy()
    dense = True
    chunk = min(_NUMPY_PACK_CHUNK, (n + 7) // 8 * 8)  # a multiple of 8
    bools = _scratch("pack_bool", chunk, torch.bool, flat.device).numpy()
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part, b = x[start:stop], bools[: stop - start]
        if absx is not None:
            np.abs(part, out=absx[start:stop])
        if nz is not None:  # while the chunk is in cache
            np.not_equal(part, 0, out=nz[start:stop])
            dense = dense and bool(nz[start:stop].all())
        np.greater_equal(part, 0, out=b)
        dst[start // 8 : (stop + 7) // 8] = np.packbits(b, bitorder="little")  # pads with 0
    return dense


def pack_signs_nonzero(t: Tensor, *, out: Tensor, nonzero_out: Tensor) -> bool:
    """:func:`pack_signs` of ``t`` into ``out`` and ``t != 0`` into ``nonzero_out`` (bools;
    ``-0.0`` is zero); returns whether every value of ``t`` is non-zero.

    One pass over ``t`` on CPU for a contiguous float32/float64 ``t``; elsewhere
    :func:`pack_signs` and ``torch.ne``.

    Example:
        >>> nz, packed = torch.empty(3, dtype=torch.bool), torch.empty(1, dtype=torch.uint8)
        >>> pack_signs_nonzero(torch.tensor([1.5, -0.0, 2.0]), out=packed, nonzero_out=nz), nz
        (False, tensor([ True, False,  True]))
    """
    if not (_numpy_kernel(t) and t.is_contiguous() and t.numel()):
        torch.ne(t.reshape(-1), 0, out=nonzero_out.view(-1))
        pack_signs(t, out=out)
        return bool(nonzero_out.all())
    n = t.numel()
    _check_out(out, (n + 7) // 8, torch.uint8, t.device, f"pack_signs of {n} elements")
    _check_out(nonzero_out, n, torch.bool, t.device, f"nonzero of {n} elements")
    return _pack_numpy(t.reshape(-1), out.view(-1), nonzero_out=nonzero_out.view(-1))


def pack_signs_abs(t: Tensor, *, out: Tensor, abs_out: Tensor) -> Tensor:
    """:func:`pack_signs` of ``t`` into ``out`` and ``torch.abs(t)`` into ``abs_out``.

    One pass over ``t`` on CPU for a contiguous float32/float64 ``t`` (the values the two
    separate calls give, bit for bit); elsewhere the two calls.

    Args:
        t: a tensor :func:`pack_signs` accepts.
        out: contiguous uint8 tensor of ``ceil(t.numel()/8)`` elements on ``t``'s device.
        abs_out: contiguous tensor of ``t.numel()`` elements and ``t``'s dtype and device.

    Returns:
        ``out``.

    Example:
        >>> a = torch.empty(3)
        >>> pack_signs_abs(torch.tensor([1.5, -2.0, 0.0]), out=torch.empty(1, dtype=torch.uint8),
        ...                abs_out=a), a
        (tensor([5], dtype=torch.uint8), tensor([1.5000, 2.0000, 0.0000]))
    """
    if not (_numpy_kernel(t) and t.is_contiguous() and t.numel()):
        torch.abs(t.reshape(-1), out=abs_out.view(-1))
        return pack_signs(t, out=out)
    n = t.numel()
    _check_out(out, (n + 7) // 8, torch.uint8, t.device, f"pack_signs of {n} elements")
    _check_out(abs_out, n, t.dtype, t.device, f"abs of {n} elements")
    _pack_numpy(t.reshape(-1), out.view(-1), abs_out.view(-1))
    return out


def _pack_torch(flat: Tensor, out_flat: Tensor) -> None:
    """Any device and dtype: compare, narrow to bools, gather 8 bools per int64 multiply."""
    n = flat.numel()
    chunk = min(_chunk(flat.device), (n + 7) // 8 * 8)
    cmp_buf = _scratch("pack_cmp", chunk, flat.dtype, flat.device)
    bool_buf = _scratch("pack_bool", chunk, torch.bool, flat.device)
    word_buf = _scratch("pack_word", chunk // 8, torch.int64, flat.device)
    full = n // chunk * chunk
    if full:
        # Hot loop over whole chunks: every view is built once, outside the loop.
        bool_words = bool_buf.view(torch.int64)
        top_bytes = word_buf.view(torch.uint8)[7::8]
        for x_part, out_part in zip(
            flat[:full].split(chunk), out_flat[: full // 8].split(chunk // 8)
        ):
            # ``ge`` into the input's own dtype is a vectorised kernel (into bool it is not);
            # the copy then narrows 1 / 0 to True / False.
            torch.ge(x_part, 0, out=cmp_buf)
            bool_buf.copy_(cmp_buf)
            torch.mul(bool_words, _GATHER, out=word_buf)
            out_part.copy_(top_bytes)
    if full < n:
        c = n - full
        c8 = (c + 7) // 8 * 8
        torch.ge(flat[full:], 0, out=cmp_buf[:c])
        bools = bool_buf[:c8]
        bools[:c].copy_(cmp_buf[:c])
        bools[c:].zero_()  # pad bits are 0
        words = word_buf[: c8 // 8]
        torch.mul(bools.view(torch.int64), _GATHER, out=words)
        out_flat[full // 8 :].copy_(words.view(torch.uint8)[7::8])


def _sign_table(device: torch.device) -> Tensor:
    """(256,) int64: byte ``k`` of entry ``b`` is int8 +1 if bit ``k`` of ``b`` is set, else -1."""
    table = _TABLES.get(device)
    if table is None:
        b = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        bits = (b >> torch.arange(8, dtype=torch.int64)) & 1
        signs = (bits * 2 - 1).to(torch.int8).contiguous()  # (256, 8), row-major
        table = _TABLES[device] = signs.view(torch.int64).reshape(256).to(device)
    return table


def unpack_signs(
    packed: Tensor,
    numel: int,
    dtype: torch.dtype | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Unpack ``numel`` signs from ``packed`` bytes into a ±1 tensor: bit 1 -> +1, bit 0 -> -1.

    Inverse of :func:`pack_signs`: ``unpack_signs(pack_signs(x), x.numel())`` equals
    ``torch.where(x.flatten() >= 0, 1.0, -1.0)``. Extra bytes beyond ``ceil(numel/8)`` are
    ignored.

    Args:
        packed: uint8 tensor (any shape, flattened; CPU or CUDA) of at least
            ``ceil(numel/8)`` bytes, bit order little-endian within a byte.
        numel: number of signs to unpack, an int >= 0.
        dtype: output dtype, a float or signed integer type; default ``torch.float32``, or
            ``out.dtype`` when ``out`` is given.
        out: optional contiguous tensor of ``numel`` elements on ``packed``'s device to write
            into. For large outputs this avoids page-faulting a fresh allocation every call.

    Returns:
        A 1-D tensor of ``numel`` values in {-1, +1} (``out``, in its own shape, when given).

    Example:
        >>> unpack_signs(torch.tensor([5], dtype=torch.uint8), 3)
        tensor([ 1., -1.,  1.])
    """
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be torch.uint8, got {packed.dtype}")
    nbytes = packed_nbytes(numel)
    numel = operator.index(numel)
    if nbytes > packed.numel():
        raise ValueError(
            f"cannot unpack numel={numel} signs from {packed.numel()} bytes (need {nbytes})"
        )
    if dtype is None:
        dtype = out.dtype if isinstance(out, Tensor) else torch.float32
    if dtype not in _UNPACKABLE:
        raise TypeError(
            f"unpack_signs cannot produce dtype {dtype}; supported: "
            + ", ".join(str(d) for d in _UNPACKABLE)
        )
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    else:
        _check_out(out, numel, dtype, packed.device, f"unpack_signs of {numel} signs")
    if numel == 0:
        return out
    src = packed.reshape(-1)[:nbytes]
    if not src.is_contiguous():
        src = src.contiguous()
    dst = out.view(-1)
    if _numpy_kernel(dst, src):
        _unpack_scaled_numpy(src.numpy(), dst.detach().numpy(), 0, numel, 1.0)
    else:
        _unpack_torch(src, dst, numel)
    return out


def _unpack_torch(src: Tensor, dst: Tensor, numel: int) -> None:
    """Any device: bytes -> int32 indices -> int64 table words -> int8 view widened into dst."""
    nbytes = src.numel()
    table = _sign_table(src.device)
    chunk_bytes = min(_chunk(src.device) // 8, nbytes)
    idx_buf = _scratch("unpack_idx", chunk_bytes, torch.int32, src.device)
    word_buf = _scratch("unpack_word", chunk_bytes, torch.int64, src.device)
    whole = numel // 8  # bytes whose 8 bits are all used
    for src_part, dst_part in zip(
        src[:whole].split(chunk_bytes), dst[: whole * 8].split(chunk_bytes * 8)
    ):
        c = src_part.numel()
        idx = idx_buf if c == chunk_bytes else idx_buf[:c]
        words = word_buf if c == chunk_bytes else word_buf[:c]
        idx.copy_(src_part)  # index_select wants int32 / int64 indices
        torch.index_select(table, 0, idx, out=words)
        dst_part.copy_(words.view(torch.int8))  # widen the int8 +-1 to the output dtype
    if whole < nbytes:
        rest = numel - whole * 8
        torch.index_select(table, 0, src[whole:].to(torch.int32), out=word_buf[:1])
        dst[whole * 8 :].copy_(word_buf[:1].view(torch.int8)[:rest])


def unpack_scaled_signs(
    packed: Tensor, start: int, numel: int, scale: float, *, out: Tensor
) -> Tensor:
    """Write ``±scale`` for the ``numel`` bits ``start, start+1, …`` of ``packed`` into ``out``.

    Bit 1 gives ``+scale``, bit 0 gives ``-scale``: the values of
    ``unpack_signs(packed, …)[start:start+numel] * scale`` (a ±1 times a scale is exact),
    in one pass and without a ±1 intermediate. ``start`` need not be a multiple of 8, so the
    segments of one packed vector can be scaled differently.

    Args:
        packed: 1-D uint8 tensor holding at least ``ceil((start + numel) / 8)`` bytes.
        start: index of the first bit (>= 0).
        numel: number of values to write (>= 0).
        scale: a Python float exactly representable in ``out.dtype``.
        out: contiguous floating tensor of ``numel`` elements on ``packed``'s device.

    Returns:
        ``out``.

    Example:
        >>> unpack_scaled_signs(torch.tensor([5], dtype=torch.uint8), 1, 2, 0.5,
        ...                     out=torch.empty(2))
        tensor([-0.5000,  0.5000])
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a torch.uint8 tensor, got {_describe(packed)}")
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(f"out must be a floating torch.Tensor, got {_describe(out)}")
    if start < 0 or numel < 0:
        raise ValueError(f"need start >= 0 and numel >= 0, got {start}, {numel}")
    nbytes = (start + numel + 7) // 8
    if nbytes > packed.numel():
        raise ValueError(
            f"cannot read bits [{start}, {start + numel}) from {packed.numel()} bytes"
        )
    _check_out(out, numel, out.dtype, packed.device, f"unpack_scaled_signs of {numel} signs")
    if numel == 0:
        return out
    dst = out.view(-1)
    if _numpy_kernel(out, packed):
        src = packed.reshape(-1)
        if not src.is_contiguous():
            src = src.contiguous()
        _unpack_scaled_numpy(src.numpy(), dst.detach().numpy(), start, numel, scale)
        return out
    first = start // 8
    signs = unpack_signs(packed.reshape(-1)[first:nbytes], (nbytes - first) * 8, out.dtype)
    torch.mul(signs[start - 8 * first:start - 8 * first + numel], scale, out=dst)
    return out


def sum_scaled_signs(
    rows: list[Tensor], start: int, numel: int, scales: list[float], *, out: Tensor
) -> Tensor:
    """``out = ((±scales[0] + ±scales[1]) + ±scales[2]) + …`` from bits ``start…`` of each row.

    Row ``w`` contributes ``+scales[w]`` where its bit is 1 and ``-scales[w]`` where it is
    0, added in row order: the values of ``Σ_w unpack_signs(rows[w])[start:…] * scales[w]``
    accumulated left to right (each ±scale is exact, each addition rounds as ``+=`` does).
    On CPU (float32/float64) it works in cache-sized blocks, so ``out`` is written once.

    Args:
        rows: one or more 1-D uint8 tensors (packed signs), each with at least
            ``ceil((start + numel) / 8)`` bytes.
        start: index of the first bit; numel: number of values.
        scales: one Python float per row, exactly representable in ``out.dtype``.
        out: contiguous floating tensor of ``numel`` elements.

    Returns:
        ``out``.

    Example:
        >>> rows = [torch.tensor([5], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)]
        >>> sum_scaled_signs(rows, 0, 3, [0.5, 0.25], out=torch.empty(3))
        tensor([ 0.7500, -0.7500,  0.2500])
    """
    if not rows or len(rows) != len(scales):
        raise ValueError(f"need one scale per row (>= 1 row), got {len(rows)} rows and "
                         f"{len(scales)} scales")
    dst = out.view(-1)
    if not _numpy_kernel(out, *rows) or numel == 0:
        unpack_scaled_signs(rows[0], start, numel, scales[0], out=dst)
        if len(rows) > 1:
            tmp = torch.empty_like(dst)
            for row, scale in zip(rows[1:], scales[1:]):
                dst.add_(unpack_scaled_signs(row, start, numel, scale, out=tmp))
        return out
    for row in rows:
        if row.dtype != torch.uint8 or (start + numel + 7) // 8 > row.numel():
            raise ValueError(f"each row must be uint8 with bits [{start}, {start + numel})")
    srcs = [r.reshape(-1).contiguous().numpy() for r in rows]
    d = dst.detach().numpy()
    tables = [_scaled_table(d.dtype, sc) for sc in scales]
    block = _SUM_BLOCK
    tmp = _scratch("sum_scaled", min(block, numel), out.dtype, out.device).numpy()
    for i in range(0, numel, block):
        j = min(numel, i + block)
        part = d[i:j]
        _unpack_scaled_numpy(srcs[0], part, start + i, j - i, 0.0, tables[0])
        for src, table in zip(srcs[1:], tables[1:]):
            t = tmp[:j - i]
            _unpack_scaled_numpy(src, t, start + i, j - i, 0.0, table)
            np.add(part, t, out=part)
    return out


def _scaled_table(dtype: np.dtype, scale: float) -> np.ndarray:
    """(256, 8) table: ``+scale`` where bit ``k`` of byte ``b`` is set, else ``-scale``."""
    return np.where(_BIT_TABLE, dtype.type(scale), dtype.type(-scale))


def _unpack_scaled_numpy(s: np.ndarray, d: np.ndarray, start: int, numel: int,
                         scale: float, table: np.ndarray | None = None) -> None:
    """numpy: rows of a (256, 8) table of ±scale gathered by byte, in cache-sized chunks."""
    if table is None:
        table = _scaled_table(d.dtype, scale)
    pos = 0
    head = start % 8
    if head:
        k = min(8 - head, numel)
        d[:k] = table[s[start // 8], head:head + k]
        pos = k
    byte = (start + pos) // 8
    whole = (numel - pos) // 8
    chunk = _CPU_CHUNK // 8
    for i in range(0, whole, chunk):
        j = min(whole, i + chunk)
        np.take(table, s[byte + i:byte + j], axis=0, mode="clip",
                out=d[pos + 8 * i:pos + 8 * j].reshape(j - i, 8))
    pos += 8 * whole
    if pos < numel:
        d[pos:] = table[s[byte + whole], :numel - pos]


def _word_view(x: Tensor) -> Tensor:
    """View the last dim of a contiguous uint8 tensor as the widest integer words it allows."""
    n = x.shape[-1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if n % size == 0 and x.storage_offset() % size == 0:
            return x.view(dtype)
    return x


# Word arrays of the tally: torch tensors, or numpy views of them on CPU (same operators).
Words = Tensor | np.ndarray
Bits = list[Words | None]  # bit-sliced unsigned number, least significant bit first; None = 0


def _xor(a: Words | None, b: Words | None) -> Words | None:
    if a is None:
        return b
    if b is None:
        return a
    return a ^ b


def _and(a: Words | None, b: Words | None) -> Words | None:
    if a is None or b is None:
        return None
    return a & b


def _or(a: Words | None, b: Words | None) -> Words | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def _add(a: Bits, b: Bits, width: int) -> Bits:
    """Ripple-carry sum of two bit-sliced numbers, ``width`` bits out (enough for no overflow)."""
    out: Bits = []
    carry: Words | None = None
    for i in range(width):
        ai = a[i] if i < len(a) else None
        bi = b[i] if i < len(b) else None
        half = _xor(ai, bi)
        out.append(_xor(half, carry))
        if i + 1 < width:
            carry = _or(_and(ai, bi), _and(half, carry))
    return out


def _tally_words(rows: Words, tie: Words | None, out: Words, m: int) -> None:
    """Majority of the ``m`` rows (``(m, w)`` integer words) into ``out`` (``(w,)``).

    Only ``^ & | ~``, slicing and ``out[...] =`` are used, so torch tensors and numpy arrays
    both work.
    """
    # Pairwise tree: ``level`` holds k numbers (bit planes of shape (k, w)), each <= level_max.
    level: Bits = [rows]
    level_max = 1
    k = m
    extras: list[tuple[Bits, int]] = []  # odd numbers left over at some level, with their max
    while k > 1:
        h = k // 2
        if k % 2:
            extras.append(([p[2 * h :] if p is not None else None for p in level], level_max))
        first = [p[:h] if p is not None else None for p in level]
        second = [p[h : 2 * h] if p is not None else None for p in level]
        level_max *= 2
        level = _add(first, second, level_max.bit_length())
        k = h
    count, count_max = level, level_max
    for bits, bmax in extras:
        count_max += bmax
        count = _add(count, bits, count_max.bit_length())

    # Compare the count with K = m // 2 bit by bit from the top: gt = count > K, eq = count == K.
    half = m // 2
    gt: Words | None = None
    eq: Words | None = None  # None means all ones until the first plane narrows it
    for i in reversed(range(len(count))):
        c = count[i]
        if (half >> i) & 1:
            if c is None:  # cannot happen for count_max >= K, kept for safety
                eq = rows[0] ^ rows[0]
            else:
                eq = c if eq is None else eq & c
        elif c is not None:
            gt = _or(gt, c if eq is None else eq & c)
            eq = ~c if eq is None else eq & ~c
    if m % 2 == 0:  # ties are possible: add the tie-break bits where count == K
        if eq is None:
            eq = ~(rows[0] ^ rows[0])
        gt = _or(gt, eq if tie is None else eq & tie)
    if gt is None:
        out[...] = 0
    else:
        out[...] = gt.reshape(-1)


def majority_tally(
    packed: Tensor, tie_bits: Tensor | None = None, *, out: Tensor | None = None
) -> Tensor:
    """Bitwise majority of ``M`` packed sign vectors: ``packed`` is ``(M, nbytes)`` uint8.

    Per bit position with ``c`` ones among the M rows the verdict bit is 1 if ``2c > M``, 0 if
    ``2c < M`` and, on a tie ``2c == M`` (only for even M), the matching bit of ``tie_bits``
    (1 when ``tie_bits`` is None). The rows are counted as bit-sliced binary counters with
    bitwise adders on whole words, never unpacked. Pad bits that are 0 in every row stay 0.

    Args:
        packed: ``(M, nbytes)`` uint8 tensor, M >= 1, on CPU or CUDA.
        tie_bits: optional ``(nbytes,)`` uint8 tensor of packed tie-break bits, same device.
        out: optional contiguous ``(nbytes,)`` uint8 tensor to write the verdicts into.

    Returns:
        ``(nbytes,)`` uint8 packed verdicts (``out`` when given).

    Example:
        >>> rows = torch.tensor([[0b0011], [0b0101], [0b0110]], dtype=torch.uint8)
        >>> majority_tally(rows)
        tensor([7], dtype=torch.uint8)
        >>> majority_tally(rows[:2], tie_bits=torch.tensor([0b0100], dtype=torch.uint8))
        tensor([5], dtype=torch.uint8)
    """
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"packed must be a 2-D torch.uint8 tensor (M, nbytes), got {packed.dtype} "
            f"with shape {tuple(packed.shape)}"
        )
    m, nbytes = packed.shape
    if m < 1:
        raise ValueError(f"packed must have at least one row (M >= 1), got M={m}")
    if tie_bits is not None:
        if not isinstance(tie_bits, Tensor) or tie_bits.dtype != torch.uint8:
            raise TypeError(f"tie_bits must be a torch.uint8 tensor, got {_describe(tie_bits)}")
        if tuple(tie_bits.shape) != (nbytes,):
            raise ValueError(
                f"tie_bits must have shape ({nbytes},) to match packed, got {tuple(tie_bits.shape)}"
            )
        if tie_bits.device != packed.device:
            raise ValueError(f"tie_bits is on {tie_bits.device} but packed is on {packed.device}")
        tie_bits = tie_bits.contiguous()
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=packed.device)
    else:
        _check_out(out, nbytes, torch.uint8, packed.device, f"majority_tally of {nbytes} bytes")
    if nbytes == 0:
        return out
    rows = _word_view(packed.contiguous())
    words_out = _word_view(out.view(-1))
    ties = _word_view(tie_bits) if tie_bits is not None else None
    if words_out.dtype != rows.dtype or (ties is not None and ties.dtype != rows.dtype):
        # Mismatched alignment of the three buffers: fall back to byte words everywhere.
        rows, words_out = packed.contiguous(), out.view(-1)
        ties = tie_bits
    w = rows.shape[1]
    if _numpy_kernel(None, packed):
        # numpy's bitwise ufuncs: single-threaded, so no per-op thread barriers.
        chunk = max(1, _TALLY_CHUNK_BYTES // (m * rows.element_size()))
        rows, words_out = rows.numpy(), words_out.numpy()
        ties = ties.numpy() if ties is not None else None
    elif packed.device.type == "cpu":
        chunk = max(1, _TALLY_CHUNK_BYTES * _threads() // (m * rows.element_size()))
    else:
        chunk = w
    for start in range(0, w, chunk):
        stop = min(w, start + chunk)
        _tally_words(
            rows[:, start:stop],
            ties[start:stop] if ties is not None else None,
            words_out[start:stop],
            m,
        )
    return out
