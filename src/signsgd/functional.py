"""The update math of signSGD, Signum and EF-SGD as pure, keyword-only functions.

Each function works on lists of tensors of one parameter group and has a single-tensor
path (``foreach=False``) and a multi-tensor path (``foreach=True``, ``torch._foreach_*``)
that give bit-identical results (``tests/test_functional.py``). The optimiser classes in
:mod:`signsgd.optim` are thin wrappers that hold state and call these.

Conventions (DESIGN.md):

* Signum: ``m ← β·m + (1−β)·g`` (computed as ``m.lerp_(g, 1−β)``), ``m`` starts at 0, no
  bias correction; ``x ← x − lr·(sign(m) + wd·x)``, computed as
  ``x ← x·(1 − lr·wd) − lr·sign(m)``. SignSGD is Signum with β = 0.
* ``torch.sign(0) = 0`` here; on the wire (distributed) zero counts as +1.
* EF-SGD: ``p ← lr·(g + wd·x) + e``; ``Δ ← C(p)``; ``e ← p − Δ``; ``x ← x − Δ``.
  With momentum β > 0 the gradient term goes through heavy-ball momentum first, exactly as
  in ``torch.optim.SGD``: ``d ← g + wd·x``; ``m ← β·m + d``; ``p ← lr·m + e``. So EF-SGD
  with the identity compressor is SGD.

References:
    Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed Optimisation for
    Non-Convex Problems. ICML 2018.
    Karimireddy, Rebjock, Stich, Jaggi. Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes. ICML 2019.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "signum",
    "signum_direction",
    "sign_update_",
    "ef_sgd",
    "ef_compensate",
    "ef_apply_",
    "first_nonfinite",
]


def _by_device_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), for the foreach kernels."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return list(groups.values())


def _pick(tensors: Sequence[Tensor], idx: list[int]) -> list[Tensor]:
    return [tensors[i] for i in idx]


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or ±inf, or ``None`` if all are finite.

    One reduction pass per tensor (``_foreach_norm`` with ord=inf propagates NaN and inf)
    and one host synchronisation per (device, dtype) group.

    Example:
        >>> first_nonfinite([torch.ones(2), torch.tensor([1.0, float("nan")])])
        1
    """
    bad: list[int] = []
    for idx in _by_device_dtype(tensors):
        nonempty = [i for i in idx if tensors[i].numel() > 0]
        if not nonempty:
            continue
        norms = torch._foreach_norm(_pick(tensors, nonempty), float("inf"))
        ok = torch.isfinite(torch.stack(norms)).tolist()
        bad.extend(i for i, fine in zip(nonempty, ok) if not fine)
    return min(bad) if bad else None


# --------------------------------------------------------------------------- Signum
def signum_direction(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    momentum: float,
    foreach: bool = False,
) -> list[Tensor]:
    """The local vector whose sign a worker sends: ``β·m + (1−β)·g`` (or ``g`` if β = 0).

    Out of place: neither ``grads`` nor ``momentum_buffers`` is modified, so a distributed
    step can still abort (non-finite gradient on another rank) with state untouched. Commit
    the new momentum afterwards with ``buf.copy_(direction)``.

    Args:
        grads: gradients ``g``.
        momentum_buffers: ``m`` for each gradient (ignored when ``momentum == 0``).
        momentum: β in [0, 1).
        foreach: use the multi-tensor kernels.

    Returns:
        New tensors (or ``grads`` themselves when β = 0).

    Example:
        >>> signum_direction([torch.tensor([2.0])], [torch.tensor([4.0])], momentum=0.5)
        [tensor([3.])]
    """
    if momentum == 0:
        return list(grads)
    bufs = [b for b in momentum_buffers]
    if any(b is None for b in bufs):
        raise ValueError("signum_direction needs a momentum buffer for every gradient")
    if not foreach:
        return [torch.lerp(b, g, 1.0 - momentum) for b, g in zip(bufs, grads)]  # type: ignore[arg-type]
    out: list[Tensor | None] = [None] * len(grads)
    for idx in _by_device_dtype(grads):
        res = torch._foreach_lerp(_pick(bufs, idx), _pick(grads, idx), 1.0 - momentum)  # type: ignore[arg-type]
        for i, r in zip(idx, res):
            out[i] = r
    return out  # type: ignore[return-value]


def sign_update_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float,
    take_sign: bool = True,
    foreach: bool = False,
) -> None:
    """Apply ``x ← x·(1 − lr·wd) − lr·s`` in place, with ``s = sign(direction)``.

    Args:
        params: parameters ``x``, updated in place.
        directions: the vectors whose sign is applied (momentum or gradient), or, with
            ``take_sign=False``, the ±1 verdicts of a majority vote applied as they are.
        lr: learning rate.
        weight_decay: decoupled weight decay ``wd``, applied after the sign.
        take_sign: take ``torch.sign`` of ``directions`` (``False`` for votes).
        foreach: use the multi-tensor kernels.

    Example:
        >>> x = torch.tensor([1.0, 1.0])
        >>> sign_update_([x], [torch.tensor([3.0, -0.5])], lr=0.5, weight_decay=0.0)
        >>> x
        tensor([0.5000, 1.5000])
    """
    decay = 1.0 - lr * weight_decay
    if not foreach:
        for x, d in zip(params, directions):
            s = torch.sign(d) if take_sign else d
            if weight_decay != 0:
                x.mul_(decay)
            x.add_(s, alpha=-lr)
        return
    for idx in _by_device_dtype(params):
        xs = _pick(params, idx)
        ds = _pick(directions, idx)
        ss = torch._foreach_sign(ds) if take_sign else ds
        if weight_decay != 0:
            torch._foreach_mul_(xs, decay)
        torch._foreach_add_(xs, ss, alpha=-lr)


def signum(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    foreach: bool = False,
) -> None:
    """One single-process Signum step (signSGD when ``momentum == 0``), in place.

    ``m ← β·m + (1−β)·g``;  ``x ← x − lr·(sign(m) + wd·x)``.

    Args:
        params: parameters with gradients.
        grads: their gradients (finite; the optimiser checks).
        momentum_buffers: momentum ``m`` per parameter, updated in place (unused if β = 0).
        lr: learning rate.
        momentum: β in [0, 1).
        weight_decay: decoupled weight decay.
        foreach: use the multi-tensor kernels.

    Example:
        >>> x, m = torch.tensor([1.0]), torch.tensor([0.0])
        >>> signum([x], [torch.tensor([-2.0])], [m], lr=0.1, momentum=0.5, weight_decay=0.0)
        >>> x, m
        (tensor([1.1000]), tensor([-1.]))

    Reference: Bernstein et al., signSGD, ICML 2018 (Algorithms 1 and 2).
    """
    if momentum != 0:
        bufs = list(momentum_buffers)
        if not foreach:
            for b, g in zip(bufs, grads):
                b.lerp_(g, 1.0 - momentum)  # type: ignore[union-attr]
        else:
            for idx in _by_device_dtype(grads):
                torch._foreach_lerp_(_pick(bufs, idx), _pick(grads, idx), 1.0 - momentum)  # type: ignore[arg-type]
        directions: Sequence[Tensor] = bufs  # type: ignore[assignment]
    else:
        directions = grads
    sign_update_(params, directions, lr=lr, weight_decay=weight_decay, foreach=foreach)


# --------------------------------------------------------------------------- EF-SGD
def ef_compensate(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    errors: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    foreach: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """The error-compensated vector ``p = lr·(g + wd·x) + e`` (momentum: ``lr·m + e``).

    Out of place: returns ``(p, new_momentum)``; nothing passed in is modified. With
    ``momentum == 0`` the second list is empty.

    Example:
        >>> p, _ = ef_compensate([torch.tensor([1.0])], [torch.tensor([2.0])],
        ...                      [torch.tensor([0.5])], [None], lr=0.25, momentum=0.0,
        ...                      weight_decay=0.0)
        >>> p
        [tensor([1.])]
    """
    n = len(params)
    out_p: list[Tensor | None] = [None] * n
    out_m: list[Tensor | None] = [None] * n if momentum != 0 else []
    if not foreach:
        for i, (x, g, e) in enumerate(zip(params, grads, errors)):
            d = g.add(x, alpha=weight_decay) if weight_decay != 0 else g
            if momentum != 0:
                d = momentum_buffers[i].mul(momentum).add_(d)  # type: ignore[union-attr]
                out_m[i] = d
            out_p[i] = e.add(d, alpha=lr)
        return out_p, out_m  # type: ignore[return-value]
    for idx in _by_device_dtype(params):
        xs, gs, es = _pick(params, idx), _pick(grads, idx), _pick(errors, idx)
        ds = torch._foreach_add(gs, xs, alpha=weight_decay) if weight_decay != 0 else gs
        if momentum != 0:
            ms = torch._foreach_mul(_pick(momentum_buffers, idx), momentum)  # type: ignore[arg-type]
            torch._foreach_add_(ms, ds)
            for i, m in zip(idx, ms):
                out_m[i] = m  # type: ignore[index]
            ds = ms
        for i, p in zip(idx, torch._foreach_add(es, ds, alpha=lr)):
            out_p[i] = p
    return out_p, out_m  # type: ignore[return-value]


def ef_apply_(
    params: Sequence[Tensor],
    errors: Sequence[Tensor],
    compensated: Sequence[Tensor],
    transmitted: Sequence[Tensor],
    update: Sequence[Tensor],
    *,
    foreach: bool = False,
) -> None:
    """Commit an EF step in place: ``e ← p − C(p)`` and ``x ← x − Δ``.

    ``transmitted`` is this worker's ``C(p)``; ``update`` is the ``Δ`` applied to the
    parameters (the same tensors in a single process, the aggregate in a distributed run).
    """
    if not foreach:
        for x, e, p, c, u in zip(params, errors, compensated, transmitted, update):
            torch.sub(p, c, out=e)
            x.sub_(u)
        return
    for idx in _by_device_dtype(params):
        torch._foreach_copy_(
            _pick(errors, idx), torch._foreach_sub(_pick(compensated, idx), _pick(transmitted, idx))
        )
        torch._foreach_sub_(_pick(params, idx), _pick(update, idx))


def ef_sgd(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    errors: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    compressor: Callable[[Tensor], Tensor],
    foreach: bool = False,
) -> None:
    """One single-process EF-SGD step, in place (EF-signSGD with ``ScaledSign``).

    ``p ← lr·(g + wd·x) + e``;  ``Δ ← C(p)``;  ``e ← p − Δ``;  ``x ← x − Δ``
    (with momentum β > 0: ``m ← β·m + (g + wd·x)`` and ``p ← lr·m + e``).

    Args:
        params, grads: parameters and their (finite) gradients.
        errors: error buffers ``e``, updated in place.
        momentum_buffers: heavy-ball buffers (unused if β = 0), updated in place.
        lr, momentum, weight_decay: hyper-parameters.
        compressor: ``C``, applied per tensor.
        foreach: use the multi-tensor kernels.

    Example:
        >>> from signsgd.compression import ScaledSign
        >>> x, e = torch.tensor([1.0, 1.0]), torch.zeros(2)
        >>> ef_sgd([x], [torch.tensor([1.0, -3.0])], [e], [None], lr=1.0, momentum=0.0,
        ...        weight_decay=0.0, compressor=ScaledSign())
        >>> x, e
        (tensor([-1.,  3.]), tensor([-1., -1.]))

    Reference: Karimireddy et al., Error Feedback Fixes SignSGD, ICML 2019 (Algorithm 2).
    """
    ps, ms = ef_compensate(
        params, grads, errors, momentum_buffers,
        lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach,
    )
    deltas = [compressor(p) for p in ps]
    if momentum != 0:
        for b, m in zip(momentum_buffers, ms):
            b.copy_(m)  # type: ignore[union-attr]
    ef_apply_(params, errors, ps, deltas, deltas, foreach=foreach)
