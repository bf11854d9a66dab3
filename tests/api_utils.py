"""The API test tier's shared parts: a real uvicorn server per fixture, clients, and helpers.

The model is the tiny random qwen2 from conftest (fp32, CPU) with an ungated random activation vector,
so steering visibly changes outputs (see test_api.py for the strength scale this implies).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
from server_utils import ServerThread, free_port, server_process

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
    """One running server: its settings and clients; its backend and metrics objects when it runs in this
    process (the embedded backend), None when it runs in its own process (``--backend vllm``)."""

    def __init__(self, base_url: str, settings: Settings, backend: TransformersBackend | None = None,
                 metrics: Metrics | None = None, *, kind: str = "transformers", max_model_len: int | None = None):
        self.srv = SimpleNamespace(base_url=base_url, port=int(base_url.rsplit(":", 1)[1]))
        self.settings, self.backend, self.metrics, self.kind = settings, backend, metrics, kind
        self.max_model_len = backend.max_model_len if backend is not None else max_model_len
        key = settings.api_key or "unused"
        self.client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {key}"})

    def running_rows(self) -> int:
        """Rows the engine is prefilling or decoding now."""
        if self.backend is not None:
            return self.backend.engine.running
        return int(metric_value(metrics_text(self), "steer_running_rows"))

    def idle(self) -> bool:
        """No request is running, queued, or still held by the backend."""
        if self.backend is not None:
            return engine_idle(self)
        text = metrics_text(self)
        return metric_value(text, "steer_running_rows") == 0 and metric_value(text, "steer_queued_requests") == 0

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
        served = Served(srv.base_url, settings, backend, metrics)
        try:
            yield served
        finally:
            served.close()
    assert not backend.healthy(), "the engine worker must stop with the server"


def serve_process(settings: Settings, model_dir: Path, vectors_dir: Path | None, *, backend: str,
                  max_model_len: int) -> Iterator[Served]:
    """``steer serve --backend BACKEND`` in its own process with ``settings`` as its flags (float32)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--backend", backend, "--model", str(model_dir),
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
           "--served-model-name", settings.served_model_name, "--default-strength", str(settings.default_strength),
           "--max-strength", str(settings.max_strength), "--max-n", str(settings.max_n)]
    if settings.api_key:
        cmd += ["--api-key", settings.api_key]
    if vectors_dir is not None:
        cmd += ["--vectors", str(vectors_dir)]
    with server_process(cmd, port) as url:
        served = Served(url, settings, kind=backend, max_model_len=max_model_len)
        try:
            yield served
        finally:
            served.close()


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
    return httpx.get(f"{api.srv.base_url}/metrics", timeout=30).text


