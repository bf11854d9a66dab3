"""Two-sided steering, measured before it is built: lower refusal on rows the gate judges benign with
confidence (issue 11 item 3), and what that would unlock.

The shipped gated vector (``vectors/refusal.json``) adds ``+strength * coefficient * r`` on rows whose
gate score is above its threshold. Here rows whose score is below a second, lower threshold ``t_lo`` get
``-c_b * coefficient * r`` instead (the refusal direction subtracted at the same layer); rows between the
two thresholds stay vanilla. Greedy answers through the serving engine, refusal-phrase judge.

* ``t_lo``: below every harmful prompt the gate was fitted or tuned on (the gate's fit sets and the dev
  HarmBench split), minus ``--margin`` (in probe-logit units): no known harmful prompt is below it.
* ``c_b``: each value of ``--grid``, reported on the dev benign prompts (40 HumanEval instructions, 20
  hard negatives) and on the held-out sets (no choice is made here).
* held out (never used above): aplomb's 50 benign prompts (over-refusal), the 160 HarmBench test
  prompts and the unused Do-Not-Answer / tense prompts (what falls below ``t_lo`` would be unlocked:
  answered with refusal pushed down).

    .venv/bin/python bench/two_sided.py [--grid 0.33,0.67,1] [--margin 0.5] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steer import data
from steer.calibrate import GATE_POSITION, generate_texts, splits
from steer.demo import ensure_demo_model
from steer.extract import residuals
from steer.hooks import Gate
from steer.judge import is_refusal
from steer.models import load_model
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
FIT_HARMFUL = ("fit_harmful", "gate_donotanswer", "gate_past_tense", "gate_future_tense", "dev_harmful")
DEV_BENIGN = ("dev_code", "dev_hard_negatives")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="0.33,0.67,1")
    ap.add_argument("--margin", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--unused", type=int, default=100, help="unused Do-Not-Answer / tense prompts per source")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "two_sided.json"))
    ns = ap.parse_args(argv)
    vec = SafetyVector.load(ROOT / "vectors" / "refusal.json")
    gate = Gate.of(vec)
    model, tok = load_model(ensure_demo_model())
    sp = splits()
    held = {"aplomb": sp["test_benign"], "harmbench_test": sp["test_harmful"]}
    for name, n_fit in (("donotanswer", 200), ("past_tense", 100), ("future_tense", 100)):
        held[f"{name}_unused"] = data.load(name).split(n_first=n_fit, seed=0)[1].take(ns.unused)
    sets = {**{k: sp[k] for k in FIT_HARMFUL + DEV_BENIGN}, **held}
    scores = {}
    for k, s in sets.items():
        r = residuals(model, tok, s.prompts, (GATE_POSITION,), desc=k)[:, 0, gate.layer]
        scores[k] = gate.scores(r)
    t_lo = min(float(scores[k].min()) for k in FIT_HARMFUL) - ns.margin
    print(f"gate threshold {gate.threshold:.3f}; t_lo {t_lo:.3f}", flush=True)
    below = {k: [i for i, x in enumerate(scores[k].tolist()) if x < t_lo] for k in sets}
    ungated = SafetyVector(vec.name, "activation", vec.model,
                           {k: v for k, v in vec.tensors.items() if not k.startswith("gate.")},
                           {k: v for k, v in vec.config.items() if k != "gate"}, {})

    def answers(key: str, idx: list[int], strength: float) -> list[str]:
        prompts = [sets[key].prompts[i] for i in idx]
        if not prompts:
            return []
        v = ungated if strength else None
        return generate_texts(model, tok, v, prompts, strength=strength, max_tokens=ns.max_tokens,
                              desc=f"{key} @{strength:g}")[0]

    grid = [float(x) for x in ns.grid.split(",")]
    result = {"command": "python bench/two_sided.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "gate_threshold": gate.threshold, "t_lo": t_lo, "margin": ns.margin,
              "sets": {k: s.describe() for k, s in sets.items()},
              "below_t_lo": {k: {"n": len(sets[k].prompts), "below": len(v)} for k, v in below.items()},
              "above_threshold": {k: int((scores[k] > gate.threshold).sum()) for k in sets}, "rows": []}
    # dev: benign prompts below t_lo, vanilla and at each -c_b
    for key in DEV_BENIGN + ("aplomb",) + tuple(k for k in held if k != "aplomb"):
        idx = below[key]
        base = answers(key, idx, 0.0)
        row = {"set": key, "n": len(sets[key].prompts), "below_t_lo": len(idx),
               "vanilla_refused_below": sum(map(is_refusal, base)), "at": {}}
        for c in grid:
            texts = answers(key, idx, -c)
            row["at"][str(c)] = {"refused_below": sum(map(is_refusal, texts)),
                                 "examples": [{"prompt": sets[key].prompts[i][:200], "vanilla": b[:200], "steered": t[:200]}
                                              for i, b, t in list(zip(idx, base, texts, strict=True))[:6]]}
        if key == "aplomb":  # the whole set's over-refusal: rows above t_lo keep their vanilla answers
            rest = sorted(set(range(len(sets[key].prompts))) - set(idx))
            kept = sum(map(is_refusal, answers(key, rest, 0.0)))
            row["over_refusal"] = {"vanilla": (kept + row["vanilla_refused_below"]) / row["n"],
                                   **{c: (kept + x["refused_below"]) / row["n"] for c, x in row["at"].items()}}
        result["rows"].append(row)
        print(json.dumps({k: v if k != "at" else {c: x["refused_below"] for c, x in v.items()} for k, v in row.items()}),
              flush=True)
        Path(ns.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
