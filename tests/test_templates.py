"""The jailbreak-template family split (steer.templates): held-out families never meet fitting ones, the
fitting families split again by family into gate and dev, and the split is the same in every process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from steer.templates import CLUSTER_OVERLAP, KINDS, kept_templates, overlap, shingles, template_split

PARTS = ("test", "gate", "dev")


def _digest(split: dict) -> str:
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()


def test_split_partitions_the_kept_templates_by_family():
    ts = template_split(0)
    T, fam = ts["templates"], ts["family"]
    for kind in KINDS:
        kept = kept_templates(kind)
        assert sorted(T[f"{kind}_test"] + T[f"{kind}_fit"]) == sorted(kept)
        assert sorted(T[f"{kind}_gate"] + T[f"{kind}_dev"]) == sorted(T[f"{kind}_fit"])
        # gate and dev keep the fitting list's (seeded) order
        assert T[f"{kind}_gate"] == [t for t in T[f"{kind}_fit"] if t in set(T[f"{kind}_gate"])]
    fams = {p: {fam[hashlib.sha256(t.encode()).hexdigest()] for k in KINDS for t in T[f"{k}_{p}"]} for p in PARTS}
    assert not fams["test"] & fams["gate"] and not fams["test"] & fams["dev"] and not fams["gate"] & fams["dev"]
    assert {p: sorted(v) for p, v in fams.items()} == ts["dev_record"]["families"]
    # every part of both kinds is populated (the dev DAN part is a single template: recorded, not assumed)
    assert all(T[f"{k}_{p}"] for k in KINDS for p in PARTS)
    # the held-out DAN templates are one family, the largest among those holding DAN templates
    dan_fams = [fam[hashlib.sha256(t.encode()).hexdigest()] for t in kept_templates("dan")]
    held = {fam[hashlib.sha256(t.encode()).hexdigest()] for t in T["dan_test"]}
    assert len(held) == 1 and dan_fams.count(held.pop()) == max(map(dan_fams.count, dan_fams))
    rec = ts["record"]
    for k in ("dan_test", "dan_fit", "itw_test", "itw_fit"):
        assert rec[k]["count"] == len(T[k])
        assert rec[k]["template_sha256"] == [hashlib.sha256(t.encode()).hexdigest() for t in T[k]]


def test_no_held_out_template_reaches_the_overlap_of_a_fitting_one():
    """The family rule itself, checked pair by pair: no held-out template shares CLUSTER_OVERLAP of the
    word 5-grams with a gate or dev template, nor a dev template with a gate one."""
    T = template_split(0)["templates"]
    sh = {p: [shingles(t) for k in KINDS for t in T[f"{k}_{p}"]] for p in PARTS}
    for a, b in (("test", "gate"), ("test", "dev"), ("dev", "gate")):
        worst = max(overlap(x, y) for x in sh[a] for y in sh[b])
        assert worst < CLUSTER_OVERLAP, (a, b, worst)
    # the check can fail: templates of one family do reach it
    held = sh["test"]
    assert any(overlap(held[i], held[j]) >= CLUSTER_OVERLAP for i in range(len(held)) for j in range(i))


def test_split_is_deterministic_and_pinned():
    a, b = template_split(0), template_split(0)
    assert a == b
    a["templates"]["dan_test"].clear()  # each call is a copy: the cached split cannot be changed
    assert template_split(0) == b
    # the held-out split bench/gate_generalization.py measured (issue 11): pinned to its record
    rec = hashlib.sha256(json.dumps(b["record"]).encode()).hexdigest()
    assert rec.startswith("0f8f2df3a9164c5f"), rec
    # the same in another process with another string hash seed
    code = ("import hashlib, json; from steer.templates import template_split; "
            "print(hashlib.sha256(json.dumps(template_split(0), sort_keys=True).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == _digest(b)
    # another seed: another in-the-wild split, the same held-out DAN family
    other = template_split(1)
    assert other["templates"]["itw_test"] != b["templates"]["itw_test"]
    assert sorted(other["templates"]["dan_test"]) == sorted(b["templates"]["dan_test"])
