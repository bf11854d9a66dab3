"""Pre-packed oneDNN linear layers: same numbers as nn.Linear, the whole decoder packed, the same
greedy tokens from the engine, fingerprints refused after packing, and the server's setting."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_vector
from torch import nn

from server.backends.transformers import TransformersBackend
from server.settings import Settings
from steer.engine import Engine, Sequence
from steer.models import ModelError, fingerprint
from steer.packed import PackedLinear, pack_linears, packing_unavailable
from steer.types import SamplingParams

pytestmark = pytest.mark.skipif(
    packing_unavailable(nn.Linear(2, 2)) is not None, reason="oneDNN packing unavailable on this machine"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(dtype, bias):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 on this CPU")
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=bias).to(dtype)
    packed = PackedLinear(lin)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for shape in [(1, 96), (8, 96), (3, 17, 96)]:  # decode rows, a batch, a prefill (B, T, d)
        x = torch.randn(shape, dtype=dtype)
        torch.testing.assert_close(packed(x).float(), lin(x).float(), **tol)
    assert packed(torch.randn(4, 96, dtype=dtype)).dtype == dtype


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


@pytest.mark.parametrize("setting", ["packed", "plain"])
def test_server_packs_the_model_it_loads(setting, tmp_path, tiny_tokenizer):
    model = make_model("qwen2", len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    vec = make_vector(model)
    vec.save(tmp_path / "v")
    backend = TransformersBackend(Settings(model=str(tmp_path / "m"), vectors=str(tmp_path / "v"),
                                           linear_weights=setting))
    packed = isinstance(backend.model.lm_head, PackedLinear)
    assert packed == (setting == "packed")
    assert backend.fingerprint == fingerprint(model)  # taken before packing: vectors still match
