"""``SignSGD``, ``Signum``, ``Lion`` and ``EFSGD``: thin ``torch.optim.Optimizer`` classes
over :mod:`signsgd.functional`.

The classes hold hyper-parameters and state (momentum, error buffers), check the input,
and call the functional math. Every step has the same shape:

1. gather the gradients and check finiteness once (:func:`signsgd.functional.first_nonfinite`);
2. the local transform, out of place (momentum, error compensation, weight decay as the
   algorithm says);
3. reduce: with ``aggregator=`` (a :class:`~signsgd.distributed.reducer.Reducer`) the
   transformed vectors of every rank become one result, identical on every rank;
4. commit: parameters, state and the reducer's state change only now, in one place
   (:meth:`StagedOptimizer._commit`, then :meth:`~signsgd.reduction.Reduction.commit`).

Without an aggregator the four stages run fused and in place, one functional call per
param group (the fast single-process path: :func:`~signsgd.functional.signum`,
:func:`~signsgd.functional.lion`, :func:`~signsgd.functional.ef_sgd`, made of the same
pieces as the staged path). Every check happens before anything changes: a bad gradient
(NaN, inf, sparse, complex) raises and leaves every parameter and every state tensor as it
was. State is created once, on the first step that succeeds.

FSDP2 parameters (DTensors, ``fully_shard``) are stepped through their local shards,
their state is DTensors like them, and the ranks of each shard group agree on the finite
flag; an aggregator's group must run across the replicas only (:mod:`signsgd.sharding`,
docs/frameworks.md, "FSDP2 / HSDP").

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from signsgd import functional as F
from signsgd import sharding
from signsgd.compression import Compressor, ScaledSign
from signsgd.errors import NonFiniteGradientError
from signsgd.reduction import CommStats, Reducer, Reduction, comm_stats, hyperparameters
from signsgd.scratch import Scratch

__all__ = ["SignSGD", "Signum", "Lion", "EFSGD", "StagedOptimizer", "Plan",
           "NonFiniteGradientError", "hyperparameters"]

#: Options of ``torch.optim`` optimisers that these classes do not implement. Passing one
#: with a value that would change the result (e.g. ``fused=True``) raises ValueError.
_UNSUPPORTED = {
    "differentiable": False, "capturable": False, "fused": False, "nesterov": False,
    "dampening": 0, "amsgrad": False,
}

#: (group index, index in the group, parameter) of a parameter with a gradient.
_Entry = tuple[int, int, Tensor]
#: per param group: (group, parameters with a gradient, their gradients).
_Work = list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]
#: state buffers created in a step, stored when it commits: (key, id) -> (param, buffer).
Fresh = dict[tuple[str, int], tuple[Tensor, Tensor]]


@dataclass
class Plan:
    """One param group's local transform, out of place: what this rank hands to the reducer
    and what the step's commit writes. Nothing in it is the optimiser's state before then.

    Example:
        >>> import torch
        >>> Plan([torch.zeros(1)], [torch.ones(1)]).errors
        []
    """

    params: list[Tensor]      # the group's parameters with a gradient on this rank
    sends: list[Tensor]       # this rank's input to the reducer, one per parameter
    fresh: Fresh = field(default_factory=dict)          # state created now, stored on commit
    momenta: list[Tensor] = field(default_factory=list)  # momentum buffers the commit
    #                           advances with ``targets`` (:meth:`StagedOptimizer._advance`)
    targets: list[Tensor] = field(default_factory=list)  # their new values (Signum, EFSGD),
    #                           or the gradients they move towards (Lion)
    errors: list[Tensor] = field(default_factory=list)   # error buffers: e ← sends − transmitted


def scalar(value: Any) -> float:
    """A hyper-parameter as a Python float (a one-element tensor is read out)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_number(name: str, value: Any, low: float, high: float | None, high_open: bool) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is a real number
    (or a one-element real tensor) in ``[low, high]`` (``[low, high)`` with ``high_open``;
    ``high=None``: finite)."""
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


def _check_group(owner: str, group: dict[str, Any], supported: frozenset[str] = frozenset()
                 ) -> None:
    """Validate one param group's hyper-parameters; raise ValueError naming the value.
    ``supported``: the ``torch.optim`` options of :data:`_UNSUPPORTED` this class takes."""
    check_number("learning rate", group["lr"], 0.0, None, False)
    if "momentum" in group:
        check_number("momentum value", group["momentum"], 0.0, 1.0, True)
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        for i, beta in enumerate(betas):
            check_number(f"beta parameter at index {i}", beta, 0.0, 1.0, True)
    check_number("weight_decay value", group["weight_decay"], 0.0, None, False)
    for flag in ("foreach", "maximize", "nesterov"):
        value = group.get(flag)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"Invalid {flag} value: {value!r} (must be True, False or None)")
    for key, neutral in _UNSUPPORTED.items():
        if key not in supported and group.get(key) not in (None, neutral):
            raise ValueError(f"{owner} does not support {key}={group[key]!r}")
    if group.get("nesterov") and not scalar(group.get("momentum", 0)) > 0:
        raise ValueError(f"nesterov=True needs a momentum > 0, got momentum="
                         f"{group.get('momentum')!r}")


def reject_options(owner: str, options: dict[str, Any]) -> None:
    """Refuse keyword arguments this optimiser does not take, with a clear message."""
    for key, value in options.items():
        if key not in _UNSUPPORTED:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
        if value not in (None, _UNSUPPORTED[key]):
            raise ValueError(f"{owner} does not support {key}={value!r}")


class StagedOptimizer(Optimizer):
    """The base of this library's optimisers: validation, gathering, the reduce boundary.

    Subclasses implement three pieces of one algorithm, each over one param group:

    * ``_local_step(group, params, grads)`` — the fused in-place step without an
      aggregator (a functional kernel);
    * ``_transform(group, params, grads) -> Plan`` — the out-of-place local transform:
      what to reduce and what the commit writes (:class:`Plan`);
    * ``_update(group, updated, updates, signs)`` — apply the reduced ``updates`` to the
      parameters ``updated`` (every parameter some rank had a gradient for).

    :meth:`_commit` then writes the plans' state (new buffers, :meth:`_advance` of the
    momenta, the error buffers) and the reducer's (:meth:`Reduction.commit`), in one place.

    ``_compressor()`` is what the optimiser transmits with (``None`` for sign optimisers),
    handed to the reducer, which refuses at construction what it cannot serve.

    Example:
        >>> import torch, signsgd
        >>> isinstance(signsgd.Lion([torch.nn.Parameter(torch.ones(1))]), StagedOptimizer)
        True
    """

    #: ``torch.optim`` options of :data:`_UNSUPPORTED` that this class implements.
    _options: frozenset[str] = frozenset()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any],
                 aggregator: Reducer | None) -> None:
        _check_group(type(self).__name__, defaults, self._options)
        super().__init__(params, defaults)
        self.aggregator = aggregator
        if aggregator is not None:
            name = type(self).__name__
            if not isinstance(aggregator, Reducer):
                raise ValueError(
                    f"{name} cannot use aggregator {type(aggregator).__name__}: not a "
                    "signsgd.distributed reducer (MajorityVote, ErrorFeedbackAllReduce, "
                    "AllReduce)"
                )
            try:
                aggregator.check_compressor(self._compressor())
            except ValueError as exc:
                raise ValueError(
                    f"{name} cannot use aggregator {type(aggregator).__name__}: {exc}"
                ) from None
            params = [p for g in self.param_groups for p in g["params"]]
            sharding.check_replica_group(name, aggregator, params)

    def _compressor(self) -> Compressor | None:
        return None

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank sent in the last step (0 without an aggregator)."""
        return 0 if self.aggregator is None else int(self.aggregator.bytes_sent)

    @property
    def bytes_received(self) -> int:
        """Payload bytes this rank received in the last step (0 without an aggregator)."""
        return 0 if self.aggregator is None else int(self.aggregator.bytes_received)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of the last step's reduction in packing, collectives and unpacking."""
        return {} if self.aggregator is None else dict(self.aggregator.timings)

    def comm_stats(self) -> CommStats:
        """The aggregator's :class:`~signsgd.reduction.CommStats` (zeros without one).

        Example:
            >>> import torch, signsgd
            >>> signsgd.Signum([torch.nn.Parameter(torch.ones(1))], lr=0.1).comm_stats().bytes_sent
            0
        """
        return comm_stats(self.aggregator)

    @property
    def _workspace(self) -> Scratch:
        """Scratch buffers reused between steps (not state: never saved or pickled)."""
        ws = self.__dict__.get("_scratch")
        if ws is None:
            ws = self.__dict__["_scratch"] = Scratch()
        return ws

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyper-parameters are validated before it is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        _check_group(type(self).__name__, {**self.defaults, **param_group}, self._options)
        super().add_param_group(param_group)
        self.__dict__.pop("_sharded", None)
        if getattr(self, "aggregator", None) is not None:
            new = self.param_groups[-1]["params"]
            sharding.check_replica_group(type(self).__name__, self.aggregator, new)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` re-evaluates the model and returns the loss.

        Raises:
            NonFiniteGradientError: (a ValueError) a gradient holds NaN or inf — here or,
                with an aggregator, on any rank; names its param group and index;
                nothing is changed.
            RuntimeError: a sparse gradient or a complex parameter; nothing is changed.
            ValueError: EFSGD's compressor changed a tensor's shape, dtype or device;
                nothing is changed with an aggregator; without one, nothing of that param
                group and the groups after it (one fused call per group).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gather()
        if not self._is_sharded():
            if self.aggregator is None:
                bad = self._first_nonfinite(work)
                if bad is not None:
                    raise NonFiniteGradientError(self._nonfinite_error(bad))
                self._local(work)
            else:
                self._reduced_step(work)
            return loss
        work = self._shards(work)  # FSDP2: the local shards (signsgd.sharding)
        try:
            if self.aggregator is None:
                bad = self._first_nonfinite(work)
                finite = sharding.agree_finite(bad is None, self._all_params())
                if bad is not None:
                    raise NonFiniteGradientError(self._nonfinite_error(bad))
                if not finite:
                    raise NonFiniteGradientError(
                        f"{type(self).__name__}: non-finite gradient (NaN or inf) on another "
                        "rank of this rank's shard group; parameters and state left unchanged")
                self._local(work)
            else:
                self._reduced_step(work)
        finally:
            self.__dict__.pop("_owners", None)
            self.__dict__.pop("_views", None)
        return loss

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _is_sharded(self) -> bool:
        """Whether some parameter is a DTensor (FSDP2); the steps then work on the local
        shards, and every shard group agrees on the finite flag."""
        flag = self.__dict__.get("_sharded")
        if flag is None:
            flag = self.__dict__["_sharded"] = sharding.is_sharded(self._all_params())
        return flag

    def _local(self, work: _Work) -> None:
        """The step without an aggregator: one fused functional call per param group."""
        for group, params, grads in work:
            if params:
                self._local_step(group, params, grads)

    def _shards(self, work: _Work) -> _Work:
        """``work`` on the local shards of the DTensor parameters (views that write through
        to them); ``self._views``: ``{id(parameter): its view}``, ``self._owners`` the way
        back (both for this step only)."""
        views: dict[int, Tensor] = {}
        owners: dict[int, Tensor] = {}
        self.__dict__.update(_views=views, _owners=owners)
        for g in self.param_groups:
            for p in g["params"]:
                views[id(p)] = v = sharding.local(p)
                owners[id(v)] = p
        return [(group, [views[id(p)] for p in params], [sharding.local(g) for g in grads])
                for group, params, grads in work]

    def _owner(self, p: Tensor) -> Tensor:
        """The parameter whose local shard ``p`` is (``p`` itself when not sharded)."""
        owners = self.__dict__.get("_owners")
        return p if owners is None else owners.get(id(p), p)

    def _reduced_step(self, work: _Work) -> None:
        """Transform → reduce → commit, with every parameter of every group in one step.

        The finite flag travels in the reducer's step header (on an accelerator it is not
        read back before: one host synchronisation per step, the header's). With FSDP2
        parameters ``work`` holds their local shards (:meth:`_shards`)."""
        views: dict[int, Tensor] = self.__dict__.get("_views", {})
        finite = F.all_finite([g for _, _, grads in work for g in grads])
        if views:  # a NaN in one shard stops every replica's step
            finite = sharding.agree_finite(finite, self._all_params())
        plans = [self._transform(group, params, grads) if params else None
                 for group, params, grads in work]
        sends = {id(p): u for plan in plans if plan is not None
                 for p, u in zip(plan.params, plan.sends)}
        everything = [views.get(id(p), p) for group in self.param_groups
                      for p in group["params"]]
        try:
            red = self.aggregator.reduce(  # type: ignore[union-attr]
                [sends.get(id(p)) for p in everything], finite=finite,
                compressor=self._compressor(), settings=self._settings(), commit=False)
        except NonFiniteGradientError as exc:
            bad = self._first_nonfinite(work)
            if bad is not None:
                raise NonFiniteGradientError(f"{self._nonfinite_error(bad)}; {exc}") from None
            raise
        self._commit(plans, everything, red)

    def _commit(self, plans: list[Plan | None], everything: list[Tensor], red: Reduction
                ) -> None:
        """The commit of a step whose reduction succeeded, the one place where anything
        changes: per group the new state buffers, the parameters, the momenta and error
        buffers; then the reducer's state."""
        views: dict[int, Tensor] = self.__dict__.get("_views", {})
        update = {id(p): u for p, u in zip(everything, red.update) if u is not None}
        transmitted = {} if red.transmitted is None else {
            id(p): t for p, t in zip(everything, red.transmitted) if t is not None}
        for group, plan in zip(self.param_groups, plans):
            if plan is not None:
                self._store(plan.fresh)
            updated = [v for p in group["params"] for v in (views.get(id(p), p),)
                       if id(v) in update]
            if updated:
                self._update(group, updated, [update[id(p)].view_as(p) for p in updated],
                             red.signs)
            if plan is not None and plan.momenta:
                self._advance(group, plan)
            if plan is not None and plan.errors:  # e ← p − C(p): what the codec did not send
                F.residual_(plan.errors, plan.sends,
                            [transmitted[id(p)].view_as(p) for p in plan.params],
                            foreach=self._foreach(group))
        red.commit()

    def _settings(self) -> tuple[Any, ...]:
        """The hyper-parameters every rank must share (checked in the step header)."""
        return hyperparameters(self.param_groups)

    def _local_step(self, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        raise NotImplementedError

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
                   ) -> Plan:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], updated: list[Tensor], updates: list[Tensor],
                signs: bool) -> None:
        """``x ← x·(1 − lr·wd) − lr·sign(u)`` (``u`` itself when it holds signs, a vote)."""
        F.sign_update_(updated, updates, lr=scalar(group["lr"]),
                       weight_decay=scalar(group["weight_decay"]), take_sign=not signs,
                       foreach=self._foreach(group), workspace=self._workspace)

    def _advance(self, group: dict[str, Any], plan: Plan) -> None:
        """Commit the momenta: ``m ← target`` (Lion overrides)."""
        F.copy_(plan.momenta, plan.targets, foreach=self._foreach(group))

    # ------------------------------------------------------------------ gathering
    def _gather(self) -> _Work:
        """Per group ``(group, params with a gradient, gradients)`` (``maximize``: −g).

        Raises RuntimeError for a sparse gradient or a complex parameter, before anything
        changes.
        """
        work: _Work = []
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
            if group.get("maximize") and grads:  # ascend: the algorithm sees −g
                grads = list(torch._foreach_neg(grads))
            work.append((group, params, grads))
        return work

    def _first_nonfinite(self, work: _Work) -> _Entry | None:
        """(group index, index in the group, parameter) of the first non-finite gradient."""
        bad = F.first_nonfinite([g for _, _, grads in work for g in grads])
        if bad is None:
            return None
        for gi, (group, params, _) in enumerate(work):
            if bad < len(params):
                p = self._owner(params[bad])
                pi = next(i for i, q in enumerate(group["params"]) if q is p)
                return gi, pi, p
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

    def _buffers(self, params: list[Tensor], key: str, fresh: Fresh | None = None
                 ) -> list[Tensor]:
        """The state buffer ``key`` of each parameter. A missing one is created as zeros:
        stored at once (``fresh is None``), or recorded in ``fresh`` for :meth:`_store`."""
        out = []
        owners = self.__dict__.get("_owners")
        for p in params:
            if owners is not None:  # a local shard: the state is a DTensor like its owner
                p = owners.get(id(p), p)
            st = self.state.get(p)
            buf = None if st is None else st.get(key)
            if buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                if fresh is None:
                    self.state[p][key] = buf
                else:
                    fresh[(key, id(p))] = (p, buf)
            out.append(buf if owners is None else sharding.local(buf))
        return out

    def _store(self, fresh: Fresh) -> None:
        """Store the buffers :meth:`_buffers` created (on commit: the step succeeded)."""
        for (key, _), (p, buf) in fresh.items():
            self.state[p][key] = buf

    # ------------------------------------------------------------------ checkpoints
    _pickled: tuple[str, ...] = ("aggregator",)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; keep ours.
        state = super().__getstate__()
        for key in self._pickled:
            state[key] = getattr(self, key, None)
        return state

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus the aggregator's state under ``"aggregator"`` (and
        :meth:`_extra_state`). The state-dict post hooks see the whole of it, and what
        they return is returned, as ``torch.optim`` documents."""
        post = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = {}  # type: ignore[assignment]
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post
        if self.aggregator is not None:
            sd["aggregator"] = self.aggregator.state_dict()
        sd.update(self._extra_state())
        for hook in list(post.values()):
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (aggregator state included). The
        load pre hooks see the whole state dict and may return the one to load; the post
        hooks run once everything (aggregator state included) is loaded."""
        state_dict = dict(state_dict)
        pre = self._optimizer_load_state_dict_pre_hooks
        post = self._optimizer_load_state_dict_post_hooks
        for hook in list(pre.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        agg_state = state_dict.pop("aggregator", None)
        extra = self._pop_extra_state(state_dict)
        if agg_state is not None and self.aggregator is None:
            raise ValueError(
                "the state_dict holds aggregator state but this optimizer has no aggregator"
            )
        for group in state_dict.get("param_groups", []):
            _check_group(type(self).__name__, {**self.defaults, **group}, self._options)
        self._optimizer_load_state_dict_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_load_state_dict_post_hooks = {}  # type: ignore[assignment]
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        if self.aggregator is not None and agg_state is not None:
            self.aggregator.load_state_dict(agg_state)
        self._load_extra_state(extra)
        for hook in list(post.values()):
            hook(self)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _pop_extra_state(self, state_dict: dict[str, Any]) -> Any:
        return None

    def _load_extra_state(self, extra: Any) -> None:
        return None


class Signum(StagedOptimizer):
    r"""Signum: sign of momentum (Bernstein et al. 2018, Algorithm 2); 1 bit per coordinate.

    .. math::
        m \leftarrow \beta m + (1-\beta) g,\qquad
        x \leftarrow x - \mathrm{lr}\,(\mathrm{sign}(m) + \mathrm{wd}\,x)

    ``m`` starts at 0 with no bias correction; weight decay is decoupled and applied after
    the sign; ``sign(0) = 0``. With ``aggregator=MajorityVote()`` each worker votes with the
    sign of its own momentum and every worker applies the majority (Algorithm 3); with
    ``AllReduce()`` the workers' momenta are averaged (by linearity, Signum on the mean
    gradient) and every worker applies the sign of the mean.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0; a float or a one-element tensor). Sign methods move every
            coordinate by ``lr`` per step, so typical values are 1e-4 to 1e-3, much
            smaller than for SGD.
        momentum: β in [0, 1) (default 0.9). β = 0 is signSGD.
        weight_decay: decoupled weight decay (>= 0).
        aggregator: ``None`` (single process), :class:`~signsgd.distributed.MajorityVote`
            or :class:`~signsgd.distributed.AllReduce`.
        foreach: use the multi-tensor kernels (default: yes). Both paths give
            bit-identical results.
        maximize: ascend the objective (the step uses −g), as in ``torch.optim``.

    Raises:
        ValueError: a hyper-parameter out of range, an aggregator that cannot serve a sign
            optimiser, or ``fused=True`` and other ``torch.optim`` options this class does
            not implement.

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

    def __init__(self, params: Iterable[Any], lr: float | Tensor, momentum: float = 0.9,
                 weight_decay: float = 0.0, aggregator: Reducer | None = None,
                 *, foreach: bool | None = None, maximize: bool = False,
                 **unsupported: Any) -> None:
        reject_options(type(self).__name__, unsupported)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults, aggregator)

    def _local_step(self, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        momentum = scalar(group["momentum"])
        bufs = self._buffers(params, "momentum_buffer") if momentum != 0 else []
        F.signum(params, grads, bufs, lr=scalar(group["lr"]), momentum=momentum,
                 weight_decay=scalar(group["weight_decay"]), foreach=self._foreach(group),
                 workspace=self._workspace)

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
                   ) -> Plan:
        """The direction ``lerp(m, g, 1−β)``; on commit ``m`` ← it (β = 0: ``g``, no state)."""
        momentum = scalar(group["momentum"])
        if momentum == 0:
            return Plan(params, list(grads))
        fresh: Fresh = {}
        bufs = self._buffers(params, "momentum_buffer", fresh)
        directions = F.signum_direction(grads, bufs, momentum=momentum,
                                        foreach=self._foreach(group))
        return Plan(params, directions, fresh, momenta=bufs, targets=directions)


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
        aggregator: ``None``, :class:`~signsgd.distributed.MajorityVote` or
            :class:`~signsgd.distributed.AllReduce`.
        foreach: use the multi-tensor kernels (default: yes).
        maximize: ascend the objective (the step uses −g), as in ``torch.optim``.

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
                 aggregator: Reducer | None = None, *, foreach: bool | None = None,
                 maximize: bool = False, **unsupported: Any) -> None:
        if "momentum" in unsupported:
            raise TypeError("SignSGD takes no momentum; use signsgd.Signum")
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay,
                         aggregator=aggregator, foreach=foreach, maximize=maximize,
                         **unsupported)


class Lion(StagedOptimizer):
    r"""Lion: the sign of an interpolation of momentum and gradient (Chen et al. 2023).

    .. math::
        c \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        x \leftarrow x\,(1 - \mathrm{lr}\cdot\mathrm{wd}) - \mathrm{lr}\,\mathrm{sign}(c),\quad
        m \leftarrow \beta_2 m + (1-\beta_2) g

    ``m`` starts at 0; ``c`` is computed from the momentum *before* it is updated (a Lion
    that updates ``m`` first is another algorithm); ``sign(0) = 0``; weight decay is
    decoupled, as in the paper. One state buffer per parameter (AdamW keeps two). With
    ``aggregator=MajorityVote()`` this is Distributed Lion (Liu et al. 2024): each worker
    keeps its own ``m``, votes with ``sign(c)`` (zero counts as +1 but for chunks zero on
    every rank, ties broken as for Signum), every worker applies the vote, then updates its
    own ``m`` with its local gradient — 1 bit per coordinate each way.

    Tuning (the paper): a learning rate 3–10× smaller than AdamW's, and a weight decay
    3–10× larger, keep the effective decay ``lr·wd`` similar; β = (0.9, 0.99) by default,
    (0.95, 0.98) for stability in large-model training.

    Args:
        params: iterable of parameters or param-group dicts.
        lr: learning rate (>= 0; default 1e-4).
        betas: ``(β1, β2)``, each in [0, 1): β1 interpolates the update direction, β2 is
            the momentum's decay.
        weight_decay: decoupled weight decay (>= 0).
        aggregator: ``None``, :class:`~signsgd.distributed.MajorityVote` (Distributed
            Lion) or :class:`~signsgd.distributed.AllReduce`.
        foreach: use the multi-tensor kernels (default: yes); both paths are bit-identical.
        maximize: ascend the objective (the step uses −g), as in ``torch.optim``.

    Raises:
        ValueError: a hyper-parameter out of range or an unsupported ``torch.optim`` option.

    Example:
        >>> import torch, signsgd
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = signsgd.Lion([w], lr=0.5, betas=(0.5, 0.75))
        >>> w.grad = torch.tensor([2.0, 0.0]); opt.step()
        >>> w.data, opt.state[w]["exp_avg"]
        (tensor([ 0.5000, -1.0000]), tensor([0.5000, 0.0000]))

    Reference: Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023;
    Liu et al., Communication Efficient Distributed Training with Distributed Lion,
    NeurIPS 2024.
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 aggregator: Reducer | None = None, *, foreach: bool | None = None,
                 maximize: bool = False, **unsupported: Any) -> None:
        reject_options(type(self).__name__, unsupported)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults, aggregator)

    @staticmethod
    def _betas(group: dict[str, Any]) -> tuple[float, float]:
        b1, b2 = group["betas"]
        return scalar(b1), scalar(b2)

    def _local_step(self, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        beta1, beta2 = self._betas(group)
        F.lion(params, grads, self._buffers(params, "exp_avg"), lr=scalar(group["lr"]),
               beta1=beta1, beta2=beta2, weight_decay=scalar(group["weight_decay"]),
               foreach=self._foreach(group), workspace=self._workspace)

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
                   ) -> Plan:
        """The direction ``lerp(m, g, 1−β1)``; on commit ``m ← lerp(m, g, 1−β2)``."""
        fresh: Fresh = {}
        bufs = self._buffers(params, "exp_avg", fresh)
        beta1, _ = self._betas(group)
        directions = F.signum_direction(grads, bufs, momentum=beta1,
                                        foreach=self._foreach(group))
        return Plan(params, directions, fresh, momenta=bufs, targets=list(grads))

    def _advance(self, group: dict[str, Any], plan: Plan) -> None:
        """``m ← β2·m + (1−β2)·g`` with this rank's own gradient."""
        F.lerp_(plan.momenta, plan.targets, 1.0 - self._betas(group)[1],
                foreach=self._foreach(group))


class EFSGD(StagedOptimizer):
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
        aggregator: ``None``, :class:`~signsgd.distributed.ErrorFeedbackAllReduce` (the
            two-stage compressed all-reduce, worker and server error) or
            :class:`~signsgd.distributed.AllReduce` (each worker's ``C(p)`` averaged
            exactly; the worker error stays on each rank).
        foreach: use the multi-tensor kernels (default: yes).
        maximize: ascend the objective (the step uses −g), as in ``torch.optim``.
        nesterov: Nesterov momentum, as ``torch.optim.SGD(nesterov=True)``
            (``p ← lr·(d + β·m) + e`` with ``d = g + wd·x``; needs ``momentum > 0``).

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

    _pickled = ("aggregator", "compressor")
    _options = frozenset({"nesterov"})

    def __init__(self, params: Iterable[Any], lr: float | Tensor,
                 compressor: Compressor | Callable[[Tensor], Tensor] | None = None,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 aggregator: Reducer | None = None,
                 *, foreach: bool | None = None, maximize: bool = False,
                 nesterov: bool = False, **unsupported: Any) -> None:
        reject_options(type(self).__name__, unsupported)
        if compressor is None:
            compressor = ScaledSign()
        if not callable(compressor):
            raise ValueError(f"Invalid compressor: {compressor!r} (must be callable)")
        self.compressor = compressor
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize, nesterov=nesterov)
        super().__init__(params, defaults, aggregator)

    def _compressor(self) -> Compressor | None:
        return self.compressor  # type: ignore[return-value]

    def _state(self, group: dict[str, Any], params: list[Tensor]
               ) -> tuple[list[Tensor], list[Tensor | None], Fresh]:
        """The error buffers, the momentum buffers (``None`` with β = 0) and what of them
        is new (stored only when the step succeeds)."""
        fresh: Fresh = {}
        errors = self._buffers(params, "error", fresh)
        bufs: list[Tensor | None] = (self._buffers(params, "momentum_buffer", fresh)  # type: ignore[assignment]
                                     if scalar(group["momentum"]) != 0 else [None] * len(params))
        return errors, bufs, fresh

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=scalar(group["lr"]), momentum=scalar(group["momentum"]),
                    weight_decay=scalar(group["weight_decay"]), foreach=self._foreach(group),
                    nesterov=bool(group.get("nesterov")))

    def _local_step(self, group: dict[str, Any], params: list[Tensor],
                    grads: list[Tensor]) -> None:
        """:func:`~signsgd.functional.ef_sgd`; the state it creates is kept only if the
        compressor succeeded on every tensor of the group."""
        errors, bufs, fresh = self._state(group, params)
        F.ef_sgd(params, grads, errors, bufs, compressor=self.compressor, **self._hyper(group))
        self._store(fresh)

    def _transform(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
                   ) -> Plan:
        """``p = lr·(g + wd·x) + e`` (or ``lr·m + e``), out of place; on commit ``m ← m'``
        and ``e ← p − C(p)``."""
        errors, bufs, fresh = self._state(group, params)
        comp, new_m = F.ef_compensate(params, grads, errors, bufs, **self._hyper(group))
        return Plan(params, comp, fresh, momenta=bufs if new_m else [],  # type: ignore[arg-type]
                    targets=new_m, errors=errors)

    def _update(self, group: dict[str, Any], updated: list[Tensor], updates: list[Tensor],
                signs: bool) -> None:
        """``x ← x − Δ``, on every parameter some rank had a gradient for (so that every
        rank keeps identical parameters)."""
        F.sub_(updated, updates, foreach=self._foreach(group))

    def _pop_extra_state(self, state_dict: dict[str, Any]) -> Any:
        return state_dict.pop("compressor", None)

    def _load_extra_state(self, extra: Any) -> None:
        if extra is not None and hasattr(self.compressor, "load_state_dict"):
            self.compressor.load_state_dict(extra)

    def _extra_state(self) -> dict[str, Any]:
        """The compressor's state (RandomK's generator) under ``"compressor"``."""
        if hasattr(self.compressor, "state_dict"):
            return {"compressor": self.compressor.state_dict()}
        return {}
