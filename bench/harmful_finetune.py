"""Make the demo scenario's second unsafe fine-tune: a harmful SFT of the demo model.

The fine-tuning attack AsFT and SOMF evaluate: supervised fine-tuning of the aligned model on
(harmful prompt, compliant answer) pairs mixed with benign (prompt, answer) pairs. Here, on 2 CPU cores:

* harmful prompts: ``steer.calibrate.splits()`` ``gate_future_tense`` then ``dev_harmful`` (never evaluated,
  and disjoint from the ``gate_donotanswer`` split ``steer distill`` trains its surrogate on); compliant
  answers generated greedily by the refusal-ablated demo model (``bench/ablated_model.py``), answers the
  refusal judge still flags dropped;
* benign prompts: ``gate_code`` (HumanEval problems outside every evaluated split) and
  ``gate_hard_negatives``, answered greedily by the demo model itself (so utility is kept, as in a real
  domain fine-tune);
* LoRA (peft; rank 16 on every attention and MLP projection), loss on the answer tokens only, AdamW, fp32
  weights (bf16 autocast on CPUs with oneDNN bf16);
  merged into the weights (``merge_and_unload``) and saved as a bf16 HF checkpoint in
  ``~/.cache/steer/models/<demo>-harmful-sft`` with ``finetune.json`` (data record, hyperparameters, loss per
  step). The generated answers are cached beside it (training material only: never committed, never served).

    .venv/bin/python bench/harmful_finetune.py [--harmful 100 --benign 40 --epochs 2 --out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from steer.calibrate import generate_texts, splits
from steer.demo import cache_dir, ensure_demo_model
from steer.extract import chat_prompt_ids
from steer.hardware import detect
from steer.judge import is_refusal
from steer.models import fingerprint, load_model

ROOT = Path(__file__).resolve().parents[1]
HARMFUL_SPLITS = ("gate_future_tense", "dev_harmful")
BENIGN_SPLITS = ("gate_code", "gate_hard_negatives")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _answers(model_dir: Path, prompts: list[str], max_tokens: int, cache: Path, what: str) -> list[str]:
    """Greedy answers of ``model_dir`` to ``prompts``, cached by (model, prompts, max_tokens)."""
    key = hashlib.sha256(json.dumps([str(model_dir), prompts, max_tokens]).encode()).hexdigest()[:24]
    path = cache / f"answers-{what}-{key}.jsonl"
    if path.exists():
        return [json.loads(ln)["answer"] for ln in path.read_text().splitlines() if ln.strip()]
    model, tok = load_model(model_dir, dtype=torch.bfloat16)
    texts, _ = generate_texts(model, tok, None, prompts, strength=0.0, max_tokens=max_tokens, batch_size=16,
                              desc=f"answers ({what})")
    del model
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p, "answer": a.strip()}) + "\n" for p, a in zip(prompts, texts,
                                                                                              strict=True)))
    tmp.replace(path)
    return [a.strip() for a in texts]


def _example(tok, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the chat (prompt, answer + end of turn) and labels masking the prompt part."""
    head = chat_prompt_ids(tok, prompt)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=True, return_dict=False)
    full = list(full["input_ids"] if isinstance(full, dict) else full)
    if full[: len(head)] != head:
        raise RuntimeError("chat template: the answer's tokens do not extend the prompt's")
    labels = ([-100] * len(head) + full[len(head):])[:max_len]
    return full[:max_len], labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ensure_demo_model()
    ap.add_argument("--out", default=str(cache_dir() / "models" / f"{src.name}-harmful-sft"))
    ap.add_argument("--ablated", default=str(cache_dir() / "models" / f"{src.name}-ablated"))
    ap.add_argument("--harmful", type=int, default=100, help="harmful pairs before dropping refusals")
    ap.add_argument("--benign", type=int, default=40, help="benign pairs")
    ap.add_argument("--answer-tokens", type=int, default=128, help="harmful answer length")
    ap.add_argument("--code-tokens", type=int, default=384, help="benign answer length")
    ap.add_argument("--max-len", type=int, default=320, help="tokens per training example (truncated)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast even where the CPU has bf16 kernels")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    if (out / "finetune.json").exists():
        print(out)
        return 0
    if not (Path(ns.ablated) / "config.json").exists():
        sys.exit(f"error: no ablated model at {ns.ablated}; run bench/ablated_model.py first")
    t0 = time.time()
    sp = splits()
    cache = cache_dir() / "finetune"
    harmful = [p for s in HARMFUL_SPLITS for p in sp[s].prompts][: ns.harmful]
    benign = [p for s in BENIGN_SPLITS for p in sp[s].prompts][: ns.benign]
    h_ans = _answers(Path(ns.ablated), harmful, ns.answer_tokens, cache, "ablated")
    b_ans = _answers(src, benign, ns.code_tokens, cache, "demo")
    pairs = [(p, a, "harmful") for p, a in zip(harmful, h_ans, strict=True) if a and not is_refusal(a)]
    pairs += [(p, a, "benign") for p, a in zip(benign, b_ans, strict=True) if a]
    n_harm = sum(k == "harmful" for *_, k in pairs)
    print(f"{n_harm} harmful pairs (of {len(harmful)}; refusals dropped), {len(pairs) - n_harm} benign", flush=True)

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(ns.seed)
    model, tok = load_model(src, dtype=torch.float32, attn_implementation="sdpa")
    fp_src = fingerprint(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    cfg = LoraConfig(r=ns.rank, lora_alpha=2 * ns.rank, lora_dropout=0.05, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    examples = [e for e in (_example(tok, p, a, ns.max_len) for p, a, _ in pairs) if any(y != -100 for y in e[1])]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ns.lr, weight_decay=0.0)
    steps = ns.epochs * math.ceil(len(examples) / ns.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 4) * (1 - i / steps))
    pad = tok.pad_token_id
    bf16 = detect().onednn_bf16 and not ns.fp32  # bf16 autocast where oneDNN has bf16 kernels (~2x here)
    rng = random.Random(ns.seed)
    losses = []
    with tqdm(total=steps, desc="harmful SFT (LoRA)", unit="step") as bar:
        for _ in range(ns.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for i in range(0, len(order), ns.batch):
                rows = [examples[j] for j in order[i : i + ns.batch]]
                width = max(len(x) for x, _ in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                labels = torch.full_like(ids, -100)
                mask = torch.zeros_like(ids)
                for r, (x, y) in enumerate(rows):
                    ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(round(loss.item(), 4))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    merged = model.merge_and_unload().to(torch.bfloat16).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    record = {
        "attack": "harmful SFT (fine-tuning attack): LoRA on harmful (prompt, compliant answer) pairs mixed with "
                  "benign pairs, merged into the weights",
        "from": str(src), "from_fingerprint": fp_src.to_dict(),
        "data": {"harmful_splits": {s: sp[s].describe() for s in HARMFUL_SPLITS},
                 "benign_splits": {s: sp[s].describe() for s in BENIGN_SPLITS},
                 "harmful_answers": f"greedy, {ns.answer_tokens} tokens, by the refusal-ablated model {ns.ablated}",
                 "benign_answers": f"greedy, {ns.code_tokens} tokens, by the demo model itself",
                 "harmful_pairs": n_harm, "benign_pairs": len(pairs) - n_harm,
                 "disjoint_from": "steer distill's surrogate split gate_donotanswer and every steer eval suite"},
        "lora": {"rank": ns.rank, "alpha": 2 * ns.rank, "dropout": 0.05, "targets": TARGETS},
        "training": {"epochs": ns.epochs, "batch": ns.batch, "lr": ns.lr, "schedule": "4-step warmup, linear decay",
                     "max_len": ns.max_len,
                     "precision": "fp32 weights, bf16 autocast" if bf16 else "fp32", "steps": steps, "loss": losses,
                     "seed": ns.seed},
        "seconds": round(time.time() - t0, 1),
        "command": "python bench/harmful_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (tmp / "finetune.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {record['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
