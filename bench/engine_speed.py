"""Where the embedded engine's speed comes from: each CPU choice switched off in turn, one run.

Engine only (no HTTP), demo model, R rows of the same chat prompt, T tokens each with EOS ignored,
greedy. Configurations (attention x linear weights x thread), interleaved per repeat, medians:
  sdpa + plain          transformers' SDPA attention, torch's default weight layout
  steer_cpu + plain     steer/attention.py: grouped matmul-softmax for single-token decode
  sdpa + packed         linear weights pre-packed for oneDNN (steer/packed.py)
  steer_cpu + packed    what `steer serve` runs
  ... second thread     the served configuration stepped from a second thread after the main thread
                        has run parallel torch ops (what the server did before all torch work moved
                        to the engine thread)
Writes bench/results/engine_speed.json.

    .venv/bin/python bench/engine_speed.py [--rows 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from steer.attention import ATTENTION
from steer.demo import ensure_demo_model
from steer.engine import Engine, Sequence
from steer.extract import chat_prompt_ids
from steer.models import load_model
from steer.packed import pack_linears
from steer.types import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a Python function that checks whether a string is a palindrome."


def _run(model, tok, rows: int, tokens: int) -> dict:
    """One batch through a fresh engine: prefill seconds and the median decode step."""
    engine = Engine(model, tok, max_batch_size=rows)
    ids = chat_prompt_ids(tok, PROMPT)
    for _ in range(rows):
        engine.add(Sequence(list(ids), SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)))
    t0 = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - t0
    steps = []
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    step = statistics.median(steps)
    return {"prefill_s": prefill, "decode_step_ms": step * 1000, "decode_tok_per_s": rows / step}


def _in_thread(fn, *args) -> dict:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(fn(*args)))
    t.start()
    t.join()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_speed.json"))
    ns = ap.parse_args(argv)
    plain, tok = load_model(ensure_demo_model())
    packed, _ = load_model(ensure_demo_model())
    pack_linears(packed)
    configs = {
        "sdpa + plain": (plain, "sdpa", False), "steer_cpu + plain": (plain, ATTENTION, False),
        "sdpa + packed": (packed, "sdpa", False), "steer_cpu + packed (served)": (packed, ATTENTION, False),
        "steer_cpu + packed, second thread": (packed, ATTENTION, True),
    }
    with torch.inference_mode():
        _run(packed, tok, ns.rows, 4)  # warm-up in the main thread: its OpenMP team now exists
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    names = list(configs)
    for rep in range(ns.repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            model, attn, threaded = configs[name]
            model.set_attn_implementation(attn)
            r = _in_thread(_run, model, tok, ns.rows, ns.tokens) if threaded else _run(model, tok, ns.rows, ns.tokens)
            runs[name].append(r)
            print(f"  {name}: {r['decode_step_ms']:.1f} ms/step, prefill {r['prefill_s']:.2f} s", flush=True)
    base = runs["sdpa + plain"]
    summary = [{"config": c, **{k: statistics.median(r[k] for r in rs) for k in rs[0]},
                "speedup_vs_sdpa_plain": statistics.median(b["decode_step_ms"] / r["decode_step_ms"]
                                                           for r, b in zip(rs, base, strict=True))}
               for c, rs in runs.items()]
    out = {"command": "python bench/engine_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": ns.rows, "tokens": ns.tokens, "repeats": ns.repeats, "summary": summary, "runs": runs}
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| configuration | decode ms/step | decode tok/s | prefill s | decode speed-up vs sdpa + plain (paired) |")
    print("|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['config']} | {r['decode_step_ms']:.1f} | {r['decode_tok_per_s']:.0f} | {r['prefill_s']:.2f} "
              f"| {r['speedup_vs_sdpa_plain']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
