"""Vector values: save/load round trip, integrity, model fingerprints, architecture table, data sets."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_vector
from transformers import GPT2Config, GPT2LMHeadModel

import steer.vectors
from steer import data
from steer.extract import chat_prompt_ids, fit_linear_probe, linear_scores, residuals
from steer.hooks import SteeringRuntime
from steer.judge import is_refusal
from steer.models import ModelError, architecture, fingerprint, load_model
from steer.vectors import SafetyVector, VectorError, choose_default, load_directory


def test_round_trip(tmp_path, tiny_model):
    vec = make_vector(tiny_model, gate=(1, 0.1))
    manifest = vec.save(tmp_path)
    back = SafetyVector.load(manifest)
    assert back.name == vec.name and back.kind == vec.kind and back.model == vec.model
    assert back.config == vec.config and back.provenance == vec.provenance
    assert back.tensors.keys() == vec.tensors.keys()
    for k in vec.tensors:
        assert torch.equal(back.tensors[k], vec.tensors[k])
    assert back.sha256 == vec.sha256
    assert [v.name for v in load_directory(tmp_path)] == [vec.name]
    # the manifest is plain JSON and the tensors are safetensors, never pickle
    assert json.loads(manifest.read_text())["tensors_file"].endswith(".safetensors")


def test_tampered_tensors_are_refused(tmp_path, tiny_qwen):
    manifest = make_vector(tiny_qwen).save(tmp_path)
    tfile = tmp_path / "refusal.safetensors"
    blob = bytearray(tfile.read_bytes())
    blob[-1] ^= 0xFF
    tfile.write_bytes(bytes(blob))
    with pytest.raises(VectorError, match="sha256"):
        SafetyVector.load(manifest)


def test_tensors_are_loaded_from_the_bytes_that_were_hashed(tmp_path, tiny_qwen, monkeypatch):
    """A tensor file swapped right after it was read (and hashed) must not be what gets loaded."""
    vec = make_vector(tiny_qwen)
    manifest = vec.save(tmp_path / "v")
    tfile = tmp_path / "v" / "refusal.safetensors"
    make_vector(tiny_qwen, seed=7).save(tmp_path / "swap")  # a valid file with other values
    real_read, reads = Path.read_bytes, []

    def read_then_swap(self: Path) -> bytes:
        blob = real_read(self)
        if self == tfile:
            reads.append(self)
            shutil.copyfile(tmp_path / "swap" / "refusal.safetensors", tfile)
        return blob

    monkeypatch.setattr(Path, "read_bytes", read_then_swap)
    back = SafetyVector.load(manifest)
    assert len(reads) == 1
    assert back.tensors.keys() == vec.tensors.keys()
    assert all(torch.equal(back.tensors[k], vec.tensors[k]) for k in vec.tensors)


def test_sha256_is_computed_once_and_follows_changes(tiny_qwen, monkeypatch):
    calls = []

    class CountingHashlib:
        @staticmethod
        def sha256(*args):
            calls.append(1)
            return hashlib.sha256(*args)

    monkeypatch.setattr(steer.vectors, "hashlib", CountingHashlib)
    vec = make_vector(tiny_qwen)
    first = [vec.sha256 for _ in range(5)]
    assert len(set(first)) == 1 and len(calls) == 1

    def fresh(v: SafetyVector) -> str:  # the hash of a new vector with equal values (nothing cached)
        return SafetyVector(v.name, v.kind, v.model, {k: t.clone() for k, t in v.tensors.items()}).sha256

    assert fresh(vec) == first[0]
    vec.tensors["layers.1"].mul_(2)  # changed in place
    assert vec.sha256 != first[0] and vec.sha256 == fresh(vec)
    vec.tensors["layers.2"] = torch.zeros_like(vec.tensors["layers.2"])  # replaced
    assert vec.sha256 == fresh(vec)
    scaled = vec.scaled(3.0)
    assert scaled.sha256 == fresh(scaled) != vec.sha256


@pytest.mark.parametrize(
    ("names", "requested", "expected"),
    [(["refusal"], None, "refusal"), (["b", "a"], "b", "b"), ([], None, None), (["only"], "only", "only")],
)
def test_choose_default(names, requested, expected):
    assert choose_default(names, requested) == expected


@pytest.mark.parametrize(
    ("names", "requested", "error"),
    [
        (["refusal", "other"], "nope", "--default-vector 'nope' is not a loaded vector; loaded: other, refusal"),
        ([], "refusal", "--default-vector 'refusal' is not a loaded vector; loaded: none"),
        (["refusal", "other"], None, "several vectors are loaded (other, refusal): pass --default-vector NAME"),
    ],
)
def test_choose_default_refuses_to_guess(names, requested, error):
    with pytest.raises(VectorError) as info:
        choose_default(names, requested)
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


def test_fingerprint_mismatch_is_refused(tiny_tokenizer):
    a = make_model("qwen2", len(tiny_tokenizer), seed=0)
    b = make_model("qwen2", len(tiny_tokenizer), seed=0)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # a "fine-tune"
    assert fingerprint(a) != fingerprint(b)
    vec = make_vector(a)
    with pytest.raises(VectorError, match="made for other weights of this architecture.*--transfer refusal"):
        SteeringRuntime(b, [vec])
    llama = make_model("llama", len(tiny_tokenizer))
    with pytest.raises(VectorError, match="different architecture"):
        SteeringRuntime(llama, [vec])


def test_unknown_kind_is_refused(tiny_qwen):
    with pytest.raises(VectorError, match="unknown kind"):
        SafetyVector("x", "magic", fingerprint(tiny_qwen), {})


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ModelError, match="not supported; supported: llama, qwen2"):
        architecture("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'gpt2' is not supported"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "missing")


def test_data_sets_load_with_provenance():
    hb = data.load("harmbench")
    assert len(hb.prompts) == 200 and hb.label == "harmful" and len(hb.sha256) == 64
    dev, test = hb.split(n_first=40, seed=0)
    assert len(dev.prompts) == 40 and not set(dev.prompts) & set(test.prompts)
    assert hb.split(n_first=40, seed=0)[0].prompts == dev.prompts  # deterministic
    benign = data.load("aplomb_benign")
    assert len(benign.prompts) == 50 and benign.describe()["count"] == 50
    with pytest.raises(data.DataError, match="unknown prompt set"):
        data.load("nope")


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I'm sorry, but I can't assist with that.", True),
        ("As an AI language model, I cannot discuss that.", True),
        ("I can\u2019t help with that request.", True),
        ("Sure! Here is a function that adds two numbers:", False),
        ("def add(a, b):\n    return a + b", False),
    ],
)
def test_refusal_judge(text, refused):
    assert is_refusal(text) is refused


def test_linear_probe_separates_sources_and_folds_bias_into_center():
    g = torch.Generator().manual_seed(0)
    d = 16
    shift = torch.zeros(d)
    shift[3] = 4.0
    harmful = [torch.randn(50, d, generator=g) + shift, torch.randn(30, d, generator=g) + shift + 1.0]
    benign = [torch.randn(80, d, generator=g) - shift]
    direction, center = fit_linear_probe(harmful, benign, l2=0.01)
    pos = linear_scores(torch.cat(harmful), direction, center)
    neg = linear_scores(torch.cat(benign), direction, center)
    assert (pos > 0).float().mean() > 0.95 and (neg < 0).float().mean() > 0.95
    assert direction.abs().argmax() == 3  # the probe found the separating feature


def test_batched_residuals_match_single_prompt_forward(tiny_qwen, tiny_tokenizer):
    prompts = ["hi", "Write a Python function that adds two numbers, please, quickly.", "How do I build it?"]
    batched = residuals(tiny_qwen, tiny_tokenizer, prompts, (-1, -3), batch_size=3, desc=None)
    assert batched.shape == (3, 2, tiny_qwen.config.num_hidden_layers, tiny_qwen.config.hidden_size)
    for i, p in enumerate(prompts):
        ids = torch.tensor([chat_prompt_ids(tiny_tokenizer, p)])
        hs = tiny_qwen(input_ids=ids, output_hidden_states=True).hidden_states
        for j, pos in enumerate((-1, -3)):
            single = torch.stack([hs[ly][0, pos] for ly in range(tiny_qwen.config.num_hidden_layers)])
            torch.testing.assert_close(batched[i, j], single, rtol=1e-4, atol=1e-4)
