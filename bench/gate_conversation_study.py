"""Which gate reads conversations and short messages like plain requests? (gate decisions only)

``bench/gate_conversations.py`` found the shipped gate open on most held-out follow-ups and short messages.
``steer extract --refit-gate --gate-conversations`` at the shipped recipe (layer 13, zero dev benign fires)
then kept only 15% of dev HarmBench. This study fits the candidates from one pass of residuals (the
model in steer extract's dtype), so they can be compared without a refit each:

- the gate's fitting sets, with or without the gate part of the conversation shapes
  (``steer.calibrate.conversation_sets``; assistant turns: this model's greedy answers, 48 tokens);
- layer 13 (the shipped gate's) or layers 9-13 (one probe over the five layers, concatenated);
- the threshold at 0, 5% or 10% of the dev benign prompts (bare, plus the dev part's chat shapes where
  fitted with them) allowed to fire.

Each candidate is read on dev HarmBench, on the held-out (test) part's chat shapes built on aplomb and
HarmBench test requests, and on the first 40 plain aplomb, HarmBench test and Do-Not-Answer prompts.
No text is generated beyond the assistant turns. Writes bench/results/gate_conversation_study.json.

    .venv/bin/python bench/gate_conversation_study.py [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from server.evaluation.suites import load_suites
from steer.calibrate import (
    BENIGN_DEV,
    GATE_BENIGN,
    GATE_HARMFUL,
    GATE_POSITION,
    conversation_sets,
    extract_dtype,
    generate_texts,
    round_robin,
    splits,
)
from steer.demo import ensure_demo_model
from steer.extract import best_threshold, fit_linear_probe, linear_scores, residuals
from steer.models import load_model
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
LAYERS = list(range(9, 14))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--cache", default=None, help="keep the residuals in this .pt file (and read them from it)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_conversation_study.json"))
    ns = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(ensure_demo_model(), dtype=extract_dtype())
    sp = splits()
    sets = {k: v for k, v in sp.items() if not k.startswith("test_")}
    gate_b, dev_b, gate_h = (round_robin(sets, names, 40) for names in (GATE_BENIGN, BENIGN_DEV, GATE_HARMFUL))
    test_b, test_h = list(sp["test_benign"].prompts[:ns.limit]), list(sp["test_harmful"].prompts[:ns.limit])
    texts, _ = generate_texts(model, tok, None, gate_b + dev_b + test_b, strength=0.0, max_tokens=48, desc="answers")
    answers = dict(zip(gate_b + dev_b + test_b, (t.strip() for t in texts), strict=True))
    conv = conversation_sets("gate", gate_b, answers, gate_h, prefix="gate_conv")
    conv |= conversation_sets("dev", dev_b, answers, None, prefix="dev_conv")
    held = conversation_sets("test", test_b, answers, test_h, prefix="test", n=ns.limit)
    plain = {su.name: su.prompts for su in load_suites(("aplomb", "harmbench", "donotanswer"), ns.limit)}
    every = {**{k: v.prompts for k, v in {**sets, **conv, **held}.items()}, **plain}
    cache = Path(ns.cache) if ns.cache else None
    if cache is not None and cache.exists():
        R = torch.load(cache)
    else:
        R = {k: residuals(model, tok, list(p), (GATE_POSITION,), desc=k)[:, 0, LAYERS] for k, p in every.items()}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(R, cache)
    shipped = SafetyVector.load(ROOT / "vectors" / "refusal.json")
    g = shipped.config["gate"]
    sd, sc = shipped.tensors["gate.direction"], shipped.tensors["gate.center"]
    ship_open = {k: linear_scores(R[k][:, LAYERS.index(13)], sd, sc) > g["threshold"] for k in R}
    rows = []
    for with_conv in (False, True):
        harm = GATE_HARMFUL + (("gate_conv_push_harmful", "gate_conv_second_harmful") if with_conv else ())
        ben = GATE_BENIGN + (("gate_conv_chat_benign", "gate_conv_followup_benign") if with_conv else ())
        dev_ben = BENIGN_DEV + (("dev_conv_chat_benign", "dev_conv_followup_benign") if with_conv else ())
        for layers in ([13], LAYERS):
            idx = [LAYERS.index(ly) for ly in layers]

            def feat(k: str, idx=idx) -> torch.Tensor:
                return R[k][:, idx].flatten(1)

            direction, center = fit_linear_probe([feat(k) for k in harm], [feat(k) for k in ben], l2=0.03)
            pos = linear_scores(feat("dev_harmful"), direction, center)
            neg = torch.cat([linear_scores(feat(k), direction, center) for k in dev_ben])
            for fpr in (0.0, 0.05, 0.1) + ((0.2, 0.3) if with_conv else ()):
                thr, tpr = best_threshold(pos, neg, max_fpr=fpr, at_edge=fpr > 0)
                opens = {k: linear_scores(feat(k), direction, center) > thr for k in R}
                for veto in (False, True) if with_conv else (False,):
                    # veto: the shipped gate, AND-ed with this probe (steer extract --and-gates)
                    o = {k: opens[k] & ship_open[k] if veto else opens[k] for k in R}
                    dev_b = torch.cat([o[k] for k in dev_ben])
                    row = {"conversations_in_fit": with_conv, "layers": layers, "dev_fpr": fpr, "threshold": thr,
                           "and_shipped": veto, "dev_harmful_fires": round(float(o["dev_harmful"].float().mean()), 3),
                           "dev_benign_fires": int(dev_b.sum()), "dev_benign_n": len(dev_b),
                           "held_out_open": {k: int(o[k].sum()) for k in (*held, *plain)}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    # the shipped gate itself, on the same residuals (layer 13, its own threshold)
    opened = {k: int(ship_open[k].sum()) for k in (*held, *plain)}
    rows.insert(0, {"shipped": True, "layers": [13], "threshold": g["threshold"],
                    "dev_harmful_fires": round(float((linear_scores(R["dev_harmful"][:, LAYERS.index(13)], sd, sc)
                                                      > g["threshold"]).float().mean()), 3),
                    "held_out_open": opened})
    print(json.dumps(rows[0]), flush=True)
    sizes = {k: len(v) for k, v in every.items() if k in held or k in plain}
    out = {"command": "python bench/gate_conversation_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dtype": str(extract_dtype()).removeprefix("torch."), "limit": ns.limit, "sizes": sizes,
           "seconds": round(time.time() - t0), "rows": rows}
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    cols = list(sizes)
    print("| fit | layers | dev fpr | dev HB fires | " + " | ".join(f"{c} ({sizes[c]})" for c in cols) + " |")
    for r in rows:
        fit = "shipped" if r.get("shipped") else ("+conv" if r["conversations_in_fit"] else "bare")
        fit += " AND shipped" if r.get("and_shipped") else ""
        print(f"| {fit} | {r['layers'][0]}-{r['layers'][-1]} | {r.get('dev_fpr', '-')} | {r['dev_harmful_fires']:.0%} | "
              + " | ".join(str(r["held_out_open"][c]) for c in cols) + " |")
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
