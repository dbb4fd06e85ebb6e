"""The framework examples run as a user runs them (each in a fresh interpreter) and end
with their summary line; each is skipped when its framework is not installed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(("script", "args", "package", "summary"), [
    ("amp_grad_scaler.py", [], "torch",
     r"torch\.float16: accuracy 0\.[5-9]\d*, 1 step\(s\) skipped, weights torch\.float32"),
    ("lightning_signum.py", ["2"], "lightning", r"2 process\(es\): accuracy 0\.[3-9]"),
    ("accelerate_signum.py", ["2"], "accelerate",
     r"2 process\(es\): accuracy 0\.[3-9]\d*, 64 majority votes"),
    ("transformers_trainer.py", [], "transformers", r"Signum in the Trainer: loss 0\.[0-4]"),
    ("fsdp2_hsdp.py", ["4"], "torch",
     r"2 replicas x 2 shards: accuracy 0\.[5-9]\d*, identical on every rank: True"),
])
def test_example_runs(script, args, package, summary):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (its extra: pip install -e '.[{package}]')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert re.search(summary, done.stdout), done.stdout[-2000:]
