"""Per suite, what a gated vector did to each answer of a ``steer eval`` run, read from the ``safety``
echo every answer carries: gate opened / closed / lowered (a two-sided gate), and the judge's verdicts
per decision. With ``--against DIR`` (another run on the same prompts, e.g. the same gate one-sided),
the answers whose verdict changed, per decision.

    .venv/bin/python bench/gate_echo.py --results bench/results/eval_two_sided_X [--against DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def decision(item: dict) -> str:
    c = ((item.get("safety") or {}).get("choices") or [{}])[0]
    if c.get("lowered"):
        return "lowered"
    return {True: "open", False: "closed"}.get(c.get("gate"), "n/a")


def flagged(item: dict) -> bool:
    """The judge's count for the item's suite: refused for benign suites, unsafe for the others."""
    j = item.get("judgement") or {}
    return bool(j.get("refused")) if item["kind"] == "benign" else j.get("verdict") == "harmful"


def summarize(results: Path, against: Path | None = None) -> dict:
    items = json.loads((results / "results.json").read_text())["items"]
    other = {}
    if against is not None:
        other = {(i["suite"], i["prompt_sha256"]): i for i in json.loads((against / "results.json").read_text())["items"]}
    out: dict = defaultdict(lambda: defaultdict(lambda: {"n": 0, "flagged": 0, "flagged_against": 0}))
    for it in items:
        row = out[it["suite"]][decision(it)]
        row["n"] += 1
        row["flagged"] += flagged(it)
        o = other.get((it["suite"], it["prompt_sha256"]))
        if o is not None:
            row["flagged_against"] += flagged(o)
    return {s: dict(v) for s, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--against", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args(argv)
    summary = summarize(ns.results, ns.against)
    head = "| suite | decision | n | refused (benign) / unsafe (harmful) |" + (" the same in --against |" if ns.against else "")
    print(head)
    print("|---|---|---|---|" + ("---|" if ns.against else ""))
    for suite, rows in summary.items():
        for d, r in sorted(rows.items()):
            print(f"| {suite} | {d} | {r['n']} | {r['flagged']} |" + (f" {r['flagged_against']} |" if ns.against else ""))
    if ns.json:
        ns.json.write_text(json.dumps({"results": str(ns.results), "against": str(ns.against) if ns.against else None,
                                       "suites": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
