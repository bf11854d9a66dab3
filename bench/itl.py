"""Inter-token latency of running streams while long prompts arrive (chunked prefill, issue 7 item 8).

S streaming clients (default 8) each decode T tokens (EOS ignored, greedy). Once every stream has
produced its first tokens, L long requests arrive one after another (default 2, each a ~2000-token
prompt asking for 8 tokens). Measured per configuration: the gaps between consecutive content chunks
of the S streams (inter-token latency: p50, p99, max) while the long prompts are being prefilled, and
each long request's time to first token. Each configuration is a fresh ``steer serve`` with the given
extra flags; a configuration may also name another checkout (``--before DIR``: e.g. a git worktree of
the code before chunked prefill, run with its own ``steer`` console script from this venv's Python).

    .venv/bin/python bench/itl.py --config "one-shot=--max-step-tokens 100000" \\
        --config "chunked 512=--max-step-tokens 512" --config "chunked 256=--max-step-tokens 256" \\
        [--before /tmp/oldtree] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from _common import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen2.5-coder-0.5b-instruct"
FILLER = ("The quick brown fox jumps over the lazy dog while the old mill turns by the river. ")


def long_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of filler text plus a question (the demo tokenizer: ~18.4 tokens a sentence)."""
    return FILLER * max(1, tokens * 10 // 184) + "\nSummarise the text above in one sentence."


async def stream(client: httpx.AsyncClient, url: str, tokens: int, marks: list[float]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 1000, one per line."}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "safety": {"strength": 1.0}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                marks.append(time.perf_counter())


async def long_request(client: httpx.AsyncClient, url: str, prompt: str) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, "stream": True, "safety": {"strength": 1.0}}
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - t0
    return float("nan")


async def measure(url: str, streams: int, tokens: int, n_long: int, prompt_tokens: int, gap: float) -> dict:
    marks: list[list[float]] = [[] for _ in range(streams)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + n_long + 2)) as client:
        tasks = [asyncio.create_task(stream(client, url, tokens, m)) for m in marks]
        while not all(len(m) >= 3 for m in marks):
            await asyncio.sleep(0.05)
        window_start = time.perf_counter()
        ttfts = []
        for i in range(n_long):
            ttfts.append(await long_request(client, url, long_prompt(prompt_tokens) + f" ({i})"))
            await asyncio.sleep(gap)
        window_end = time.perf_counter()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = sorted(b - a for m in marks for a, b in zip(m, m[1:], strict=False) if window_start <= b <= window_end)
    gaps_all = sorted(b - a for m in marks for a, b in zip(m, m[1:], strict=False))
    return {"itl_p50_s": pick(gaps, 0.5), "itl_p99_s": pick(gaps, 0.99), "itl_max_s": gaps[-1] if gaps else float("nan"),
            "itl_gaps": len(gaps), "itl_p50_all_s": pick(gaps_all, 0.5), "long_ttft_s": ttfts,
            "window_s": window_end - window_start}


def pick(xs: list[float], q: float) -> float:
    """The q-quantile of sorted ``xs`` (nan when empty)."""
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start(port: int, extra: list[str], tree: Path | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *extra]
    env = dict(os.environ)
    if tree is not None:  # another checkout's code, this venv's packages
        env["PYTHONPATH"] = str(tree)
    log = open(Path("/tmp") / f"steer-itl-{port}.log", "w")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree or ROOT)
    return wait_healthy(proc, port, timeout=600, what=" ".join(cmd))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[], help="NAME=EXTRA FLAGS for steer serve (repeatable)")
    ap.add_argument("--before", type=Path, default=None, help="a checkout of the code before (one more config)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=400, help="tokens each running stream asks for")
    ap.add_argument("--long", type=int, default=2, help="long requests arriving while the streams run")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between long requests")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8230)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "itl.json"))
    ns = ap.parse_args(argv)
    configs = [(c.split("=", 1)[0], shlex.split(c.split("=", 1)[1]), None) for c in ns.config]
    if ns.before is not None:
        configs.insert(0, ("before (no chunked prefill)", [], ns.before.resolve()))
    results: dict[str, list[dict]] = {}
    for rep in range(ns.repeats):
        for name, extra, tree in configs:
            proc = start(ns.port, ["--max-batch-size", str(ns.streams + ns.long), *extra], tree)
            try:
                res = asyncio.run(measure(f"http://127.0.0.1:{ns.port}", ns.streams, ns.tokens, ns.long,
                                          ns.prompt_tokens, ns.gap))
            finally:
                proc.terminate()
                proc.wait(60)
            results.setdefault(name, []).append(res)
            print(f"  {name} #{rep}: ITL p99 {res['itl_p99_s']:.2f} s, max {res['itl_max_s']:.2f} s, "
                  f"long TTFT {[round(t, 2) for t in res['long_ttft_s']]}", flush=True)
    summary = {n: {k: statistics.median(r[k] for r in runs) for k in ("itl_p50_s", "itl_p99_s", "itl_max_s",
                                                                       "itl_p50_all_s")}
               | {"long_ttft_s": statistics.median(t for r in runs for t in r["long_ttft_s"])}
               for n, runs in results.items()}
    from steer.hardware import detect

    out = {"command": "python bench/itl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "host": detect().to_dict(), "settings": vars(ns) | {"before": str(ns.before)}, "summary": summary,
           "runs": results}
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| configuration | ITL p50 s (no long prompt) | ITL p50 s | ITL p99 s | ITL max s | long prompt TTFT s |")
    print("|---|---|---|---|---|---|")
    for n, s in summary.items():
        print(f"| {n} | {s['itl_p50_all_s']:.3f} | {s['itl_p50_s']:.3f} | {s['itl_p99_s']:.3f} | {s['itl_max_s']:.3f} "
              f"| {s['long_ttft_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
