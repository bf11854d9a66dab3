"""Linear layers with their weights pre-packed in oneDNN's blocked layout, for CPU serving.

``torch.nn.functional.linear`` on a plain (out, in) bf16 weight re-lays the weight out on every call;
oneDNN can do that once at load (``torch.ops.mkldnn._reorder_linear_weight``) and then run
``_linear_pointwise`` on the packed copy. This is what inductor's CPU freezing pass and vLLM's CPU
backend do. Measured on the demo model (2 cores, bf16): the linear layers of one decode step take
42 ms plain and 21 ms packed at 8 rows when timed alone, and the whole 8-row decode step goes from
70 to 48 ms (``bench/engine_speed.py``); prefill-sized inputs are no slower.

Packing replaces each ``nn.Linear`` in the decoder (and the LM head) with a :class:`PackedLinear`.
The plain weight of an untied linear is dropped, so steady-state memory stays the same; a weight tied
to another module (the LM head tied to the token embedding) is kept for that module and the packed
copy is the only extra memory. While packing, the memory-mapped checkpoint pages it reads stay mapped
until the last view of the file is gone, so the process's peak RSS (VmHWM) includes a transient of
about the checkpoint's size. Anything that reads weights must run before packing: :func:`steer.models.fingerprint`
refuses a packed model rather than hash a model with missing weights.
"""

from __future__ import annotations

import gc
import itertools
import logging

import torch
from torch import nn

log = logging.getLogger("steer.packed")


def bucket_rows(m: int) -> int:
    """The row count a packed matmul of ``m`` input rows runs at: ``m`` itself up to 16 (the default decode batch),
    above that rounded up to a multiple of 16, and from 256 on to 16 steps per power of two
    (..., 240, 256, 272, ..., 496, 512, 544, ...).

    oneDNN builds and caches a kernel per distinct input shape (about 0.6 MB for a 896x4864 bf16
    weight), and a serving engine sees a new row count at nearly every prefill chunk: unbucketed, a
    server's RSS climbed by ~300 MB over ten minutes of mixed traffic before the caches filled
    (bench/soak.py). Bucketed, the shapes are a small fixed set met in the first minutes, at a cost of
    at most 1/16 extra rows (zero rows, sliced off) from 256 rows on, 15 rows below."""
    if m <= 16:
        return m
    step = max(16, 1 << (m.bit_length() - 5))  # 16 steps per power of two, never finer than 16
    return -(-m // step) * step


def _linear_bucketed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """oneDNN's linear on a packed weight, its input padded to :func:`bucket_rows` rows."""
    k = x.shape[-1]
    m = x.numel() // k
    mb = bucket_rows(m)
    if mb == m:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    xp = nn.functional.pad(x.reshape(m, k), (0, 0, 0, mb - m))
    y = torch.ops.mkldnn._linear_pointwise(xp, packed, bias, "none", [], "")
    return y[:m].view(*x.shape[:-1], out_features)  # the first m rows of a contiguous (mb, out): contiguous


class PackedLinear(nn.Module):
    """y = x W^T + b with W held only in oneDNN's packed layout (x: (..., in) -> (..., out)); inputs are
    padded to :func:`bucket_rows` rows, so the process meets few distinct shapes."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # opaque tensor
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_bucketed(x, self.packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_unavailable(model: nn.Module) -> str | None:
    """Why this model cannot be packed here, or None if it can (the host check is steer.hardware's)."""
    from steer import hardware  # looked up per call: tests monkeypatch hardware.detect

    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"the model is on {p.device.type}, packing is for CPU"
    return hardware.packing_supported(p.dtype)


def _float32_packing_unavailable() -> str | None:
    from steer import hardware

    return hardware.packing_supported(torch.float32)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear | HybridLinear) for m in model.modules())


class HybridLinear(nn.Module):
    """A float32 linear for CPUs without oneDNN bf16 kernels (AVX2), fastest at every batch size.

    One row (a request decoding alone) is memory-bound: it goes through torch's bf16 gemv on a bf16 copy
    of the weight, which reads half the bytes (the input is rounded to bf16, the output widened back).
    More rows (batched decode, prefill) are compute-bound, where torch's bf16 GEMM has no fast kernel on
    such CPUs: they run oneDNN's float32 kernel on a packed float32 copy. So a row decoded alone is
    rounded like a bf16 model's, and the same row in a batch is computed in float32 (for a checkpoint
    stored in bf16, as the demo model is, the weights are the same in both)."""

    def __init__(self, linear: nn.Linear, *, max_gemv_rows: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.float())  # opaque tensor
        self.weight16 = w.to(torch.bfloat16)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.bias16 = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.max_gemv_rows = max_gemv_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.max_gemv_rows * self.in_features:
            return nn.functional.linear(x.to(torch.bfloat16), self.weight16, self.bias16).to(x.dtype)
        return _linear_bucketed(x, self.packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"max_gemv_rows={self.max_gemv_rows}")


@torch.no_grad()
def pack_linears(model: nn.Module, *, hybrid: bool = False) -> int:
    """Replace every nn.Linear of ``model`` by a PackedLinear (``hybrid``: a HybridLinear, for a float32
    model on a CPU without oneDNN bf16), one at a time (peak memory: one extra layer). Returns how many
    were replaced; raises RuntimeError if packing is unavailable."""
    p = next(model.parameters())
    if hybrid and p.dtype != torch.float32:
        raise RuntimeError(f"hybrid linear weights are for float32 models, this one is {p.dtype}")
    why = packing_unavailable(model) if not hybrid else _float32_packing_unavailable()
    if why is not None:
        raise RuntimeError(f"cannot pack linear weights: {why}")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, HybridLinear(linear) if hybrid else PackedLinear(linear))
    # The loaded weights are views of the memory-mapped checkpoint; while any of them (the embedding,
    # the norms, the biases) still points into it, the whole mapping stays, and with it every page the
    # packing read. Own copies of the few unpacked tensors release it (measured: ~1 GB less RSS).
    for t in itertools.chain(model.parameters(), model.buffers()):
        t.data = t.data.clone()
    gc.collect()
    log.info("packed %d linear layers for oneDNN%s", len(targets), " (hybrid)" if hybrid else "")
    return len(targets)
