"""The package imports, exposes its public names, and its docstring examples run."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

import signsgd


def test_import_and_step() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = signsgd.Signum([w], lr=0.1, momentum=0.5)
    (w**2).sum().backward()
    opt.step()
    assert torch.equal(w.data, torch.tensor([0.9, -0.9]))


def test_public_names() -> None:
    for name in ("SignSGD", "Signum", "EFSGD", "pack_signs", "unpack_signs", "compression"):
        assert name in signsgd.__all__ and hasattr(signsgd, name)
    for name in ("Identity", "Sign", "ScaledSign", "TopK", "RandomK"):
        assert hasattr(signsgd.compression, name)
    for cls in (signsgd.SignSGD, signsgd.Signum, signsgd.EFSGD):
        assert issubclass(cls, torch.optim.Optimizer)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        signsgd.nope  # noqa: B018


MODULES = ["signsgd", "signsgd.functional", "signsgd.optim", "signsgd.compression",
           "signsgd.registry", "signsgd.scratch", "signsgd.errors",
           "signsgd.distributed.reducer", "signsgd.distributed.vote",
           "signsgd.distributed.error_feedback", "signsgd.distributed.header",
           "signsgd.distributed.random_bits", "signsgd.distributed.engine",
           "signsgd.distributed.average", "signsgd.distributed.local_steps",
           "signsgd.reduction", "signsgd.outer", "signsgd.distributed.codecs",
           "signsgd.distributed.quantized", "signsgd.distributed.onebit",
           "signsgd.tasks", "signsgd.text", "signsgd.transformer", "signsgd.onebit_adam",
           "signsgd.distributed.ledger", "signsgd.loop"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"
    assert result.attempted > 0, f"no examples found in {name}"


@pytest.mark.parametrize("name", MODULES[1:])
def test_every_public_name_is_documented_with_an_example(name: str) -> None:
    module = importlib.import_module(name)
    for public in module.__all__:
        obj = getattr(module, public)
        doc = obj.__doc__ or ""
        assert doc.strip(), f"{name}.{public} has no docstring"
        if public in ("Compressor", "NonFiniteGradientError") or isinstance(obj, type) and \
                issubclass(obj, Exception) or not callable(obj):
            continue
        assert ">>>" in doc, f"{name}.{public} has no runnable example"
