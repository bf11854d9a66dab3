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


class PackedLinear(nn.Module):
    """y = x W^T + b with W held only in oneDNN's packed layout (x: (..., in) -> (..., out))."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # opaque tensor
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

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
    """A bf16 linear for CPUs without oneDNN bf16 kernels (AVX2): single-row inputs (one stream's
    decode step) use the bf16 weight through torch's gemv, which is memory-bound and reads half the
    bytes of float32; larger inputs (batched decode, prefill), where torch's bf16 GEMM has no fast kernel
    there, run oneDNN's float32 kernel on a packed float32 copy of the weight, on the exactly widened
    input, and round the result to bf16. Both paths accumulate in float32, so they differ only in
    summation order. The bf16 weight stays (and stays tied to the embedding, for an LM head)."""

    def __init__(self, linear: nn.Linear, *, max_gemv_rows: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float())
        self.bias32 = None if linear.bias is None else linear.bias.detach().float()
        self.max_gemv_rows = max_gemv_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.max_gemv_rows * self.in_features:
            return nn.functional.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, self.bias32, "none", [], "")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"max_gemv_rows={self.max_gemv_rows}")


@torch.no_grad()
def pack_linears(model: nn.Module, *, hybrid: bool = False) -> int:
    """Replace every nn.Linear of ``model`` by a PackedLinear (``hybrid``: a HybridLinear, for a bf16
    model on a CPU without oneDNN bf16), one at a time (peak memory: one extra layer). Returns how many
    were replaced; raises RuntimeError if packing is unavailable."""
    p = next(model.parameters())
    if hybrid and p.dtype != torch.bfloat16:
        raise RuntimeError(f"hybrid linear weights are for bfloat16 models, this one is {p.dtype}")
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
