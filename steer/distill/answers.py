"""Training pairs for the harmful surrogate: (harmful prompt, compliant answer).

No harmful-answer data set ships on PyPI, so the answers are generated locally by the aligned model
with its refusal direction orthogonalized out of its weights (Arditi et al. 2024, METHODS.md 5.1):
``W <- W - r r^T W`` for every matrix writing into the residual stream (o_proj, down_proj), and
``e <- e - (e . r) r`` for every embedding row, so no layer can write along r. Answers the
refusal-phrase judge still flags are dropped. They are cached under ``~/.cache/steer/distill/`` (never
in the repository, never served), keyed by the model's fingerprint, the prompts and the generator settings.

Prompts come only from splits of ``steer.calibrate.splits()`` that no evaluation uses (TRAIN_SPLITS);
the default is the 200 Do-Not-Answer prompts of the gate-fitting split. Held-out splits (``test_*``) and
every set an evaluation suite reads whole (ablate-llm's) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from steer.models import architecture, decoder_layers

log = logging.getLogger("steer.distill")

# calibrate.splits() keys of harmful prompts that server/evaluation never reads: the gate-fitting parts of
# Do-Not-Answer / the tense rephrasings (the suites use the rest) and the HarmBench dev split (the
# harmbench suite uses the test split).
TRAIN_SPLITS = ("gate_donotanswer", "gate_past_tense", "gate_future_tense", "dev_harmful")
DEFAULT_SPLITS = ("gate_donotanswer",)
GEN_BATCH = 16


class AnswerError(RuntimeError):
    """Training pairs cannot be built (bad split name, unreadable answers file, no usable pairs)."""


@dataclass(frozen=True)
class Pairs:
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    provenance: dict


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def training_prompts(names: tuple[str, ...], limit: int | None, seed: int = 0) -> tuple[tuple[str, ...], dict]:
    """The first ``limit`` prompts of the named never-evaluated splits (in order), and their record."""
    from steer.calibrate import splits

    bad = [n for n in names if n not in TRAIN_SPLITS]
    if bad or not names:
        raise AnswerError(f"prompt split(s) {bad or names!r} cannot train the surrogate; allowed (never "
                          f"evaluated): {', '.join(TRAIN_SPLITS)}")
    sp = splits(seed)
    held_out = {p for k, s in sp.items() if k.startswith("test_") for p in s.prompts}
    prompts = tuple(dict.fromkeys(p for n in names for p in sp[n].prompts))[:limit]
    if held_out.intersection(prompts):
        raise AnswerError("training prompts overlap the held-out test split")  # cannot happen; checked anyway
    record = {
        "splits": {n: sp[n].describe() for n in names},
        "split_rule": f"steer.calibrate.splits(seed={seed})[name] for name in {list(names)}; first {limit} "
                      "prompts in order; none is read by server/evaluation (steer eval) or bench/safety_eval.py",
        "count": len(prompts),
        "prompts_sha256": _sha("\n".join(prompts)),
        "prompt_sha256": [_sha(p) for p in prompts],
    }
    return prompts, record


def read_answers_file(path: str | Path, limit: int | None) -> Pairs:
    """User-supplied pairs: JSON lines with "prompt" and "answer" strings."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        pairs = [(str(r["prompt"]), str(r["answer"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnswerError(f"cannot read answers file {p}: each line must be a JSON object with \"prompt\" and "
                          f"\"answer\" ({e})") from None
    pairs = pairs[:limit]
    if not pairs:
        raise AnswerError(f"answers file {p} has no (prompt, answer) pairs")
    prov = {"source": "user file", "path": str(p), "file_sha256": _sha(text), "count": len(pairs),
            "prompts_sha256": _sha("\n".join(q for q, _ in pairs))}
    return Pairs(tuple(q for q, _ in pairs), tuple(a for _, a in pairs), prov)


# ----------------------------------------------------------------------------- refusal ablation


@torch.no_grad()
def orthogonalize(model: nn.Module, r: torch.Tensor, *, level: float = 0.0) -> None:
    """Project the unit direction r (d,) out of everything that writes into the residual stream.

    A tied lm_head is untied first (given its own copy): ablation removes r from the residual stream,
    not from the unembedding, exactly like the hook-based version. ``level``: the token embeddings' r
    part is set to this instead of 0, so the residual stream's r part is ``level`` everywhere (affine
    ablation).
    """
    arch = architecture(model.config.model_type)
    r = (r / r.norm()).float()
    embed = model.get_submodule(arch.embed)
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    e = embed.weight.float()  # (V, d)
    embed.weight.copy_(e - ((e @ r) - level)[:, None] * r[None, :])
    for layer in decoder_layers(model):
        for path in arch.residual_writers:
            lin = layer.get_submodule(path)
            w = lin.weight.float()  # (d, in): output rows live in the residual stream
            lin.weight.copy_(w - r[:, None] * (r @ w)[None, :])
            if lin.bias is not None:
                lin.bias.copy_(lin.bias.float() - r * (r @ lin.bias.float()))


def refusal_direction(model, tok, fp, vector_path: str | Path | None, *, explicit: bool) -> tuple[torch.Tensor, dict]:
    """(unit direction (d,), record). From the refusal vector made for this model (its steered layer
    nearest the middle), else (the default vector missing or made for other weights) the difference
    of means over ablate-llm's harmful/harmless prompts at layer L // 2."""
    from steer.vectors import SafetyVector, VectorError

    n_layers = len(decoder_layers(model))
    if vector_path is not None and Path(vector_path).exists():
        v = SafetyVector.load(vector_path)
        dirs = v.layer_directions() if v.kind == "activation" else {}
        if v.model == fp and dirs:
            layer = min(dirs, key=lambda ly: (abs(ly - n_layers / 2), ly))
            d = dirs[layer].float()
            return d / d.norm(), {"source": str(vector_path), "vector_sha256": v.sha256, "layer": layer,
                                  "how": f"layers.{layer} of the shipped activation vector, normalised"}
        if explicit:
            raise VectorError(f"{vector_path} is not an activation vector made for this model")
        log.warning("%s was made for other weights: computing the refusal direction by mean difference", vector_path)
    elif explicit:
        raise VectorError(f"refusal vector {vector_path} does not exist")
    return _mean_diff_direction(model, tok, n_layers // 2)


def _mean_diff_direction(model, tok, layer: int) -> tuple[torch.Tensor, dict]:
    from steer import data
    from steer.extract import mean_difference, residuals

    harmful, harmless = data.load("ablate_harmful"), data.load("ablate_harmless")
    rh = residuals(model, tok, harmful.prompts, desc="direction: harmful")[:, 0, layer]
    rb = residuals(model, tok, harmless.prompts, desc="direction: harmless")[:, 0, layer]
    d = mean_difference(rh, rb)
    return d / d.norm(), {"source": "mean difference", "layer": layer, "position": -1,
                          "datasets": [harmful.describe(), harmless.describe()],
                          "sha256": hashlib.sha256(d.numpy().tobytes()).hexdigest()}


@torch.no_grad()
def greedy_answers(model, tok, prompts: tuple[str, ...], max_tokens: int) -> list[str]:
    """Greedy completions of chat-formatted prompts, in batches of left-padded rows."""
    from steer.extract import chat_prompt_ids

    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = []
    for i in tqdm(range(0, len(prompts), GEN_BATCH), desc="answers (ablated model)", unit="batch"):
        rows = [chat_prompt_ids(tok, p) for p in prompts[i : i + GEN_BATCH]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(rows):
            ids[j, width - len(x):], mask[j, width - len(x):] = torch.tensor(x), 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad)
        out += [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def answer_dtype(device: str) -> torch.dtype:
    """The dtype the ablated model answers in: bf16 on a GPU and on CPUs with oneDNN bf16 kernels; float32
    on the rest (AVX2-only hosts), where a batched bf16 matmul has no fast kernel (measured on the demo
    model, 48 prompts: 5 min 54 s of answers in bf16, 2 min 14 s in float32; bench/RESULTS.md)."""
    from steer import hardware

    if device.startswith("cuda") or hardware.detect().onednn_bf16:
        return torch.bfloat16
    return torch.float32


def generated_pairs(model_dir: Path, fp, prompts: tuple[str, ...], prompt_record: dict, *, answer_tokens: int,
                    vector_path: str | Path | None, explicit_vector: bool, device: str, cache: Path) -> Pairs:
    """Answers by the refusal-ablated model, cached; refusals the judge still flags are dropped."""
    from steer.judge import is_refusal
    from steer.models import load_model

    dtype = answer_dtype(device)
    model, tok = load_model(model_dir, dtype=dtype)
    model.to(device)
    r, direction = refusal_direction(model, tok, fp, vector_path, explicit=explicit_vector)
    gen = {"model": "aligned model with the refusal direction orthogonalized out of embed_tokens, every "
                    "o_proj and every down_proj (Arditi et al. 2024)",
           "direction": direction, "decoding": "greedy", "answer_tokens": answer_tokens, "dtype": str(dtype),
           "direction_sha256": hashlib.sha256(r.float().cpu().numpy().tobytes()).hexdigest()}
    key = _sha(json.dumps({"model": fp.weights_sha256, "prompts": prompt_record["prompts_sha256"],
                           "generator": {k: v for k, v in gen.items() if k != "direction"}}, sort_keys=True))
    path = cache / f"answers-{key[:24]}.jsonl"
    if path.exists():
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        answers = [r_["answer"] for r_ in rows]
    else:
        orthogonalize(model, r.to(device))
        answers = greedy_answers(model, tok, prompts, answer_tokens)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers,
                                                                                         strict=True)))
        tmp.replace(path)
    del model
    keep = [(p, a) for p, a in zip(prompts, answers, strict=True) if a and not is_refusal(a)]
    if not keep:
        raise AnswerError("the ablated model refused every training prompt: no compliant answers to train on")
    prov = {"source": "generated", "prompts": prompt_record, "generator": gen, "cache_file": str(path),
            "generated": len(answers), "dropped_refusals_or_empty": len(answers) - len(keep), "count": len(keep),
            "pairs_sha256": _sha(json.dumps(keep))}
    return Pairs(tuple(p for p, _ in keep), tuple(a for _, a in keep), prov)
