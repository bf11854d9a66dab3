"""One OpenAI-compatible endpoint: reachability and model check, the `safety` probe, chat requests.

Reachability is ``GET {base}/models`` with a short timeout, before anything else. Whether the server
accepts the ``safety`` extension is probed once: ``GET {base}/safety/vectors`` (this server), else one
1-token chat request with ``"safety": {}`` whose response must echo ``safety``. Every steered answer
must echo the strength it was asked for; one that does not stops the run (never record an
unverified strength).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from server.evaluation.config import EvalError


def normalize_url(url: str) -> str:
    """'http://h:8000' -> 'http://h:8000/v1'; a URL with a path is kept as given (minus a trailing /)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EvalError(f"not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:8000/v1)")
    url = url.rstrip("/")
    return url + "/v1" if parts.path in ("", "/") else url


@dataclass
class Endpoint:
    """A checked endpoint: its base URL, model id, the openai client and the safety probe's result."""

    base_url: str
    model: str
    api_key: str = field(repr=False)
    client: Any = field(repr=False)
    safety: dict = field(default_factory=lambda: {"supported": False})

    def describe(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "safety": self.safety}


def _get(url: str, api_key: str, timeout: float) -> httpx.Response:
    try:
        return httpx.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    except httpx.HTTPError as e:
        raise EvalError(f"cannot reach {url}: {e or type(e).__name__}") from None


def _model_ids(base: str, api_key: str, timeout: float) -> list[str]:
    r = _get(f"{base}/models", api_key, timeout)
    if r.status_code in (401, 403):
        raise EvalError(f"GET {base}/models answered HTTP {r.status_code}: check --api-key")
    if r.status_code != 200:
        raise EvalError(
            f"GET {base}/models answered HTTP {r.status_code}: is {base} an OpenAI-compatible base URL "
            "(usually ending in /v1)?"
        )
    try:
        return [str(m["id"]) for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise EvalError(f"GET {base}/models did not return an OpenAI model list") from None


def connect(url: str, *, api_key: str, model: str | None, connect_timeout: float, timeout: float) -> Endpoint:
    """Check ``url`` answers GET /models and serves ``model`` (default: its first model)."""
    import openai

    base = normalize_url(url)
    ids = _model_ids(base, api_key, connect_timeout)
    if model is None:
        if not ids:
            raise EvalError(f"{base} lists no models; pass --model")
        model = ids[0]
    elif model not in ids:
        raise EvalError(f"model {model!r} is not served at {base}; served: {', '.join(ids) or 'none'}")
    client = openai.OpenAI(base_url=base, api_key=api_key, timeout=timeout, max_retries=2)
    return Endpoint(base, model, api_key, client)


def probe_safety(ep: Endpoint, timeout: float) -> dict:
    """Does ``ep`` accept the ``safety`` request field? Returns a record for results.json."""
    r = _get(f"{ep.base_url}/safety/vectors", ep.api_key, timeout)
    if r.status_code == 200:
        try:
            body = r.json()
            return {
                "supported": True,
                "how": "GET /safety/vectors",
                "vectors": [v["name"] for v in body["data"]],
                "default_vector": body.get("default_vector"),
                "policy": body.get("policy"),
                "vectors_info": body["data"],  # provenance: which vector (sha256, config) was evaluated
            }
        except (ValueError, KeyError, TypeError):
            pass
    try:
        resp = ep.client.chat.completions.create(
            model=ep.model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=1,
            temperature=0,
            extra_body={"safety": {}},
        )
    except Exception as e:  # any refusal of the field means "not supported"
        return {"supported": False, "how": "chat request with safety", "detail": str(e).splitlines()[0][:200]}
    echo = (resp.model_extra or {}).get("safety")
    if isinstance(echo, dict) and "strength" in echo:
        return {"supported": True, "how": "chat request echoed safety", "vectors": None, "policy": None}
    return {
        "supported": False,
        "how": "chat request with safety",
        "detail": "the response did not echo `safety`",
    }


def chat(
    ep: Endpoint, messages: list[dict], *, max_tokens: int, strength: float | None, vector: str | None = None
) -> dict:
    """One greedy chat completion. ``strength`` None sends no safety field (the server's own behaviour)."""
    extra = None
    if strength is not None:
        extra = {"safety": {"strength": strength, **({"vector": vector} if vector else {})}}
    t0 = time.perf_counter()
    resp = ep.client.chat.completions.create(
        model=ep.model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra,
    )
    seconds = time.perf_counter() - t0
    echo = (resp.model_extra or {}).get("safety")
    if strength is not None:
        got = echo.get("strength") if isinstance(echo, dict) else None
        if not isinstance(got, int | float) or abs(got - strength) > 1e-9:
            raise EvalError(
                f"{ep.base_url} answered a request for safety strength {strength:g} with safety={echo!r}"
            )
    choice = resp.choices[0]
    usage = resp.usage.model_dump() if resp.usage is not None else None
    return {
        "answer": choice.message.content or "",
        "finish_reason": choice.finish_reason,
        "usage": usage,
        "safety": echo,
        "seconds": round(seconds, 4),
    }
