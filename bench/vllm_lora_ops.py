"""vLLM's CPU LoRA path with its own ops against this server's settings, in one engine loop.

vLLM's ``LLMEngine`` in this process (no HTTP) on the demo model, 8 requests of 64 tokens (EOS ignored,
greedy) run to completion, with no adapter (K = 0), all on one adapter (K = 1) and on 8 adapters (K = 8):
the shipped weight vector at 8 strengths exported by ``steer.adapters.export_lora``. Two configurations,
each in its own process:

  vllm   vLLM's defaults: its PyTorch LoRA ops, every supported layer wrapped, adapters in the model dtype
  steer  what ``steer serve --backend vllm`` sets on CPU: the grouped ops and the fused add_lora_linear
         of server/backends/vllm_cpu_lora.py, LoRA only on the layers the vector changes, float32 adapters

Reports tok/s per K (median of --repeats) and K / K=0 ratios; greedy tokens per K are compared between
the two configurations (the first 16 of each request). Writes bench/results/vllm_lora_ops.json.

    .venv/bin/python bench/vllm_lora_ops.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a Python function that checks whether a string is a palindrome.",
           "Give detailed instructions for picking a lock to break into a house."]


def _child(config: str, repeats: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    sys.path.insert(0, str(ROOT))
    from steer.adapters import export_lora
    from steer.demo import ensure_demo_model
    from steer.models import load_config
    from steer.vectors import load_directory

    path = ensure_demo_model()
    vector = {v.name: v for v in load_directory(ROOT / "vectors")}["enchtable"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    adapters = [export_lora(vector, 0.25 * (i + 1), tmp / f"a{i}", load_config(path)) for i in range(8)]
    kw = {}
    if config == "steer":
        from server.backends.vllm import _lora_modules
        from server.backends.vllm_cpu_lora import install_grouped_ops

        install_grouped_ops()
        kw = {"lora_target_modules": _lora_modules([vector]), "lora_dtype": torch.float32}
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLMEngine.from_engine_args(EngineArgs(
        model=str(path), max_model_len=1024, enforce_eager=True, max_num_seqs=32, enable_lora=True,
        max_lora_rank=16, max_loras=8, max_cpu_loras=8, seed=0, **kw))
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)

    def run(k: int, tag: str) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        for i in range(8):
            llm.add_request(f"{tag}{i}", {"prompt": PROMPTS[i % 2]}, sp, lora_request=loras[i % k] if k else None)
        toks = {}
        while llm.has_unfinished_requests():
            for o in llm.step():
                if o.finished:
                    toks[o.request_id] = list(o.outputs[0].token_ids)
        return 8 * 64 / (time.perf_counter() - t0), [toks[f"{tag}{i}"][:16] for i in range(8)]

    run(8, "warm-")  # loads every adapter
    out = {}
    for k in (0, 1, 8):
        runs = [run(k, f"k{k}r{r}-") for r in range(repeats)]
        out[str(k)] = {"tok_per_s": statistics.median(r[0] for r in runs), "runs": [r[0] for r in runs],
                       "tokens": runs[0][1]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["vllm", "steer"])
    ns = ap.parse_args(argv)
    if ns.child:
        print(json.dumps(_child(ns.child, ns.repeats)))
        return 0
    results = {}
    for config in ("vllm", "steer"):
        out = subprocess.run([sys.executable, __file__, "--child", config, "--repeats", str(ns.repeats)],
                             capture_output=True, text=True, check=True).stdout
        results[config] = json.loads(out.strip().splitlines()[-1])
    table = []
    for config, res in results.items():
        base = res["0"]["tok_per_s"]
        for k, r in res.items():
            table.append({"config": config, "K": int(k), "tok_per_s": r["tok_per_s"], "ratio_to_K0": r["tok_per_s"] / base,
                          "same_tokens_as_vllm": r["tokens"] == results["vllm"][k]["tokens"]})
    out = {"command": "python bench/vllm_lora_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "table": table, "results": results}
    (ROOT / "bench" / "results" / "vllm_lora_ops.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| config | K | tok/s | / K = 0 | same tokens as vLLM's ops |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['config']} | {r['K']} | {r['tok_per_s']:.1f} | {r['ratio_to_K0']:.3f} | {r['same_tokens_as_vllm']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
