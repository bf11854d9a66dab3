"""The merge driver: open and check the inputs, an optional first pass for global norms, then one
pass tensor by tensor in ft's shard layout, written into a temporary directory beside ``--out`` that is
renamed into place only when everything (weights, configs, tokenizer, merge card) is written."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from steer.merge import methods
from steer.merge.checkpoint import (
    CONFIG_FILES,
    INDEX_FILE,
    TOKENIZER_FILES,
    Checkpoint,
    MergeError,
    ShardWriter,
)
from steer.merge.methods import Globals, Method, TensorInputs
from steer.merge.sources import Sources


@dataclass(frozen=True)
class MergeRequest:
    """What ``steer merge`` was asked to do. ``params`` holds only the parameters the user gave."""

    method: str
    out: str
    ft: str
    base: str | None = None
    aligned: str | None = None
    surrogate: str | None = None
    vector: str | None = None
    mask: str | None = None
    params: dict = field(default_factory=dict)
    force: bool = False
    command: str | None = None


def run_merge(req: MergeRequest) -> Path:
    """Merge; returns the output directory. Raises MergeError (one line) for anything the user can fix."""
    method = methods.get(req.method)
    params = method.resolve(req.params)
    out = Path(req.out)
    src = Sources.open(req, method, params)
    _check_out(out, src, force=req.force)
    started = time.time()
    g = first_pass(src, method, params)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    _remove_stale(out)
    try:
        tmp.mkdir(parents=True)
        records, copied = _write_weights(src, method, params, g, tmp)
        _copy_side_files(src.ft, tmp)
        card = _card(req, method, params, src, g, records, copied, started)
        (tmp / "merge_card.json").write_text(json.dumps(card, indent=2) + "\n")
        _replace(tmp, out, force=req.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path, src: Sources, *, force: bool) -> None:
    if out.exists() and not force:
        raise MergeError(f"--out {out} already exists (pass --force to replace it)")
    for ck in src.checkpoints():
        if out.resolve() == ck.path.resolve():
            raise MergeError(f"--out {out} is the --{ck.role} input directory")
    if not out.parent.is_dir():
        raise MergeError(f"--out {out}: parent directory {out.parent} does not exist")


def _remove_stale(out: Path) -> None:
    """Partial outputs of merges that were killed (SIGKILL, power loss) before they could clean up."""
    for d in out.parent.glob(f".{out.name}.partial-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence probe only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(tmp: Path, out: Path, *, force: bool) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists() or out.is_symlink():
        if not force:
            raise MergeError(f"--out {out} appeared while merging (pass --force to replace it)")
        os.replace(out, old)
    os.replace(tmp, out)  # atomic: readers see no directory or the complete one
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def first_pass(src: Sources, method: Method, params: dict) -> Globals:
    """Global norms over every key where tau and sigma both exist (EnchTable's alpha, RESTA --ada)."""
    g = Globals()
    if not method.global_norms(params):
        g.sigma_factor = float(params.get("scale", 1.0))
        return g
    tt = ss = 0.0
    for key in tqdm(src.ft.keys(), desc="norms", unit="tensor", disable=None):
        x, _ = src.inputs(key)
        if isinstance(x, TensorInputs) and x.base is not None and x.sigma is not None:
            tt += float(x.tau.double().square().sum())
            ss += float(x.sigma.double().square().sum())
    g.norm_tau, g.norm_sigma = math.sqrt(tt), math.sqrt(ss)
    # alpha = beta ||tau|| / ||sigma||; a zero sigma adds nothing whatever alpha is, so alpha = 0 there.
    g.sigma_factor = params["beta"] * g.norm_tau / g.norm_sigma if g.norm_sigma > 0 else 0.0
    return g


def _write_weights(src: Sources, method: Method, params: dict, g: Globals, tmp: Path):
    records: dict[str, dict] = {}
    copied: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(src.ft.keys()), desc=f"merge {method.name}", unit="tensor", disable=None)
    try:
        for shard in src.ft.shards:
            keys = [k for k in src.ft.keys() if src.ft.index[k] == shard]
            writer = ShardWriter(tmp / shard.name, [(k, *src.ft.meta(k)) for k in keys])
            try:
                for key in keys:
                    writer.write(key, merge_tensor(src, method, params, g, key, records, copied))
                    weight_map[key] = shard.name
                    bar.update()
            except BaseException:
                writer.abort()
                raise
            writer.close()
            total += writer.total_bytes
    finally:
        bar.close()
    if (src.ft.path / INDEX_FILE).is_file() or len(src.ft.shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return records, copied


def chunk_elements() -> int:
    """Tensors larger than this many elements are merged a block of rows at a time by the row-wise
    methods (a vocab-sized matrix is never held in float32 whole, nor several times over)."""
    return int(os.environ.get("STEER_MERGE_CHUNK_ELEMENTS", 1 << 24))


def merge_tensor(src: Sources, method: Method, params: dict, g: Globals, key: str,
                 records: dict, copied: dict) -> torch.Tensor | Iterator[torch.Tensor]:
    """One output tensor in ft's dtype, or (row-wise methods on large tensors) its blocks of rows in
    order. Keys the method cannot merge are ft's tensor, unchanged."""
    shape, _ = src.ft.meta(key)
    if method.rowwise and len(shape) >= 2 and math.prod(shape) > chunk_elements():
        blocks = _row_blocks(shape)
        x, ft_raw = src.inputs(key, blocks[0])
        if isinstance(x, str):
            copied[key] = x
            return (src.ft.get(key, rows=b) for b in blocks)
        return _merge_blocks(src, method, params, g, key, blocks, (x, ft_raw))
    x, ft_raw = src.inputs(key)
    if isinstance(x, str):
        copied[key] = x
        return ft_raw
    merged, record = method.step(x, params, g)
    if record is not None:
        records[key] = record
    return ft_raw if merged is None else merged.to(ft_raw.dtype)


def _row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    step = max(1, chunk_elements() // math.prod(shape[1:]))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def _merge_blocks(src: Sources, method: Method, params: dict, g: Globals, key: str,
                  blocks: list[tuple[int, int]], first: tuple) -> Iterator[torch.Tensor]:
    """Merged blocks of rows; ``first`` is block 0's inputs, already read (not read again)."""
    coef = None
    if method.prepass is not None:
        coef = method.prepass((first[0], *(src.inputs(key, b)[0] for b in blocks[1:])), params)
    for i, b in enumerate(blocks):
        x, ft_raw = first if i == 0 else src.inputs(key, b)
        first = None  # block 0's inputs are freed once merged
        if isinstance(x, str):  # the first block was mergeable, so every block is (same inputs, same keys)
            raise MergeError(f"{key}: rows {b[0]}:{b[1]} cannot be merged ({x})")
        x.coef = coef
        merged, _ = method.step(x, params, g)
        yield ft_raw if merged is None else merged.to(ft_raw.dtype)


def _copy_side_files(ft: Checkpoint, tmp: Path) -> None:
    for name in (*CONFIG_FILES, *TOKENIZER_FILES):
        if (ft.path / name).is_file():
            shutil.copy2(ft.path / name, tmp / name)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steer-server")
    except PackageNotFoundError:
        return "unknown"


def _card(req: MergeRequest, method: Method, params: dict, src: Sources, g: Globals, records: dict,
          copied: dict, started: float) -> dict:
    return {
        "method": method.name,
        "requested_method": req.method,
        "description": method.doc,
        "parameters": params,
        "inputs": src.provenance(),
        "global": {"norm_tau": g.norm_tau, "norm_sigma": g.norm_sigma, "sigma_factor": g.sigma_factor},
        "tensors": records,
        "copied_from_ft": copied,
        "steer_version": _version(),
        "command": req.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": round(time.time() - started, 3),
    }
