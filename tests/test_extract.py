"""``steer extract`` end to end on a tiny model: it writes a loadable, complete vector."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from steer.calibrate import ExtractConfig, run_extract, run_refit_gate, splits
from steer.hooks import SteeringRuntime
from steer.models import fingerprint, load_model
from steer.vectors import SafetyVector, VectorError


def test_extract_writes_a_complete_gated_vector(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "model"
    make_model("qwen2", len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = ExtractConfig(model=str(model_dir), out=str(tmp_path / "vec"), name="tiny", limit=3)
    manifest = run_extract(cfg, command="steer extract --limit 3")
    vec = SafetyVector.load(manifest)
    model, _ = load_model(model_dir, dtype=torch.float32)
    assert vec.model == fingerprint(model)
    gate = vec.config["gate"]
    assert gate["metric"] == "linear" and gate["position"] == -5 and gate["layer"] <= min(vec.layer_directions())
    assert vec.config["coefficient"] > 0
    prov = json.loads(manifest.read_text())["provenance"]
    assert prov["command"] == "steer extract --limit 3"
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
    SteeringRuntime(model, [vec])  # made for the fine-tune
    aligned, _ = load_model(src_dir, dtype=torch.float32)
    with pytest.raises(VectorError, match="--transfer tiny_ft"):
        SteeringRuntime(aligned, [vec])
    with pytest.raises(VectorError, match="different architecture"):
        run_refit_gate(ExtractConfig(model=str(other_dir), out=str(tmp_path / "x"), name="x", limit=3), source,
                       command="")
    with pytest.raises(VectorError, match="not a gated activation vector"):
        ungated = SafetyVector("u", "activation", src.model, {k: v for k, v in src.tensors.items()
                                                              if not k.startswith("gate.")}, {"coefficient": 1.0})
        run_refit_gate(ExtractConfig(model=str(ft_dir), out=str(tmp_path / "y"), name="y", limit=3),
                       ungated.save(tmp_path / "u"), command="")
