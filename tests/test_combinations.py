"""Combinations (``--combine NAME=A+B*R``): one request steered by several vectors, each at the request's
strength times its ratio, each behind its own gate. Tiny random qwen2; the real server in-process."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from api_utils import API_KEY, MODEL, serve
from conftest import make_model, make_vector
from test_weight_vectors import GREEDY, _chat, _gate_threshold, _generate, _prompts, make_weight_vector

from server.backends.vllm import _refuse_unsupported, from_layer
from server.settings import Settings
from steer.engine import Engine, Sequence
from steer.hooks import SteeringRuntime, merge_weight_vector
from steer.serving import build
from steer.vectors import VectorError


def _run(model, tok, rt, rows: list[tuple[list[int], str, float]]) -> list[Sequence]:
    """Every (prompt, vector, strength) row in one engine, batched together; the finished sequences."""
    eng = Engine(model, tok, rt, max_step_tokens=8)
    seqs = [Sequence(p, GREEDY, v, s) for p, v, s in rows]
    for s in seqs:
        eng.add(s)
    while eng.has_work():
        eng.step()
    return seqs


def test_a_combination_steers_with_each_vector_at_its_ratio(tiny_qwen, tiny_tokenizer):
    """Ungated parts: a row naming "both" at strength s generates what the model with the weight vector
    merged at s * ratio generates under the activation vector alone at s; rows naming the combination,
    either part or nothing share a batch and each equals its own run."""
    prompts = _prompts(4, len(tiny_tokenizer))
    wvec, avec = make_weight_vector(tiny_qwen, scale=2.0), make_vector(tiny_qwen, coefficient=2.0)
    combos = {"both": {"refusal": 1.0, "enchtable": 0.5}}
    rt = SteeringRuntime(tiny_qwen, [wvec, avec], combos=combos)
    merged = copy.deepcopy(tiny_qwen)
    merge_weight_vector(merged, wvec, 1.5 * 0.5)
    alone_rt = SteeringRuntime(merged, [avec], check_fingerprint=False)
    with alone_rt, torch.no_grad():
        want = _generate(merged, tiny_tokenizer, alone_rt, prompts, [1.5] * 4, vector="refusal")
    rows = [(prompts[0], "both", 1.5), (prompts[1], "refusal", 1.5), (prompts[2], "enchtable", 1.5),
            (prompts[3], "", 0.0), (prompts[3], "both", 1.5), (prompts[2], "both", 0.0)]
    with rt, torch.no_grad():
        got = [s.generated for s in _run(tiny_qwen, tiny_tokenizer, rt, rows)]
        alone = [_run(tiny_qwen, tiny_tokenizer, rt, [r])[0].generated for r in rows]
    vanilla = _generate(tiny_qwen, tiny_tokenizer, None, prompts, [0.0] * 4, vector="")
    assert got == alone
    assert got[0] == want[0] and got[4] == want[3]
    assert got[0] not in (got[1], vanilla[0])  # both parts act: not the activation vector alone, not vanilla
    assert got[5] == vanilla[2]  # strength 0: the vanilla model


def test_a_combination_behind_one_gate(tiny_qwen, tiny_tokenizer):
    """The weight part borrows the activation part's gate (--gate-with): a row whose prompt fails it is the
    vanilla model; a row that passes is steered by both parts; the row reports its gate's decision under
    the combination's name."""
    prompts = [p * 2 for p in _prompts(4, len(tiny_tokenizer))]
    wvec = make_weight_vector(tiny_qwen, scale=3.0)
    last = torch.tensor([p[-1:] for p in prompts])
    avec = make_vector(tiny_qwen, gate=(1, _gate_threshold(tiny_qwen, make_vector(tiny_qwen, gate=(1, 0.0)), last)))
    rt = SteeringRuntime(tiny_qwen, [wvec, avec], gated_by={"enchtable": "refusal"},
                         combos={"both": {"refusal": 1.0, "enchtable": 1.0}})
    assert rt.deciding("both") == "refusal" and rt.parts("refusal") == {"refusal": 1.0}
    with rt, torch.no_grad():
        both = _run(tiny_qwen, tiny_tokenizer, rt, [(p, "both", 2.0) for p in prompts])
        act = _run(tiny_qwen, tiny_tokenizer, rt, [(p, "refusal", 2.0) for p in prompts])
    vanilla = _generate(tiny_qwen, tiny_tokenizer, None, prompts, [0.0] * 4, vector="")
    fired = [s.gate["both"] for s in both]
    assert 0 < sum(fired) < 4, fired
    assert fired == [s.gate["refusal"] for s in both] == [s.gate["enchtable"] for s in both]
    for b, a, v, f in zip(both, act, vanilla, fired, strict=True):
        if f:
            assert b.generated != a.generated  # the weight part acted too
        else:
            assert b.generated == v


def test_combinations_are_checked(tiny_qwen):
    wvec, avec = make_weight_vector(tiny_qwen), make_vector(tiny_qwen)
    for combos, match in (({"refusal": {"refusal": 1.0, "enchtable": 1.0}}, "already a loaded vector's name"),
                          ({"both": {"refusal": 1.0}}, "two or more vectors"),
                          ({"both": {"refusal": 1.0, "nope": 1.0}}, "'nope' is not a loaded per-request vector"),
                          ({"a": {"refusal": 1.0, "enchtable": 1.0}, "b": {"a": 1.0, "refusal": 1.0}},
                           "'a' is another combination"),
                          ({"both": {"refusal": 1.0, "enchtable": 0.0}}, "must be a finite number > 0")):
        with pytest.raises(VectorError, match=match):
            SteeringRuntime(tiny_qwen, [wvec, avec], combos=combos)
    with pytest.raises(VectorError, match="'enchtable' is not a loaded per-request vector"):  # merged at load
        build(vectors=[wvec, avec], model=copy.deepcopy(tiny_qwen), merged={"enchtable": 1.0},
              combos={"both": {"refusal": 1.0, "enchtable": 1.0}})
    assert Settings(combine="both=refusal+enchtable*0.5, x = a*2 + b").combinations() == {
        "both": {"refusal": 1.0, "enchtable": 0.5}, "x": {"a": 2.0, "b": 1.0}}
    for bad, match in (("both", "two or more"), ("both=refusal", "two or more"), ("=a+b", "two or more"),
                       ("both=a+b*0", "ratios > 0"), ("both=a+b*x", "ratios > 0"), ("both=a+b*-1", "ratios > 0"),
                       ("both=a++b", "ratios > 0"), ("both=a+a", "names 'a' twice"),
                       ("both=a+b,both=a+c", "names 'both' twice")):
        with pytest.raises(ValueError, match=match):
            Settings(combine=bad)
    # on --backend vllm: one activation part and one weight part, the weight part gated by its activation
    # part's gate where both are gated (a request carries one adapter; the gate pass decides one gate)
    g1, g2 = make_vector(tiny_qwen, name="g1", gate=(1, 0.0)), make_vector(tiny_qwen, name="g2", gate=(1, 0.0))
    loaded = [wvec, avec, g1, g2]
    assert _refuse_unsupported(Settings(gate_with="enchtable=g1", combine="both=g1+enchtable"), loaded) == (
        {"enchtable": "g1"}, {"both": {"g1": 1.0, "enchtable": 1.0}})
    _refuse_unsupported(Settings(gate_with="enchtable=g2", combine="both=refusal+enchtable"), loaded)  # ungated part
    for settings, match in ((Settings(combine="both=refusal+g1"), "one activation vector and one weight vector"),
                            (Settings(gate_with="enchtable=g2", combine="both=g1+enchtable"),
                             r"must borrow its activation part's gate \(--gate-with enchtable=g1\)"),
                            (Settings(combine="both=a+b"), "'a' is not a loaded per-request vector")):
        with pytest.raises(VectorError, match=match):
            _refuse_unsupported(settings, loaded)


def test_a_gated_weight_vectors_adapter_on_vllm_holds_the_layers_from_the_gate_on(tiny_qwen):
    """On --backend vllm a gated weight vector's adapter is chosen before its gate is read, so it holds only
    the layers the embedded engine changes in a gated prompt: those from the gate layer on."""
    wvec = make_weight_vector(tiny_qwen)
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in wvec.tensors})
    assert len(layers) > 1
    n = len(wvec.tensors)
    kept = from_layer(wvec, layers[1])
    assert kept.tensors and all(int(k.split(".layers.")[1].split(".")[0]) >= layers[1] for k in kept.tensors)
    assert {k: t for k, t in wvec.tensors.items() if k not in kept.tensors} and all(
        torch.equal(kept.tensors[k], wvec.tensors[k]) for k in kept.tensors)
    assert len(wvec.tensors) == n == len(from_layer(wvec, 0).tensors)  # the vector itself is left alone


def test_the_server_lists_and_serves_a_combination(tiny_tokenizer):
    model = make_model("qwen2", len(tiny_tokenizer))
    vectors = [make_weight_vector(model, scale=3.0), make_vector(model, gate=(1, -1e9))]  # a gate that always opens
    settings = Settings(api_key=API_KEY, served_model_name=MODEL, default_vector="both",
                        gate_with="enchtable=refusal", combine="both=refusal+enchtable*0.5")
    with contextlib.contextmanager(serve)(settings, model, tiny_tokenizer, vectors) as s:
        listed = s.http.get("/v1/safety/vectors").json()
        info = {v["name"]: v for v in listed["data"]}
        assert listed["default_vector"] == "both"
        assert info["both"] == {"name": "both", "kind": "combined", "default": True, "applied": "per_request",
                                "parts": {"refusal": 1.0, "enchtable": 0.5}, "gate_from": "refusal"}
        out = _chat(s, {"strength": 2.0, "compare": True})
        assert out["safety"]["vector"] == "both" and out["safety"]["kind"] == "combined"
        assert out["safety"]["choices"] == [{"index": 0, "steered": True, "gate": True, "lowered": False}]
        steered = out["choices"][0]["message"]["content"]
        assert steered != out["baseline"]["choices"][0]["message"]["content"]
        act = _chat(s, {"strength": 2.0, "vector": "refusal"})["choices"][0]["message"]["content"]
        assert steered != act
