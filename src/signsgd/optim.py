"""``SignSGD``, ``Signum`` and ``EFSGD``: thin ``torch.optim.Optimizer`` classes over
:mod:`signsgd.functional`.

The classes hold hyper-parameters and state (momentum, error buffers), check the input,
and call the functional math. With ``aggregator=`` they run distributed: see
:mod:`signsgd.distributed.base` for the three points where an aggregator can act.

Every check happens before anything changes: a bad gradient (NaN, inf, sparse, complex)
raises and leaves every parameter and every state tensor as it was. State is created once,
on the first step that succeeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from signsgd import functional as F
from signsgd.compression import Compressor, ScaledSign
from signsgd.distributed.base import Aggregator, NonFiniteGradientError

__all__ = ["SignSGD", "Signum", "EFSGD"]


def _check_number(name: str, value: Any, low: float, high: float | None, high_open: bool) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number)")
    bad = math.isnan(value) or value < low
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        upper = "" if high is None else (f", < {high}" if high_open else f", <= {high}")
        raise ValueError(f"Invalid {name}: {value} (must be >= {low}{upper})")


def _check_hparams(group: dict[str, Any]) -> None:
    _check_number("learning rate", group["lr"], 0.0, None, False)
    if not math.isfinite(float(group["lr"])):
        raise ValueError(f"Invalid learning rate: {group['lr']} (must be finite)")
    _check_number("momentum value", group["momentum"], 0.0, 1.0, True)
    _check_number("weight_decay value", group["weight_decay"], 0.0, None, False)
    if not math.isfinite(float(group["weight_decay"])):
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']} (must be finite)")


class _Base(Optimizer):
    """Shared plumbing: validation, gathering gradients, aggregator state in checkpoints."""

    _stages: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any],
                 aggregator: Aggregator | None) -> None:
        if aggregator is not None:
            stage = getattr(aggregator, "stage", None)
            if stage not in self._stages:
                raise ValueError(
                    f"{type(self).__name__} cannot use aggregator {type(aggregator).__name__} "
                    f"(stage {stage!r}); it accepts stages {list(self._stages)}"
                )
        _check_hparams(defaults)
        super().__init__(params, defaults)
        self.aggregator = aggregator

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check_hparams(merged)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ gathering
    def _gather(self) -> tuple[list[tuple[int, int, Tensor]], int | None]:
        """All (group index, param index, param) with a gradient; first non-finite entry."""
        name = type(self).__name__
        entries: list[tuple[int, int, Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{name} does not support sparse gradients "
                        f"(param group {gi}, index {pi})"
                    )
                if torch.is_complex(p) or torch.is_complex(p.grad):
                    raise RuntimeError(
                        f"{name} does not support complex parameters "
                        f"(param group {gi}, index {pi}, dtype {p.dtype}); "
                        "use torch.view_as_real to optimise real and imaginary parts"
                    )
                entries.append((gi, pi, p))
        bad = F.first_nonfinite([p.grad for _, _, p in entries])  # type: ignore[misc]
        return entries, bad

    def _nonfinite_error(self, entries: list[tuple[int, int, Tensor]], bad: int) -> str:
        gi, pi, p = entries[bad]
        return (
            f"{type(self).__name__}: non-finite gradient (NaN or inf) in param group {gi}, "
            f"index {pi} (shape {tuple(p.shape)}); parameters and state left unchanged"
        )

    def _foreach(self, group: dict[str, Any]) -> bool:
        foreach = group.get("foreach")
        return True if foreach is None else bool(foreach)

    def _all_params(self) -> list[tuple[int, int, Tensor]]:
        return [
            (gi, pi, p)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
        ]

    def _reduce_gradients(self, entries: list[tuple[int, int, Tensor]],
                          bad: int | None) -> dict[int, Tensor]:
        """Stage "gradient": the mean gradient of every parameter, keyed by ``id(param)``."""
        everything = self._all_params()
        grads = [p.grad for _, _, p in everything]
        reduced = self._call_aggregator(
            entries, bad, lambda finite: self.aggregator.reduce_gradients(  # type: ignore[union-attr]
                list(grads), finite=finite)
        )
        return {id(p): g for (_, _, p), g in zip(everything, reduced) if g is not None}

    def _call_aggregator(self, entries: list[tuple[int, int, Tensor]], bad: int | None,
                         call: Callable[[bool], Any]) -> Any:
        try:
            return call(bad is None)
        except NonFiniteGradientError as exc:
            if bad is not None:
                raise NonFiniteGradientError(
                    f"{self._nonfinite_error(entries, bad)}; {exc}"
                ) from None
            raise

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.aggregator is not None:
            sd["aggregator"] = self.aggregator.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        agg_state = state_dict.pop("aggregator", None)
        extra = self._pop_extra_state(state_dict)
        if agg_state is not None and self.aggregator is None:
            raise ValueError(
                "the state_dict holds aggregator state but this optimizer has no aggregator"
            )
        super().load_state_dict(state_dict)
        if self.aggregator is not None and agg_state is not None:
            self.aggregator.load_state_dict(agg_state)
        self._load_extra_state(extra)

    def _pop_extra_state(self, state_dict: dict[str, Any]) -> Any:
        return None

    def _load_extra_state(self, extra: Any) -> None:
        return None


class Signum(_Base):
    r"""Signum: sign of momentum (Bernstein et al. 2018, Algorithm 2); 1 bit per coordinate.

    .. math::
        m \leftarrow \beta m + (1-\beta) g,\qquad
        x \leftarrow x - \mathrm{lr}\,(\mathrm{sign}(m) + \mathrm{wd}\,x)

    ``m`` starts at 0 with no bias correction; weight decay is decoupled and applied after
    the sign; ``sign(0) = 0``. With ``aggregator=MajorityVote()`` each worker votes with the
    sign of its own momentum and every worker applies the majority (Algorithm 3).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0). Sign methods move every coordinate by ``lr`` per step, so
            typical values are 1e-4 to 1e-3, much smaller than for SGD.
        momentum: β in [0, 1) (default 0.9). β = 0 is signSGD.
        weight_decay: decoupled weight decay (>= 0).
        aggregator: ``None`` (single process), an aggregator of stage ``"sign"``
            (:class:`~signsgd.distributed.MajorityVote`) or ``"gradient"``
            (:class:`~signsgd.distributed.AllReduce`).
        foreach: use the multi-tensor kernels (default: yes).

    Example:
        >>> import torch, signsgd
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = signsgd.Signum([w], lr=0.1, momentum=0.5)
        >>> (w ** 2).sum().backward(); opt.step()
        >>> w.data
        tensor([ 0.9000, -0.9000])

    Reference: Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed
    Optimisation for Non-Convex Problems. ICML 2018.
    """

    _stages = ("sign", "gradient")

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, aggregator: Aggregator | None = None,
                 *, foreach: bool | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, aggregator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries, bad = self._gather()
        stage = getattr(self.aggregator, "stage", None)
        if stage == "sign":
            self._step_vote(entries, bad)
            return loss
        if stage is None and bad is not None:
            raise NonFiniteGradientError(self._nonfinite_error(entries, bad))
        grads = {id(p): p.grad for _, _, p in entries}
        if stage == "gradient":
            grads = self._reduce_gradients(entries, bad)
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in grads]
            if not params:
                continue
            g_list = [grads[id(p)] for p in params]
            bufs = self._buffers(group, params) if group["momentum"] != 0 else []
            F.signum(params, g_list, bufs, lr=group["lr"], momentum=group["momentum"],
                     weight_decay=group["weight_decay"], foreach=self._foreach(group))
        return loss

    def _buffers(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs

    def _step_vote(self, entries: list[tuple[int, int, Tensor]], bad: int | None) -> None:
        """Stage "sign": every parameter of every group goes into one vote."""
        everything = self._all_params()
        have = {id(p) for _, _, p in entries}
        directions: list[Tensor | None] = []
        fresh: dict[int, Tensor] = {}
        for gi, _, p in everything:
            if id(p) not in have:
                directions.append(None)
                continue
            beta = self.param_groups[gi]["momentum"]
            if beta == 0:
                directions.append(p.grad)
                continue
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh[id(p)] = buf
            directions.append(F.signum_direction([p.grad], [buf], momentum=beta)[0])  # type: ignore[list-item]
        votes = self._call_aggregator(
            entries, bad,
            lambda finite: self.aggregator.reduce_signs(directions, finite=finite),  # type: ignore[union-attr]
        )
        if len(votes) != len(everything):
            raise RuntimeError(
                f"aggregator returned {len(votes)} tensors for {len(everything)} parameters"
            )
        # The vote succeeded on every rank: commit momentum, then update parameters.
        for (gi, _, p), d in zip(everything, directions):
            if d is None or self.param_groups[gi]["momentum"] == 0:
                continue
            state = self.state[p]
            if id(p) in fresh:
                state["momentum_buffer"] = fresh[id(p)]
            state["momentum_buffer"].copy_(d)
        for gi, group in enumerate(self.param_groups):
            pairs = [(p, v) for (g, _, p), v in zip(everything, votes) if g == gi and v is not None]
            if not pairs:
                continue
            F.sign_update_([p for p, _ in pairs], [v for _, v in pairs], lr=group["lr"],
                           weight_decay=group["weight_decay"], take_sign=False,
                           foreach=self._foreach(group))


class SignSGD(Signum):
    r"""signSGD (Bernstein et al. 2018, Algorithm 1): ``x ← x − lr·(sign(g) + wd·x)``.

    Signum with β = 0; ``sign(0) = 0``; decoupled weight decay. With
    ``aggregator=MajorityVote()`` each worker sends ``sign(g)`` and every worker applies
    the majority verdict (1 bit per coordinate each way).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0).
        weight_decay: decoupled weight decay (>= 0).
        aggregator: ``None``, or an aggregator of stage ``"sign"`` or ``"gradient"``.
        foreach: use the multi-tensor kernels (default: yes).

    Example:
        >>> import torch, signsgd
        >>> w = torch.nn.Parameter(torch.tensor([2.0, 0.0]))
        >>> opt = signsgd.SignSGD([w], lr=0.5)
        >>> (w ** 2).sum().backward(); opt.step()
        >>> w.data
        tensor([1.5000, 0.0000])

    Reference: Bernstein et al., signSGD, ICML 2018.
    """

    def __init__(self, params: Iterable[Any], lr: float, weight_decay: float = 0.0,
                 aggregator: Aggregator | None = None, *, foreach: bool | None = None) -> None:
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay,
                         aggregator=aggregator, foreach=foreach)


class EFSGD(_Base):
    r"""EF-SGD: SGD with a compressor and error feedback (Karimireddy et al. 2019).

    .. math::
        p \leftarrow \mathrm{lr}\,(g + \mathrm{wd}\,x) + e,\quad
        \Delta \leftarrow C(p),\quad e \leftarrow p - \Delta,\quad x \leftarrow x - \Delta

    ``e`` starts at 0. With the default ``ScaledSign`` compressor this is EF-signSGD; with
    ``Identity`` it is SGD. With ``momentum`` β > 0 the gradient goes through heavy-ball
    momentum first (``m ← β·m + g + wd·x``, ``p ← lr·m + e``), as in ``torch.optim.SGD``.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0); EF-signSGD uses SGD-like learning rates.
        compressor: the operator ``C`` (:mod:`signsgd.compression`), applied per tensor.
        momentum: heavy-ball β in [0, 1) (default 0).
        weight_decay: L2 weight decay added to the gradient (>= 0).
        aggregator: ``None``, an aggregator of stage ``"error_feedback"``
            (:class:`~signsgd.distributed.ErrorFeedbackAllReduce`) or ``"gradient"``.
        foreach: use the multi-tensor kernels (default: yes).

    Example:
        >>> import torch, signsgd
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> opt = signsgd.EFSGD([w], lr=1.0)
        >>> w.grad = torch.tensor([1.0, -3.0]); opt.step()
        >>> w.data, opt.state[w]["error"]
        (tensor([-1.,  3.]), tensor([-1., -1.]))

    Reference: Karimireddy, Rebjock, Stich, Jaggi. Error Feedback Fixes SignSGD and other
    Gradient Compression Schemes. ICML 2019.
    """

    _stages = ("error_feedback", "gradient")

    def __init__(self, params: Iterable[Any], lr: float,
                 compressor: Compressor | None = None, momentum: float = 0.0,
                 weight_decay: float = 0.0, aggregator: Aggregator | None = None,
                 *, foreach: bool | None = None) -> None:
        if compressor is None:
            compressor = ScaledSign()
        if not callable(compressor):
            raise ValueError(f"Invalid compressor: {compressor!r} (must be callable)")
        self.compressor = compressor
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, aggregator)

    def _buffers(self, params: list[Tensor], key: str) -> tuple[list[Tensor], dict[int, Tensor]]:
        """Existing buffers, or fresh zeros that are committed only if the step succeeds."""
        out, fresh = [], {}
        for p in params:
            buf = self.state[p].get(key)
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh[id(p)] = buf
            out.append(buf)
        return out, fresh

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries, bad = self._gather()
        stage = getattr(self.aggregator, "stage", None)
        if stage is None and bad is not None:
            raise NonFiniteGradientError(self._nonfinite_error(entries, bad))
        grads = {id(p): p.grad for _, _, p in entries}
        if stage == "gradient":
            grads = self._reduce_gradients(entries, bad)

        # Local transform (out of place): p = lr·(g + wd·x) + e, per group.
        plan = []  # (group, params, compensated, new momentum, fresh buffers)
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in grads]
            if not params:
                plan.append((group, [], [], [], {}))
                continue
            errors, fresh = self._buffers(params, "error")
            bufs: list[Tensor | None] = [None] * len(params)
            if group["momentum"] != 0:
                bufs, fresh_m = self._buffers(params, "momentum_buffer")  # type: ignore[assignment]
                fresh = {**{("e", k): v for k, v in fresh.items()},
                         **{("m", k): v for k, v in fresh_m.items()}}
            else:
                fresh = {("e", k): v for k, v in fresh.items()}
            comp, new_m = F.ef_compensate(
                params, [grads[id(p)] for p in params], errors, bufs, lr=group["lr"],
                momentum=group["momentum"], weight_decay=group["weight_decay"],
                foreach=self._foreach(group),
            )
            plan.append((group, params, comp, new_m, fresh))

        if stage == "error_feedback":
            everything = self._all_params()
            by_id = {id(p): c for _, params, comp, _, _ in plan for p, c in zip(params, comp)}
            flat_in = [by_id.get(id(p)) for _, _, p in everything]
            sent, upd = self._call_aggregator(
                entries, bad,
                lambda finite: self.aggregator.reduce_error_feedback(  # type: ignore[union-attr]
                    flat_in, self.compressor, finite=finite),
            )
            sent_by = {id(p): s for (_, _, p), s in zip(everything, sent) if s is not None}
            upd_by = {id(p): u for (_, _, p), u in zip(everything, upd) if u is not None}
        else:
            sent_by = {id(p): self.compressor(c)
                       for _, params, comp, _, _ in plan for p, c in zip(params, comp)}
            upd_by = sent_by

        # Commit: state first (fresh buffers, momentum), then e ← p − C(p), x ← x − Δ.
        for group, params, comp, new_m, fresh in plan:
            if not params:
                continue
            for (kind, pid), buf in fresh.items():
                p = next(q for q in params if id(q) == pid)
                self.state[p]["error" if kind == "e" else "momentum_buffer"] = buf
            if group["momentum"] != 0:
                for p, m in zip(params, new_m):
                    self.state[p]["momentum_buffer"].copy_(m)
            errors = [self.state[p]["error"] for p in params]
            F.ef_apply_(params, errors, comp, [sent_by[id(p)] for p in params],
                        [upd_by[id(p)] for p in params], foreach=self._foreach(group))
        if stage == "error_feedback":
            # A parameter without a local gradient still takes the common update, so that
            # every rank keeps identical parameters.
            for _, _, p in self._all_params():
                if id(p) not in grads and id(p) in upd_by:
                    p.sub_(upd_by[id(p)])
        return loss

    def _pop_extra_state(self, state_dict: dict[str, Any]) -> Any:
        return state_dict.pop("compressor", None)

    def _load_extra_state(self, extra: Any) -> None:
        if extra is not None and hasattr(self.compressor, "load_state_dict"):
            self.compressor.load_state_dict(extra)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if hasattr(self.compressor, "state_dict"):
            sd["compressor"] = self.compressor.state_dict()
        return sd
