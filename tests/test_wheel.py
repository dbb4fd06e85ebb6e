"""The library as a user installs it: a wheel built from the repository asks for torch and
numpy only, and installed beside torch, numpy and what they need (nothing else of this
environment), ``signsgd`` and ``signsgd.distributed`` import and an optimiser steps."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need (their non-extra requirements, transitively)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.split(r"[<>=!~; \[]", todo.pop(), maxsplit=1)[0].strip()
        key = name.lower().replace("_", "-")
        if not key or key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(key)
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return seen


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (path,) = out.glob("signsgd-*.whl")
    return path


def test_the_wheel_asks_for_torch_and_numpy_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    assert sorted(r for r in requires if "extra ==" not in r) == ["numpy>=1.24", "torch>=2.2"]


def test_the_library_imports_and_steps_with_torch_and_numpy_only(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # a pure-Python wheel installs by unpacking it
        z.extractall(site)
    deps = tmp_path / "deps"  # links to torch, numpy and their requirements, nothing else
    deps.mkdir()
    for name in _closure(["torch", "numpy"]):
        for f in md.distribution(name).files or []:
            top = f.parts[0]
            src = Path(f.locate()).parents[len(f.parts) - 1] / top
            if not (deps / top).exists() and src.exists() and not top.endswith(".dist-info"):
                (deps / top).symlink_to(src)
    code = (f"import sys; sys.path[:0] = [{str(site)!r}, {str(deps)!r}]\n"
            "import torch, signsgd, signsgd.distributed\n"
            "assert signsgd.__file__.startswith(sys.path[0]), signsgd.__file__\n"
            "w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))\n"
            "opt = signsgd.Signum([w], lr=0.1, momentum=0.5)\n"
            "(w ** 2).sum().backward(); opt.step()\n"
            "import importlib.util as u\n"
            "print(w.data.tolist(), u.find_spec('rich'), u.find_spec('matplotlib'))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[0.8999999761581421,", "-0.8999999761581421]", "None",
                                  "None"]
