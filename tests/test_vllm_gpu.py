"""``steer serve --backend vllm`` on a CUDA GPU, on the demo model with the shipped vectors (``refusal``, a
gated activation vector; ``enchtable``, a low-rank weight vector), bfloat16, against vanilla vLLM on
the same GPU. ``make test-gpu`` runs these with tests/test_vllm.py (whose vLLM processes get their GPU
args from :func:`test_vllm.vllm_args`) and the vLLM half of tests/test_demo.py; skipped without CUDA."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from server_utils import free_port, server_process
from test_demo import BENIGN_CODE, HARMFUL
from test_vllm import _assert_same, _complete, vllm_args

from steer.demo import DEMO, ensure_demo_model
from steer.judge import is_refusal

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROMPTS = [HARMFUL, BENIGN_CODE, "Explain photosynthesis to a child.", "What is the capital of France?"]
SHARE = 0.2  # of GPU memory per vLLM process: three run at once here
MERGED = 1.0  # enchtable's strength merged at load, and asked per request (a multiple of the 0.05 step)


def _serve(cmd: list[str]) -> Iterator[str]:
    port = free_port()
    with server_process([*cmd, "--port", str(port)], port, timeout=600) as url:
        yield url


@pytest.fixture(scope="module")
def steered() -> Iterator[str]:
    """No --model: the demo model with the shipped vectors (default ``refusal`` at strength 1)."""
    yield from _serve([sys.executable, "-m", "server.cli", "serve", "--backend", "vllm", *vllm_args(SHARE)])


@pytest.fixture(scope="module")
def merged() -> Iterator[str]:
    yield from _serve([sys.executable, "-m", "server.cli", "serve", "--backend", "vllm", "--merge-vector",
                       f"enchtable={MERGED}", *vllm_args(SHARE)])


@pytest.fixture(scope="module")
def vanilla() -> Iterator[str]:
    yield from _serve([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ensure_demo_model()),
                       "--served-model-name", DEMO.name, "--max-model-len", "2048", "--enforce-eager",
                       *vllm_args(SHARE)])


def _answer(url: str, prompt: str, strength: float | None = None, vector: str | None = None,
            tokens: int = 40) -> dict:
    """Greedy, up to ``tokens``, ending at EOS as a client's request would."""
    return _complete(url, prompt, strength, vector, max_tokens=tokens, ignore_eos=False)


def _text(url: str, *args, **kw) -> str:
    return _answer(url, *args, **kw)["choices"][0]["message"]["content"]


def test_the_server_runs_on_cuda_in_bfloat16(steered):
    info = httpx.get(f"{steered}/v1/models", timeout=30).json()["data"][0]["steer"]
    assert info["backend"] == "vllm" and "(cuda" in info["kernels"]["reason"], info["kernels"]
    assert httpx.get(f"{steered}/health", timeout=30).json()["kernels"]["dtype"] == "bfloat16"


def test_strength_zero_is_vanilla_vllm(steered, vanilla):
    for p in PROMPTS:
        assert _text(steered, p, 0.0) == _text(vanilla, p)
        assert _text(steered, p, 0.0, "enchtable") == _text(vanilla, p)  # no adapter at strength 0


def test_harmful_prompt_is_refused_and_benign_code_answered_at_the_default_strength(steered, vanilla):
    assert not is_refusal(_text(vanilla, HARMFUL))
    steered_answer = _answer(steered, HARMFUL)
    assert steered_answer["safety"]["strength"] == 1.0 and steered_answer["safety"]["vector"] == "refusal"
    assert is_refusal(steered_answer["choices"][0]["message"]["content"])
    code = _text(steered, BENIGN_CODE)
    assert not is_refusal(code) and "def " in code
    assert code == _text(vanilla, BENIGN_CODE)  # the gate stayed closed: vanilla


def test_mixed_strengths_in_one_batch_match_their_single_request_answers(steered):
    """Activation strengths (hooks) and weight-vector strengths (LoRA adapters) in one batch."""
    cases = [(p, s, v) for p in (HARMFUL, BENIGN_CODE)
             for v, s in (("refusal", 0.0), ("refusal", 0.5), ("refusal", 1.0), ("enchtable", 0.5), ("enchtable", 1.0))]
    alone = {c: _text(steered, *c, tokens=16) for c in cases}
    with ThreadPoolExecutor(len(cases)) as pool:
        together = dict(zip(cases, pool.map(lambda c: _text(steered, *c, tokens=16), cases), strict=True))
    assert together == alone


def test_weight_vector_per_request_matches_it_merged_at_load(steered, merged):
    """enchtable as a LoRA adapter per request (vLLM's GPU LoRA kernels) gives the answers of the checkpoint
    with it merged at load, at the same strength: the same tokens, as tests/test_vllm.py allows (a
    trailing incomplete UTF-8 character aside)."""
    for p in PROMPTS[:3]:
        _assert_same(_answer(steered, p, MERGED, "enchtable", tokens=16), _answer(merged, p, 0.0, tokens=16))
