"""The console script: user mistakes are one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _steer(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--model", "/nonexistent/model"], "not a Hugging Face checkpoint directory"),
        (["serve", "--min-strength", "3", "--default-strength", "1"], "min_strength <= default_strength"),
        (["serve", "--max-strength", "nan"], "max_strength"),
        (["serve", "--combine", "both=refusal"], "combine wants NAME=VECTOR[*RATIO]+VECTOR[*RATIO] (two or more"),
        (["serve", "--combine", "both=refusal+enchtable*0"], "with ratios > 0"),
        (["serve", "--vectors", "/nonexistent/vectors", "--model", "{tiny}"], "vector directory"),
        (["serve", "--model", "{tiny}"], "no safety vectors are loaded"),
        (["extract", "--refit-gate", "/nonexistent/v.json", "--model", "{tiny}"], "cannot read vector manifest"),
        (["extract", "--refit-gate", "v.json", "--layers", "3"], "keeps the source vector's steered layers"),
        (["extract", "--refit-gate", "v.json", "--gate-fpr", "1"], "--gate-fpr 1.0: must be in [0, 1)"),
        (["extract", "--refit-gate", "v.json", "--gate-fpr", "nan"], "--gate-fpr nan: must be in [0, 1)"),
        (["extract", "--gate-fpr", "0.1"], "--gate-fpr: only with --refit-gate"),
        (["extract", "--refit-gate", "v.json", "--gate-layers", "9-x"], "expected layers like 9-13 or 9,11,13"),
        (["extract", "--refit-gate", "v.json", "--gate-layers", "13,9"], "must be distinct and increasing"),
        (["extract", "--refit-gate", "v.json", "--gate-layers", "9-13", "--gate-layer", "13"], "give one"),
        (["extract", "--gate-layers", "9-13"], "--gate-layers: only with --refit-gate"),
        (["extract", "--lower", "5"], "--lower 5: must be in (0, 4]"),
        (["extract", "--lower", "-1"], "--lower -1: must be in (0, 4]"),
        (["extract", "--lower", "0.5", "--lower-margin", "-1"], "--lower-margin -1: must be >= 0"),
        (["extract", "--lower", "0.5", "--lower-span", "decode"], "--lower-span 'decode': must be one of all, prompt"),
        (["extract", "--lower-floor"], "--lower-floor: only with --lower C"),
        (["extract", "--and-gates", "a.json", "b.json", "--refit-gate", "v.json"], "--and-gates: copies two vectors'"),
        (["extract", "--and-gates", "/nonexistent/a.json", "b.json"], "cannot read vector manifest"),
    ],
)
def test_user_errors_are_one_line(args, message, tiny_dir):
    proc = _steer(*[a.replace("{tiny}", str(tiny_dir)) for a in args])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("steer: error: ") and message in lines[-1], proc.stderr


def test_unknown_backend_is_one_line():
    proc = _steer("serve", "--backend", "nosuch")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # argparse's usage error
    assert proc.stderr.strip().splitlines()[-1].endswith("invalid choice: 'nosuch' (choose from 'transformers', 'vllm')")
    proc = _steer("serve", env=dict(os.environ, STEER_BACKEND="nosuch"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "steer: error: invalid backend='nosuch' (--backend / STEER_BACKEND): Input should be 'transformers' or 'vllm'")


def test_env_var_feeds_settings(tiny_dir):
    env = dict(os.environ, STEER_MIN_STRENGTH="2", STEER_DEFAULT_STRENGTH="1")
    proc = _steer("serve", "--model", str(tiny_dir), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "got 2 <= 1 <= 4" in proc.stderr  # the env values reached the settings


def test_help_lists_every_serve_flag():
    out = _steer("serve", "--help").stdout
    for flag in ("--model", "--vectors", "--backend", "--host", "--port", "--default-strength", "--min-strength",
                 "--max-strength", "--api-key"):
        assert flag in out


def test_gate_templates_that_fit_no_context_is_one_line(tmp_path, tiny_tokenizer):
    """``steer extract --gate-templates`` on a model whose context holds no templated request: one line."""
    from conftest import make_model

    model = make_model("qwen2", len(tiny_tokenizer))
    model.config.max_position_embeddings = 40
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    proc = _steer("extract", "--gate-templates", "--model", str(tmp_path / "m"), "--limit", "2", "--out",
                  str(tmp_path / "v"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "steer: error: --gate-templates: no gate-family jailbreak template fits a harmful request in the model's "
        "40 tokens")
    assert not (tmp_path / "v").exists()
    help_text = _steer("extract", "--help").stdout
    assert "--gate-templates" in help_text and "--gate-conversations" in help_text
