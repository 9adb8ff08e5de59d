"""The decoder-only transformer language model shared by stagewise's recipes.

Read top to bottom: config, building blocks (RMSNorm, rotary embedding, causal self-attention,
SwiGLU feed-forward, pre-norm block), the model, generation. One final norm and output head
(the "shared output head") turn the residual stream into logits after any layer, which is
what early-exit losses and layer-wise stages use. ``forward`` is built from ``embed``,
``run_layers`` and ``logits_from_hidden`` so that plugins can run part of the network from
a cached hidden state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn
from torch.nn import functional as F

from stagewise.schema import check_options

if TYPE_CHECKING:
    from stagewise.data.splits import DataSplits


@dataclass(kw_only=True)
class TransformerOptions:
    """The recipe's ``[model]`` keys: the architecture, without the vocabulary size."""

    n_layer: int = 2  # number of transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 64  # width of the residual stream
    ffn_hidden: int = 256  # hidden width of each SwiGLU feed-forward
    max_seq_len: int = 512  # longest sequence the model accepts; sizes the rotary tables
    rope_base: float = 10000.0  # base of the rotary embedding's frequencies
    norm_eps: float = 1e-5  # added to the mean square in RMSNorm
    dropout: float = 0.0  # dropout after the embedding, in attention and on each residual branch

    def __post_init__(self) -> None:
        check_options(self.checks())

    def checks(self) -> list[tuple[bool, str | tuple[str, ...], str]]:
        """The ``(ok, key, message)`` value checks of :func:`stagewise.check_options`; a model built on
        this one adds its own to these."""
        sizes = ("n_layer", "n_head", "n_embd", "ffn_hidden", "max_seq_len")
        checks: list[tuple[bool, str | tuple[str, ...], str]] = [
            (getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
            for name in sizes]
        if min(self.n_head, self.n_embd) >= 1:  # else reported above
            head_dim, rest = divmod(self.n_embd, self.n_head)
            checks.append((rest == 0 and head_dim % 2 == 0, ("n_embd", "n_head"),
                           f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); change one of them"
                           if rest else f"the head dimension n_embd / n_head = {head_dim} must be even for the "
                                        f"rotary embedding; change n_embd or n_head"))
        checks += [
            (1 < self.rope_base < math.inf, "rope_base",
             f"must be a finite number greater than 1, got {self.rope_base}"),
            (0 < self.norm_eps < math.inf, "norm_eps", f"must be a finite positive number, got {self.norm_eps}"),
            (0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}"),
        ]
        # Refuse blocks whose weights alone exceed the machine's memory: each block is a small
        # allocation, so building a billion of them would run for hours before failing.
        d, f = self.n_embd, self.ffn_hidden
        floats = self.n_layer * (4 * d * d + 3 * d * f + 2 * d)  # attention, SwiGLU, norms
        problem = memory_problem(floats, f"{self.n_layer} blocks of n_embd = {d} and ffn_hidden = {f}",
                                 "their weights")
        if problem:
            checks.append((False, ("n_layer", "n_embd", "ffn_hidden"), problem))
        return checks


def memory_problem(floats: int, what: str, whose: str) -> str | None:
    """Why ``what`` cannot be built when ``whose`` ``floats`` float32 values alone exceed the machine's
    RAM (refused before anything runs, not as a failed allocation later); None when they fit or the
    platform does not say."""
    gib, memory = floats * 4 / 2**30, physical_memory_gib()
    if memory is None or gib <= memory:
        return None
    return f"{what} need {gib:.3g} GiB for {whose} alone, more than this machine's {memory:.3g} GiB; lower them"


def physical_memory_gib() -> float | None:
    """The machine's RAM in GiB; None where the platform does not say (then nothing is refused)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


@dataclass(kw_only=True)
class TransformerConfig(TransformerOptions):
    """Everything that fixes the model's shape: the options plus the vocabulary size."""

    vocab_size: int  # number of token ids; recipes take it from the data's info["vocab_size"]

    def checks(self) -> list[tuple[bool, str | tuple[str, ...], str]]:
        return [*super().checks(), (self.vocab_size >= 1, "vocab_size",
                                    f"must be a positive integer, got {self.vocab_size}")]


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in float32 even when the model runs in lower precision
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim / 2)."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) of x (B, nh, T, hd) by each position's angles."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class SwiGLU(nn.Module):
    """Feed-forward ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.ffn = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.ffn(self.ffn_norm(x))
        return x  # (B, T, C)


class TransformerLM(nn.Module):
    """Decoder-only language model: idx (B, T) -> logits (B, T, vocab_size).

    Parameters: ``embedding.weight``, ``layers.{i}.*``, ``norm.weight`` (final RMSNorm) and
    ``head.weight`` (no bias). No layer has a bias.
    """

    name = "stagewise.transformer"
    Options = TransformerOptions

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.n_embd // config.n_head, config.max_seq_len, config.rope_base)
        # derived from the config, so kept out of checkpoints
        self.rope_cos: torch.Tensor  # buffers, declared for type checkers (nn.Module types them Tensor | Module)
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, hd/2)

        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream, so scale their init by
        # 1/sqrt(2 * n_layer) to keep the stream's variance from growing with depth
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_recipe(cls, options: TransformerOptions, data: DataSplits) -> Self:
        """Build the model of a recipe's ``[model]`` options for the vocabulary of ``data``."""
        if "vocab_size" not in data.info:
            raise ValueError(f"the transformer needs the data's vocab_size, but the dataset only "
                             f"provides {sorted(data.info) or 'no info'}; use a text dataset "
                             f"such as stagewise.text")
        if data.info.get("seq_len", 0) > options.max_seq_len:
            raise ValueError(f"data.seq_len = {data.info['seq_len']} exceeds model.max_seq_len = "
                             f"{options.max_seq_len}; raise model.max_seq_len or lower data.seq_len")
        return cls(TransformerConfig(vocab_size=data.info["vocab_size"], **asdict(options)))

    # --- the pieces forward is made of ----------------------------------------------------

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the residual stream before the first block, h0 (B, T, C)."""
        T = idx.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len "
                             f"{self.config.max_seq_len}; use shorter sequences or a larger max_seq_len")
        return self.embed_dropout(self.embedding(idx))  # (B, T, C)

    def run_layers(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run blocks ``start..end-1`` (0-based, like ``self.layers[start:end]``) on h (B, T, C)."""
        if not 0 <= start <= end <= self.config.n_layer:
            raise ValueError(f"run_layers(start={start}, end={end}) needs "
                             f"0 <= start <= end <= n_layer = {self.config.n_layer}")
        T = h.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd/2) each
        for block in self.layers[start:end]:
            h = block(h, cos, sin)
        return h  # (B, T, C)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The shared output head: final norm, then projection to the vocabulary."""
        return self.head(self.norm(h))  # (B, T, V)

    # --- forward ----------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, *, exit_layers: Iterable[int] = (),
                return_hidden: bool = False) -> dict[str, Any]:
        """idx (B, T) -> {"logits": (B, T, V)}, plus what was asked for.

        ``exit_layers``: layer counts l in 1..n_layer (l = 2: after the 2nd block); adds
        ``"exit_logits": {l: (B, T, V)}``, made by the shared output head.
        ``return_hidden``: adds ``"hidden": [h0, ..., h_n_layer]``, the residual stream after
        the embedding and after each block (before the final norm), each (B, T, C).
        """
        n_layer = self.config.n_layer
        exits = sorted(set(exit_layers))
        for layer in exits:
            if not 1 <= layer <= n_layer:
                raise ValueError(f"exit layer {layer} is out of range: valid exit layers are "
                                 f"1..{n_layer} (the number of blocks run before the exit)")
        h = self.embed(idx)
        hidden = [h]
        exit_logits = {}
        for layer in range(1, n_layer + 1):
            h = self.run_layers(h, layer - 1, layer)
            if return_hidden:
                hidden.append(h)
            if layer in exits:
                exit_logits[layer] = self.logits_from_hidden(h)
        logits = exit_logits[n_layer] if n_layer in exit_logits else self.logits_from_hidden(h)
        out: dict[str, Any] = {"logits": logits}
        if exits:
            out["exit_logits"] = exit_logits
        if return_hidden:
            out["hidden"] = hidden
        return out

    def forward_batch(self, batch: dict[str, torch.Tensor], needs: Any) -> dict[str, Any]:
        """The engine's entry point: run ``batch["input"]`` with what the losses ``needs``."""
        return self.forward(batch["input"], exit_layers=needs.exit_layers, return_hidden=needs.hidden)

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); call ``model.eval()`` first.

        Each step reruns the last ``max_seq_len`` tokens (no KV cache): simple, fine for samples.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.max_seq_len:]  # (B, <=max_seq_len)
            logits = self(context)["logits"][:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        return idx
