"""A llama-family decoder run layer range by layer range, for the serving engine.

transformers' ``Model.forward`` runs every layer in one call and builds its attention mask from the
KV cache's length. The engine needs more: chunked prefill whose chunks stop at a gate layer (a gated
vector's decision must be known before any position is steered, see ``steer.engine``), so a chunk may
run layers ``[0, g)`` now and ``[g, L)`` later, when the caches of those layer ranges hold different
lengths. This module runs the model's own modules (embedding, rotary embedding, decoder layers, final
norm), so steering pre-hooks on decoder layers fire as usual, and takes the attention mask from the
caller, built from each row's padding mask: boolean ``(B, 1, q, kv)``, ``True`` = attend (the SDPA
convention the served attention uses). Query positions that are left padding attend to nothing; SDPA
returns zeros for such rows, never NaN, and no real token ever attends to them.

Supported: decoders whose every layer is full attention (qwen2 without sliding window, llama).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from steer.models import ModelError


class LayerRunner:
    """Embedding, decoder layers ``[start, stop)`` and the final norm of a llama-family model."""

    def __init__(self, model: nn.Module):
        self.decoder = model.get_decoder()
        cfg = model.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ModelError(f"layer types {sorted(kinds)} are not supported by the serving engine (full attention only)")
        self.layers = self.decoder.layers[: cfg.num_hidden_layers]
        self.num_layers = len(self.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, t) token ids -> (B, t, d)."""
        return self.decoder.embed_tokens(ids)

    def run(self, h: torch.Tensor, start: int, stop: int, *, positions: torch.Tensor, mask: torch.Tensor,
            cache, taps: dict[int, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
        """h (B, t, d) through layers [start, stop); positions (B, t); mask (B, 1, t, kv) bool, or None for
        plain causal attention with no padding (then t is 1, or the keys are exactly these t tokens).
        ``taps``: {layer: f} calls f with that layer's input (after the pre-hooks of earlier layers,
        before its own) for the layers in [start, stop) it names."""
        rope = self.decoder.rotary_emb(h, positions)
        for i, layer in enumerate(self.layers[start:stop], start):
            if taps and i in taps:
                taps[i](h)
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions,
                      past_key_values=cache, use_cache=True)
        return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(h)


def attention_mask(pad: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """Boolean (B, 1, q_len, kv) mask for queries at columns [q_start, q_start + q_len) of a left-padded
    batch whose padding mask ``pad`` (B, kv) covers every key column so far (kv = q_start + q_len):
    key column j is visible to query column i when j <= i and j is a real token."""
    kv = pad.shape[1]
    if kv != q_start + q_len:
        raise ValueError(f"padding mask has {kv} columns, queries end at {q_start + q_len}")
    cols = torch.arange(kv)
    causal = cols[None, :] <= (q_start + torch.arange(q_len))[:, None]  # (q, kv)
    return causal[None, None] & pad.bool()[:, None, None, :]


def positions(pad: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> (B, T) rotary positions: the count of real tokens before each column."""
    return (pad.long().cumsum(dim=1) - 1).clamp_min(0)
