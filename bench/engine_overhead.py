"""Steering overhead inside the engine, without HTTP or a client competing for the 2 cores.

Runs the serving engine in-process on the demo model: C rows decoded together for T tokens
(``ignore_eos``), in three modes, interleaved and repeated: ``vanilla`` (no hooks installed), ``off``
(shipped vector installed, every row at strength 0) and ``k-strengths`` (C distinct strengths). The
paired ratio (each repeat's modes ran back to back) cancels the machine's slow drift.

    .venv/bin/python bench/engine_overhead.py [--rows 8] [--tokens 64] [--repeats 5] [--vector V.json]

``--vector`` installs another activation vector than the shipped one (e.g. a multi-layer gate, whose
prefill runs in more phases). ``--sampling JSON`` adds a mode ``vanilla+sampling``: the vanilla rows with
these ``SamplingParams`` fields too (e.g. ``'{"logprobs": 5, "frequency_penalty": 0.5}'``; ``logit_bias``
as a list of [id, bias] pairs), so the cost of logprobs, penalties and biases reads as its paired ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import interleaved

from steer import serving
from steer.calibrate import splits
from steer.demo import ensure_demo_model
from steer.engine import Engine, Sequence
from steer.extract import chat_prompt_ids
from steer.types import SamplingParams
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]


def run(model, tok, runtime, prompts, strengths, tokens: int, vector: str = "refusal", sampling: dict | None = None
        ) -> float:
    """Tokens per second for one batch decoded to completion."""
    eng = Engine(model, tok, runtime, max_batch_size=len(prompts))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, **(sampling or {}))
    for p, s in zip(prompts, strengths, strict=True):
        eng.add(Sequence(chat_prompt_ids(tok, p), params, vector, s))
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step()
    return len(prompts) * tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "refusal.json"))
    ap.add_argument("--sampling", type=json.loads, default=None, metavar="JSON",
                    help="SamplingParams fields of an added mode vanilla+sampling")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_overhead.json"))
    ns = ap.parse_args(argv)
    sampling = dict(ns.sampling or {})
    if "logit_bias" in sampling:
        sampling["logit_bias"] = tuple((int(t), float(b)) for t, b in sampling["logit_bias"])
    torch.set_num_threads(2)
    vec = SafetyVector.load(ns.vector)
    served = serving.build(ensure_demo_model(), [vec])
    model, tok, rt = served.model, served.tokenizer, served.runtime  # as steer serve runs it
    sp = splits()
    # half harmful (the gate opens, steering is applied), half benign
    prompts = [*sp["dev_harmful"].prompts[: ns.rows // 2], *sp["dev_hard_negatives"].prompts[: ns.rows - ns.rows // 2]]
    k_name = f"{ns.rows}-strengths"
    modes = {"vanilla": (None, [0.0] * ns.rows, None), "off": (rt, [0.0] * ns.rows, None),
             k_name: (rt, [round(0.25 * (i + 1), 2) for i in range(ns.rows)], None)}
    if sampling:
        modes["vanilla+sampling"] = (None, [0.0] * ns.rows, sampling)
    results: dict[str, list[float]] = {m: [] for m in modes}
    run(model, tok, None, prompts, [0.0] * ns.rows, 4)  # warm-up
    for name in interleaved(list(modes), ns.repeats):
        runtime, strengths, extra = modes[name]
        with runtime if runtime is not None else torch.inference_mode():
            results[name].append(run(model, tok, runtime, prompts, strengths, ns.tokens, vec.name, extra))
        print(f"  {name}: {results[name][-1]:.1f} tok/s", flush=True)
    paired = {m: statistics.median(a / b for a, b in zip(results[m], results["vanilla"], strict=True))
              for m in modes}
    summary = {"command": "python bench/engine_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "vector": vec.name, "gate": vec.config.get("gate"), "sampling": ns.sampling, "rows": ns.rows, "tokens": ns.tokens, "repeats": ns.repeats,
               "median_tok_per_s": {m: statistics.median(v) for m, v in results.items()},
               "paired_ratio_to_vanilla": paired, "runs": results}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(summary, indent=1) + "\n")
    print("| mode | median tok/s | paired ratio to vanilla |\n|---|---|---|")
    for m in modes:
        print(f"| {m} | {summary['median_tok_per_s'][m]:.1f} | {paired[m]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
