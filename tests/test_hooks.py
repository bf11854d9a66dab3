"""Hook math, strength-0 identity, gating and per-row independence on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_vector

from steer.calibrate import ExtractConfig, and_gates, run_refit_gate
from steer.hooks import Gate, SteeringRuntime
from steer.vectors import SafetyVector, VectorError


def _ids(n_rows: int, length: int = 10, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, vocab, (n_rows, length), generator=torch.Generator().manual_seed(seed))


def _forward(model, rt: SteeringRuntime | None, ids: torch.Tensor, strengths: list[float], name="refusal"):
    """Full-prompt (prefill) forward; returns (logits, hidden_states)."""
    if rt is not None:
        rt.rows.reset()
        rt.rows.strength[name] = torch.tensor(strengths)
    return model(input_ids=ids, output_hidden_states=True)


def test_strength_zero_is_bit_identical(tiny_model):
    vec = make_vector(tiny_model)
    ids = _ids(3)
    plain = tiny_model(input_ids=ids).logits
    rt = SteeringRuntime(tiny_model, [vec])
    with rt:
        steered = _forward(tiny_model, rt, ids, [0.0, 0.0, 0.0]).logits
    assert torch.equal(plain, steered)


def _layer_input(model, layer: int, fn):
    """Run fn() and return what layer ``layer`` received (a pre-hook registered last sees the steered input)."""
    seen = {}

    def capture(mod, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = model.model.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return seen["h"]


def test_addition_matches_formula(tiny_model):
    vec = make_vector(tiny_model, layers=(2,), coefficient=3.0)
    ids = _ids(2)
    base = _layer_input(tiny_model, 2, lambda: tiny_model(input_ids=ids))
    rt = SteeringRuntime(tiny_model, [vec])
    with rt:
        steered = _layer_input(tiny_model, 2, lambda: _forward(tiny_model, rt, ids, [0.5, 2.0]))
    r = vec.tensors["layers.2"]
    for row, s in enumerate([0.5, 2.0]):
        torch.testing.assert_close(steered[row] - base[row], (s * 3.0 * r).expand_as(base[row]), rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_and_not_double_installed(tiny_qwen):
    vec = make_vector(tiny_qwen)
    ids = _ids(1)
    plain = tiny_qwen(input_ids=ids).logits
    rt = SteeringRuntime(tiny_qwen, [vec])
    with rt:
        with pytest.raises(RuntimeError, match="already installed"):
            rt.__enter__()
    rt.rows.strength["refusal"] = torch.tensor([3.0])
    assert torch.equal(tiny_qwen(input_ids=ids).logits, plain)  # nothing left behind


def test_mixed_batch_rows_are_independent(tiny_model):
    vec = make_vector(tiny_model)
    ids = _ids(4, seed=3)
    strengths = [0.0, 1.0, 2.5, 0.5]
    rt = SteeringRuntime(tiny_model, [vec])
    with rt:
        together = _forward(tiny_model, rt, ids, strengths).logits
        for i, s in enumerate(strengths):
            alone = _forward(tiny_model, rt, ids[i : i + 1], [s]).logits
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-4)
    # and steering does change the steered rows
    assert not torch.allclose(together[2], tiny_model(input_ids=ids[2:3]).logits[0])


@pytest.mark.parametrize("metric", ["cosine", "linear"])
def test_gate_leaves_rows_below_threshold_vanilla(tiny_qwen, metric):
    ids = _ids(6, seed=5)
    plain = tiny_qwen(input_ids=ids, output_hidden_states=True)
    probe = SteeringRuntime(tiny_qwen, [make_vector(tiny_qwen, gate=(1, 0.0), metric=metric)]).steerers["refusal"]
    h = plain.hidden_states[1][:, -1]  # input of gate layer 1, last position
    scores = probe.gate.scores(h)
    direction = probe.gate.direction
    expected = h @ direction if metric == "linear" else (h @ direction) / h.norm(dim=-1)  # center is 0
    torch.testing.assert_close(scores, expected)
    thr = float(scores.median())
    rt = SteeringRuntime(tiny_qwen, [make_vector(tiny_qwen, gate=(1, thr), metric=metric)])
    with rt:
        steered = _forward(tiny_qwen, rt, ids, [2.0] * 6).logits
        fired = rt.rows.gate["refusal"]
    assert torch.equal(fired, (scores > thr).float())
    assert 0 < int(fired.sum()) < 6
    for i in range(6):
        unchanged = torch.equal(steered[i], plain.logits[i])
        assert unchanged == (fired[i] == 0), f"row {i}: gate {fired[i]} but unchanged={unchanged}"


@pytest.mark.parametrize("metric", ["cosine", "linear"])
def test_multi_layer_gate_reads_every_gate_layer_concatenated(tiny_qwen, metric):
    """A gate over layers 1-2 scores the concatenation of both layers' input residuals at its position,
    decides at layer 2 (the steered one) in a one-pass forward, and leaves closed rows vanilla."""
    ids = _ids(8, seed=7)
    plain = tiny_qwen(input_ids=ids, output_hidden_states=True)
    feats = torch.cat([plain.hidden_states[1][:, -1], plain.hidden_states[2][:, -1]], dim=-1)
    vec = make_vector(tiny_qwen, layers=(2,), gate=(2, 0.0), gate_layers=(1, 2), metric=metric, seed=4)
    gate = SteeringRuntime(tiny_qwen, [vec]).steerers["refusal"].gate
    assert gate.layers == (1, 2) and gate.direction.numel() == 2 * tiny_qwen.config.hidden_size
    scores = gate.scores(feats)
    x = feats @ gate.direction
    torch.testing.assert_close(scores, x if metric == "linear" else x / feats.norm(dim=-1))
    # layer 2 alone would decide differently for some row: the extra layer is read
    one = Gate("x", {"layer": 2, "threshold": 0.0, "metric": metric, "position": -1},
               gate.direction[tiny_qwen.config.hidden_size:], gate.center[tiny_qwen.config.hidden_size:])
    thr = float(scores.median())
    assert not torch.equal(scores > thr, one.scores(plain.hidden_states[2][:, -1]) > thr)
    vec.config["gate"]["threshold"] = thr
    rt = SteeringRuntime(tiny_qwen, [vec])
    with rt:
        steered = _forward(tiny_qwen, rt, ids, [2.0] * 8).logits
        fired = rt.rows.gate["refusal"]
    assert torch.equal(fired, (scores > thr).float()) and 0 < int(fired.sum()) < 8
    for i in range(8):
        assert torch.equal(steered[i], plain.logits[i]) == (fired[i] == 0), f"row {i}"


def test_and_gates_open_only_rows_both_gates_open(tiny_qwen, tmp_path):
    """``steer extract --and-gates A B``: A's vector whose gate opens a row only where B's gate (over a subset
    of A's layers) opens it too; steered rows get A's push, the rest stay vanilla (one-pass forward)."""
    ids = _ids(12, seed=11)
    plain = tiny_qwen(input_ids=ids, output_hidden_states=True)
    feats = torch.cat([plain.hidden_states[1][:, -1], plain.hidden_states[2][:, -1]], dim=-1)
    a = make_vector(tiny_qwen, name="a", layers=(2,), gate=(2, 0.0), gate_layers=(1, 2), metric="linear", seed=4)
    b = make_vector(tiny_qwen, name="b", layers=(2,), gate=(2, 0.0), metric="linear", seed=9)
    ga, gb = Gate.of(a), Gate.of(b)
    sa, sb = ga.scores(feats), gb.scores(plain.hidden_states[2][:, -1])
    a.config["gate"]["threshold"], b.config["gate"]["threshold"] = float(sa.median()), float(sb.median())
    want = ((sa > sa.median()) & (sb > sb.median())).float()
    assert 0 < int(want.sum()) < min(int((sa > sa.median()).sum()), int((sb > sb.median()).sum()))  # differs
    path = and_gates(a.save(tmp_path / "a"), b.save(tmp_path / "b"), name="ab", out=tmp_path / "ab", command="t")
    ab = SafetyVector.load(path)
    assert ab.config["gate"]["also"]["layers"] == [2] and ab.config["gate"]["also"]["from"] == "b"
    assert ab.provenance["and_gates"]["also"]["vector"] == "b"
    rt_a, rt_ab = SteeringRuntime(tiny_qwen, [a]), SteeringRuntime(tiny_qwen, [ab])
    with rt_a:
        only_a = _forward(tiny_qwen, rt_a, ids, [2.0] * 12, name="a").logits
    with rt_ab:
        steered = _forward(tiny_qwen, rt_ab, ids, [2.0] * 12, name="ab").logits
        fired = rt_ab.rows.gate["ab"]
    assert torch.equal(fired, want)
    for i in range(12):
        assert torch.equal(steered[i], only_a[i] if want[i] else plain.logits[i]), f"row {i}"


def test_and_gates_bad_inputs_are_refused(tiny_qwen, tmp_path):
    a = make_vector(tiny_qwen, name="a", layers=(2,), gate=(2, 0.0), metric="linear")
    b1 = make_vector(tiny_qwen, name="b1", layers=(2,), gate=(1, 0.0), metric="linear")
    two = make_vector(tiny_qwen, name="two", layers=(2,), gate=(2, 0.0), lower=(-1.0, 0.5))
    other = make_vector(tiny_qwen, name="other", layers=(2,), gate=(2, 0.0))
    other.model = dataclasses.replace(other.model, weights_sha256="0" * 64)  # made for other weights
    ungated = make_vector(tiny_qwen, name="u", layers=(2,))
    pa = a.save(tmp_path / "a")
    for bad, match in ((b1, "must be among"), (two, "two-sided or AND-ed"), (other, "different models"),
                       (ungated, "not a gated activation vector")):
        with pytest.raises(VectorError, match=match):
            and_gates(pa, bad.save(tmp_path / bad.name), name="x", out=tmp_path / "x", command="")
    with pytest.raises(VectorError, match="one of the two inputs"):
        and_gates(pa, pa, name="a", out=tmp_path / "a", command="")
    assert not (tmp_path / "x").exists()
    d = tiny_qwen.config.hidden_size
    also = {"layers": [2], "threshold": 0.0}
    with pytest.raises(VectorError, match="cannot be two-sided"):
        Gate("v", {"layer": 2, "threshold": 0.5, "also": also, "lower": {"threshold": -1.0, "strength": 0.5}},
             torch.ones(d), torch.zeros(d), hidden_size=d, also=(torch.ones(d), torch.zeros(d)))
    with pytest.raises(VectorError, match="must be increasing and among"):
        Gate("v", {"layer": 2, "threshold": 0.5, "also": {"layers": [1], "threshold": 0.0}},
             torch.ones(d), torch.zeros(d), hidden_size=d, also=(torch.ones(d), torch.zeros(d)))
    with pytest.raises(VectorError, match="do not fit"):
        Gate("v", {"layer": 2, "threshold": 0.5, "also": also}, torch.ones(d), torch.zeros(d), hidden_size=d,
             also=(torch.ones(2 * d), torch.zeros(2 * d)))
    a.config["gate"]["also"] = also  # no probe tensors
    with pytest.raises(VectorError, match="lack gate.also"):
        Gate.of(a)
    a.tensors |= {"gate.also.direction": torch.ones(d), "gate.also.center": torch.zeros(d)}
    with pytest.raises(VectorError, match="two gates AND-ed"):  # a refit would drop the second gate
        run_refit_gate(ExtractConfig(limit=1), a.save(tmp_path / "and"), command="")


@pytest.mark.parametrize("gate_layers", [None, (1, 2)])
def test_two_sided_gate_subtracts_on_rows_below_its_lower_threshold(tiny_qwen, gate_layers):
    """Rows above the threshold get +s*c*r, rows between the two thresholds stay vanilla, rows below the
    lower threshold get -lower*s*c*r, at the steered layer's input; the decision is each row's multiplier."""
    ids = _ids(9, seed=11)
    plain = tiny_qwen(input_ids=ids, output_hidden_states=True)
    vec = make_vector(tiny_qwen, layers=(2,), gate=(2, 0.0), gate_layers=gate_layers, metric="linear", seed=6,
                      coefficient=3.0)
    gate = SteeringRuntime(tiny_qwen, [vec]).steerers["refusal"].gate
    feats = torch.cat([plain.hidden_states[ly][:, -1] for ly in gate.layers], dim=-1)
    scores = gate.scores(feats)
    lo, hi = (float(x) for x in scores.quantile(torch.tensor([0.3, 0.7])))
    vec.config["gate"].update(threshold=hi, lower={"threshold": lo, "strength": 0.5})
    expected = torch.where(scores > hi, 1.0, torch.where(scores < lo, -0.5, 0.0))
    assert {-0.5, 0.0, 1.0} <= set(expected.tolist())  # all three decisions occur
    rt = SteeringRuntime(tiny_qwen, [vec])
    with rt:
        steered = _layer_input(tiny_qwen, 2, lambda: _forward(tiny_qwen, rt, ids, [2.0] * 9))
        decided = rt.rows.gate["refusal"]
    assert torch.equal(decided, expected)
    r = vec.tensors["layers.2"]
    for i in range(9):
        torch.testing.assert_close(steered[i] - plain.hidden_states[2][i], (2.0 * 3.0 * float(expected[i]) * r)
                                   .expand_as(steered[i]), rtol=1e-5, atol=1e-5, msg=f"row {i}")
    # a one-sided copy of the same gate leaves the lowered rows vanilla
    one = Gate.of(vec, two_sided=False)
    assert torch.equal(one.decide(feats), (scores > hi).float())
    # a floor makes the lowering a band: rows at or below it stay vanilla
    floor = float(scores[scores < lo].median())
    vec.config["gate"]["lower"]["floor"] = floor
    band = torch.where(scores > hi, 1.0, torch.where((scores < lo) & (scores > floor), -0.5, 0.0))
    assert {-0.5, 0.0, 1.0} <= set(band.tolist()) and (band != expected).any()
    assert torch.equal(Gate.of(vec).decide(feats), band)


@pytest.mark.parametrize("span", ["all", "prompt"])
def test_a_prompt_span_leaves_lowered_rows_vanilla_on_generated_tokens(tiny_qwen, span):
    """On a pass of generated tokens (``rows.decode``), a gate whose lower span is "prompt" runs its
    lowered rows vanilla and still steers its open rows; span "all" lowers them there too."""
    ids = _ids(3, seed=2)
    plain = tiny_qwen(input_ids=ids, output_hidden_states=True)
    vec = make_vector(tiny_qwen, layers=(2,), gate=(2, 0.0), metric="linear", seed=6, coefficient=3.0)
    vec.config["gate"].update(threshold=0.0, lower={"threshold": -1.0, "strength": 0.5, "span": span})
    rt = SteeringRuntime(tiny_qwen, [vec])
    assert rt.steerers["refusal"].gate.lower_span == span
    decisions = torch.tensor([1.0, 0.0, -0.5])  # open, closed, lowered
    with rt:
        rt.rows.reset(decode=True)
        rt.rows.strength["refusal"], rt.rows.gate["refusal"] = torch.tensor([2.0] * 3), decisions
        steered = _layer_input(tiny_qwen, 2, lambda: tiny_qwen(input_ids=ids))
    applied = decisions.clamp_min(0) if span == "prompt" else decisions
    r = vec.tensors["layers.2"]
    for i in range(3):
        torch.testing.assert_close(steered[i] - plain.hidden_states[2][i], (6.0 * float(applied[i]) * r)
                                   .expand_as(steered[i]), rtol=1e-5, atol=1e-5, msg=f"row {i}")


@pytest.mark.parametrize(("lower", "match"), [
    ({"threshold": 1.0, "strength": 0.5}, "below its threshold"),
    ({"threshold": -1.0, "strength": 0.0}, "strength"),
    ({"threshold": -1.0, "strength": 5.0}, "strength"),
    ({"threshold": float("nan"), "strength": 0.5}, "below its threshold"),
    ({"threshold": -1.0}, "'lower' must be"),
    ("low", "'lower' must be"),
    ({"threshold": -1.0, "strength": 0.5, "span": "decode"}, "span 'decode' must be one of all, prompt"),
    ({"threshold": -1.0, "strength": 0.5, "floor": -0.5}, "floor -0.5 must be a number below"),
    ({"threshold": -1.0, "strength": 0.5, "floor": "low"}, "floor 'low' must be a number below"),
])
def test_malformed_lower_thresholds_are_refused(tiny_qwen, lower, match):
    d = tiny_qwen.config.hidden_size
    with pytest.raises(VectorError, match=match):
        Gate("v", {"layer": 1, "threshold": 0.5, "lower": lower}, torch.ones(d), torch.zeros(d), hidden_size=d)


@pytest.mark.parametrize(("cfg", "size", "match"), [
    ({"layer": 2, "layers": [2, 1]}, 2, "increasing"),
    ({"layer": 2, "layers": [1, 1, 2]}, 3, "increasing"),
    ({"layer": 2, "layers": [1, 3]}, 2, "end at"),
    ({"layer": 2, "layers": [0, 2]}, 2, "layer 0"),
    ({"layer": 0}, 1, "layer 0"),
    ({"layer": 2, "layers": [1, 2]}, 1, "do not fit"),
])
def test_malformed_gates_are_refused(tiny_qwen, cfg, size, match):
    d = tiny_qwen.config.hidden_size
    with pytest.raises(VectorError, match=match):
        Gate("v", {"threshold": 0.0, **cfg}, torch.ones(size * d), torch.zeros(size * d), hidden_size=d)


def test_vector_targeting_missing_layer_is_refused(tiny_qwen):
    vec = make_vector(tiny_qwen, layers=(7,))
    with pytest.raises(VectorError, match="layers"):
        SteeringRuntime(tiny_qwen, [vec])


def test_gate_after_steered_layer_is_refused(tiny_qwen):
    vec = make_vector(tiny_qwen, layers=(1,), gate=(2, 0.0))
    with pytest.raises(VectorError, match="gate layer"):
        SteeringRuntime(tiny_qwen, [vec])


def test_gate_position_is_clamped_to_each_rows_prompt():
    from steer.hooks import _gate_rows

    h = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)  # value = row * 6 + column
    picked = _gate_rows(h, -5, torch.tensor([2, 6]))[:, 0]  # row 0 is left-padded by 4
    assert picked.tolist() == [4.0, 7.0]  # row 0: its first real token (col 4); row 1: col 1
