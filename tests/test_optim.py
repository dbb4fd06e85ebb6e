"""SignSGD, Signum, Lion and EFSGD against hand-computed float64 trajectories, and their
plumbing.

Expected values come from the formulas of docs/design.md written out below in plain Python
floats (``_ref_*``), never from the code under test. All inputs are dyadic (0.5, 0.25,
β = 0.5, ...) so every intermediate value is exact in float64 and ``==`` is the right
comparison. A few cases also pin literal numbers worked out by hand.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import signsgd
from signsgd import functional as F
from signsgd.compression import Identity, RandomK, ScaledSign, Sign, TopK
from signsgd.errors import NonFiniteGradientError

D = torch.float64


# ----------------------------------------------------------------------------- references
def _sign(v: float) -> float:
    return 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)


def _ref_signum(x, grads, lr, beta, wd):
    """x_t per step from m ← β·m + (1−β)·g ; x ← x − lr·(sign(m) + wd·x)."""
    x, m, out = list(x), [0.0] * len(x), []
    for g in grads:
        m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
        x = [xi - lr * (_sign(mi) + wd * xi) for xi, mi in zip(x, m)]
        out.append(list(x))
    return out, m


def _ref_lion(x, grads, lr, beta1, beta2, wd, *, m_first=False):
    """c ← β1·m + (1−β1)·g ; x ← x·(1 − lr·wd) − lr·sign(c) ; m ← β2·m + (1−β2)·g.

    ``m_first=True`` is the wrong order (m updated before c): another algorithm, which the
    tests check Lion is *not*. ``None`` gradients leave x and m alone."""
    x, m, out = list(x), [0.0] * len(x), []
    for g in grads:
        if g is None:
            out.append(list(x))
            continue
        if m_first:
            m = [beta2 * mi + (1 - beta2) * gi for mi, gi in zip(m, g)]
        c = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        x = [xi * (1 - lr * wd) - lr * _sign(ci) for xi, ci in zip(x, c)]
        if not m_first:
            m = [beta2 * mi + (1 - beta2) * gi for mi, gi in zip(m, g)]
        out.append(list(x))
    return out, m


def _c_identity(p, step):
    return list(p)


def _c_sign(p, step):
    return [_sign(v) for v in p]


def _c_scaled_sign(p, step):
    scale = sum(abs(v) for v in p) / len(p)
    return [scale * _sign(v) for v in p]


def _c_topk_half(p, step):
    k = math.ceil(0.5 * len(p))
    keep = sorted(range(len(p)), key=lambda i: -abs(p[i]))[:k]
    return [v if i in keep else 0.0 for i, v in enumerate(p)]


def _c_randomk_half(seed):
    gen = torch.Generator().manual_seed(seed)

    def c(p, step):
        k = math.ceil(0.5 * len(p))
        keep = set(torch.randperm(len(p), generator=gen)[:k].tolist())
        return [v if i in keep else 0.0 for i, v in enumerate(p)]

    return c


def _ref_ef(x, grads, lr, beta, wd, comp):
    """p ← lr·(g + wd·x) + e (momentum: m ← β·m + g + wd·x, p ← lr·m + e);
    Δ ← C(p); e ← p − Δ; x ← x − Δ."""
    x, e, m, out = list(x), [0.0] * len(x), [0.0] * len(x), []
    for t, g in enumerate(grads):
        d = [gi + wd * xi for gi, xi in zip(g, x)]
        if beta:
            m = [beta * mi + di for mi, di in zip(m, d)]
            d = m
        p = [lr * di + ei for di, ei in zip(d, e)]
        delta = comp(p, t)
        e = [pi - ci for pi, ci in zip(p, delta)]
        x = [xi - ci for xi, ci in zip(x, delta)]
        out.append(list(x))
    return out, e, m


# ----------------------------------------------------------------------------- helpers
def _params(values):
    return [torch.nn.Parameter(torch.tensor(v, dtype=D)) for v in values]


def _run(opt, params, grads_per_step):
    """Set each step's gradients (None skips), step, and record every parameter."""
    traj = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.tensor(g, dtype=D)
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj


# Gradient sequences: a zero coordinate, a sign change of the gradient that momentum
# smooths out, and a coordinate whose gradient is zero after the first step.
G_A = [[1.0, -2.0, 0.0, 4.0], [-0.5, 0.25, 0.0, -1.0], [0.25, 0.5, 0.0, -1.0],
       [-0.75, 0.5, 2.0, 0.0]]
G_B = [[0.5, -0.5], [0.5, -0.25], [-4.0, 0.5], [0.25, 0.25]]
X_A = [1.0, -0.5, 0.25, 2.0]
X_B = [-1.0, 0.5]

SIGN_CASES = [  # (lr_a, lr_b, beta, weight_decay)
    (0.5, 0.25, 0.0, 0.0),
    (0.5, 0.25, 0.0, 0.5),
    (0.25, 0.125, 0.5, 0.0),
    (0.5, 0.25, 0.5, 0.25),
    (0.25, 0.5, 0.75, 0.5),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("lr_a,lr_b,beta,wd", SIGN_CASES)
def test_sign_trajectories_two_groups(lr_a, lr_b, beta, wd, foreach):
    a, b = _params([X_A, X_B])
    groups = [{"params": [a]}, {"params": [b], "lr": lr_b}]
    if beta == 0:
        opt = signsgd.SignSGD(groups, lr=lr_a, weight_decay=wd, foreach=foreach)
    else:
        opt = signsgd.Signum(groups, lr=lr_a, momentum=beta, weight_decay=wd, foreach=foreach)
    traj = _run(opt, [a, b], list(zip(G_A, G_B)))
    exp_a, m_a = _ref_signum(X_A, G_A, lr_a, beta, wd)
    exp_b, m_b = _ref_signum(X_B, G_B, lr_b, beta, wd)
    for t, (xa, xb) in enumerate(traj):
        assert xa.tolist() == exp_a[t], f"group 0, step {t + 1}"
        assert xb.tolist() == exp_b[t], f"group 1, step {t + 1}"
    if beta == 0:
        assert len(opt.state) == 0  # signSGD keeps no state
    else:
        assert opt.state[a]["momentum_buffer"].tolist() == m_a
        assert opt.state[b]["momentum_buffer"].tolist() == m_b


@pytest.mark.parametrize("foreach", [False, True])
def test_signum_literal_values_and_momentum_is_carried(foreach):
    # β = 0.5, lr = 0.5, wd = 0.25 (decay factor 1 − 0.125 = 0.875), x0 = [1, 1, 0.5].
    # step 1: g = [ 4, -2, 0]  m = [2, -1, 0]        x = [0.375, 1.375, 0.4375]
    # step 2: g = [-1,  0, 0]  m = [0.5, -0.5, 0]     x = [-0.171875, 1.703125, 0.3828125]
    #         (a reset momentum would give m = [-0.5, 0, 0] and move coordinate 0 up)
    # step 3: g = [-2,  4, 1]  m = [-0.75, 1.75, 0.5] x = [0.349609375, 0.990234375,
    #                                                       -0.1650390625]
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0, 0.5], dtype=D))
    opt = signsgd.Signum([x], lr=0.5, momentum=0.5, weight_decay=0.25, foreach=foreach)
    traj = _run(opt, [x], [[[4.0, -2.0, 0.0]], [[-1.0, 0.0, 0.0]], [[-2.0, 4.0, 1.0]]])
    assert traj[0][0].tolist() == [0.375, 1.375, 0.4375]
    assert traj[1][0].tolist() == [-0.171875, 1.703125, 0.3828125]
    assert traj[2][0].tolist() == [0.349609375, 0.990234375, -0.1650390625]
    assert opt.state[x]["momentum_buffer"].tolist() == [-0.75, 1.75, 0.5]


@pytest.mark.parametrize("foreach", [False, True])
def test_signsgd_literal_values_zero_gradient_does_not_move(foreach):
    # lr = 0.5, wd = 0: x ← x − 0.5·sign(g); sign(0) = 0 leaves a coordinate in place.
    x = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.25], dtype=D))
    opt = signsgd.SignSGD([x], lr=0.5, foreach=foreach)
    traj = _run(opt, [x], [[[3.0, 0.0, -0.0]], [[0.0, -1e-300, 0.0]], [[-2.0, 0.0, 0.0]]])
    assert [t[0].tolist() for t in traj] == [[0.5, -1.0, 0.25], [0.5, -0.5, 0.25],
                                           [1.0, -0.5, 0.25]]


LION_CASES = [  # (lr_a, lr_b, beta1, beta2, weight_decay)
    (0.5, 0.25, 0.5, 0.75, 0.0),
    (0.5, 0.25, 0.5, 0.75, 0.5),
    (0.25, 0.5, 0.75, 0.5, 0.25),
    (0.5, 0.125, 0.0, 0.5, 0.0),
    (0.25, 0.25, 0.5, 0.0, 0.5),
]
# Group B's gradient is missing at step 2: x and m stay as they are.
G_B_GAPPED = [G_B[0], None, G_B[2], G_B[3]]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("lr_a,lr_b,beta1,beta2,wd", LION_CASES)
def test_lion_trajectories_two_groups_and_a_missing_gradient(lr_a, lr_b, beta1, beta2, wd,
                                                             foreach):
    a, b, c = _params([X_A, X_B, [0.5, -0.25]])
    groups = [{"params": [a, c]}, {"params": [b], "lr": lr_b}]
    opt = signsgd.Lion(groups, lr=lr_a, betas=(beta1, beta2), weight_decay=wd,
                       foreach=foreach)
    traj = _run(opt, [a, b, c], [(ga, gb, None) for ga, gb in zip(G_A, G_B_GAPPED)])
    exp_a, m_a = _ref_lion(X_A, G_A, lr_a, beta1, beta2, wd)
    exp_b, m_b = _ref_lion(X_B, G_B_GAPPED, lr_b, beta1, beta2, wd)
    for t, (xa, xb, xc) in enumerate(traj):
        assert xa.tolist() == exp_a[t], f"group 0, step {t + 1}"
        assert xb.tolist() == exp_b[t], f"group 1, step {t + 1}"
        assert xc.tolist() == [0.5, -0.25]  # no gradient: no update, no weight decay
    assert opt.state[a]["exp_avg"].tolist() == m_a
    assert opt.state[b]["exp_avg"].tolist() == m_b
    assert c not in opt.state
    wrong, _ = _ref_lion(X_A, G_A, lr_a, beta1, beta2, wd, m_first=True)
    if beta1 not in (0.0,) and beta2 != 0.0:
        assert wrong != exp_a  # the order of the two momentum uses is visible in the data


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_literal_values_momentum_used_before_its_update(foreach):
    # lr = 0.5, β1 = 0.5, β2 = 0.75, wd = 0.5 (decay 1 − 0.25 = 0.75), x0 = [1, 1].
    # step 1: g = [ 2, -1]  c = [1, -0.5]        x = [0.25, 1.25]  m = [0.5, -0.25]
    # step 2: g = [-0.5, 0] c = [0, -0.125]      x = [0.1875, 1.4375] m = [0.25, -0.1875]
    #         (updating m first: m = [0.25, -0.1875], c = [-0.125, -0.09375],
    #          x = [0.6875, ...]: coordinate 0 would move up, not stay)
    # step 3: g = [-1, 1]   c = [-0.375, 0.40625] x = [0.640625, 0.578125]
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=D))
    opt = signsgd.Lion([x], lr=0.5, betas=(0.5, 0.75), weight_decay=0.5, foreach=foreach)
    traj = _run(opt, [x], [[[2.0, -1.0]], [[-0.5, 0.0]], [[-1.0, 1.0]]])
    assert traj[0][0].tolist() == [0.25, 1.25]
    assert traj[1][0].tolist() == [0.1875, 1.4375]
    assert traj[2][0].tolist() == [0.640625, 0.578125]
    assert opt.state[x]["exp_avg"].tolist() == [-0.0625, 0.109375]


EF_COMPRESSORS = [
    ("identity", Identity, _c_identity),
    ("sign", Sign, _c_sign),
    ("scaled_sign", ScaledSign, _c_scaled_sign),
    ("topk", lambda: TopK(0.5), _c_topk_half),
    ("randomk", lambda: RandomK(0.5, seed=7), None),
]
EF_HPARAMS = [  # (lr, beta, wd)
    (0.5, 0.0, 0.0),
    (0.25, 0.0, 0.5),
    (0.5, 0.5, 0.0),
    (0.25, 0.5, 0.25),
]
# Four coordinates per tensor (so ScaledSign's mean |p| is a dyadic number) with distinct
# magnitudes after compensation (so TopK has no ties).
G_E = [[-0.375, -0.5, -0.625, 1.0], [-0.25, -2.0, 2.5, -0.625], [-2.5, -0.25, 0.375, -0.75],
       [-0.625, -1.5, 0.5, 1.0]]
X_E = [0.5, 1.0, -2.0, 0.25]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("lr,beta,wd", EF_HPARAMS)
@pytest.mark.parametrize("name,make,ref", EF_COMPRESSORS, ids=[c[0] for c in EF_COMPRESSORS])
def test_efsgd_trajectories(name, make, ref, lr, beta, wd, foreach):
    x = torch.nn.Parameter(torch.tensor(X_E, dtype=D))
    opt = signsgd.EFSGD([x], lr=lr, compressor=make(), momentum=beta, weight_decay=wd,
                        foreach=foreach)
    traj = _run(opt, [x], [[g] for g in G_E])
    comp = ref if ref is not None else _c_randomk_half(7)
    exp, e, m = _ref_ef(X_E, G_E, lr, beta, wd, comp)
    for t, step in enumerate(traj):
        assert step[0].tolist() == exp[t], f"step {t + 1}"
    assert opt.state[x]["error"].tolist() == e
    if beta:
        assert opt.state[x]["momentum_buffer"].tolist() == m
    else:
        assert "momentum_buffer" not in opt.state[x]


def test_efsgd_literal_values_scaled_sign_two_groups():
    # Group 0: lr = 1, x0 = [1, 1]; group 1: lr = 0.5, y0 = [0, 0, 0, 0].
    # step 1, x: p = [1, -3], C(p) = 2·[1, -1], e = [-1, -1], x = [-1, 3]
    # step 2, x: g = [1, 1] → p = [0, 0]; C(p) = 0 (sign(0) = 0): x stays, e = [0, 0]
    # step 1, y: g = [2, 0, -2, 4] → p = [1, 0, -1, 2]; C(p) = 1·[1, 0, -1, 1]
    #            e = [0, 0, 0, 1], y = [-1, 0, 1, -1]
    # step 2, y: g = [0, 0, 0, 0] → p = e = [0, 0, 0, 1]; C(p) = 0.25·[0, 0, 0, 1]
    #            e = [0, 0, 0, 0.75], y = [-1, 0, 1, -1.25]
    x = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=D))
    y = torch.nn.Parameter(torch.zeros(4, dtype=D))
    opt = signsgd.EFSGD([{"params": [x]}, {"params": [y], "lr": 0.5}], lr=1.0)
    traj = _run(opt, [x, y], [[[1.0, -3.0], [2.0, 0.0, -2.0, 4.0]],
                              [[1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    assert traj[0][0].tolist() == [-1.0, 3.0] and traj[0][1].tolist() == [-1.0, 0.0, 1.0, -1.0]
    assert traj[1][0].tolist() == [-1.0, 3.0]
    assert traj[1][1].tolist() == [-1.0, 0.0, 1.0, -1.25]
    assert opt.state[x]["error"].tolist() == [0.0, 0.0]
    assert opt.state[y]["error"].tolist() == [0.0, 0.0, 0.0, 0.75]


OPTIMIZERS = {
    "signsgd": lambda ps, **kw: signsgd.SignSGD(ps, lr=0.5, weight_decay=0.25, **kw),
    "lion": lambda ps, **kw: signsgd.Lion(ps, lr=0.5, betas=(0.5, 0.75), weight_decay=0.25,
                                          **kw),
    "signum": lambda ps, **kw: signsgd.Signum(ps, lr=0.5, momentum=0.5, weight_decay=0.25,
                                              **kw),
    "efsgd": lambda ps, **kw: signsgd.EFSGD(ps, lr=0.5, momentum=0.5, weight_decay=0.25, **kw),
    "efsgd_randomk": lambda ps, **kw: signsgd.EFSGD(ps, lr=0.5, compressor=RandomK(0.5, 3),
                                                    **kw),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_without_grad_is_skipped_and_gets_no_state(name):
    a, b, c = _params([[1.0, -1.0], [2.0, 0.5], [0.25]])
    opt = OPTIMIZERS[name]([a, b, c])
    ref_a = _params([[1.0, -1.0]])[0]
    ref = OPTIMIZERS[name]([ref_a])
    for _ in range(3):
        a.grad = torch.tensor([1.0, -0.5], dtype=D)
        ref_a.grad = a.grad.clone()
        b.grad = None
        opt.step()
        ref.step()
    assert b.tolist() == [2.0, 0.5] and c.tolist() == [0.25]
    assert b not in opt.state and c not in opt.state
    assert torch.equal(a, ref_a)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_groups_without_any_grad_and_empty_tensors(name):
    a, b = _params([[1.0, 2.0], [3.0]])
    e = torch.nn.Parameter(torch.zeros(0, 3, dtype=D))
    opt = OPTIMIZERS[name]([{"params": [a]}, {"params": [b, e]}])
    a.grad = torch.tensor([1.0, -1.0], dtype=D)
    e.grad = torch.zeros(0, 3, dtype=D)
    opt.step()
    assert b.tolist() == [3.0] and e.shape == (0, 3)
    opt.zero_grad()
    opt.step()  # no gradient anywhere: nothing happens, nothing fails


# ----------------------------------------------------------------------------- foreach
def _random_setup(seed, dtypes, shapes):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        params.append(torch.nn.Parameter(torch.randn(shape, generator=gen).to(dt)))
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
             for _ in range(8)]
    for step in grads:  # exact zeros too, and a parameter without a gradient
        step[0].view(-1)[:2] = 0
        step[-1] = None
    return params, grads


SHAPES = [(3,), (4, 5), (2, 3, 4, 5), (1,), (0,), (7, 1, 3), (33,), (6000,), (2, 4100)]
FOREACH_CASES = [
    ("signsgd", lambda ps, fe: signsgd.SignSGD(ps, lr=1e-2, weight_decay=0.1, foreach=fe)),
    ("signum", lambda ps, fe: signsgd.Signum(ps, lr=1e-2, momentum=0.9, weight_decay=0.1,
                                             foreach=fe)),
    ("lion", lambda ps, fe: signsgd.Lion(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                         foreach=fe)),
    ("efsgd_scaled", lambda ps, fe: signsgd.EFSGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1,
                                                  foreach=fe)),
    ("efsgd_topk", lambda ps, fe: signsgd.EFSGD(ps, lr=0.1, compressor=TopK(0.3),
                                                foreach=fe)),
    ("efsgd_randomk", lambda ps, fe: signsgd.EFSGD(ps, lr=0.1, compressor=RandomK(0.3, 1),
                                                   foreach=fe)),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float64],
                                    [torch.float32, torch.float64, torch.float16]],
                         ids=["f32", "f64", "mixed"])
@pytest.mark.parametrize("name,make", FOREACH_CASES, ids=[c[0] for c in FOREACH_CASES])
def test_foreach_and_single_tensor_paths_are_bit_identical(name, make, dtypes, threads,
                                                           monkeypatch):
    monkeypatch.setattr(F, "_BATCH", 4096)  # large tensors: own batch, cut into slices
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    p1, grads = _random_setup(0, dtypes, SHAPES)
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    opt1, opt2 = make(p1, False), make(p2, True)
    for step in grads:
        for a, b, g in zip(p1, p2, step):
            a.grad = None if g is None else g.clone()
            b.grad = None if g is None else g.clone()
        opt1.step()
        opt2.step()
        for a, b in zip(p1, p2):
            assert torch.equal(a, b)
    for a, b in zip(p1, p2):
        for key in opt1.state[a]:
            assert torch.equal(opt1.state[a][key], opt2.state[b][key]), key


# ----------------------------------------------------------------------------- checkpoints
CKPT_CASES = {
    "signum": lambda ps: signsgd.Signum([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.25}],
                                        lr=0.5, momentum=0.5, weight_decay=0.25),
    "signsgd": lambda ps: signsgd.SignSGD(ps, lr=0.5),
    "lion": lambda ps: signsgd.Lion([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.25}],
                                    lr=0.5, betas=(0.5, 0.75), weight_decay=0.25),
    "efsgd_scaled": lambda ps: signsgd.EFSGD(ps, lr=0.5, momentum=0.5, weight_decay=0.25),
    "efsgd_identity": lambda ps: signsgd.EFSGD(ps, lr=0.5, compressor=Identity()),
    "efsgd_topk": lambda ps: signsgd.EFSGD(ps, lr=0.5, compressor=TopK(0.5)),
    "efsgd_randomk": lambda ps: signsgd.EFSGD(ps, lr=0.5, compressor=RandomK(0.5, seed=11)),
}


def _roundtrip(sd, how):
    """A copy of ``sd``: like torch.optim, state_dict() returns live references."""
    if how == "deepcopy":
        return copy.deepcopy(sd)
    if how == "pickle":
        return pickle.loads(pickle.dumps(sd))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", list(CKPT_CASES))
def test_state_dict_mid_run_continues_identically(name, how):
    params, grads = _random_setup(5, [torch.float64], [(3, 4), (5,), (2, 2), (9,)])
    make = CKPT_CASES[name]
    opt = make(params)
    for step in grads[:4]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    sd = _roundtrip(opt.state_dict(), how)
    saved = [p.detach().clone() for p in params]
    # The original keeps going ...
    for step in grads[4:]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    # ... and a fresh optimiser on a copy of the mid-run parameters follows it exactly.
    fresh_params = [torch.nn.Parameter(s) for s in saved]
    fresh = make(fresh_params)
    fresh.load_state_dict(sd)
    for step in grads[4:]:
        for p, g in zip(fresh_params, step):
            p.grad = g
        fresh.step()
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
    for a, b in zip(params, fresh_params):
        assert opt.state[a].keys() == fresh.state[b].keys()
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], fresh.state[b][key]), key


def test_state_dict_holds_buffers_and_compressor_state():
    (x,) = _params([[1.0, 2.0, 3.0, 4.0]])
    opt = signsgd.EFSGD([x], lr=0.5, compressor=RandomK(0.5, seed=1), momentum=0.5)
    x.grad = torch.ones(4, dtype=D)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"error", "momentum_buffer"}
    assert sd["compressor"]["generator"].dtype == torch.uint8
    assert "aggregator" not in sd
    with pytest.raises(ValueError, match="aggregator"):
        opt.load_state_dict({**sd, "aggregator": {"step": 1}})


def test_optimizer_with_randomk_pickles_and_deepcopies():
    (x,) = _params([[1.0, 2.0, 3.0, 4.0]])
    opt = signsgd.EFSGD([x], lr=0.5, compressor=RandomK(0.5, seed=1))
    clones = [pickle.loads(pickle.dumps(opt)).compressor, copy.deepcopy(opt).compressor,
              pickle.loads(pickle.dumps(opt.compressor))]
    v = torch.arange(16.0)
    first = opt.compressor(v)
    for c in clones:
        assert torch.equal(c(v), first)


# ----------------------------------------------------------------------------- EF invariant
class _Recording:
    """Wraps a compressor and records every (p, C(p))."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, p):
        c = self.inner(p)
        self.calls.append((p.clone(), c.clone()))
        return c


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("make", [Identity, Sign, ScaledSign, lambda: TopK(0.25),
                                  lambda: RandomK(0.25, seed=2)],
                         ids=["identity", "sign", "scaled_sign", "topk", "randomk"])
def test_ef_invariant_error_is_p_minus_transmitted(make, foreach):
    params, grads = _random_setup(9, [torch.float64], [(4, 3), (10,), (1,)])
    rec = _Recording(make())
    opt = signsgd.EFSGD(params, lr=0.1, compressor=rec, momentum=0.5, weight_decay=0.1,
                        foreach=foreach)
    for step in grads[:4]:
        for p, g in zip(params, step):
            p.grad = g
        before = [p.detach().clone() for p in params]
        rec.calls.clear()
        opt.step()
        live = [p for p, g in zip(params, step) if g is not None]
        assert len(rec.calls) == len(live)
        for p, (comp, sent) in zip(live, rec.calls):
            err = opt.state[p]["error"]
            assert torch.equal(err, comp - sent)                       # e = p − C(p)
            torch.testing.assert_close(sent + err, comp, rtol=0, atol=1e-15)  # p = C(p) + e
        for p, b, (_, sent) in zip(live, [b for b, g in zip(before, step) if g is not None],
                                   rec.calls):
            assert torch.equal(p.detach(), b - sent)                  # x ← x − Δ


# ----------------------------------------------------------------------------- vs torch SGD
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_efsgd_identity_matches_torch_sgd(wd, foreach):
    params, grads = _random_setup(3, [torch.float64], [(5, 4), (7,), (3, 3, 2)])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = signsgd.EFSGD(params, lr=0.05, compressor=Identity(), momentum=0.9,
                         weight_decay=wd, foreach=foreach)
    sgd = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=wd, foreach=foreach)
    for step in grads:
        for p, q, g in zip(params, ref, step):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ours.step()
        sgd.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)
    for p, q in zip(params, ref):
        if q in sgd.state:
            torch.testing.assert_close(ours.state[p]["momentum_buffer"],
                                       sgd.state[q]["momentum_buffer"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_efsgd_identity_nesterov_matches_torch_sgd(wd, foreach):
    params, grads = _random_setup(4, [torch.float64], [(5, 4), (7,)])
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = signsgd.EFSGD(params, lr=0.05, compressor=Identity(), momentum=0.9,
                         weight_decay=wd, nesterov=True, foreach=foreach)
    sgd = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=wd, nesterov=True,
                          foreach=foreach)
    for step in grads:
        for p, q, g in zip(params, ref, step):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ours.step()
        sgd.step()
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="nesterov=True needs a momentum > 0"):
        signsgd.EFSGD(params, lr=0.1, nesterov=True)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_maximize_is_minimising_the_negated_objective(name, foreach):
    a, b = _params([[1.0, -2.0, 0.5], [1.0, -2.0, 0.5]])
    up = OPTIMIZERS[name]([a], maximize=True, foreach=foreach)
    down = OPTIMIZERS[name]([b], foreach=foreach)
    for g in ([1.0, -0.5, 0.25], [0.5, 0.5, -2.0], [-1.0, 0.25, 0.0]):
        a.grad = torch.tensor(g, dtype=D)
        b.grad = -torch.tensor(g, dtype=D)
        up.step()
        down.step()
        assert torch.equal(a, b)
    for key in up.state[a]:
        assert torch.equal(up.state[a][key], down.state[b][key])
    assert up.param_groups[0]["maximize"] is True
    with pytest.raises(ValueError, match="maximize value: 'yes'"):
        OPTIMIZERS[name]([a], maximize="yes")


# ----------------------------------------------------------------------------- torch.optim API
def test_lr_scheduler_changes_the_step_size():
    (x,) = _params([[0.0, 0.0]])
    opt = signsgd.SignSGD([x], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    for _ in range(5):
        x.grad = torch.tensor([1.0, -1.0], dtype=D)
        before = x.detach().clone()
        opt.step()
        sched.step()
        seen.append((before - x.detach()).tolist())
    assert seen == [[0.5, -0.5], [0.5, -0.5], [0.25, -0.25], [0.25, -0.25],
                    [0.125, -0.125]]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_closure_returns_loss_and_zero_grad(name):
    (x,) = _params([[1.0, -2.0]])
    opt = OPTIMIZERS[name]([x])

    def closure():
        opt.zero_grad()
        loss = (x * x).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert x.grad is not None
    opt.zero_grad()
    assert x.grad is None
    assert opt.step() is None


@pytest.mark.parametrize("lr", [torch.tensor(0.5, dtype=D), torch.tensor([0.5])])
def test_tensor_learning_rate(lr):
    (x,) = _params([[1.0, -1.0]])
    opt = signsgd.Signum([x], lr=lr, momentum=0.5)
    x.grad = torch.tensor([2.0, 0.0], dtype=D)
    opt.step()
    assert x.tolist() == [0.5, -1.0]


def test_mixed_devices_and_dtypes_in_one_group():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float32))
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=D))
    c = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    for opt in (signsgd.Signum([a, b, c], lr=0.5, momentum=0.5),
                signsgd.EFSGD([a, b, c], lr=0.5)):
        for p in (a, b, c):
            p.data = torch.tensor([1.0, 2.0], dtype=p.dtype)
            p.grad = torch.tensor([1.0, -1.0], dtype=p.dtype)
        opt.step()
        for p in (a, b, c):
            assert p.dtype in (torch.float32, D, torch.bfloat16)
            assert p.tolist() == [0.5, 2.5]


# ----------------------------------------------------------------------------- bad input
def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
             if p in opt.state})


def _assert_unchanged(opt, params, snap):
    values, state = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in params if p in opt.state} == set(state)
    for p in params:
        for k, v in state.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v)


BAD_VALUES = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "later_step"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nonfinite_gradient_raises_naming_group_and_index(name, bad, first_step):
    a, b, c, d = _params([[1.0, 2.0], [0.5, -0.5, 0.25], [3.0], [1.0] * 70000])
    opt = OPTIMIZERS[name]([{"params": [a, b]}, {"params": [c, d], "lr": 0.25}])
    if not first_step:
        for p in (a, b, c, d):
            p.grad = torch.full_like(p, 0.5)
        opt.step()
    snap = _snapshot(opt, [a, b, c, d])
    for p in (a, b, c, d):
        p.grad = torch.full_like(p, -0.25)
    for target, where in ((d, "param group 1, index 1"), (b, "param group 0, index 1")):
        target.grad.view(-1)[-1] = bad
        with pytest.raises(NonFiniteGradientError, match=where):
            opt.step()
        _assert_unchanged(opt, [a, b, c, d], snap)
    assert issubclass(NonFiniteGradientError, ValueError)


def test_huge_finite_gradients_are_not_rejected():
    (x,) = _params([[1.0, 2.0, 3.0]])
    opt = signsgd.SignSGD([x], lr=0.5)
    x.grad = torch.tensor([1e308, 1e308, -1e308], dtype=D)  # the sum overflows; still finite
    opt.step()
    assert x.tolist() == [0.5, 1.5, 3.5]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_gradient_raises_at_step(name):
    a, b = _params([[1.0, 2.0], [3.0, 4.0]])
    opt = OPTIMIZERS[name]([a, b])
    a.grad = torch.ones(2, dtype=D)
    b.grad = torch.ones(2, dtype=D).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients.*param group 0, index 1"):
        opt.step()
    assert a.tolist() == [1.0, 2.0] and len(opt.state) == 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_complex_parameter_raises_at_step(name):
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=D))
    z = torch.nn.Parameter(torch.tensor([1 + 1j], dtype=torch.complex128))
    opt = OPTIMIZERS[name]([a, z])
    a.grad = torch.ones(2, dtype=D)
    z.grad = torch.ones(1, dtype=torch.complex128)
    with pytest.raises(RuntimeError, match=r"complex parameters.*param group 0, index 1"):
        opt.step()
    assert a.tolist() == [1.0, 2.0] and len(opt.state) == 0


BAD_HPARAMS = [
    ("lr", -0.1, "learning rate: -0.1"),
    ("lr", float("nan"), "learning rate: nan"),
    ("lr", float("inf"), "learning rate: inf"),
    ("lr", "0.1", "learning rate: '0.1'"),
    ("lr", torch.tensor([0.1, 0.2]), "learning rate"),
    ("momentum", 1.0, "momentum value: 1.0"),
    ("momentum", -0.5, "momentum value: -0.5"),
    ("momentum", float("nan"), "momentum value: nan"),
    ("weight_decay", -1e-4, "weight_decay value: -0.0001"),
    ("weight_decay", float("nan"), "weight_decay value: nan"),
    ("foreach", "yes", "foreach value: 'yes'"),
]
CLASSES = {
    "signsgd": signsgd.SignSGD,
    "signum": signsgd.Signum,
    "lion": signsgd.Lion,
    "efsgd": signsgd.EFSGD,
}
BAD_BETAS = [
    ((1.0, 0.99), r"beta parameter at index 0: 1.0"),
    ((0.9, -0.1), r"beta parameter at index 1: -0.1"),
    ((0.9, float("nan")), r"beta parameter at index 1: nan"),
    ((0.9,), r"betas: \(0.9,\)"),
    ("0.9", r"betas: '0.9'"),
]


@pytest.mark.parametrize("betas,message", BAD_BETAS)
def test_lion_bad_betas_raise_naming_the_value(betas, message):
    x = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=message):
        signsgd.Lion([x], lr=0.1, betas=betas)
    opt = signsgd.Lion([x], lr=0.1)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "betas": betas})


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("key,value,message", BAD_HPARAMS)
def test_bad_hyperparameters_raise_naming_the_value(cls, key, value, message):
    if cls in ("signsgd", "lion") and key == "momentum":
        pytest.skip(f"{cls} takes no momentum argument (Lion takes betas)")
    make = CLASSES[cls]
    x = torch.nn.Parameter(torch.ones(2))
    kwargs = {"lr": 0.1, key: value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make([x], **kwargs)
    # The same value in a per-group dict, at construction and via add_param_group.
    with pytest.raises(ValueError, match=message):
        make([{"params": [x], key: value}], lr=0.1)
    opt = make([x], lr=0.1)
    y = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [y], key: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", list(CLASSES))
@pytest.mark.parametrize("option,value", [("differentiable", True), ("capturable", True),
                                          ("fused", True), ("nesterov", True)])
def test_unsupported_torch_options_raise(cls, option, value):
    if cls == "efsgd" and option == "nesterov":
        pytest.skip("EFSGD implements nesterov (its heavy-ball momentum is torch SGD's)")
    x = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=f"does not support {option}=True"):
        CLASSES[cls]([x], lr=0.1, **{option: value})
    with pytest.raises(ValueError, match=f"does not support {option}=True"):
        CLASSES[cls]([{"params": [x], option: value}], lr=0.1)
    CLASSES[cls]([x], lr=0.1, **{option: False})  # the neutral value is accepted


def test_unknown_keyword_is_a_type_error():
    x = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        signsgd.Signum([x], lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="no momentum"):
        signsgd.SignSGD([x], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid compressor"):
        signsgd.EFSGD([x], lr=0.1, compressor="topk")


def test_compressor_that_changes_shape_raises_and_leaves_state():
    a, b = _params([[1.0, 2.0], [3.0, 4.0, 5.0]])
    opt = signsgd.EFSGD([a, b], lr=0.5, compressor=lambda v: v.sum())
    a.grad, b.grad = torch.ones(2, dtype=D), torch.ones(3, dtype=D)
    with pytest.raises(ValueError, match="compressor .* returned Tensor"):
        opt.step()
    assert a.tolist() == [1.0, 2.0] and len(opt.state) == 0


def test_aggregator_of_wrong_stage_is_rejected():
    from signsgd.distributed import MajorityVote

    class Voter(MajorityVote):
        pass

    x = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="cannot use aggregator Voter"):
        signsgd.EFSGD([x], lr=0.1, aggregator=Voter())


def test_sign_workspace_is_reused_and_never_saved(monkeypatch):
    monkeypatch.setattr(F, "_BATCH", 64)
    big, small = _params([[0.5] * 100, [0.25, -0.25]])
    opt = signsgd.Signum([big, small], lr=0.25, momentum=0.5)
    for _ in range(2):
        big.grad, small.grad = torch.ones(100, dtype=D), torch.ones(2, dtype=D)
        opt.step()
    (buf,) = opt._workspace._buffers.values()
    assert buf.numel() == 64 and buf.dtype == D  # one slice of _BATCH elements, reused
    assert big.tolist() == [0.0] * 100 and small.tolist() == [-0.25, -0.75]
    assert "_scratch" not in pickle.loads(pickle.dumps(opt)).__dict__
    assert "_scratch" not in str(opt.state_dict())
