"""How often a vector's gate opens on each `steer eval` suite (the served path, no HTTP).

Prefills each suite's first N prompts (the same prompts ``steer eval --limit N`` asks) through the
serving engine with the vector (default: the shipped one; several with ``--vector A B``, each read on the
same prompts) at strength 1 and reads each row's gate, exactly as ``steer serve`` decides it. A closed
gate means that request is answered by the vanilla model. Writes bench/results/gate_rates.json.

    .venv/bin/python bench/gate_rates.py [--suites harmbench,dan,inthewild,aplomb] [--limit 100] [--benign-in-templates]
        [--vector vectors/refusal.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.evaluation.report import wilson
from server.evaluation.suites import _templated, load_suites
from steer import serving
from steer.calibrate import splits
from steer.demo import ensure_demo_model
from steer.engine import Engine, Sequence
from steer.extract import chat_prompt_ids
from steer.types import SamplingParams
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="harmbench,donotanswer,past_tense,future_tense,dan,inthewild,aplomb,humaneval")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--benign-in-templates", action="store_true",
                    help="also the aplomb benign prompts wrapped in the dan / in-the-wild templates "
                         "(the suites' own pairing rule): does a jailbreak template alone open the gate?")
    ap.add_argument("--vector", nargs="+", default=[str(ROOT / "vectors" / "refusal.json")])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gate_rates.json"))
    ns = ap.parse_args(argv)
    vecs = [SafetyVector.load(v) for v in ns.vector]
    served = serving.build(ensure_demo_model(), vecs)  # the kernels, vectors and packing of steer serve
    model, tok, runtime = served.model, served.tokenizer, served.runtime
    rows = []
    with runtime:
        sets = [(su.name, su.kind, su.prompts) for su in load_suites(tuple(ns.suites.split(",")), ns.limit)]
        if ns.benign_in_templates:
            sp = splits()
            for t in ("dan_templates", "inthewild_templates"):
                ps = _templated(t, "test_benign")(sp)[0].take(ns.limit)
                sets.append((f"{t.removesuffix('_templates')} (aplomb benign inside)", "benign", ps.prompts))
        for name, kind, prompts in sets:
            for vec in vecs:
                engine = Engine(model, tok, runtime, max_batch_size=8)
                seqs = [Sequence(chat_prompt_ids(tok, p), SamplingParams(max_tokens=1, temperature=0.0), vec.name, 1.0)
                        for p in prompts]
                for s in seqs:
                    engine.add(s)
                while engine.has_work():
                    engine.step()
                opened = [bool(s.gate[vec.name]) for s in seqs]
                rows.append({"suite": name, "kind": kind, "vector": vec.name, "n": len(seqs),
                             "gate_open": sum(opened) / len(seqs), "ci95": wilson(sum(opened), len(seqs)),
                             "opened": [i for i, o in enumerate(opened) if o]})
                print(f"  {name} ({vec.name}): gate open on {sum(opened)}/{len(seqs)}", flush=True)
    out = {"command": "python bench/gate_rates.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "vector": vecs[0].name if len(vecs) == 1 else [v.name for v in vecs], "limit": ns.limit,
           "kernels": served.kernels, "host": served.host, "rows": rows}
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| suite | kind | vector | n | gate open | 95% CI |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['suite']} | {r['kind']} | {r['vector']} | {r['n']} | {r['gate_open']:.0%} | "
              f"{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
