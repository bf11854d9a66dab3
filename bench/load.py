"""Load at 1, 8 and 32 concurrent clients: steering off vs K distinct strengths, compare mode, latency
percentiles and the servers' peak memory, all in one run.

Two real ``steer serve`` processes stay up for the whole run: ``vanilla`` (no vectors, no hooks) and
the default server (shipped vectors). Per concurrency C the modes are: vanilla; off (strength 0);
K = 1, 8, 32 distinct strengths (K <= C); and, at C = 8, compare (every request also generates its
baseline). Modes are interleaved per repeat. Peak RSS is each server's VmHWM after the run.
``--aa`` makes the "vanilla" server a second, identical steering server: an A/A control for the bias
between two server processes.

    .venv/bin/python bench/load.py [--tokens 64] [--repeats 2] [--concurrency 1,8,32] [--aa]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import interleaved
from openai import AsyncOpenAI
from throughput import PROMPTS, start_server

ROOT = Path(__file__).resolve().parents[1]


async def _one(client: AsyncOpenAI, prompt: str, safety: dict | None, tokens: int, model: str,
               body: dict | None) -> tuple[int, float, float]:
    """One streamed request; ``safety`` None sends no safety field (for servers without it); ``body``
    replaces the default extra fields ({"ignore_eos": true}) for servers that have no ignore_eos."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    extra = dict({"ignore_eos": True} if body is None else body, **({"safety": safety} if safety is not None else {}))
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body=extra,
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return n, ttft or 0.0, time.perf_counter() - t0


async def _load(port: int, safeties: list[dict | None], tokens: int, *, model: str = "qwen2.5-coder-0.5b-instruct",
                body: dict | None = None) -> dict:
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=900) as client:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[_one(client, PROMPTS[i % len(PROMPTS)], s, tokens, model, body)
                                      for i, s in enumerate(safeties)])
        wall = time.perf_counter() - t0
    lat = sorted(x[2] for x in outs)
    return {"tok_per_s": sum(x[0] for x in outs) / wall, "ttft_p50": statistics.median(x[1] for x in outs),
            "latency_p50": statistics.median(lat), "latency_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def _modes(c: int, port: int, vanilla_port: int) -> dict[str, tuple[int, list[dict]]]:
    modes = {"vanilla": (vanilla_port, [{"strength": 0.0}] * c), "off": (port, [{"strength": 0.0}] * c)}
    for k in (1, 8, 32):
        if k <= c:
            strengths = [round(2.0 * (i % k + 1) / k, 3) for i in range(c)]  # k distinct values in (0, 2]
            modes[f"K={k}"] = (port, [{"strength": s} for s in strengths])
    if c == 8:
        modes["compare"] = (port, [{"strength": 1.0, "compare": True}] * c)
    return modes


def _rss_mib(pid: int, field: str = "VmHWM") -> float:
    """VmHWM (peak, including the transient while weights are packed at load) or VmRSS (now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--port", type=int, default=8133)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    ap.add_argument("--aa", action="store_true",
                    help="A/A control: the 'vanilla' server is a second, identical steering server, so every "
                         "ratio measures the bias between two server processes, not steering")
    ns = ap.parse_args(argv)
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as empty:
        steer_srv = start_server(ns.port, ["--max-batch-size", "32"])
        vanilla_args = ["--max-batch-size", "32"] if ns.aa else ["--vectors", empty, "--default-strength", "0",
                                                                  "--max-batch-size", "32"]
        vanilla_srv = start_server(ns.port + 1, vanilla_args)
        try:
            for c in (int(x) for x in ns.concurrency.split(",")):
                modes = _modes(c, ns.port, ns.port + 1)
                res = results[str(c)] = {m: [] for m in modes}
                for name in interleaved(list(modes), ns.repeats):
                    port, safeties = modes[name]
                    res[name].append(asyncio.run(_load(port, safeties, ns.tokens)))
                    print(f"  C={c} {name}: {res[name][-1]['tok_per_s']:.1f} tok/s", flush=True)
            rss = {"steer": _rss_mib(steer_srv.pid), "vanilla": _rss_mib(vanilla_srv.pid)}
            rss_end = {"steer": _rss_mib(steer_srv.pid, "VmRSS"), "vanilla": _rss_mib(vanilla_srv.pid, "VmRSS")}
        finally:
            for srv in (steer_srv, vanilla_srv):
                srv.terminate()
                srv.wait()
    table = _summarise(results)
    out = {"command": "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "tokens": ns.tokens, "repeats": ns.repeats, "peak_rss_mib": rss, "rss_at_end_mib": rss_end, "summary": table, "runs": results}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| clients | mode | tok/s | ratio to vanilla (paired) | TTFT p50 s | latency p50 s | latency p99 s |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print("| {clients} | {mode} | {tok_per_s:.1f} | {ratio:.3f} | {ttft_p50:.2f} | {latency_p50:.2f} | "
              "{latency_p99:.2f} |".format(**row))
    print(f"peak RSS MiB: steering server {rss['steer']:.0f}, vanilla server {rss['vanilla']:.0f}; at the end: "
          f"{rss_end['steer']:.0f} and {rss_end['vanilla']:.0f}")
    return 0


def _summarise(results: dict) -> list[dict]:
    rows = []
    for c, modes in results.items():
        for mode, runs in modes.items():
            ratio = statistics.median(a["tok_per_s"] / b["tok_per_s"] for a, b in zip(runs, modes["vanilla"], strict=True))
            rows.append({"clients": int(c), "mode": mode, "ratio": ratio,
                         **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    return rows


if __name__ == "__main__":
    sys.exit(main())
