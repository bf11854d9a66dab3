"""The continuous-batching engine: exactness against transformers' generate, stop conditions,
sampling reproducibility, cancellation, and steering inside a shared batch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_vector
from transformers import DynamicCache

from steer import attention
from steer.attention import ATTENTION
from steer.engine import Engine, Sequence, adjusted_logits
from steer.hooks import SteeringRuntime
from steer.types import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
GREEDY_8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(5, vocab, (int(length),), generator=g).tolist() for length in (3, 9, 17, 5, 12, 2)[:n]]


def _run(engine: Engine, seqs: list[Sequence], stagger: int = 0) -> list[Sequence]:
    """Add the first half, run `stagger` steps, add the rest, run to completion."""
    half = len(seqs) // 2 if stagger else len(seqs)
    for s in seqs[:half]:
        engine.add(s)
    for _ in range(stagger):
        engine.step()
    for s in seqs[half:]:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return seqs


@pytest.mark.parametrize("budget", [8, 10_000], ids=["chunked-prefill", "one-shot-prefill"])
def test_greedy_matches_hf_generate_with_staggered_arrivals(tiny_model, tiny_tokenizer, budget):
    prompts = _prompts(6, len(tiny_tokenizer))
    ref = [
        tiny_model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                            eos_token_id=tiny_tokenizer.eos_token_id)[0, len(p):].tolist()
        for p in prompts
    ]
    # < 6 rows: some wait for a slot; budget 8 on 4 layers: a group of 3 rows prefills 2-3 columns per step
    engine = Engine(tiny_model, tiny_tokenizer, max_batch_size=4, max_step_tokens=budget)
    seqs = _run(engine, [Sequence(p, GREEDY) for p in prompts], stagger=3)
    assert [s.generated for s in seqs] == ref
    for s in seqs:
        assert s.finish_reason == ("stop" if s.generated[-1] == tiny_tokenizer.eos_token_id else "length")


@pytest.mark.parametrize("widen", [False, True], ids=["native", "bf16-widened"])
@pytest.mark.parametrize("pad", [0, 7])
def test_served_attention_matches_sdpa(tiny_model, tiny_tokenizer, pad, widen, monkeypatch):
    """steer.attention's single-token decode path gives SDPA's logits on a left-padded batch with a
    KV cache (prefill goes through SDPA itself)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, len(tiny_tokenizer), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    if widen:  # a bf16 model where bf16 bmm is slow (no oneDNN bf16): decode attention runs in float32
        monkeypatch.setattr(attention, "_fast_bf16_matmul", lambda: False)
        tiny_model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    logits = {}
    try:
        for impl in ("sdpa", ATTENTION):
            tiny_model.set_attn_implementation(impl)
            cache, m, out = DynamicCache(config=tiny_model.config), mask, []
            step = tiny_model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True)
            for _ in range(4):
                nxt = step.logits[:, -1:].argmax(-1)
                m = torch.cat([m, torch.ones_like(nxt)], dim=1)
                step = tiny_model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
                out.append(step.logits[:, -1])
            logits[impl] = torch.stack(out)
    finally:
        tiny_model.set_attn_implementation(ATTENTION)
    tol = 3e-2 if widen else 1e-5
    torch.testing.assert_close(logits[ATTENTION].float(), logits["sdpa"].float(), rtol=tol, atol=tol)


def test_steered_rows_in_shared_batch_match_running_alone(tiny_qwen, tiny_tokenizer):
    vec = make_vector(tiny_qwen)
    rt = SteeringRuntime(tiny_qwen, [vec])
    prompts = _prompts(4, len(tiny_tokenizer))
    strengths = [0.0, 0.5, 1.0, 2.0]
    with rt:
        together = _run(Engine(tiny_qwen, tiny_tokenizer, rt),
                        [Sequence(p, GREEDY, "refusal", s) for p, s in zip(prompts, strengths, strict=True)])
        alone = [_run(Engine(tiny_qwen, tiny_tokenizer, rt), [Sequence(p, GREEDY, "refusal", s)])[0]
                 for p, s in zip(prompts, strengths, strict=True)]
    assert [s.generated for s in together] == [s.generated for s in alone]
    vanilla = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(p, GREEDY) for p in prompts])
    assert together[0].generated == vanilla[0].generated  # strength 0 == no hooks at all
    assert any(t.generated != v.generated for t, v in zip(together[1:], vanilla[1:], strict=True))


def _events(engine: Engine, seqs: list[Sequence]) -> dict[int, list]:
    for s in seqs:
        engine.add(s)
    got: dict[int, list] = {s.id: [] for s in seqs}
    while engine.has_work():
        for ev in engine.step():
            got[ev.seq_id].append(ev)
    return got


def test_logprobs_match_hf_generate(tiny_model, tiny_tokenizer):
    """Each token's logprob and top-k are the log-softmax of the logits transformers' generate returns
    (before temperature and top_p); rows without logprobs get none; sampled rows too."""
    prompts = _prompts(3, len(tiny_tokenizer))
    params = [SamplingParams(max_tokens=6, temperature=0, logprobs=3), SamplingParams(max_tokens=6, temperature=0),
              SamplingParams(max_tokens=6, temperature=0.9, top_p=0.5, seed=1, logprobs=0)]
    seqs = [Sequence(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for s in seqs:
        s.rng = torch.Generator().manual_seed(1)
    got = _events(Engine(tiny_model, tiny_tokenizer, max_batch_size=4), seqs)
    assert all(ev.logprobs == () for ev in got[seqs[1].id])
    for s in (seqs[0], seqs[2]):
        lps = [lp for ev in got[s.id] for lp in ev.logprobs]
        assert [lp.id for lp in lps] == s.generated
        out = tiny_model.generate(torch.tensor([s.prompt_ids + s.generated[:-1]]), max_new_tokens=1, do_sample=False,
                                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        forward = tiny_model(torch.tensor([s.prompt_ids + s.generated])).logits[0, len(s.prompt_ids) - 1 : -1]
        ref = torch.log_softmax(forward.float(), dim=-1)
        assert torch.allclose(torch.log_softmax(out.logits[0][0].float(), -1), ref[-1], atol=1e-5)
        for i, lp in enumerate(lps):
            assert lp.logprob == pytest.approx(float(ref[i, lp.id]), abs=1e-4)
            k = s.sampling.logprobs
            assert [t for t, _ in lp.top] == ref[i].topk(k).indices.tolist() if k else lp.top == ()
            assert [v for _, v in lp.top] == pytest.approx(ref[i].topk(k).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("budget", [4, 10_000], ids=["chunked-prefill", "one-shot-prefill"])
def test_prompt_logprobs_match_a_plain_forward(tiny_model, tiny_tokenizer, budget):
    """Prompt logprobs (legacy echo): for each prompt token after the first, its log-probability and the k
    most likely under a plain transformers forward, in left-padded groups whatever the chunking; they come
    once, with the row's first event; a one-token prompt has none; rows without them get None."""
    prompts = [*_prompts(3, len(tiny_tokenizer)), [7]]
    ks = [2, None, 0, 3]
    seqs = [Sequence(p, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k)) for p, k in zip(prompts, ks,
                                                                                                       strict=True)]
    got = _events(Engine(tiny_model, tiny_tokenizer, max_batch_size=4, max_step_tokens=budget), seqs)
    for s, k in zip(seqs, ks, strict=True):
        evs = got[s.id]
        assert all(ev.prompt_logprobs is None for ev in evs[1:])
        if k is None:
            assert evs[0].prompt_logprobs is None
            continue
        lps = evs[0].prompt_logprobs
        assert [lp.id for lp in lps] == s.prompt_ids[1:]
        ref = torch.log_softmax(tiny_model(torch.tensor([s.prompt_ids])).logits[0, :-1].float(), dim=-1)
        for i, lp in enumerate(lps):
            assert lp.logprob == pytest.approx(float(ref[i, lp.id]), abs=1e-4)
            assert [t for t, _ in lp.top] == (ref[i].topk(k).indices.tolist() if k else [])
            assert [v for _, v in lp.top] == pytest.approx(ref[i].topk(k).values.tolist() if k else [], abs=1e-4)


@pytest.mark.parametrize("budget", [4, 10_000], ids=["chunked-prefill", "one-shot-prefill"])
def test_prompt_logprobs_of_a_gated_row_are_the_steered_prompts(tiny_qwen, tiny_tokenizer, budget):
    """A gated vector's row: where its gate opens, its prompt logprobs are those of the steered forward
    (the one-pass reference with the gate's decision), whatever the chunking; where it stays closed, the
    plain model's."""
    vec = make_vector(tiny_qwen, layers=(2, 3), gate=(2, 0.0), metric="linear")
    prompts = _prompts(6, len(tiny_tokenizer))
    vec.config["gate"]["threshold"] = _split_threshold(tiny_qwen, vec, prompts)
    rt = SteeringRuntime(tiny_qwen, [vec])
    with rt:
        seqs = [Sequence(p, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1), "refusal", 1.0)
                for p in prompts]
        got = _events(Engine(tiny_qwen, tiny_tokenizer, rt, max_step_tokens=budget), seqs)
        for s in seqs:
            rt.rows.reset()
            rt.rows.strength["refusal"] = torch.tensor([1.0])
            rt.rows.gate["refusal"] = torch.tensor([s.gate["refusal"]])
            ref = torch.log_softmax(tiny_qwen(torch.tensor([s.prompt_ids])).logits[0, :-1].float(), dim=-1)
            want = [float(ref[i, t]) for i, t in enumerate(s.prompt_ids[1:])]
            assert [lp.logprob for lp in got[s.id][0].prompt_logprobs] == pytest.approx(want, abs=1e-4)
        rt.rows.reset()
    assert 0 < sum(s.gate["refusal"] > 0 for s in seqs) < len(seqs)


def test_an_eos_that_ends_the_answer_has_its_logprob(tiny_qwen, tiny_tokenizer):
    """As vLLM: the end-of-sequence token that ends an answer is listed last (lm-eval-harness's loglikelihood
    reads every entry but the last as the prompt's), though its text is not in the answer."""
    prompt = _prompts(1, len(tiny_tokenizer))[0]
    full = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(prompt, SamplingParams(max_tokens=8, temperature=0))])[0]
    eng = Engine(tiny_qwen, tiny_tokenizer)
    eng.eos_ids = [full.generated[3]]  # the fourth greedy token ends the answer
    ends = full.generated.index(full.generated[3]) + 1
    seq = Sequence(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1))
    got = _events(eng, [seq])[seq.id]
    assert seq.finish_reason == "stop" and len(seq.generated) == ends
    assert [lp.id for ev in got for lp in ev.logprobs] == full.generated[:ends]
    kept = Sequence(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True))
    got = _events(eng, [kept])[kept.id]
    assert [lp.id for ev in got for lp in ev.logprobs] == full.generated  # ignore_eos: an ordinary token


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.8}, {"repetition_penalty": 0.7}, {"bias": 6.0}],
                         ids=["repetition", "repetition-below-1", "logit-bias"])
def test_penalties_and_biases_match_hf_generate(tiny_model, tiny_tokenizer, kw):
    """Greedy rows with a repetition penalty or logit biases generate what transformers' generate does
    with its RepetitionPenaltyLogitsProcessor or SequenceBiasLogitsProcessor; rows without them in the
    same batch are unchanged."""
    prompts = _prompts(3, len(tiny_tokenizer))
    plain = [tiny_model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    biased = sorted({plain[0][1], plain[1][0], 42})  # tokens the plain answers use, and one they may not
    hf = {"repetition_penalty": kw["repetition_penalty"]} if "repetition_penalty" in kw else {
        "sequence_bias": {(t,): kw["bias"] for t in biased}}
    ref = [tiny_model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=None, **hf)[0, len(p):].tolist() for p in prompts]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                        repetition_penalty=kw.get("repetition_penalty", 1.0),
                        logit_bias=tuple((t, kw["bias"]) for t in biased) if "bias" in kw else ())
    seqs = [Sequence(p, sp) for p in prompts] + [Sequence(prompts[0], GREEDY_8)]
    _run(Engine(tiny_model, tiny_tokenizer, max_batch_size=4), seqs)
    assert [s.generated for s in seqs[:3]] == ref
    assert seqs[3].generated == plain[0]
    assert ref != plain  # the adjustment changed something, so the comparison has teeth


def test_frequency_and_presence_penalties_follow_openai_definitions():
    """logit - frequency * count - presence * (count > 0) over the answer's tokens; the prompt's tokens
    count only for the repetition penalty (vLLM's definitions)."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias=((4, 3.0),))
    out = adjusted_logits(logits, p, prompt=[1, 2], generated=[3, 3, 4])
    want = logits.clone()
    want[4] += 3.0
    want[3] -= 0.5 * 2 + 0.25
    want[4] -= 0.5 * 1 + 0.25
    assert torch.equal(out, want) and not torch.equal(out, logits)


def test_stop_string_cuts_text_and_finishes(tiny_qwen, tiny_tokenizer):
    prompt = _prompts(1, len(tiny_tokenizer))[0]
    full = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(prompt, SamplingParams(max_tokens=12, temperature=0))])[0]
    text = tiny_tokenizer.decode(full.generated, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "random model produced whitespace only; pick another prompt"
    eng = Engine(tiny_qwen, tiny_tokenizer)
    seq = Sequence(prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    eng.add(seq)
    out = ""
    while eng.has_work():
        for ev in eng.step():
            out += ev.text
    assert seq.finish_reason == "stop"
    assert out == text[: text.find(stop)]


def test_seeded_sampling_is_reproducible(tiny_qwen, tiny_tokenizer):
    prompt = _prompts(1, len(tiny_tokenizer))[0]
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(prompt, p)])[0].generated
    b = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(prompt, p), Sequence(prompt, GREEDY)])[0].generated
    c = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(prompt, SamplingParams(max_tokens=10, seed=99))])[0]
    assert a == b
    assert c.generated != a


def test_cancel_frees_the_slot(tiny_qwen, tiny_tokenizer):
    prompts = _prompts(2, len(tiny_tokenizer))
    eng = Engine(tiny_qwen, tiny_tokenizer, max_batch_size=1)
    long = Sequence(prompts[0], SamplingParams(max_tokens=200, temperature=0))
    short = Sequence(prompts[1], SamplingParams(max_tokens=3, temperature=0))
    eng.add(long)
    eng.add(short)
    eng.step()
    eng.step()
    assert eng.running == 1 and len(eng.pending) == 1
    eng.cancel(long.id)
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
    assert long.finish_reason == "cancelled" and len(long.generated) < 200
    assert short.finish_reason == "length" and steps < 10


@pytest.mark.parametrize("budget", [8, 10_000], ids=["chunked-prefill", "one-shot-prefill"])
def test_gate_reads_each_rows_own_position_despite_padding(tiny_qwen, tiny_tokenizer, budget):
    """A short prompt batched with a long one is gated exactly as when it runs alone."""
    vec = make_vector(tiny_qwen, gate=(1, 0.0))
    vec.config["gate"]["position"] = -3
    rt = SteeringRuntime(tiny_qwen, [vec])
    prompts = [[7, 8], list(range(10, 40)), [50, 51, 52, 53]]
    with rt:
        together = _run(Engine(tiny_qwen, tiny_tokenizer, rt, max_step_tokens=budget),
                        [Sequence(p, GREEDY, "refusal", 1.0) for p in prompts])
        alone = [_run(Engine(tiny_qwen, tiny_tokenizer, rt), [Sequence(p, GREEDY, "refusal", 1.0)])[0] for p in prompts]
    assert [s.gate for s in together] == [s.gate for s in alone]
    assert [s.generated for s in together] == [s.generated for s in alone]


def _split_threshold(model, vec, prompts, k: int | None = None) -> float:
    """A threshold halfway between the two middle gate scores of ``prompts`` (each alone, one plain
    forward pass, the gate's layers concatenated), so that half the prompts open the gate and a small
    error in any layer's part of the features flips some decision (``k``: between the k-th and k+1-th
    lowest instead)."""
    gate = SteeringRuntime(model, [vec]).steerers[vec.name].gate
    scores = []
    with torch.no_grad():
        for p in prompts:
            hs = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
            col = max(gate.position, -len(p))
            scores.append(float(gate.scores(torch.cat([hs[ly][:, col] for ly in gate.layers], dim=-1))[0]))
    k = len(scores) // 2 if k is None else k
    mid = sorted(scores)[k - 1 : k + 1]
    return (mid[0] + mid[1]) / 2


def test_multi_layer_gate_survives_a_cancel_during_its_prefill(tiny_qwen, tiny_tokenizer):
    """A row cancelled while a multi-layer gate's earlier residuals are kept: the others' stay theirs, so
    each row's gate is the one it gets alone."""
    vec = make_vector(tiny_qwen, layers=(3,), gate=(3, 0.0), gate_layers=(1, 2, 3), seed=6)
    vec.config["gate"]["position"] = -12  # inside the prompt: some rows' gate columns pass before others'
    vec.config["gate"]["metric"] = "linear"
    prompts = _prompts(5, len(tiny_tokenizer))
    vec.config["gate"]["threshold"] = _split_threshold(tiny_qwen, vec, prompts[1:])
    rt = SteeringRuntime(tiny_qwen, [vec])
    with rt:
        alone = [_run(Engine(tiny_qwen, tiny_tokenizer, rt), [Sequence(p, GREEDY, "refusal", 1.0)])[0] for p in prompts]
        eng = Engine(tiny_qwen, tiny_tokenizer, rt, max_step_tokens=4)
        seqs = [Sequence(p, GREEDY, "refusal", 1.0) for p in prompts]
        for s in seqs:
            eng.add(s)
        while eng.prefill is None or not eng.prefill.gate_parts:  # some rows' layer 1-2 residuals are kept
            eng.step()
        assert eng.prefill.phase == 0 and not any(s.gate for s in seqs), "the gate is not decided yet"
        eng.cancel(seqs[0].id)  # every kept row moves up one place
        eng.step()
        p = eng.prefill
        assert [s.id for s in p.seqs] == [s.id for s in seqs[1:]] and p.phase == 0
        for new, old in enumerate(range(1, 5)):  # the residuals kept so far are each row's own
            col = max(-12, -len(prompts[old]))
            if p.width + col >= p.col:
                continue  # this row's gate column has not been reached yet
            with torch.no_grad():
                hs = tiny_qwen(input_ids=torch.tensor([prompts[old]]), output_hidden_states=True).hidden_states
            for ly in (1, 2):
                torch.testing.assert_close(p.gate_parts[("refusal", ly)][new], hs[ly][0, col], rtol=1e-4, atol=1e-4)
        while eng.has_work():
            eng.step()
    kept = [1, 2, 3, 4]
    assert 0 < sum(alone[i].gate["refusal"] for i in kept) < len(kept), "the gate must split these prompts"
    assert [seqs[i].gate for i in kept] == [alone[i].gate for i in kept]
    assert [seqs[i].generated for i in kept] == [alone[i].generated for i in kept]


def _one_pass_reference(model, rt: SteeringRuntime, prompt: list[int], strength: float, n: int) -> tuple[list[int], float]:
    """Greedy tokens the old way: the whole (growing) sequence through one plain forward pass per token,
    the gate decided by the hooks themselves on the first pass."""
    ids, gate = list(prompt), None
    for _ in range(n):
        rt.rows.reset()
        rt.rows.strength["refusal"] = torch.tensor([strength])
        if gate is not None:
            rt.rows.gate["refusal"] = gate
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        gate = rt.rows.gate["refusal"]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], float(gate[0])


def _cached_reference(model, rt: SteeringRuntime, prompt: list[int], strength: float, n: int) -> tuple[list[int], float]:
    """Greedy tokens the way transformers generates: the prompt in one pass (the hooks decide the gate),
    then one token per pass on its KV cache, each such pass marked ``rows.decode``."""
    ids, cache, gate = list(prompt), None, None
    for step in range(n):
        rt.rows.reset(decode=step > 0)
        rt.rows.strength["refusal"] = torch.tensor([strength])
        if step:
            rt.rows.gate["refusal"] = gate
        out = model(input_ids=torch.tensor([ids[-1:] if step else ids]), past_key_values=cache, use_cache=True)
        cache, gate = out.past_key_values, rt.rows.gate["refusal"]
        ids.append(int(out.logits[0, -1].argmax()))
    return ids[len(prompt):], float(gate[0])


def test_a_prompt_span_lowers_refusal_over_the_prompt_only(tiny_qwen, tiny_tokenizer):
    """A two-sided gate whose lower span is "prompt": the engine steers a lowered row over its prompt
    (its first token included) and runs its generated tokens vanilla, as a cached one-pass generation
    does; the same gate with span "all" answers some lowered row differently."""
    vec = make_vector(tiny_qwen, layers=(2, 3), gate=(2, 0.0), gate_layers=(1, 2), metric="linear")
    prompts = _prompts(6, len(tiny_tokenizer))
    vec.config["gate"]["threshold"] = _split_threshold(tiny_qwen, vec, prompts)
    lower = {"threshold": _split_threshold(tiny_qwen, vec, prompts, k=2), "strength": 0.7}
    out = {}
    for span in ("prompt", "all"):
        vec.config["gate"]["lower"] = {**lower, "span": span}
        rt = SteeringRuntime(tiny_qwen, [vec])
        with rt:
            ref = [_cached_reference(tiny_qwen, rt, p, 1.0, 6) for p in prompts]
            seqs = _run(Engine(tiny_qwen, tiny_tokenizer, rt, max_step_tokens=8),
                        [Sequence(p, SamplingParams(max_tokens=6, temperature=0.0), "refusal", 1.0) for p in prompts])
        assert [s.gate["refusal"] for s in seqs] == [g for _, g in ref]
        assert [s.generated for s in seqs] == [toks for toks, _ in ref]
        out[span] = seqs
    lowered = [i for i, s in enumerate(out["prompt"]) if s.gate["refusal"] < 0]
    assert lowered, "some prompt must score below the lower threshold"
    assert all(out["prompt"][i].generated[0] == out["all"][i].generated[0] for i in lowered)
    assert any(out["prompt"][i].generated != out["all"][i].generated for i in lowered)


@pytest.mark.parametrize(("gate_layers", "two_sided"), [(None, False), ((1, 2), False), ((1, 2), True)],
                         ids=["one-layer-gate", "two-layer-gate", "two-sided-gate"])
@pytest.mark.parametrize("budget", [4, 8, 10_000])
def test_gated_steering_is_the_same_however_the_prefill_is_chunked(tiny_qwen, tiny_tokenizer, budget, gate_layers,
                                                                   two_sided):
    """Chunked prefill splits at the gate layer (layers below it over every chunk, the gate, then the
    rest; a multi-layer gate's earlier layers are read by taps): every row is steered at every prompt
    position exactly when its gate fires (a two-sided gate: and the direction subtracted where it lowers
    refusal), as in one pass."""
    vec = make_vector(tiny_qwen, layers=(2, 3), gate=(2, 0.0), gate_layers=gate_layers, metric="linear")
    prompts = _prompts(6, len(tiny_tokenizer))
    vec.config["gate"]["threshold"] = _split_threshold(tiny_qwen, vec, prompts)
    if two_sided:
        vec.config["gate"]["lower"] = {"threshold": _split_threshold(tiny_qwen, vec, prompts, k=2), "strength": 0.7}
    rt = SteeringRuntime(tiny_qwen, [vec])
    with rt:
        ref = [_one_pass_reference(tiny_qwen, rt, p, 1.0, 6) for p in prompts]
        seqs = _run(Engine(tiny_qwen, tiny_tokenizer, rt, max_step_tokens=budget),
                    [Sequence(p, SamplingParams(max_tokens=6, temperature=0.0), "refusal", 1.0) for p in prompts])
    gates = [g for _, g in ref]
    assert 0 < sum(g > 0 for g in gates) < len(gates), "the gate must fire on some prompts and not others"
    assert any(abs(g + 0.7) < 1e-6 for g in gates) == two_sided and (0.0 in gates)
    assert [s.gate["refusal"] for s in seqs] == gates
    assert [s.generated for s in seqs] == [toks for toks, _ in ref]


def test_running_rows_decode_while_a_long_prompt_prefills(tiny_qwen, tiny_tokenizer):
    """A long prompt arriving is prefilled a chunk per step; the running rows get a token every step."""
    eng = Engine(tiny_qwen, tiny_tokenizer, max_batch_size=4, max_step_tokens=16)
    running = [Sequence(p, SamplingParams(max_tokens=200, temperature=0.0)) for p in _prompts(2, 300)]
    for s in running:
        eng.add(s)
    while eng.prefill is not None or eng.pending:
        eng.step()
    long = Sequence(list(range(5, 205)), SamplingParams(max_tokens=3, temperature=0.0))  # 200 tokens
    eng.add(long)
    steps = 0
    while not long.generated:
        events = eng.step()
        steps += 1
        assert {e.seq_id for e in events} >= {s.id for s in running}, "a running row missed a step"
    assert steps >= 200 // 16, f"the 200-token prompt was prefilled in {steps} steps"


def test_cancel_during_chunked_prefill_drops_only_that_row(tiny_qwen, tiny_tokenizer):
    eng = Engine(tiny_qwen, tiny_tokenizer, max_step_tokens=8)
    a, b = (Sequence(list(range(5, 45)), SamplingParams(max_tokens=4, temperature=0.0)) for _ in range(2))
    eng.add(a)
    eng.add(b)
    eng.step()
    assert eng.prefill is not None and len(eng.prefill.seqs) == 2
    eng.cancel(a.id)
    events = eng.step()
    assert [e.finish_reason for e in events if e.seq_id == a.id] == ["cancelled"]
    while eng.has_work():
        eng.step()
    alone = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(list(range(5, 45)), SamplingParams(max_tokens=4, temperature=0.0))])
    assert b.generated == alone[0].generated and b.finish_reason == "length"


def test_a_failing_row_ends_alone(tiny_qwen, tiny_tokenizer, monkeypatch):
    """A row whose text handling raises (a tokenizer error) finishes with "error"; its batch goes on."""
    prompts = _prompts(3, len(tiny_tokenizer))
    eng = Engine(tiny_qwen, tiny_tokenizer)
    seqs = [Sequence(p, SamplingParams(max_tokens=6, temperature=0.0)) for p in prompts]
    for s in seqs:
        eng.add(s)
    eng.step()  # prefill: every row has its _Text now
    bad = seqs[1]

    def broken(token):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    monkeypatch.setattr(bad.text, "push", broken)
    finish = {}
    while eng.has_work():
        for ev in eng.step():
            if ev.finish_reason:
                finish[ev.seq_id] = ev.finish_reason
    assert finish[bad.id] == "error" and "injected" in bad.error
    assert finish[seqs[0].id] == finish[seqs[2].id] == "length"
    ok = _run(Engine(tiny_qwen, tiny_tokenizer), [Sequence(p, SamplingParams(max_tokens=6, temperature=0.0))
                                                  for p in (prompts[0], prompts[2])])
    assert [seqs[0].generated, seqs[2].generated] == [s.generated for s in ok]


def test_a_row_whose_logit_bias_fails_ends_alone(tiny_qwen, tiny_tokenizer):
    """A bias the API would have refused (a token id past the vocabulary) fails its row only."""
    prompts = _prompts(2, len(tiny_tokenizer))
    bad = Sequence(prompts[0], SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((10**6, 1.0),)))
    good = Sequence(prompts[1], SamplingParams(max_tokens=4, temperature=0.0, logprobs=1))
    got = _events(Engine(tiny_qwen, tiny_tokenizer), [bad, good])
    assert bad.finish_reason == "error" and "IndexError" in bad.error and got[bad.id][-1].finish_reason == "error"
    assert good.finish_reason == "length" and len([lp for ev in got[good.id] for lp in ev.logprobs]) == 4
