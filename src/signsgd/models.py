"""Models for the trainer, by name: ``mlp``, ``cnn``, ``resnet20``, ``vgg``.

* ``mlp`` — two hidden layers of 256 ReLU units (``hidden=`` sets other widths).
* ``cnn`` — a small CNN for 28×28 inputs (two 3×3 conv + max-pool stages of 16 and 32
  channels, a 128-unit hidden layer; about 0.21M parameters). No batch norm, so M workers
  with identical parameters compute identical functions. It is sized so that the demo
  (5 optimisers × 3 epochs of Fashion-MNIST) runs in minutes on two CPU cores.
* ``resnet20`` — the CIFAR-10 ResNet-20 of He et al. (2016), Section 4.2: 3 stages of
  3 basic blocks with 16/32/64 channels and parameter-free (option A) shortcuts;
  0.27M parameters.
* ``vgg`` — a small VGG-style net: conv–conv–pool stages of 32, 64 and 128 channels with
  batch norm, then a linear classifier.

Example:
    >>> import torch
    >>> from signsgd.models import build
    >>> build("cnn", (1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> count_parameters(build("mlp", (1, 1, 32), 10, hidden=(32,)))   # 32-32-10
    1386
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MODELS", "build", "count_parameters", "MLP", "SmallCNN", "ResNet20", "SmallVGG"]


class MLP(nn.Module):
    """Flatten → ``hidden`` (default 256 → 256) → classes, ReLU activations.

    Example:
        >>> MLP((1, 1, 32), 10, hidden=(32,))(torch.zeros(2, 1, 1, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 hidden: tuple[int, ...] = (256, 256)) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = [nn.Flatten()]
        width = c * h * w
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """conv3×3(16)–ReLU–pool, conv3×3(32)–ReLU–pool, linear(128)–ReLU, linear(classes)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 channels: tuple[int, int] = (16, 32), hidden: int = 128) -> None:
        super().__init__()
        c, h, w = in_shape
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        flat = c2 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers; option-A shortcut (subsample + zero-pad channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, :: self.stride, :: self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 images (He et al. 2016, §4.2): 0.27M parameters."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 blocks_per_stage: int = 3) -> None:
        super().__init__()
        c = in_shape[0]
        self.conv = nn.Conv2d(c, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        c_in = 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks_per_stage):
                layers.append(_BasicBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class SmallVGG(nn.Module):
    """[conv–BN–ReLU ×2, pool] for 32, 64, 128 channels, then global pool and a linear layer."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        c = in_shape[0]
        layers: list[nn.Module] = []
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                c = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


#: Model names accepted by :func:`build` and ``signsgd train --model``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet20": ResNet20,
    "vgg": SmallVGG,
}


def build(name: str, in_shape: tuple[int, int, int], num_classes: int = 10,
          **options: Any) -> nn.Module:
    """Build model ``name`` for images of shape ``in_shape = (C, H, W)``.

    ``options`` go to the model's constructor (e.g. ``hidden=(32,)`` for ``mlp``,
    ``channels=`` / ``hidden=`` for ``cnn``).

    Raises:
        ValueError: unknown name (the message lists the valid ones), an option the model
            does not take, or an input shape the model cannot take (``cnn`` needs H, W >= 4;
            ``vgg`` needs H, W >= 8).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    takes = [p for p in inspect.signature(MODELS[name]).parameters
             if p not in ("in_shape", "num_classes")]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"model {name!r} takes no option {', '.join(unknown)}; it takes "
                         f"{', '.join(takes) or 'none'}")
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape!r}")
    smallest = {"cnn": 4, "vgg": 8, "resnet20": 4, "mlp": 1}[name]
    if min(in_shape[1:]) < smallest:
        raise ValueError(
            f"model {name!r} needs images of at least {smallest}x{smallest}, got "
            f"{in_shape[1]}x{in_shape[2]}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](tuple(int(v) for v in in_shape), int(num_classes), **options)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _demo() -> None:  # pragma: no cover - manual check
    for n in MODELS:
        shape = (3, 32, 32) if n in ("resnet20", "vgg") else (1, 28, 28)
        m = build(n, shape)
        print(n, count_parameters(m), tuple(m(torch.zeros(2, *shape)).shape))


if __name__ == "__main__":  # pragma: no cover
    _demo()
