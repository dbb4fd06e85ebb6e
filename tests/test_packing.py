"""pack_signs / unpack_signs / majority_tally against numpy references."""

from __future__ import annotations

import doctest
import importlib.util
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signsgd import packing
from signsgd.packing import majority_tally, pack_signs, packed_nbytes, unpack_signs
from signsgd.scratch import thread_scratch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device on this machine"
        ),
    ),
]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan")]
# The largest CPU chunk (elements) of either kernel family, for lengths around it.
CHUNK = max(packing._chunk(torch.device("cpu")), packing._NUMPY_PACK_CHUNK)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_pack(t: torch.Tensor) -> np.ndarray:
    """numpy.packbits(x >= 0, bitorder="little") of the C-order flattening of ``t``."""
    a = t.detach().cpu()
    if a.dtype == torch.bfloat16:
        a = a.float()  # exact: numpy has no bfloat16
    return np.packbits(a.numpy().reshape(-1) >= 0, bitorder="little")


def ref_signs(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return torch.where(flat >= 0, 1, -1).to(dtype)


def ref_tally(rows: np.ndarray, tie: np.ndarray | None) -> np.ndarray:
    m = rows.shape[0]
    count = np.unpackbits(rows, axis=1, bitorder="little").astype(np.int64).sum(axis=0)
    tie_bits = (
        np.ones_like(count, dtype=bool)
        if tie is None
        else np.unpackbits(tie, bitorder="little").astype(bool)
    )
    verdict = (2 * count > m) | ((2 * count == m) & tie_bits)
    return np.packbits(verdict, bitorder="little")


def random_values(n: int, seed: int, special_frac: float) -> np.ndarray:
    """float32 values with a fraction of +0, -0, +inf, -inf and NaN at random places."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    mask = rng.random(n) < special_frac
    x[mask] = rng.choice(np.array(SPECIALS, dtype=np.float32), size=int(mask.sum()))
    return x


# --------------------------------------------------------------------------- pack / unpack


@pytest.fixture(params=["numpy", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the numpy CPU kernels and through the pure-torch kernels."""
    monkeypatch.setattr(packing, "_NUMPY_ON_CPU", request.param == "numpy")
    return request.param


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the CPU chunk sizes so that small inputs cross many chunk boundaries."""
    monkeypatch.setattr(packing, "_CPU_CHUNK", 64)
    monkeypatch.setattr(packing, "_NUMPY_PACK_CHUNK", 64)
    monkeypatch.setattr(packing, "_TALLY_CHUNK_BYTES", 64)


@pytest.mark.usefixtures("kernel")
@SETTINGS
@given(
    n=st.one_of(st.integers(0, 64), st.integers(0, 10**5)),
    seed=st.integers(0, 2**32 - 1),
    special_frac=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
)
def test_pack_matches_numpy_and_round_trips(n: int, seed: int, special_frac: float) -> None:
    x = torch.from_numpy(random_values(n, seed, special_frac))
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_nbytes(n),)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(x))
    assert torch.equal(unpack_signs(packed, n), ref_signs(x))


@pytest.mark.usefixtures("kernel")
@SETTINGS
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=80))
def test_pack_any_float_values(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    np.testing.assert_array_equal(pack_signs(x).numpy(), ref_pack(x))


@pytest.mark.usefixtures("kernel")
@SETTINGS
@given(data=st.binary(max_size=200), cut=st.integers(0, 7))
def test_unpack_matches_numpy_unpackbits(data: bytes, cut: int) -> None:
    packed = torch.tensor(list(data), dtype=torch.uint8)
    n = max(0, len(data) * 8 - cut)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:n]
    expect = torch.from_numpy(bits.astype(np.float32) * 2 - 1)
    assert torch.equal(unpack_signs(packed, n), expect)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 72, 127, 128, 129, 200, 1001])
def test_lengths_across_small_chunks(n: int, small_chunks: None) -> None:
    x = torch.from_numpy(random_values(n, seed=n, special_frac=0.05))
    packed = pack_signs(x)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(x))
    assert torch.equal(unpack_signs(packed, n), ref_signs(x))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, 2 * CHUNK + 5])
def test_lengths_across_real_chunks(n: int) -> None:
    x = torch.from_numpy(random_values(n, seed=n, special_frac=0.01))
    packed = pack_signs(x)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(x))
    assert torch.equal(unpack_signs(packed, n), ref_signs(x))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("n", [1, 3, 7, 9, 15, 1001])
def test_pad_bits_are_zero(n: int) -> None:
    packed = pack_signs(torch.ones(n))
    used = n % 8
    if used:
        assert int(packed[-1]) == (1 << used) - 1


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(
    ("value", "bit", "unpacked"),
    [
        (0.0, 1, 1.0),
        (-0.0, 1, 1.0),
        (float("inf"), 1, 1.0),
        (float("-inf"), 0, -1.0),
        (float("nan"), 0, -1.0),  # NaN >= 0 is False, as in numpy: NaN goes out as -1
        (-float("nan"), 0, -1.0),
        (1e-45, 1, 1.0),  # subnormal
        (-1e-45, 0, -1.0),
    ],
)
def test_special_values(value: float, bit: int, unpacked: float) -> None:
    x = torch.tensor([value])
    assert int(pack_signs(x)[0]) == bit
    assert unpack_signs(pack_signs(x), 1).item() == unpacked


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_input_dtypes(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    if dtype.is_floating_point:
        x = torch.randn(5003, generator=gen).to(dtype)
        x[:5] = torch.tensor(SPECIALS).to(dtype)
    else:
        lo = 0 if dtype == torch.uint8 else -100
        x = torch.randint(lo, 100, (5003,), generator=gen).to(dtype)
    x = x.to(device)
    packed = pack_signs(x)
    assert packed.device == x.device
    np.testing.assert_array_equal(packed.cpu().numpy(), ref_pack(x))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(
    "dtype", FLOAT_DTYPES + [torch.int8, torch.int16, torch.int32, torch.int64]
)
@pytest.mark.parametrize("device", DEVICES)
def test_unpack_dtypes(dtype: torch.dtype, device: str) -> None:
    x = torch.randn(1037, generator=torch.Generator().manual_seed(4)).to(device)
    out = unpack_signs(pack_signs(x), x.numel(), dtype)
    assert out.dtype == dtype and out.device == x.device
    assert torch.equal(out, ref_signs(x, dtype))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("shape", [(), (0,), (5, 0), (3, 5), (2, 3, 4), (7, 1, 9), (1, 1, 1, 17)])
def test_shapes_flatten_in_c_order(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    packed = pack_signs(x)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(x))
    assert torch.equal(unpack_signs(packed, x.numel()), ref_signs(x))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda b: b.t(), id="transposed"),
        pytest.param(lambda b: b[:, ::3], id="column-stride"),
        pytest.param(lambda b: b.reshape(-1)[1::2], id="odd-offset-stride"),
        pytest.param(lambda b: b[:1].expand(40, -1), id="expanded"),
        pytest.param(lambda b: b.permute(1, 0)[2:], id="permuted-slice"),
    ],
)
def test_non_contiguous_input(make) -> None:
    base = torch.randn(61, 67, generator=torch.Generator().manual_seed(6))
    x = make(base)
    np.testing.assert_array_equal(pack_signs(x).numpy(), ref_pack(x))


@pytest.mark.usefixtures("kernel")
def test_non_contiguous_packed_input() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(7))
    holder = torch.zeros(2 * packed_nbytes(1000), dtype=torch.uint8)
    holder[::2] = pack_signs(x)
    assert torch.equal(unpack_signs(holder[::2], 1000), ref_signs(x))


@pytest.mark.usefixtures("kernel")
def test_numpy_integer_numel() -> None:
    packed = pack_signs(torch.tensor([1.0, -1.0, 2.0]))
    assert unpack_signs(packed, np.int64(3)).tolist() == [1.0, -1.0, 1.0]
    assert packed_nbytes(np.int32(9)) == 2


def test_unpack_ignores_extra_bytes() -> None:
    packed = torch.tensor([0b101, 0xFF, 0xFF], dtype=torch.uint8)
    assert unpack_signs(packed, 3).tolist() == [1.0, -1.0, 1.0]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("n", [0, 5, 64, 3 * 64 + 3])
def test_out_arguments(n: int, small_chunks: None) -> None:
    x = torch.from_numpy(random_values(n, seed=8, special_frac=0.01))
    buf = torch.full((packed_nbytes(n),), 0xAA, dtype=torch.uint8)
    assert pack_signs(x, out=buf) is buf
    np.testing.assert_array_equal(buf.numpy(), ref_pack(x))
    dst = torch.full((n,), 7.0, dtype=torch.float64)
    assert unpack_signs(buf, n, out=dst) is dst
    assert torch.equal(dst, ref_signs(x, torch.float64))
    dst2 = torch.zeros(n, dtype=torch.float16)
    assert unpack_signs(buf, n, torch.float16, out=dst2) is dst2


@pytest.mark.usefixtures("kernel")
def test_threads_use_private_scratch() -> None:
    inputs = [torch.randn(CHUNK + 11, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results: dict[int, bool] = {}

    def work(i: int) -> None:
        ok = True
        for _ in range(3):
            packed = pack_signs(inputs[i])
            ok &= bool(np.array_equal(packed.numpy(), ref_pack(inputs[i])))
            ok &= torch.equal(unpack_signs(packed, inputs[i].numel()), ref_signs(inputs[i]))
        results[i] = ok

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == {0: True, 1: True, 2: True, 3: True}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pack_signs([1.0, -1.0]), TypeError, "torch.Tensor, got list"),
        (lambda: pack_signs(torch.tensor([True])), TypeError, "torch.bool"),
        (lambda: pack_signs(torch.ones(2, dtype=torch.complex64)), TypeError, "complex64"),
        (
            lambda: pack_signs(torch.ones(9), out=torch.empty(1, dtype=torch.uint8)),
            ValueError,
            "must have 2 elements, got 1",
        ),
        (
            lambda: pack_signs(torch.ones(9), out=torch.empty(2, dtype=torch.int8)),
            TypeError,
            "torch.int8",
        ),
        (
            lambda: pack_signs(torch.ones(90), out=torch.empty(24, dtype=torch.uint8)[::2]),
            ValueError,
            "contiguous",
        ),
        (lambda: unpack_signs(torch.ones(2), 3), TypeError, "torch.float32"),
        (lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), 9), ValueError, "numel=9"),
        (lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), -1), ValueError, "-1"),
        (lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), 2.0), ValueError, "2.0"),
        (lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), True), ValueError, "True"),
        (
            lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), 3, torch.bool),
            TypeError,
            "torch.bool",
        ),
        (
            lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), 3, torch.uint8),
            TypeError,
            "torch.uint8",
        ),
        (
            lambda: unpack_signs(torch.zeros(1, dtype=torch.uint8), 3, out=torch.empty(4)),
            ValueError,
            "must have 3 elements, got 4",
        ),
        (
            lambda: unpack_signs(
                torch.zeros(1, dtype=torch.uint8), 3, torch.float64, out=torch.empty(3)
            ),
            TypeError,
            "torch.float64",
        ),
        (lambda: packed_nbytes(-3), ValueError, "-3"),
    ],
)
def test_pack_unpack_errors(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- majority tally


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("nbytes", [1, 3, 8, 13, 64, 1001])
@pytest.mark.parametrize("with_ties", [False, True])
def test_tally_matches_numpy(m: int, nbytes: int, with_ties: bool) -> None:
    rng = np.random.default_rng(1000 * m + nbytes)
    rows = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
    tie = rng.integers(0, 256, nbytes, dtype=np.uint8) if with_ties else None
    got = majority_tally(torch.from_numpy(rows), None if tie is None else torch.from_numpy(tie))
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows, tie))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("m", [10, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100])
def test_tally_many_rows(m: int) -> None:
    rng = np.random.default_rng(m)
    # Rows biased towards exactly-half counts so that ties really happen for even M.
    bits = (rng.random((m, 8 * 203)) < 0.5).astype(np.uint8)
    rows = np.packbits(bits, axis=1, bitorder="little")
    tie = rng.integers(0, 256, rows.shape[1], dtype=np.uint8)
    got = majority_tally(torch.from_numpy(rows), torch.from_numpy(tie))
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows, tie))
    got = majority_tally(torch.from_numpy(rows))
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows, None))


@pytest.mark.usefixtures("kernel")
@SETTINGS
@given(
    m=st.integers(1, 12),
    nbytes=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    with_ties=st.booleans(),
)
def test_tally_property(m: int, nbytes: int, seed: int, with_ties: bool) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
    tie = rng.integers(0, 256, nbytes, dtype=np.uint8) if with_ties else None
    got = majority_tally(torch.from_numpy(rows), None if tie is None else torch.from_numpy(tie))
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows, tie))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("m", "nbytes"), [(4, 3003), (2, 1024), (7, 1237), (64, 801)])
def test_tally_across_small_chunks(m: int, nbytes: int, small_chunks: None) -> None:
    rng = np.random.default_rng(nbytes)
    rows = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
    tie = rng.integers(0, 256, nbytes, dtype=np.uint8)
    got = majority_tally(torch.from_numpy(rows), torch.from_numpy(tie))
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows, tie))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: a, id="contiguous"),
        pytest.param(lambda a: a.t().contiguous().t(), id="column-major"),
        pytest.param(lambda a: a[:, 1:], id="unaligned-offset"),
        pytest.param(lambda a: a[1:], id="row-slice"),
        pytest.param(lambda a: a[:, ::2], id="strided"),
    ],
)
def test_tally_layouts(make) -> None:
    rng = np.random.default_rng(11)
    base = torch.from_numpy(rng.integers(0, 256, (6, 97), dtype=np.uint8))
    rows = make(base)
    tie_np = rng.integers(0, 256, rows.shape[1], dtype=np.uint8)
    tie = torch.from_numpy(tie_np)
    got = majority_tally(rows, tie)
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows.numpy(), tie_np))
    got_sliced_tie = majority_tally(rows, torch.cat([torch.zeros(1, dtype=torch.uint8), tie])[1:])
    np.testing.assert_array_equal(got_sliced_tie.numpy(), ref_tally(rows.numpy(), tie_np))


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("device", DEVICES)
def test_tally_is_vote_of_packed_signs(m: int, device: str) -> None:
    gen = torch.Generator().manual_seed(m)
    n = 1003
    grads = torch.randn(m, n, generator=gen).to(device)
    grads[:, :5] = 0.0  # zeros vote +1 on the wire
    tie_src = torch.randn(n, generator=gen).to(device)
    rows = torch.stack([pack_signs(g) for g in grads])
    verdict = majority_tally(rows, pack_signs(tie_src))
    total = torch.where(grads >= 0, 1, -1).sum(dim=0)
    expect = torch.where(total > 0, 1.0, torch.where(total < 0, -1.0, ref_signs(tie_src)))
    assert torch.equal(unpack_signs(verdict, n), expect)
    if n % 8:  # pad bits stay 0 even though every tie bit could be 1
        full = majority_tally(rows, torch.full_like(rows[0], 0xFF))
        assert int(full[-1]) >> (n % 8) == 0


@pytest.mark.usefixtures("kernel")
def test_tally_out_and_empty() -> None:
    rows = torch.tensor([[0b1100], [0b1010], [0b0110]], dtype=torch.uint8)
    buf = torch.zeros(1, dtype=torch.uint8)
    assert majority_tally(rows, out=buf) is buf
    assert int(buf[0]) == 0b1110
    assert majority_tally(torch.zeros(3, 0, dtype=torch.uint8)).shape == (0,)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: majority_tally(torch.zeros(4, dtype=torch.uint8)), ValueError, r"\(4,\)"),
        (lambda: majority_tally(torch.zeros(2, 4)), ValueError, "torch.float32"),
        (lambda: majority_tally(torch.zeros(0, 4, dtype=torch.uint8)), ValueError, "M=0"),
        (lambda: majority_tally([[1]]), TypeError, "list"),
        (
            lambda: majority_tally(
                torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)
            ),
            ValueError,
            r"shape \(4,\).*\(3,\)",
        ),
        (
            lambda: majority_tally(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(4)),
            TypeError,
            "torch.float32",
        ),
        (
            lambda: majority_tally(
                torch.zeros(2, 4, dtype=torch.uint8), out=torch.zeros(5, dtype=torch.uint8)
            ),
            ValueError,
            "must have 4 elements, got 5",
        ),
    ],
)
def test_tally_errors(call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.usefixtures("kernel")
def test_tally_across_real_chunks() -> None:
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (4, 300_003), dtype=np.uint8)
    tie = rng.integers(0, 256, rows.shape[1], dtype=np.uint8)
    got = majority_tally(torch.from_numpy(rows), torch.from_numpy(tie))
    np.testing.assert_array_equal(got.numpy(), ref_tally(rows, tie))


def test_docstring_examples_run() -> None:
    result = doctest.testmod(packing, extraglobs={"torch": torch}, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


@pytest.mark.parametrize(
    ("torch_fn", "call"),
    [
        ("_pack_torch", lambda: pack_signs(torch.randn(100))),
        ("_unpack_torch", lambda: unpack_signs(torch.zeros(13, dtype=torch.uint8), 100)),
    ],
)
def test_cpu_float_takes_numpy_kernel(torch_fn: str, call, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError(f"{torch_fn} used although the numpy kernel applies")

    monkeypatch.setattr(packing, "_NUMPY_ON_CPU", True)
    monkeypatch.setattr(packing, torch_fn, refuse)
    call()


META = torch.device("meta")  # a non-CPU device that exists on every machine


@pytest.mark.parametrize(
    ("numpy_on_cpu", "values", "packed", "expect"),
    [
        (True, torch.float32, [], True),
        (True, torch.float64, [torch.device("cpu")], True),
        (True, torch.float16, [], False),
        (True, torch.bfloat16, [], False),
        (True, torch.int32, [], False),
        (True, torch.uint8, [], False),  # uint8 *values* are packed by the torch kernel
        (True, None, [torch.device("cpu")], True),  # the tally's bytes
        (True, None, [META], False),
        (True, torch.float32, [META], False),
        (True, torch.float32, [torch.device("cpu"), META], False),
        (False, torch.float32, [torch.device("cpu")], False),
        (False, None, [torch.device("cpu")], False),
    ],
)
def test_numpy_kernel_choice(numpy_on_cpu, values, packed, expect, monkeypatch) -> None:
    monkeypatch.setattr(packing, "_NUMPY_ON_CPU", numpy_on_cpu)
    vals = None if values is None else torch.zeros(2, dtype=values)
    rows = [torch.zeros(1, dtype=torch.uint8, device=d) for d in packed]
    assert packing._numpy_kernel(vals, *rows) is expect
    if values is not None:
        assert packing._numpy_kernel(vals.to(META), *rows) is False


def test_big_endian_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "byteorder", "big")
    spec = importlib.util.spec_from_file_location("packing_on_big_endian", packing.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="little-endian hosts only; this host is big-endian"):
        spec.loader.exec_module(module)


ZERO_BYTES = torch.zeros(200, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("numpy_on_cpu", "name", "dtype", "call"),
    [
        (True, "pack_bool", torch.bool, lambda: pack_signs(torch.ones(1003))),
        (False, "pack_bool", torch.bool, lambda: pack_signs(torch.ones(1003))),
        (False, "pack_cmp", torch.float32, lambda: pack_signs(torch.ones(1003))),
        (False, "unpack_word", torch.int64, lambda: unpack_signs(ZERO_BYTES, 1600)),
        (
            True,
            "sum_scaled",
            torch.float32,
            lambda: packing.sum_scaled_signs(
                [ZERO_BYTES, ZERO_BYTES], 0, 1600, [1.0, 1.0], out=torch.empty(1600)
            ),
        ),
    ],
)
def test_cpu_buffers_come_from_the_thread_scratch(
    numpy_on_cpu: bool, name: str, dtype: torch.dtype, call, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "_NUMPY_ON_CPU", numpy_on_cpu)
    buf = thread_scratch().get(f"packing.{name}", 4096, dtype)  # large enough to be reused
    buf.zero_()
    call()
    assert bool(buf[:8].ne(0).all()), f"the kernel did not write into packing.{name}"


# ------------------------------------------------------------------ fused variants
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpack_scaled_signs_equals_unpack_times_scale(dtype):
    g = torch.Generator().manual_seed(3)
    for n in (1, 8, 13, 64, 1000, 5000):
        x = torch.randn(n, generator=g)
        x[: min(3, n)] = -0.0
        packed = pack_signs(x)
        for start, stop in ((0, n), (n // 3, n), (1, max(1, n - 5)), (n - 1, n)):
            scale = float(torch.rand((), generator=g).to(dtype))
            out = torch.empty(stop - start, dtype=dtype)
            packing.unpack_scaled_signs(packed, start, stop - start, scale, out=out)
            want = unpack_signs(packed, n, dtype)[start:stop] * torch.tensor(scale, dtype=dtype)
            assert torch.equal(out, want), (n, start, stop)
    with pytest.raises(ValueError, match="cannot read bits"):
        packing.unpack_scaled_signs(torch.zeros(1, dtype=torch.uint8), 4, 5, 1.0,
                                    out=torch.empty(5, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sum_scaled_signs_accumulates_rows_in_order(dtype, monkeypatch):
    monkeypatch.setattr(packing, "_SUM_BLOCK", 64)  # several blocks, unaligned starts
    g = torch.Generator().manual_seed(5)
    for n, m in ((1, 1), (9, 2), (300, 3), (1000, 4)):
        rows = [pack_signs(torch.randn(n, generator=g)) for _ in range(m)]
        scales = [float(torch.rand((), generator=g).to(dtype)) for _ in range(m)]
        for start, stop in ((0, n), (n // 3, n), (n - 1, n)):
            out = torch.empty(stop - start, dtype=dtype)
            packing.sum_scaled_signs(rows, start, stop - start, scales, out=out)
            want = torch.zeros(stop - start, dtype=dtype)
            for row, scale in zip(rows, scales):
                want += unpack_signs(row, n, dtype)[start:stop] * torch.tensor(scale, dtype=dtype)
            assert torch.equal(out, want), (n, m, start, stop)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 9, 1000, packing._NUMPY_PACK_CHUNK + 5])
def test_pack_signs_abs_equals_pack_and_abs(dtype, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    x[0] = -0.0
    out = torch.empty(packed_nbytes(n), dtype=torch.uint8)
    absx = torch.empty(n, dtype=dtype)
    assert packing.pack_signs_abs(x, out=out, abs_out=absx) is out
    np.testing.assert_array_equal(out.numpy(), ref_pack(x))
    assert torch.equal(absx, x.abs())
