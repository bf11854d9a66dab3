"""The API test tier's shared parts: a real uvicorn server per fixture, clients, and helpers.

The model is the tiny random qwen2 from conftest (fp32, CPU) with an ungated random activation vector,
so steering visibly changes outputs (see test_api.py for the strength scale this implies).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
from server_utils import ServerThread

from server.app import create_app
from server.backends.transformers import TransformersBackend
from server.metrics import Metrics
from server.settings import Settings

API_KEY = "test-key"
MODEL = "tiny-qwen"
MAX_TOKENS = 8
DEFAULT_STRENGTH = 0.01  # small (see above) and not 1.0, so "the default was applied" is a sharp check
WEAK = 0.005  # a strength whose answers differ from both strength 0 and DEFAULT_STRENGTH
STRONG = 2.0  # saturates the tiny model: certainly differs from strength 0
MAX_STRENGTH = 4.0
MAX_N = 4
PROMPTS = [
    "How do I build a bomb?",
    "Write a Python function that adds two numbers.",
    "Explain photosynthesis to a child.",
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):",
]
ERROR_KEYS = {"message", "type", "param", "code"}
_CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- servers


class Served:
    """One running server: its settings, backend, metrics and clients."""

    def __init__(self, srv: ServerThread, settings: Settings, backend: TransformersBackend, metrics: Metrics):
        self.srv, self.settings, self.backend, self.metrics = srv, settings, backend, metrics
        key = settings.api_key or "unused"
        self.client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=key, max_retries=0, timeout=60)
        self.http = httpx.Client(
            base_url=srv.base_url, timeout=60, headers={"Authorization": f"Bearer {key}"}
        )

    def close(self) -> None:
        self.client.close()
        self.http.close()


def serve(settings: Settings, model, tokenizer, vectors) -> Iterator[Served]:
    metrics = Metrics()
    backend = TransformersBackend(
        settings, model=model, tokenizer=tokenizer, vectors=vectors, metrics=metrics
    )
    app = create_app(settings, backend, metrics)
    with ServerThread(app) as srv:
        served = Served(srv, settings, backend, metrics)
        try:
            yield served
        finally:
            served.close()
    assert not backend.healthy(), "the engine worker must stop with the server"


# ---------------------------------------------------------------- helpers


def msgs(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def safety_body(strength: float | None = None, **extra: Any) -> dict[str, Any]:
    body = dict(extra)
    if strength is not None:
        body["strength"] = strength
    return {"safety": body}


def chat(
    s: Served, prompt: str = PROMPTS[0], strength: float | None = None, safety: dict | None = None, **kw: Any
):
    """A greedy, MAX_TOKENS chat completion; ``strength``/``safety`` fill the ``safety`` extension."""
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": msgs(prompt),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    args.update(kw)
    if strength is not None or safety is not None:
        args["extra_body"] = {
            "safety": {**(safety or {}), **({} if strength is None else {"strength": strength})}
        }
    return s.client.chat.completions.create(**args)


def answer(s: Served, prompt: str = PROMPTS[0], strength: float | None = None, **kw: Any) -> str:
    content = chat(s, prompt, strength, **kw).choices[0].message.content
    assert isinstance(content, str)
    return content


def ext(obj, key: str) -> Any:
    """A response extension field (``safety``, ``baseline``) of an openai response object."""
    return obj.to_dict().get(key)


def prompt_len(tokenizer, prompt: str) -> int:
    ids = tokenizer.apply_chat_template(
        msgs(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids["input_ids"] if isinstance(ids, dict) else ids)


def sse_events(lines: Iterator[str]) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order; asserts nothing else is on the wire."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        out.append(line[len("data: ") :])
    return out


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one Prometheus sample, or None when absent (label order independent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if labels is None or all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def assert_alive(s: Served) -> None:
    """The server still answers a normal request (after an error, a disconnect, ...)."""
    r = chat(s, "hello world", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def engine_idle(api: Served) -> bool:
    eng = api.backend.engine
    return eng.running == 0 and not eng.pending and not api.backend._jobs


def wait(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def metrics_text(api: Served) -> str:
    return httpx.get(f"{api.srv.base_url}/metrics").text


