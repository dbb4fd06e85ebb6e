import torch

import signsgd


def test_import_and_step() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = signsgd.Signum([w], lr=0.1, momentum=0.5)
    (w**2).sum().backward()
    opt.step()
    assert torch.equal(w.data, torch.tensor([0.9, -0.9]))
