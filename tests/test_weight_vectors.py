"""Weight-space safety vectors served two ways: merged into the weights at load (one strength), or per
request from low-rank factors (``y = W x + s_row * c * B (A x)``); transfer onto other weights only
when declared; both kinds of vector side by side on one server."""

from __future__ import annotations

import contextlib
import copy

import openai
import pytest
import torch
from api_utils import API_KEY, MODEL, serve
from conftest import make_model, make_vector
from torch import nn

from server.settings import Settings
from steer.engine import Engine, Sequence
from steer.hooks import SteeringRuntime, WeightSteerer, merge_weight_vector
from steer.models import fingerprint
from steer.packed import pack_linears, packing_unavailable
from steer.serving import build
from steer.types import SamplingParams
from steer.vectors import SafetyVector, VectorError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_weight_vector(model, *, name="enchtable", rank=4, scale=0.5, seed=3, dense=False, made_for=None,
                       coefficient=1.0) -> SafetyVector:
    """A random low-rank (or dense) weight vector over every attention projection of ``model``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for pname, p in model.named_parameters():
        if pname.endswith(".weight") and pname.split(".")[-2] in ATTN:
            out_f, in_f = p.shape
            a = torch.randn(rank, in_f, generator=g) / in_f**0.5
            b = torch.randn(out_f, rank, generator=g) * scale / rank**0.5
            if dense:
                tensors[f"delta.{pname}"] = b @ a
            else:
                tensors[f"lora_A.{pname}"], tensors[f"lora_B.{pname}"] = a, b
    fp = made_for or fingerprint(model)
    return SafetyVector(name, "weight", fp, tensors, {"coefficient": coefficient, "rank": rank}, {"method": "test"})


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(5, vocab, (int(k),), generator=g).tolist() for k in (4, 9, 13, 6)[:n]]


def _generate(model, tok, rt, prompts, strengths, vector="enchtable"):
    eng = Engine(model, tok, rt)
    seqs = [Sequence(p, GREEDY, vector, s) for p, s in zip(prompts, strengths, strict=True)]
    for s in seqs:
        eng.add(s)
    while eng.has_work():
        eng.step()
    return [s.generated for s in seqs]


def test_scaled_scales_the_delta_not_its_square(tiny_qwen):
    vec = make_weight_vector(tiny_qwen)
    p = vec.weight_params()[0]
    torch.testing.assert_close(vec.scaled(3.0).delta(p), 3.0 * vec.delta(p))
    dense = make_weight_vector(tiny_qwen, dense=True)
    torch.testing.assert_close(dense.scaled(-2.0).delta(p), -2.0 * dense.delta(p))


@pytest.mark.parametrize("strength", [0.5, 2.0])
def test_per_request_low_rank_equals_the_merged_model(tiny_model, tiny_tokenizer, strength):
    vec = make_weight_vector(tiny_model, coefficient=1.5)
    merged = copy.deepcopy(tiny_model)
    changed = merge_weight_vector(merged, vec, strength)
    assert changed == vec.weight_params() and len(changed) == 4 * tiny_model.config.num_hidden_layers
    ids = torch.tensor(_prompts(1, len(tiny_tokenizer)) * 3)
    rt = SteeringRuntime(tiny_model, [vec])
    with rt, torch.no_grad():
        rt.rows.reset()
        rt.rows.strength["enchtable"] = torch.tensor([strength, 0.0, strength])
        out = tiny_model(input_ids=ids).logits
    want = merged(input_ids=ids[:1]).logits[0]
    torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2], want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the same batch shape: BLAS kernels may differ by batch size on some hosts
        vanilla = tiny_model(input_ids=ids).logits[1]
    assert torch.equal(out[1], vanilla)  # strength 0 inside a steered batch: the vanilla model, bit for bit
    assert (want - vanilla).abs().max() > 1e-3  # the vector does something


def test_mixed_strengths_share_a_batch_and_strength_0_is_vanilla(tiny_qwen, tiny_tokenizer):
    vec = make_weight_vector(tiny_qwen, scale=3.0)
    rt = SteeringRuntime(tiny_qwen, [vec])
    prompts = _prompts(4, len(tiny_tokenizer))
    strengths = [0.0, 0.5, 1.0, 2.0]
    with rt:
        together = _generate(tiny_qwen, tiny_tokenizer, rt, prompts, strengths)
        alone = [_generate(tiny_qwen, tiny_tokenizer, rt, [p], [s])[0] for p, s in zip(prompts, strengths, strict=True)]
    assert together == alone
    vanilla = _generate(tiny_qwen, tiny_tokenizer, None, prompts, [0.0] * 4, vector="")
    assert together[0] == vanilla[0]
    assert any(t != v for t, v in zip(together[1:], vanilla[1:], strict=True))


@pytest.mark.skipif(packing_unavailable(nn.Linear(2, 2)) is not None, reason="oneDNN packing unavailable")
def test_per_request_hooks_follow_packing(tiny_tokenizer):
    """The steerer is made before packing replaces the linear modules; its hooks land on the packed ones."""
    plain = make_model("qwen2", len(tiny_tokenizer))
    packed = make_model("qwen2", len(tiny_tokenizer))
    vec = make_weight_vector(plain, scale=3.0)
    rt_plain = SteeringRuntime(plain, [vec])
    rt_packed = SteeringRuntime(packed, [vec])
    pack_linears(packed)
    prompts = _prompts(3, len(tiny_tokenizer))
    with rt_plain:
        want = _generate(plain, tiny_tokenizer, rt_plain, prompts, [0.0, 1.0, 2.0])
    with rt_packed:
        got = _generate(packed, tiny_tokenizer, rt_packed, prompts, [0.0, 1.0, 2.0])
    assert got == want


def test_bad_weight_vectors_are_refused(tiny_qwen):
    with pytest.raises(VectorError, match="dense delta: per-request serving needs low-rank factors"):
        SteeringRuntime(tiny_qwen, [make_weight_vector(tiny_qwen, dense=True)])
    vec = make_weight_vector(tiny_qwen)
    p = vec.weight_params()[0]
    wrong = SafetyVector("w", "weight", vec.model, {f"lora_A.{p}": torch.zeros(2, 7), f"lora_B.{p}": torch.zeros(64, 2)})
    with pytest.raises(VectorError, match=r"is 64x7, the model's is"):
        SteeringRuntime(tiny_qwen, [wrong])
    norm = SafetyVector("n", "weight", vec.model, {"delta.model.norm.weight": torch.zeros(64)})
    with pytest.raises(VectorError, match="not a linear layer's weight"):
        merge_weight_vector(copy.deepcopy(tiny_qwen), norm, 1.0)
    half = SafetyVector("h", "weight", vec.model, {f"lora_A.{p}": torch.zeros(2, 64)})
    with pytest.raises(VectorError, match="incomplete or misshapen"):
        WeightSteerer(half, tiny_qwen)


def test_transfer_is_explicit(tiny_tokenizer):
    aligned = make_model("qwen2", len(tiny_tokenizer), seed=0)
    finetune = copy.deepcopy(aligned)
    with torch.no_grad():
        finetune.model.layers[1].mlp.up_proj.weight.add_(0.01)  # "fine-tuned"
    for vec in (make_weight_vector(aligned), make_vector(aligned, name="enchtable")):
        with pytest.raises(VectorError, match="other weights of this architecture.*--transfer enchtable"):
            SteeringRuntime(finetune, [vec])
        rt = SteeringRuntime(finetune, [vec], transfers={"enchtable"})
        assert rt.steerers["enchtable"].transfer
        assert not SteeringRuntime(aligned, [vec], transfers={"enchtable"}).steerers["enchtable"].transfer
        llama = make_model("llama", len(tiny_tokenizer))
        with pytest.raises(VectorError, match="different architecture"):
            SteeringRuntime(llama, [vec], transfers={"enchtable"})


def test_build_merges_at_load_and_keeps_the_rest_per_request(tiny_tokenizer):
    model = make_model("qwen2", len(tiny_tokenizer))
    wvec, avec = make_weight_vector(model), make_vector(model)
    want = copy.deepcopy(model)
    merge_weight_vector(want, wvec, 1.5)
    served = build(vectors=[wvec, avec], model=model, tokenizer=tiny_tokenizer, merged={"enchtable": 1.5})
    assert set(served.runtime.steerers) == {"refusal"} and served.merged == {"enchtable": 1.5}
    for (n, p), (_, q) in zip(model.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(VectorError, match="only weight vectors can be merged"):
        build(vectors=[avec], model=make_model("qwen2", len(tiny_tokenizer)), merged={"refusal": 1.0})
    with pytest.raises(VectorError, match="--transfer names nope, not a loaded vector"):
        build(vectors=[avec], model=make_model("qwen2", len(tiny_tokenizer)), transfers={"nope"})


def _chat(s, safety: dict):
    return s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello world"}],
                                            max_tokens=8, temperature=0, extra_body={"safety": safety}).to_dict()


def test_server_serves_weight_and_activation_vectors_side_by_side(tiny_tokenizer):
    """A weight vector picked by name with compare (the baseline is strength 0, the vanilla model); an
    activation vector beside it; a second weight vector merged at load and a declared transfer, shown
    on /v1/safety/vectors."""
    aligned = make_model("qwen2", len(tiny_tokenizer))
    model = copy.deepcopy(aligned)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(1.05)  # the fine-tune the vectors transfer to
    fp = fingerprint(aligned)
    vectors = [make_weight_vector(aligned, scale=3.0), make_vector(model, name="refusal"),
               make_weight_vector(aligned, name="merged_in", seed=9, made_for=fp)]
    settings = Settings(api_key=API_KEY, served_model_name=MODEL, default_vector="refusal",
                        merge_vector="merged_in=1.0", transfer="enchtable,merged_in")
    vanilla = copy.deepcopy(model)
    merge_weight_vector(vanilla, vectors[2], 1.0)  # what strength 0 must reproduce: the served model
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}],
                                                add_generation_prompt=True, tokenize=False)
    ids = tiny_tokenizer(prompt)["input_ids"]
    want0 = _generate(vanilla, tiny_tokenizer, None, [ids], [0.0], vector="")[0]
    with contextlib.contextmanager(serve)(settings, model, tiny_tokenizer, vectors) as s:
        info = {v["name"]: v for v in s.http.get("/v1/safety/vectors").json()["data"]}
        assert {n: (v["kind"], v["applied"], v["transfer"]) for n, v in info.items()} == {
            "enchtable": ("weight", "per_request", True), "refusal": ("activation", "per_request", False),
            "merged_in": ("weight", "merged", True)}
        assert info["merged_in"]["merged_strength"] == 1.0
        out = _chat(s, {"vector": "enchtable", "strength": 2.0, "compare": True})
        assert out["safety"]["vector"] == "enchtable" and out["safety"]["kind"] == "weight"
        base = out["baseline"]["choices"][0]["message"]["content"]
        assert base == tiny_tokenizer.decode(want0, skip_special_tokens=True)
        assert out["choices"][0]["message"]["content"] != base
        with pytest.raises(openai.BadRequestError) as err:
            _chat(s, {"vector": "merged_in", "strength": 1.0})
        assert err.value.body["param"] == "safety.vector" and "merged into the served model" in err.value.body["message"]
        assert _chat(s, {"strength": 1.0})["safety"]["vector"] == "refusal"  # the default: the activation vector


def test_only_merged_vectors_need_default_strength_0(tiny_tokenizer):
    from server.app import StartupError, create_app
    from server.backends.transformers import TransformersBackend

    model = make_model("qwen2", len(tiny_tokenizer))
    vec = make_weight_vector(model)
    settings = Settings(merge_vector="enchtable=1")
    backend = TransformersBackend(settings, model=model, tokenizer=tiny_tokenizer, vectors=[vec])
    try:
        with pytest.raises(StartupError, match=r"every loaded vector is merged into the weights \(enchtable=1\)"):
            create_app(settings, backend)
    finally:
        backend.shutdown()


# ---------------------------------------------------------------- a weight vector behind a gate


def _partial_merge(model, vec, strength, from_layer):
    """A copy of ``model`` with ``vec`` merged at ``strength`` into layers >= from_layer only."""
    part = copy.deepcopy(model)
    keep = [p for p in vec.weight_params() if int(p.split(".")[2]) >= from_layer]
    sub = SafetyVector(vec.name, "weight", vec.model, {k: t for k, t in vec.tensors.items()
                                                        if k.split(".", 1)[1] in keep}, vec.config)
    merge_weight_vector(part, sub, strength)
    return part


def _gate_threshold(model, gate_vec, ids, q: float = 0.5):
    """The median (quantile ``q``) gate score of ``ids``' rows, so that some rows open the gate and some
    do not."""
    gate = SteeringRuntime(model, [gate_vec]).steerers["refusal"].gate
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return float(gate.scores(torch.cat([hs[ly][:, -1] for ly in gate.layers], dim=-1)).quantile(q))


@pytest.mark.parametrize(("gate_layers", "two_sided"), [(None, False), ((1, 2), False), (None, True)],
                         ids=["one-layer-gate", "two-layer-gate", "two-sided-gate"])
def test_gated_weight_vector_changes_only_rows_that_pass_the_gate(tiny_qwen, tiny_tokenizer, gate_layers,
                                                                   two_sided):
    """One plain forward pass: rows whose prompt fails the borrowed gate are the vanilla model bit for
    bit; rows that pass run the prompt through the changed weights from the gate layer on (a multi-layer
    gate's: its last, deciding layer). A two-sided gate's lower threshold is not borrowed: rows below it
    stay vanilla too (the weight vector is never subtracted)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(5, len(tiny_tokenizer), (6, 7), generator=g)
    wvec = make_weight_vector(tiny_qwen, scale=3.0)
    at = gate_layers[-1] if gate_layers else 1
    kw = {"layers": (2,), "gate_layers": gate_layers}
    thr = _gate_threshold(tiny_qwen, make_vector(tiny_qwen, gate=(at, 0.0), **kw), ids)
    lower = None
    if two_sided:
        lower = (_gate_threshold(tiny_qwen, make_vector(tiny_qwen, gate=(at, 0.0), **kw), ids, q=0.4), 1.0)
    avec = make_vector(tiny_qwen, gate=(at, thr), lower=lower, **kw)
    rt = SteeringRuntime(tiny_qwen, [wvec, avec], gated_by={"enchtable": "refusal"})
    assert rt.steerers["enchtable"].gate_layer == at and rt.gated == ["enchtable", "refusal"]
    assert (rt.steerers["refusal"].gate.lower_threshold is not None) == two_sided
    with rt, torch.no_grad():
        rt.rows.reset()
        rt.rows.strength["enchtable"] = torch.full((6,), 2.0)
        out = tiny_qwen(input_ids=ids).logits
        fired = rt.rows.gate["enchtable"]
    assert 0 < int(fired.sum()) < 6 and set(fired.tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        vanilla = tiny_qwen(input_ids=ids).logits
        want = _partial_merge(tiny_qwen, wvec, 2.0, at)(input_ids=ids).logits
    for i in range(6):
        if fired[i]:
            torch.testing.assert_close(out[i], want[i], rtol=1e-4, atol=1e-4)
            assert (out[i] - vanilla[i]).abs().max() > 1e-3
        else:
            assert torch.equal(out[i], vanilla[i])


def test_gated_weight_vector_in_the_engine(tiny_qwen, tiny_tokenizer):
    """Through the engine (chunked, phased prefill; batched decode): a row that passes the gate generates
    what a model with the delta from the gate layer on over its prompt, and everywhere for the tokens it
    generates, does; a row that does not is vanilla; rows do not affect each other."""
    prompts = [p * 2 for p in _prompts(4, len(tiny_tokenizer))]
    wvec = make_weight_vector(tiny_qwen, scale=3.0)
    # a threshold from the last tokens alone (the real scores depend on the whole prompt); the test
    # checks below that it does split these prompts
    last = torch.tensor([p[-1:] for p in prompts])
    avec = make_vector(tiny_qwen, gate=(1, _gate_threshold(tiny_qwen, make_vector(tiny_qwen, gate=(1, 0.0)), last)))
    rt = SteeringRuntime(tiny_qwen, [wvec, avec], gated_by={"enchtable": "refusal"})
    eng = Engine(tiny_qwen, tiny_tokenizer, rt, max_step_tokens=8)  # several prefill chunks per phase
    seqs = [Sequence(p, GREEDY, "enchtable", 2.0) for p in prompts]
    with rt:
        for s in seqs:
            eng.add(s)
        while eng.has_work():
            eng.step()
        alone = [_generate(tiny_qwen, tiny_tokenizer, rt, [p], [2.0])[0] for p in prompts]
    got = [s.generated for s in seqs]
    assert got == alone
    fired = [s.gate["enchtable"] for s in seqs]
    assert 0 < sum(fired) < 4, fired
    vanilla = _generate(tiny_qwen, tiny_tokenizer, None, prompts, [0.0] * 4, vector="")
    part, full = _partial_merge(tiny_qwen, wvec, 2.0, 1), copy.deepcopy(tiny_qwen)
    merge_weight_vector(full, wvec, 2.0)
    for p, toks, f, v in zip(prompts, got, fired, vanilla, strict=True):
        if not f:
            assert toks == v
            continue
        with torch.no_grad():  # prompt: changed from the gate layer on; each new token: changed everywhere
            out = part(input_ids=torch.tensor([p]), use_cache=True)
            want, cache = [int(out.logits[0, -1].argmax())], out.past_key_values
            while len(want) < GREEDY.max_tokens:
                out = full(input_ids=torch.tensor([[want[-1]]]), past_key_values=cache, use_cache=True)
                want.append(int(out.logits[0, -1].argmax()))
        assert toks == want[: len(toks)] and toks != v


def test_gate_with_is_checked(tiny_qwen):
    wvec, gated, plain = (make_weight_vector(tiny_qwen), make_vector(tiny_qwen, gate=(1, 0.0)),
                          make_vector(tiny_qwen, name="plain"))
    for gated_by, match in (({"enchtable": "nope"}, "'nope' is not a loaded vector"),
                            ({"refusal": "refusal"}, "'refusal' is an activation vector; only a weight vector"),
                            ({"enchtable": "plain"}, "'plain' has no gate")):
        with pytest.raises(VectorError, match=match):
            SteeringRuntime(tiny_qwen, [wvec, gated, plain], gated_by=gated_by)
    with pytest.raises(VectorError, match="merged at load cannot be gated"):
        build(vectors=[wvec, gated], model=copy.deepcopy(tiny_qwen), merged={"enchtable": 1.0},
              gated_by={"enchtable": "refusal"})
    with pytest.raises(ValueError, match="only a per-request weight vector can be gated"):
        Settings(merge_vector="enchtable=1", gate_with="enchtable=refusal")
    with pytest.raises(ValueError, match="gate_with wants WEIGHT=ACTIVATION"):
        Settings(gate_with="enchtable")
    assert Settings(gate_with="enchtable=refusal, w2=refusal").gated_by() == {"enchtable": "refusal", "w2": "refusal"}


def test_server_shows_and_serves_a_gated_weight_vector(tiny_tokenizer):
    model = make_model("qwen2", len(tiny_tokenizer))
    vectors = [make_weight_vector(model, scale=3.0), make_vector(model, gate=(1, -1e9))]  # a gate that always opens
    settings = Settings(api_key=API_KEY, served_model_name=MODEL, default_vector="enchtable",
                        gate_with="enchtable=refusal")
    with contextlib.contextmanager(serve)(settings, model, tiny_tokenizer, vectors) as s:
        info = {v["name"]: v for v in s.http.get("/v1/safety/vectors").json()["data"]}
        assert info["enchtable"]["gated_by"] == "refusal" and info["refusal"]["gated_by"] is None
        out = _chat(s, {"strength": 2.0, "compare": True})
        assert out["safety"]["vector"] == "enchtable"
        assert out["choices"][0]["message"]["content"] != out["baseline"]["choices"][0]["message"]["content"]
