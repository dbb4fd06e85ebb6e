"""``SignSGD``, ``Signum`` and ``EFSGD``: thin ``torch.optim.Optimizer`` classes over
:mod:`signsgd.functional`.

The classes hold hyper-parameters and state (momentum, error buffers), check the input,
and call the functional math. With ``aggregator=`` they run distributed: see
:mod:`signsgd.distributed.base` for the three points where an aggregator can act.

Every check happens before anything changes: a bad gradient (NaN, inf, sparse, complex)
raises and leaves every parameter and every state tensor as it was. State is created once,
on the first step that succeeds.

Example:
    >>> import torch, signsgd
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = signsgd.Signum(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    >>> model(torch.ones(4, 2)).pow(2).mean().backward()
    >>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from signsgd import functional as F
from signsgd.compression import Compressor, ScaledSign
from signsgd.distributed.base import Aggregator, NonFiniteGradientError

__all__ = ["SignSGD", "Signum", "EFSGD", "NonFiniteGradientError"]

#: Options of ``torch.optim`` optimisers that these classes do not implement. Passing one
#: with a value that would change the result (e.g. ``maximize=True``) raises ValueError.
_UNSUPPORTED = {
    "maximize": False, "differentiable": False, "capturable": False, "fused": False,
    "nesterov": False, "dampening": 0, "amsgrad": False,
}

#: (group index, index in the group, parameter) of a parameter with a gradient.
_Entry = tuple[int, int, Tensor]


def _scalar(value: Any) -> float:
    """A hyper-parameter as a Python float (a one-element tensor is read out)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _check_number(name: str, value: Any, low: float, high: float | None, high_open: bool) -> None:
    shown = value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"Invalid {name}: {value!r} (a tensor {name} must be one real "
                             "element)")
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {shown!r} (must be a real number)")
    value = float(value)
    bad = math.isnan(value) or value < low or math.isinf(value)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        upper = "finite" if high is None else (f"< {high}" if high_open else f"<= {high}")
        raise ValueError(f"Invalid {name}: {shown} (must be >= {low} and {upper})")


def _check_group(owner: str, group: dict[str, Any], momentum: bool = True) -> None:
    """Validate one param group's hyper-parameters; raise ValueError naming the value."""
    _check_number("learning rate", group["lr"], 0.0, None, False)
    if momentum:
        _check_number("momentum value", group["momentum"], 0.0, 1.0, True)
    _check_number("weight_decay value", group["weight_decay"], 0.0, None, False)
    foreach = group.get("foreach")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"Invalid foreach value: {foreach!r} (must be True, False or None)")
    for key, neutral in _UNSUPPORTED.items():
        if group.get(key) not in (None, neutral):
            raise ValueError(f"{owner} does not support {key}={group[key]!r}")


def _reject_options(owner: str, options: dict[str, Any]) -> None:
    """Refuse keyword arguments this optimiser does not take, with a clear message."""
    for key, value in options.items():
        if key not in _UNSUPPORTED:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
        if value not in (None, _UNSUPPORTED[key]):
            raise ValueError(f"{owner} does not support {key}={value!r}")


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
        _check_group(type(self).__name__, defaults)
        super().__init__(params, defaults)
        self.aggregator = aggregator

    @property
    def _workspace(self) -> dict[Any, Tensor]:
        """Scratch buffers reused between steps (not state: never saved or pickled)."""
        ws = self.__dict__.get("_scratch")
        if ws is None:
            ws = self.__dict__["_scratch"] = {}
        return ws

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyper-parameters are validated before it is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        _check_group(type(self).__name__, {**self.defaults, **param_group})
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ gathering
    def _gather(self) -> tuple[list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
                               _Entry | None]:
        """Per group ``(group, params with a gradient, gradients)``; the first non-finite one.

        Raises RuntimeError for a sparse gradient or a complex parameter, before anything
        changes.
        """
        work = []
        all_grads: list[Tensor] = []
        for gi, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided or g.is_complex():
                    self._unsupported(gi, group, p)
                params.append(p)
                grads.append(g)
            work.append((group, params, grads))
            all_grads.extend(grads)
        bad = F.first_nonfinite(all_grads)
        if bad is None:
            return work, None
        for gi, (group, params, _) in enumerate(work):
            if bad < len(params):
                p = params[bad]
                pi = next(i for i, q in enumerate(group["params"]) if q is p)
                return work, (gi, pi, p)
            bad -= len(params)
        raise RuntimeError("internal error: non-finite index out of range")  # unreachable

    def _unsupported(self, gi: int, group: dict[str, Any], p: Tensor) -> None:
        name = type(self).__name__
        pi = next(i for i, q in enumerate(group["params"]) if q is p)
        g = p.grad
        if g is not None and g.layout != torch.strided:
            raise RuntimeError(
                f"{name} does not support sparse gradients (layout {g.layout}) "
                f"(param group {gi}, index {pi}); use a dense gradient"
            )
        raise RuntimeError(
            f"{name} does not support complex parameters (param group {gi}, index {pi}, "
            f"dtype {p.dtype}); use torch.view_as_real to optimise real and imaginary parts"
        )

    def _nonfinite_error(self, bad: _Entry) -> str:
        gi, pi, p = bad
        return (
            f"{type(self).__name__}: non-finite gradient (NaN or inf) in param group {gi}, "
            f"index {pi} (shape {tuple(p.shape)}); parameters and state left unchanged"
        )

    @staticmethod
    def _foreach(group: dict[str, Any]) -> bool:
        foreach = group.get("foreach")
        return True if foreach is None else bool(foreach)

    def _all_params(self) -> list[_Entry]:
        return [
            (gi, pi, p)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
        ]

    def _reduce_gradients(self, bad: _Entry | None) -> dict[int, Tensor]:
        """Stage "gradient": the mean gradient of every parameter, keyed by ``id(param)``."""
        everything = self._all_params()
        grads = [p.grad for _, _, p in everything]
        reduced = self._call_aggregator(
            bad, lambda finite: self.aggregator.reduce_gradients(  # type: ignore[union-attr]
                list(grads), finite=finite)
        )
        if len(reduced) != len(everything):
            raise RuntimeError(
                f"aggregator returned {len(reduced)} tensors for {len(everything)} parameters"
            )
        return {id(p): g for (_, _, p), g in zip(everything, reduced) if g is not None}

    def _call_aggregator(self, bad: _Entry | None, call: Callable[[bool], Any]) -> Any:
        try:
            return call(bad is None)
        except NonFiniteGradientError as exc:
            if bad is not None:
                raise NonFiniteGradientError(f"{self._nonfinite_error(bad)}; {exc}") from None
            raise

    # ------------------------------------------------------------------ checkpoints
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; keep ours.
        state = super().__getstate__()
        for key in self._pickled:
            state[key] = getattr(self, key, None)
        return state

    _pickled: tuple[str, ...] = ("aggregator",)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus the aggregator's state under ``"aggregator"``."""
        sd = super().state_dict()
        if self.aggregator is not None:
            sd["aggregator"] = self.aggregator.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (aggregator state included)."""
        state_dict = dict(state_dict)
        agg_state = state_dict.pop("aggregator", None)
        extra = self._pop_extra_state(state_dict)
        if agg_state is not None and self.aggregator is None:
            raise ValueError(
                "the state_dict holds aggregator state but this optimizer has no aggregator"
            )
        for group in state_dict.get("param_groups", []):
            _check_group(type(self).__name__, {**self.defaults, **group})
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
        lr: learning rate (>= 0; a float or a one-element tensor). Sign methods move every
            coordinate by ``lr`` per step, so typical values are 1e-4 to 1e-3, much
            smaller than for SGD.
        momentum: β in [0, 1) (default 0.9). β = 0 is signSGD.
        weight_decay: decoupled weight decay (>= 0).
        aggregator: ``None`` (single process), an aggregator of stage ``"sign"``
            (:class:`~signsgd.distributed.MajorityVote`) or ``"gradient"``
            (:class:`~signsgd.distributed.AllReduce`).
        foreach: use the multi-tensor kernels (default: yes). Both paths give
            bit-identical results.

    Raises:
        ValueError: a hyper-parameter out of range, or ``maximize=True`` and other
            ``torch.optim`` options this class does not implement.

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

    def __init__(self, params: Iterable[Any], lr: float | Tensor, momentum: float = 0.9,
                 weight_decay: float = 0.0, aggregator: Aggregator | None = None,
                 *, foreach: bool | None = None, **unsupported: Any) -> None:
        _reject_options(type(self).__name__, unsupported)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, aggregator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` re-evaluates the model and returns the loss.

        Raises:
            NonFiniteGradientError: (a ValueError) a gradient holds NaN or inf; names its
                param group and index; nothing is changed.
            RuntimeError: a sparse gradient or a complex parameter; nothing is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, bad = self._gather()
        stage = getattr(self.aggregator, "stage", None)
        if stage == "sign":
            self._step_vote(work, bad)
            return loss
        if stage == "gradient":
            reduced = self._reduce_gradients(bad)
            work = []
            for group in self.param_groups:
                params = [p for p in group["params"] if id(p) in reduced]
                work.append((group, params, [reduced[id(p)] for p in params]))
        elif bad is not None:
            raise NonFiniteGradientError(self._nonfinite_error(bad))
        for group, params, grads in work:
            if not params:
                continue
            momentum = _scalar(group["momentum"])
            bufs = self._buffers(params) if momentum != 0 else []
            F.signum(params, grads, bufs, lr=_scalar(group["lr"]), momentum=momentum,
                     weight_decay=_scalar(group["weight_decay"]),
                     foreach=self._foreach(group), workspace=self._workspace)
        return loss

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        state = self.state
        bufs = []
        for p in params:
            st = state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)
            bufs.append(buf)
        return bufs

    def _step_vote(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
                   bad: _Entry | None) -> None:
        """Stage "sign": every parameter of every group goes into one vote."""
        everything = self._all_params()
        have = {id(p) for _, params, _ in work for p in params}
        directions: list[Tensor | None] = []
        fresh: dict[int, Tensor] = {}
        for gi, _, p in everything:
            if id(p) not in have:
                directions.append(None)
                continue
            beta = _scalar(self.param_groups[gi]["momentum"])
            if beta == 0:
                directions.append(p.grad)
                continue
            st = self.state.get(p)
            buf = None if st is None else st.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh[id(p)] = buf
            directions.append(F.signum_direction([p.grad], [buf], momentum=beta)[0])  # type: ignore[list-item]
        votes = self._call_aggregator(
            bad, lambda finite: self.aggregator.reduce_signs(  # type: ignore[union-attr]
                directions, finite=finite),
        )
        if len(votes) != len(everything):
            raise RuntimeError(
                f"aggregator returned {len(votes)} tensors for {len(everything)} parameters"
            )
        # The vote succeeded on every rank: commit momentum, then update parameters.
        for (gi, _, p), d in zip(everything, directions):
            if d is None or _scalar(self.param_groups[gi]["momentum"]) == 0:
                continue
            state = self.state[p]
            if id(p) in fresh:
                state["momentum_buffer"] = fresh[id(p)]
            state["momentum_buffer"].copy_(d)
        for gi, group in enumerate(self.param_groups):
            pairs = [(p, v) for (g, _, p), v in zip(everything, votes) if g == gi and v is not None]
            if not pairs:
                continue
            F.sign_update_([p for p, _ in pairs], [v for _, v in pairs],
                           lr=_scalar(group["lr"]), weight_decay=_scalar(group["weight_decay"]),
                           take_sign=False, foreach=self._foreach(group))


class SignSGD(Signum):
    r"""signSGD (Bernstein et al. 2018, Algorithm 1): ``x ← x − lr·(sign(g) + wd·x)``.

    .. math::
        x \leftarrow x - \mathrm{lr}\,(\mathrm{sign}(g) + \mathrm{wd}\,x)

    Signum with β = 0 (no state); ``sign(0) = 0``; decoupled weight decay. With
    ``aggregator=MajorityVote()`` each worker sends ``sign(g)`` and every worker applies
    the majority verdict (1 bit per coordinate each way).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0; a float or a one-element tensor).
        weight_decay: decoupled weight decay (>= 0).
        aggregator: ``None``, or an aggregator of stage ``"sign"`` or ``"gradient"``.
        foreach: use the multi-tensor kernels (default: yes).

    Raises:
        ValueError: a hyper-parameter out of range or an unsupported ``torch.optim`` option.

    Example:
        >>> import torch, signsgd
        >>> w = torch.nn.Parameter(torch.tensor([2.0, 0.0]))
        >>> opt = signsgd.SignSGD([w], lr=0.5)
        >>> (w ** 2).sum().backward(); opt.step()
        >>> w.data
        tensor([1.5000, 0.0000])

    Reference: Bernstein et al., signSGD: Compressed Optimisation for Non-Convex
    Problems, ICML 2018.
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor, weight_decay: float = 0.0,
                 aggregator: Aggregator | None = None, *, foreach: bool | None = None,
                 **unsupported: Any) -> None:
        if "momentum" in unsupported:
            raise TypeError("SignSGD takes no momentum; use signsgd.Signum")
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay,
                         aggregator=aggregator, foreach=foreach, **unsupported)


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
        compressor: the operator ``C`` (:mod:`signsgd.compression`), applied per tensor;
            default ``ScaledSign()``. Its state (RandomK's generator) is checkpointed.
        momentum: heavy-ball β in [0, 1) (default 0).
        weight_decay: L2 weight decay added to the gradient (>= 0).
        aggregator: ``None``, an aggregator of stage ``"error_feedback"``
            (:class:`~signsgd.distributed.ErrorFeedbackAllReduce`) or ``"gradient"``.
        foreach: use the multi-tensor kernels (default: yes).

    Raises:
        ValueError: a hyper-parameter out of range, a compressor that is not callable, or
            an unsupported ``torch.optim`` option.

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
    _pickled = ("aggregator", "compressor")

    def __init__(self, params: Iterable[Any], lr: float | Tensor,
                 compressor: Compressor | Callable[[Tensor], Tensor] | None = None,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 aggregator: Aggregator | None = None,
                 *, foreach: bool | None = None, **unsupported: Any) -> None:
        _reject_options(type(self).__name__, unsupported)
        if compressor is None:
            compressor = ScaledSign()
        if not callable(compressor):
            raise ValueError(f"Invalid compressor: {compressor!r} (must be callable)")
        self.compressor = compressor
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults, aggregator)

    def _buffers(self, params: list[Tensor], key: str,
                 fresh: dict[tuple[str, int], tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Existing buffers, or fresh zeros recorded in ``fresh`` to commit on success."""
        out = []
        state = self.state
        for p in params:
            st = state.get(p)
            buf = None if st is None else st.get(key)
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                fresh[(key, id(p))] = (p, buf)
            out.append(buf)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` re-evaluates the model and returns the loss.

        Raises:
            NonFiniteGradientError: (a ValueError) a gradient holds NaN or inf; names its
                param group and index; nothing is changed.
            RuntimeError: a sparse gradient or a complex parameter; nothing is changed.
            ValueError: the compressor changed a tensor's shape, dtype or device; nothing
                is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, bad = self._gather()
        stage = getattr(self.aggregator, "stage", None)
        if stage is None and bad is not None:
            raise NonFiniteGradientError(self._nonfinite_error(bad))
        if stage == "gradient":
            reduced = self._reduce_gradients(bad)
            work = []
            for group in self.param_groups:
                params = [p for p in group["params"] if id(p) in reduced]
                work.append((group, params, [reduced[id(p)] for p in params]))

        # Local transform, out of place: p = lr·(g + wd·x) + e (or lr·m + e), per group.
        fresh: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        plan = []  # (group, params, errors, momentum buffers, compensated, new momentum)
        for group, params, grads in work:
            if not params:
                continue
            momentum = _scalar(group["momentum"])
            errors = self._buffers(params, "error", fresh)
            bufs: list[Tensor | None] = (self._buffers(params, "momentum_buffer", fresh)  # type: ignore[assignment]
                                         if momentum != 0 else [None] * len(params))
            comp, new_m = F.ef_compensate(
                params, grads, errors, bufs, lr=_scalar(group["lr"]), momentum=momentum,
                weight_decay=_scalar(group["weight_decay"]), foreach=self._foreach(group),
            )
            plan.append((group, params, errors, bufs, comp, new_m))

        extra_updates: list[tuple[Tensor, Tensor]] = []
        if stage == "error_feedback":
            everything = self._all_params()
            by_id = {id(p): c for _, params, _, _, comp, _ in plan for p, c in zip(params, comp)}
            flat_in = [by_id.get(id(p)) for _, _, p in everything]
            sent, upd = self._call_aggregator(
                bad, lambda finite: self.aggregator.reduce_error_feedback(  # type: ignore[union-attr]
                    flat_in, self.compressor, finite=finite),
            )
            if len(sent) != len(everything) or len(upd) != len(everything):
                raise RuntimeError(
                    f"aggregator returned {len(sent)}/{len(upd)} tensors for "
                    f"{len(everything)} parameters"
                )
            sent_by = {id(p): s for (_, _, p), s in zip(everything, sent) if s is not None}
            upd_by = {id(p): u for (_, _, p), u in zip(everything, upd) if u is not None}
            # A parameter without a local gradient still takes the common update, so that
            # every rank keeps identical parameters.
            extra_updates = [(p, upd_by[id(p)]) for _, _, p in everything
                             if id(p) not in by_id and id(p) in upd_by]
            sends = [[sent_by[id(p)] for p in params] for _, params, *_ in plan]
            updates = [[upd_by[id(p)] for p in params] for _, params, *_ in plan]
        else:
            sends = [F._compress_all(self.compressor, comp) for *_, comp, _ in plan]
            updates = sends

        # Commit: new buffers, momentum, then e ← p − C(p) and x ← x − Δ.
        for key, pid in fresh:
            p, buf = fresh[(key, pid)]
            self.state[p][key] = buf
        for (group, params, errors, bufs, comp, new_m), sent_g, upd_g in zip(plan, sends,
                                                                             updates):
            foreach = self._foreach(group)
            if new_m:
                if foreach:
                    torch._foreach_copy_(bufs, new_m)  # type: ignore[arg-type]
                else:
                    for b, m in zip(bufs, new_m):
                        b.copy_(m)  # type: ignore[union-attr]
            F.ef_apply_(params, errors, comp, sent_g, upd_g, foreach=foreach)
        for p, u in extra_updates:
            p.sub_(u)
        return loss

    def _pop_extra_state(self, state_dict: dict[str, Any]) -> Any:
        return state_dict.pop("compressor", None)

    def _load_extra_state(self, extra: Any) -> None:
        if extra is not None and hasattr(self.compressor, "load_state_dict"):
            self.compressor.load_state_dict(extra)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state, the aggregator's under ``"aggregator"`` and the
        compressor's (RandomK's generator) under ``"compressor"``."""
        sd = super().state_dict()
        if hasattr(self.compressor, "state_dict"):
            sd["compressor"] = self.compressor.state_dict()
        return sd
