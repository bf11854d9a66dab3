"""A continuous-batching generation engine for transformers causal LMs with per-row steering.

One owner (a single thread) calls ``step()`` in a loop. Each step either prefills the sequences that
arrived since the last step (as one left-padded batch) and merges them into the running batch, or
decodes one token for every running sequence. Sequences leave the batch as soon as they finish or are
cancelled, so a disconnected client frees its slot at once. Every row carries its own sampling
settings, stop conditions, vector and strength; steering inputs are set on the runtime's
``RowSteering`` before each forward pass.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from steer.hooks import SteeringRuntime
from steer.types import SamplingParams


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams
    vector: str = ""
    strength: float = 0.0
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already handed out
    finish_reason: str | None = None
    gate: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    rng: torch.Generator | None = None


@dataclass(frozen=True)
class Event:
    seq_id: int
    text: str  # new text since the previous event of this sequence
    n_tokens: int  # tokens generated so far
    finish_reason: str | None  # "stop" | "length" | "cancelled" | None while running


class _Batch:
    """Running rows: their sequences, left-padded attention mask (B, T) and KV cache."""

    def __init__(self, seqs: list[Sequence], mask: torch.Tensor, cache: DynamicCache):
        self.seqs, self.mask, self.cache = seqs, mask, cache

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask = self.mask[idx]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        # drop leading columns that are padding for every remaining row
        valid_cols = self.mask.any(dim=0).nonzero()
        first = int(valid_cols[0]) if len(valid_cols) else self.mask.shape[1]
        if first > 0:
            self._crop_left(first)

    def _crop_left(self, n: int) -> None:
        self.mask = self.mask[:, n:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., n:, :], layer.values[..., n:, :]

    def merge(self, other: _Batch) -> None:
        t_self, t_other = self.mask.shape[1], other.mask.shape[1]
        width = max(t_self, t_other)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, width, dim=-2), _left_pad(b.keys, width, dim=-2)])
            a.values = torch.cat([_left_pad(a.values, width, dim=-2), _left_pad(b.values, width, dim=-2)])
        self.seqs += other.seqs


def _left_pad(t: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    n = width - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    def __init__(self, model, tokenizer, runtime: SteeringRuntime | None = None, *, max_batch_size: int = 16):
        self.model, self.tok, self.runtime = model, tokenizer, runtime
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        self.max_batch_size = max_batch_size
        self.pending: deque[Sequence] = deque()
        self.batch: _Batch | None = None
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    # -- public -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.sampling.max_tokens is None or seq.sampling.max_tokens < 1:
            raise ValueError("max_tokens must be resolved to a positive int before a sequence is added")
        if seq.sampling.seed is not None:
            seq.rng = torch.Generator().manual_seed(seq.sampling.seed)
        self.pending.append(seq)

    def cancel(self, seq_id: int) -> None:
        for s in itertools.chain(self.pending, self.batch.seqs if self.batch else ()):
            if s.id == seq_id:
                s.cancelled = True

    @property
    def running(self) -> int:
        return len(self.batch.seqs) if self.batch else 0

    def has_work(self) -> bool:
        return bool(self.pending) or self.running > 0

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Prefill newly arrived sequences if there is room, otherwise decode one token for all rows."""
        events = self._drop_cancelled_pending()
        room = self.max_batch_size - self.running
        if self.pending and room > 0:
            new = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
            events += self._prefill(new)
        elif self.batch:
            events += self._decode()
        return events

    # -- internals ---------------------------------------------------------------------------
    def _drop_cancelled_pending(self) -> list[Event]:
        gone = [s for s in self.pending if s.cancelled]
        for s in gone:
            self.pending.remove(s)
        return [Event(s.id, "", 0, "cancelled") for s in gone]

    def _prefill(self, seqs: list[Sequence]) -> list[Event]:
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids) :] = 1
        new = _Batch(seqs, mask, DynamicCache(config=self.model.config))
        logits = self._forward(new, ids, prefill=True)
        if self.batch is None:
            self.batch = new
        else:
            self.batch.merge(new)
        return self._advance(new.seqs, logits)

    def _decode(self) -> list[Event]:
        b = self.batch
        last = torch.tensor([[s.generated[-1]] for s in b.seqs], dtype=torch.long)
        logits = self._forward(b, last, prefill=False)
        return self._advance(b.seqs, logits)

    def _forward(self, b: _Batch, ids: torch.Tensor, *, prefill: bool) -> torch.Tensor:
        """Run ids (B, t) through the model, extending b.mask and b.cache; returns (B, V) last logits."""
        if not prefill:
            b.mask = torch.cat([b.mask, torch.ones((len(b.seqs), 1), dtype=b.mask.dtype)], dim=1)
        # position of each new token = number of real tokens before it in its row
        pos = (b.mask.cumsum(dim=1) - 1).clamp_min(0)[:, -ids.shape[1] :]
        self._set_steering(b.seqs, prefill, b.mask.sum(dim=1) if prefill else None)
        # The decoder, then the LM head on each row's last position only: a prefill never needs the
        # logits of its prompt positions (151936 x 896 per token on the demo model). The (B, d) slice is
        # made contiguous: a strided 3-D input sends matmul down a bmm path that copies the head weight.
        out = self.decoder(input_ids=ids, attention_mask=b.mask, position_ids=pos, past_key_values=b.cache,
                           use_cache=True)
        if prefill and self.runtime is not None:
            for name, g in self.runtime.rows.gate_out.items():
                for s, v in zip(b.seqs, g.tolist(), strict=True):
                    s.gate[name] = v
        return self.lm_head(out.last_hidden_state[:, -1, :].contiguous()).float()

    def _set_steering(self, seqs: list[Sequence], prefill: bool, prompt_lens: torch.Tensor | None) -> None:
        if self.runtime is None:
            return
        rows = self.runtime.rows
        rows.reset(prefill=prefill, prompt_lens=prompt_lens)
        for name in self.runtime.steerers:
            s = torch.tensor([q.strength if q.vector == name else 0.0 for q in seqs])
            if bool(s.any()):
                rows.strength[name] = s
                if not prefill:
                    rows.gate[name] = torch.tensor([q.gate.get(name, 0.0) for q in seqs])

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        events = []
        for s, row in zip(seqs, logits, strict=True):
            tok = _sample(row, s.sampling, s.rng)
            s.generated.append(tok)
            events.append(self._emit(s, tok))
        finished = {s.id for s in self.batch.seqs if s.finish_reason or s.cancelled}
        if finished:
            keep = [i for i, s in enumerate(self.batch.seqs) if s.id not in finished]
            if keep:
                self.batch.select(keep)
            else:
                self.batch = None
        return events

    def _emit(self, s: Sequence, tok: int) -> Event:
        if s.cancelled:
            s.finish_reason = "cancelled"
            return Event(s.id, "", len(s.generated), "cancelled")
        hit_eos = tok in self.eos_ids and not s.sampling.ignore_eos
        ids = s.generated[:-1] if hit_eos else s.generated
        text = self.tok.decode(ids, skip_special_tokens=True)
        stop_at = _find_stop(text, s.sampling.stop, s.emitted)
        if stop_at is not None:
            text, s.finish_reason = text[:stop_at], "stop"
        elif hit_eos:
            s.finish_reason = "stop"
        elif len(s.generated) >= s.sampling.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is None:
            # hold back an incomplete UTF-8 character and anything that may start a stop string
            hold = max((len(x) - 1 for x in s.sampling.stop), default=0)
            safe = len(text.rstrip("\ufffd")) - hold
            text = text[: max(safe, s.emitted)]
        delta, s.emitted = text[s.emitted :], max(len(text), s.emitted)
        return Event(s.id, delta, len(s.generated), s.finish_reason)


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    hits = [i for x in stops if (i := text.find(x, max(0, emitted - len(x)))) >= 0]
    return min(hits) if hits else None


def _sample(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator | None) -> int:
    """One token from (V,) float logits: argmax when greedy, else temperature + nucleus sampling."""
    if p.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
