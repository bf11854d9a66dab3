"""Per-request strength on the vLLM backend changes refusals as on the embedded backend.

Starts ``steer serve`` (demo model, shipped gated refusal vector) with ``--backend vllm`` and with the
embedded backend in turn, and runs the same ``steer eval`` against each: held-out HarmBench and
Do-Not-Answer (harmful) and aplomb (benign), the first ``--limit`` of each, at strengths ``--strengths``,
greedy, ``--max-tokens``, refusal-phrase judge. Records each backend's rates per suite and strength, the
difference in points, and how many answers are identical text (bf16 on two engines' kernels: near-ties
part ways, so identical is not expected everywhere; the refusal rates are what must agree).
Writes bench/results/backend_parity.json (and each eval's directory beside it). ``--vector enchtable``
runs the same with the shipped weight vector per request (LoRA adapters on vLLM, per-row low-rank
steering on the embedded backend) and writes backend_parity_enchtable.json.

    .venv/bin/python bench/backend_parity.py [--limit 40] [--strengths 0,1] [--vector NAME]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
BACKENDS = ("vllm", "transformers")


def _serve(backend: str, port: int) -> subprocess.Popen:
    cmd = [str(BIN / "steer"), "serve", "--backend", backend, "--port", str(port), "--max-batch-size", "16",
           "--max-model-len", "1024"]
    log = open(Path(tempfile.gettempdir()) / f"steer-bench-parity-{backend}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return wait_healthy(proc, port, timeout=600, what=f"steer serve --backend {backend}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--strengths", default="0,1")
    ap.add_argument("--suites", default="harmbench,donotanswer,aplomb")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8520)
    ap.add_argument("--vector", default=None, help="the vector to send (default: the server's default vector)")
    ns = ap.parse_args(argv)
    suffix = f"_{ns.vector}" if ns.vector else ""
    runs = {}
    for i, backend in enumerate(BACKENDS):
        out = ROOT / "bench" / "results" / f"backend_parity_{backend}{suffix}"
        proc = _serve(backend, ns.port + i)
        try:
            subprocess.run([str(BIN / "steer"), "eval", "--base-url", f"http://127.0.0.1:{ns.port + i}/v1",
                            "--suites", *ns.suites.split(","), "--strengths", ns.strengths, "--limit", str(ns.limit),
                            "--max-tokens", str(ns.max_tokens), "--concurrency", "8", "--out", str(out),
                            *(["--vector", ns.vector] if ns.vector else [])], check=True)
        finally:
            proc.terminate()
            proc.wait(60)
        runs[backend] = json.loads((out / "results.json").read_text())
    rows = []
    for a in runs["vllm"]["summary"]:
        b = next(x for x in runs["transformers"]["summary"]
                 if (x["suite"], x["strength"], x["method"]) == (a["suite"], a["strength"], a["method"]))
        rows.append({"suite": a["suite"], "strength": a["strength"], "metric": a["metric"], "n": a["n"],
                     "vllm": a["rate"], "embedded": b["rate"], "diff_points": round(100 * (a["rate"] - b["rate"]), 1)})
    answers = {(it["suite"], it["strength"], it["index"]): it["answer"] for it in runs["transformers"]["items"]}
    same = sum(answers.get((it["suite"], it["strength"], it["index"])) == it["answer"] for it in runs["vllm"]["items"])
    result = {"command": "python bench/backend_parity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows, "identical_answers": same, "answers": len(runs["vllm"]["items"]),
              "max_abs_diff_points": max(abs(r["diff_points"]) for r in rows)}
    (ROOT / "bench" / "results" / f"backend_parity{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| suite | strength | metric | n | --backend vllm | embedded | difference (points) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['suite']} | {r['strength']:g} | {r['metric']} | {r['n']} | {r['vllm']:.1%} | {r['embedded']:.1%} | "
              f"{r['diff_points']:+.1f} |")
    print(f"identical answers: {same} of {result['answers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
