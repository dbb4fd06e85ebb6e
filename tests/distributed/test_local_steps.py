"""LocalSteps on real Gloo groups of 1, 3 and 4 ranks (one launch): H = 1 is SignSGD with
majority vote; H local SGD steps then a voted outer step against a float64 reference of
the algorithm; bytes only at synchronisations; mid-round resume; a NaN in a local step."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from signsgd.distributed.launch import spawn
from signsgd.distributed.random_bits import tie_bits

from . import local_workers as LW
from . import workers as W


@pytest.fixture(scope="module")
def suite() -> list[dict[str, Any]]:
    return spawn(LW.local_suite, 4, timeout=300, pg_timeout=60)


@pytest.mark.parametrize("m", [1, 3, 4])
def test_h1_with_inner_sgd_lr1_is_signsgd_with_majority_vote(suite, m):
    for res in suite[:m]:
        r = res[f"h1/{m}"]
        assert all(torch.equal(a, b) for a, b in zip(r["local"], r["signsgd"]))
        assert r["bytes"][0] == r["bytes"][1]


def reference(m: int, steps: int, h: int, beta: float, seed: int = 4) -> list[list[np.ndarray]]:
    """x_r ← x_r − g_r/4 for H steps; Δ_r = x0 − x_r; v = vote (zero → +1, ties from
    tie_bits(seed, round)); u ← β·u + (1−β)·v; x0 ← x0 − u/8; x_r ← x0."""
    x0 = [p.detach().numpy().copy() for p in W.make_params(torch.float64)]
    xs = [[t.copy() for t in x0] for _ in range(m)]
    u = [np.zeros_like(t) for t in x0]
    traj, syncs = [], 0
    for step in range(steps):
        for r in range(m):
            gs = W.grads_for([torch.from_numpy(t) for t in xs[r]], r, step, zeros=False)
            xs[r] = [t - 0.25 * g.numpy() for t, g in zip(xs[r], gs)]
        if (step + 1) % h == 0:
            flat = [np.concatenate([(a - b).ravel() for a, b in zip(x0, xs[r])])
                    for r in range(m)]
            tally = sum(np.where(f >= 0, 1, -1) for f in flat)
            d = tally.size
            ties = np.unpackbits(tie_bits(seed, syncs, 0, (d + 63) // 64).numpy(),
                                 bitorder="little")[:d]
            vote = np.where(tally > 0, 1.0, np.where(tally < 0, -1.0,
                                                      np.where(ties == 1, 1.0, -1.0)))
            off = 0
            for i, t in enumerate(x0):
                v = vote[off:off + t.size].reshape(t.shape)
                u[i] = u[i] + (1 - beta) * (v - u[i]) if beta else v
                x0[i] = t - 0.125 * u[i]
                off += t.size
            xs = [[t.copy() for t in x0] for _ in range(m)]
            syncs += 1
        traj.append([t.copy() for t in xs[0]])
    return traj


@pytest.mark.parametrize("key,steps,h,beta", [("vote/h2", 6, 2, 0.0),
                                              ("vote/h3/momentum", 9, 3, 0.5)])
def test_rounds_match_the_reference_and_every_rank(suite, key, steps, h, beta):
    ref = reference(3, steps, h, beta)
    for res in suite[:3]:
        r = res[key]
        for step in range(steps):
            if (step + 1) % h == 0:  # after a synchronisation every rank is at x0
                assert all(np.allclose(a.numpy(), b, rtol=0, atol=1e-12)
                           for a, b in zip(r["traj"][step], ref[step])), step
        assert all(torch.equal(a, b) for a, b in zip(r["traj"][-1], suite[0][key]["traj"][-1]))


@pytest.mark.parametrize("key,h", [("vote/h2", 2), ("ef/h2", 2), ("vote/h3/momentum", 3)])
def test_bytes_only_at_synchronisations(suite, key, h):
    sent = suite[0][key]["sent"]
    assert all((s > 0) == ((i + 1) % h == 0) for i, s in enumerate(sent))


def test_ef_variant_keeps_every_rank_identical(suite):
    first = suite[0]["ef/h2"]["traj"][-1]
    for res in suite[1:3]:
        assert all(torch.equal(a, b) for a, b in zip(res["ef/h2"]["traj"][-1], first))


def test_mid_round_resume_is_bit_identical(suite):
    for res in suite[:3]:
        r = res["resume"]
        assert r["position"] == 1  # saved after step 4 of rounds of 3
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"], r["uninterrupted"]))


@pytest.mark.parametrize("inner", ["signum", "sgd"])
def test_nan_in_a_local_step_raises_everywhere_at_the_sync(suite, inner):
    for res in suite[:3]:
        r = res[f"nan/{inner}"]
        assert [s for s, _ in r["errors"]] == [2], r["errors"]
        assert "rank(s) [1]" in r["errors"][0][1]
        assert r["anchor_unchanged"] and r["at_anchor"] and r["next_round_ok"]


def diloco_reference(m: int, steps: int, h: int) -> tuple[list[list[np.ndarray]], list]:
    """torchft's DiLoCo arithmetic in float64: Δ̄ = mean_r(x0 − x_r); x ← x0;
    Nesterov SGD on Δ̄ (b ← Δ̄ first, then b ← 0.9·b + Δ̄; x ← x − 0.7·(Δ̄ + 0.9·b));
    the last, partial round (steps % h local steps) synchronised the same way."""
    x0 = [p.detach().numpy().copy() for p in W.make_params(torch.float64)]
    xs = [[t.copy() for t in x0] for _ in range(m)]
    buf: list[np.ndarray] | None = None
    traj = []

    def sync() -> None:
        nonlocal x0, xs, buf
        mean = [sum(x0[i] - xs[r][i] for r in range(m)) / m for i in range(len(x0))]
        buf = mean if buf is None else [0.9 * b + g for b, g in zip(buf, mean)]
        x0 = [x - 0.7 * (g + 0.9 * b) for x, g, b in zip(x0, mean, buf)]
        xs = [[t.copy() for t in x0] for _ in range(m)]

    for step in range(steps):
        for r in range(m):
            gs = W.grads_for([torch.from_numpy(t) for t in xs[r]], r, step, zeros=False)
            xs[r] = [t - 0.25 * g.numpy() for t, g in zip(xs[r], gs)]
        if (step + 1) % h == 0:
            sync()
        traj.append([t.copy() for t in xs[0]])
    sync()
    return traj, x0


def test_diloco_is_the_mean_pseudo_gradient_under_nesterov_sgd(suite):
    ref, final = diloco_reference(3, 5, 2)
    for res in suite[:3]:
        r = res["diloco"]
        for step in (1, 3):
            assert all(np.allclose(a.numpy(), b, rtol=0, atol=1e-12)
                       for a, b in zip(r["traj"][step], ref[step])), step
        assert r["synchronised"]
        assert all(np.allclose(a.numpy(), b, rtol=0, atol=1e-12)
                   for a, b in zip(r["final"], final))
        assert all(torch.equal(a, b) for a, b in zip(r["final"], suite[0]["diloco"]["final"]))


@pytest.mark.parametrize("kind", ["vote", "ef", "mean"])
def test_a_parameter_without_gradients_anywhere_never_moves(suite, kind):
    for res in suite[:3]:
        r = res[f"absent/{kind}"]
        assert torch.equal(r["never"], torch.full((5,), 3.0, dtype=torch.float64))
        assert not torch.equal(r["rank0"], torch.full((3,), -1.0, dtype=torch.float64))
        assert torch.equal(r["rank0"], suite[0][f"absent/{kind}"]["rank0"])


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()


def _int8(x: np.ndarray, block: int = 256) -> np.ndarray:
    """Per block of 256 (blocks start at 0: shards are whole blocks) s = max|x|/127,
    q = round(x/s) half to even, decoded q·s."""
    pad = np.zeros(-(-x.size // block) * block)
    pad[:x.size] = x
    blocks = pad.reshape(-1, block)
    s = np.abs(blocks).max(axis=1) / 127
    q = np.round(blocks / np.where(s > 0, s, 1.0)[:, None])
    return (q * s[:, None]).reshape(-1)[:x.size]


@pytest.mark.parametrize("m", [3, 4])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_quantized_mean_matches_its_float64_definition(suite, precision, m):
    """Each rank's input quantized, the decoded copies summed in rank order and divided by
    M, the mean quantized again; a tensor absent on one rank contributes zeros there."""
    from signsgd.distributed.quantized import quantized_nbytes

    quant = {"bf16": _bf16, "int8": _int8}[precision]
    runs = [res[f"quantized/{precision}/{m}"] for res in suite[:m]]
    for step in range(2):
        flats = []
        for r, run in enumerate(runs):
            a, b = (t.numpy() for t in run["steps"][step]["inputs"])
            flats.append(quant(np.concatenate([a, np.zeros(45) if r == 1 else b])))
        total = flats[0].copy()
        for f in flats[1:]:
            total = total + f
        expected = quant(total / m)
        for r, run in enumerate(runs):
            got = run["steps"][step]
            assert np.array_equal(np.concatenate([t.numpy() for t in got["update"]]), expected)
            tx = got["transmitted"]
            assert (tx[1] is None) == (r == 1)
            assert np.array_equal(tx[0].numpy(), flats[r][:700])
            nbytes = quantized_nbytes(745, m, precision, itemsize=8)
            assert got["sent"] - nbytes == got["received"] - nbytes > 0  # plus the header
        assert all(run["state"] == {"step": 2} for run in runs)


def test_quantized_mean_sends_a_half_and_a_quarter_of_fp32():
    from signsgd.distributed.quantized import quantized_nbytes
    from signsgd.distributed.reducer import ring_nbytes

    fp32 = ring_nbytes(10**6, 4, 4)
    assert 0.5 <= quantized_nbytes(10**6, 4, "bf16") / fp32 < 0.51
    assert 0.25 <= quantized_nbytes(10**6, 4, "int8") / fp32 < 0.26


def test_diloco_with_the_int8_mean_keeps_every_rank_identical(suite):
    first = suite[0]["diloco/int8"]
    assert first["sent"] > 0
    for res in suite[1:3]:
        assert all(torch.equal(a, b) for a, b in zip(res["diloco/int8"]["final"],
                                                     first["final"]))
