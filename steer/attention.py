"""A CPU attention for serving: PyTorch SDPA for prefill, a grouped matmul-softmax for decode.

Measured on the demo model (2 cores, bf16, 8 rows): SDPA's CPU flash kernel makes a decode step
12-16 ms slower at 40 tokens of context and ~40 ms slower at 400: one query row per head is the case
it is slowest at. For a single query token the math is two small batched matmuls; doing them per
key/value head with the query heads of its group stacked (no ``repeat_kv`` copy of the cache) gives
SDPA's logits (``tests/test_engine.py``) and a 1.13x faster step at ~40 tokens of context
(``bench/engine_speed.py``), more at longer contexts.

Registered with transformers' attention and mask interfaces under ``ATTENTION`` so that any model
loaded with ``attn_implementation=ATTENTION`` (``steer.models.load_model`` does) uses it; masks are
built the SDPA way (boolean, ``True`` = attend, or ``None`` when nothing is masked).
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "steer_cpu"


def steer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, q, D), key/value (B, KVH, T, D) -> ((B, q, H, D), None)."""
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, h, _, d = query.shape
    kvh = key.shape[1]
    out_dtype = query.dtype
    if out_dtype == torch.bfloat16 and not _fast_bf16_matmul():
        # Without oneDNN bf16 (AVX2 CPUs) a bf16 bmm falls to a slow generic kernel: widening the query
        # and this layer's cache to float32 costs far less (measured: 238 -> ~45 us a call at 8 rows).
        query, key, value = query.float(), key.float(), value.float()
    q = query.view(b, kvh, h // kvh, d)  # (B, KVH, G, D): the G query heads sharing each kv head
    scores = torch.matmul(q, key.transpose(2, 3)) * (d**-0.5 if scaling is None else scaling)  # (B, KVH, G, T)
    if attention_mask is not None:  # (B, 1, 1, T)
        if attention_mask.dtype == torch.bool:
            # the dtype's lowest finite value, not -inf: a query row that sees no key at all (left padding
            # in a one-column prefill chunk) then averages the values instead of turning NaN, which would
            # poison the KV cache for every later query (SDPA returns zeros for such rows)
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, KVH, G, D)
    return out.reshape(b, h, 1, d).transpose(1, 2).to(out_dtype).contiguous(), None


@cache
def _fast_bf16_matmul() -> bool:
    from steer import hardware

    return hardware.detect().onednn_bf16


AttentionInterface.register(ATTENTION, steer_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
