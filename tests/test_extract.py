"""``steer extract`` end to end on a tiny model: it writes a loadable, complete vector; ``--refit-gate``;
``--gate-templates`` (which templated sets reach the probe and the threshold, and their record)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_model

from steer import data
from steer.calibrate import (
    BENIGN_DEV,
    GATE_BENIGN,
    GATE_HARMFUL,
    REFUSAL_TURN,
    ExtractConfig,
    conversation_phrases,
    conversation_sets,
    extract_dtype,
    gate_roles,
    lower_gate,
    run_extract,
    run_refit_gate,
    splits,
    templated_sets,
)
from steer.extract import best_threshold, chat_prompt_ids, residuals
from steer.hooks import Gate, SteeringRuntime
from steer.models import fingerprint, load_model
from steer.templates import template_split
from steer.vectors import SafetyVector, VectorError


def test_extract_writes_a_complete_gated_vector(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "model"
    make_model("qwen2", len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = ExtractConfig(model=str(model_dir), out=str(tmp_path / "vec"), name="tiny", limit=3, lower=0.5)
    manifest = run_extract(cfg, command="steer extract --limit 3 --lower 0.5")
    vec = SafetyVector.load(manifest)
    model, _ = load_model(model_dir, dtype=torch.float32)
    assert vec.model == fingerprint(model)
    gate = vec.config["gate"]
    assert gate["metric"] == "linear" and gate["position"] == -5 and gate["layer"] <= min(vec.layer_directions())
    assert vec.config["coefficient"] > 0
    assert gate["lower"]["strength"] == 0.5 and gate["lower"]["threshold"] <= gate["threshold"] - 0.5  # two-sided
    prov = json.loads(manifest.read_text())["provenance"]
    assert prov["command"] == "steer extract --limit 3 --lower 0.5"
    # every split is recorded with hashes, and the held-out test split is named as such
    assert set(prov["datasets"]) == set(splits())
    assert all(len(d["prompts_sha256"]) == 64 for d in prov["datasets"].values())
    assert prov["split"]["held_out"] == ["test_harmful", "test_benign"]
    assert prov["dev"]["grid"], "the dev search is recorded"
    assert isinstance(prov["dev"]["steering_changed_no_dev_answer"], bool)
    SteeringRuntime(model, [vec])  # loads onto the model it was made for


def test_refit_gate_keeps_the_direction_and_fits_the_gate_on_the_fine_tune(tmp_path, tiny_tokenizer):
    """``steer extract --refit-gate``: the source vector's directions and coefficient unchanged, a new gate
    fitted on the other model (same architecture), and the result made for that model: it loads there
    without a declared transfer, and on the source's model only as one. Another architecture is refused."""
    src_dir, ft_dir, other_dir = tmp_path / "aligned", tmp_path / "ft", tmp_path / "other"
    make_model("qwen2", len(tiny_tokenizer)).save_pretrained(src_dir)
    ft = make_model("qwen2", len(tiny_tokenizer))
    with torch.no_grad():  # a "fine-tune": every weight moved a little
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ft.save_pretrained(ft_dir)
    make_model("llama", len(tiny_tokenizer)).save_pretrained(other_dir)
    for d in (src_dir, ft_dir, other_dir):
        tiny_tokenizer.save_pretrained(d)
    source = run_extract(ExtractConfig(model=str(src_dir), out=str(tmp_path / "vec"), name="tiny", limit=3),
                         command="steer extract --limit 3")
    manifest = run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "refit"), name="tiny_ft", limit=3),
                              source, command="steer extract --refit-gate")
    src, vec = SafetyVector.load(source), SafetyVector.load(manifest)
    model, _ = load_model(ft_dir, dtype=torch.float32)
    assert vec.model == fingerprint(model) != src.model
    assert vec.layer_directions().keys() == src.layer_directions().keys()
    for ly, r in src.layer_directions().items():
        assert torch.equal(vec.layer_directions()[ly], r)
    assert vec.config["coefficient"] == src.config["coefficient"]
    assert vec.config["gate"]["layer"] == src.config["gate"]["layer"]
    assert not torch.equal(vec.tensors["gate.direction"], src.tensors["gate.direction"])
    prov = json.loads(manifest.read_text())["provenance"]
    assert prov["direction_from"]["vector"] == "tiny" and prov["direction_from"]["tensors_sha256"] == src.sha256
    assert 0.0 <= prov["dev"]["dev_harmful_gate_fires"] <= 1.0 and prov["dev"]["dev_benign_gate_fires"] == 0.0
    assert "inherited_from_source" not in prov  # a steer extract gate: one layer, no templates, budget 0
    SteeringRuntime(model, [vec])  # made for the fine-tune
    aligned, _ = load_model(src_dir, dtype=torch.float32)
    with pytest.raises(VectorError, match="--transfer tiny_ft"):
        SteeringRuntime(aligned, [vec])
    with pytest.raises(VectorError, match="different architecture"):
        run_refit_gate(ExtractConfig(model=str(other_dir), out=str(tmp_path / "x"), name="x", limit=3), source,
                       command="")
    # --gate-fpr: the same probe with a threshold that lets at most that fraction of dev benign prompts fire
    loose = run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "loose"), name="loose", limit=3,
                                         gate_fpr=0.5), source, command="steer extract --refit-gate --gate-fpr 0.5")
    lvec, ldev = SafetyVector.load(loose), json.loads(loose.read_text())["provenance"]["dev"]
    assert torch.equal(lvec.tensors["gate.direction"], vec.tensors["gate.direction"])
    assert lvec.config["gate"]["threshold"] <= vec.config["gate"]["threshold"]
    assert ldev["allowed_dev_benign_fires"] == 0.5 and ldev["dev_benign_gate_fires"] <= 0.5
    assert ldev["dev_harmful_gate_fires"] >= prov["dev"]["dev_harmful_gate_fires"]
    with pytest.raises(VectorError, match="must be in"):
        run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "z"), name="z", limit=3, gate_fpr=-0.1),
                       source, command="")
    # --gate-layers: one probe over several layers' residuals, decided at the last; served as is
    multi = run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "multi"), name="multi", limit=3,
                                         gate_layers="1-2"), source, command="steer extract --refit-gate --gate-layers 1-2")
    mvec = SafetyVector.load(multi)
    assert mvec.config["gate"]["layers"] == [1, 2] and mvec.config["gate"]["layer"] == 2
    assert mvec.tensors["gate.direction"].shape == (2 * model.config.hidden_size,)
    assert SteeringRuntime(model, [mvec]).steerers["multi"].gate.layers == (1, 2)
    # a refit with nothing given makes the source's kind of gate: its layers and its dev benign fire budget
    for src_vec, given, want in ((multi, {}, {"gate_layers": "1,2"}), (loose, {}, {"gate_fpr": 0.5}),
                                 (multi, {"gate_layer": 1}, {}), (loose, {"gate_fpr": 0.0}, {})):
        again = json.loads(run_refit_gate(ExtractConfig(model=str(src_dir), out=str(tmp_path / "again"), name="again",
                                                        limit=3, **given), src_vec, command="").read_text())
        assert again["provenance"].get("inherited_from_source", {}) == want
        assert again["config"]["gate"].get("layers") == ([1, 2] if "gate_layers" in want else None)
        assert again["provenance"]["dev"]["allowed_dev_benign_fires"] == want.get("gate_fpr", 0.0)
    with pytest.raises(VectorError, match=r"must be in 1\.\.2"):
        run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "w"), name="w", limit=3, gate_layers="2-3"),
                       source, command="")
    # --lower: a two-sided gate, its lower threshold --lower-margin below every harmful prompt it was fitted
    # or tuned on (none of them ever has refusal lowered)
    low = run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "low"), name="low", limit=3, lower=0.5,
                                       lower_margin=0.25), source, command="steer extract --refit-gate --lower 0.5")
    lv = SafetyVector.load(low)
    g = lv.config["gate"]
    assert torch.equal(lv.tensors["gate.direction"], vec.tensors["gate.direction"])
    assert g["threshold"] == vec.config["gate"]["threshold"] and g["lower"]["strength"] == 0.5
    assert g["lower"]["span"] == "prompt" and "floor" not in g["lower"]
    gate = Gate.of(lv)
    sets = {k: v.take(3) for k, v in splits().items()}
    harmful = [p for k in (*gate_roles(sets)["harmful"], "dev_harmful") for p in sets[k].prompts]
    ft, tok = load_model(ft_dir, dtype=extract_dtype())  # as steer extract loads it on this host
    feats = residuals(ft, tok, harmful, (gate.position,))[:, 0, gate.layer]
    want = min(float(gate.scores(feats).min()), g["threshold"]) - 0.25
    assert abs(g["lower"]["threshold"] - want) < 1e-3
    assert float(gate.decide(feats).min()) >= 0
    with pytest.raises(VectorError, match="not a gated activation vector"):
        ungated = SafetyVector("u", "activation", src.model, {k: v for k, v in src.tensors.items()
                                                              if not k.startswith("gate.")}, {"coefficient": 1.0})
        run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "y"), name="y", limit=3),
                       ungated.save(tmp_path / "u"), command="")


def test_best_threshold_never_lets_more_than_the_allowed_negatives_fire():
    """``best_threshold``: at ``max_fpr`` the threshold sits halfway between the k-th highest negative (k =
    the allowed count) and the next positive above it, so at most k negatives fire; k is not rounded down
    by float error (0.29 * 100 is 28.999..., and 29 are allowed)."""
    neg = torch.arange(30, dtype=torch.float32)  # 0..29
    pos = torch.tensor([10.5, 26.5, 27.5, 28.5, 40.0])
    for fpr, fires, tpr in ((0.0, 0, 1 / 5), (0.1, 3, 4 / 5), (1 / 30, 1, 2 / 5), (0.5, 9, 4 / 5)):
        thr, got = best_threshold(pos, neg, max_fpr=fpr)
        assert int((neg > thr).sum()) == fires and got == pytest.approx(tpr), (fpr, thr)
    assert best_threshold(pos, neg)[0] == pytest.approx((29 + 40) / 2)
    neg = torch.arange(100, dtype=torch.float32)
    thr, _ = best_threshold(torch.tensor([70.5, 200.0]), neg, max_fpr=0.29)
    assert int((neg > thr).sum()) == 29
    # at_edge: the threshold is the highest negative that must not fire; exactly k fire, more positives pass
    neg = torch.arange(30, dtype=torch.float32)
    thr, tpr = best_threshold(pos, neg, max_fpr=0.5, at_edge=True)
    assert thr == 14.0 and int((neg > thr).sum()) == 15 and tpr == pytest.approx(4 / 5)


# ---------------------------------------------------------------- --gate-templates


def _template_parts():
    """{sha256: (kind, part)} of every kept template, part in test (held out) / gate / dev."""
    T = template_split(0)["templates"]
    return {hashlib.sha256(t.encode()).hexdigest(): (k, p) for k in ("dan", "itw") for p in ("test", "gate", "dev")
            for t in T[f"{k}_{p}"]}, {hashlib.sha256(t.encode()).hexdigest(): t for t in sum(T.values(), [])}


def _check_templated(sets: dict, tsets: dict, record: dict, tok=None, max_tokens=None) -> None:
    """Every templated prompt is its recorded template (of the right family part, never a held-out one)
    around a request of its role's bare sets; recorded families are the templates' own."""
    parts, by_sha = _template_parts()
    family = template_split(0)["family"]
    roles = {("gate_tpl", "harmful"): GATE_HARMFUL, ("gate_tpl", "benign"): GATE_BENIGN,
             ("dev_tpl", "benign"): BENIGN_DEV}
    for name, ps in tsets.items():
        prefix, kind, label = name.rsplit("_", 2)
        rec = record["sets"][name]
        assert (rec["kind"], rec["label"], ps.label) == (kind, label, label)
        requests = {r for k in roles[prefix, label] for r in sets[k].prompts}
        assert len(rec["template_sha256"]) == len(ps.prompts) > 0
        for prompt, h in zip(ps.prompts, rec["template_sha256"], strict=True):
            assert parts[h] == (kind, "gate" if prefix == "gate_tpl" else "dev"), (name, parts[h])
            assert any(prompt == data.wrap(by_sha[h], r) for r in requests)
            if max_tokens is not None:
                assert len(chat_prompt_ids(tok, prompt)) <= max_tokens
        assert rec["families"] == sorted({family[h] for h in rec["template_sha256"]})
    held = {f for k in ("dan", "itw") for f in record["templates"]["held_out"][k]["families"]}
    used = {f for r in record["sets"].values() for f in r["families"]}
    assert used and not used & held


def test_templated_sets_use_gate_families_for_fitting_and_dev_families_for_the_threshold(tiny_tokenizer):
    sets = {k: v.take(3) for k, v in splits().items() if not k.startswith("test_")}
    tsets, record = templated_sets(sets, tiny_tokenizer, limit=3)
    assert sorted(tsets) == sorted(f"{p}_{k}_{lab}" for p, lab in (("gate_tpl", "harmful"), ("gate_tpl", "benign"),
                                                                   ("dev_tpl", "benign")) for k in ("dan", "itw"))
    assert all(len(ps.prompts) == 3 for ps in tsets.values()) and record["skipped"] == []
    _check_templated(sets, tsets, record)
    roles = gate_roles({**sets, **tsets})
    assert roles["harmful"] == GATE_HARMFUL + ("gate_tpl_dan_harmful", "gate_tpl_itw_harmful")
    assert roles["benign"] == GATE_BENIGN + ("gate_tpl_dan_benign", "gate_tpl_itw_benign")
    assert roles["dev_benign"] == BENIGN_DEV + ("dev_tpl_dan_benign", "dev_tpl_itw_benign")
    assert gate_roles(sets) == {"harmful": GATE_HARMFUL, "benign": GATE_BENIGN, "dev_benign": BENIGN_DEV}
    # full size: N_TEMPLATED per fitting set; the dev requests (60) shared by the two kinds
    full = {k: v for k, v in splits().items() if not k.startswith("test_")}
    tfull, _ = templated_sets(full, tiny_tokenizer)
    assert {k: len(v.prompts) for k, v in tfull.items()} == {
        "gate_tpl_dan_harmful": 40, "gate_tpl_itw_harmful": 40, "gate_tpl_dan_benign": 40, "gate_tpl_itw_benign": 40,
        "dev_tpl_dan_benign": 30, "dev_tpl_itw_benign": 30}
    # a context the DAN templates do not fit (this tokenizer: ~1.3 characters a token): skipped, recorded
    short, rec = templated_sets(sets, tiny_tokenizer, limit=3, max_tokens=1024)
    assert sorted(short) == ["dev_tpl_itw_benign", "gate_tpl_itw_benign", "gate_tpl_itw_harmful"]
    assert len(rec["skipped"]) == 3 and all("1024 tokens" in s for s in rec["skipped"])
    _check_templated(sets, short, rec, tiny_tokenizer, 1024)
    with pytest.raises(data.DataError, match="no gate-family jailbreak template fits a harmful request"):
        templated_sets(sets, tiny_tokenizer, limit=3, max_tokens=40)


@pytest.fixture()
def fit_recorder(monkeypatch) -> tuple[dict, list, list]:
    """(read, probes, thresholds), filled as steer extract runs: the prompts of each residual pass by its
    description, each probe's (harmful, benign) group sizes, and the number of benign dev scores each
    threshold is chosen over. The real functions still do the work."""
    import steer.calibrate as calibrate

    read, probes, thresholds = {}, [], []
    real_residuals, real_fit, real_best = calibrate.residuals, calibrate.fit_linear_probe, calibrate.best_threshold

    def residuals(model, tok, prompts, positions=(-1,), **kw):
        read[kw.get("desc")] = list(prompts)
        return real_residuals(model, tok, prompts, positions, **kw)

    def fit(harm, ben, **kw):
        probes.append(([len(x) for x in harm], [len(x) for x in ben]))
        return real_fit(harm, ben, **kw)

    def best(pos, neg, **kw):
        thresholds.append(len(neg))
        return real_best(pos, neg, **kw)

    monkeypatch.setattr(calibrate, "residuals", residuals)
    monkeypatch.setattr(calibrate, "fit_linear_probe", fit)
    monkeypatch.setattr(calibrate, "best_threshold", best)
    return read, probes, thresholds


def test_extract_gate_templates_fits_and_tunes_the_gate_on_templated_sets(tmp_path, tiny_tokenizer, fit_recorder):
    """End to end on a tiny model: the probe is fitted on the bare gate sets plus the gate-family templated
    ones (one group each), the threshold chosen over the bare plus dev-family templated benign dev sets;
    no prompt of a held-out template family is ever read; the provenance records it all. --refit-gate too."""
    model_dir = tmp_path / "model"
    model = make_model("qwen2", len(tiny_tokenizer))
    model.config.max_position_embeddings = 1024  # RoPE needs no table: room for the shorter templates
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    read, probes, thresholds = fit_recorder
    cfg = ExtractConfig(model=str(model_dir), out=str(tmp_path / "vec"), name="tpl", limit=3, gate_templates=True)
    manifest = run_extract(cfg, command="steer extract --gate-templates --limit 3")
    prov = json.loads(manifest.read_text())["provenance"]
    tpl = prov["gate_templates"]
    bare = {k: v.take(3) for k, v in splits().items() if not k.startswith("test_")}
    names = ["gate_tpl_itw_harmful", "gate_tpl_itw_benign", "dev_tpl_itw_benign"]  # DAN templates: > 1024 tokens
    assert sorted(tpl["sets"]) == sorted(names) and tpl["max_tokens"] == 1024 and len(tpl["skipped"]) == 3
    assert set(read) == set(bare) | set(names) and set(prov["datasets"]) == set(splits()) | set(names)
    tsets = {k: data.PromptSet(k, k.rsplit("_", 1)[1], tuple(read[k]), "", "") for k in names}
    _check_templated(bare, tsets, tpl, tiny_tokenizer, 1024)
    for k in names:
        assert prov["datasets"][k]["count"] == len(read[k]) == 3
    # every probe: the 4 + 1 harmful groups and 3 + 1 benign groups, in the gate_roles order
    sizes = ([len(read[k]) for k in (*GATE_HARMFUL, "gate_tpl_itw_harmful")],
             [len(read[k]) for k in (*GATE_BENIGN, "gate_tpl_itw_benign")])
    assert probes and all(p == sizes for p in probes)
    # every threshold is chosen over the bare and the templated dev benign prompts
    assert thresholds and set(thresholds) == {sum(len(read[k]) for k in (*BENIGN_DEV, "dev_tpl_itw_benign"))}
    held = {f for k in ("dan", "itw") for f in tpl["templates"]["held_out"][k]["families"]}
    assert not held & {f for p in ("gate", "dev") for k in ("dan", "itw") for f in tpl["templates"][p][k]["families"]}

    # --refit-gate --gate-templates: the same sets, one probe, its threshold over the templated dev too
    for log in (read, probes, thresholds):
        log.clear()
    refit = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / "refit"), name="tpl2", limit=3,
                                         gate_templates=True), manifest, command="")
    rprov = json.loads(refit.read_text())["provenance"]
    assert sorted(rprov["gate_templates"]["sets"]) == sorted(names) and set(names) <= set(rprov["datasets"])
    assert probes == [sizes] and thresholds == [sum(len(read[k]) for k in (*BENIGN_DEV, "dev_tpl_itw_benign"))]
    # not given: as the source was made (with templates here), and recorded as inherited
    for log in (read, probes, thresholds):
        log.clear()
    inherit = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / "inherit"), name="i", limit=3),
                             manifest, command="")
    iprov = json.loads(inherit.read_text())["provenance"]
    assert sorted(iprov["gate_templates"]["sets"]) == sorted(names) and probes == [sizes]
    assert iprov["inherited_from_source"] == {"gate_templates": True}
    # --no-gate-templates: no templated set is read and nothing is recorded
    read.clear()
    plain = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / "plain"), name="p", limit=3,
                                         gate_templates=False), manifest, command="")
    pprov = json.loads(plain.read_text())["provenance"]
    assert "gate_templates" not in pprov and "inherited_from_source" not in pprov and set(read).isdisjoint(names)


def test_conversation_phrases_are_split_in_three_disjoint_parts():
    ph = conversation_phrases()
    assert sorted(ph) == ["chat", "followup", "push"]
    for section, parts in ph.items():
        assert sorted(parts) == ["dev", "gate", "test"]
        sizes = [len(parts[p]) for p in ("gate", "dev", "test")]
        assert min(sizes) >= 10 and max(sizes) - min(sizes) <= 1, (section, sizes)
        flat = [x for p in parts.values() for x in p]
        assert len(set(flat)) == len(flat), f"{section}: a phrase in two parts"
    assert ph["chat"]["gate"][:2] == ("hi", "ok") and ph["followup"]["test"][0] == "Thanks! Can you explain that in simpler terms?"


def test_chat_prompt_ids_reads_a_conversation(tiny_tokenizer):
    conv = (("user", "What is rain?"), ("assistant", "Water falling."), ("user", "Go on."))
    msgs = [{"role": r, "content": c} for r, c in conv]
    want = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat_prompt_ids(tiny_tokenizer, conv) == list(want)
    assert chat_prompt_ids(tiny_tokenizer, "Go on.") == chat_prompt_ids(tiny_tokenizer, (("user", "Go on."),))
    one = tiny_tokenizer.decode(chat_prompt_ids(tiny_tokenizer, conv))
    assert one.count("<|im_start|>user") == 2 and one.endswith("<|im_start|>assistant\n")


def test_conversation_sets_build_each_shape_from_one_part():
    ph = conversation_phrases()
    benign, harmful = ["b0", "b1", "b2"], ["h0", "h1", "h2"]
    answers = {b: f"answer to {b}" for b in benign}
    sets = conversation_sets("dev", benign, answers, harmful, prefix="x", n=2)
    assert sorted(sets) == ["x_chat_benign", "x_followup_benign", "x_push_harmful", "x_second_harmful"]
    assert sets["x_chat_benign"].prompts == ph["chat"]["dev"] and sets["x_chat_benign"].label == "benign"
    assert sets["x_followup_benign"].prompts == tuple(
        (("user", b), ("assistant", answers[b]), ("user", ph["followup"]["dev"][i])) for i, b in enumerate(benign[:2]))
    assert sets["x_push_harmful"].prompts == tuple(
        (("user", h), ("assistant", REFUSAL_TURN), ("user", ph["push"]["dev"][i])) for i, h in enumerate(harmful[:2]))
    assert sets["x_second_harmful"].prompts == ((("user", "b0"), ("assistant", "answer to b0"), ("user", "h0")),
                                                (("user", "b1"), ("assistant", "answer to b1"), ("user", "h1")))
    assert {k: v.label for k, v in sets.items()} == {"x_chat_benign": "benign", "x_followup_benign": "benign",
                                                     "x_push_harmful": "harmful", "x_second_harmful": "harmful"}
    assert sorted(conversation_sets("gate", benign, answers, None, prefix="y")) == ["y_chat_benign", "y_followup_benign"]
    roles = gate_roles({**{k: None for k in (*GATE_HARMFUL, *GATE_BENIGN, *BENIGN_DEV)},
                        "gate_conv_chat_benign": 0, "gate_conv_push_harmful": 0, "dev_conv_followup_benign": 0})
    assert roles == {"harmful": (*GATE_HARMFUL, "gate_conv_push_harmful"),
                     "benign": (*GATE_BENIGN, "gate_conv_chat_benign"),
                     "dev_benign": (*BENIGN_DEV, "dev_conv_followup_benign")}


def test_refit_gate_conversations_fits_and_tunes_on_chat_shapes(tmp_path, tiny_tokenizer, fit_recorder):
    """--gate-conversations on a tiny model: the probe is fitted on the bare gate sets plus the gate part's
    chat shapes built on the gate's own requests (the assistant turn: this model's own answer), the threshold
    chosen over the bare plus the dev part's benign shapes, the test part never read; recorded in the
    provenance, and inherited by a refit that does not say."""
    import steer.calibrate as calibrate

    model_dir = tmp_path / "model"
    make_model("qwen2", len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    source = run_extract(ExtractConfig(model=str(model_dir), out=str(tmp_path / "vec"), name="tiny", limit=3),
                         command="steer extract --limit 3")
    read, probes, thresholds = fit_recorder
    for log in (read, probes, thresholds):  # only the refit below counts
        log.clear()
    manifest = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / "conv"), name="conv", limit=3,
                                            gate_conversations=True), source, command="")
    prov = json.loads(manifest.read_text())["provenance"]
    names = ["gate_conv_chat_benign", "gate_conv_followup_benign", "gate_conv_push_harmful",
             "gate_conv_second_harmful", "dev_conv_chat_benign", "dev_conv_followup_benign"]
    assert sorted(prov["gate_conversations"]["sets"]) == sorted(names) and set(names) <= set(read)
    assert set(names) <= set(prov["datasets"])
    ph = conversation_phrases()
    bare = {k: v.take(3) for k, v in splits().items()}
    gate_b = [p for i in range(3) for k in GATE_BENIGN for p in bare[k].prompts[i:i + 1]][:3]
    gate_h = [p for i in range(3) for k in GATE_HARMFUL for p in bare[k].prompts[i:i + 1]][:3]
    dev_b = [p for i in range(3) for k in BENIGN_DEV for p in bare[k].prompts[i:i + 1]][:3]
    follow = read["gate_conv_followup_benign"]
    assert [c[0] for c in follow] == [("user", b) for b in gate_b]  # round-robin over the gate's benign sets
    assert [c[2] for c in follow] == [("user", f) for f in ph["followup"]["gate"][:3]]
    assert all(c[1][0] == "assistant" for c in follow)
    model, tok = load_model(model_dir, dtype=calibrate.extract_dtype())  # as steer extract loads it here
    answers = calibrate.generate_texts(model, tok, None, gate_b + dev_b, strength=0.0,
                                       max_tokens=calibrate.CONVERSATION_ANSWER_TOKENS)[0]  # as one batch, as there
    assert [c[1][1] for c in follow] == [a.strip() for a in answers[:3]]  # the model's own greedy answers
    assert [c[1][1] for c in read["dev_conv_followup_benign"]] == [a.strip() for a in answers[3:]]
    assert [c[0][1] for c in read["gate_conv_push_harmful"]] == gate_h
    assert [c[0][1] for c in read["dev_conv_followup_benign"]] == dev_b
    assert tuple(read["dev_conv_chat_benign"]) == ph["chat"]["dev"]
    test_part = {x for parts in ph.values() for x in parts["test"]} - {x for parts in ph.values()
                                                                       for p in ("gate", "dev") for x in parts[p]}
    seen = {t for ps in read.values() for p in ps for t in ([p] if isinstance(p, str) else [c for _, c in p])}
    assert not seen & test_part, seen & test_part
    conv_h = ("gate_conv_push_harmful", "gate_conv_second_harmful")
    conv_b = ("gate_conv_chat_benign", "gate_conv_followup_benign")
    assert probes == [([len(read[k]) for k in (*GATE_HARMFUL, *conv_h)], [len(read[k]) for k in (*GATE_BENIGN, *conv_b)])]
    assert thresholds == [sum(len(read[k]) for k in (*BENIGN_DEV, "dev_conv_chat_benign", "dev_conv_followup_benign"))]
    # not given: as the source was made, and recorded as inherited; --no-gate-conversations reads none
    read.clear()
    inherit = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / "inherit"), name="i", limit=3),
                             manifest, command="")
    iprov = json.loads(inherit.read_text())["provenance"]
    assert iprov["inherited_from_source"] == {"gate_conversations": True} and set(names) <= set(read)
    read.clear()
    plain = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / "plain"), name="p", limit=3,
                                         gate_conversations=False), manifest, command="")
    assert "gate_conversations" not in json.loads(plain.read_text())["provenance"] and set(read).isdisjoint(names)
    # a new vector (steer extract --gate-conversations): the same sets reach its probe and threshold search
    read.clear()
    new = run_extract(ExtractConfig(model=str(model_dir), out=str(tmp_path / "new"), name="n", limit=3,
                                    gate_conversations=True), command="")
    nprov = json.loads(new.read_text())["provenance"]
    assert sorted(nprov["gate_conversations"]["sets"]) == sorted(names) and set(names) <= set(read)
    assert probes[-1] == probes[0]  # the same groups, in the gate_roles order


def test_extract_runs_in_the_hosts_fast_dtype(tmp_path, tiny_tokenizer, force_host):
    """steer extract (and --refit-gate) run the model in bf16 where the CPU has oneDNN bf16 kernels, in
    float32 on an AVX2-only CPU, and record which in the manifest."""
    model_dir = tmp_path / "model"
    make_model("qwen2", len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    force_host("avx512")
    source = run_extract(ExtractConfig(model=str(model_dir), out=str(tmp_path / "vec"), name="tiny", limit=2),
                         command="")
    assert json.loads(source.read_text())["provenance"]["dtype"] == "bfloat16"
    for kind, want in (("avx2", "float32"), ("avx512", "bfloat16")):
        force_host(kind)
        refit = run_refit_gate(ExtractConfig(model=str(model_dir), out=str(tmp_path / kind), name=f"r_{kind}",
                                             limit=2), source, command="")
        assert json.loads(refit.read_text())["provenance"]["dtype"] == want


def test_lower_floor_is_the_highest_code_score_and_needs_room_below_the_lower_threshold():
    """--lower-floor: the floor is the highest score of the gate's code prompts; a floor that reaches the
    lower threshold would leave no band, and is refused."""
    harmful = [torch.tensor([2.0, 3.0]), torch.tensor([1.5])]
    code = [torch.tensor([-6.0, -4.5]), torch.tensor([-5.0]), torch.tensor([])]
    cfg = ExtractConfig(lower=1.0, lower_margin=0.5, lower_floor=True, lower_span="all")
    low = lower_gate(cfg, 4.0, harmful, code)
    assert (low["threshold"], low["floor"], low["span"]) == (1.0, -4.5, "all")
    assert "floor" not in lower_gate(ExtractConfig(lower=1.0), 4.0, harmful, code)
    with pytest.raises(VectorError, match="no band is left"):
        lower_gate(cfg, 4.0, harmful, [torch.tensor([1.2])])
    with pytest.raises(VectorError, match="no band is left"):
        lower_gate(cfg, 4.0, harmful, [])
