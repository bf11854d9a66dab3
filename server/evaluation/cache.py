"""Resumable answer cache: one JSON line per answer, appended and flushed as soon as it arrives.

Keys are sha256 over everything that determines an answer (endpoint, model, method, the prompt and
the messages sent, sampling settings, strength, vector), so a rerun of the same command reuses every
answer already received, and an interrupted run (Ctrl-C, crash) loses nothing it had been answered.
A torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any


def cache_key(**fields: Any) -> str:
    """sha256 of the canonical JSON of ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AnswerCache:
    """``get(key)`` / ``put(key, record)`` over an append-only JSONL file; thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        for line in text.splitlines():
            try:
                row = json.loads(line)
                self._data[row["key"]] = row["value"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from an interrupted write
        self._file = self.path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._file.write("\n")  # end the torn line, so the next record starts on its own
        self.hits = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self.hits += 1
            return value

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._data[key] = value
            self._file.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
