"""signsgd: sign-based compressed optimisation for PyTorch.

signSGD and Signum (Bernstein et al., ICML 2018), majority vote across workers with 1 bit
per coordinate each way, and error feedback (EF-SGD / EF-signSGD, Karimireddy et al.,
ICML 2019); Lion and Distributed Lion (Chen et al. 2023; Liu et al. 2024); 1-bit Adam(W)
(Tang et al. 2021). The conventions are stated in ``docs/design.md``.

Example:
    >>> import torch, signsgd
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = signsgd.Signum(model.parameters(), lr=1e-3, momentum=0.9)
    >>> loss = model(torch.ones(2, 3)).pow(2).mean()
    >>> loss.backward(); opt.step(); opt.zero_grad()
    >>> ef = signsgd.EFSGD(model.parameters(), lr=0.1,
    ...                    compressor=signsgd.compression.TopK(0.1))
"""

from signsgd import compression
from signsgd.errors import NonFiniteGradientError
from signsgd.onebit_adam import OneBitAdam
from signsgd.optim import EFSGD, Lion, SignSGD, Signum
from signsgd.packing import pack_signs, unpack_signs

__version__ = "0.1.0"

__all__ = [
    "SignSGD", "Signum", "Lion", "EFSGD", "OneBitAdam",
    "NonFiniteGradientError", "pack_signs", "unpack_signs", "compression",
]


def __getattr__(name: str):  # lazy: importing signsgd does not import torch.distributed glue
    if name == "distributed":
        import importlib

        return importlib.import_module("signsgd.distributed")
    raise AttributeError(f"module 'signsgd' has no attribute {name!r}")
