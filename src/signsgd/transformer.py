"""A decoder-only transformer for character-level language modelling (``--model gpt``).

Pre-LayerNorm blocks: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; causal attention with
``torch.nn.functional.scaled_dot_product_attention``; a GELU MLP of width ``4·d_model``;
learned position embeddings; the output projection tied to the token embedding; a final
LayerNorm. No dropout and no biases in the linear layers (LayerNorms keep theirs), so the
model is a pure function of its parameters (every worker computes the same thing).

Sizes (:data:`SIZES`): ``gpt`` (the default, for 2 CPU cores: 4 layers, 4 heads, 128 wide,
block 128, 816,000 parameters with Shakespeare's 85 characters) and ``gpt-10m`` (6
layers, 6 heads, 384 wide, block 256: the configuration of the well-known character-level
Shakespeare baseline, about 10.7M parameters; for machines with a GPU).

Example:
    >>> import torch
    >>> model = GPT(vocab_size=10, n_layer=1, n_head=2, d_model=8, block_size=6)
    >>> model(torch.zeros(3, 6, dtype=torch.long)).shape
    torch.Size([3, 6, 10])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPTSize", "SIZES", "generate"]


@dataclass(frozen=True)
class GPTSize:
    """The shape of a :class:`GPT`: layers, heads, width and context length.

    Example:
        >>> SIZES["gpt-10m"].d_model
        384
    """

    n_layer: int
    n_head: int
    d_model: int
    block_size: int


#: Named sizes of ``--model``.
SIZES: dict[str, GPTSize] = {
    "gpt": GPTSize(n_layer=4, n_head=4, d_model=128, block_size=128),
    "gpt-10m": GPTSize(n_layer=6, n_head=6, d_model=384, block_size=256),
}


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model, bias=False)
        self.down = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer over ``vocab_size`` tokens (see the module docstring).

    Args:
        vocab_size: number of token ids.
        n_layer, n_head, d_model: depth, attention heads (dividing ``d_model``), width.
        block_size: the longest context (number of learned positions).

    Raises:
        ValueError: a size that is not a positive int, or ``n_head`` not dividing
            ``d_model``.

    Example:
        >>> sum(p.numel() for p in GPT(85, **vars(SIZES["gpt"])).parameters())
        816000
    """

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int,
                 block_size: int) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("d_model", d_model),
                            ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
        if d_model % n_head:
            raise ValueError(f"n_head {n_head} must divide d_model {d_model}")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 initialisation; residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight",
                                                                       "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(batch, time, vocab)`` of the next token at every position."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size "
                             f"{self.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.t()  # tied output projection


@torch.no_grad()
def generate(model: GPT, prompt: Tensor, steps: int, *, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:
    """Extend ``prompt`` (1-D ids) by ``steps`` tokens sampled from the model.

    ``temperature`` 0 picks the most likely token (greedy); otherwise the logits are divided
    by it and a token is drawn with ``generator`` (seed it for reproducible samples).

    Example:
        >>> torch.manual_seed(0); m = GPT(5, 1, 1, 4, 8)
        <torch._C.Generator object at ...>
        >>> generate(m, torch.tensor([1, 2]), 3, temperature=0).shape
        torch.Size([5])
    """
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"Invalid temperature: {temperature!r} (must be >= 0 and finite)")
    was = model.training
    model.eval()
    ids = prompt.clone()
    for _ in range(steps):
        logits = model(ids[-model.block_size:].unsqueeze(0))[0, -1]
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt])
    model.train(was)
    return ids
