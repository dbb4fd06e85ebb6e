"""The CUDA paths, checked against the CPU: optimiser steps, packing, the vote and the
trainer on a GPU (each test skips with its reason without one).

Run on the device machine by ``make gpu-check`` (benchmarks/gpu_check.py); on CPU-only
machines every test here is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import signsgd
from signsgd.compression import ScaledSign
from signsgd.packing import majority_tally, pack_signs, unpack_signs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")

OPTIMIZERS = {
    "signum": lambda ps: signsgd.Signum(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "lion": lambda ps: signsgd.Lion(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "efsgd": lambda ps: signsgd.EFSGD(ps, lr=0.1, compressor=ScaledSign(), momentum=0.9),
    "onebit-adam": lambda ps: signsgd.OneBitAdam(ps, lr=1e-2, weight_decay=0.1,
                                                 freeze_step=2),  # across the freeze
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimiser_on_cuda_follows_the_cpu(name):
    """Dyadic inputs: the same sign decisions and (for the sign methods) the same values."""
    g = torch.Generator().manual_seed(0)
    cpu = [torch.nn.Parameter(torch.round(torch.randn(s, generator=g) * 4) / 4)
           for s in ((37, 5), (300,))]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    a, b = OPTIMIZERS[name](cpu), OPTIMIZERS[name](gpu)
    for _ in range(5):
        grads = [torch.round(torch.randn(p.shape, generator=g) * 8) / 8 for p in cpu]
        for p, q, gr in zip(cpu, gpu, grads):
            p.grad, q.grad = gr, gr.cuda()
        a.step()
        b.step()
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packing_on_cuda_is_byte_identical(dtype):
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[::97] = 0
    packed = pack_signs(x.cuda())
    assert torch.equal(packed.cpu(), pack_signs(x))
    out = torch.empty(x.numel(), dtype=torch.float32, device="cuda")
    assert torch.equal(unpack_signs(packed, x.numel(), out=out).cpu(),
                       unpack_signs(pack_signs(x), x.numel()))
    rows = torch.randint(0, 256, (5, 4096), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(2))
    assert torch.equal(majority_tally(rows.cuda()).cpu(), majority_tally(rows))


def test_vote_and_reducers_on_an_nccl_group_of_one(tmp_path):
    """A world-size-1 NCCL group: the vote, the EF all-reduce, AllReduce and the bf16 / int8
    means on CUDA tensors (the header travels on the GPU), against the same calls on CPU."""
    script = tmp_path / "one.py"
    script.write_text('''
import torch, torch.distributed as dist
from signsgd.compression import ScaledSign
from signsgd.distributed import (AllReduce, ErrorFeedbackAllReduce, MajorityVote,
                                 QuantizedMean, majority_vote)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29573", rank=0, world_size=1)
x = torch.randn(10_001, generator=torch.Generator().manual_seed(3))
ok = torch.equal(majority_vote(x.cuda()).cpu(), majority_vote(x))
ok &= torch.equal(MajorityVote().reduce([x.cuda()]).update[0].cpu(),
                  MajorityVote().reduce([x]).update[0])
ok &= torch.allclose(ErrorFeedbackAllReduce().reduce([x.cuda()], compressor=ScaledSign())
                     .update[0].cpu(), ErrorFeedbackAllReduce().reduce(
                         [x], compressor=ScaledSign()).update[0])
ok &= torch.equal(AllReduce().reduce([x.cuda()]).update[0].cpu(), x)
for precision in ("bf16", "int8"):  # the DiLoCo family's outer reducers
    ok &= torch.allclose(QuantizedMean(precision).reduce([x.cuda()]).update[0].cpu(),
                         QuantizedMean(precision).reduce([x]).update[0])
from signsgd.distributed import LocalSteps
def diloco(device, reducer):  # LocalSteps, AdamW inside, Nesterov outside, 2 rounds
    w = torch.nn.Parameter(torch.randn(257, generator=torch.Generator().manual_seed(5))
                           .to(device))
    opt = LocalSteps(torch.optim.AdamW([w], lr=1e-2), sync_every=3, reducer=reducer(),
                     outer_optimizer=torch.optim.SGD([w], lr=0.7, momentum=0.9,
                                                     nesterov=True))
    for t in range(6):
        w.grad = torch.cos(torch.arange(257.0, device=device) + t)
        opt.step()
    return w.detach().cpu()
for reducer in (ErrorFeedbackAllReduce, lambda: QuantizedMean("int8")):
    ok &= torch.allclose(diloco("cuda", reducer), diloco("cpu", reducer), atol=1e-5)
dist.destroy_process_group()
print("OK" if ok else "MISMATCH")
''')
    env = {**os.environ, "PYTHONPATH": str(Path(signsgd.__file__).parents[1])}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def test_trainer_on_cuda_with_bf16(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 200)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "signsgd.cli", "train", "--data", f"text:{text}", "--model",
           "gpt", "--n-layer", "2", "--d-model", "64", "--n-head", "2", "--block-size", "32",
           "--batch-size", "8", "--steps", "20", "--device", "cuda", "--precision", "bf16",
           "--optimizer", "lion", "--lr", "1e-3", "--no-progress", "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(Path(signsgd.__file__).parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((run / "summary.json").read_text())["val_loss"] < 4.0
