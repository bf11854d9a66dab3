"""``steer distill``: EnchTable stage 1 end to end (METHODS.md 1.1).

aligned model -> (harmful prompt, compliant answer) pairs -> SFT of a surrogate (``attn`` weights, or
NTK-linearized blocks) -> sigma = theta_aligned - theta_surrogate -> weight SafetyVector.

Training state lives in a work directory (default: ``~/.cache/steer/distill/runs/<key>``, the key
hashing the model, the data and every training setting), so rerunning the same command resumes from the
last checkpoint, and a finished run is only re-exported (``--format`` / ``--rank`` / ``--out`` are not
part of the key).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steer.distill.answers import (
    DEFAULT_SPLITS,
    TRAIN_SPLITS,
    Pairs,
    generated_pairs,
    read_answers_file,
    training_prompts,
)
from steer.distill.export import FORMATS, Format, sigma, to_tensors
from steer.distill.linearize import MODES, Mode, Targets, layer_range
from steer.distill.train import Trainer, TrainSettings, encode_pair
from steer.vectors import SafetyVector

log = logging.getLogger("steer.distill")
CPU_MAX_EXAMPLES = 48  # default on CPU (measured: see the --max-examples help); on a GPU: every prompt
DEFAULT_VECTOR = "vectors/refusal.json"
RESULT = "result.safetensors"


class DistillError(RuntimeError):
    """A user-facing distillation error (bad settings, unusable data, a work dir of another run)."""


@dataclass(frozen=True)
class DistillConfig:
    model: str | None = None
    out: str = "vectors"
    name: str = "enchtable"
    mode: Mode = "attn"
    skip_layers: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)
    max_examples: int | None = None  # None: CPU_MAX_EXAMPLES on CPU, all on a GPU
    prompt_splits: tuple[str, ...] = DEFAULT_SPLITS
    answers: str | None = None  # JSONL of {"prompt", "answer"}: used instead of generated answers
    answer_tokens: int = 96
    refusal_vector: str | None = None  # None: DEFAULT_VECTOR if made for this model, else a mean difference
    format: Format = "lowrank"
    rank: int = 16
    work_dir: str | None = None
    device: str | None = None  # None: cuda if available
    stop_after: int | None = None  # train at most this many steps in this call (then rerun to resume)


def validate(cfg: DistillConfig) -> None:
    t = cfg.train
    checks = [
        (cfg.mode in MODES, f"unknown mode {cfg.mode!r}; known: {', '.join(MODES)}"),
        (cfg.format in FORMATS, f"unknown format {cfg.format!r}; known: {', '.join(FORMATS)}"),
        (cfg.rank >= 1, f"--rank must be >= 1 (got {cfg.rank})"),
        (t.lr > 0 and t.lr == t.lr, f"--lr must be > 0 (got {t.lr})"),
        (t.epochs >= 1, f"--epochs must be >= 1 (got {t.epochs})"),
        (t.batch_size >= 1 and t.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
        (t.max_len >= 8, f"--max-len must be >= 8 (got {t.max_len})"),
        (0 <= t.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1) (got {t.warmup_ratio})"),
        (t.save_every >= 1, "--save-every must be >= 1"),
        (cfg.max_examples is None or cfg.max_examples >= 1, "--max-examples must be >= 1"),
        (cfg.answer_tokens >= 1, "--answer-tokens must be >= 1"),
        (cfg.skip_layers >= 0, "--skip-layers must be >= 0"),
        (cfg.mode != "attn" or cfg.skip_layers == 0, "--skip-layers applies to --mode ffn / attn_ffn only"),
        (cfg.answers is not None or set(cfg.prompt_splits) <= set(TRAIN_SPLITS) and cfg.prompt_splits,
         f"prompt split(s) {list(cfg.prompt_splits)} cannot train the surrogate; allowed (never evaluated): "
         f"{', '.join(TRAIN_SPLITS)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DistillError(msg)


def _device(cfg: DistillConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _limit(cfg: DistillConfig, device: str) -> int | None:
    return cfg.max_examples or (CPU_MAX_EXAMPLES if device == "cpu" else None)


def _pairs(cfg: DistillConfig, model_dir: Path, fp, device: str) -> Pairs:
    from steer.demo import cache_dir

    limit = _limit(cfg, device)
    prompts, record = training_prompts(cfg.prompt_splits, limit)
    explicit = cfg.refusal_vector is not None
    return generated_pairs(model_dir, fp, prompts, record, answer_tokens=cfg.answer_tokens,
                           vector_path=cfg.refusal_vector or DEFAULT_VECTOR, explicit_vector=explicit,
                           device=device, cache=cache_dir() / "distill")


def run_key(fp, cfg: DistillConfig, pairs: Pairs) -> str:
    payload = {"model": fp.to_dict(), "mode": cfg.mode, "skip_layers": cfg.skip_layers, "train": cfg.train.to_dict(),
               "pairs": hashlib.sha256(json.dumps([pairs.prompts, pairs.answers]).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _work_dir(cfg: DistillConfig, key: str) -> Path:
    from steer.demo import cache_dir

    work = Path(cfg.work_dir) if cfg.work_dir else cache_dir() / "distill" / "runs" / key[:16]
    stamp = work / "run.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") != key:
        raise DistillError(f"work dir {work} holds a run with other settings or data; pass another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key}) + "\n")
    return work


def train_surrogate(model, tok, pairs: Pairs, cfg: DistillConfig, *, work: Path, device: str) -> dict | None:
    """Train (or resume) the surrogate in place. Returns {"aligned", "trained", "result"} once finished,
    None when ``cfg.stop_after`` stopped it early (a rerun resumes)."""
    examples = [e for p, a in zip(pairs.prompts, pairs.answers, strict=True)
                if (e := encode_pair(tok, p, a, cfg.train.max_len)) is not None]
    if not examples:
        raise DistillError(f"no training example fits in --max-len {cfg.train.max_len}")
    targets = Targets(model, cfg.mode, cfg.skip_layers)
    aligned = {n: p.detach().clone() for n, p in targets.params.items()}
    if (work / RESULT).exists():  # finished earlier: only re-export
        targets.restore()
        return {"aligned": aligned, "trained": load_file(work / RESULT),
                "result": json.loads((work / "result.json").read_text())}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = Trainer(model, targets.params, examples, cfg.train, pad=pad, work=work, device=device)
    t0 = time.time()
    trainer.run(cfg.stop_after)
    if not trainer.finished:
        targets.restore()
        return None
    targets.restore()  # trained theta back into the plain modules: the surrogate is an ordinary model
    trained = {n: model.get_parameter(n).detach().float().cpu().contiguous() for n in aligned}
    result = {"steps": trainer.step, "examples": len(examples), "final_train_loss": trainer.losses[-1],
              "losses": trainer.losses, "seconds_last_call": round(time.time() - t0, 1)}
    save_file(trained, work / RESULT)
    (work / "result.json").write_text(json.dumps(result) + "\n")
    (work / "checkpoint.pt").unlink(missing_ok=True)  # the optimizer state is no longer needed
    return {"aligned": aligned, "trained": trained, "result": result}


def build_vector(fp, done: dict, cfg: DistillConfig, provenance: dict) -> SafetyVector:
    sig = sigma(done["aligned"], done["trained"])
    tensors, extra = to_tensors(sig, cfg.format, cfg.rank)
    config = {"coefficient": 1.0, **extra,
              "source": f"EnchTable stage 1: sigma = theta_aligned - theta_surrogate, surrogate fine-tuned on "
                        f"harmful (prompt, compliant answer) pairs, mode {cfg.mode}"}
    return SafetyVector(cfg.name, "weight", fp, tensors, config, provenance)


def run_distill(cfg: DistillConfig, *, command: str) -> Path | None:
    """Distill and save; returns the manifest path, or None when stopped early by ``stop_after``."""
    from steer.demo import ensure_demo_model
    from steer.models import fingerprint, load_config, load_model

    validate(cfg)
    t0 = time.time()
    model_dir = Path(cfg.model) if cfg.model else ensure_demo_model()
    n_layers = load_config(model_dir).num_hidden_layers  # ModelError (one line): missing or unsupported
    if cfg.mode != "attn":
        try:
            layer_range(n_layers, cfg.skip_layers)
        except ValueError as e:
            raise DistillError(str(e)) from None
    device = _device(cfg)
    user_pairs = read_answers_file(cfg.answers, _limit(cfg, device)) if cfg.answers else None  # fail fast
    attn = "eager" if cfg.mode == "attn_ffn" else "sdpa"  # SDPA kernels have no forward-mode AD
    model, tok = load_model(model_dir, dtype=torch.float32, attn_implementation=attn)  # fp32 master weights
    fp = fingerprint(model)  # the aligned model, before any training
    model.to(device)
    pairs = user_pairs or _pairs(cfg, model_dir, fp, device)
    key = run_key(fp, cfg, pairs)
    work = _work_dir(cfg, key)
    done = train_surrogate(model, tok, pairs, cfg, work=work, device=device)
    if done is None:
        log.info("stopped early; checkpoint in %s (rerun the same command to resume)", work)
        return None
    prov = provenance(cfg, pairs, done["result"], device=device, work=work, key=key, command=command,
                      seconds=time.time() - t0)
    return build_vector(fp, done, cfg, prov).save(cfg.out)


def provenance(cfg: DistillConfig, pairs: Pairs, result: dict, *, device: str, work: Path, key: str, command: str,
               seconds: float) -> dict:
    import transformers

    return {
        "method": "enchtable-distill",
        "paper": "EnchTable (arXiv 2511.09880) stage 1, code AntCPLab/EnchTable; NTK linearization as tangent "
                 "task arithmetic (arXiv 2305.12827)",
        "mode": cfg.mode,
        "skip_layers": cfg.skip_layers,
        "trained": "q/k/v/o projection weights of every layer (biases frozen)" if cfg.mode == "attn" else
                   f"weight matrices of the {cfg.mode} blocks of layers [k, L-k), NTK-linearized around theta0",
        "objective": "cross-entropy on answer tokens only, prompts through the model's chat template",
        "hyperparameters": {**cfg.train.to_dict(), "optimizer": "AdamW", "schedule": "linear warmup + cosine",
                            "max_examples": cfg.max_examples, "device": device,
                            "precision": "fp32 weights, bf16 autocast" if device.startswith("cuda") else "fp32"},
        "data": pairs.provenance,
        "steps": result["steps"],
        "examples": result["examples"],
        "final_train_loss": result["final_train_loss"],
        "train_losses": result["losses"],
        "run_key": key,
        "work_dir": str(work),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }

