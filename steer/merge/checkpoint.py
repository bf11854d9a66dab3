"""Checkpoint directories, read and written one tensor at a time.

Reading: a key -> shard index over ``*.safetensors``; each tensor is read with ``pread`` into its own
buffer when asked for. (``safe_open`` memory-maps the file, and every mapped page it touches stays in
the process's resident set until the file is closed: merging four 150 MB inputs that way peaked at
+470 MB. Reading through the page cache keeps only the tensors in flight resident.) Writing: the output has ft's keys, shapes and dtypes, so every header is
known before the first tensor is merged; each shard's header is written first and then each tensor's
bytes as soon as it is merged. Peak memory is a few tensors, never a shard or a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
INDEX_FILE = "model.safetensors.index.json"
# The architecture facts two inputs must share for their tensors to mean the same thing.
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class MergeError(RuntimeError):
    """A merge cannot run as asked (missing or mismatched inputs, bad parameters): one line for the user."""


class Checkpoint:
    """An HF checkpoint directory (``config.json`` + safetensors shards), opened lazily."""

    def __init__(self, path: str | Path, role: str):
        self.path, self.role = Path(path), role
        if not self.path.is_dir():
            raise MergeError(f"--{role} {self.path}: not a directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MergeError(f"--{role} {self.path}: no config.json (not a Hugging Face checkpoint directory)")
        try:
            self.config = json.loads(cfg.read_text())
        except ValueError as e:
            raise MergeError(f"--{role} {cfg}: not valid JSON ({e})") from None
        self.shards = sorted(self.path.glob("*.safetensors"))
        if not self.shards:
            raise MergeError(f"--{role} {self.path}: no *.safetensors weight files")
        self._shards = {shard: SafetensorsFile(shard, f"--{role} {shard}") for shard in self.shards}
        self.index: dict[str, Path] = {}  # key -> shard, in each shard's own data order
        for shard, f in self._shards.items():
            for key in f.keys():
                self.index[key] = shard

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def keys(self) -> list[str]:
        return list(self.index)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the header, without reading the data."""
        return self._shards[self.index[key]].meta(key)

    def get(self, key: str, shape: tuple[int, ...] | None = None,
            rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The tensor (or its rows ``[r0, r1)``), or None if absent or (with ``shape``) shaped differently
        (METHODS section 0)."""
        if key not in self.index:
            return None
        return self._shards[self.index[key]].get(key, shape, rows)

    def arch(self) -> dict:
        return {k: self.config.get(k) for k in ARCH_KEYS}

    def fingerprint_files(self) -> dict:
        """sha256 of config.json and every weight file (provenance for the merge card)."""
        files = [self.path / "config.json", *self.shards]
        return {"path": str(self.path.resolve()), "sha256": {f.name: sha256_file(f) for f in files}}


class SafetensorsFile:
    """One safetensors file: header parsed once, tensors read on demand with ``os.pread``."""

    def __init__(self, path: str | Path, label: str):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            size = self.path.stat().st_size
        except (OSError, ValueError, struct.error) as e:
            raise MergeError(f"{label}: not a valid safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise MergeError(f"{label}: not a valid safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        for key, e in header.items():
            try:
                begin, end = e["data_offsets"]
                entry = (tuple(e["shape"]), _DTYPES[e["dtype"]], begin, end)
            except (KeyError, TypeError, ValueError) as err:
                raise MergeError(f"{label}: malformed header entry {key!r} ({err!r})") from None
            if end - begin != _numel(entry[0]) * _itemsize(entry[1]) or self._start + end > size:
                raise MergeError(f"{label}: header entry {key!r} does not match the file")
            self._entries[key] = entry
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def keys(self) -> list[str]:
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._entries[key][:2]

    def get(self, key: str, shape: tuple[int, ...] | None = None,
            rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        if key not in self._entries:
            return None
        tshape, dtype, begin, end = self._entries[key]
        if shape is not None and tshape != tuple(shape):
            return None
        if rows is not None:  # a block of rows of a row-major tensor is one contiguous byte range
            row_bytes = _numel(tshape[1:]) * _itemsize(dtype)
            tshape = (rows[1] - rows[0], *tshape[1:])
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        if end == begin:
            return torch.empty(tshape, dtype=dtype)
        buf = bytearray(end - begin)
        view, got = memoryview(buf), 0
        while got < len(buf):  # pread may return short reads
            chunk = os.preadv(self._fd, [view[got:]], self._start + begin + got)
            if chunk <= 0:
                raise MergeError(f"{self.path}: unexpected end of file reading {key!r}")
            got += chunk
        return torch.frombuffer(buf, dtype=dtype).reshape(tshape)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_same_architecture(ref: Checkpoint, others: list[Checkpoint]) -> None:
    for other in others:
        diff = [f"{k}: {ref.arch()[k]} != {other.arch()[k]}" for k in ARCH_KEYS if ref.arch()[k] != other.arch()[k]]
        if diff:
            raise MergeError(f"--{other.role} {other.path} is a different architecture from --{ref.role} "
                             f"({'; '.join(diff)})")


class ShardWriter:
    """Writes one safetensors file whose header (names, shapes, dtypes) is fixed up front; tensors are
    appended in header order as they are produced."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {}, 0
        for name, shape, dtype in specs:
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._order = [s[0] for s in specs]
        self._expect = {name: (tuple(shape), dtype) for name, shape, dtype in specs}
        self._next = 0
        self.total_bytes = offset
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Write ``name``: a tensor, or its blocks of rows in order (streamed, never joined)."""
        if self._order[self._next] != name:
            raise RuntimeError(f"shard writer: expected {self._order[self._next]!r}, got {name!r}")
        shape, dtype = self._expect[name]
        parts = [tensor] if isinstance(tensor, torch.Tensor) else tensor
        rows = 0
        for part in parts:
            if tuple(part.shape[1:]) != shape[1:] or part.dtype != dtype:  # the row count is checked below
                raise RuntimeError(f"shard writer: {name} is {tuple(part.shape)} {part.dtype}, "
                                   f"header says {shape} {dtype}")
            t = part.detach().contiguous().cpu()
            if t.numel():  # the tensor's own bytes (a memoryview of it, no copy)
                self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            rows += t.shape[0] if t.dim() else 1
        if rows != (shape[0] if shape else 1):
            raise RuntimeError(f"shard writer: {name} got {rows} rows, header says {shape}")
        self._next += 1

    def abort(self) -> None:
        self._f.close()

    def close(self) -> None:
        done = self._next == len(self._order)
        self._f.close()
        if not done:
            raise RuntimeError("shard writer closed before every tensor was written")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
