"""Quickstart: train a small model with Signum on one process and print the loss.

Run: python examples/quickstart.py
"""

import torch

import signsgd

torch.manual_seed(0)
# A synthetic 10-class problem: inputs in R^32, labels from a fixed random linear teacher.
x = torch.randn(4096, 32)
y = (x @ torch.randn(32, 10)).argmax(dim=1)

model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = signsgd.Signum(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
loss_fn = torch.nn.CrossEntropyLoss()

for epoch in range(5):
    perm = torch.randperm(len(x))
    for i in range(0, len(x), 128):
        idx = perm[i : i + 128]
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        full = loss_fn(model(x), y).item()
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch + 1}: loss {full:.4f}  accuracy {acc:.3f}")
