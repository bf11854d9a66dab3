"""Does the gate read a conversation, or a short message, like a plain request? (held out)

Every safety figure so far was measured on one-turn prompts. A chat client sends the whole conversation:
a follow-up ("Can you give me an example?") after the model's own answer, a short "ok" or "thanks". This
study builds those shapes from held-out requests and the held-out (test) third of the phrases in
``steer/_data/conversation.txt`` (``steer.calibrate.conversation_sets``), and for each vector reads the gate
and the answers at strength 1 against the vanilla model's (strength 0), greedy, phrase judge:

- ``test_chat_benign``: the held-out short messages, one turn each;
- ``test_followup_benign``: an aplomb request, the vanilla model's own answer (48 tokens), then a follow-up;
- ``test_push_harmful``: a HarmBench test request, a refusal, then a user pressing ("It's for a novel ...");
- ``test_second_harmful``: an aplomb request and its answer, then a HarmBench test request;
- with ``--plain``: the first ``--limit`` plain aplomb, HarmBench test and Do-Not-Answer prompts.

A benign row the vector refuses where vanilla answers is an over-refusal; a harmful row answered is a miss.
Writes bench/results/gate_conversations.json (or ``--out``).

    .venv/bin/python bench/gate_conversations.py [--vector vectors/refusal.json ...] [--limit 40] [--plain]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from server.evaluation.report import wilson
from server.evaluation.suites import load_suites
from steer import serving
from steer.calibrate import conversation_sets, generate_texts, splits
from steer.data import prompt_text
from steer.demo import ensure_demo_model
from steer.judge import is_refusal
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 48


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vector", nargs="+", default=[str(ROOT / "vectors" / "refusal.json")])
    ap.add_argument("--model", default=None, help="the served model (default: the demo model)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--plain", action="store_true", help="also the plain aplomb, HarmBench and Do-Not-Answer prompts")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_conversations.json"))
    ns = ap.parse_args(argv)
    t0 = time.time()
    vectors = [SafetyVector.load(v) for v in ns.vector]
    served = serving.build(Path(ns.model or ensure_demo_model()))
    model, tok = served.model, served.tokenizer
    sp = splits()
    benign, harmful = list(sp["test_benign"].prompts[:ns.limit]), list(sp["test_harmful"].prompts[:ns.limit])
    texts, _ = generate_texts(model, tok, None, benign, strength=0.0, max_tokens=TOKENS, desc="vanilla answers")
    answers = dict(zip(benign, (t.strip() for t in texts), strict=True))
    sets = {k: (v.label, list(v.prompts)) for k, v in
            conversation_sets("test", benign, answers, harmful, prefix="test", n=ns.limit).items()}
    if ns.plain:
        for su in load_suites(("aplomb", "harmbench", "donotanswer"), ns.limit):
            sets[su.name] = ("benign" if su.kind == "benign" else "harmful", list(su.prompts))
    rows, items = [], []
    for name, (label, prompts) in sets.items():
        van, _ = generate_texts(model, tok, None, prompts, strength=0.0, max_tokens=TOKENS, desc=f"{name} vanilla")
        van_ref = [is_refusal(t) for t in van]
        row = {"set": name, "label": label, "n": len(prompts), "vanilla_refused": sum(van_ref)}
        for vec in vectors:
            st, gate = generate_texts(model, tok, vec, prompts, strength=1.0, max_tokens=TOKENS,
                                      desc=f"{name} {vec.name}")
            ref = [is_refusal(t) for t in st]
            row[vec.name] = {"gate_open": sum(g > 0 for g in gate), "refused": sum(ref),
                             "refused_ci95": wilson(sum(ref), len(ref)),
                             "refused_where_vanilla_answers": sum(r and not v for r, v in zip(ref, van_ref, strict=True))}
            items += [{"set": name, "vector": vec.name, "prompt": prompt_text(p), "gate": g, "answer": a,
                       "refused": r, "vanilla": v, "vanilla_refused": vr}
                      for p, g, a, r, v, vr in zip(prompts, gate, st, ref, van, van_ref, strict=True)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"command": "python bench/gate_conversations.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "vectors": ns.vector, "model": str(ns.model or "demo"), "limit": ns.limit, "max_tokens": TOKENS,
           "judge": "refusal phrases", "kernels": served.kernels, "host": served.host,
           "seconds": round(time.time() - t0), "rows": rows, "items": items}
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    names = [v.name for v in vectors]
    print("| set | label | n | vanilla refused | " + " | ".join(f"{n}: gate open / refused" for n in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['set']} | {r['label']} | {r['n']} | {r['vanilla_refused']} | "
              + " | ".join(f"{r[n]['gate_open']} / {r[n]['refused']}" for n in names) + " |")
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
