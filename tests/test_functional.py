"""signsgd.functional: hand-computed values, single-tensor vs foreach parity, finite check."""

from __future__ import annotations

import pytest
import torch

from signsgd import functional as F
from signsgd.compression import RandomK, ScaledSign, TopK
from signsgd.scratch import Scratch

D = torch.float64
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("values,expected", [
    ([], None),
    ([[1.0, 2.0]], None),
    ([[1.0], [NAN]], 1),
    ([[INF], [NAN]], 0),
    ([[1.0], [2.0, -INF], [NAN]], 1),
    ([[], [1.0]], None),
    ([[1e308, 1e308], [-1e308]], None),   # the screening sum overflows: a false alarm
    ([[1e308, 1e308], [1.0, NAN]], 1),
    ([[0.0] * 70000 + [INF]], 0),         # large tensor, summed on its own
    ([[0.0] * 70000, [1.0], [-INF, 0.0]], 2),
    ([[1.0] * 20000, [2.0] * 20000, [0.5] * 9, [3.0, INF]], 3),  # several flattened runs
    ([[1.0] * 20000, [2.0] * 20000, [0.5] * 9, [3.0, 1.0]], None),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_first_nonfinite(values, expected, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert F.first_nonfinite([torch.tensor(v, dtype=D) for v in values]) == expected


def test_first_nonfinite_mixed_dtypes_and_shapes():
    ts = [torch.ones(3, 4), torch.ones(2, dtype=D), torch.full((5,), 60000.0, dtype=torch.float16),
          torch.tensor([1.0, INF], dtype=torch.bfloat16), torch.ones(2, 3).t()]
    assert F.first_nonfinite(ts) == 3
    ts[3] = torch.ones(2, dtype=torch.bfloat16)
    assert F.first_nonfinite(ts) is None  # fp16 sums accumulate in float32: no overflow
    ts[4][2, 1] = NAN                     # a non-contiguous tensor
    assert F.first_nonfinite(ts) == 4


@pytest.mark.parametrize("foreach", [False, True])
def test_signum_hand_values(foreach):
    # β = 0.5, lr = 0.25, wd = 0.5 (decay 0.875); m0 = [1, -1, 0], g = [-3, -1, 0]
    # m = [-1, -1, 0]; x = 0.875·[2, 4, 8] − 0.25·[-1, -1, 0] = [2, 3.75, 7]
    x = torch.tensor([2.0, 4.0, 8.0], dtype=D)
    m = torch.tensor([1.0, -1.0, 0.0], dtype=D)
    F.signum([x], [torch.tensor([-3.0, -1.0, 0.0], dtype=D)], [m], lr=0.25, momentum=0.5,
             weight_decay=0.5, foreach=foreach)
    assert m.tolist() == [-1.0, -1.0, 0.0]
    assert x.tolist() == [2.0, 3.75, 7.0]


@pytest.mark.parametrize("foreach", [False, True])
def test_sign_update_votes_applied_as_given(foreach):
    x = torch.tensor([1.0, 1.0], dtype=D)
    F.sign_update_([x], [torch.tensor([1.0, -1.0], dtype=D)], lr=0.5, weight_decay=0.0,
                   take_sign=False, foreach=foreach)
    assert x.tolist() == [0.5, 1.5]


@pytest.mark.parametrize("foreach", [False, True])
def test_out_of_place_helpers_leave_inputs(foreach):
    g = [torch.tensor([2.0, -2.0], dtype=D)]
    m = [torch.tensor([4.0, 0.0], dtype=D)]
    d = F.signum_direction(g, m, momentum=0.5, foreach=foreach)
    assert d[0].tolist() == [3.0, -1.0] and m[0].tolist() == [4.0, 0.0]
    assert F.signum_direction(g, [None], momentum=0.0)[0] is g[0]
    x, e = [torch.tensor([1.0, 2.0], dtype=D)], [torch.tensor([0.5, 0.25], dtype=D)]
    # wd = 0.5, β = 0.5: d = g + 0.5·x = [2.5, -1]; m' = 0.5·[4, 0] + d = [4.5, -1]
    # p = 0.5·m' + e = [2.75, -0.25]
    p, new_m = F.ef_compensate(x, g, e, m, lr=0.5, momentum=0.5, weight_decay=0.5,
                               foreach=foreach)
    assert p[0].tolist() == [2.75, -0.25] and new_m[0].tolist() == [4.5, -1.0]
    assert e[0].tolist() == [0.5, 0.25] and m[0].tolist() == [4.0, 0.0]
    assert x[0].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("call", [
    lambda: F.signum([torch.ones(1)], [], [], lr=0.1, momentum=0.0, weight_decay=0.0),
    lambda: F.signum([torch.ones(1)], [torch.ones(1)], [None], lr=0.1, momentum=0.5,
                     weight_decay=0.0),
    lambda: F.sign_update_([torch.ones(1)], [], lr=0.1, weight_decay=0.0),
    lambda: F.signum_direction([torch.ones(1)], [None], momentum=0.5),
    lambda: F.ef_compensate([torch.ones(1)], [torch.ones(1)], [], [None], lr=0.1,
                            momentum=0.0, weight_decay=0.0),
    lambda: F.residual_([torch.ones(1)], [torch.ones(1)], []),
    lambda: F.ef_sgd([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [None], lr=0.1,
                     momentum=0.0, weight_decay=0.0, compressor=lambda v: v[:1]),
], ids=["signum-len", "signum-buf", "sign_update-len", "direction-buf", "compensate-len",
        "apply-len", "ef_sgd-shape"])
def test_mismatched_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def _tensors(seed, shapes, dtypes, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=gen).to(dtypes[i % len(dtypes)])
        if t.numel() > 2:
            t.view(-1)[1] = 0.0  # an exact zero: sign(0) = 0
        if noncontig and t.dim() == 2:
            t = t.t().contiguous().t()  # same values, transposed strides
        out.append(t)
    return out


SHAPES = [(5,), (3, 4), (0,), (1,), (9000,), (70, 130), (2, 3, 5)]
DTYPES = {"f32": [torch.float32], "f64": [D], "mixed": [torch.float32, D, torch.bfloat16]}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("batch", [64 * 64, 1 << 20])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.1)])
def test_signum_foreach_matches_single(momentum, wd, batch, dtypes, noncontig, threads,
                                       monkeypatch):
    monkeypatch.setattr(F, "_BATCH", batch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    workspace = Scratch()
    xs = [_tensors(1, SHAPES, DTYPES[dtypes], noncontig) for _ in range(2)]
    ms = [_tensors(2, SHAPES, DTYPES[dtypes], noncontig) for _ in range(2)]
    for step in range(6):
        gs = _tensors(10 + step, SHAPES, DTYPES[dtypes], noncontig)
        for k, foreach in enumerate((False, True)):
            F.signum(xs[k], gs, ms[k], lr=1e-2, momentum=momentum, weight_decay=wd,
                     foreach=foreach, workspace=workspace if step % 2 else None)
        for a, b in zip(xs[0] + ms[0], xs[1] + ms[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("comp", [ScaledSign(), TopK(0.2)], ids=repr)
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.01)])
def test_ef_sgd_foreach_matches_single(momentum, wd, comp, dtypes):
    xs = [_tensors(1, SHAPES, DTYPES[dtypes]) for _ in range(2)]
    es = [[torch.zeros_like(t) for t in xs[0]] for _ in range(2)]
    ms = [[torch.zeros_like(t) for t in xs[0]] for _ in range(2)]
    for step in range(5):
        gs = _tensors(10 + step, SHAPES, DTYPES[dtypes])
        for k, foreach in enumerate((False, True)):
            F.ef_sgd(xs[k], gs, es[k], ms[k], lr=0.1, momentum=momentum, weight_decay=wd,
                     compressor=comp, foreach=foreach)
        for a, b in zip(xs[0] + es[0] + ms[0], xs[1] + es[1] + ms[1]):
            assert torch.equal(a, b)


def test_ef_sgd_randomk_foreach_matches_single():
    xs = [_tensors(1, SHAPES, [D]) for _ in range(2)]
    es = [[torch.zeros_like(t) for t in xs[0]] for _ in range(2)]
    comps = [RandomK(0.3, seed=5), RandomK(0.3, seed=5)]
    for step in range(5):
        gs = _tensors(10 + step, SHAPES, [D])
        for k, foreach in enumerate((False, True)):
            F.ef_sgd(xs[k], gs, es[k], [None] * len(gs), lr=0.1, momentum=0.0,
                     weight_decay=0.0, compressor=comps[k], foreach=foreach)
        for a, b in zip(xs[0] + es[0], xs[1] + es[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [8, 4096])
@pytest.mark.parametrize("sizes", [[3, 5, 0, 20, 1, 9], [100], [0], [4, 4, 4, 4, 4, 4],
                                   [30, 2, 17]])
def test_batches_cover_every_element_once(sizes, batch, threads, monkeypatch):
    monkeypatch.setattr(F, "_BATCH", batch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    ts = [torch.zeros(n) for n in sizes]
    seen = 0
    workspace = Scratch()
    for (chunk,), scratch in F._batches([ts], workspace):
        if scratch is not None:  # a buffer for the sign of a lone large tensor
            assert len(chunk) == 1 and scratch.shape == chunk[0].shape
        for t in chunk:
            t += 1
            seen += t.numel()
    assert seen == sum(sizes)
    assert all(bool((t == 1).all()) for t in ts)
    assert all(b.numel() <= max(sizes) for b in workspace._buffers.values())
