"""Calibrate one merge parameter (EnchTable's beta by default) per fine-tune, on a dev split.

The EnchTable paper tunes beta per fine-tune (its repo sweeps 0.04-0.20 on Code-Llama-3-8B); the
default 0.1 was tuned for Llama-3-8B deltas. Here, for each value on ``--grid``: ``steer merge`` the
unsafe fine-tune ``--ft`` with the shipped weight vector, load the merged checkpoint the way
``steer serve`` does, and answer, greedy, ``--tokens`` tokens, refusal-phrase judge:

* dev harmful: ``gate_donotanswer[100:100+N]`` of ``steer.calibrate.splits()``: no evaluation reads it,
  the distilled vector was trained on its first 48, the harmful SFT on other splits;
* dev benign: ``dev_hard_negatives`` (20 XSTest-style prompts) and ``dev_code`` (40 HumanEval
  instructions outside every evaluated problem): over-refusal only.

The rule: the smallest value whose dev-harmful refusal reaches the aligned base model's on the same
prompts (the target "back to the original model's level"). The held-out numbers of the chosen value
come from ``bench/merge_eval.py --methods enchtable:beta=X`` (this script never reads a held-out
prompt). Rows are written to ``--out`` as they finish; a rerun skips values already there.

    .venv/bin/python bench/merge_calibrate.py [--ft DIR --tag NAME] [--grid 0.1,0.2,0.3,0.5,0.75,1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from steer import serving
from steer.calibrate import generate_texts, splits
from steer.demo import cache_dir, ensure_demo_model
from steer.judge import is_refusal

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def dev_sets(n_harmful: int) -> dict[str, list[str]]:
    sp = splits()
    return {"harmful": list(sp["gate_donotanswer"].prompts[100:100 + n_harmful]),
            "hard_negatives": list(sp["dev_hard_negatives"].prompts),
            "code": list(sp["dev_code"].prompts)}


def refusals(model_dir: Path, sets: dict[str, list[str]], tokens: int) -> dict:
    served = serving.build(model_dir)
    out = {}
    for name, prompts in sets.items():
        texts, _ = generate_texts(served.model, served.tokenizer, None, prompts, strength=0.0, max_tokens=tokens,
                                  desc=f"{model_dir.name}: {name}")
        k = sum(is_refusal(t) for t in texts)
        out[name] = {"refused": k, "n": len(texts), "rate": round(k / len(texts), 4)}
    del served
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ft", default=None, help="unsafe fine-tune (default: the refusal-ablated demo model)")
    ap.add_argument("--tag", default="ablated")
    ap.add_argument("--base", default=None, help="the aligned model ft came from (default: the demo model)")
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "enchtable.json"))
    ap.add_argument("--method", default="enchtable")
    ap.add_argument("--param", default="beta")
    ap.add_argument("--grid", default="0.1,0.2,0.3,0.5,0.75,1")
    ap.add_argument("--harmful", type=int, default=40, help="dev harmful prompts")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", default=None, help="default: bench/results/merge_calibrate_TAG.json")
    ns = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    base = Path(ns.base or ensure_demo_model())
    ft = Path(ns.ft or cache_dir() / "models" / f"{ensure_demo_model().name}-ablated")
    out_path = Path(ns.out or ROOT / "bench" / "results" / f"merge_calibrate_{ns.tag}.json")
    sets = dev_sets(ns.harmful)
    result = {"command": "python bench/merge_calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "tag": ns.tag, "ft": str(ft), "base": str(base), "vector": ns.vector, "method": ns.method,
              "param": ns.param, "tokens": ns.tokens, "sets": {k: len(v) for k, v in sets.items()}, "rows": []}
    if out_path.exists():
        old = json.loads(out_path.read_text())
        if (old["method"], old["param"], old["sets"], old["tokens"]) == (ns.method, ns.param, result["sets"],
                                                                         ns.tokens):
            result["rows"] = old["rows"]
    done = {r["row"] for r in result["rows"]}

    def record(row: dict) -> None:
        result["rows"].append(row)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(row), flush=True)

    for label, path in (("base (aligned)", base), ("ft (unmerged)", ft)):
        if label not in done:
            record({"row": label, **refusals(path, sets, ns.tokens)})
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        merged = Path(tmp) / "merged"
        for value in [float(x) for x in ns.grid.split(",") if x.strip()]:
            label = f"{ns.method} {ns.param}={value:g}"
            if label in done:
                continue
            shutil.rmtree(merged, ignore_errors=True)
            t0 = time.time()
            subprocess.run([str(BIN / "steer"), "merge", "--method", ns.method, "--ft", str(ft), "--base", str(base),
                            "--vector", ns.vector, f"--{ns.param.replace('_', '-')}", str(value), "--out", str(merged)],
                           check=True, capture_output=True)
            card = json.loads((merged / "merge_card.json").read_text())
            ws = sorted(t["w"] for t in card["tensors"].values() if "w" in t)
            record({"row": label, "value": value, "merge_seconds": round(time.time() - t0, 1),
                    "params": card["parameters"], "global": card["global"],
                    "w_median": ws[len(ws) // 2] if ws else None, **refusals(merged, sets, ns.tokens)})
    rows = {r["row"]: r for r in result["rows"]}
    target = rows["base (aligned)"]["harmful"]["rate"]
    grid = sorted((r for r in result["rows"] if "value" in r), key=lambda r: r["value"])
    chosen = next((r for r in grid if r["harmful"]["rate"] >= target), None)
    result["target_harmful_refusal"] = target
    result["chosen"] = chosen["value"] if chosen else None
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print("| row | dev harmful refusal | hard-negative refusal | code refusal |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['row']} | {r['harmful']['rate']:.1%} | {r['hard_negatives']['rate']:.1%} | "
              f"{r['code']['rate']:.1%} |")
    print(f"chosen {ns.param}: {result['chosen']} (the smallest reaching the base's {target:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
