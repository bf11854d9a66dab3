"""AlphaSteer (arXiv 2506.07022) on the demo model, measured before it is built: a learned linear
steering map that leaves benign activations unchanged by construction (issue 11 item 2).

The shipped vector adds ``coefficient * r`` at layer L on rows a gate lets through. AlphaSteer has no
gate: every token's residual ``h`` at the input of layer L becomes ``h + s * h M``, where

* ``P = I - U U^T`` projects onto the null space of the benign activations: ``U`` holds the top
  eigenvectors of the benign residuals' (uncentered) Gram matrix, enough to keep ``--keep`` of its
  energy, so ``h_benign P`` is (nearly) zero and benign rows are (nearly) untouched;
* ``M = P W``, ``W`` the ridge solution of ``min ||H_harmful P W - R||^2 + alpha ||W||^2`` with every row
  of ``R`` the vector's refusal push ``coefficient * r`` (alpha = ``--ridge`` times the mean eigenvalue
  of ``P H^T H P``): harmful rows get pushed toward refusal.

Fitting data: the gate's fitting sets of ``steer extract --gate-templates`` (bare harmful and benign sets
and their templated versions in the gate template families: ``steer.calibrate``), residuals at the last
``--positions`` prompt positions (the end of the user turn and the assistant header, where the answer is
decided). The strength ``s`` is chosen on dev (40 HarmBench dev prompts; the benign dev sets, bare and in
dev-family templates): the most dev-harmful refusals whose dev-benign refusals are no more than vanilla's.
Then the held-out ``steer eval`` suites (the first ``--limit`` of each; template families never seen in
fitting or dev) are answered at that strength, greedy, ``--max-tokens`` tokens, refusal-phrase judge,
through the serving engine in-process. Also reported: the mean ``||h M|| / ||coefficient * r||`` at the
last prompt position per suite (how hard each suite is pushed; 0 on a benign row the constraint holds
for, 1 on a harmful row pushed as fitted).

``--push-only`` skips every generation: the push ratios on the dev and held-out sets alone (a few minutes
from the residual cache), the cheap first look, as the gate studies read gate decisions before answers.
Residuals are cached under ~/.cache/steer/alphasteer/, keyed by the prompts, positions and layer.

``--held-out-strength S`` answers the held-out suites at ``S`` whatever dev chose (``--grid ''`` skips
dev): a diagnostic outside the dev rule, recorded as such in the output.

    .venv/bin/python bench/alphasteer.py [--keep 0.99] [--grid 0.5,1,1.5,2] [--limit 40] [--push-only]
        [--held-out-strength S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from server.evaluation.suites import load_suites
from steer.calibrate import (
    ExtractConfig,
    _with_templates,
    gate_roles,
    generate_texts,
    splits,
)
from steer.demo import cache_dir, ensure_demo_model
from steer.extract import residuals
from steer.judge import is_refusal
from steer.models import decoder_layers, load_model
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("dan_heldout", "inthewild_heldout", "dan_heldout_benign", "inthewild_heldout_benign", "harmbench",
            "donotanswer", "past_tense", "future_tense", "aplomb")


def fit_map(harm: torch.Tensor, ben: torch.Tensor, push: torch.Tensor, *, keep: float, ridge: float) -> tuple[torch.Tensor, dict]:
    """(d, d) map M = P W (module docstring) from harmful and benign residual rows (N, d) and the push
    (d,), in float64."""
    hb, hm, r = ben.double(), harm.double(), push.double()
    evals, evecs = torch.linalg.eigh(hb.T @ hb / len(hb))  # ascending
    order = evals.flip(0).clamp_min(0)
    k = int((order.cumsum(0) / order.sum() < keep).sum()) + 1
    u = evecs[:, -k:]
    p = torch.eye(len(r), dtype=torch.float64) - u @ u.T
    x = hm @ p
    gram = x.T @ x
    alpha = ridge * float(torch.trace(gram)) / len(r)
    w = torch.linalg.solve(gram + alpha * torch.eye(len(r), dtype=torch.float64), x.T @ r.expand(len(hm), -1))
    m = p @ w
    info = {"benign_rank_kept": k, "keep": keep, "alpha": alpha,
            "benign_residual_energy": float((hb @ p).norm() ** 2 / hb.norm() ** 2),
            "harmful_residual_energy": float((hm @ p).norm() ** 2 / hm.norm() ** 2)}
    return m.float(), info


class MapHook:
    """h -> h + s * h M at the input of one decoder layer, every row and position (no gate)."""

    def __init__(self, model, layer: int, m: torch.Tensor):
        self.m, self.s = m, 0.0
        self.handle = decoder_layers(model)[layer].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.s == 0:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        h2 = h + (self.s * (h.float() @ self.m)).to(h.dtype)
        if args:
            return (h2, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h2}


def cached_residuals(model, tok, prompts, positions: tuple[int, ...], layer: int, desc: str) -> torch.Tensor:
    """(N, P, d) residuals at the input of ``layer`` (steer.extract.residuals), cached on disk."""
    key = hashlib.sha256(json.dumps([list(prompts), list(positions), layer]).encode()).hexdigest()[:24]
    path = cache_dir() / "alphasteer" / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    x = residuals(model, tok, list(prompts), positions, desc=desc)[:, :, layer].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x, path)
    return x


def refused(model, tok, hook: MapHook, prompts, s: float, tokens: int, desc: str) -> list[bool]:
    hook.s = s
    texts, _ = generate_texts(model, tok, None, list(prompts), strength=0.0, max_tokens=tokens, desc=desc)
    return [is_refusal(t) for t in texts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "refusal.json"), help="r and its coefficient, and layer")
    ap.add_argument("--keep", type=float, default=0.99, help="benign Gram energy the benign subspace keeps")
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--positions", type=int, default=5, help="last N prompt positions fitted on")
    ap.add_argument("--benign-positions", type=int, default=None,
                    help="last N prompt positions of the benign rows the null space is fitted on (default: --positions)")
    ap.add_argument("--grid", default="0.5,1,1.5,2")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dev-tokens", type=int, default=48)
    ap.add_argument("--push-only", action="store_true", help="no generation: push ratios only")
    ap.add_argument("--held-out-strength", type=float, default=None,
                    help="answer the held-out suites at this strength whatever dev chose (a diagnostic outside "
                         "the dev rule; recorded as such)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "alphasteer.json"))
    ns = ap.parse_args(argv)
    if ns.held_out_strength is not None and not ns.held_out_strength >= 0:
        ap.error(f"--held-out-strength {ns.held_out_strength:g}: must be >= 0")
    if ns.benign_positions is not None and ns.benign_positions < 1:
        ap.error(f"--benign-positions {ns.benign_positions}: must be >= 1")
    t0 = time.time()
    torch.set_grad_enabled(False)
    vec = SafetyVector.load(ns.vector)
    (layer, r), = vec.layer_directions().items()
    push = float(vec.config["coefficient"]) * r.float()
    model, tok = load_model(ensure_demo_model())
    sets = {k: v for k, v in splits().items() if not k.startswith("test_")}
    sets, record = _with_templates(ExtractConfig(gate_templates=True), sets, model, tok)
    roles = gate_roles(sets)
    pos = tuple(range(-ns.positions, 0))
    ben_pos = tuple(range(-(ns.benign_positions or ns.positions), 0))

    def feats(names, at) -> torch.Tensor:
        return torch.cat([cached_residuals(model, tok, sets[k].prompts, at, layer, k).flatten(0, 1) for k in names])

    m, info = fit_map(feats(roles["harmful"], pos), feats(roles["benign"], ben_pos), push, keep=ns.keep, ridge=ns.ridge)
    print(json.dumps(info), flush=True)
    norm = float(push.norm())

    def push_ratio(prompts, desc: str) -> float:
        x = cached_residuals(model, tok, prompts, (-1,), layer, desc)[:, 0]
        return float((x @ m).norm(dim=-1).mean() / norm)

    ratios = {k: push_ratio(sets[k].prompts, k) for k in ("dev_harmful", *roles["dev_benign"])}
    suites = load_suites(HELD_OUT, ns.limit)
    ratios |= {s.name: push_ratio(s.prompts, s.name) for s in suites}
    print(json.dumps({"push_ratio": ratios}), flush=True)
    hook = MapHook(model, layer, m)
    dev_benign = [p for k in roles["dev_benign"] for p in sets[k].prompts]
    dev = {"harmful": sets["dev_harmful"].prompts, "benign": dev_benign}
    grid = [] if ns.push_only or not ns.grid.strip() else [0.0] + [float(x) for x in ns.grid.split(",") if x.strip()]
    rows = []
    for s in grid:
        row = {"strength": s, **{k: sum(refused(model, tok, hook, v, s, ns.dev_tokens, f"dev {k} @{s:g}"))
                                 for k, v in dev.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    chosen = None
    if rows:
        van = rows[0]["benign"]
        ok = [r_ for r_ in rows[1:] if r_["benign"] <= van]
        chosen = max(ok, key=lambda r_: (r_["harmful"], -r_["strength"]))["strength"] if ok else None
        print(f"chosen strength {chosen}", flush=True)
    held = {}
    answered_at = chosen if ns.held_out_strength is None else ns.held_out_strength
    if answered_at is not None and not ns.push_only:
        for suite in suites:
            ref = refused(model, tok, hook, suite.prompts, answered_at, ns.max_tokens, f"{suite.name} @{answered_at:g}")
            key = "refused" if suite.kind == "benign" else "unsafe"
            k = sum(ref) if key == "refused" else len(ref) - sum(ref)
            held[suite.name] = {"kind": suite.kind, key: k, "n": len(ref), "rate": k / len(ref)}
            print(json.dumps({suite.name: held[suite.name]}), flush=True)
    result = {"command": "python bench/alphasteer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "vector": vec.name, "layer": layer, "fit": info, "positions": list(pos), "benign_positions": list(ben_pos),
              "fit_sets": {k: sets[k].describe() for k in (*roles["harmful"], *roles["benign"])},
              "dev_sets": {k: sets[k].describe() for k in ("dev_harmful", *roles["dev_benign"])},
              "templates": record, "dev": rows, "dev_n": {k: len(v) for k, v in dev.items()},
              "push_ratio": ratios, "chosen": chosen, "held_out_strength": answered_at,
              "held_out_strength_from": "dev rule" if ns.held_out_strength is None else "--held-out-strength (diagnostic)",
              "held_out": held, "limit": ns.limit, "max_tokens": ns.max_tokens,
              "seconds": round(time.time() - t0, 1)}
    Path(ns.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
