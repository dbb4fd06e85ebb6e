"""signsgd.models: names, output shapes, parameter counts."""

from __future__ import annotations

import pytest
import torch

from signsgd.models import MODELS, build, count_parameters


@pytest.mark.parametrize(
    "name, shape",
    [("mlp", (1, 28, 28)), ("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32)),
     ("vgg", (3, 32, 32)), ("mlp", (3, 32, 32)), ("cnn", (3, 32, 32)), ("vgg", (1, 28, 28)),
     ("resnet20", (1, 28, 28))],
)
def test_output_shapes(name, shape):
    torch.manual_seed(0)
    model = build(name, shape, 10)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet20_has_027m_parameters():
    n = count_parameters(build("resnet20", (3, 32, 32)))
    assert 0.26e6 < n < 0.28e6, n  # He et al. 2016, Table 6: 0.27M


@pytest.mark.parametrize("name, low, high", [("cnn", 1e5, 5e5), ("mlp", 1e5, 5e5),
                                             ("vgg", 1e5, 1e6)])
def test_small_models_are_small(name, low, high):
    shape = (3, 32, 32) if name == "vgg" else (1, 28, 28)
    assert low < count_parameters(build(name, shape)) < high


def test_unknown_model_lists_valid():
    with pytest.raises(ValueError) as e:
        build("resnet50", (3, 32, 32))
    assert "unknown model 'resnet50'" in str(e.value)
    for name in MODELS:
        assert name in str(e.value)


@pytest.mark.parametrize("shape, match", [((1, 2, 2), "at least"), ((1, 28), "in_shape")])
def test_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        build("cnn", shape)


def test_same_seed_same_model():
    torch.manual_seed(3)
    a = build("cnn", (1, 28, 28))
    torch.manual_seed(3)
    b = build("cnn", (1, 28, 28))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name, shape, options, params", [
    ("mlp", (1, 1, 32), {"hidden": (32,)}, 32 * 32 + 32 + 32 * 10 + 10),
    ("mlp", (1, 28, 28), {"hidden": (32,)}, 784 * 32 + 32 + 32 * 10 + 10),
    ("mlp", (1, 2, 2), {"hidden": ()}, 4 * 10 + 10),
    ("cnn", (1, 28, 28), {"channels": (4, 8), "hidden": 16},
     (9 * 4 + 4) + (36 * 8 + 8) + (8 * 7 * 7 * 16 + 16) + (16 * 10 + 10)),
])
def test_build_passes_options(name, shape, options, params):
    model = build(name, shape, 10, **options)
    assert count_parameters(model) == params
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name, option", [("mlp", "width"), ("resnet20", "hidden")])
def test_build_rejects_unknown_options(name, option):
    with pytest.raises(ValueError, match=f"model {name!r} takes no option {option}"):
        build(name, (3, 32, 32), 10, **{option: 1})
