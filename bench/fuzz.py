"""Fuzz run: >= 10,000 generated requests against one server, every outcome recorded.

By default the server is the tiny random qwen2 of the test suite (tests/conftest.py: fp32, CPU, an
ungated random vector, API key, max_n 4) started here as a subprocess on --port; ``--base-url``
targets an external server instead (``--api-key`` if it needs one).

Request sources, shuffled together (seeded) so that bad requests share batches with good ones:

  schemathesis   the server's own /openapi.json: every operation, positive and negative generation
  served         the protocol's hypothesis strategy (tests/test_fuzz_protocol.py) within the server's
                 limits: must be a 200 (or the one 400 for prompt + max_tokens over the context)
  broken         a served body with one field made invalid: must be a 400 whose ``param`` names it
  junk           arbitrary JSON (odd unicode, lone surrogates, NaN, huge ints, deep nesting) as the body,
                 or merged into a served body's known fields
  wire           byte-level: truncated / corrupted JSON, NaN literals, invalid UTF-8, a BOM, wrong or no
                 Content-Type, non-object bodies, huge numbers, 100k-deep nesting, duplicate keys, bodies
                 over the size limit (Content-Length and chunked), random routes and methods, missing or
                 wrong API keys

A body without max_tokens / max_completion_tokens gets ``max_tokens: --max-tokens`` (omitted, the server
fills its whole context). Each request has --timeout seconds for its whole response.

Failures (the run passes only with none): a 5xx; a hang (no complete response in time); a transport
error (reset or broken connection); a 4xx that is not the OpenAI error envelope; a 200 stream without
[DONE] or with an error event; a served body not served; a broken body whose 400 names another param;
a 5xx counted by the server's own steer_requests_total; the server not answering afterwards. Tracebacks
in the server's log (subprocess mode) are counted beside them.

    .venv/bin/python bench/fuzz.py [--requests 10000] [--concurrency 8] [--seed 0]
    .venv/bin/python bench/fuzz.py --base-url http://127.0.0.1:8000 --api-key KEY

Writes --out (default bench/results/fuzz.json), prints a markdown summary, exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the protocol's strategies and the tiny test model live there

TINY_MODEL = "tiny-qwen"
TINY_KEY = "fuzz-key"
ERROR_KEYS = {"message", "type", "param", "code"}
SHARES = {"schemathesis": 0.50, "served": 0.20, "broken": 0.15, "junk": 0.07, "wire": 0.08}
MAX_EXAMPLES = 5000  # hypothesis examples per collection call (more are drawn with further seeds)


# ---------------------------------------------------------------- the tiny server (subprocess mode)


def serve_tiny(port: int, api_key: str) -> None:
    """Run the test suite's tiny server (what tests/conftest.py's ``api`` fixture serves) until killed."""
    import torch
    import uvicorn
    from conftest import CHATML, CORPUS, SPECIALS, make_model, make_vector
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from server.app import create_app
    from server.backends.transformers import TransformersBackend
    from server.metrics import Metrics
    from server.settings import Settings

    torch.set_num_threads(1)  # as the API tests do: the tiny model gains nothing from intra-op threads
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    model = make_model("qwen2", len(tokenizer))
    settings = Settings(api_key=api_key, served_model_name=TINY_MODEL, default_strength=0.01, max_strength=4.0,
                        max_n=4, port=port)
    metrics = Metrics()
    backend = TransformersBackend(settings, model=model, tokenizer=tokenizer, vectors=[make_vector(model)],
                                  metrics=metrics)
    uvicorn.run(create_app(settings, backend, metrics), host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- requests


@dataclass
class Req:
    source: str
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    auth: str | None = "key"  # "key": the right one; None: no header; else the header's value
    chunked: bool = False
    expect_param: str | None = None  # broken: the param the 400 must name
    note: str = ""

    def headers(self, api_key: str | None) -> dict[str, str | bytes]:
        h: dict[str, str | bytes] = {}
        if self.content_type is not None:
            h["content-type"] = self.content_type
        if self.auth == "key":
            if api_key:
                h["authorization"] = f"Bearer {api_key}"
        elif self.auth is not None:
            h["authorization"] = self.auth if self.auth.isascii() else self.auth.encode("latin-1")
        return h

    def repro(self, api_key: str | None) -> dict[str, Any]:
        body = (self.body or b"")[:2000].decode("utf-8", "backslashreplace")
        headers = {k: v if isinstance(v, str) else v.decode("latin-1") for k, v in self.headers(api_key).items()}
        return {"method": self.method, "path": self.path, "headers": headers,
                "chunked": self.chunked, "body": body, "body_bytes": len(self.body or b""), "note": self.note}


def capped(body: Any, max_tokens: int) -> Any:
    if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
        return {**body, "max_tokens": max_tokens}
    return body


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates as \ud800 escapes; NaN as NaN


def collect(strategy, n: int, seed: int) -> list:
    """``n`` examples of a hypothesis strategy (fewer if it runs out of distinct ones)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list = []
    while len(out) < n:
        before = len(out)

        @hseed(seed + len(out))
        @settings(max_examples=min(n - len(out), MAX_EXAMPLES), deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(x) -> None:
            out.append(x)

        run()
        if len(out) == before:
            break
    return out[:n]


def schemathesis_requests(base_url: str, n: int, seed: int, max_tokens: int) -> list[Req]:
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    with_input = [op for op in ops if op.method.upper() == "POST"]
    out: list[Req] = []
    for op in ops:
        if op not in with_input:  # no parameters: the one possible request
            out.append(Req("schemathesis", op.method.upper(), op.path, None, None))
    per = (n - len(out)) // (2 * len(with_input))
    for op in with_input:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            t0 = time.perf_counter()
            cases = collect(op.as_strategy(generation_mode=mode), per, seed)
            for case in cases:
                kw = case.as_transport_kwargs(base_url=base_url)
                if "json" in kw:
                    body = _dumps(capped(kw["json"], max_tokens))
                else:
                    data = kw.get("data")
                    body = data.encode() if isinstance(data, str) else data
                ctype = {k.lower(): v for k, v in kw.get("headers", {}).items()}.get("content-type")
                out.append(Req("schemathesis", op.method.upper(), op.path, body, ctype, note=mode.value))
            print(f"  schemathesis {op.path} {mode.value}: {len(cases)} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    return out


def protocol_requests(limits: dict, counts: dict[str, int], seed: int) -> list[Req]:
    from hypothesis import strategies as st
    from test_fuzz_protocol import WIRE_JUNK, broken_bodies, request_bodies

    from server.protocol import ChatCompletionRequest

    def path_of(model) -> str:
        return "/v1/chat/completions" if model is ChatCompletionRequest else "/v1/completions"

    served = request_bodies(
        max_tokens=limits["max_tokens"], max_n=limits["max_n"], min_strength=limits["min_strength"],
        max_strength=limits["max_strength"], vectors=tuple(limits["vectors"]),
        models=st.sampled_from([None, limits["model"]]), require_max_tokens=True, text_size=12,
    )
    out = [Req("served", "POST", path_of(m), _dumps(b)) for m, b in collect(served, counts["served"], seed)]
    if not any(counts[k] for k in ("broken", "junk", "wire")):
        return out
    for m, b, param in collect(broken_bodies(served), counts["broken"], seed + 1):
        out.append(Req("broken", "POST", path_of(m), _dumps(b), expect_param=param))
    fields = ["messages", "prompt", "safety", "stop", "temperature", "top_p", "n", "max_tokens", "seed",
              "stream", "stream_options", "model", "tools", "logit_bias"]
    junk = st.one_of(
        st.tuples(served, st.just({}), WIRE_JUNK),  # the whole body is junk
        st.tuples(served, st.dictionaries(st.sampled_from(fields), WIRE_JUNK, min_size=1, max_size=3), st.none()),
    )
    for (m, b), merged, whole in collect(junk, counts["junk"], seed + 2):
        body = whole if merged == {} else capped({**b, **merged}, limits["max_tokens"])
        out.append(Req("junk", "POST", path_of(m), _dumps(body)))
    # every kind equally often (hypothesis' sampled_from favours the first), the 1 MiB ones 1 in 10 as often
    weights = {kind: 0.1 if kind.startswith("oversize") else 1.0 for kind in WIRE_KINDS}
    for i, kind in enumerate(WIRE_KINDS):
        n = max(1, round(counts["wire"] * weights[kind] / sum(weights.values())))
        out += collect(wire_requests(served, kind), n, seed + 3 + i)
    return out


def _deep_bytes(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


WIRE_KINDS = ["truncated", "corrupted", "nan", "invalid_utf8", "bom", "content_type", "non_object", "empty",
              "huge_number", "deep", "duplicate_keys", "route", "auth", "get_with_body", "oversize",
              "oversize_chunked"]


def wire_requests(served, kind: str):
    """Byte-level requests of one kind around a served body (a hypothesis strategy of Req)."""
    from hypothesis import strategies as st

    from server.protocol import ChatCompletionRequest

    @st.composite
    def build(draw) -> Req:
        model, body = draw(served)
        path = "/v1/chat/completions" if model is ChatCompletionRequest else "/v1/completions"
        raw = _dumps(body)
        if kind == "truncated":
            return Req("wire", "POST", path, raw[: draw(st.integers(0, len(raw) - 1))], note=kind)
        if kind == "corrupted":
            at = draw(st.integers(0, len(raw)))
            junk = draw(st.binary(min_size=1, max_size=8))
            return Req("wire", "POST", path, raw[:at] + junk + raw[at:], note=kind)
        if kind == "nan":  # Python's json reads these literals
            lit = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
            field = draw(st.sampled_from([b'"temperature"', b'"top_p"', b'"max_tokens"', b'"n"', b'"seed"',
                                          b'"safety"']))
            value = b'{"strength": ' + lit + b"}" if field == b'"safety"' else lit
            return Req("wire", "POST", path, raw[:-1] + b", " + field + b": " + value + b"}", note=kind)
        if kind == "invalid_utf8":
            bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]))
            at = raw.find(b'": "') + 4 if b'": "' in raw else len(raw) // 2
            return Req("wire", "POST", path, raw[:at] + bad + raw[at:], note=kind)
        if kind == "bom":
            return Req("wire", "POST", path, b"\xef\xbb\xbf" + raw, note=kind)
        if kind == "content_type":
            ctype = draw(st.sampled_from([None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/vnd.api+json", "application/json; charset=utf-16", "*/*"]))
            return Req("wire", "POST", path, raw, ctype, note=f"{kind}={ctype}")
        if kind == "non_object":
            return Req("wire", "POST", path, draw(st.sampled_from([b"null", b"[]", b"1", b'"x"', b"true", b"[{}]"])),
                       note=kind)
        if kind == "empty":
            return Req("wire", "POST", path, b"", note=kind)
        if kind == "huge_number":
            num = draw(st.sampled_from([b"1e999", b"-1e999", b"9" * 5000, b"1" + b"0" * 400, b"1e-999"]))
            field = draw(st.sampled_from([b'"temperature"', b'"max_tokens"', b'"n"', b'"seed"']))
            return Req("wire", "POST", path, raw[:-1] + b", " + field + b": " + num + b"}", note=kind)
        if kind == "deep":
            return Req("wire", "POST", path, _deep_bytes(draw(st.integers(500, 200_000))), note=kind)
        if kind == "duplicate_keys":
            return Req("wire", "POST", path, raw[:-1] + b', "safety": {"strength": "x"}, "safety": null}', note=kind)
        if kind == "route":
            method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
            route = draw(st.sampled_from(["/", "/v1", "/v1/", "/v1/chat", "/v1/chat/completions/x", "/v2/models",
                                          "/v1/embeddings", "/v1/models/x", "/%2e%2e/etc/passwd", "/v1//models",
                                          "/health/", "/v1/chat/completions", "/v1/completions", "/metrics"]))
            return Req("wire", method, route, raw if method in ("POST", "PUT", "PATCH") else None, note=kind)
        if kind == "auth":
            header = draw(st.sampled_from([None, "Bearer wrong", "Bearer", "bearer x", "Basic Zm9vOmJhcg==", "x" * 300,
                                           "Bearer " + "\u00e9"]))
            return Req("wire", "POST", path, raw, auth=header, note=kind)
        if kind == "get_with_body":
            route = draw(st.sampled_from(["/v1/models", "/v1/safety/vectors", "/health"]))
            return Req("wire", "GET", route + draw(st.sampled_from(["", "?x=1", "?stream=true&n=99"])), raw, note=kind)
        # over --max-request-bytes (1 MiB by default)
        big = raw[:-1] + b', "user": "' + b"x" * (1_100_000) + b'"}'
        return Req("wire", "POST", path, big, chunked=kind == "oversize_chunked", note=kind)

    return build()


# ---------------------------------------------------------------- sending and judging


@dataclass
class Result:
    req: Req
    status: int | None
    seconds: float
    problem: str | None = None
    detail: str = ""


def judge(req: Req, resp: httpx.Response, api_key_set: bool) -> str | None:
    """The failure a response shows, or None."""
    status = resp.status_code
    if status >= 500:
        return "5xx"
    if 400 <= status < 500 and req.method != "HEAD":
        try:
            body = resp.json()
            err = body["error"]
            assert isinstance(body, dict) and set(body) == {"error"} and set(err) == ERROR_KEYS
            assert isinstance(err["message"], str) and err["message"]
        except (ValueError, KeyError, TypeError, AssertionError):
            return "bad_envelope"
    if status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
        if not events or events[-1] != "[DONE]":
            return "stream_without_done"
        if any('"error"' in e and "error" in json.loads(e) for e in events[:-1]):
            return "in_band_error"
    if req.source == "served" and status != 200:
        if not (status == 400 and "context" in resp.json()["error"]["message"]):
            return "served_not_200"
    if req.source == "broken" and (status != 400 or resp.json()["error"]["param"] != req.expect_param):
        return "wrong_param"
    if req.note == "auth" and api_key_set and status != 401:
        return "auth_not_401"
    return None


async def send_all(base_url: str, api_key: str | None, reqs: list[Req], concurrency: int, timeout: float
                   ) -> list[Result]:
    sem = asyncio.Semaphore(concurrency)
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, req: Req) -> Result:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            content: Any = req.body
            if req.chunked and req.body is not None:
                body = req.body

                async def chunks():
                    for i in range(0, len(body), 65536):
                        yield body[i:i + 65536]

                content = chunks()
            try:
                resp = await asyncio.wait_for(
                    client.request(req.method, req.path, content=content, headers=req.headers(api_key)), timeout)
                problem = judge(req, resp, bool(api_key))
                res = Result(req, resp.status_code, time.perf_counter() - t0, problem,
                             resp.text[:1000] if problem else "")
            except (TimeoutError, httpx.TimeoutException):
                res = Result(req, None, time.perf_counter() - t0, "hang")
            except httpx.TransportError as e:
                # the server closing a connection after answering an oversize upload early is fine
                ok = req.note.startswith("oversize")
                res = Result(req, None, time.perf_counter() - t0, None if ok else "transport_error", repr(e))
            done += 1
            if done % 1000 == 0:
                print(f"  {done}/{len(reqs)} sent", flush=True)
            return res

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        return await asyncio.gather(*(one(client, r) for r in reqs))


def server_5xx(base_url: str) -> float | None:
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("steer_requests_total{") and 'status="5' in name:
            total += float(value)
    return total


def alive(base_url: str, api_key: str | None, model: str) -> bool:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
            "temperature": 0, "safety": {"strength": 0}}
    try:
        ok = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        return ok and httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers,
                                 timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def server_limits(base_url: str, api_key: str | None, ns) -> dict:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    info = httpx.get(f"{base_url}/v1/safety/vectors", headers=headers, timeout=10).json()
    models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10).json()
    vectors = [v["name"] for v in info["data"]]
    policy = info["policy"]
    return {"model": models["data"][0]["id"], "vectors": vectors, "max_n": ns.max_n, "max_tokens": ns.max_tokens,
            "min_strength": policy["min_strength"], "max_strength": policy["max_strength"] if vectors else 0.0}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarise(results: list[Result], log_text: str) -> dict:
    statuses: Counter[str] = Counter()
    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    problems: Counter[str] = Counter()
    examples: list[dict] = []
    for res in results:
        key = str(res.status) if res.status is not None else (res.problem or "transport")
        statuses[key] += 1
        by_source[res.req.source][key] += 1
        if res.problem:
            problems[res.problem] += 1
            if len(examples) < 25:
                examples.append({"problem": res.problem, "source": res.req.source,
                                 "status": res.status, "seconds": round(res.seconds, 3),
                                 "request": res.req.repro("KEY"), "response": res.detail[:600]})
    latencies = [r.seconds for r in results]
    return {
        "requests": len(results),
        "statuses": dict(sorted(statuses.items())),
        "by_source": {k: dict(sorted(v.items())) for k, v in sorted(by_source.items())},
        "five_xx": sum(n for k, n in statuses.items() if k.isdigit() and int(k) >= 500),
        "hangs": problems["hang"],
        "problems": dict(problems),
        "latency_s": {"p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99), "max": max(latencies, default=0)},
        "server_log": {"tracebacks": log_text.count("Traceback (most recent call last)"),
                       "unhandled_asgi": log_text.count("Exception in ASGI application")},
        "failures": examples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds for one whole response; more is a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=8, help="max_tokens added to bodies that send none")
    ap.add_argument("--max-n", type=int, default=4, help="the server's --max-n (not reported by the server)")
    ap.add_argument("--base-url", help="an external server (default: start the tiny test server here)")
    ap.add_argument("--api-key", help="the external server's API key")
    ap.add_argument("--port", type=int, default=0, help="port for the tiny server (default: a free one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    ap.add_argument("--serve-tiny", action="store_true", help=argparse.SUPPRESS)  # the subprocess itself
    ns = ap.parse_args(argv)
    if ns.serve_tiny:
        serve_tiny(ns.port, ns.api_key)
        return 0

    proc, log = None, None
    if ns.base_url:
        base_url, api_key = ns.base_url.rstrip("/"), ns.api_key
    else:
        port, api_key = ns.port or _free_port(), TINY_KEY
        base_url = f"http://127.0.0.1:{port}"
        log = tempfile.NamedTemporaryFile("w+", prefix="fuzz-server-", suffix=".log")
        proc = subprocess.Popen([sys.executable, __file__, "--serve-tiny", "--port", str(port), "--api-key", api_key],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(proc, port, timeout=300, what="the tiny fuzz server")
    try:
        t0 = time.perf_counter()
        limits = server_limits(base_url, api_key, ns)
        counts = {k: int(ns.requests * v) for k, v in SHARES.items()}
        print(f"generating ~{ns.requests} requests against {base_url} ({limits})", flush=True)
        reqs = schemathesis_requests(base_url, counts.pop("schemathesis"), ns.seed, ns.max_tokens)
        counts["served"] += max(0, ns.requests - len(reqs) - sum(counts.values()))  # schemathesis ran short
        reqs += protocol_requests(limits, counts, ns.seed)
        if len(reqs) < ns.requests:  # rounding, or a strategy that ran out of distinct examples
            reqs += protocol_requests(limits, {"served": ns.requests - len(reqs), "broken": 0, "junk": 0, "wire": 0},
                                      ns.seed + 100)
        random.Random(ns.seed).shuffle(reqs)
        generation_s = time.perf_counter() - t0
        print(f"{len(reqs)} requests generated in {generation_s:.0f} s; sending with {ns.concurrency} clients",
              flush=True)
        t1 = time.perf_counter()
        results = asyncio.run(send_all(base_url, api_key, reqs, ns.concurrency, ns.timeout))
        duration_s = time.perf_counter() - t1
        counted_5xx = server_5xx(base_url)
        still_alive = alive(base_url, api_key, limits["model"])
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    log_text = ""
    if log is not None:
        log.seek(0)
        log_text = log.read()
        log.close()
    summary = summarise(results, log_text)
    ok = (not summary["problems"] and summary["five_xx"] == 0 and still_alive and not counted_5xx)
    out = {
        "command": "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "server": ns.base_url or "tiny random qwen2 (tests/conftest.py), subprocess",
        "limits": limits, "seed": ns.seed, "concurrency": ns.concurrency, "timeout_s": ns.timeout,
        "generation_s": round(generation_s, 1), "duration_s": round(duration_s, 1),
        "requests_per_s": round(len(results) / duration_s, 1),
        "server_counted_5xx": counted_5xx, "alive_after": still_alive, "passed": ok,
        **summary,
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
    return 0 if ok else 1


def markdown(out: dict) -> str:
    lines = [
        "| requests | duration s | req/s | 5xx | hangs | other failures | server-counted 5xx | alive after | passed |",
        "|---|---|---|---|---|---|---|---|---|",
        "| {requests} | {duration_s} | {requests_per_s} | {five_xx} | {hangs} | {other} | {server_counted_5xx} | "
        "{alive_after} | {passed} |".format(
            other=sum(v for k, v in out["problems"].items() if k not in ("5xx", "hang")), **out),
        "",
        "| source | " + " | ".join(sorted(out["statuses"])) + " |",
        "|---|" + "---|" * len(out["statuses"]),
    ]
    for source, counts in out["by_source"].items():
        lines.append(f"| {source} | " + " | ".join(str(counts.get(k, 0)) for k in sorted(out["statuses"])) + " |")
    lines.append("| **all** | " + " | ".join(str(v) for _, v in sorted(out["statuses"].items())) + " |")
    if out["problems"]:
        lines += ["", "problems: " + ", ".join(f"{k} {v}" for k, v in sorted(out["problems"].items()))]
    lines.append(f"server log: {out['server_log']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
