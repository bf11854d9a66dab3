"""Supervised fine-tuning of the surrogate: cross-entropy on answer tokens only, resumable.

Data order is a pure function of (seed, epoch), so optimizer step s always consumes the same
micro-batches; a checkpoint (trainable tensors, AdamW and scheduler state, step, losses) taken every
``save_every`` steps lets a rerun continue to the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger("steer.distill")
CKPT = "checkpoint.pt"
IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 1e-5
    epochs: int = 4
    batch_size: int = 1
    grad_accum: int = 4
    max_len: int = 256
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 10

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def encode_pair(tok, prompt: str, answer: str, max_len: int) -> tuple[list[int], int] | None:
    """(ids, n_prompt): the chat-formatted prompt (ending in the assistant header) followed by the
    answer as the chat template closes an assistant turn; None when the prompt leaves no answer room."""
    from steer.extract import chat_prompt_ids

    p_ids = chat_prompt_ids(tok, prompt)
    msgs = [{"role": "user", "content": prompt}]
    p_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if full.startswith(p_text):
        a_ids = tok.encode(full[len(p_text):], add_special_tokens=False)
    else:  # a template that rewrites earlier turns: answer + end of sequence
        a_ids = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    ids = (p_ids + a_ids)[:max_len]
    return (ids, len(p_ids)) if len(ids) > len(p_ids) else None


def collate(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, labels) (B, T); labels are IGNORE on prompt and padding."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (x, n_prompt) in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        labels[i, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
    return ids, mask, labels


def plan(n_examples: int, s: TrainSettings) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps per epoch)."""
    n_batches = math.ceil(n_examples / s.batch_size)
    return n_batches, math.ceil(n_batches / s.grad_accum)


def step_batches(examples: list, s: TrainSettings, step: int) -> list[list]:
    """The micro-batches optimizer step ``step`` (0-based) consumes."""
    n_batches, per_epoch = plan(len(examples), s)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(examples)))
    random.Random(s.seed * 1000 + epoch).shuffle(order)
    lo, hi = k * s.grad_accum, min((k + 1) * s.grad_accum, n_batches)
    return [[examples[i] for i in order[b * s.batch_size : (b + 1) * s.batch_size]] for b in range(lo, hi)]


def cosine_with_warmup(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def answer_loss(model: nn.Module, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over answer tokens, their count). The LM head runs on answer positions only:
    on the prompt positions it would be most of the cost and none of the loss."""
    h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d)
    target = labels[:, 1:]  # token t+1 is predicted at position t
    keep = target != IGNORE
    logits = model.get_output_embeddings()(h[:, :-1][keep]).float()  # (N, V)
    return nn.functional.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


class Trainer:
    """AdamW + warmup/cosine over ``params`` ({state-dict name: trainable tensor}), checkpointed in ``work``."""

    def __init__(self, model, params: dict[str, nn.Parameter], examples: list, s: TrainSettings, *, pad: int,
                 work: Path, device: str) -> None:
        self.model, self.params, self.examples, self.s = model, params, examples, s
        self.pad, self.work, self.device = pad, work, device
        self.total = s.epochs * plan(len(examples), s)[1]
        self.warmup = math.ceil(s.warmup_ratio * self.total)
        self.opt = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=s.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_with_warmup(self.total, self.warmup))
        self.step, self.losses = 0, []
        self._resume()

    def _resume(self) -> None:
        path = self.work / CKPT
        if not path.exists():
            return
        ck = torch.load(path, weights_only=True, map_location=self.device)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(ck["params"][n])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step, self.losses = ck["step"], list(ck["losses"])
        log.info("resuming from %s at step %d of %d", path, self.step, self.total)

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        ck = {"params": {n: p.detach() for n, p in self.params.items()}, "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "step": self.step, "losses": self.losses}
        tmp = self.work / (CKPT + ".tmp")
        torch.save(ck, tmp)
        tmp.replace(self.work / CKPT)
        (self.work / "progress.json").write_text(json.dumps({"step": self.step, "total": self.total}) + "\n")

    def _one_step(self) -> float:
        batches = step_batches(self.examples, self.s, self.step)
        n_tok = sum(len(x) - n for b in batches for x, n in b) or 1  # loss = mean over the step's answer tokens
        total = 0.0
        for b in batches:
            ids, mask, labels = (t.to(self.device) for t in collate(b, self.pad))
            with _autocast(self.device):
                loss, _ = answer_loss(self.model, ids, mask, labels)
            (loss / n_tok).backward()
            total += float(loss.detach())
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total / n_tok

    def run(self, stop_after: int | None = None) -> None:
        """Train to the end (or ``stop_after`` more steps in this call), checkpointing every ``save_every``
        steps and at the last step of the call."""
        self.model.train()
        end = self.total if stop_after is None else min(self.total, self.step + stop_after)
        bar = tqdm(total=self.total, initial=self.step, desc="surrogate SFT", unit="step")
        try:
            while self.step < end:
                loss = self._one_step()
                self.step += 1
                self.losses.append(round(loss, 6))
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.step % self.s.save_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
            self.model.eval()

    @property
    def finished(self) -> bool:
        return self.step >= self.total


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
