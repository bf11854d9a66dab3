"""A false-refusal direction, ablated from the weights (issue 11 item 3; arXiv 2410.03415).

Where the model refuses harmless work because it *sounds* harmful, remove the direction that carries that
false refusal, made orthogonal to the refusal direction so that true refusals stay:

* ``v_l = mean(pseudo-harmful prompts the model refuses) - mean(harmless prompts)`` at layer ``l`` and one
  prompt position, and ``r_l = mean(harmful) - mean(harmless)`` at the same place;
* ``v'_l = v_l - (v_l . r_hat_l) r_hat_l``, normalised;
* removed one of three ways:
  - ablated everywhere by weight orthogonalisation (the paper's way): every matrix that writes the residual
    stream (the token embedding, each attention output and MLP down projection) loses its ``v'`` part, so
    no layer ever sees it (the tied output head is untied and kept as it was);
  - ``--affine``: the same, but the embedding rows' ``v'`` part is set to the harmless prompts' mean at the
    fit layer instead of 0, so the residual's ``v'`` part is that constant everywhere;
  - ``--subtract a,b,..``: ``-a * v'`` (its own length, not normalised) added at the fit layer on every row
    and position, through the serving engine's activation hooks.

Fitting data: the pseudo-harmful prompts written for this (``bench/data/pseudo_harmful.txt``) and the
gate's fitting hard negatives (``gate_hard_negatives``); ``fit_harmful`` / ``fit_harmless`` (ablate-llm).
The (layer, position) is chosen on dev (``dev_hard_negatives``, ``dev_harmful``) by RULE: none where no
candidate lowers dev hard-negative refusals without losing dev harmful ones. No
held-out set is read. ``--save DIR`` writes the chosen candidate (or ``--layer/--position``) as a checkpoint
that ``steer serve`` and vLLM load unchanged; the held-out suites are then run with ``steer eval``.

    .venv/bin/python bench/false_refusal.py [--layers 9,11,13,15] [--positions -5,-1] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from steer import data
from steer.calibrate import generate_texts, splits
from steer.demo import ensure_demo_model
from steer.distill.answers import orthogonalize
from steer.extract import residuals
from steer.judge import is_refusal
from steer.models import decoder_layers, fingerprint, load_model
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
PSEUDO = ROOT / "bench" / "data" / "pseudo_harmful.txt"
DEV = ("dev_hard_negatives", "dev_harmful")
RULE = ("fewest dev hard-negative refusals among candidates that refuse fewer of them than the unablated model "
        "and no fewer dev harmful prompts")


def pseudo_harmful() -> data.PromptSet:
    return data.from_text("pseudo_harmful", "benign", PSEUDO.read_text(), "bench/data/pseudo_harmful.txt")


def refusals(model, tok, prompts, max_tokens: int, desc: str, vector: SafetyVector | None = None,
             strength: float = 0.0) -> list[bool]:
    texts = generate_texts(model, tok, vector, prompts, strength=strength, max_tokens=max_tokens, desc=desc)[0]
    return [is_refusal(t) for t in texts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="9,11,13,15", help="candidate layers (residual at the layer's input)")
    ap.add_argument("--positions", default="-5,-1", help="candidate prompt positions from the end")
    ap.add_argument("--n-fit", type=int, default=128, help="harmful / harmless fitting prompts")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--layer", type=int, help="skip the dev search: this layer (with --position)")
    ap.add_argument("--position", type=int)
    ap.add_argument("--affine", action="store_true",
                    help="set the direction's part to the harmless prompts' mean instead of 0 (affine ablation)")
    ap.add_argument("--subtract", help="instead of ablating: add -a * v' (v orthogonalised, its own length) at the "
                    "candidate layer, every row and position, for each a in this comma list")
    ap.add_argument("--save", help="write the chosen ablated model here (an HF checkpoint)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "false_refusal.json"))
    ns = ap.parse_args(argv)
    if (ns.layer is None) != (ns.position is None):
        ap.error("--layer and --position go together")
    try:
        subtract = [float(x) for x in ns.subtract.split(",")] if ns.subtract else []
    except ValueError:
        subtract = [-1.0]
    if not all(a > 0 for a in subtract):
        ap.error(f"--subtract {ns.subtract}: expected a comma list of numbers > 0")
    layers = [ns.layer] if ns.layer is not None else [int(x) for x in ns.layers.split(",")]
    positions = [ns.position] if ns.position is not None else [int(x) for x in ns.positions.split(",")]
    if ns.save and Path(ns.save).exists():
        ap.error(f"--save {ns.save}: exists")
    t0 = time.time()
    path = ensure_demo_model()
    model, tok = load_model(path)
    n_layers = len(decoder_layers(model))
    fp = fingerprint(model)
    original = {k: t.clone() for k, t in model.state_dict().items()}
    if bad := [x for x in layers if not 0 < x < n_layers]:
        ap.error(f"--layers {bad}: the model has layers 1..{n_layers - 1}")
    sp = splits()
    pseudo = [*pseudo_harmful().prompts, *sp["gate_hard_negatives"].prompts]
    refused = refusals(model, tok, pseudo, ns.max_tokens, "pseudo-harmful (vanilla)")
    p_ref = [p for p, r in zip(pseudo, refused, strict=True) if r]
    print(f"vanilla refuses {len(p_ref)} of {len(pseudo)} pseudo-harmful fitting prompts", flush=True)
    harm, harmless = sp["fit_harmful"].prompts[: ns.n_fit], sp["fit_harmless"].prompts[: ns.n_fit]
    pos = tuple(positions)
    mean = {k: residuals(model, tok, ps, pos, desc=k).mean(0) for k, ps in
            (("harmful", harm), ("harmless", harmless), ("pseudo_refused", p_ref))}  # (P, L, d)
    result = {"command": "python bench/false_refusal.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "fit": {"pseudo_harmful": pseudo_harmful().describe(), "gate_hard_negatives": sp["gate_hard_negatives"].describe(),
                      "pseudo_refused": len(p_ref), "pseudo_total": len(pseudo), "harmful": len(harm), "harmless": len(harmless)},
              "dev": {k: sp[k].describe() for k in DEV}, "candidates": []}

    def direction(pi: int, layer: int) -> tuple[torch.Tensor, float, float]:
        """(unit v', cos(v, r) before orthogonalising, the level v' is set to)."""
        r = mean["harmful"][pi, layer] - mean["harmless"][pi, layer]
        v = mean["pseudo_refused"][pi, layer] - mean["harmless"][pi, layer]
        cos = float(torch.nn.functional.cosine_similarity(v, r, dim=0))
        rh = r / r.norm()
        v = v - (v @ rh) * rh
        if ns.subtract:
            return v, cos, 0.0
        v = v / v.norm()
        return v, cos, float(mean["harmless"][pi, layer] @ v) if ns.affine else 0.0

    def dev_run(tag: str) -> dict:
        return {k: sum(refusals(model, tok, sp[k].prompts, ns.max_tokens, f"{k} {tag}")) for k in DEV}

    if ns.layer is None:
        base = dev_run("vanilla")
        result["vanilla_dev"] = base
        print("vanilla dev refusals", base, flush=True)
        for pi, p in enumerate(positions):
            for layer in layers:
                v, cos, level = direction(pi, layer)
                if ns.subtract:
                    vec = SafetyVector("fr", "activation", fp, {f"layers.{layer}": -v}, {"coefficient": 1.0})
                    for a in subtract:
                        got = {k: sum(refusals(model, tok, sp[k].prompts, ns.max_tokens, f"{k} L{layer} p{p} -{a:g}v",
                                               vec, a)) for k in DEV}
                        row = {"layer": layer, "position": p, "subtract": a, "v_norm": round(float(v.norm()), 3),
                               "cos_v_r_before": round(cos, 4), "dev_refused": got}
                        result["candidates"].append(row)
                        print(row, flush=True)
                    continue
                with torch.no_grad():
                    orthogonalize(model, v, level=level)
                got = dev_run(f"L{layer} p{p}")
                model.load_state_dict(original)
                row = {"layer": layer, "position": p, "cos_v_r_before": round(cos, 4), "level": round(level, 4), "dev_refused": got}
                result["candidates"].append(row)
                print(row, flush=True)
        ok = [c for c in result["candidates"] if c["dev_refused"]["dev_harmful"] >= base["dev_harmful"]
              and c["dev_refused"]["dev_hard_negatives"] < base["dev_hard_negatives"]]
        if ok:
            best = min(ok, key=lambda c: (c["dev_refused"]["dev_hard_negatives"], -c["dev_refused"]["dev_harmful"]))
            result["chosen"] = {"layer": best["layer"], "position": best["position"],
                                "rule": RULE}
        else:
            result["chosen"] = None
            result["rule"] = RULE
        print("chosen", result["chosen"], flush=True)
    else:
        result["chosen"] = {"layer": ns.layer, "position": ns.position, "rule": "given (--layer/--position)"}
    if ns.save and result["chosen"]:
        c = result["chosen"]
        v, _, level = direction(positions.index(c["position"]), c["layer"])
        with torch.no_grad():
            orthogonalize(model, v, level=level)
        model.config.tie_word_embeddings = False
        out = Path(ns.save)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "false_refusal.json").write_text(json.dumps({"made_by": result["command"], "base": str(path), **c,
                                                             "fit": result["fit"]}, indent=2))
        tmp.rename(out)
        result["saved"] = str(out)
    result["seconds"] = round(time.time() - t0, 1)
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {ns.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
