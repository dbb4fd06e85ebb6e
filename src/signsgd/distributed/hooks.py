r"""DDP communication hook for signSGD / Signum / Lion with majority vote (Algorithm 3).

Register it on a :class:`~torch.nn.parallel.DistributedDataParallel` model and train with
plain ``torch.optim.SGD(lr, momentum=0)``::

    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from signsgd.distributed import MajorityVoteHookState, majority_vote_hook

    dist.init_process_group("gloo")               # or "nccl"; started by torchrun
    ddp = DDP(model)
    state = MajorityVoteHookState(momentum=0.9, module=ddp)
    ddp.register_comm_hook(state, majority_vote_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.0, weight_decay=1e-4)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()             # votes run here, bucket by bucket
        opt.step()                                # x <- x - lr·(vote + wd·x)

What the hook does, per DDP bucket and step:

1. Each rank updates its own Signum momentum of the bucket's parameters,
   ``m ← β·m + (1−β)·g`` (computed as ``torch.lerp(m, g, 1−β)``, exactly as
   :class:`signsgd.Signum` does, so the two agree bit for bit).
2. The signs of ``m`` (zero → +1; a chunk zero on every rank gets verdict 0) go out
   packed, 1 bit per coordinate, and the majority comes back, 1 bit per coordinate: the core of
   :class:`~signsgd.distributed.MajorityVote`, run on the group's engine thread.
3. The ±1 verdict becomes the bucket's "gradient". ``torch.optim.SGD`` with
   ``momentum=0`` then applies ``x ← x − lr·(vote + wd·x)``: Algorithm 3 of Bernstein et
   al. with decoupled weight decay applied after the vote (the ICLR 2019 convention), the
   same update as ``signsgd.Signum(..., aggregator=MajorityVote())``.

With ``betas=(β1, β2)`` the hook is Distributed Lion instead: each rank votes with
``c = β1·m + (1−β1)·g`` and keeps ``m ← β2·m + (1−β2)·g`` with its own gradient (both
``torch.lerp``, as :class:`signsgd.Lion` computes them), the same update as
``signsgd.Lion(..., aggregator=MajorityVote())`` when SGD's weight decay is 0.

The hook returns the vote's future without waiting, so the collectives of one bucket run
while autograd still computes the gradients of the next (communication overlaps backward).

Tuning guide
------------
* ``lr``: a sign step moves *every* coordinate by ``lr``, so use Signum learning rates
  (1e-4 to 1e-3 for Adam-like scales), not SGD ones. Do not use ``SGD(momentum>0)`` or
  ``nesterov``: the momentum lives in the hook, *before* the vote; momentum after the vote
  would average ±1 verdicts instead.
* ``momentum`` (β, default 0.9): the worker-side Signum momentum. ``0`` gives signSGD with
  majority vote (each worker votes with the sign of its gradient). Larger β smooths the
  noise each worker votes with; 0.9 is the paper's value.
* ``weight_decay``: set it on ``SGD``; since the vote is ±1 it acts as decoupled decay.
  ``SGD`` computes ``x − lr·(v + wd·x)`` where ``Signum`` computes ``x·(1 − lr·wd) − lr·v``:
  the same update, equal up to float rounding (bit-identical with ``weight_decay=0``).
* ``bucket_cap_mb`` (a DDP argument): every bucket is one vote, i.e. a small header
  ``all_gather`` (96 bytes per rank: finite flag, layout, step) then one
  ``all_to_all_single`` and one ``all_gather`` in ``mode="sharded"``. Bigger buckets mean
  fewer, larger messages (less latency overhead per byte); smaller buckets start the first
  vote earlier in the backward pass (more overlap). The 25 MB default is a good start;
  raise it on high-latency links.
* ``mode``: ``"sharded"`` (default) sends and receives about ``2·d/8`` bytes per rank
  whatever the world size M; ``"allgather"`` gathers everybody's signs, ``(M−1)·d/8``
  bytes in per rank, and is only worth it for M = 2 or for debugging.
* Ties (even M) are broken by a pseudo-random bit shared by all ranks, derived from
  ``seed`` and a per-vote counter, so use an odd M where you can; an even M is fine.
* Memory: one momentum tensor per parameter (like ``Signum``), plus one bucket-sized
  buffer in flight per bucket.
* Checkpointing: pass ``module=`` (the DDP model or the module it wraps) so momentum is
  keyed by parameter name; then :meth:`MajorityVoteHookState.state_dict` /
  :meth:`~MajorityVoteHookState.load_state_dict` save and restore each rank's momentum,
  and the state pickles (without its process group). Momentum is per rank: save one file
  per rank, and the resumed run is bit-identical to an uninterrupted one::

      torch.save({"model": ddp.module.state_dict(), "hook": state.state_dict()},
                 f"ckpt.rank{dist.get_rank()}.pt")
      ...
      ckpt = torch.load(f"ckpt.rank{dist.get_rank()}.pt")
      model.load_state_dict(ckpt["model"]); ddp = DDP(model)
      state = MajorityVoteHookState(momentum=0.9, module=ddp)
      state.load_state_dict(ckpt["hook"]); ddp.register_comm_hook(state, majority_vote_hook)

  A step's momentum is committed only once every bucket of the step has voted.
* Non-finite gradients: a NaN or inf in any rank's bucket makes ``backward()`` raise on
  *every* rank in that step (the finite flag travels with the vote's first message): a
  ``RuntimeError`` from DDP whose message carries the
  :class:`~signsgd.distributed.NonFiniteGradientError` text, naming the bad rank(s) (the
  vote hands the error back as its result, so the hook sees its type, not its text). No
  momentum changes; skip ``opt.step()`` for that batch (as AMP's ``GradScaler`` does) and
  the next step trains on normally, identical on every rank.
* Parameters that get no gradient in a step (with ``find_unused_parameters=True``) are
  zero in DDP's bucket; they vote with their decayed momentum ``β·m``, which differs from
  ``Signum``'s aggregator (that one sends zeros and keeps ``m``).

Bytes: after each step, :attr:`MajorityVoteHookState.bytes_sent` /
:attr:`~MajorityVoteHookState.bytes_received` hold the payload bytes this rank sent and
received in the last complete step (all buckets together);
``total_bytes_sent`` / ``total_bytes_received`` accumulate.

Reference: Bernstein, Zhao, Azizzadenesheli, Anandkumar. signSGD with Majority Vote is
Communication Efficient and Fault Tolerant. ICLR 2019.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from signsgd import functional as F
from signsgd.distributed import engine
from signsgd.distributed.header import spec_of
from signsgd.distributed.ledger import IterationLedger
from signsgd.distributed.vote import MajorityVote, check_seed, segment_lengths
from signsgd.errors import NonFiniteGradientError
from signsgd.reduction import CommStats

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the
# hook's annotations with ``dist.GradBucket`` / ``torch.futures.Future[torch.Tensor]``.

__all__ = ["MajorityVoteHookState", "majority_vote_hook"]

_ONE_BUCKET = 1 << 62  # a hook's vote is one DDP bucket, never split further
_COUNTERS = ("step", "votes", "total_bytes_sent", "total_bytes_received")


def _ledger_counter(name: str) -> property:
    """``state.<name>``: the counter of the state's :class:`IterationLedger`."""
    return property(lambda self: getattr(self._ledger, name),
                    lambda self, value: setattr(self._ledger, name, value))


class MajorityVoteHookState:
    """Per-rank state of :func:`majority_vote_hook`: Signum momentum, vote counter, bytes.

    Args:
        process_group: the group to vote in. ``None`` (the default): a private group of
            the default group's ranks, created at the first vote — the hook's collectives
            run on a thread of their own, and sharing DDP's group with it would let the
            two threads' collectives reach the group in different orders on different
            ranks (a hang, e.g. with ``find_unused_parameters=True``). Give a group only
            if DDP does not use it (e.g. ``dist.new_group(...)`` of DDP's ranks).
        momentum: Signum β in [0, 1) (default 0.9); 0 votes with the raw gradient.
        betas: ``(β1, β2)`` for Distributed Lion (then ``momentum`` is not used).
        mode: ``"sharded"`` (default) or ``"allgather"``, as in
            :func:`~signsgd.distributed.majority_vote`.
        seed: shared seed of the tie-breaking bits (an int >= 0, equal on every rank).
        module: the model (DDP wrapper or the wrapped module) whose parameter names key
            the momentum in :meth:`state_dict` and in the pickled state. Optional for
            training; needed for checkpoints. Can be given later with :meth:`bind`.
        adversary: a Byzantine behaviour from :mod:`signsgd.distributed.adversary`
            applied to what *this* rank sends (fault-tolerance experiments only).

    Attributes:
        step: number of complete steps (iterations whose every bucket was voted).
        votes: number of votes issued (one per bucket per step); drives tie-breaking.
        bytes_sent, bytes_received: payload bytes of the last complete step.
        buckets: number of DDP buckets (votes) in the last complete step.
        total_bytes_sent, total_bytes_received: accumulated over all steps.

    Raises:
        ValueError: a hyper-parameter out of range, named in the message.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        momentum: float = 0.9,
        mode: str = "sharded",
        seed: int = 0,
        *,
        module: torch.nn.Module | None = None,
        adversary: Any = None,
        betas: tuple[float, float] | None = None,
    ) -> None:
        for name, beta in [("momentum", momentum)] + list(zip(
                ("beta1", "beta2"), betas if isinstance(betas, (tuple, list)) else ())):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
                    0.0 <= float(beta) < 1.0):
                raise ValueError(f"Invalid {name} value: {beta!r} (must be in [0, 1))")
        if betas is not None and (not isinstance(betas, (tuple, list)) or len(betas) != 2):
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        # configuration, equal on every rank
        self.process_group = process_group  # None: a private group, made at the first vote
        self.momentum = float(momentum)
        self.betas = None if betas is None else (float(betas[0]), float(betas[1]))
        # the vote of every bucket (validates mode, seed, adversary); its group is made
        # at the first vote when process_group is None (never saved)
        self._voter = MajorityVote(process_group, mode, _ONE_BUCKET, check_seed(seed),
                                   adversary)
        # counters (checkpointed), the last complete step's traffic, the step in flight
        self._ledger: IterationLedger[tuple[int, Tensor]] = IterationLedger()
        # momentum: by parameter id once bound, by name while waiting for bind()
        self._momentum: dict[int, Tensor] = {}
        self._restored: dict[str, Tensor] = {}
        self._module: torch.nn.Module | None = None
        self._names: dict[int, str] = {}
        if module is not None:
            self.bind(module)

    step = _ledger_counter("step")
    votes = _ledger_counter("votes")
    bytes_sent = _ledger_counter("bytes_sent")
    bytes_received = _ledger_counter("bytes_received")
    buckets = _ledger_counter("buckets")
    total_bytes_sent = _ledger_counter("total_bytes_sent")
    total_bytes_received = _ledger_counter("total_bytes_received")

    def comm_stats(self) -> CommStats:
        """The last complete step's bytes and the totals (Telemetry; no time split).

        Example:
            >>> MajorityVoteHookState().comm_stats().bytes_sent
            0
        """
        return CommStats(int(self.bytes_sent), int(self.bytes_received), {},
                         int(self.total_bytes_sent), int(self.total_bytes_received))

    @property
    def mode(self) -> str:
        """The vote mode, ``"sharded"`` or ``"allgather"``."""
        return self._voter.mode

    @property
    def seed(self) -> int:
        """The shared seed of the tie-breaking bits."""
        return self._voter.tie_seed

    @property
    def adversary(self) -> Any:
        """The Byzantine behaviour applied to what this rank sends (``None``: honest)."""
        return self._voter.adversary

    @adversary.setter
    def adversary(self, adversary: Any) -> None:
        self._voter = MajorityVote(self._voter.group, self.mode, _ONE_BUCKET, self.seed,
                                   adversary)

    # ------------------------------------------------------------------ naming
    def bind(self, module: torch.nn.Module) -> "MajorityVoteHookState":
        """Use ``module``'s parameter names as momentum keys; attach restored momentum.

        ``module`` may be the DDP wrapper (names start with ``module.``) or the module it
        wraps; use the same one when saving and loading. Returns ``self``.

        Raises:
            ValueError: ``module`` is not a module, or restored momentum names a parameter
                it does not have or has another shape (nothing changes then).
        """
        attached = self._resolve(module, self._restored)
        self._momentum.update(attached)
        self._restored = {}
        self._module = module
        self._names = {id(p): n for n, p in module.named_parameters()}
        return self

    @staticmethod
    def _resolve(module: Any, by_name: dict[str, Tensor]) -> dict[int, Tensor]:
        """Map momentum by name onto ``module``'s parameters (no side effects)."""
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"Invalid module: {type(module).__name__} (must be a torch.nn.Module)")
        params = dict(module.named_parameters())
        unknown = sorted(set(by_name) - set(params))
        if unknown:
            raise ValueError(
                f"momentum names parameters that {type(module).__name__} does not have: "
                f"{unknown[:5]} (saved from the DDP wrapper, loaded into the inner module, "
                "or the other way round?)"
            )
        out = {}
        for name, m in by_name.items():
            p = params[name]
            if m.shape != p.shape:
                raise ValueError(
                    f"momentum for {name!r} has shape {tuple(m.shape)}, the parameter has "
                    f"shape {tuple(p.shape)}"
                )
            out[id(p)] = m.to(device=p.device, dtype=p.dtype).clone()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _momentum_by_name(self) -> dict[str, Tensor]:
        out = dict(self._restored)
        if self._momentum and not self._names:
            raise ValueError(
                f"MajorityVoteHookState holds momentum for {len(self._momentum)} parameters "
                "but knows no parameter names; pass module= (or call state.bind(model)) to "
                "save it"
            )
        for pid, m in self._momentum.items():
            if pid not in self._names:
                raise ValueError(
                    "a parameter with momentum is not in the bound module; bind the module "
                    "that DDP wraps (or the DDP model itself)"
                )
            out[self._names[pid]] = m
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: momentum by parameter name (copies), counters, settings.

        The one format: :meth:`load_state_dict` reads it, and pickling uses it."""
        return {
            "momentum": {n: m.detach().clone() for n, m in self._momentum_by_name().items()},
            **{key: getattr(self, key) for key in _COUNTERS},
            "beta": self.momentum,
            "betas": self.betas,
            "mode": self.mode,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (momentum, counters; settings checked).

        Raises:
            ValueError: missing keys, or ``beta`` / ``betas`` / ``mode`` / ``seed`` differ
                from this state's (a resumed run must vote the same way).
        """
        missing = sorted({"momentum", "step", "votes"} - set(state))
        if missing:
            raise ValueError(f"MajorityVoteHookState.load_state_dict: missing keys {missing}")
        betas = state.get("betas")
        for key, mine, theirs in (
                ("beta", self.momentum, state.get("beta", self.momentum)),
                ("betas", self.betas, None if betas is None else tuple(betas)),
                ("mode", self.mode, state.get("mode", self.mode)),
                ("seed", self.seed, state.get("seed", self.seed))):
            if theirs != mine:
                raise ValueError(
                    f"checkpoint has {key}={theirs!r} but this state has {key}={mine!r}"
                )
        momentum = {
            str(n): torch.as_tensor(m).detach().clone() for n, m in state["momentum"].items()
        }
        counters = {k: int(state.get(k, 0)) for k in _COUNTERS}
        # Validate everything before changing anything.
        attached = self._resolve(self._module, momentum) if self._module is not None else None
        if attached is None:
            self._momentum, self._restored = {}, momentum
        else:
            self._momentum, self._restored = attached, {}
        self._ledger.restore(**counters)

    def __getstate__(self) -> dict[str, Any]:
        """:meth:`state_dict` plus the adversary and the last step's traffic; no process
        group, module or step in flight (momentum by name)."""
        return {**self.state_dict(), "adversary": self.adversary,
                "last": (self.bytes_sent, self.bytes_received, self.buckets)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled state: default process group; call :meth:`bind` to train."""
        self.__init__(None, state["beta"], state["mode"], state["seed"],  # type: ignore[misc]
                      adversary=state.get("adversary"), betas=state.get("betas"))
        self.load_state_dict(state)
        self.bytes_sent, self.bytes_received, self.buckets = state.get("last", (0, 0, 0))

    # ------------------------------------------------------------------ one step
    def _check_bound(self) -> None:
        if self._restored:
            raise ValueError(
                f"MajorityVoteHookState holds restored momentum for {len(self._restored)} "
                "parameters that no module claimed; call state.bind(model) before training"
            )

    def vote_group(self) -> Any:
        """The group the votes run on: ``process_group``, or the private one (made now on
        every rank: DDP calls the hook for the first bucket on every rank alike)."""
        if self._voter.group is None:
            self._voter.group = dist.new_group(list(range(dist.get_world_size())))
        return self._voter.group

    def momentum_of(self, param: Tensor) -> Tensor | None:
        """This rank's momentum of ``param`` (``None`` before its first step)."""
        return self._momentum.get(id(param))


def majority_vote_hook(
    state: MajorityVoteHookState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    """DDP communication hook: Signum momentum per rank, majority vote of the signs.

    Register with ``ddp_model.register_comm_hook(state, majority_vote_hook)`` and train
    with ``torch.optim.SGD(params, lr, momentum=0)``; see the module docstring for the
    algorithm and the tuning guide.

    Args:
        state: this rank's :class:`MajorityVoteHookState`.
        bucket: the DDP gradient bucket (flat buffer of several parameters' gradients).

    Returns:
        A future holding the ±1 verdict, flat, with the bucket buffer's dtype and size;
        DDP copies it into the parameters' ``.grad``.

    Raises (from ``backward()``, on every rank, wrapped by DDP in a ``RuntimeError``):
        NonFiniteGradientError: some rank's bucket held a NaN or inf.
    """
    state._check_bound()
    buf = bucket.buffer()
    params = bucket.parameters()
    grads = bucket.gradients()
    beta = state.momentum if state.betas is None else state.betas[0]
    new_momentum: list[tuple[int, Tensor]] = []  # (id(param), m), committed at step end
    if beta == 0 and state.betas is None:
        direction = buf
    else:
        covered = sum(g.numel() for g in grads)
        direction = torch.empty_like(buf) if covered == buf.numel() else torch.zeros_like(buf)
        base = buf.storage_offset()
        outs = [direction[g.storage_offset() - base:][:g.numel()].view(g.shape) for g in grads]
        bufs = [state._momentum.get(id(p)) for p in params]
        bufs = [torch.zeros_like(g) if m is None else m for m, g in zip(bufs, grads)]
        # Per parameter, exactly like Signum / Lion: lerp(m, g, 1 - β) (β1 for Lion).
        F.signum_direction(grads, bufs, momentum=beta, out=outs)
        if state.betas is not None:  # Lion: m ← lerp(m, g, 1 − β2), from this rank's g
            outs = F.signum_direction(grads, bufs, momentum=state.betas[1],
                                      out=[torch.empty_like(g) for g in grads])
        new_momentum = [(id(p), o) for p, o in zip(params, outs)]  # Signum: the direction
    finite = F.all_finite([buf])  # on a GPU a device flag, read with the header
    group = state.vote_group()
    index = bucket.index()
    generation, step = state._ledger.begin_bucket(index, bucket.is_last())
    try:
        vote = state._voter.vote_job(direction, spec_of(direction), step=step, finite=finite,
                                     out=torch.empty_like(direction), who="majority_vote",
                                     lengths=segment_lengths(buf, grads))

        def job() -> tuple[Tensor, int, int] | NonFiniteGradientError:
            try:
                return vote()
            except NonFiniteGradientError as exc:  # crosses the future as a typed value
                return exc
        fut = engine.submit(group, job, direction.device)
    except BaseException:
        state._ledger.bucket_failed(generation)
        raise

    def _finish(f: torch.futures.Future[Any]) -> Tensor:
        try:
            outcome = f.value()
        except BaseException:
            state._ledger.bucket_failed(generation)
            raise
        if isinstance(outcome, NonFiniteGradientError):
            state._ledger.bucket_failed(generation)
            names = [state._names.get(id(p), f"shape {tuple(p.shape)}")
                     for p, g in zip(params, grads) if F.first_nonfinite([g]) is not None]
            where = f"; this rank's non-finite gradients: {names}" if names else ""
            raise NonFiniteGradientError(
                f"majority_vote_hook: a non-finite gradient (NaN or inf) on some rank in "
                f"DDP bucket {index}, step {state.step}{where}; momentum left unchanged, do "
                f"not call optimizer.step() ({outcome})"
            ) from outcome
        verdict, sent, received = outcome
        committed = state._ledger.bucket_done(generation, new_momentum, sent, received)
        state._momentum.update(committed or ())
        return verdict

    return fut.then(_finish)
