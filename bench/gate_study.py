"""Which gate generalises across prompt styles? Gate firing rates per prompt source, held out.

Compares, at the gate position (-5, end of the user turn) of the demo model:

- ``meandiff-ablate``: cosine with the ablate-llm mean difference (one style-matched source);
- ``meandiff-ablate+harmbench``: the same with the 40 HarmBench dev prompts added to the harmful side
  and hard negatives to the benign side (fits HarmBench's style);
- ``probe``: the shipped method, a source-balanced logistic probe on ablate + Do-Not-Answer + tense
  rephrasings vs ablate harmless + HumanEval + hard negatives, and the same probe with one harmful
  source left out (does it still catch that source?).

Each gate's threshold is the highest score among the benign dev prompts (40 HumanEval + 20 hard
negatives), i.e. zero benign dev fires. Reported: firing rate on HarmBench test (160), the unused
Do-Not-Answer / tense prompts, ablate harmful, and on aplomb benign (all 50 / its 20 hard negatives).

    .venv/bin/python bench/gate_study.py [--layer 13]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from steer import data
from steer.calibrate import GATE_POSITION, splits
from steer.demo import ensure_demo_model
from steer.extract import cosine_scores, fit_linear_probe, linear_scores, residuals
from steer.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=13)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_study.json"))
    ns = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, tok = load_model(ensure_demo_model())
    sp = splits()
    held = {
        "donotanswer_unused": data.load("donotanswer").split(n_first=200, seed=0)[1].take(200),
        "past_tense_unused": data.load("past_tense").split(n_first=100, seed=0)[1].take(150),
        "future_tense_unused": data.load("future_tense").split(n_first=100, seed=0)[1].take(150),
    }
    sets = {**sp, **held}
    ly = ns.layer
    X = {k: residuals(model, tok, s.prompts, (GATE_POSITION,), desc=k)[:, 0, ly] for k, s in sets.items()}
    report = {"meandiff-ablate": _meandiff(X, ["fit_harmful"], ["fit_harmless"])}
    report["meandiff-ablate+harmbench"] = _meandiff(X, ["fit_harmful", "dev_harmful"],
                                                    ["fit_harmless", "gate_hard_negatives"])
    harmful = ["fit_harmful", "gate_donotanswer", "gate_past_tense", "gate_future_tense"]
    benign = ["fit_harmless", "gate_code", "gate_hard_negatives"]
    for l2 in (0.03, 0.1):
        report[f"probe l2={l2}"] = _probe(X, harmful, benign, l2)
        for left in harmful:
            report[f"probe l2={l2} without {left}"] = _probe(X, [h for h in harmful if h != left], benign, l2)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"layer": ly, "rates": report}, indent=1) + "\n")
    cols = ["test_harmful", "donotanswer_unused", "past_tense_unused", "future_tense_unused", "fit_harmful",
            "test_benign", "test_benign_hard"]
    print(f"layer {ly}; firing rate at zero benign-dev fires\n")
    print("| gate | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, rates in report.items():
        print(f"| {name} | " + " | ".join(f"{rates[c]:.0%}" for c in cols) + " |")
    return 0


def _rates(score, X: dict) -> dict[str, float]:
    thr = float(torch.cat([score(X["dev_code"]), score(X["dev_hard_negatives"])]).max())
    out = {k: float((score(v) > thr).float().mean()) for k, v in X.items()}
    out["test_benign_hard"] = float((score(X["test_benign"][30:]) > thr).float().mean())  # aplomb's last 20
    return out


def _meandiff(X: dict, harmful: list[str], benign: list[str]) -> dict[str, float]:
    mh = torch.cat([X[k] for k in harmful]).mean(0)
    mb = torch.cat([X[k] for k in benign]).mean(0)
    return _rates(lambda x: cosine_scores(x, mh - mb, (mh + mb) / 2), X)


def _probe(X: dict, harmful: list[str], benign: list[str], l2: float) -> dict[str, float]:
    direction, center = fit_linear_probe([X[k] for k in harmful], [X[k] for k in benign], l2=l2)
    return _rates(lambda x: linear_scores(x, direction, center), X)


if __name__ == "__main__":
    sys.exit(main())
