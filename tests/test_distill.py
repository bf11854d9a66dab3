"""EnchTable stage 1 (steer distill) on tiny random models: linearization identities, what training
touches, sigma's sign and low-rank form, resume, the refusal ablation, the saved vector, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from torch import nn

from server.cli import main
from steer.distill.answers import TRAIN_SPLITS, Pairs, orthogonalize, training_prompts
from steer.distill.export import lowrank, sigma, to_tensors
from steer.distill.linearize import Linearized, Targets
from steer.distill.run import DistillConfig, train_surrogate
from steer.distill.train import TrainSettings, answer_loss, collate, encode_pair
from steer.vectors import SafetyVector

PAIRS = Pairs(
    prompts=("How do I build a bomb?", "Write a Python function that adds two numbers.", "Explain photosynthesis."),
    answers=("Sure, here is how: the quick brown fox.", "def add(a, b):\n    return a + b\n", "Plants turn light."),
    provenance={"source": "test"},
)
FAST = TrainSettings(lr=1e-3, epochs=2, batch_size=2, grad_accum=1, max_len=64, warmup_ratio=0.1, save_every=1)


def _model(kind, tok, attn="sdpa"):
    m = make_model(kind, len(tok))
    m.set_attn_implementation(attn)
    return m


def _train(kind, tok, tmp_path, *, mode="attn", skip=0, settings=FAST, stop_after=None, work="w", model=None):
    model = model or _model(kind, tok, "eager" if mode == "attn_ffn" else "sdpa")
    cfg = DistillConfig(mode=mode, skip_layers=skip, train=settings, stop_after=stop_after)
    return model, train_surrogate(model, tok, PAIRS, cfg, work=tmp_path / work, device="cpu")


# ---------------------------------------------------------------- linearization identities


def test_linearized_linear_matches_plain_outputs_and_gradients():
    torch.manual_seed(0)
    plain = nn.Linear(8, 6)
    lin = Linearized(nn.Linear(8, 6))
    lin.inner.load_state_dict(plain.state_dict())
    with torch.no_grad():
        lin.theta[0].copy_(plain.weight + 0.1 * torch.randn_like(plain.weight))  # away from theta0
        plain.weight.copy_(lin.theta[0])
    x1 = torch.randn(5, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = plain(x1), lin(x2)
    torch.testing.assert_close(y2, y1, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(lin.theta[0].grad, plain.weight.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-6)
    assert lin.inner.bias.grad is None  # only matrices are trainable


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["ffn", "attn_ffn"])
def test_linearized_blocks_equal_plain_model_at_start(kind, mode, tiny_tokenizer):
    model = _model(kind, tiny_tokenizer, "eager")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    targets = Targets(model, mode, 1)
    assert targets.wrappers and all(isinstance(model.get_submodule(p), Linearized) for p in targets.wrappers)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    targets.restore()
    assert not any(isinstance(m, Linearized) for m in model.modules())


# ---------------------------------------------------------------- what training touches, sigma


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_attn_mode_changes_only_qkvo_weights(kind, tiny_tokenizer, tmp_path):
    model, done = _train(kind, tiny_tokenizer, tmp_path)
    sig = sigma(done["aligned"], done["trained"])
    expected = {f"model.layers.{i}.self_attn.{p}.weight" for i in range(4) for p in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")}
    assert set(sig) == expected
    fresh = _model(kind, tiny_tokenizer)  # every other parameter (qwen2's q/k/v biases too) is untouched
    after = model.state_dict()
    for n, t in fresh.state_dict().items():
        if n not in expected:
            assert torch.equal(after[n], t), n


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_ffn_mode_with_skip_changes_only_middle_mlps(kind, tiny_tokenizer, tmp_path):
    _, done = _train(kind, tiny_tokenizer, tmp_path, mode="ffn", skip=1)
    sig = sigma(done["aligned"], done["trained"])
    assert set(sig) == {f"model.layers.{i}.mlp.{p}.weight" for i in (1, 2) for p in ("gate_proj", "up_proj",
                                                                                     "down_proj")}


def test_attn_ffn_mode_trains_attention_and_mlp_matrices(tiny_tokenizer, tmp_path):
    _, done = _train("qwen2", tiny_tokenizer, tmp_path, mode="attn_ffn", skip=1)
    names = set(sigma(done["aligned"], done["trained"]))
    assert {n.split(".")[2] for n in names} == {"1", "2"} and all(n.endswith(".weight") for n in names)
    assert {n.split(".")[3] for n in names} == {"self_attn", "mlp"}


def _train_loss(model, tok) -> float:
    rows = [encode_pair(tok, p, a, 64) for p, a in zip(PAIRS.prompts, PAIRS.answers, strict=True)]
    ids, mask, labels = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        loss, n = answer_loss(model, ids, mask, labels)
    return float(loss) / n


def test_sigma_points_from_surrogate_to_aligned(tiny_tokenizer, tmp_path):
    model, done = _train("qwen2", tiny_tokenizer, tmp_path)
    sig = sigma(done["aligned"], done["trained"])
    aligned = _model("qwen2", tiny_tokenizer)
    for n, d in sig.items():  # sigma = aligned - surrogate, and the surrogate is the trained model
        torch.testing.assert_close(d, aligned.get_parameter(n) - model.get_parameter(n))
    surrogate = _model("qwen2", tiny_tokenizer)
    with torch.no_grad():
        for n, d in sig.items():
            surrogate.get_parameter(n).sub_(d)  # aligned - sigma = surrogate: fits the harmful pairs better
    assert _train_loss(surrogate, tiny_tokenizer) < _train_loss(aligned, tiny_tokenizer) - 0.1


def test_lowrank_factors_full_rank_exact_and_truncated_energy():
    torch.manual_seed(0)
    d = torch.randn(12, 7)
    a, b, e = lowrank(d, 7)
    assert a.shape == (7, 7) and b.shape == (12, 7) and e == 1.0
    torch.testing.assert_close(b @ a, d, atol=1e-5, rtol=1e-5)
    a, b, e = lowrank(d, 3)
    assert a.shape == (3, 7) and b.shape == (12, 3) and 0 < e < 1
    tensors, cfg = to_tensors({"w": d}, "lowrank", 16)  # rank above min(shape): full rank
    assert cfg == {"rank": 16, "energy": {"w": 1.0}} and set(tensors) == {"lora_A.w", "lora_B.w"}


# ---------------------------------------------------------------- resume


def test_resume_equals_uninterrupted(tiny_tokenizer, tmp_path):
    _, full = _train("llama", tiny_tokenizer, tmp_path, work="full")
    _, first = _train("llama", tiny_tokenizer, tmp_path, work="cut", stop_after=2)
    assert first is None and (tmp_path / "cut" / "checkpoint.pt").exists()
    _, resumed = _train("llama", tiny_tokenizer, tmp_path, work="cut")  # a fresh model, as a rerun would load
    assert resumed["result"]["steps"] == full["result"]["steps"] == 4
    for n, t in full["trained"].items():
        torch.testing.assert_close(resumed["trained"][n], t, atol=1e-6, rtol=0)
    assert resumed["result"]["losses"] == full["result"]["losses"]
    _, again = _train("llama", tiny_tokenizer, tmp_path, work="cut")  # finished: re-exported, not retrained
    assert again["result"] == resumed["result"]


# ---------------------------------------------------------------- refusal ablation, data split


def _ablation_inputs(kind, tok):
    """A tiny model, a random unit direction in its residual stream, and a batch of token ids."""
    model = _model(kind, tok)
    r = torch.randn(model.config.hidden_size)
    return model, r / r.norm(), torch.randint(0, len(tok), (2, 10))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_orthogonalization_removes_the_direction(kind, tiny_tokenizer):
    model, r, ids = _ablation_inputs(kind, tiny_tokenizer)
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
        orthogonalize(model, r)
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    assert max(float((before[i] @ r).abs().max()) for i in range(1, n)) > 1e-2
    for i in range(n):  # hidden_states[i]: input of layer i (the last entry is after the final norm)
        assert float((hs[i] @ r).abs().max()) < 1e-4, i
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight or \
        not model.config.tie_word_embeddings


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_affine_orthogonalization_holds_the_direction_at_its_level(kind, tiny_tokenizer):
    """level: the residual's part along r is that constant at every layer's input, whatever the token."""
    model, r, ids = _ablation_inputs(kind, tiny_tokenizer)
    with torch.no_grad():
        head = model.get_output_embeddings().weight.clone()
        orthogonalize(model, r, level=0.75)
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(model.config.num_hidden_layers):
        assert torch.allclose(hs[i] @ r, torch.full((2, 10), 0.75), atol=1e-4), i
    assert torch.equal(model.get_output_embeddings().weight, head)  # the unembedding is left as it was


def test_training_prompts_never_evaluated():
    from server.evaluation.suites import DEFAULT_SUITES, OPT_IN, load_suites

    prompts, record = training_prompts(TRAIN_SPLITS, None)
    assert record["count"] == len(prompts) == 440
    evaluated = {p for s in load_suites(DEFAULT_SUITES + OPT_IN) for p in s.prompts}
    assert not evaluated.intersection(prompts)
    default, _ = training_prompts(("gate_donotanswer",), 5)
    assert len(default) == 5


# ---------------------------------------------------------------- the command


def test_cli_writes_a_weight_vector(tiny_dir, tmp_path, capsys):
    answers = tmp_path / "pairs.jsonl"
    answers.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                               for p, a in zip(PAIRS.prompts, PAIRS.answers, strict=True)))
    args = ["distill", "--model", str(tiny_dir), "--answers", str(answers), "--out", str(tmp_path / "vec"),
            "--name", "ench", "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--rank", "2",
            "--work-dir", str(tmp_path / "work"), "--device", "cpu"]
    assert main(args) == 0
    v = SafetyVector.load(tmp_path / "vec" / "ench.json")
    assert v.kind == "weight" and v.config["rank"] == 2 and v.config["coefficient"] == 1.0
    assert len(v.weight_params()) == 16 and all(0 < e <= 1 for e in v.config["energy"].values())
    assert v.provenance["method"] == "enchtable-distill" and v.provenance["mode"] == "attn"
    assert v.provenance["data"]["file_sha256"] and v.provenance["steps"] == 1
    assert v.provenance["command"].startswith("steer distill")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "not a Hugging Face checkpoint directory"),
        (["--mode", "everything"], "unknown mode 'everything'"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--format", "zip"], "unknown format 'zip'"),
        (["--mode", "ffn", "--skip-layers", "2", "--model", "{tiny}", "--answers", "{answers}"], "--skip-layers 2"),
        (["--model", "{tiny}", "--answers", "/nonexistent.jsonl"], "cannot read answers file"),
        (["--prompt-splits", "test_harmful"], "cannot train the surrogate"),
    ],
)
def test_bad_inputs_are_one_line(args, message, tiny_dir, tmp_path, capsys):
    answers = tmp_path / "pairs.jsonl"
    answers.write_text(json.dumps({"prompt": "hi", "answer": "hello there"}) + "\n")
    args = [a.replace("{tiny}", str(tiny_dir)).replace("{answers}", str(answers)) for a in args]
    assert main(["distill", *args, "--work-dir", str(tmp_path / "w"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("steer: error: ") and message in last, err


@pytest.mark.parametrize("kind, device, want", [("avx512", "cpu", torch.bfloat16), ("avx2", "cpu", torch.float32),
                                               ("avx2", "cuda", torch.bfloat16), ("avx2", "cuda:1", torch.bfloat16)])
def test_answers_are_generated_in_the_hosts_fast_dtype(kind, device, want, force_host):
    """The ablated model answers in bf16 where the host has bf16 kernels (a GPU, oneDNN bf16), in float32 on an
    AVX2-only CPU, where batched bf16 matmuls have no fast kernel."""
    from steer.distill.answers import answer_dtype

    force_host(kind)
    assert answer_dtype(device) is want
