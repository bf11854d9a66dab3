"""Soak test: concurrent streaming clients for minutes, with disconnects, cancels and bad requests.

Random mid-stream disconnects, client-side cancels and bad requests are mixed in. Acceptance: zero
5xx, zero hung requests, every slot freed at the end, RSS drift < 5% from minute 2 to the last minute.

The full run (64 clients, 10 minutes, against ``steer serve`` started here on the demo model):

    .venv/bin/python bench/soak.py

Other runs:

    .venv/bin/python bench/soak.py --duration 60 --clients 16 --out bench/results/soak_smoke.json
    .venv/bin/python bench/soak.py --serve-arg "--max-batch-size 32"      # flags for steer serve
    .venv/bin/python bench/soak.py --base-url http://127.0.0.1:8000 --pid 12345   # external server

Each client loops until --duration has passed, choosing a request kind with fixed probabilities from
its own seeded RNG (``--seed`` and the client index):

  stream      streaming chat, random short prompt, max_tokens 8-64, strength in [0, 2] (sometimes the
              server default), sometimes compare=true or n=2, temperature 0 or 0.7 (sometimes seeded);
              must end with ``data: [DONE]`` after a final chunk carrying ``safety`` (and ``baseline``)
  disconnect  streaming chat closed by the client after k = 1-8 content chunks
  abandon     non-streaming chat abandoned after a random 0.1-4 s (client-side cancel); one that
              answers first must be a valid 200
  bad:*       invalid JSON, unknown safety key, strength out of range / NaN, wrong types, huge n, a body
              near (under) and over 1 MiB, unknown route or method: must be 4xx with the OpenAI
              error envelope ``{"error": {"message": ...}}``

Any request (ours to cancel excepted) not finished within --hang-timeout is "hung" (reported as
"stalled" when no data came in its last 30 s, else "still streaming", i.e. slow). A 5xx, an
``{"error": ...}`` event inside a 200 stream, and a 5xx counted by the server's own
``steer_requests_total`` are all errors; 429 with Retry-After is allowed and counted separately.
Every --sample-interval seconds the server's process-tree VmRSS and the /metrics gauges
``steer_running_rows``, ``steer_queued_requests`` and ``steer_batch_size`` are sampled. After the last
request: the gauges must reach 0 within --drain-timeout seconds (``steer_batch_size`` instead when
the running/queued gauges are missing, and as well when they never moved during the run), then one
short probe request must succeed. RSS drift = (median RSS over the last 60 s of load - median over
[60 s, 120 s)) / the latter; runs shorter than 3 minutes use the second and the last fifth instead.

Writes --out (default bench/results/soak.json) and a PNG of RSS and running rows over time beside it
(``soak.json`` -> ``soak_rss.png``), prints a markdown summary, and exits 1 if any criterion fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from _common import wait_healthy
from throughput import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

# Fixed request-kind probabilities (the RNG is seeded, so a seed replays the same request mix).
KINDS = {"stream": 0.50, "disconnect": 0.15, "abandon": 0.15, "bad": 0.20}
BAD_KINDS = {"json": 1.0, "safety_key": 1.0, "strength": 1.0, "type": 1.0, "n": 1.0, "oversize": 0.5, "route": 1.0}
EXTRA_PROMPTS = [
    "Write a haiku about unit tests.",
    "What does the Python GIL do?",
    "How do I hotwire a car?",
    "Write a bash one-liner that counts lines in all .py files.",
    "Explain how to make a fake ID.",
    "Reverse a linked list in C.",
]
STALL = 30.0  # a hung stream with no data for this long before the timeout counts as stalled, not slow
GAUGES = ("steer_running_rows", "steer_queued_requests", "steer_batch_size")


@dataclass
class Record:
    kind: str
    client: int
    start: float  # seconds since the load started
    latency: float = 0.0
    status: int | None = None
    outcome: str = "?"  # completed | cancelled (by us) | rejected (expected 4xx / 429) | hung | error | unexpected
    tokens: int = 0
    chunks: int = 0
    retry_after: bool = False
    last_data: float | None = None  # seconds after the start when the last stream line arrived
    error: str = ""
    began: float = 0.0  # time.monotonic() at the start (internal)


@dataclass
class Sample:
    t: float
    rss_mib: float | None
    gauges: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- request builders


def _prompt(rng: random.Random) -> str:
    p = rng.choice(PROMPTS + EXTRA_PROMPTS)
    if rng.random() < 0.3:
        p += f" Keep it under {rng.randint(20, 200)} words."
    return p


def normal_body(rng: random.Random, *, stream: bool) -> dict:
    messages = [{"role": "user", "content": _prompt(rng)}]
    if rng.random() < 0.15:
        messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
    body: dict = {"messages": messages, "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.7]),
                  "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    safety: dict = {}
    if rng.random() < 0.9:
        safety["strength"] = round(rng.uniform(0, 2), 3)
    if rng.random() < 0.2:
        safety["compare"] = True
    if safety:
        body["safety"] = safety
    if body["temperature"] and rng.random() < 0.5:
        body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.1:
        body["n"] = 2
    return body


_BIG: dict[int, bytes] = {}


def _big_body(size: int) -> bytes:
    """A chat body of about ``size`` bytes (ordinary words, so tokenizing it is not pathological)."""
    if size not in _BIG:
        head = b'{"max_tokens": 8, "messages": [{"role": "user", "content": "'
        tail = b'"}]}'
        words = b"lorem ipsum dolor sit amet consectetur "
        n = size - len(head) - len(tail)
        _BIG[size] = head + (words * (n // len(words) + 1))[:n] + tail
    return _BIG[size]


def bad_request(rng: random.Random) -> tuple[str, str, str, bytes]:
    """(sub-kind, method, path, body) of a request the server must refuse with a 4xx."""
    sub = rng.choices(list(BAD_KINDS), weights=list(BAD_KINDS.values()))[0]
    path, method = "/v1/chat/completions", "POST"
    base = {"messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": 8}
    if sub == "json":
        raw = rng.choice([b'{"messages": [{"role": "user", "content": "hi"}', b"not json", b"",
                          b'{"messages": [], "max_tokens": 8,}'])
        return sub, method, path, raw
    if sub == "safety_key":
        body = dict(base, safety={rng.choice(["strenght", "vectr", "level", "Compare"]): 1.0})
    elif sub == "strength":
        s = rng.choice([-1.0, -0.001, 1e6, 4.5e3, "NaN", "Infinity"])
        if isinstance(s, str):  # Python's json parser accepts these; the server must not
            raw = json.dumps(base)[:-1].encode() + f', "safety": {{"strength": {s}}}}}'.encode()
            return sub, method, path, raw
        body = dict(base, safety={"strength": s})
    elif sub == "type":
        body = dict(base, **rng.choice([{"max_tokens": "10"}, {"temperature": "hot"}, {"messages": "hello"},
                                        {"stream": "yes"}, {"safety": {"strength": "1.5"}},
                                        {"safety": {"compare": "true"}}, {"n": 1.5}, {"safety": [1]},
                                        {"messages": [{"role": "user", "content": 5}]}]))
    elif sub == "n":
        body = dict(base, n=rng.choice([1000, 10**9, 0, -1]))
    elif sub == "oversize":
        size = rng.choice([1_000_000, 1_040_000, 1_100_000, 2 * MiB])  # under and over 1 MiB
        return f"{sub}_{'under' if size < MiB else 'over'}", method, path, _big_body(size)
    else:  # route
        method, path = rng.choice([("POST", "/v1/chat/complete"), ("GET", "/v1/nonexistent"),
                                   ("POST", "/v2/chat/completions"), ("GET", "/v1/chat/completions"),
                                   ("PUT", "/v1/completions")])
        body = base
    return sub, method, path, json.dumps(body).encode()


# ---------------------------------------------------------------- one request of each kind


def _envelope_problem(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        return f"body is not a JSON object: {resp.text[:200]!r}"
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return f"no OpenAI error envelope: {resp.text[:200]!r}"
    return ""


def _classify_status(rec: Record, resp: httpx.Response, *, want_ok: bool) -> bool:
    """Set rec.status/outcome for a non-200 answer (or a 200 where a 4xx was due). True if handled."""
    rec.status = resp.status_code
    if resp.status_code == 429:
        rec.retry_after = "retry-after" in resp.headers
        rec.outcome = "rejected" if rec.retry_after else "unexpected"
        rec.error = "" if rec.retry_after else "429 without Retry-After"
        return True
    if resp.status_code >= 500:
        rec.outcome, rec.error = "error", f"{resp.status_code}: {resp.text[:300]}"
        return True
    if want_ok and resp.status_code != 200:
        rec.outcome, rec.error = "unexpected", f"{resp.status_code} on a valid request: {resp.text[:300]}"
        return True
    if not want_ok:
        if not 400 <= resp.status_code < 500:
            rec.outcome, rec.error = "unexpected", f"{resp.status_code} on a bad request: {resp.text[:200]}"
        else:
            problem = _envelope_problem(resp)
            rec.outcome, rec.error = ("unexpected", problem) if problem else ("rejected", "")
        return True
    return False


async def do_stream(client: httpx.AsyncClient, rng: random.Random, rec: Record, *, stop_after: int | None) -> None:
    body = normal_body(rng, stream=True)
    want_baseline = bool(body.get("safety", {}).get("compare"))
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            _classify_status(rec, resp, want_ok=True)
            return
        rec.status, final, done = 200, None, False
        async for line in resp.aiter_lines():
            rec.last_data = time.monotonic() - rec.began
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                rec.outcome, rec.error = "error", f"error event in a 200 stream: {data[:300]}"
                return
            if obj.get("choices"):
                if any(c.get("delta", {}).get("content") for c in obj["choices"]):
                    rec.chunks += 1
            else:
                final = obj
            if stop_after is not None and rec.chunks >= stop_after:
                rec.outcome = "cancelled"
                return  # leaving the block closes the response mid-stream
        if not done:
            rec.outcome, rec.error = "unexpected", "stream ended without data: [DONE]"
        elif final is None or "safety" not in final:
            rec.outcome, rec.error = "unexpected", f"no final chunk with safety: {final}"
        elif want_baseline and not final.get("baseline"):
            rec.outcome, rec.error = "unexpected", "compare=true but no baseline on the final chunk"
        else:
            rec.outcome = "completed"
            rec.tokens = (final.get("usage") or {}).get("completion_tokens", 0)


async def do_abandon(client: httpx.AsyncClient, rng: random.Random, rec: Record) -> None:
    body = normal_body(rng, stream=False)
    patience = rng.uniform(0.1, 4.0)
    try:
        resp = await asyncio.wait_for(client.post("/v1/chat/completions", json=body), patience)
    except TimeoutError:
        rec.outcome = "cancelled"
        return
    if _classify_status(rec, resp, want_ok=True):
        return
    out = resp.json()
    if "safety" not in out or not out.get("choices"):
        rec.outcome, rec.error = "unexpected", f"200 without choices/safety: {resp.text[:300]}"
    else:
        rec.outcome, rec.tokens = "completed", out.get("usage", {}).get("completion_tokens", 0)


async def do_bad(client: httpx.AsyncClient, rng: random.Random, rec: Record) -> None:
    sub, method, path, raw = bad_request(rng)
    rec.kind = f"bad:{sub}"
    resp = await client.request(method, path, content=raw, headers={"Content-Type": "application/json"})
    _classify_status(rec, resp, want_ok=False)


async def run_client(i: int, base_url: str, seed: int, t0: float, duration: float, hang: float,
                     records: list[Record]) -> None:
    rng = random.Random(f"{seed}-{i}")
    timeout = httpx.Timeout(hang + 30, connect=30)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=2, max_keepalive_connections=1)) as client:
        while time.monotonic() - t0 < duration:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            rec = Record(kind, i, time.monotonic() - t0)
            records.append(rec)
            if kind == "stream":
                coro = do_stream(client, rng, rec, stop_after=None)
            elif kind == "disconnect":
                coro = do_stream(client, rng, rec, stop_after=rng.randint(1, 8))
            elif kind == "abandon":
                coro = do_abandon(client, rng, rec)
            else:
                coro = do_bad(client, rng, rec)
            rec.began = time.monotonic()
            try:
                await asyncio.wait_for(coro, hang)
            except TimeoutError:
                quiet = hang - rec.last_data if rec.last_data is not None else hang
                rec.outcome = "hung"
                rec.error = (f"not finished in {hang:g} s (status {rec.status}, {rec.chunks} content chunks, "
                             f"{'stalled: ' if quiet >= STALL else 'still streaming, '}last data {quiet:.0f} s "
                             "before the timeout)")
            except (httpx.HTTPError, ValueError) as e:  # connection reset, bad JSON in a 200, ...
                rec.outcome, rec.error = "unexpected", f"{type(e).__name__}: {e}"[:300]
            rec.latency = time.monotonic() - rec.began


# ---------------------------------------------------------------- server, RSS, metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(pid: int) -> float | None:
    """Sum of VmRSS over ``pid`` and its descendants (MiB); None once the process is gone."""
    total, todo, seen = 0.0, [pid], False
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                    seen = True
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total if seen else None


def parse_metrics(text: str) -> dict[str, float]:
    """Gauges in GAUGES plus the server's 5xx total from steer_requests_total."""
    out: dict[str, float] = {}
    server_5xx = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if name in GAUGES:
            out[name] = float(value)
        elif name.startswith("steer_requests_total{") and 'status="5' in name:
            server_5xx += float(value)
    out["server_5xx"] = server_5xx
    return out


async def get_metrics(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        resp = await client.get("/metrics", timeout=10)
        return parse_metrics(resp.text) if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def sampler(base_url: str, pid: int | None, t0: float, every: float, samples: list[Sample],
                  stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        while True:
            m = await get_metrics(client)
            samples.append(Sample(time.monotonic() - t0, tree_rss_mib(pid) if pid else None, m or {}))
            try:
                await asyncio.wait_for(stop.wait(), every)
                return
            except TimeoutError:
                pass


async def drain_check(base_url: str, gauges: list[str], timeout: float) -> tuple[bool, float, dict]:
    """Poll /metrics until every gauge in ``gauges`` is 0; (freed, seconds waited, last values)."""
    t, last = time.monotonic(), {}
    async with httpx.AsyncClient(base_url=base_url) as client:
        while True:
            m = await get_metrics(client) or {}
            last = {g: m.get(g) for g in gauges}
            if all(v == 0 for v in last.values()):
                return True, time.monotonic() - t, last
            if time.monotonic() - t > timeout:
                return False, time.monotonic() - t, last
            await asyncio.sleep(0.5)


async def probe(base_url: str) -> str:
    """One short request after the soak: the engine must still serve. '' if it did."""
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            resp = await client.post("/v1/chat/completions", json=body)
        return "" if resp.status_code == 200 and resp.json().get("choices") else f"{resp.status_code}: {resp.text[:200]}"
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- analysis and output


def drift(samples: list[Sample], duration: float) -> dict:
    if duration >= 180:
        early, late, how = (60.0, 120.0), (duration - 60, duration), "minute 2 [60 s, 120 s) vs the last 60 s"
    else:
        early, late = (duration / 5, 2 * duration / 5), (4 * duration / 5, duration)
        how = f"run < 3 min: second fifth [{early[0]:g} s, {early[1]:g} s) vs last fifth [{late[0]:g} s, {late[1]:g} s)"
    pick = lambda w: [s.rss_mib for s in samples if s.rss_mib is not None and w[0] <= s.t < w[1]]  # noqa: E731
    a, b = pick(early), pick(late)
    if not a or not b:
        return {"windows": how, "early_s": early, "late_s": late, "drift": None, "reason": "no RSS samples in a window"}
    ma, mb = statistics.median(a), statistics.median(b)
    return {"windows": how, "early_s": early, "late_s": late, "early_median_mib": ma, "late_median_mib": mb, "early_n": len(a), "late_n": len(b),
            "drift": (mb - ma) / ma}


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def summarise(records: list[Record]) -> list[dict]:
    by_kind: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
    rows = []
    for kind in sorted(by_kind, key=lambda k: (k.startswith("bad:"), k)):
        rs = by_kind[kind]
        outcomes = Counter(r.outcome for r in rs)
        lat = [r.latency for r in rs if r.outcome in ("completed", "rejected")]
        rows.append({"kind": kind, "requests": len(rs), **{o: outcomes.get(o, 0) for o in
                     ("completed", "cancelled", "rejected", "hung", "error", "unexpected")},
                     "status": dict(Counter(str(r.status) for r in rs)),
                     "n429": sum(r.status == 429 for r in rs), "n5xx": sum((r.status or 0) >= 500 for r in rs),
                     "latency_p50": _pct(lat, 0.5), "latency_p99": _pct(lat, 0.99)})
    return rows


def plot(samples: list[Sample], dr: dict, out: Path, title: str, duration: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    pts = [(s.t, s.rss_mib) for s in samples if s.rss_mib is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", label="server RSS (MiB)")
    ax.set_xlabel("seconds since load start")
    ax.set_ylabel("RSS of the server process tree (MiB)", color="tab:blue")
    ax2 = ax.twinx()
    for g, color, ls in (("steer_running_rows", "tab:orange", "-"), ("steer_queued_requests", "tab:green", "-"),
                         ("steer_batch_size", "tab:gray", "--")):
        ts = [(s.t, s.gauges[g]) for s in samples if g in s.gauges]
        if ts:
            ax2.step([p[0] for p in ts], [p[1] for p in ts], where="post", color=color, ls=ls, alpha=0.7, label=g)
    ax2.set_ylabel("rows / requests (gauges)")
    for w in (dr.get("early_s"), dr.get("late_s")):
        if w:
            ax.axvspan(*w, color="tab:blue", alpha=0.08)
    ax.axvline(duration, color="black", ls=":", lw=1)  # load stops; in-flight requests finish after
    if dr.get("drift") is not None:
        ax.axhline(dr["early_median_mib"], color="tab:blue", ls=":", lw=1)
        ax.axhline(dr["late_median_mib"], color="tab:red", ls=":", lw=1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    drift_txt = f"{100 * dr['drift']:+.2f}%" if dr.get("drift") is not None else "n/a"
    ax.set_title(f"{title}; RSS drift {drift_txt}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _f(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def markdown(result: dict) -> str:
    head = ["kind", "requests", "completed", "cancelled by client", "rejected 4xx/429", "429", "5xx/error event", "hung",
            "unexpected", "latency p50 s", "latency p99 s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["by_kind"]:
        lines.append(f"| {r['kind']} | {r['requests']} | {r['completed']} | {r['cancelled']} | {r['rejected']} | "
                     f"{r['n429']} | {r['error']} | {r['hung']} | "
                     f"{r['unexpected']} | {_f(r['latency_p50'])} | {_f(r['latency_p99'])} |")
    t = result["totals"]
    lines.append(f"| **all** | {t['requests']} | {t['completed']} | {t['cancelled']} | {t['rejected']} | "
                 f"{t['n429']} | {t['errors']} | {t['hung']} | {t['unexpected']} | | |")
    lines += ["", "| criterion | value | pass |", "|---|---|---|"]
    for c in result["criteria"]:
        lines.append(f"| {c['name']} | {c['value']} | {c['pass']} |")
    lines.append("")
    lines.append(f"throughput: {result['tokens_per_s']:.1f} completion tokens/s of completed requests, "
                 f"{result['streamed_chunks_per_s']:.1f} content chunks/s streamed in all, over "
                 f"{result['load_seconds']:.0f} s ({result['settings']['clients']} clients); "
                 f"RSS: {result['rss_drift']['windows']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


async def soak(ns: argparse.Namespace, base_url: str, pid: int | None) -> dict:
    records: list[Record] = []
    samples: list[Sample] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    samp = asyncio.create_task(sampler(base_url, pid, t0, ns.sample_interval, samples, stop))
    await asyncio.gather(*[run_client(i, base_url, ns.seed, t0, ns.duration, ns.hang_timeout, records)
                           for i in range(ns.clients)])
    load_seconds = time.monotonic() - t0  # until the last in-flight request ended

    notes: list[str] = []
    have = {g for s in samples for g in s.gauges if g in GAUGES}
    moved = {g for s in samples for g, v in s.gauges.items() if g in GAUGES and v > 0}
    if {"steer_running_rows", "steer_queued_requests"} <= have:
        gauges = ["steer_running_rows", "steer_queued_requests"]
        if "steer_running_rows" not in moved:
            gauges.append("steer_batch_size")
            notes.append("steer_running_rows never rose above 0 during the run: the gauge looks unwired, so the "
                         "slot check also requires steer_batch_size == 0")
    else:
        gauges = ["steer_batch_size"]
        notes.append("the server has no steer_running_rows/steer_queued_requests gauges: the slot check uses "
                     "steer_batch_size (rows in the batch after the last engine step)")
    freed, waited, last = await drain_check(base_url, gauges, ns.drain_timeout)
    probe_error = await probe(base_url)
    stop.set()
    await samp
    async with httpx.AsyncClient(base_url=base_url) as client:
        final_metrics = await get_metrics(client) or {}

    by_kind = summarise(records)
    totals = {k: sum(r[k] for r in by_kind) for k in ("requests", "completed", "cancelled", "rejected", "hung",
                                                      "unexpected", "n429", "n5xx")}
    totals["errors"] = sum(r.outcome == "error" for r in records)  # 5xx and error events inside 200 streams
    hung = [r for r in records if r.outcome == "hung"]
    totals["hung_stalled"] = sum(r.last_data is None or ns.hang_timeout - r.last_data >= STALL for r in hung)
    totals["hung_still_streaming"] = len(hung) - totals["hung_stalled"]
    server_5xx = final_metrics.get("server_5xx")
    dr = drift(samples, ns.duration)
    tokens = sum(r.tokens for r in records if r.outcome == "completed")
    chunks = sum(r.chunks for r in records)
    criteria = [
        {"name": "5xx / error events (client side)", "value": totals["errors"], "pass": totals["errors"] == 0},
        {"name": "5xx counted by the server (steer_requests_total)", "value": server_5xx,
         "pass": server_5xx is None or server_5xx == 0},
        {"name": f"hung requests (> {ns.hang_timeout:g} s)", "value": f"{totals['hung']} ({totals['hung_stalled']} "
         f"stalled, {totals['hung_still_streaming']} still streaming, i.e. slow)", "pass": totals["hung"] == 0},
        {"name": "unexpected answers (bad request not a 4xx envelope, valid request refused, broken stream)",
         "value": totals["unexpected"], "pass": totals["unexpected"] == 0},
        {"name": f"slots freed ({' + '.join(gauges)} == 0 within {ns.drain_timeout:g} s)",
         "value": f"{'yes' if freed else 'no'} after {waited:.1f} s: {last}", "pass": freed},
        {"name": "probe request after the soak", "value": probe_error or "ok", "pass": not probe_error},
        {"name": "RSS drift < 5%", "value": "not measured (no pid)" if dr.get("drift") is None else
         f"{100 * dr['drift']:+.2f}% ({dr['early_median_mib']:.0f} -> {dr['late_median_mib']:.0f} MiB)",
         "pass": None if dr.get("drift") is None else dr["drift"] < 0.05},
    ]
    if totals["n429"]:
        notes.append(f"{totals['n429']} requests got 429 (queue cap)")
    return {
        "command": "python bench/soak.py " + " ".join(ns.argv),
        "settings": {k: getattr(ns, k) for k in ("clients", "duration", "seed", "hang_timeout", "drain_timeout",
                                                 "sample_interval", "serve_arg", "base_url")}
                    | {"kinds": KINDS, "bad_kinds": BAD_KINDS, "slot_gauges": gauges},
        "load_seconds": load_seconds,
        "tokens_per_s": tokens / load_seconds,
        "completion_tokens": tokens,
        "streamed_chunks_per_s": chunks / load_seconds,
        "totals": totals,
        "by_kind": by_kind,
        "server_5xx": server_5xx,
        "slots": {"gauges": gauges, "freed": freed, "waited_s": waited, "last": last},
        "probe_error": probe_error,
        "rss_drift": dr,
        "criteria": criteria,
        "notes": notes,
        "problems": [{k: v for k, v in asdict(r).items() if k != "began"} for r in records
                     if r.outcome in ("hung", "error", "unexpected")],
        "samples": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"),
                    help="result JSON; the plot goes beside it as <stem>_rss.png")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra flags for steer serve, shell-split, repeatable: --serve-arg '--max-batch-size 32'")
    ap.add_argument("--base-url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="with --base-url: the server's pid, for RSS")
    ap.add_argument("--hang-timeout", type=float, default=120, help="a request not done by then is hung")
    ap.add_argument("--drain-timeout", type=float, default=10, help="seconds for the gauges to reach 0 at the end")
    ap.add_argument("--sample-interval", type=float, default=5)
    ap.add_argument("--server-log", default=str(Path(tempfile.gettempdir()) / "steer-soak-server.log"),
                    help="the started server's stdout+stderr")
    ns = ap.parse_args(argv)
    ns.argv = list(argv if argv is not None else sys.argv[1:])
    if ns.pid is not None and ns.base_url is None:
        ap.error("--pid needs --base-url")

    proc = log = None
    if ns.base_url:
        base_url, pid = ns.base_url.rstrip("/"), ns.pid
    else:
        port = free_port()
        extra = [a for s in ns.serve_arg for a in shlex.split(s)]
        cmd = [str(ROOT / ".venv" / "bin" / "steer"), "serve", "--port", str(port), *extra]
        log = open(ns.server_log, "w")  # noqa: SIM115 - lives with the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(proc, port, timeout=600, what=" ".join(cmd))
        except RuntimeError as e:
            raise SystemExit(f"soak: error: {e} (its log: {ns.server_log})") from None
        base_url, pid = f"http://127.0.0.1:{port}", proc.pid
        print(f"soak: server up ({' '.join(cmd)}), log {ns.server_log}", flush=True)
    print(f"soak: {ns.clients} clients for {ns.duration:g} s against {base_url}", flush=True)
    try:
        result = asyncio.run(soak(ns, base_url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    if proc is not None:
        text = Path(ns.server_log).read_text(errors="replace")
        result["server_log"] = {"path": ns.server_log, "tracebacks": text.count("Traceback (most recent call last)"),
                                "error_lines": [ln for ln in text.splitlines() if ln.startswith(("ERROR", "CRITICAL"))][:50],
                                "exit_code": proc.returncode}
        if result["server_log"]["tracebacks"] or result["server_log"]["error_lines"]:
            result["notes"].append(f"server log has {result['server_log']['tracebacks']} traceback(s) and "
                                   f"{len(result['server_log']['error_lines'])} ERROR line(s): {ns.server_log}")
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_name(out.stem + "_rss.png")
    plot([Sample(**s) for s in result["samples"]], result["rss_drift"], png,
         f"soak: {ns.clients} clients, {ns.duration:g} s", ns.duration)
    print(markdown(result))
    print(f"wrote {out} and {png}")
    failed = [c["name"] for c in result["criteria"] if c["pass"] is False]
    for name in failed:
        print(f"FAIL: {name}", file=sys.stderr)
    for p in result["problems"][:10]:
        print(f"  {p['kind']} client {p['client']} at {p['start']:.1f} s: {p['outcome']} {p['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
