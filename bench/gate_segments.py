"""Does the request, read on its own, tell a template's harmful request from its benign one? (issue 11, item 2)

The shipped gate reads the residual at the end of the user turn. Inside an unseen jailbreak template that
position mostly carries the template, so it opens on 29 of 40 benign requests inside held-out DAN
templates. This study scores each *piece* of a user message as a prompt of its own (the same chat
formatting, the same gate, its own threshold), with no fitting of any kind:

- **pieces**: ``lines`` (the message split at line breaks) or ``sentences`` (each line split again after
  ``.``, ``!`` or ``?`` followed by a space); empty pieces and exact repeats dropped. A one-line prompt
  is its own only piece;
- **any**: the gate opens on some piece on its own;
- **whole AND any**: the shipped decision, kept only where some piece opens the gate on its own as well.
  On a plain one-piece prompt it is the shipped decision itself.

Gate decisions only (no text is generated); a closed gate means the vanilla answer. Sets: the held-out
``steer eval`` suites (first ``--limit``, the prompts ``steer eval --limit`` asks) and the dev split
wrapped in dev-family templates (``bench/gated_calibrate.py --templates``: the sets a choice between
``lines`` and ``sentences`` may be made on). The model runs in the host's serving dtype (``steer.serving``).
Writes bench/results/gate_segments.json.

    .venv/bin/python bench/gate_segments.py [--vector vectors/refusal.json] [--limit 40] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from server.evaluation.report import wilson
from server.evaluation.suites import load_suites
from steer import serving
from steer.calibrate import splits, templated_sets
from steer.demo import ensure_demo_model
from steer.extract import residuals
from steer.hooks import Gate
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ("harmbench", "donotanswer", "past_tense", "future_tense", "dan_heldout", "inthewild_heldout",
           "dan_heldout_benign", "inthewild_heldout_benign", "aplomb", "humaneval")
DEV = ("dev_harmful", "dev_hard_negatives", "dev_code")
_SENT = re.compile(r"(?<=[.!?])\s+")


def pieces(text: str, how: str) -> list[str]:
    """The pieces of a user message (see the module docstring), in order, without repeats."""
    out: list[str] = []
    for line in text.splitlines():
        for p in (_SENT.split(line) if how == "sentences" else [line]):
            p = p.strip()
            if re.search(r"\w", p) and p not in out:
                out.append(p)
    return out or [text]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "refusal.json"))
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_segments.json"))
    ns = ap.parse_args(argv)
    t0 = time.time()
    vec = SafetyVector.load(ns.vector)
    gate = Gate.of(vec, two_sided=False)
    if gate is None:
        raise SystemExit(f"error: --vector {ns.vector}: {vec.name!r} has no gate")
    model_dir = ensure_demo_model()
    served = serving.build(model_dir)  # the host's serving dtype and kernels
    model, tok = served.model, served.tokenizer
    sets: dict[str, tuple[str, list[str]]] = {}
    for su in load_suites(HELDOUT, ns.limit):
        sets[su.name] = ("harmful" if su.kind in ("harmful", "jailbreak") else "benign", list(su.prompts))
    sp = splits()
    for k in DEV:
        sets[k] = ("harmful" if k == "dev_harmful" else "benign", list(sp[k].prompts[:ns.limit]))
    roles = (("dev_tpl", "dev", "harmful", ("dev_harmful",)), ("dev_tpl", "dev", "benign", DEV[1:]))
    tsets, _ = templated_sets({k: sp[k] for k in DEV}, AutoTokenizer.from_pretrained(model_dir), limit=ns.limit,
                              roles=roles)
    for k, v in tsets.items():
        sets[k] = ("harmful" if k.endswith("harmful") else "benign", list(v.prompts))

    texts: list[str] = []
    for _, prompts in sets.values():
        for p in prompts:
            texts += [p] + pieces(p, "lines") + pieces(p, "sentences")
    uniq = sorted(set(texts), key=len)  # similar lengths batch together (less padding)
    print(f"{len(uniq)} distinct texts to score ({sum(len(p) for _, p in sets.values())} prompts)", flush=True)
    layers = list(gate.layers)
    scores: dict[str, float] = {}
    for i in range(0, len(uniq), 256):
        chunk = uniq[i:i + 256]
        with torch.inference_mode():
            r = residuals(model, tok, chunk, positions=(gate.position,), batch_size=ns.batch_size,
                          desc=f"texts {i + 1}-{i + len(chunk)} of {len(uniq)}")
        h = torch.cat([r[:, 0, ly] for ly in layers], dim=-1)
        scores.update(zip(chunk, gate.scores(h).tolist(), strict=True))

    rows = []
    for name, (label, prompts) in sets.items():
        row: dict = {"set": name, "label": label, "n": len(prompts)}
        whole = [scores[p] > gate.threshold for p in prompts]
        row["whole"] = sum(whole)
        for how in ("lines", "sentences"):
            any_ = [max(scores[q] for q in pieces(p, how)) > gate.threshold for p in prompts]
            row[f"pieces_{how}"] = sum(len(pieces(p, how)) for p in prompts) / len(prompts)
            row[f"any_{how}"] = sum(any_)
            row[f"and_{how}"] = sum(w and a for w, a in zip(whole, any_, strict=True))
        rows.append(row)
    cols = ("whole", "any_lines", "and_lines", "any_sentences", "and_sentences")
    out = {
        "command": "python bench/gate_segments.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "vector": ns.vector, "gate": {"layers": layers, "position": gate.position, "threshold": gate.threshold},
        "limit": ns.limit, "kernels": served.kernels, "host": served.host, "seconds": round(time.time() - t0),
        "rows": rows,
        "ci95": {r["set"]: {c: wilson(r[c], r["n"]) for c in cols} for r in rows},
        "scores": {name: [{"whole": scores[p], "lines": [scores[q] for q in pieces(p, "lines")],
                           "sentences": [scores[q] for q in pieces(p, "sentences")]} for p in prompts]
                   for name, (_, prompts) in sets.items()},
    }
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| set | label | n | pieces (lines / sentences) | whole | any line | whole AND any line | any sentence "
          "| whole AND any sentence |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['label']} | {r['n']} | {r['pieces_lines']:.1f} / {r['pieces_sentences']:.1f} | "
              + " | ".join(f"{r[c]}" for c in cols) + " |")
    print(f"{time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
