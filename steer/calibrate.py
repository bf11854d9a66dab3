"""``steer extract``: fit a gated refusal-direction vector, choose its layers and calibrate strength 1.0.

Protocol (every choice is validated on sources other than the one it was fitted on):

- **fit** the directions on ablate-llm's style-matched harmful/harmless pairs (40 + 40);
- **choose** the gate layer and threshold, and the coefficient that strength 1.0 stands for, on a dev
  split: 40 HarmBench prompts (harmful) against 40 HumanEval instructions plus the project's own 40
  hard negatives (benign); the threshold sits above every benign dev prompt;
- **never touch** the test split: the other 160 HarmBench prompts and all 50 aplomb benign prompts
  (20 XSTest-style hard negatives), which ``bench/safety_eval.py`` reports on.

Refusal directions are read at the last prompt position (input of each layer); the gate reads the
end-of-user-turn position (-5 in ChatML), where harmfulness of the request separates far better
than at the last position (which encodes the model's own refusal decision).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from steer import data
from steer.engine import Engine, Sequence
from steer.extract import best_threshold, chat_prompt_ids, cosine_scores
from steer.hooks import SteeringRuntime
from steer.judge import refusal_rate
from steer.models import decoder_layers, fingerprint, load_model
from steer.types import SamplingParams
from steer.vectors import SafetyVector

GATE_POSITION = -5  # ChatML: <|im_end|> of the user turn, before "\n<|im_start|>assistant\n"
COEF_GRID = (1.0, 1.5, 2.0, 3.0, 4.0)
TARGET_DEV_REFUSAL = 0.95
SPLIT_SEED = 0
N_DEV_HARMFUL = 40
N_DEV_CODE = 40


@dataclass(frozen=True)
class ExtractConfig:
    model: str | None = None
    out: str = "vectors"
    name: str = "refusal"
    layers: str | None = None  # "12,13"
    gate_layer: int | None = None
    limit: int | None = None
    seed: int = SPLIT_SEED


def hard_negatives() -> data.PromptSet:
    text = resources.files("steer").joinpath("_data/hard_negatives.txt").read_text()
    prompts = tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    import hashlib

    return data.PromptSet("hard_negatives", "benign", prompts, "steer:_data/hard_negatives.txt",
                          hashlib.sha256(text.encode()).hexdigest())


def splits(seed: int = SPLIT_SEED) -> dict[str, data.PromptSet]:
    """The named splits used by extraction (fit/dev) and by the safety benchmark (test)."""
    hb_dev, hb_test = data.load("harmbench").split(n_first=N_DEV_HARMFUL, seed=seed)
    he_dev, _ = data.load("humaneval").split(n_first=N_DEV_CODE, seed=seed)
    return {
        "fit_harmful": data.load("ablate_harmful"),
        "fit_harmless": data.load("ablate_harmless"),
        "dev_harmful": hb_dev,
        "dev_code": he_dev,
        "dev_hard_negatives": hard_negatives(),
        "test_harmful": hb_test,
        "test_benign": data.load("aplomb_benign"),
    }


@torch.inference_mode()
def residuals_at(model, tok, prompts, positions: tuple[int, ...], desc: str, batch_size: int = 8) -> torch.Tensor:
    """(N, P, L, d) float32 residuals at the input of every layer, at offsets from the prompt end."""
    n_layers = len(decoder_layers(model))
    ids_list = [chat_prompt_ids(tok, p) for p in prompts]
    out = []
    for i in tqdm(range(0, len(ids_list), batch_size), desc=desc, unit="batch"):
        chunk = ids_list[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(chunk):
            ids[j, width - len(x) :], mask[j, width - len(x) :] = torch.tensor(x), 1
        hs = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                   output_hidden_states=True).hidden_states
        out.append(torch.stack([torch.stack([hs[ly][:, p].float() for ly in range(n_layers)], 1)
                                for p in positions], 1))
    return torch.cat(out)


def generate_texts(model, tok, vector: SafetyVector | None, prompts, *, strength: float, max_tokens: int = 32,
                   batch_size: int = 16, desc: str | None = None) -> tuple[list[str], list[float]]:
    """Greedy answers (and gate decisions) for prompts through the serving engine."""
    rt = SteeringRuntime(model, [vector], check_fingerprint=False) if vector is not None else None
    eng = Engine(model, tok, rt, max_batch_size=batch_size)
    name = vector.name if vector is not None else ""
    seqs = [Sequence(chat_prompt_ids(tok, p), SamplingParams(max_tokens=max_tokens, temperature=0.0), name, strength)
            for p in prompts]
    for s in seqs:
        eng.add(s)
    with rt if rt is not None else torch.inference_mode(), tqdm(total=len(seqs), desc=desc, disable=desc is None) as bar:
        while eng.has_work():
            bar.update(sum(ev.finish_reason is not None for ev in eng.step()))
    texts = [tok.decode(s.generated, skip_special_tokens=True) for s in seqs]
    return texts, [s.gate.get(name, 0.0) for s in seqs]


def _choose_gate(R: dict, layers: range, forced: int | None) -> tuple[int, float, float, dict]:
    """Gate layer with the best dev TPR at zero dev false positives; returns (layer, thr, tpr, tensors)."""
    best = None
    for ly in [forced] if forced is not None else layers:
        h, b = R["fit_harmful"][:, 1, ly], R["fit_harmless"][:, 1, ly]
        g, c = h.mean(0) - b.mean(0), (h.mean(0) + b.mean(0)) / 2
        neg = torch.cat([cosine_scores(R[k][:, 1, ly], g, c) for k in ("dev_code", "dev_hard_negatives")])
        thr, tpr = best_threshold(cosine_scores(R["dev_harmful"][:, 1, ly], g, c), neg, max_fpr=0.0)
        if best is None or tpr > best[2]:
            best = (ly, thr, tpr, {"gate.direction": g / g.norm(), "gate.center": c})
    return best


def run_extract(cfg: ExtractConfig, *, command: str) -> Path:
    from steer.demo import ensure_demo_model

    t0 = time.time()
    model, tok = load_model(cfg.model or ensure_demo_model())
    n_layers = len(decoder_layers(model))
    all_sets = splits(cfg.seed)
    sets = {k: v.take(cfg.limit) for k, v in all_sets.items() if not k.startswith("test_")}
    R = {k: residuals_at(model, tok, s.prompts, (-1, GATE_POSITION), desc=k) for k, s in sets.items()}
    gl, thr, tpr, gate_t = _choose_gate(R, range(n_layers // 4, int(0.8 * n_layers)), cfg.gate_layer)
    steer_layers = [int(x) for x in cfg.layers.split(",")] if cfg.layers else [gl]
    dirs = {f"layers.{ly}": R["fit_harmful"][:, 0, ly].mean(0) - R["fit_harmless"][:, 0, ly].mean(0)
            for ly in steer_layers}
    gate = {"layer": gl, "threshold": thr, "position": GATE_POSITION}
    fp = fingerprint(model)
    dev_log, coef = [], COEF_GRID[-1]
    for c in COEF_GRID:  # smallest coefficient that makes the gated dev-harmful prompts refuse
        v = SafetyVector(cfg.name, "activation", fp, {**dirs, **gate_t}, {"coefficient": c, "gate": gate})
        texts, gates = generate_texts(model, tok, v, sets["dev_harmful"].prompts, strength=1.0, desc=f"dev coef {c}")
        dev_log.append({"coefficient": c, "dev_harmful_refusal": refusal_rate(texts),
                        "dev_gate_rate": sum(gates) / len(gates)})
        if dev_log[-1]["dev_harmful_refusal"] >= TARGET_DEV_REFUSAL:
            coef = c
            break
    vector = SafetyVector(cfg.name, "activation", fp, {**dirs, **gate_t}, {
        "coefficient": coef, "gate": gate, "mode": "add",
        "strength_semantics": "strength s adds s * coefficient * raw mean difference at each steered layer, "
                              "on rows whose prompt passes the gate",
    }, _provenance(cfg, {**sets, **{k: v for k, v in all_sets.items() if k.startswith("test_")}}, steer_layers, gl, tpr, dev_log, command, time.time() - t0))
    return vector.save(cfg.out)


def _provenance(cfg, sets, steer_layers, gl, tpr, dev_log, command, seconds) -> dict:
    import transformers

    return {
        "method": "refusal-direction activation addition (Arditi et al. 2024) with a conditional gate "
                  "(conditional activation steering, arXiv 2409.05907)",
        "positions": {"direction": -1, "gate": GATE_POSITION},
        "layers": steer_layers,
        "gate_layer": gl,
        "datasets": {k: s.describe() for k, s in sets.items()},
        "split": {"seed": cfg.seed, "limit": cfg.limit, "held_out": [k for k in sets if k.startswith("test_")]},
        "dev": {"gate_tpr_at_zero_dev_fpr": tpr, "coefficient_search": dev_log},
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
