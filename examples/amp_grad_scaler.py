"""AMP with signsgd: bf16 autocast, and fp16 autocast with ``torch.amp.GradScaler``.

    python examples/amp_grad_scaler.py

The weights stay fp32 (autocast runs the matmuls in 16 bits): a sign step moves every
coordinate by exactly lr, which a 16-bit weight cannot hold when lr is below half its
spacing. With fp16 the GradScaler unscales the gradients before ``Signum.step`` and skips
the step of a batch that overflowed (here an inf planted in batch 50): the parameters and
the momentum stay as they were, and the scale halves. Without a scaler (bf16),
``Signum.step`` raises ``NonFiniteGradientError`` for that batch, again before it changes
anything, and the loop goes on.
"""

import torch
from torch import nn

import signsgd

torch.manual_seed(0)
x = torch.randn(4096, 32)
y = (x @ torch.randn(32, 10)).argmax(dim=1)

for dtype in (torch.bfloat16, torch.float16):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = signsgd.Signum(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    skipped = 0
    for step in range(200):
        idx = torch.randint(0, len(x), (64,))
        xb = x[idx].clone()
        if step == 50:
            xb[0, 0] = float("inf")                  # an overflowing batch
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(xb), y[idx])
        if scaler.is_enabled():
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)                         # skipped if a gradient is inf/NaN
            scaler.update()
            skipped += scaler.get_scale() < scale    # the scale halved: a skipped step
        else:
            loss.backward()
            try:
                opt.step()
            except signsgd.NonFiniteGradientError:  # raised before anything changed
                skipped += 1
        opt.zero_grad()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"{dtype}: accuracy {acc:.3f}, {skipped} step(s) skipped, weights "
          f"{model[0].weight.dtype}")
