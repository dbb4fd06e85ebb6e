"""OneBitAdam: one process (the warm-up is AdamW), and Gloo groups of 1, 3 and 4 ranks (one
launch, tests/distributed/onebit_workers.py) against a float64 numpy reference of the
algorithm as DeepSpeed's source states it, written out here:

    warm-up, t <= F:  ḡ = mean_r g_r ;  m ← β1·m + (1−β1)·ḡ ;  v ← β2·v + (1−β2)·ḡ²
    after,   t >  F:  p_r = β1·m + (1−β1)·g_r + e_r ;  Δ_r = C(p_r) ;  e_r ← p_r − Δ_r
                      q = mean_r Δ_r + e_s ;  m = C(q) ;  e_s ← q − m      (M = 1: m = p_0)
    every step:       x ← x·(1 − lr·wd) − lr·m / (√v + ε)
                      (bias_correction: lr/(1 − β1^t) and √v/√(1 − β2^min(t, F)))

C is the scaled sign of each chunk (a tensor's part of one rank's shard of the flat vector,
shards of 64·⌈⌈d/64⌉/M⌉ coordinates): ±mean|chunk|, zero going out as +1.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

import signsgd
from distributed import onebit_workers as OW
from distributed import workers as W
from signsgd import registry
from signsgd.config import TrainConfig, freeze_step_of, validate
from signsgd.distributed import OneBitAllReduce
from signsgd.distributed.launch import spawn
from signsgd.errors import ConfigError


# ----------------------------------------------------------------------------- reference
def _shard(d: int, m: int) -> int:
    return 64 * math.ceil(math.ceil(d / 64) / m)


def _compress(flat: np.ndarray, lengths: list[int], m: int) -> np.ndarray:
    """C per chunk: the intersections of the tensors with the M shards."""
    d = flat.size
    c = _shard(d, m)
    cuts = sorted({0, d, *np.cumsum(lengths).tolist(), *range(0, d, c)})
    out = np.empty_like(flat)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = flat[lo:hi]
        out[lo:hi] = np.where(part >= 0, 1.0, -1.0) * np.abs(part).mean()
    return out


def reference(m: int, bias_correction: bool = False) -> dict[str, Any]:
    lr, (b1, b2), eps, wd = (OW.HP[k] for k in ("lr", "betas", "eps", "weight_decay"))
    freeze = OW.FREEZE
    x = [p.detach().numpy().copy() for p in W.make_params(torch.float64)]
    lengths = [t.size for t in x]
    d = sum(lengths)
    mom, v = [np.zeros_like(t) for t in x], [np.zeros_like(t) for t in x]
    err_w, err_s = [np.zeros(d) for _ in range(m)], np.zeros(d)
    traj = []
    for t in range(1, OW.STEPS + 1):
        grads = [[g.numpy() for g in W.grads_for([torch.from_numpy(a) for a in x], r, t - 1,
                                                  zeros=False)] for r in range(m)]
        if t <= freeze:
            mean = [sum(grads[r][i] for r in range(m)) / m for i in range(len(x))]
            mom = [b1 * a + (1 - b1) * g for a, g in zip(mom, mean)]
            v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, mean)]
        elif m == 1:
            mom = [b1 * a + (1 - b1) * g for a, g in zip(mom, grads[0])]
        else:
            sent = []
            for r in range(m):
                p = np.concatenate([(b1 * a + (1 - b1) * g).ravel()
                                    for a, g in zip(mom, grads[r])]) + err_w[r]
                sent.append(_compress(p, lengths, m))
                err_w[r] = p - sent[-1]
            q = sum(sent) / m + err_s
            flat = _compress(q, lengths, m)
            err_s = q - flat
            mom = [part.reshape(a.shape) for part, a in
                   zip(np.split(flat, np.cumsum(lengths)[:-1]), x)]
        step, bc2 = lr, 1.0
        if bias_correction:
            step, bc2 = lr / (1 - b1 ** t), 1 - b2 ** min(t, freeze)
        x = [a * (1 - lr * wd) - step * mm / (np.sqrt(vv) / math.sqrt(bc2) + eps)
             for a, mm, vv in zip(x, mom, v)]
        traj.append(x)
    return {"traj": traj, "err_w": err_w, "err_s": err_s}


# ----------------------------------------------------------------------------- Gloo
@pytest.fixture(scope="module")
def suite() -> list[dict[str, Any]]:
    return spawn(OW.onebit_suite, 4, timeout=240, pg_timeout=60)


def _close(a: torch.Tensor, b: np.ndarray) -> bool:
    return np.allclose(a.numpy(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("key", "m", "bias"), [("traj1", 1, False), ("traj3", 3, False),
                                                ("traj4", 4, False), ("traj3/bias", 3, True)])
def test_trajectory_across_the_freeze_matches_the_reference(suite, key, m, bias):
    ref = reference(m, bias)
    for rank, res in enumerate(suite[:m]):
        r = res[key]
        assert r["steps"] == OW.STEPS
        for step, (got, want) in enumerate(zip(r["traj"], ref["traj"])):
            assert all(_close(a, b) for a, b in zip(got, want)), (rank, step)
            assert all(torch.equal(a, b) for a, b in zip(got, suite[0][key]["traj"][step]))
        errors = np.concatenate([e.numpy().ravel() for e in r["errors"]])
        assert np.allclose(errors, ref["err_w"][rank], rtol=0, atol=1e-12)
        if m > 1:  # this rank's shard of the server error
            c = _shard(errors.size, m)
            mine = ref["err_s"][rank * c:(rank + 1) * c]
            assert np.allclose(r["server"].numpy()[:mine.size], mine, rtol=0, atol=1e-12)
            assert np.abs(errors).max() > 0 and (mine.size == 0 or np.abs(mine).max() > 0)


@pytest.mark.parametrize("at", [1, 3], ids=["warm-up", "frozen"])
def test_nan_on_one_rank_raises_on_every_rank_and_changes_nothing(suite, at):
    key = "nan/warm-up" if at == 1 else "nan/frozen"
    results = [res[key] for res in suite[:3]]
    assert all(r["error"] is not None and "non-finite" in r["error"] for r in results)
    assert "param group 0, index 1" in results[1]["error"]
    assert all(r["unchanged"] and r["steps"] == at + 1 for r in results)


def test_resume_before_the_freeze_is_bit_identical_past_it(suite):
    for res in suite[:3]:
        assert W._same(res["resume"], res["straight"])
        assert res["straight"]["sd"]["onebit"] == {"steps": OW.STEPS}
        assert res["straight"]["sd"]["aggregator"]["ef"]["server_error"] is not None


@pytest.mark.parametrize("key", ["lr", "freeze_step", "bias_correction"])
def test_hyperparameters_differing_across_ranks_raise_on_every_rank(suite, key):
    errors = [res[f"header/{key}"] for res in suite[:3]]
    assert all(e is not None and e.startswith("ValueError") and "hyper-parameters differ "
               "across ranks" in e for e in errors), errors


def test_bytes_after_the_freeze_are_at_most_a_25th_of_the_fp32_all_reduce(suite):
    for res in suite:
        r = res["bytes4"]
        assert r["numel"] == 100_000
        (warm, _), *frozen = r["sent"]
        assert warm >= r["allreduce"][0]  # the warm-up is the fp32 mean of the gradients
        for sent, received in frozen:
            assert 0 < sent <= r["allreduce"][0] / 25 and received <= r["allreduce"][1] / 25


# ----------------------------------------------------------------------------- one process
def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
            for s in ((4, 3), (5,))]


def _grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(50 + step)
    for p in params:
        p.grad = p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype)


HP = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("aggregator", [False, True], ids=["local", "staged"])
def test_warm_up_is_adamw(bias_correction, aggregator):
    """bias_correction=True: torch.optim.AdamW with the same hyper-parameters. False (as
    DeepSpeed): AdamW without bias correction, i.e. torch's AdamW with lr_t = lr·bc1/√bc2,
    eps_t = ε/√bc2 and weight decay wd·lr/lr_t at step t."""
    ours, theirs = _params(), _params()
    opt = signsgd.OneBitAdam(ours, **HP, freeze_step=10, bias_correction=bias_correction,
                             aggregator=OneBitAllReduce() if aggregator else None)
    adamw = torch.optim.AdamW(theirs, **HP)
    (b1, b2), (lr, eps, wd) = HP["betas"], (HP["lr"], HP["eps"], HP["weight_decay"])
    for step in range(6):
        _grads(ours, step)
        _grads(theirs, step)
        if not bias_correction:
            bc1, bc2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
            group = adamw.param_groups[0]
            group["lr"] = lr * bc1 / math.sqrt(bc2)
            group["eps"], group["weight_decay"] = eps / math.sqrt(bc2), wd * lr / group["lr"]
        opt.step()
        adamw.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_after_the_freeze_v_stays_and_the_local_and_staged_paths_agree():
    a, b = _params(), _params()
    local = signsgd.OneBitAdam(a, **HP, freeze_step=2)
    staged = signsgd.OneBitAdam(b, **HP, freeze_step=2, aggregator=OneBitAllReduce())
    for step in range(5):
        _grads(a, step)
        _grads(b, step)
        v = [local.state[p]["exp_avg_sq"].clone() for p in a] if step == 2 else None
        local.step()
        staged.step()
        if v is not None:
            assert all(torch.equal(x, local.state[p]["exp_avg_sq"]) for x, p in zip(v, a))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and local.steps == staged.steps == 5
    assert staged.bytes_sent == 0 and staged.frozen


def test_single_process_nan_changes_nothing_and_state_dict_round_trips():
    params = _params()
    opt = signsgd.OneBitAdam(params, **HP, freeze_step=1, aggregator=OneBitAllReduce())
    for step in range(2):
        _grads(params, step)
        opt.step()
    before = copy.deepcopy((W._snapshot(params), opt.state_dict()))
    params[0].grad[1, 1] = float("inf")
    with pytest.raises(signsgd.NonFiniteGradientError, match="param group 0, index 0"):
        opt.step()
    assert W._same(before, (W._snapshot(params), opt.state_dict()))
    other = signsgd.OneBitAdam(_params(), **HP, freeze_step=1,
                               aggregator=OneBitAllReduce())
    other.load_state_dict(opt.state_dict())
    assert W._same(other.state_dict(), opt.state_dict()) and other.steps == 2


@pytest.mark.parametrize(("over", "match"), [
    ({"freeze_step": 0}, "Invalid freeze_step: 0"),
    ({"freeze_step": 1.5}, "Invalid freeze_step: 1.5"),
    ({"eps": -1.0}, "Invalid epsilon value: -1.0"),
    ({"betas": (1.0, 0.9)}, "beta parameter at index 0: 1.0"),
    ({"bias_correction": "yes"}, "Invalid bias_correction: 'yes'"),
    ({"aggregator": "mean"}, "signsgd.distributed.OneBitAllReduce"),
    ({"amsgrad": True}, "does not support amsgrad=True"),
])
def test_bad_arguments_raise_naming_the_value(over, match):
    with pytest.raises(ValueError, match=match):
        signsgd.OneBitAdam(_params(), **{"freeze_step": 2, **over})


def test_bad_onebit_state_is_refused_and_changes_nothing():
    params = _params()
    opt = signsgd.OneBitAdam(params, freeze_step=2)
    _grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="'onebit'"):
        opt.load_state_dict({**sd, "onebit": {"steps": -1}})
    assert opt.steps == 1 and W._same(opt.state_dict(), sd)


# ----------------------------------------------------------------------------- registry, CLI
def test_registry_row_builds_it_with_its_reducer():
    w = [torch.nn.Parameter(torch.ones(3))]
    opt = registry.build("onebit-adam", w)
    assert type(opt) is signsgd.OneBitAdam and opt.bias_correction and opt.freeze_step == 100


@pytest.mark.parametrize(("steps", "given", "want"), [(600, None, 120), (3, None, 1),
                                                       (600, 50, 50)])
def test_freeze_step_defaults_to_a_fifth_of_the_run(steps, given, want):
    from signsgd.train import _make_optimizer

    c = validate(TrainConfig(optimizer="onebit-adam", steps=steps, freeze_step=given))
    assert freeze_step_of(c, steps) == want
    assert _make_optimizer(c, torch.nn.Linear(2, 1), 0, 1, steps).freeze_step == want


def test_freeze_step_with_another_optimizer_is_refused():
    with pytest.raises(ConfigError, match="--freeze-step: optimizer 'adamw' takes no freeze"):
        validate(TrainConfig(optimizer="adamw", freeze_step=10))
    with pytest.raises(ConfigError, match="--freeze-step must be an integer >= 1, got 0"):
        validate(TrainConfig(optimizer="onebit-adam", freeze_step=0))


def test_cli_trains_onebit_adam_with_its_freeze_step(tmp_path):
    from datafiles import write_random_fashion_mnist
    from signsgd import checkpoint
    from signsgd.cli import main

    write_random_fashion_mnist(tmp_path, 64, 16, seed=2)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path), "--model", "mlp", "--batch-size", "8",
                 "--steps", "4", "--no-progress", "--threads", "1", "--out", str(out),
                 "--optimizer", "onebit-adam", "--freeze-step", "2"]) == 0
    sd = checkpoint.read(out / "checkpoint.pt")["ranks"][0]["optimizer"]
    assert sd["onebit"] == {"steps": 4}
    assert all(len(st) == 2 for st in sd["state"].values())  # m and v (no aggregator)


@pytest.mark.parametrize("aggregator", [False, True], ids=["local", "staged"])
def test_coordinates_without_a_warm_up_gradient_stay_still_after_the_freeze(aggregator):
    """v = 0 at the freeze (DeepSpeed's exp_avg_mask): m stays 0 there, so no m / ε step."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    opt = signsgd.OneBitAdam([w], lr=0.1, freeze_step=2,
                             aggregator=OneBitAllReduce() if aggregator else None)
    for step in range(4):
        w.grad = torch.tensor([1.0, 0.0 if step < 2 else 5.0, -1.0], dtype=torch.float64)
        opt.step()
    assert w[1].item() == 2.0 and opt.state[w]["exp_avg"][1].item() == 0.0
    assert w[0].item() < 1.0 and w[2].item() > 3.0
