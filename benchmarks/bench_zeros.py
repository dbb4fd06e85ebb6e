"""Benchmark: what a majority vote does with coordinates whose gradient is zero on every rank.

Issue 23, item 11. Three rules for a zero:

* ``plus-one``: zero goes out as +1 (the rule before protocol version 2): a coordinate that
  is zero everywhere moves by −lr every step;
* ``tie-bit``: a zero goes out as the shared random bit of ``(seed, step, coordinate)``
  (every rank draws the same), so such a coordinate walks at random instead;
* ``skip-C``: one activity bit per zero chunk of about C coordinates of one tensor
  (:func:`signsgd.distributed.vote.zero_chunks`), ORed over the ranks; the verdict is 0 on
  a chunk that is zero on every rank (``skip-ZERO_CHUNK`` is the library's rule;
  ``skip-tensor`` has one chunk per tensor).

(a) Drift: M Gloo ranks train a word-level bag-of-words classifier
(``EmbeddingBag(V, dim)`` + ``Linear``, Zipf-distributed words, each rank its own batches)
with Signum (β = 0.9) whose directions are voted under each rule through the library's
vote core (:func:`~signsgd.distributed.vote.vote_flat`); after ``--steps`` steps it
reports, over the embedding rows no rank ever used, ``max |x_T − x_0|`` and the share that
stayed exactly still (Signum in one process leaves them still: sign(0) = 0).

(b) Cost of the library's rule against ``plus-one``, in the same processes, the two taking
turns: the bytes per rank of one vote (counted by the vote core) and the median wall time
of one vote of a ``--numel``-coordinate vector in ``--tensors`` tensors: dense (no zeros),
its first 90% zero, and 90% of its 256-coordinate rows zero (at random, the same on every
rank: an embedding's unused rows).

Usage::

    .venv/bin/python -m benchmarks.bench_zeros --world-size 3 --steps 300 \\
        --markdown benchmarks/results/zeros.md
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import command_line, emit, load_text, machine, timed, utc_now
from signsgd.distributed import vote as V
from signsgd.distributed.launch import spawn
from signsgd.distributed.random_bits import tie_bits
from signsgd.packing import unpack_signs

RULES = ("plus-one", "tie-bit", "skip-tensor", "skip-256", "skip-128", "skip-64")
_TENSOR = 1 << 40  # a ZERO_CHUNK no tensor reaches: one chunk per tensor
LIBRARY = V.ZERO_CHUNK


def _chunk(rule: str) -> int | None:
    if not rule.startswith("skip-"):
        return None
    return _TENSOR if rule == "skip-tensor" else int(rule[len("skip-"):])


SKIP = f"skip-{LIBRARY}"  # the library's rule


def _vote(flat: torch.Tensor, lengths: tuple[int, ...], rule: str, step: int,
          out: torch.Tensor) -> int:
    """One vote of ``flat`` under ``rule`` into ``out``; the bytes this rank sent."""
    chunk = _chunk(rule)
    if rule == "tie-bit":
        bits = unpack_signs(tie_bits(11, step, 0, (flat.numel() + 63) // 64), flat.numel(),
                            flat.dtype)
        flat = torch.where(flat == 0, bits, flat)
    runs = None
    if chunk is not None:
        V.ZERO_CHUNK = chunk
        V.zero_chunks.cache_clear()
        runs = V.zero_chunks(lengths)
    try:
        sent, _ = V.vote_flat(flat, group=None, mode="sharded", seed=3, step=step, out=out,
                              runs=runs)
    finally:
        V.ZERO_CHUNK = LIBRARY
        V.zero_chunks.cache_clear()
    return sent


def drift_worker(rank: int, world_size: int, vocab: int, dim: int, steps: int,
                 batch: int, words: int) -> dict[str, Any]:
    """Train the classifier under every rule; per rule the drift of the unused rows."""
    probs = 1.0 / np.arange(1, vocab + 1) ** 1.1
    probs /= probs.sum()
    out: dict[str, Any] = {}
    for rule in RULES:
        torch.manual_seed(0)
        emb, head = torch.nn.EmbeddingBag(vocab, dim, mode="mean"), torch.nn.Linear(dim, 16)
        params = list(emb.parameters()) + list(head.parameters())
        x0 = emb.weight.detach().clone()
        lengths = tuple(p.numel() for p in params)
        m = torch.zeros(sum(lengths))
        verdict = torch.empty_like(m)
        rng = np.random.default_rng(1000 * rank + 7)
        used = np.zeros(vocab, dtype=bool)
        sent = 0
        for step in range(steps):
            tokens = rng.choice(vocab, size=(batch, words), p=probs)
            used[np.unique(tokens)] = True
            ids = torch.from_numpy(tokens)
            labels = ids[:, 0] % 16
            for p in params:
                p.grad = None
            F.cross_entropy(head(emb(ids)), labels).backward()
            g = torch.cat([p.grad.reshape(-1) for p in params])
            m = torch.lerp(m, g, 0.1)
            sent += _vote(m, lengths, rule, step, verdict)
            with torch.no_grad():
                off = 0
                for p in params:
                    p.add_(verdict[off:off + p.numel()].view_as(p), alpha=-1e-3)
                    off += p.numel()
        out[rule] = {"used": used, "drift": (emb.weight.detach() - x0).abs().amax(dim=1),
                     "sent": sent / steps}
    return out


def cost_worker(rank: int, world_size: int, numel: int, tensors: int, reps: int
                ) -> dict[str, Any]:
    """Per-rep wall time of one vote under ``plus-one`` and the library's rule, taking
    turns; the bytes of each."""
    g = torch.Generator().manual_seed(rank)
    cuts = np.sort(np.random.default_rng(5).choice(numel - 1, tensors - 1, replace=False) + 1)
    lengths = tuple(int(n) for n in np.diff(np.concatenate([[0], cuts, [numel]])))
    dense = torch.randn(numel, generator=g)
    sparse = dense.clone()
    sparse[: numel * 9 // 10] = 0.0
    rows = dense.clone()  # rows of 256 coordinates, 90% of them zero on every rank
    drop = np.random.default_rng(6).random(numel // 256) < 0.9
    rows[: numel // 256 * 256].view(-1, 256)[torch.from_numpy(drop)] = 0.0
    out_buf = torch.empty_like(dense)
    step = iter(range(10**9))
    ops = {f"{rule} {name}": (lambda x=x, rule=rule: _vote(x, lengths, rule, next(step), out_buf))
           for name, x in (("dense", dense), ("90% zero", sparse), ("90% of rows zero", rows))
           for rule in ("plus-one", SKIP)}
    times: dict[str, list[float]] = {name: [] for name in ops}
    sent = {name: fn() for name, fn in ops.items()}  # warm-up, and the bytes
    for _ in range(reps):
        for name, fn in ops.items():
            times[name].append(timed(fn)[0])
    return {"times": times, "sent": sent}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=20_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--numel", type=int, default=11_000_000)
    ap.add_argument("--tensors", type=int, default=62)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--parts", nargs="+", choices=("drift", "cost"), default=["drift", "cost"])
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    mach = machine()
    started = utc_now()
    m = args.world_size
    drifts = {dim: spawn(drift_worker, m, (args.vocab, dim, args.steps, args.batch,
                                           args.words), timeout=3000)
              for dim in (args.dims if "drift" in args.parts else [])}
    cost = (spawn(cost_worker, m, (args.numel, args.tensors, args.reps), timeout=3000)
            if "cost" in args.parts else None)
    lines = [
        "# Zero gradients in the majority vote (issue 23, item 11)", "",
        f"`{command_line(__file__, argv)}`", "",
        f"{started}, {mach['cpus']} CPUs, torch {mach['torch']}, {mach['platform']}"
        f"{load_text(mach)}", "",
    ]
    lines = lines + [
        f"## (a) Drift of never-used embedding rows: M = {m}, V = {args.vocab}, "
        f"{args.steps} Signum steps (β = 0.9, lr = 1e-3), {args.batch}×{args.words} Zipf(1.1) "
        f"words per rank and step; plus-one moves every such row by steps·lr = "
        f"{args.steps * 1e-3:.3f}", "",
        "| dim | rows never used | rule | max \\|x_T − x_0\\| over them | mean | exactly "
        "still | bytes sent per rank per vote |", "|---|---|---|---|---|---|---|",
    ] if drifts else lines[:6]
    for dim, drift in drifts.items():
        used = np.logical_or.reduce([drift[r][RULES[0]]["used"] for r in range(m)])
        for rule in RULES:
            d = drift[0][rule]["drift"].numpy()[~used]
            same = all(torch.equal(drift[r][rule]["drift"], drift[0][rule]["drift"])
                       for r in range(m))
            lines.append(f"| {dim} | {int((~used).sum())} | {rule} | {d.max():.4f} | "
                         f"{d.mean():.4f} | {(d == 0).mean() * 100:.1f}% | "
                         f"{drift[0][rule]['sent']:.0f}{'' if same else ' (ranks differ!)'} |")
    if cost is None:
        emit("\n".join(lines) + "\n", args.markdown)
        return 0
    lines += ["", f"## (b) Cost of {SKIP} (the library's rule) against plus-one: M = {m}, "
              f"d = {args.numel} in {args.tensors} tensors, {args.reps} reps taking turns "
              "(slowest rank's wall time of vote_flat; the header, the same for both, not "
              "included)", "",
              f"| input | plus-one ms | {SKIP} ms | ratio | bytes plus-one | bytes {SKIP} |"
              " bytes ratio |", "|---|---|---|---|---|---|---|"]
    med = {k: statistics.median(v) for k, v in cost[0]["times"].items()}
    sent = cost[0]["sent"]
    for name in ("dense", "90% zero", "90% of rows zero"):
        a, b = f"plus-one {name}", f"{SKIP} {name}"
        lines.append(f"| {name} | {med[a] * 1e3:.1f} | {med[b] * 1e3:.1f} | "
                     f"{med[b] / med[a]:.3f} | {sent[a]} | {sent[b]} | "
                     f"{sent[b] / sent[a]:.4f} |")
    emit("\n".join(lines) + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
