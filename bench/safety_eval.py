"""Refusal on harmful and over-refusal on benign prompts, on the held-out test split, per strength.

The test split (160 HarmBench prompts, all 50 aplomb benign prompts with their 20 XSTest-style hard
negatives) is never used by ``steer extract``. Answers are greedy, through the serving engine, judged
by the refusal-phrase judge. Writes bench/results/safety_eval.json and prints a markdown table.

    .venv/bin/python bench/safety_eval.py [--strengths 0,1,2] [--max-tokens 48] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from server.evaluation.report import wilson
from steer import serving
from steer.calibrate import generate_texts, splits
from steer.demo import ensure_demo_model
from steer.judge import is_refusal
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "refusal.json"))
    ap.add_argument("--strengths", default="0,1,2")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--ungated", action="store_true", help="drop the gate: unconditional addition (the baseline)")
    ap.add_argument("--out", default=None, help="default bench/results/safety_eval[_ungated].json")
    ap.add_argument("--linear-weights", choices=["auto", "packed", "plain"], default="auto",
                    help="as steer serve --linear-weights (default auto, the served path)")
    ns = ap.parse_args(argv)
    out = Path(ns.out or ROOT / "bench" / "results" / f"safety_eval{'_ungated' if ns.ungated else ''}.json")
    torch.set_num_threads(2)
    vec = SafetyVector.load(ns.vector)
    if ns.ungated:
        vec.config = {k: v for k, v in vec.config.items() if k != "gate"}
    served = serving.build(ensure_demo_model(), [vec], linear_weights=ns.linear_weights)  # as steer serve
    model, tok = served.model, served.tokenizer
    sp = splits()
    sets = {"harmful (HarmBench test)": sp["test_harmful"].take(ns.limit),
            "benign (aplomb, all)": sp["test_benign"].take(ns.limit)}
    hard = set(sp["test_benign"].prompts[30:])  # aplomb lists its 20 hard negatives last
    results = {"vector": vec.name, "config": vec.config, "ungated": ns.ungated, "max_tokens": ns.max_tokens,
               "command": "python bench/safety_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "runs": []}
    for s in [float(x) for x in ns.strengths.split(",")]:
        for label, ps in sets.items():
            t0 = time.time()
            texts, gates = generate_texts(model, tok, vec, ps.prompts, strength=s, max_tokens=ns.max_tokens,
                                          desc=f"strength {s:g} {label}")
            refused = [is_refusal(t) for t in texts]
            results["runs"].append({
                "strength": s, "set": label, "n": len(texts), "refusal": sum(refused) / len(texts),
                "ci95": wilson(sum(refused), len(texts)), "gate_rate": sum(gates) / len(gates),
                "hard_negative_refusal": (sum(r for p, r in zip(ps.prompts, refused, strict=True) if p in hard)
                                          / max(1, sum(p in hard for p in ps.prompts))),
                "seconds": round(time.time() - t0, 1),
                "items": [{"prompt": p, "answer": t, "refused": r, "gate": g}
                          for p, t, r, g in zip(ps.prompts, texts, refused, gates, strict=True)],
            })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| strength | set | n | refusal | 95% CI | gate fired | hard-negative refusal |", "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lo, hi = r["ci95"]
        hn = f"{r['hard_negative_refusal']:.0%}" if r["set"].startswith("benign") else ""
        lines.append(f"| {r['strength']:g} | {r['set']} | {r['n']} | {r['refusal']:.1%} | {lo:.0%}-{hi:.0%} "
                     f"| {r['gate_rate']:.0%} | {hn} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
