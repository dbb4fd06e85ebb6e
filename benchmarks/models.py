"""The benchmarks' own ResNet-18 (ImageNet layout, 11.7M parameters): the model whose training
steps ``bench_e2e`` times, beside the library's models (:mod:`signsgd.models`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["resnet18"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.down(x))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2016, ImageNet layout): 7×7 stem, 4 stages of 2 basic blocks,
    64/128/256/512 channels, global pooling, a linear classifier; 11,689,512 parameters
    with 1000 classes — the same parameter shapes as ``torchvision.models.resnet18``.

    Example:
        >>> sum(p.numel() for p in resnet18().parameters())
        11689512
    """
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for i, c in enumerate((64, 128, 256, 512)):
        layers += [_Block(c_in, c, 1 if i == 0 else 2), _Block(c, c, 1)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, num_classes))
