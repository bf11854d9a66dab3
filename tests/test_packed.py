"""Pre-packed oneDNN linear layers: same numbers as nn.Linear, the whole decoder packed, the same
greedy tokens from the engine, fingerprints refused after packing, and the server's setting."""

from __future__ import annotations

import pytest
import torch
from conftest import HOSTS, REAL_ONEDNN_BF16, make_model, make_vector
from torch import nn

from server.backends.transformers import TransformersBackend
from server.settings import Settings
from steer.engine import Engine, Sequence
from steer.hardware import HardwareError
from steer.models import ModelError, fingerprint
from steer.packed import HybridLinear, PackedLinear, bucket_rows, pack_linears, packing_unavailable
from steer.types import SamplingParams

pytestmark = pytest.mark.skipif(
    packing_unavailable(nn.Linear(2, 2)) is not None, reason="oneDNN packing unavailable on this machine"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias).to(dtype)
    if dtype == torch.bfloat16 and not REAL_ONEDNN_BF16:  # an AVX2 host: oneDNN refuses, loudly
        with pytest.raises(RuntimeError, match="bf16"):
            PackedLinear(lin)
        return
    packed = PackedLinear(lin)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    # decode rows, a batch, prefills (B, T, d) whose rows are padded up to a bucket (51 -> 64, 600 -> 608)
    for shape in [(1, 96), (8, 96), (3, 17, 96), (2, 300, 96)]:
        x = torch.randn(shape, dtype=dtype)
        y = packed(x)
        assert y.shape == (*shape[:-1], 160) and y.is_contiguous()
        torch.testing.assert_close(y.float(), lin(x).float(), **tol)
    assert packed(torch.randn(4, 96, dtype=dtype)).dtype == dtype


def test_bucket_rows_bounds_the_shapes_oneDNN_sees():
    """Exact up to 16 rows (decode batches), then few distinct sizes (oneDNN caches a kernel per
    shape: unbucketed, RSS grew for minutes under mixed traffic), with little padding."""
    sizes = [bucket_rows(m) for m in range(1, 4097)]
    assert sizes[:16] == list(range(1, 17))
    assert all(b >= m for m, b in enumerate(sizes, start=1))
    assert sizes == sorted(sizes) and all(bucket_rows(b) == b for b in sizes)
    assert len(set(sizes)) <= 100
    assert max((b - m) / m for m, b in enumerate(sizes, start=1) if m >= 256) <= 1 / 16


@pytest.mark.parametrize("bias", [True, False])
def test_hybrid_linear_one_row_in_bf16_more_rows_in_float32(bias):
    """One row: torch's bf16 linear on a bf16 copy (input rounded, output widened). More rows: oneDNN's
    float32 kernel on the packed float32 weight, i.e. the float32 linear."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias)
    hyb = HybridLinear(lin)
    x1 = torch.randn(1, 1, 96)
    b16 = None if lin.bias is None else lin.bias.to(torch.bfloat16)
    assert torch.equal(hyb(x1), nn.functional.linear(x1.to(torch.bfloat16), lin.weight.to(torch.bfloat16), b16).float())
    for shape in [(2, 96), (8, 96), (3, 17, 96), (2, 300, 96)]:
        x = torch.randn(shape)
        y = hyb(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)


def test_hybrid_model_is_the_float32_model_in_batches(tiny_tokenizer):
    plain = make_model("qwen2", len(tiny_tokenizer))
    hybrid = make_model("qwen2", len(tiny_tokenizer))
    assert pack_linears(hybrid, hybrid=True) == 4 * 7 + 1
    assert isinstance(hybrid.lm_head, HybridLinear)
    ids = torch.randint(5, len(tiny_tokenizer), (3, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hybrid(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    one = ids[:1, :1]  # a single row and position: the bf16 path, bf16-close to the float32 model
    torch.testing.assert_close(hybrid(input_ids=one).logits, plain(input_ids=one).logits, rtol=0.05, atol=0.05)
    with pytest.raises(RuntimeError, match="float32 models"):
        pack_linears(make_model("qwen2", len(tiny_tokenizer)).to(torch.bfloat16), hybrid=True)


def test_whole_model_packed_same_greedy_tokens(tiny_tokenizer):
    plain = make_model("qwen2", len(tiny_tokenizer))
    packed = make_model("qwen2", len(tiny_tokenizer))
    n_linear = sum(type(m) is nn.Linear for m in packed.modules())
    assert pack_linears(packed) == n_linear == 4 * 7 + 1  # q k v o gate up down per layer + the head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.get_output_embeddings() is packed.lm_head and isinstance(packed.lm_head, PackedLinear)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, len(tiny_tokenizer), (n,), generator=g).tolist() for n in (4, 11, 7)]
    outs = []
    for model in (plain, packed):
        engine = Engine(model, tiny_tokenizer, max_batch_size=4)
        seqs = [Sequence(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts]
        for s in seqs:
            engine.add(s)
        while engine.has_work():
            engine.step()
        outs.append([s.generated for s in seqs])
    assert outs[0] == outs[1]


def test_packed_model_cannot_be_fingerprinted(tiny_tokenizer):
    model = make_model("qwen2", len(tiny_tokenizer))
    fingerprint(model)
    pack_linears(model)
    with pytest.raises(ModelError, match="fingerprint it before packing"):
        fingerprint(model)


def _saved_tiny(tmp_path, tiny_tokenizer):
    model = make_model("qwen2", len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    make_vector(model).save(tmp_path / "v")
    return model, str(tmp_path / "m"), str(tmp_path / "v")


@pytest.mark.parametrize("host", ["avx2", "avx512"])
@pytest.mark.parametrize("setting", ["auto", "packed", "plain", "hybrid"])
def test_server_chooses_kernels_for_the_host(setting, host, tmp_path, tiny_tokenizer, force_host):
    """Both CPU kinds on every CI host: an AVX-512 bf16 host serves bfloat16, packed unless told otherwise;
    an AVX2 host serves what the probe measures fastest on this machine (bf16 is never packed there, only
    hybrid). Where the real CPU lacks oneDNN bf16, a forced AVX-512 host gets the same choice and oneDNN
    then refuses to pack bf16."""
    model, mdir, vdir = _saved_tiny(tmp_path, tiny_tokenizer)
    force_host(host)
    settings = Settings(model=mdir, vectors=vdir, linear_weights=setting)
    if host == "avx512" and setting in ("auto", "packed") and not REAL_ONEDNN_BF16:
        with pytest.raises(RuntimeError, match="bf16"):
            TransformersBackend(settings)
        return
    backend = TransformersBackend(settings)
    try:
        kernels = backend.runtime_info()["kernels"]
        dtype = str(next(backend.model.parameters()).dtype).removeprefix("torch.")
        head = backend.model.lm_head
        layout = "packed" if isinstance(head, PackedLinear) else "hybrid" if isinstance(head, HybridLinear) else "plain"
        assert (kernels["dtype"], kernels["linear_weights"]) == (dtype, layout)
        if setting != "auto":
            assert layout == setting
        if host == "avx512" and setting != "hybrid":  # capability decides: bf16, packed unless told otherwise
            assert dtype == "bfloat16" and kernels["how"] in ("capability", "setting")
        elif setting == "packed":  # bf16 cannot be packed on an AVX2 host: float32, by capability
            assert dtype == "float32" and kernels["how"] == "capability"
        elif setting == "hybrid":  # a float32 model by definition
            assert dtype == "float32" and kernels["how"] == "setting"
        else:  # measured on this machine's real CPU: the fastest candidate wins, bf16 is never packed here
            scores = {k: v["score"] for k, v in kernels["probe"].items()}
            assert kernels["how"] == "probe" and f"{dtype}+{kernels['linear_weights']}" == min(scores, key=scores.get)
            assert "bfloat16+packed" not in scores
        assert backend.fingerprint == fingerprint(model)  # taken before packing: vectors still match
        assert backend.runtime_info()["host"]["cpu_model"] == HOSTS[host].cpu_model
    finally:
        backend.start()
        backend.shutdown()


def test_explicit_packed_bf16_on_an_avx2_host_is_a_one_line_error(tmp_path, tiny_tokenizer, force_host):
    _, mdir, vdir = _saved_tiny(tmp_path, tiny_tokenizer)
    force_host("avx2")
    with pytest.raises(HardwareError) as err:
        TransformersBackend(Settings(model=mdir, vectors=vdir, dtype="bfloat16", linear_weights="packed"))
    assert "\n" not in str(err.value) and "linear_weights=plain" in str(err.value)
