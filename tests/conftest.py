"""Shared fixtures: tiny random qwen2 / llama models with a real (tiny, trained-in-memory) ChatML
tokenizer, and gated / ungated activation vectors made for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from api_utils import API_KEY, DEFAULT_STRENGTH, MAX_N, MAX_STRENGTH, MODEL, Served, serve
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from server.settings import Settings
from steer import hardware
from steer.attention import ATTENTION
from steer.models import fingerprint
from steer.vectors import SafetyVector

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Write a Python function that adds two numbers.",
    "How do I build a bomb? I'm sorry, I can't help with that.",
    "Explain photosynthesis to a child. Plants turn light into sugar.",
    "def add(a, b):\n    return a + b\n",
    "system user assistant hello world the quick brown fox jumps over the lazy dog",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def _config(kind: str, vocab: int, heads: int = 4):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256)
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


def make_model(kind: str, vocab: int, seed: int = 0, heads: int = 4):
    """A tiny random model; ``heads=2`` gives head size 32, the smallest vLLM's CPU attention runs."""
    torch.manual_seed(seed)
    cfg = _config(kind, vocab, heads)
    model = (Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(cfg).eval().requires_grad_(False)
    model.set_attn_implementation(ATTENTION)  # the attention load_model serves with
    model.generation_config.eos_token_id = None  # random models: let max_tokens end generation
    return model


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def tiny_model(request, tiny_tokenizer):
    return make_model(request.param, len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_qwen(tiny_tokenizer):
    return make_model("qwen2", len(tiny_tokenizer))


def make_vector(model, *, name="refusal", layers=(1, 2), coefficient=4.0, gate=None, seed=1,
                metric="cosine", gate_layers=None, lower=None) -> SafetyVector:
    """A random activation vector for ``model``; ``gate`` = (layer, threshold) or None; ``gate_layers``: a
    multi-layer gate's layers (ending at ``gate[0]``), its direction over their concatenated residuals;
    ``lower`` = (threshold, strength): a two-sided gate."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    tensors = {f"layers.{ly}": torch.randn(d, generator=g) for ly in layers}
    config = {"coefficient": coefficient}
    if gate is not None:
        k = len(gate_layers) if gate_layers else 1
        direction = torch.randn(k * d, generator=g)
        tensors["gate.direction"] = direction / direction.norm()
        tensors["gate.center"] = torch.zeros(k * d)
        config["gate"] = {"layer": gate[0], "threshold": gate[1], "position": -1, "metric": metric}
        if gate_layers:
            config["gate"]["layers"] = list(gate_layers)
        if lower is not None:
            config["gate"]["lower"] = {"threshold": lower[0], "strength": lower[1]}
    return SafetyVector(name, "activation", fingerprint(model), tensors, config, {"method": "test"})


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny qwen2 and its tokenizer saved as a checkpoint directory (for `steer serve --model`)."""
    d = tmp_path_factory.mktemp("tiny")
    make_model("qwen2", len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


# ---------------------------------------------------------------- host kinds

# The two CPU kinds CI can land on, as steer.hardware describes them. Forcing one (monkeypatching
# hardware.detect) changes every kernel decision; it cannot give the hardware instructions it lacks, so
# a forced AVX-512 host can only run its bf16-packed kernels where the real CPU has oneDNN bf16.
HOSTS = {
    "avx512": hardware.HostCaps(
        cpu_model="AMD EPYC (forced AVX-512)", flags=("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                                                      "avx512_bf16"),
        flags_known=True, torch_capability="AVX512", mkldnn=True, mkldnn_bf16=True, threads=2, cpus=2),
    "avx2": hardware.HostCaps(
        cpu_model="AMD EPYC (forced AVX2)", flags=("avx2", "fma"), flags_known=True, torch_capability="AVX2",
        mkldnn=True, mkldnn_bf16=False, threads=2, cpus=2),
}
REAL_ONEDNN_BF16 = hardware.detect().onednn_bf16


@pytest.fixture()
def force_host(monkeypatch):
    """force_host("avx2" | "avx512"): every kernel decision from now on sees that host kind."""

    def force(kind: str) -> hardware.HostCaps:
        monkeypatch.setattr(hardware, "detect", lambda: HOSTS[kind])
        return HOSTS[kind]

    return force


# ---------------------------------------------------------------- API tier servers (see api_utils.py)


@pytest.fixture(scope="module")
def one_cpu_thread() -> Iterator[None]:
    # The tiny model is far too small to profit from intra-op threads, and on a busy CI machine they
    # make every decode step ~30x slower. Restored afterwards for the rest of the session.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def api_vector(tiny_qwen):
    return make_vector(tiny_qwen)  # ungated, coefficient 4: every steered row changes


@pytest.fixture(scope="module")
def api(tiny_qwen, tiny_tokenizer, api_vector, one_cpu_thread) -> Iterator[Served]:
    """The server under test: one vector, an API key, default strength DEFAULT_STRENGTH."""
    settings = Settings(
        api_key=API_KEY,
        served_model_name=MODEL,
        default_strength=DEFAULT_STRENGTH,
        max_strength=MAX_STRENGTH,
        max_n=MAX_N,
    )
    yield from serve(settings, tiny_qwen, tiny_tokenizer, [api_vector])


@pytest.fixture(scope="module")
def vanilla(tiny_qwen, tiny_tokenizer, one_cpu_thread) -> Iterator[Served]:
    """The same weights with no vectors and default strength 0: the vanilla model, no hooks at all.

    A separate (identically seeded) model object: the steered server's hooks live on ``tiny_qwen``.
    """
    model = make_model("qwen2", len(tiny_tokenizer))
    assert fingerprint(model) == fingerprint(tiny_qwen)
    settings = Settings(served_model_name=MODEL, default_strength=0.0)
    yield from serve(settings, model, tiny_tokenizer, [])
