"""The update math of signSGD, Signum, Lion and EF-SGD as pure, keyword-only functions.

Each function works on lists of tensors of one parameter group and has a single-tensor
path (``foreach=False``) and a multi-tensor path (``foreach=True``, ``torch._foreach_*``)
that give bit-identical results (``tests/test_functional.py``). The optimiser classes in
:mod:`signsgd.optim` are thin wrappers that hold state and call these.

On CPU the multi-tensor path of the sign updates handles tensors above ``2**20``
elements one at a time, with their sign written into a buffer the caller keeps between
steps (``workspace``) instead of a fresh large temporary; with one intra-op thread such
a tensor is also cut into cache-sized views. On GPUs the foreach kernels run on whole
lists (the caching allocator recycles temporaries).

Conventions (``docs/design.md``):

* Signum: ``m ← β·m + (1−β)·g`` (computed as ``m.lerp_(g, 1−β)``), ``m`` starts at 0, no
  bias correction; ``x ← x − lr·(sign(m) + wd·x)``, computed as
  ``x ← x·(1 − lr·wd) − lr·sign(m)``. SignSGD is Signum with β = 0.
* Lion: ``c ← lerp(m, g, 1−β1)``; ``x ← x·(1 − lr·wd) − lr·sign(c)``;
  ``m ← lerp(m, g, 1−β2)`` — ``c`` from the momentum before its update.
* ``torch.sign(0) = 0`` here; on the wire (distributed) zero counts as +1, except in
  a chunk that is zero on every rank (its verdict is 0).
* EF-SGD: ``p ← lr·(g + wd·x) + e``; ``Δ ← C(p)``; ``e ← p − Δ``; ``x ← x − Δ``.
  With momentum β > 0 the gradient term goes through heavy-ball momentum first, exactly as
  in ``torch.optim.SGD``: ``d ← g + wd·x``; ``m ← β·m + d``; ``p ← lr·m + e``. So EF-SGD
  with the identity compressor is SGD.

References:
    Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed Optimisation for
    Non-Convex Problems. ICML 2018.
    Chen et al. Symbolic Discovery of Optimization Algorithms. NeurIPS 2023.
    Karimireddy, Rebjock, Stich, Jaggi. Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes. ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from signsgd.scratch import Scratch

__all__ = [
    "signum",
    "signum_direction",
    "sign_update_",
    "lion",
    "ef_sgd",
    "ef_compensate",
    "residual_",
    "sub_",
    "compress_all",
    "lerp_",
    "copy_",
    "first_nonfinite",
    "all_finite",
]

#: Elements per batch of the multi-tensor sign updates; a multiple of 4096 so that a cut
#: tensor's views keep the alignment (and so the vectorisation) of the whole tensor.
_BATCH = 1 << 20


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]] | None:
    """Indices of ``tensors`` grouped by (device, dtype); ``None`` if there is one group."""
    if not tensors:
        return None
    first = tensors[0]
    dtype, index, kind = first.dtype, first.get_device(), first.device.type
    # get_device() is -1 on CPU and the device index elsewhere (cheaper than .device).
    if all(t.dtype is dtype and t.get_device() == index for t in tensors) and (
            index == -1 or all(t.device.type == kind for t in tensors)):
        return None
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _pick(tensors: Sequence[Tensor], idx: list[int]) -> list[Tensor]:
    return [tensors[i] for i in idx]


def _by_bucket(*lists: Sequence[Tensor]) -> Iterator[list[list[Tensor]]]:
    """The aligned ``lists`` split into (device, dtype) buckets of the first list."""
    buckets = _buckets(lists[0])
    if buckets is None:
        yield [list(ts) for ts in lists]
        return
    for idx in buckets:
        yield [_pick(ts, idx) for ts in lists]


def _scratch(workspace: Scratch | None, like: Tensor, numel: int) -> Tensor:
    """A flat buffer of ``numel`` elements of ``like``'s dtype and device, kept in
    ``workspace`` so that repeated steps reuse it (a fresh tensor without one)."""
    if workspace is None:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    return workspace.get("sign", numel, like.dtype, like.device)


def _batches(lists: list[list[Tensor]], workspace: Scratch | None
             ) -> Iterator[tuple[list[list[Tensor]], Tensor | None]]:
    """The aligned tensor ``lists`` in batches, each with an optional sign buffer.

    On CPU, a tensor larger than ``_BATCH`` elements gets a batch of its own and a buffer
    from ``workspace`` for its sign (a fresh large temporary costs page faults on every
    step). Such a tensor, when contiguous, is further cut into flat views of ``_BATCH``
    elements so that its temporaries (the sign) stay in cache instead of making a round
    trip through memory: on an idle 2-core machine this took Signum.step on a 25M tensor
    with 2 threads from 1.37x to 1.03x of SGD's (benchmarks/results/step.md). Elementwise
    results are the same either way. Smaller tensors go together in batches of about
    ``_BATCH`` elements. On GPUs the lists come back whole.
    """
    first = lists[0]
    if not first:
        return
    if first[0].device.type != "cpu":  # GPU: temporaries come from the caching allocator
        yield lists, None
        return
    sizes = [t.numel() for t in first]
    if sum(sizes) <= _BATCH:
        yield lists, None
        return
    n_lists = len(lists)
    batch: list[list[Tensor]] = [[] for _ in range(n_lists)]
    filled = 0
    for i, size in enumerate(sizes):
        row = [ts[i] for ts in lists]
        if size > _BATCH:
            if filled or batch[0]:
                yield batch, None
                batch, filled = [[] for _ in range(n_lists)], 0
            if all(t.is_contiguous() for t in row):
                flats = [t.view(-1) for t in row]
                buf = _scratch(workspace, row[0], _BATCH)
                for start in range(0, size, _BATCH):
                    views = [[f[start:start + _BATCH]] for f in flats]
                    yield views, buf[:views[0][0].numel()]
            else:
                yield [[t] for t in row], _scratch(workspace, row[0], size).view(row[0].shape)
            continue
        for b, t in zip(batch, row):
            b.append(t)
        filled += size
        if filled >= _BATCH:
            yield batch, None
            batch, filled = [[] for _ in range(n_lists)], 0
    if filled or batch[0]:
        yield batch, None


_REDUCED = (torch.float16, torch.bfloat16)

#: torch's CPU grain size: kernels on fewer elements run on one thread.
_SMALL = 1 << 15


def _screen(tensors: Sequence[Tensor]) -> float:
    """A number that is finite whenever every entry of ``tensors`` (one dtype) is finite.

    The sum of all entries (float16 / bfloat16 accumulate in float32): it is NaN or inf if
    any entry is, and may overflow on huge finite entries. Tensors above ``_SMALL``
    elements are summed one by one; smaller ones are flattened in runs of at most
    ``_SMALL`` elements and each run summed at once: fewer kernels than one reduction per
    tensor, and none that needs several threads for a few thousand elements.
    """
    acc = torch.float32 if tensors[0].dtype in _REDUCED else None
    sums: list[Tensor] = []
    run: list[Tensor] = []
    filled = 0

    def flush() -> None:
        if len(run) == 1:
            sums.append(run[0].sum(dtype=acc))
        elif run:
            sums.append(torch._utils._flatten_dense_tensors(run).sum(dtype=acc))

    threaded = tensors[0].device.type == "cpu" and torch.get_num_threads() > 1
    for t in tensors:
        n = t.numel()
        if n > _SMALL:
            if threaded and n <= 8 * _SMALL and t.is_contiguous():
                # A multi-threaded reduction of a few grains costs more in thread
                # synchronisation than it saves; sum grain-sized pieces on one thread.
                sums.extend(c.sum(dtype=acc) for c in t.view(-1).split(_SMALL))
            else:
                sums.append(t.sum(dtype=acc))
            continue
        if filled + n > _SMALL:
            flush()
            run, filled = [], 0
        run.append(t)
        filled += n
    flush()
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return total.item()


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or ±inf, or ``None`` if all are finite.

    A fast screen first: the sum of all entries of each (device, dtype) bucket is finite
    whenever no entry is NaN or inf. Only if the screen fails does an exact per-tensor
    ``isfinite`` pass find the index (and clear a false alarm from overflow of huge finite
    entries). Cost: one read of each tensor and one host synchronisation per bucket.

    Args:
        tensors: real floating tensors of any dtype and device (empty tensors are fine).

    Returns:
        The smallest index ``i`` such that ``tensors[i]`` has a NaN or inf entry, or None.

    Example:
        >>> first_nonfinite([torch.ones(2), torch.tensor([1.0, float("nan")])])
        1
        >>> first_nonfinite([torch.ones(2), torch.tensor([3e38, 3e38])]) is None
        True
    """
    if not tensors:
        return None
    buckets = _buckets(tensors)
    groups = [list(range(len(tensors)))] if buckets is None else buckets
    suspect: list[int] = []
    for idx in groups:
        ts = tensors if buckets is None else _pick(tensors, idx)
        if not math.isfinite(_screen(ts)):
            suspect.extend(idx)
    for i in sorted(suspect):
        if not bool(torch.isfinite(tensors[i]).all()):
            return i
    return None


def all_finite(tensors: Sequence[Tensor]) -> bool | Tensor:
    """Whether no entry of ``tensors`` is NaN or ±inf, without waiting for the device.

    On CPU (and for no tensors) a Python bool, from :func:`first_nonfinite`. On an
    accelerator a 0-d bool tensor on its device (an exact ``isfinite`` reduction, enqueued,
    not read back), so a distributed step can carry the flag in its header and read it with
    the header: one host synchronisation per step instead of two.

    Example:
        >>> all_finite([torch.ones(2), torch.tensor([1.0, float("inf")])])
        False
    """
    if not tensors or tensors[0].device.type == "cpu":
        return first_nonfinite(tensors) is None
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if len(flags) > 1 else flags[0]


# --------------------------------------------------------------------------- Signum
def signum_direction(
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    momentum: float,
    foreach: bool = False,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """The local vector whose sign a worker sends: ``β·m + (1−β)·g`` (or ``g`` if β = 0).

    Computed as ``torch.lerp(m, g, 1−β)``. Out of place: neither ``grads`` nor
    ``momentum_buffers`` is modified, so a distributed step can still abort (non-finite
    gradient on another rank) with state untouched. Commit the new momentum afterwards
    with ``buf.copy_(direction)``. Lion's ``c = β1·m + (1−β1)·g`` is the same function.

    Args:
        grads: gradients ``g``.
        momentum_buffers: ``m`` for each gradient (ignored when ``momentum == 0``).
        momentum: β in [0, 1).
        foreach: use the multi-tensor kernels.
        out: optional tensors (one per gradient, same shapes) to write the directions into.

    Returns:
        New tensors (``out`` when given; ``grads`` themselves when β = 0 and no ``out``).

    Example:
        >>> signum_direction([torch.tensor([2.0])], [torch.tensor([4.0])], momentum=0.5)
        [tensor([3.])]
    """
    if momentum == 0:
        if out is None:
            return list(grads)
        copy_(out, grads, foreach=foreach)
        return list(out)
    if len(momentum_buffers) != len(grads) or any(b is None for b in momentum_buffers):
        raise ValueError("signum_direction needs a momentum buffer for every gradient")
    weight = 1.0 - momentum
    if out is not None:
        for b, g, o in zip(momentum_buffers, grads, out):
            torch.lerp(b, g, weight, out=o)  # type: ignore[arg-type]
        return list(out)
    if not foreach:
        return [torch.lerp(b, g, weight) for b, g in zip(momentum_buffers, grads)]  # type: ignore[arg-type]
    buckets = _buckets(grads)
    if buckets is None:
        return list(torch._foreach_lerp(momentum_buffers, grads, weight))  # type: ignore[arg-type]
    result: list[Tensor | None] = [None] * len(grads)
    for idx in buckets:
        res = torch._foreach_lerp(_pick(momentum_buffers, idx), _pick(grads, idx), weight)  # type: ignore[arg-type]
        for i, r in zip(idx, res):
            result[i] = r
    return result  # type: ignore[return-value]


def _sign_apply_batch(xs: list[Tensor], ds: list[Tensor], lr: float, decay: float,
                      take_sign: bool, scratch: Tensor | None) -> None:
    if not take_sign:
        ss = ds
    elif scratch is not None and len(ds) == 1:
        ss = [torch.sign(ds[0], out=scratch)]
    else:
        ss = torch._foreach_sign(ds)
    if decay != 1.0:
        if xs[0].dtype in _REDUCED:
            # In-place _foreach_mul_ rounds the scalar to float16 first; Tensor.mul_ does
            # not. Keep the (more accurate) single-tensor result.
            for x in xs:
                x.mul_(decay)
        else:
            torch._foreach_mul_(xs, decay)
    torch._foreach_add_(xs, ss, alpha=-lr)


def sign_update_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float,
    take_sign: bool = True,
    foreach: bool = False,
    workspace: Scratch | None = None,
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
        workspace: a dict the caller keeps between calls; the multi-tensor path caches
            its large CPU temporaries in it (at most one buffer the size of the largest
            tensor per dtype) instead of allocating them on every call.

    Returns:
        None; ``params`` are updated in place.

    Example:
        >>> x = torch.tensor([1.0, 1.0])
        >>> sign_update_([x], [torch.tensor([3.0, -0.5])], lr=0.5, weight_decay=0.0)
        >>> x
        tensor([0.5000, 1.5000])

    Reference: Bernstein et al., signSGD, ICML 2018 (Algorithm 1).
    """
    if len(directions) != len(params):
        raise ValueError(f"got {len(params)} params but {len(directions)} directions")
    decay = 1.0 - lr * weight_decay
    if not foreach:
        for x, d in zip(params, directions):
            s = torch.sign(d) if take_sign else d
            if decay != 1.0:
                x.mul_(decay)
            x.add_(s, alpha=-lr)
        return
    for xs, ds in _by_bucket(params, directions):
        for (bx, bd), scratch in _batches([xs, ds], workspace if take_sign else None):
            _sign_apply_batch(bx, bd, lr, decay, take_sign, scratch)


def signum(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    foreach: bool = False,
    workspace: Scratch | None = None,
) -> None:
    r"""One single-process Signum step (signSGD when ``momentum == 0``), in place.

    .. math::
        m \leftarrow \beta m + (1-\beta) g,\qquad
        x \leftarrow x - \mathrm{lr}\,(\mathrm{sign}(m) + \mathrm{wd}\,x)

    Args:
        params: parameters with gradients, updated in place.
        grads: their gradients (finite; the optimiser checks).
        momentum_buffers: momentum ``m`` per parameter, updated in place (unused if β = 0).
        lr: learning rate.
        momentum: β in [0, 1).
        weight_decay: decoupled weight decay.
        foreach: use the multi-tensor kernels.
        workspace: a dict the caller keeps between calls for large CPU temporaries (see
            :func:`sign_update_`); ``None`` allocates them afresh.

    Returns:
        None; ``params`` and ``momentum_buffers`` are updated in place.

    Example:
        >>> x, m = torch.tensor([1.0]), torch.tensor([0.0])
        >>> signum([x], [torch.tensor([-2.0])], [m], lr=0.1, momentum=0.5, weight_decay=0.0)
        >>> x, m
        (tensor([1.1000]), tensor([-1.]))

    Reference: Bernstein et al., signSGD, ICML 2018 (Algorithms 1 and 2).
    """
    if len(grads) != len(params):
        raise ValueError(f"got {len(params)} params but {len(grads)} gradients")
    if momentum == 0:
        sign_update_(params, grads, lr=lr, weight_decay=weight_decay, foreach=foreach,
                     workspace=workspace)
        return
    if len(momentum_buffers) != len(params) or any(b is None for b in momentum_buffers):
        raise ValueError("signum with momentum needs a momentum buffer for every parameter")
    weight = 1.0 - momentum
    decay = 1.0 - lr * weight_decay
    if not foreach:
        for x, g, m in zip(params, grads, momentum_buffers):
            m.lerp_(g, weight)  # type: ignore[union-attr]
            s = torch.sign(m)  # type: ignore[arg-type]
            if decay != 1.0:
                x.mul_(decay)
            x.add_(s, alpha=-lr)
        return
    for xs, gs, ms in _by_bucket(params, grads, momentum_buffers):  # type: ignore[arg-type]
        for (bx, bg, bm), scratch in _batches([xs, gs, ms], workspace):
            torch._foreach_lerp_(bm, bg, weight)
            _sign_apply_batch(bx, bm, lr, decay, True, scratch)


def lion(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    foreach: bool = False,
    workspace: Scratch | None = None,
) -> None:
    r"""One single-process Lion step, in place.

    .. math::
        c \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        x \leftarrow x\,(1 - \mathrm{lr}\cdot\mathrm{wd}) - \mathrm{lr}\,\mathrm{sign}(c),
        \quad m \leftarrow \beta_2 m + (1-\beta_2) g

    ``c`` is computed as ``torch.lerp(m, g, 1−β1)`` from the momentum *before* it is
    updated, then ``m.lerp_(g, 1−β2)``.

    Args:
        params: parameters, updated in place.
        grads: their (finite) gradients.
        exp_avgs: momentum ``m`` per parameter, updated in place.
        lr: learning rate.
        beta1: interpolation weight of the update direction, in [0, 1).
        beta2: momentum decay, in [0, 1).
        weight_decay: decoupled weight decay.
        foreach: use the multi-tensor kernels.
        workspace: a :class:`~signsgd.scratch.Scratch` the caller keeps between calls for
            large CPU temporaries (see :func:`sign_update_`).

    Returns:
        None; ``params`` and ``exp_avgs`` are updated in place.

    Example:
        >>> x, m = torch.tensor([1.0]), torch.tensor([0.0])
        >>> lion([x], [torch.tensor([-2.0])], [m], lr=0.5, beta1=0.5, beta2=0.75,
        ...      weight_decay=0.0)
        >>> x, m
        (tensor([1.5000]), tensor([-0.5000]))

    Reference: Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023
    (Program 1).
    """
    if not (len(grads) == len(params) == len(exp_avgs)):
        raise ValueError(f"got {len(params)} params, {len(grads)} gradients and "
                         f"{len(exp_avgs)} momentum buffers")
    w1, w2 = 1.0 - beta1, 1.0 - beta2
    decay = 1.0 - lr * weight_decay
    if not foreach:
        for x, g, m in zip(params, grads, exp_avgs):
            c = torch.lerp(m, g, w1)
            if decay != 1.0:
                x.mul_(decay)
            x.add_(torch.sign(c), alpha=-lr)
            m.lerp_(g, w2)
        return
    for xs, gs, ms in _by_bucket(params, grads, exp_avgs):
        for (bx, bg, bm), scratch in _batches([xs, gs, ms], workspace):
            if scratch is not None and len(bm) == 1:
                cs = [torch.lerp(bm[0], bg[0], w1, out=scratch)]
            else:
                cs = list(torch._foreach_lerp(bm, bg, w1))
            _sign_apply_batch(bx, cs, lr, decay, True, scratch)
            torch._foreach_lerp_(bm, bg, w2)


def lerp_(buffers: Sequence[Tensor], targets: Sequence[Tensor], weight: float, *,
          foreach: bool = False) -> None:
    """``b ← b + weight·(t − b)`` in place for each pair (``torch.lerp``'s formula).

    Example:
        >>> b = [torch.tensor([1.0])]; lerp_(b, [torch.tensor([3.0])], 0.5); b
        [tensor([2.])]
    """
    if not foreach:
        for b, t in zip(buffers, targets):
            b.lerp_(t, weight)
        return
    for bs, ts in _by_bucket(buffers, targets):
        torch._foreach_lerp_(bs, ts, weight)


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor], *, foreach: bool = False) -> None:
    """``d.copy_(s)`` for each pair.

    Example:
        >>> d = [torch.zeros(1)]; copy_(d, [torch.ones(1)]); d
        [tensor([1.])]
    """
    if not foreach:
        for d, s in zip(dst, src):
            d.copy_(s)
        return
    for ds, ss in _by_bucket(dst, src):
        torch._foreach_copy_(ds, ss)


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
    nesterov: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """The error-compensated vector ``p = lr·(g + wd·x) + e`` (momentum: ``lr·m + e``).

    With momentum β > 0 the new heavy-ball buffer is ``m' = β·m + g + wd·x`` and
    ``p = lr·m' + e`` — or, with ``nesterov``, ``p = lr·(g + wd·x + β·m') + e``, as
    ``torch.optim.SGD(nesterov=True)``. Out of place: nothing passed in is modified.

    Args:
        params: parameters ``x``.
        grads: gradients ``g``.
        errors: error buffers ``e``.
        momentum_buffers: heavy-ball buffers ``m`` (ignored when ``momentum == 0``).
        lr: learning rate.
        momentum: β in [0, 1).
        weight_decay: L2 weight decay added to the gradient.
        foreach: use the multi-tensor kernels.
        nesterov: Nesterov momentum (needs ``momentum > 0``).

    Returns:
        ``(p, new_momentum)``; the second list is empty when ``momentum == 0``.

    Example:
        >>> p, _ = ef_compensate([torch.tensor([1.0])], [torch.tensor([2.0])],
        ...                      [torch.tensor([0.5])], [None], lr=0.25, momentum=0.0,
        ...                      weight_decay=0.0)
        >>> p
        [tensor([1.])]

    Reference: Karimireddy et al., Error Feedback Fixes SignSGD, ICML 2019 (Algorithm 2).
    """
    n = len(params)
    if len(grads) != n or len(errors) != n:
        raise ValueError(f"got {n} params, {len(grads)} gradients and {len(errors)} errors")
    if momentum != 0 and (len(momentum_buffers) != n
                          or any(b is None for b in momentum_buffers)):
        raise ValueError("ef_compensate with momentum needs a buffer for every parameter")
    out_p: list[Tensor | None] = [None] * n
    out_m: list[Tensor | None] = [None] * n if momentum != 0 else []
    if not foreach:
        for i, (x, g, e) in enumerate(zip(params, grads, errors)):
            d = g.add(x, alpha=weight_decay) if weight_decay != 0 else g
            if momentum != 0:
                m = momentum_buffers[i].mul(momentum).add_(d)  # type: ignore[union-attr]
                out_m[i] = m
                d = d.add(m, alpha=momentum) if nesterov else m
            out_p[i] = e.add(d, alpha=lr)
        return out_p, out_m  # type: ignore[return-value]
    buckets = _buckets(params)
    for idx in [list(range(n))] if buckets is None else buckets:
        xs, gs, es = _pick(params, idx), _pick(grads, idx), _pick(errors, idx)
        ds = torch._foreach_add(gs, xs, alpha=weight_decay) if weight_decay != 0 else gs
        if momentum != 0:
            ms = torch._foreach_mul(_pick(momentum_buffers, idx), momentum)  # type: ignore[arg-type]
            torch._foreach_add_(ms, ds)
            for i, m in zip(idx, ms):
                out_m[i] = m  # type: ignore[index]
            ds = torch._foreach_add(ds, ms, alpha=momentum) if nesterov else ms
        for i, p in zip(idx, torch._foreach_add(es, ds, alpha=lr)):
            out_p[i] = p
    return out_p, out_m  # type: ignore[return-value]


def residual_(errors: Sequence[Tensor], compensated: Sequence[Tensor],
              transmitted: Sequence[Tensor], *, foreach: bool = False) -> None:
    """``e ← p − C(p)`` in place: what this worker's codec did not send, carried into its
    next step (EF-SGD's worker error).

    Example:
        >>> e = [torch.zeros(1)]
        >>> residual_(e, [torch.tensor([0.75])], [torch.tensor([0.5])]); e
        [tensor([0.2500])]

    Reference: Karimireddy et al., Error Feedback Fixes SignSGD, ICML 2019 (Algorithm 2).
    """
    if not len(errors) == len(compensated) == len(transmitted):
        raise ValueError(f"residual_ needs one p and C(p) per error, got {len(errors)} errors, "
                         f"{len(compensated)} p and {len(transmitted)} C(p)")
    if not foreach:
        for e, p, c in zip(errors, compensated, transmitted):
            torch.sub(p, c, out=e)
        return
    for es, ps, cs in _by_bucket(errors, compensated, transmitted):
        torch._foreach_copy_(es, ps)
        torch._foreach_sub_(es, cs)


def sub_(params: Sequence[Tensor], updates: Sequence[Tensor], *, foreach: bool = False
         ) -> None:
    """``x ← x − Δ`` in place for each pair (EF-SGD's parameter update).

    Example:
        >>> x = [torch.ones(1)]; sub_(x, [torch.tensor([0.5])]); x
        [tensor([0.5000])]
    """
    if not foreach:
        for x, u in zip(params, updates):
            x.sub_(u)
        return
    for xs, us in _by_bucket(params, updates):
        torch._foreach_sub_(xs, us)


def compress_all(compressor: Callable[[Tensor], Tensor], ps: Sequence[Tensor]) -> list[Tensor]:
    """``C(p)`` for each ``p``, checking that ``C`` keeps shape, dtype and device.

    Raises:
        ValueError: ``C`` returned something else than a tensor of ``p``'s shape, dtype
            and device (naming the tensor and what came back).

    Example:
        >>> compress_all(torch.sign, [torch.tensor([2.0, -0.5])])
        [tensor([ 1., -1.])]
    """
    out = []
    for i, p in enumerate(ps):
        c = compressor(p)
        if not isinstance(c, Tensor) or c.shape != p.shape or c.dtype != p.dtype \
                or c.device != p.device:
            got = (f"{type(c).__name__} {tuple(c.shape)} {c.dtype} on {c.device}"
                   if isinstance(c, Tensor) else type(c).__name__)
            raise ValueError(
                f"compressor {compressor!r} returned {got} for tensor {i} of shape "
                f"{tuple(p.shape)}, dtype {p.dtype} on {p.device}; it must keep all three"
            )
        out.append(c)
    return out


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
    nesterov: bool = False,
) -> None:
    r"""One single-process EF-SGD step, in place (EF-signSGD with ``ScaledSign``).

    .. math::
        p \leftarrow \mathrm{lr}\,(g + \mathrm{wd}\,x) + e,\quad
        \Delta \leftarrow C(p),\quad e \leftarrow p - \Delta,\quad x \leftarrow x - \Delta

    With momentum β > 0: ``m ← β·m + (g + wd·x)`` and ``p ← lr·m + e`` (Nesterov:
    ``p ← lr·(d + β·m) + e``). The same pieces as a distributed step
    (:func:`ef_compensate`, then the reduction, then :func:`residual_` and :func:`sub_`),
    with ``Δ = C(p)`` as the reduction. The compressor runs on every tensor before anything
    is written, so a compressor that raises leaves parameters and buffers untouched.

    Args:
        params: parameters, updated in place.
        grads: their (finite) gradients.
        errors: error buffers ``e``, updated in place.
        momentum_buffers: heavy-ball buffers (unused if β = 0), updated in place.
        lr: learning rate.
        momentum: heavy-ball β in [0, 1).
        weight_decay: L2 weight decay added to the gradient.
        compressor: ``C``, applied per tensor; must keep shape, dtype and device.
        foreach: use the multi-tensor kernels.
        nesterov: Nesterov momentum (needs ``momentum > 0``).

    Returns:
        None.

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
        params, grads, errors, momentum_buffers, lr=lr, momentum=momentum,
        weight_decay=weight_decay, foreach=foreach, nesterov=nesterov,
    )
    deltas = compress_all(compressor, ps)
    if momentum != 0:
        copy_(momentum_buffers, ms, foreach=foreach)  # type: ignore[arg-type]
    residual_(errors, ps, deltas, foreach=foreach)
    sub_(params, deltas, foreach=foreach)
