"""A continuous-batching generation engine for transformers causal LMs with per-row steering.

One owner (a single thread) calls ``step()`` in a loop. Each step decodes one token for every running
row and, when prompts are waiting, prefills one chunk of them: at most ``max_step_tokens`` prompt
tokens (padding included, scaled to the layers the chunk runs), so a long prompt arriving stalls the
running streams for one chunk at a time, never for its whole prefill. New sequences are prefilled
together as one left-padded group; when the group's prefill is done it joins the running batch.
Sequences leave as soon as they finish or are cancelled, so a disconnected client frees its slot at
once. Every row carries its own sampling settings, stop conditions, vector and strength.

Gated vectors: a row is steered only if its prompt's residual at the gate layer passes the gate, and
then at every position of the prompt (a weight vector behind a gate: in the layers from the gate on).
With chunked prefill the decision must be known before any position is steered, so a group's
prefill runs in phases split at the gate layers: layers ``[0, g)``
over every chunk, then the gate, then layers ``[g, L)`` over every chunk (the hidden states at layer
``g`` are kept in between; a multi-layer gate keeps its earlier layers' residuals at the gate position as
the first phase passes them). The total work is one prefill, whatever the chunking.

Per row, per token, the work is O(1): text is detokenized incrementally and stop strings are matched
on the new text only. A failure in one row's sampling or text handling ends that row alone, with
finish reason ``"error"``.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from steer.detok import StopMatcher, detokenizer
from steer.forward import LayerRunner, attention_mask, positions
from steer.hooks import SteeringRuntime, gate_columns
from steer.types import SamplingParams, TokenLogprob

log = logging.getLogger("steer.engine")


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams
    vector: str = ""
    strength: float = 0.0
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    gate: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    rng: torch.Generator | None = None
    error: str | None = None  # what failed, when finish_reason == "error" (for the log, not the client)
    text: _Text | None = None
    # where sampling.prompt_logprobs is set: each prompt token's after the first, filled by the prefill and
    # sent with the row's first event (None: not asked for, or sent)
    prompt_lp: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Event:
    seq_id: int
    text: str  # new text since the previous event of this sequence
    n_tokens: int  # tokens generated so far
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error" | None while running
    # the tokens this event adds, where the row asked for logprobs (an end-of-sequence token that ends
    # the answer included, as vLLM gives it, though its text is not in the answer)
    logprobs: tuple[TokenLogprob, ...] = ()
    # on a row's first event, where it asked for prompt logprobs: those of its prompt tokens after the first
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


class _Text:
    """A row's text so far: incremental detokenization, then stop-string matching on the new text."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.detok = detokenizer(tokenizer)
        self.stops = StopMatcher(stops)

    def push(self, token: int) -> tuple[str, bool]:
        """(text that may be handed out now, whether a stop string ended the answer)."""
        return self.stops.push(self.detok.push(token))

    def finish(self) -> tuple[str, bool]:
        """At the end of the answer (EOS or length): everything still held back."""
        text, stopped = self.stops.push(self.detok.flush())
        return (text, True) if stopped else (text + self.stops.flush(), False)


# ---------------------------------------------------------------------------- batches


def _select_cache(cache: DynamicCache, idx: torch.Tensor) -> None:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def _left_pad(t: torch.Tensor, width: int, dim: int = -1) -> torch.Tensor:
    n = width - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Batch:
    """Running rows: their sequences, left-padded padding mask (B, T) and KV cache."""

    def __init__(self, seqs: list[Sequence], mask: torch.Tensor, cache: DynamicCache):
        self.seqs, self.mask, self.cache = seqs, mask, cache

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask = self.mask[idx]
        _select_cache(self.cache, idx)
        # drop leading columns that are padding for every remaining row
        valid_cols = self.mask.any(dim=0).nonzero()
        first = int(valid_cols[0]) if len(valid_cols) else self.mask.shape[1]
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def merge(self, other: _Batch) -> None:
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, width, dim=-2), _left_pad(b.keys, width, dim=-2)])
            a.values = torch.cat([_left_pad(a.values, width, dim=-2), _left_pad(b.values, width, dim=-2)])
        self.seqs += other.seqs


class _Prefill:
    """A group of new sequences being prefilled chunk by chunk, phase by phase.

    ``phases`` are layer ranges covering [0, L), split at the gate layers the group needs. ``hidden``
    (B, T, d) is the input of the current phase's first layer when that is not the embedding;
    ``outs`` collects the current phase's chunk outputs for the next phase."""

    def __init__(self, seqs: list[Sequence], pad_id: int, cache: DynamicCache, phases: list[tuple[int, int]]):
        width = max(len(s.prompt_ids) for s in seqs)
        self.ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        self.pad = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            self.ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            self.pad[i, width - len(s.prompt_ids) :] = 1
        self.pos = positions(self.pad)
        self.seqs, self.cache, self.phases = seqs, cache, phases
        self.phase, self.col = 0, 0
        self.hidden: torch.Tensor | None = None
        self.outs: list[torch.Tensor] = []
        # a multi-layer gate's residuals at its position, kept from the phases before its decision layer:
        # {(vector, layer): (B, d)}
        self.gate_parts: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in keep]
        self.ids, self.pad, self.pos = self.ids[idx], self.pad[idx], self.pos[idx]
        self.hidden = None if self.hidden is None else self.hidden[idx]
        self.outs = [o[idx] for o in self.outs]
        self.gate_parts = {k: v[idx] for k, v in self.gate_parts.items()}
        _select_cache(self.cache, idx)


# ---------------------------------------------------------------------------- engine


class Engine:
    def __init__(self, model, tokenizer, runtime: SteeringRuntime | None = None, *, max_batch_size: int = 16,
                 max_step_tokens: int = 256):
        self.model, self.tok, self.runtime = model, tokenizer, runtime
        self.runner = LayerRunner(model)
        self.lm_head = model.get_output_embeddings()
        self.max_batch_size, self.max_step_tokens = max_batch_size, max_step_tokens
        self.pending: deque[Sequence] = deque()
        self.batch: _Batch | None = None
        self.prefill: _Prefill | None = None
        self.last_step: dict = {}
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    # -- public -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.sampling.max_tokens is None or seq.sampling.max_tokens < 1:
            raise ValueError("max_tokens must be resolved to a positive int before a sequence is added")
        if not seq.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if seq.sampling.seed is not None:
            seq.rng = torch.Generator().manual_seed(seq.sampling.seed)
        seq.text = _Text(self.tok, seq.sampling.stop)
        seq.prompt_lp = [] if seq.sampling.prompt_logprobs is not None else None
        self.pending.append(seq)

    def cancel(self, seq_id: int) -> None:
        for s in self._all_seqs():
            if s.id == seq_id:
                s.cancelled = True

    @property
    def running(self) -> int:
        """Rows holding a batch slot: decoding, or being prefilled."""
        return (len(self.batch.seqs) if self.batch else 0) + (len(self.prefill.seqs) if self.prefill else 0)

    def has_work(self) -> bool:
        return bool(self.pending) or self.running > 0

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Decode one token for every running row, then prefill one chunk of waiting prompts."""
        events = self._drop_cancelled()
        self.last_step = {}  # what this step did (for slow-step logs)
        if self.batch is not None:
            self.last_step["decode"] = tuple(self.batch.mask.shape)  # (rows, columns)
            events += self._decode()
        if self.prefill is None and self.pending and self.running < self.max_batch_size:
            self.prefill = self._new_prefill()
        if self.prefill is not None:
            events += self._prefill_chunk()
        return events

    # -- scheduling --------------------------------------------------------------------------
    def _all_seqs(self):
        return itertools.chain(self.pending, self.batch.seqs if self.batch else (),
                               self.prefill.seqs if self.prefill else ())

    def _drop_cancelled(self) -> list[Event]:
        gone = [s for s in self._all_seqs() if s.cancelled]
        if not gone:
            return []
        for s in gone:
            s.finish_reason = "cancelled"
        self.pending = deque(s for s in self.pending if not s.cancelled)
        for holder in ("batch", "prefill"):
            group = getattr(self, holder)
            if group is not None and any(s.cancelled for s in group.seqs):
                keep = [i for i, s in enumerate(group.seqs) if not s.cancelled]
                if keep:
                    group.select(keep)
                else:
                    setattr(self, holder, None)
        return [Event(s.id, "", len(s.generated), "cancelled") for s in gone]

    def _new_prefill(self) -> _Prefill:
        room = self.max_batch_size - self.running
        seqs = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
        return _Prefill(seqs, self.pad_id, DynamicCache(config=self.model.config), self._phases(seqs))

    def _phases(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Layer ranges covering the decoder, split at the gate layers these rows need."""
        n = self.runner.num_layers
        cuts = sorted({g for g in self._gates_needed(seqs)} - {0, n})
        bounds = [0, *cuts, n]
        return list(itertools.pairwise(bounds))

    def _gates_needed(self, seqs: list[Sequence]) -> set[int]:
        if self.runtime is None:
            return set()
        st = self.runtime.steerers
        return {st[n].gate.layer for s in seqs if s.strength > 0
                for n in self.runtime.parts(s.vector) if n in st and st[n].gate is not None}

    # -- forward passes ----------------------------------------------------------------------
    def _decode(self) -> list[Event]:
        b = self.batch
        b.mask = torch.cat([b.mask, torch.ones((len(b.seqs), 1), dtype=b.mask.dtype)], dim=1)
        width = b.mask.shape[1]
        ids = torch.tensor([[s.generated[-1]] for s in b.seqs], dtype=torch.long)
        pos = (b.mask.sum(dim=1, keepdim=True) - 1).clamp_min(0)  # (B, 1)
        self._set_steering(b.seqs, decode=True)
        mask = None if bool(b.mask.all()) else attention_mask(b.mask, width - 1, 1)  # None: nothing to hide
        h = self.runner.run(self.runner.embed(ids), 0, self.runner.num_layers, positions=pos, mask=mask,
                            cache=b.cache)
        return self._advance(b.seqs, self._logits(h[:, -1]))

    def _prefill_chunk(self) -> list[Event]:
        """Run one chunk of the prefill group through its current phase; finish the group at the end."""
        p = self.prefill
        start, stop = p.phases[p.phase]
        B, T = len(p.seqs), p.width
        cols = max(1, self.max_step_tokens * self.runner.num_layers // (B * max(1, stop - start)))
        c0, c1 = p.col, min(T, p.col + cols)
        self.last_step["prefill"] = {"rows": B, "columns": (c0, c1), "layers": (start, stop)}
        h = p.hidden[:, c0:c1] if p.hidden is not None else self.runner.embed(p.ids[:, c0:c1])
        self._set_steering(p.seqs)
        # A first chunk with no padding is plain causal attention: no mask lets SDPA skip the blocks
        # above the diagonal (half the work of a 2000-token prompt's attention).
        mask = None if c0 == 0 and bool(p.pad[:, :c1].all()) else attention_mask(p.pad[:, :c1], c0, c1 - c0)
        h = self.runner.run(h, start, stop, positions=p.pos[:, c0:c1], mask=mask, cache=p.cache,
                            taps=self._gate_taps(p, start, stop, c0, c1))
        p.col = c1
        if stop < self.runner.num_layers:
            p.outs.append(h)
        else:
            self._prompt_logprobs(p, h, c0, c1)
        if c1 < T:
            return []
        if stop < self.runner.num_layers:  # the phase is done: its output feeds the next one
            p.hidden, p.outs, p.phase, p.col = torch.cat(p.outs, dim=1), [], p.phase + 1, 0
            self._decide_gates(p, stop)
            return []
        self.prefill = None
        new = _Batch(p.seqs, p.pad, p.cache)
        if self.batch is None:
            self.batch = new
        else:
            self.batch.merge(new)
        return self._advance(new.seqs, self._logits(h[:, -1]))

    def _gate_taps(self, p: _Prefill, start: int, stop: int, c0: int, c1: int) -> dict | None:
        """For a chunk (columns [c0, c1)) of a phase that runs a multi-layer gate's earlier layers: taps
        that keep, per row whose gate column is in the chunk, that layer's input there, in
        p.gate_parts[(vector, layer)] (B, d). Phases split only at gates' deciding layers, where
        _decide_gates reads the last part: a multi-layer gate costs no more phases than a one-layer one."""
        taps: dict = {}
        lens = None
        for name, st in (self.runtime.steerers.items() if self.runtime else ()):
            if st.gate is None or not any(start <= ly < stop for ly in st.gate.layers[:-1]):
                continue
            if not any(s.strength > 0 and name in self.runtime.parts(s.vector) for s in p.seqs):
                continue
            lens = p.pad.sum(dim=1) if lens is None else lens
            cols = gate_columns(p.width, st.gate.position, lens)
            rows = ((cols >= c0) & (cols < c1)).nonzero().flatten()
            if not len(rows):
                continue
            for ly in st.gate.layers[:-1]:
                if start <= ly < stop:
                    taps.setdefault(ly, []).append((name, rows, cols[rows] - c0))

        def tap_for(ly: int):
            def tap(h: torch.Tensor) -> None:
                for name, rows, at in taps[ly]:
                    part = p.gate_parts.get((name, ly))
                    if part is None:
                        part = p.gate_parts[(name, ly)] = h.new_zeros((len(p.seqs), h.shape[-1]))
                    part[rows] = h[rows, at]
            return tap

        return {ly: tap_for(ly) for ly in taps} or None

    def _decide_gates(self, p: _Prefill, layer: int) -> None:
        """At the end of a phase that stops before ``layer``: decide the gates of the vectors gated at
        ``layer``, from its input residuals (p.hidden) at the gate position (a multi-layer gate: and its
        earlier layers' inputs there, kept by _gate_taps)."""
        lens = p.pad.sum(dim=1)
        for name, st in (self.runtime.steerers.items() if self.runtime else ()):
            if st.gate is None or st.gate.layer != layer:
                continue
            rows = [i for i, s in enumerate(p.seqs) if s.strength > 0 and name in self.runtime.parts(s.vector)]
            if not rows:
                continue
            idx = torch.tensor(rows)
            parts = {ly: p.gate_parts.pop((name, ly))[idx] for ly in st.gate.layers[:-1] if (name, ly) in p.gate_parts}
            parts[layer] = p.hidden[idx, gate_columns(p.width, st.gate.position, lens[idx])]
            decided = st.gate.decide_from(parts).tolist()
            for i, f in zip(rows, decided, strict=True):
                seq = p.seqs[i]
                seq.gate[name] = float(f)
                if seq.vector != name and self.runtime.deciding(seq.vector) == name:
                    seq.gate[seq.vector] = float(f)  # a combination's decision: its first gated part's

    def _prompt_logprobs(self, p: _Prefill, h: torch.Tensor, c0: int, c1: int, piece: int = 256) -> None:
        """For the rows that ask for prompt logprobs: the log-probability of each prompt token whose
        predicting column (the one before it) is in this chunk of the last phase, under the model the row
        runs (steered rows: steered, as their prompt is), and the most likely tokens there. The LM head runs
        ``piece`` positions at a time, so a long chunk never holds more than ``piece`` x vocabulary logits."""
        width = p.width
        for i, s in enumerate(p.seqs):
            k = s.sampling.prompt_logprobs
            if s.prompt_lp is None or k is None:
                continue
            a, b = max(c0, width - len(s.prompt_ids)), min(c1, width - 1)
            for lo in range(a, b, piece):
                hi = min(b, lo + piece)
                logits = self._logits(h[i, lo - c0 : hi - c0])
                targets = p.ids[i, lo + 1 : hi + 1]
                chosen = logits.gather(1, targets[:, None])[:, 0].tolist()
                stats = _logprob_stats(logits, [k] * len(chosen))  # as a generated token's
                for t, c, (lse, top) in zip(targets.tolist(), chosen, stats, strict=True):
                    s.prompt_lp.append(TokenLogprob(t, c - lse, top))

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """(B, d) last-position residuals -> (B, V) float logits. Only the last position goes through
        the LM head (151936 x 896 per token on the demo model), as a contiguous 2-D input: a strided 3-D
        one sends matmul down a bmm path that copies the head weight."""
        return self.lm_head(self.runner.norm(h_last).contiguous()).float()

    def _set_steering(self, seqs: list[Sequence], *, decode: bool = False) -> None:
        """Per-row strengths, and gates where decided, for the forward pass about to run (``decode``: a
        pass of generated tokens only, where a two-sided gate may leave its lowered rows vanilla)."""
        if self.runtime is None:
            return
        rows = self.runtime.rows
        rows.reset(decode=decode)
        for name, st in self.runtime.steerers.items():
            s = torch.tensor([q.strength * self.runtime.parts(q.vector).get(name, 0.0) for q in seqs], dtype=torch.float32)
            if bool(s.any()):
                rows.strength[name] = s
                if st.gate_layer is not None:
                    rows.gate[name] = torch.tensor([q.gate.get(name, 0.0) for q in seqs], dtype=torch.float32)

    # -- tokens and text ---------------------------------------------------------------------
    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        raw = logits
        adjust = [i for i, s in enumerate(seqs) if s.sampling.adjusts_logits]
        if adjust:  # penalties and biases: on a copy, so that logprobs stay the model's own
            logits = logits.clone()
            for i in adjust:
                s = seqs[i]
                try:
                    _adjust_(logits[i], s.sampling, s.prompt_ids, s.generated)  # in place, in the copy
                except Exception as e:  # noqa: BLE001 - this row fails alone, as in _next_token
                    self._fail(s, e)
        best = logits.argmax(dim=-1).tolist()  # every greedy row at once (one pass over (B, V))
        stats = _logprob_stats(raw, [s.sampling.logprobs for s in seqs])
        events = [self._next_token(s, row, b, raw_row, st) if s.finish_reason != "error"
                  else Event(s.id, "", len(s.generated), "error")
                  for s, row, b, raw_row, st in zip(seqs, logits, best, raw, stats, strict=True)]
        done = [i for i, s in enumerate(self.batch.seqs) if s.finish_reason]
        if done:
            keep = [i for i, s in enumerate(self.batch.seqs) if not s.finish_reason]
            if keep:
                self.batch.select(keep)
            else:
                self.batch = None
        return events

    def _next_token(self, s: Sequence, logits: torch.Tensor, best: int, raw: torch.Tensor,
                    stats: tuple[float, tuple[tuple[int, float], ...]] | None) -> Event:
        """Sample, detokenize and check stop conditions for one row; a failure ends this row only.
        ``logits``: the row's after its penalties and biases; ``raw``: the model's; ``stats``: the row's
        log-normaliser and most likely tokens where it wants logprobs."""
        try:
            tok = best if s.sampling.greedy else _sample(logits, s.sampling, s.rng)
            s.generated.append(tok)
            ev = self._emit(s, tok)
            if s.prompt_lp is not None:  # the row's first event: its prompt's logprobs go with it
                ev, s.prompt_lp = replace(ev, prompt_logprobs=tuple(s.prompt_lp)), None
            if stats is not None:  # an end-of-sequence token too (vLLM lists it; lm-eval counts on the entry)
                lse, top = stats
                ev = replace(ev, logprobs=(TokenLogprob(tok, float(raw[tok]) - lse, top),))
            return ev
        except Exception as e:  # noqa: BLE001 - isolate the row; the caller reports it
            self._fail(s, e)
            return Event(s.id, "", len(s.generated), "error")

    @staticmethod
    def _fail(s: Sequence, e: Exception) -> None:
        log.exception("row %d failed", s.id)
        s.finish_reason, s.error = "error", f"{type(e).__name__}: {e}"

    def _emit(self, s: Sequence, tok: int) -> Event:
        if tok in self.eos_ids and not s.sampling.ignore_eos:
            text, stopped = s.text.finish()
            s.finish_reason = "stop"
        else:
            text, stopped = s.text.push(tok)
            if stopped:
                s.finish_reason = "stop"
            elif len(s.generated) >= s.sampling.max_tokens:
                text2, stopped = s.text.finish()
                text += text2
                s.finish_reason = "stop" if stopped else "length"
        return Event(s.id, text, len(s.generated), s.finish_reason)


def _sample(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator | None) -> int:
    """One token from (V,) float logits by temperature + nucleus sampling (greedy rows take the argmax)."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p
        keep[0] = True  # the top token, whatever top_p (a subnormal top_p is 0 in float32)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


def adjusted_logits(logits: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """(V,) float logits after ``p``'s logit biases, then its repetition penalty (tokens of the prompt or
    the answer: a positive logit divided by it, a negative one multiplied), then its frequency and
    presence penalties (tokens of the answer), in vLLM's order and by its definitions. A new tensor."""
    return _adjust_(logits.clone(), p, prompt, generated)


def _adjust_(out: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """:func:`adjusted_logits` in place on ``out``."""
    vocab = out.shape[-1]
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias, strict=True)
        out[torch.tensor(ids)] += torch.tensor(bias, dtype=out.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*prompt, *generated) if t < vocab}), dtype=torch.long)
        got = out[seen]
        out[seen] = torch.where(got > 0, got / p.repetition_penalty, got * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and generated:  # O(answer length), not O(vocabulary)
        ids, counts = torch.tensor(generated).unique(return_counts=True)
        keep = ids < vocab
        out[ids[keep]] -= p.frequency_penalty * counts[keep].to(out.dtype) + p.presence_penalty
    return out


def _logprob_stats(logits: torch.Tensor, ks: list[int | None]) -> list[tuple[float, tuple] | None]:
    """Per row of (B, V) float logits, where ``ks[i]`` is not None: its log-normaliser (logsumexp) and its
    ``ks[i]`` most likely tokens as (id, log-probability), before temperature and top_p; None elsewhere.
    One batched pass for all rows that want them; the log-softmax itself is never materialised."""
    want = [i for i, k in enumerate(ks) if k is not None]
    out: list[tuple[float, tuple] | None] = [None] * len(ks)
    if not want:
        return out
    rows = logits[want]
    lse = torch.logsumexp(rows, dim=-1)
    k_max = max(ks[i] for i in want)
    top = torch.topk(rows, k_max, dim=-1) if k_max else None
    for j, i in enumerate(want):
        pairs = ()
        if top is not None and ks[i]:
            pairs = tuple(zip(top.indices[j, : ks[i]].tolist(), (top.values[j, : ks[i]] - lse[j]).tolist(),
                              strict=True))
        out[i] = (float(lse[j]), pairs)
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
