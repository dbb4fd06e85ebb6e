r"""1-bit Adam(W) (Tang et al. 2021): Adam with an fp32 warm-up, then the variance frozen and
the momentum communicated with the error-compensated 1-bit all-reduce.

:class:`OneBitAdam` follows the algorithm of DeepSpeed's ``OnebitAdam``
(``deepspeed/runtime/fp16/onebit/adam.py``, with ``compressed_allreduce`` of
``deepspeed/runtime/comm/nccl.py``), on this library's pipeline (gather and check → local
transform → reduce → commit). :class:`~signsgd.distributed.OneBitAllReduce` is its reducer:
one fp32 mean
(:class:`~signsgd.distributed.AllReduce`) for the warm-up and one two-stage error-feedback
all-reduce (:class:`~signsgd.distributed.ErrorFeedbackAllReduce` with
:class:`~signsgd.compression.ScaledSign`) after the freeze, both on one process group.

Where this implementation differs from DeepSpeed's, on purpose:

* DeepSpeed's first ``step()`` is an initialisation pass: it allocates the compression
  buffers, discards the gradient, moves nothing and still counts as step 1, so it runs
  ``freeze_step − 1`` Adam steps before the freeze. Here every step is a step: the first
  ``freeze_step`` steps are Adam steps.
* DeepSpeed compresses with one scale ``‖v‖₂/√n`` per tensor (worker) and per rank's chunk
  of it (server), zero sent as +1. Here the scale is ScaledSign's ``‖v‖₁/n`` (the scale that
  minimises ``‖v − s·sign(v)‖₂``) per *chunk*, the intersection of a tensor with a rank's
  shard of all the tensors concatenated (:class:`~signsgd.distributed.ErrorFeedbackAllReduce`);
  zero also goes out as +1.
* DeepSpeed multiplies the reduced momentum by a mask the user gives (``exp_avg_mask``)
  for coordinates whose momentum should stay zero; here the mask is ``v > 0``, computed.
* DeepSpeed resets the worker and server errors when a checkpoint is loaded; here they are
  part of the state (the optimiser's ``"error"`` per parameter, the reducer's server error),
  so a resumed run is bit-identical to an uninterrupted one.

Example:
    >>> import torch, signsgd
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    >>> opt = signsgd.OneBitAdam([w], lr=0.1, freeze_step=1)
    >>> w.grad = torch.tensor([1.0, -2.0]); opt.step(); opt.steps
    1
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from signsgd.compression import ScaledSign
from signsgd.optim import Fresh, Plan, StagedOptimizer, check_number, reject_options, scalar
from signsgd.reduction import Reducer

__all__ = ["OneBitAdam"]

_SIGNS = ScaledSign()  # what the momentum is sent with after the freeze (stateless)


class OneBitAdam(StagedOptimizer):
    r"""1-bit Adam(W) (Tang et al. 2021, DeepSpeed's ``OnebitAdam``).

    Steps ``t = 1 … freeze_step`` (warm-up), on the mean gradient ``ḡ`` of the ranks:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\,\bar g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2)\,\bar g^2,\quad
        x \leftarrow x - \mathrm{lr}\,\bigl(m / (\sqrt v + \epsilon) + \mathrm{wd}\,x\bigr)

    After the freeze ``v`` stays as it is; each rank updates its own momentum with its own
    gradient and the momenta are reduced by the error-compensated 1-bit all-reduce:

    .. math::
        p_r = \beta_1 m + (1-\beta_1)\,g_r + e_r,\quad e_r \leftarrow p_r - C(p_r),\quad
        m \leftarrow \mathrm{AR}_{1\text{-bit}}(p),\quad
        x \leftarrow x - \mathrm{lr}\,\bigl(m / (\sqrt v + \epsilon) + \mathrm{wd}\,x\bigr)

    ``C`` is the scaled sign per chunk; the all-reduce's server stage keeps its own error
    (:class:`~signsgd.distributed.OneBitAllReduce`), and every rank gets the same ``m``.
    Weight decay is decoupled (AdamW's ``x ← x − lr·wd·x``, DeepSpeed's ``update += wd·x``).

    **Bias correction.** DeepSpeed takes a ``bias_correction`` argument and never uses it:
    its update is ``m / (√v + ε)`` with no correction, in the warm-up and after. That is the
    default here (``bias_correction=False``), so the warm-up is AdamW *without* bias
    correction. ``bias_correction=True`` uses Adam's ``m / (1 − β1^t)`` and
    ``v / (1 − β2^min(t, freeze_step))`` (the correction of the frozen ``v`` is frozen with
    it): the warm-up is then ``torch.optim.AdamW`` with the same hyper-parameters, which
    matters on short runs, where ``1 − β2^freeze_step`` is far from 1.

    Without an aggregator (one process) the same algorithm runs on the local gradient with
    nothing to compress. One step counter (:attr:`steps`, successful steps that moved a
    parameter) serves every parameter; its phase, ``freeze_step`` and ``bias_correction``
    must agree on every rank (checked in the step header). A parameter without a gradient
    on this rank contributes zero to the mean. A coordinate whose ``v`` is zero at the
    freeze (no nonzero gradient in the warm-up: a dead unit, an unseen token's embedding)
    keeps ``m = 0`` and moves only by weight decay: 1-bit compression cannot send an exact
    zero, and ``m / ε`` would throw it away. DeepSpeed asks the user for this mask
    (``exp_avg_mask``, applied to ``m`` after the all-reduce); here it is ``v > 0``.
    ``foreach`` is accepted for ``torch.optim`` compatibility: there is one implementation,
    with the multi-tensor kernels.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0; default 1e-3).
        betas: ``(β1, β2)``, each in [0, 1).
        eps: added to ``√v`` (>= 0).
        weight_decay: decoupled weight decay (>= 0).
        freeze_step: warm-up steps before ``v`` is frozen and the momentum compressed
            (an integer >= 1; DeepSpeed advises roughly 15-25 % of the training steps).
        aggregator: ``None`` (one process) or :class:`~signsgd.distributed.OneBitAllReduce`.
        bias_correction: Adam's bias correction (default ``False``, as DeepSpeed).
        foreach: accepted, see above.
        maximize: ascend the objective (the step uses −g), as in ``torch.optim``.

    Raises:
        ValueError: a hyper-parameter out of range, an aggregator that is not a
            :class:`~signsgd.distributed.OneBitAllReduce`, or an unsupported ``torch.optim`` option.

    Example:
        >>> import torch, signsgd
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = signsgd.OneBitAdam([w], lr=0.5, betas=(0.5, 0.75), eps=0.0, freeze_step=2)
        >>> w.grad = torch.tensor([2.0, -2.0]); opt.step()
        >>> w.data, opt.state[w]["exp_avg"], opt.state[w]["exp_avg_sq"]
        (tensor([ 0.5000, -0.5000]), tensor([ 1., -1.]), tensor([1., 1.]))

    Reference: Tang et al., 1-bit Adam: Communication Efficient Large-Scale Training with
    Adam's Convergence Speed, ICML 2021.
    """

    _pickled = ("aggregator", "freeze_step", "bias_correction", "steps")

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, freeze_step: int,
                 aggregator: Reducer | None = None, bias_correction: bool = False,
                 foreach: bool | None = None, maximize: bool = False,
                 **unsupported: Any) -> None:
        name = type(self).__name__
        reject_options(name, unsupported)
        if not isinstance(freeze_step, int) or isinstance(freeze_step, bool) or freeze_step < 1:
            raise ValueError(f"Invalid freeze_step: {freeze_step!r} (must be an integer >= 1)")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"Invalid bias_correction: {bias_correction!r} (must be a bool)")
        if aggregator is not None:  # it must serve both phases
            try:
                aggregator.check_compressor(None)
                aggregator.check_compressor(_SIGNS)
            except (AttributeError, ValueError) as exc:
                raise ValueError(
                    f"{name} cannot use aggregator {type(aggregator).__name__}: it needs a "
                    "reducer of the fp32 mean (the warm-up) and of scaled signs (after the "
                    f"freeze), signsgd.distributed.OneBitAllReduce ({exc})") from None
        self.freeze_step, self.bias_correction = freeze_step, bias_correction
        self.steps = 0          # successful steps (the phase), checkpointed
        self._moved = False
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize)
        super().__init__(params, defaults, aggregator)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyper-parameters (``eps`` too) are validated first."""
        if isinstance(param_group, dict):
            check_number("epsilon value", {**self.defaults, **param_group}["eps"], 0.0, None,
                          False)
        super().add_param_group(param_group)

    @property
    def frozen(self) -> bool:
        """Whether the next step is past the freeze (``v`` frozen, the momentum compressed)."""
        return self.steps >= self.freeze_step

    def _compressor(self) -> ScaledSign | None:
        return _SIGNS if self.frozen else None

    def _settings(self) -> tuple[Any, ...]:
        return (*super()._settings(),
                ("onebit", self.freeze_step, self.bias_correction, self.steps))

    # ------------------------------------------------------------------ the step
    def _apply(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor] | None,
               momenta: list[Tensor] | None = None) -> None:
        """``m`` ← its EMA with ``grads`` (or ← ``momenta``), ``v`` likewise before the
        freeze (after it ``m`` ← 0 where ``v = 0``), then
        ``x ← x·(1 − lr·wd) − lr'·m / (√v' + ε)``."""
        b1, b2 = (scalar(b) for b in group["betas"])
        lr, wd, eps = scalar(group["lr"]), scalar(group["weight_decay"]), scalar(group["eps"])
        t, frozen = self.steps + 1, self.frozen
        ms, vs = self._buffers(params, "exp_avg"), self._buffers(params, "exp_avg_sq")
        if momenta is None:
            torch._foreach_lerp_(ms, grads, 1.0 - b1)
        else:
            torch._foreach_copy_(ms, momenta)
        if frozen:  # m ← 0 where v = 0 (sign(v) is 0 or 1): DeepSpeed's exp_avg_mask
            torch._foreach_mul_(ms, torch._foreach_sign(vs))
        else:
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        step = lr
        if self.bias_correction:
            step = lr / (1.0 - b1 ** t)
            torch._foreach_div_(denom, math.sqrt(1.0 - b2 ** min(t, self.freeze_step)))
        torch._foreach_add_(denom, eps)
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_addcdiv_(params, ms, denom, value=-step)

    def _local(self, work: Any) -> None:
        super()._local(work)
        if any(params for _, params, _ in work):
            self.steps += 1

    def _reduced_step(self, work: Any) -> None:
        self._moved = False
        super()._reduced_step(work)
        if self._moved:
            self.steps += 1

    def _local_step(self, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        self._apply(group, params, grads)

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
                   ) -> Plan:
        """Warm-up: the gradients (their mean comes back). After the freeze: this rank's
        ``p = β1·m + (1−β1)·g + e``, out of place; on commit ``e ← p − C(p)``."""
        if not self.frozen:
            return Plan(params, list(grads))
        fresh: Fresh = {}
        ms, errors = self._buffers(params, "exp_avg", fresh), self._buffers(params, "error", fresh)
        b1 = scalar(group["betas"][0])
        sends = torch._foreach_add(torch._foreach_lerp(ms, grads, 1.0 - b1), errors)
        return Plan(params, list(sends), fresh, errors=errors)

    def _update(self, group: dict[str, Any], updated: list[Tensor], updates: list[Tensor],
                signs: bool) -> None:
        """Warm-up: the Adam step on the mean gradient. After: ``m`` ← the reduced
        momentum, the step with the frozen ``v``."""
        self._moved = True
        if self.frozen:
            self._apply(group, updated, None, updates)
        else:
            self._apply(group, updated, updates)

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        """The step counter under ``"onebit"``."""
        return {"onebit": {"steps": self.steps}}

    def _pop_extra_state(self, state_dict: dict[str, Any]) -> Any:
        extra = state_dict.pop("onebit", None)
        steps = extra.get("steps") if isinstance(extra, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"{type(self).__name__} state_dict needs 'onebit': {{'steps': "
                             f"an integer >= 0}}, got {extra!r}")
        return steps

    def _load_extra_state(self, extra: Any) -> None:
        self.steps = int(extra)
