"""Routed early exit that really skips work: every token runs to the exit layer; easy tokens
stop there, hard tokens continue through the upper layers.

In each upper block, keys and values are computed for every position (a hard token attends
to its whole causal context), but queries, the attention output, the projection and the
feed-forward only for the hard rows: gather -> run -> scatter. An easy token's residual stream
stays at its exit state, so its upper-layer keys/values are computed from that state — the
same rule as routed generation with a KV cache (:func:`generate_routed`), and as phase-2
training in ``context = "full"``, so training and inference see the same context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from stagewise.nn.transformer import Block, CausalSelfAttention, apply_rope

if TYPE_CHECKING:
    from stagewise_lego_ashem.model import DeepSupervisionTransformer
    from stagewise_lego_ashem.router import Confidence


def routed_layers(model: DeepSupervisionTransformer, h: torch.Tensor, hard: torch.Tensor,
                  start: int, end: int) -> torch.Tensor:
    """Blocks ``start..end-1`` on h (B, T, C) for the ``hard`` (B, T) rows only; others unchanged."""
    if bool(hard.all()):
        return model.run_layers(h, start, end)  # nothing to skip: core's path, bit for bit
    if not bool(hard.any()):
        return h
    T = h.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, hd/2)
    rows = _HardRows(hard, cos, sin)
    for block in model.layers[start:end]:
        h = _routed_block(cast(Block, block), h, rows, cos, sin)  # core's ModuleList holds Blocks only
    return h


class _HardRows:
    """Where the hard rows are, as flat indices into the (B*T, C) rows, and a per-sequence
    padded layout (B, M) for their queries; with what every upper block shares: the queries'
    RoPE angles and the causal mask. Flat ``index_select``/``index_copy`` is the cheap gather."""

    def __init__(self, hard: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T = hard.shape
        self.flat = hard.reshape(-1).nonzero().squeeze(1)  # (n,) into B*T, row-major
        seq = self.flat // T
        slot = (hard.long().cumsum(1) - 1).reshape(-1)[self.flat]  # (n,): rank within its sequence
        M = int(hard.sum(1).max())
        # padded slots sit at position 0 and attend to it only (their result is dropped): no empty softmax row
        pos = torch.zeros(B, M, dtype=torch.long, device=hard.device)
        pos[seq, slot] = self.flat % T  # (B, M): the position each slot's query sits at
        self.padded = (pos + T * torch.arange(B, device=hard.device).unsqueeze(1)).reshape(-1)  # (B*M,) into B*T
        self.unpad = seq * M + slot  # (n,) into B*M
        self.shape = (B, M)
        self.cos, self.sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # (B, 1, M, hd/2)
        self.causal = (torch.arange(T, device=hard.device) <= pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, M, T)


def _routed_block(block: Block, h: torch.Tensor, rows: _HardRows, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """One pre-norm block with keys/values for every position, everything else for hard rows."""
    B, T, C = h.shape
    attn = block.attn
    nh, hd = attn.n_head, C // attn.n_head
    M = rows.shape[1]
    flat = h.reshape(B * T, C)
    x = block.attn_norm(flat)  # (B*T, C)
    k, v = _keys_values(attn, x, B, T, cos, sin)  # (B, nh, T, hd) each
    q = F.linear(x.index_select(0, rows.padded), attn.qkv.weight[:C])  # queries of the (B, M) slots only
    q = apply_rope(q.view(B, M, nh, hd).transpose(1, 2), rows.cos, rows.sin)  # (B, nh, M, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=rows.causal,  # (B, nh, M, hd)
                                       dropout_p=attn.dropout if attn.training else 0.0)
    y = y.transpose(1, 2).reshape(B * M, C).index_select(0, rows.unpad)  # (n, C)
    hr = flat.index_select(0, rows.flat) + attn.resid_dropout(attn.proj(y))  # core's Block, on hard rows
    hr = hr + block.ffn(block.ffn_norm(hr))
    return flat.index_copy(0, rows.flat, hr).view(B, T, C)  # out of place: autograd-safe


def _keys_values(attn: CausalSelfAttention, x: torch.Tensor, B: int, T: int, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (with RoPE) and values (B, nh, T, hd) of the normed rows x, (B*T, C) or (B, T, C): the part
    of core's attention every position gets, routed or not (queries use the first C rows of ``qkv``)."""
    C = x.size(-1)
    nh, hd = attn.n_head, C // attn.n_head
    k, v = F.linear(x, attn.qkv.weight[C:]).view(B, T, 2, nh, hd).permute(2, 0, 3, 1, 4)
    return apply_rope(k, cos, sin), v


@torch.no_grad()
def routed_forward(model: DeepSupervisionTransformer, idx: torch.Tensor, router: Confidence,
                   threshold: float | None, keep_exit_logits: bool = False) -> dict[str, Any]:
    """Routed logits of idx (B, T): {"logits": (B, T, V), "easy": (B, T) bool, "exit_logits"}.

    Easy tokens take the exit layer's logits, hard tokens the last layer's. With a softmax
    measure the exit logits of every token are computed anyway (they give the confidence) and
    the hard rows are written over them in place; ``keep_exit_logits`` keeps a copy (else
    ``"exit_logits"`` is None). With the probe no token pays for an exit softmax, and the head runs
    once per token: on the residual stream ``routed_layers`` returns, whose easy rows are still
    their exit states.
    """
    h = model.exit_hidden(idx)  # (B, T, C)
    scores, exit_logits = router.score(model, h)  # float32 confidences, as mining calibrated them
    easy = router.route(scores, threshold).masks["easy"]  # (B, T)
    hard = ~easy
    deep = routed_layers(model, h, hard, model.exit_layer, model.config.n_layer)  # easy rows: still h
    if exit_logits is None:  # the probe: one head over every row, each at its own exit
        return {"logits": model.logits_from_hidden(deep), "easy": easy, "exit_logits": None}
    logits = exit_logits.clone() if keep_exit_logits else exit_logits
    rows = hard.flatten().nonzero().squeeze(1)  # (n_hard,)
    flat = logits.view(-1, logits.size(-1))  # (B*T, V)
    hard_logits = model.logits_from_hidden(deep.reshape(-1, deep.size(-1)).index_select(0, rows))
    flat.index_copy_(0, rows, hard_logits.to(flat.dtype))  # bfloat16 under a bf16 run's autocast
    return {"logits": logits, "easy": easy, "exit_logits": exit_logits if keep_exit_logits else None}


def upper_forward(model: DeepSupervisionTransformer, context: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Cached exit states -> logits of the tokens that carry a loss: (n_hard, V) or (B, V)."""
    start, end = model.exit_layer, model.config.n_layer

    def forward(batch: dict[str, Any]) -> dict[str, Any]:
        if context == "full":
            h = routed_layers(model, batch["hidden"], batch["hard"], start, end)  # (B, T, C)
            return {"logits": model.logits_from_hidden(h[batch["hard"]])}
        h = model.run_layers(batch["hidden"], start, end)  # (B, 1, C): no context, RoPE position 0
        return {"logits": model.logits_from_hidden(h[:, 0])}

    return forward


@torch.no_grad()
def generate_routed(model: DeepSupervisionTransformer, idx: torch.Tensor, max_new_tokens: int,
                    router: Confidence, threshold: float) -> dict[str, torch.Tensor]:
    """Greedy routed generation with a KV cache: each token runs to the exit layer and exits
    there or continues, per sequence; an exited token's upper-layer keys/values are filled from
    its exit state, so later hard tokens attend over a complete context (the seed's "true early
    exit" left them out). Prompt tokens go through the same rule, one position at a time.

    Returns ``{"tokens": (B, T + n), "logits": (B, T + n - 1, V), "easy": (B, T + n - 1)}``:
    the logits and exit decision at every position fed in, equal to :func:`routed_forward` on
    ``tokens[:, :-1]``.
    """
    T, limit = idx.size(1), model.config.max_seq_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if T + max_new_tokens - 1 > limit:
        raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceeds max_seq_len {limit}")
    cache: list[list[torch.Tensor]] = [[] for _ in model.layers]  # per block: [keys, values], (B, nh, t, hd)
    tokens, logits, easy = idx, [], []
    for pos in range(T + max_new_tokens - 1):
        step_logits, step_easy = _routed_step(model, tokens[:, pos:pos + 1], pos, cache, router, threshold)
        logits.append(step_logits)
        easy.append(step_easy)
        if pos >= T - 1:  # past the prompt: append the greedy choice
            tokens = torch.cat([tokens, step_logits.argmax(-1, keepdim=True)], dim=1)
    return {"tokens": tokens, "logits": torch.stack(logits, 1), "easy": torch.stack(easy, 1)}


def _routed_step(model: DeepSupervisionTransformer, token: torch.Tensor, pos: int, cache: list,
                 router: Confidence, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One position (B, 1) through the cached blocks: (logits (B, V), easy (B,))."""
    h = model.embed(token)  # (B, 1, C); embed checks nothing about pos: the caller bounds it
    every = torch.ones(h.size(0), dtype=torch.bool, device=h.device)
    for layer in range(model.exit_layer):
        h = _cached_block(model, layer, h, every, pos, cache)
    scores, exit_logits = router.score(model, h)  # (B, 1)
    easy = router.route(scores, threshold).masks["easy"][:, 0]  # (B,)
    for layer in range(model.exit_layer, model.config.n_layer):
        h = _cached_block(model, layer, h, ~easy, pos, cache)
    if exit_logits is None:  # the probe: one head over every row, each at its own exit (as in routed_forward)
        return model.logits_from_hidden(h[:, 0]), easy
    logits = exit_logits[:, 0].clone()  # (B, V)
    logits[~easy] = model.logits_from_hidden(h[~easy, 0])
    return logits, easy


def _cached_block(model: DeepSupervisionTransformer, layer: int, h: torch.Tensor, rows: torch.Tensor,
                  pos: int, cache: list) -> torch.Tensor:
    """Block ``layer`` at position ``pos`` for h (B, 1, C): keys/values of every row join the
    cache; the ``rows`` (B,) get the rest of the block, the others keep h."""
    block = cast(Block, model.layers[layer])  # core's ModuleList holds Blocks only
    B, _, C = h.shape
    nh, hd = block.attn.n_head, C // block.attn.n_head
    cos, sin = model.rope_cos[pos:pos + 1], model.rope_sin[pos:pos + 1]  # (1, hd/2)
    x = block.attn_norm(h)
    k, v = _keys_values(block.attn, x, B, 1, cos, sin)  # (B, nh, 1, hd) each
    if cache[layer]:
        k, v = torch.cat([cache[layer][0], k], 2), torch.cat([cache[layer][1], v], 2)
    cache[layer] = [k, v]  # (B, nh, pos + 1, hd)
    sel = rows.nonzero().squeeze(1)
    if sel.numel() == 0:
        return h
    q = F.linear(x[sel], block.attn.qkv.weight[:C]).view(-1, 1, nh, hd).transpose(1, 2)  # (n, nh, 1, hd)
    y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k[sel], v[sel])  # the past only: no mask
    hr = h[sel] + block.attn.proj(y.transpose(1, 2).reshape(-1, 1, C))
    hr = hr + block.ffn(block.ffn_norm(hr))
    return h.index_copy(0, sel, hr)
