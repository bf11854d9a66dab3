"""Loading models and the facts about them that vectors and hooks depend on.

Architecture facts (module paths) are data in ``_data/architectures.json``; an architecture missing
from that table is refused with a message naming the supported ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from torch import nn


class ModelError(RuntimeError):
    """The model cannot be loaded or is not supported."""


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: str
    embed: str
    final_norm: str
    lm_head: str
    residual_writers: tuple[str, ...]
    linears: tuple[str, ...]


@cache
def _table() -> dict[str, dict]:
    text = resources.files("steer").joinpath("_data/architectures.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_table()))


def architecture(model_type: str) -> Architecture:
    table = _table()
    if model_type not in table:
        raise ModelError(
            f"model architecture {model_type!r} is not supported; supported: "
            f"{', '.join(supported_architectures())} (add an entry to steer/_data/architectures.json)"
        )
    row = table[model_type]
    return Architecture(
        model_type=model_type,
        layers=row["layers"],
        embed=row["embed"],
        final_norm=row["final_norm"],
        lm_head=row["lm_head"],
        residual_writers=tuple(row["residual_writers"]),
        linears=tuple(row["linears"]),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    arch = architecture(model.config.model_type)
    return model.get_submodule(arch.layers)


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the weights a vector was made for. Equal fingerprints = same model."""

    architecture: str
    hidden_size: int
    num_layers: int
    weights_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFingerprint:
        return cls(**{k: d[k] for k in ("architecture", "hidden_size", "num_layers", "weights_sha256")})


_SAMPLE = 4096  # elements hashed from each end of every tensor


def fingerprint(model: nn.Module) -> ModelFingerprint:
    """Hash names, shapes and a strided sample of every parameter, cast to bf16.

    Sampling keeps this under a second for 0.5B parameters while any fine-tune or merge (which moves
    essentially every weight) still changes the hash. bf16 makes it independent of the load dtype
    for checkpoints stored in bf16.
    """
    from steer.packed import is_packed

    if is_packed(model):  # its linear weights live only in oneDNN's layout: nothing true to hash
        raise ModelError("cannot fingerprint a model whose linear weights are packed; fingerprint it before packing")
    return _fingerprint(model.config, sorted(model.state_dict().items()))


def fingerprint_checkpoint(path: str | Path) -> ModelFingerprint:
    """:func:`fingerprint` of the model a checkpoint directory loads as, read from its safetensors files
    without building the model (a backend that loads the weights itself, e.g. vLLM, checks vectors
    against this). A tied LM head the file leaves out is the embedding, as in the loaded model's
    ``state_dict``."""
    from safetensors import safe_open

    cfg = load_config(path)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} has no .safetensors weights")
    handles = [safe_open(f, framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    arch = architecture(cfg.model_type)
    head, embed = f"{arch.lm_head}.weight", f"{arch.embed}.weight"
    if head not in where and getattr(cfg, "tie_word_embeddings", False) and embed in where:
        where[head] = where[embed]
        names = {head: embed}
    else:
        names = {}
    return _fingerprint(cfg, ((k, where[k].get_tensor(names.get(k, k))) for k in sorted(where)))


def _fingerprint(cfg, items) -> ModelFingerprint:
    h = hashlib.sha256()
    for name, p in items:
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLE)
        sample = torch.cat([flat[:_SAMPLE], flat[::stride][:_SAMPLE], flat[-_SAMPLE:]])
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return ModelFingerprint(
        architecture=cfg.model_type,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        weights_sha256=h.hexdigest(),
    )


def load_config(path: str | Path):
    """The config of a local HF checkpoint directory of a supported architecture (else ModelError)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    cfg = AutoConfig.from_pretrained(path)
    architecture(cfg.model_type)  # refuse unsupported architectures before loading weights
    return cfg


def load_model(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None):
    """Load a local HF checkpoint directory (qwen2 or llama) and its tokenizer, in eval mode, with
    ``steer.attention`` (SDPA prefill, fast single-token decode) unless another implementation is named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer.attention import ATTENTION

    load_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation or ATTENTION)
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
