"""The reference a server must beat: a plain transformers forward loop, no server, no engine.

The demo model loaded the default way (``from_pretrained(dtype=...)``, SDPA attention, plain weights),
B copies of the chat prompt prefilled at once, then T greedy decode steps of
``model(input_ids=next, past_key_values=cache)`` + argmax. Prints one JSON line: decode tok/s (B rows
per median step) and the prefill time. ``bench/servers.py --servers ...,bare`` runs it beside the
servers, in its own process, in the same run.

    .venv/bin/python bench/bare_loop.py --rows 8 --tokens 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from steer.demo import ensure_demo_model

PROMPT = "Write a Python function that checks whether a string is a palindrome."


def run(rows: int, tokens: int, dtype: str) -> dict:
    path = ensure_demo_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    ids = torch.tensor([list(ids["input_ids"] if isinstance(ids, dict) else ids)] * rows)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - t0
        nxt, steps = out.logits[:, -1:].argmax(-1), []
        for _ in range(tokens):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
    step = statistics.median(steps)
    return {"rows": rows, "dtype": dtype, "prefill_s": prefill, "decode_step_ms": step * 1000,
            "tok_per_s": rows / step}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ns = ap.parse_args(argv)
    print(json.dumps(run(ns.rows, ns.tokens, ns.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
