"""``steer extract`` end to end on a tiny model: it writes a loadable, complete vector."""

from __future__ import annotations

import json

import torch
from conftest import make_model

from steer.calibrate import ExtractConfig, run_extract, splits
from steer.hooks import SteeringRuntime
from steer.models import fingerprint, load_model
from steer.vectors import SafetyVector


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
    SteeringRuntime(model, [vec])  # loads onto the model it was made for
