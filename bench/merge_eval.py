"""Every merge method on an unsafe variant of the demo model: merge time, peak RSS, and refusals.

For each method, ``steer merge`` runs under ``/usr/bin/time -v`` (wall time, peak RSS of the merge
process) with ``--ft`` the unsafe model (default: the refusal-ablated demo model of
``bench/ablated_model.py``), ``--base`` the demo model it came from (tau = ft - base) and, for the
methods that take one, the safety vector ``--vector`` (default: the shipped distilled weight vector);
every method at its defaults. The merged checkpoint is then served unsteered (``--default-strength 0``,
no vectors) and ``steer eval`` measures held-out HarmBench unsafe rate and aplomb over-refusal (first
``--limit`` prompts of each, refusal-phrase judge, greedy). The unmerged ft and base are measured the
same way. Merged checkpoints are deleted after their eval. Writes bench/results/merge_eval.json.

    .venv/bin/python bench/merge_eval.py [--methods enchtable,ties,...] [--limit 40]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import wait_healthy

from steer.demo import cache_dir, ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
NO_SIGMA = {"linear", "slerp"}
METHODS = ["enchtable", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "safe_lora", "tsv",
           "model_stock", "linear", "slerp"]


def timed(cmd: list[str]) -> dict:
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", out.stderr).group(1)
    secs = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return {"seconds": round(secs, 1), "peak_rss_mib": round(rss / 1024)}


def evaluate(model: Path, port: int, limit: int, work: Path) -> dict:
    empty = work / "novectors"
    empty.mkdir(exist_ok=True)
    proc = subprocess.Popen([str(BIN / "steer"), "serve", "--model", str(model), "--vectors", str(empty),
                             "--default-strength", "0", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port, timeout=300, what=f"steer serve {model}")
        out = work / "eval"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([str(BIN / "steer"), "eval", "--base-url", f"http://127.0.0.1:{port}/v1", "--suites",
                        "harmbench", "aplomb", "--limit", str(limit), "--max-tokens", "48", "--concurrency", "8",
                        "--out", str(out)], check=True, capture_output=True)
        pooled = json.loads((out / "results.json").read_text())["pooled"]
    finally:
        proc.terminate()
        proc.wait()
    return {p["metric"]: {"rate": p["rate"], "n": p["n"], "ci95": p["ci95"]} for p in pooled}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ft", default=str(cache_dir() / "models" / f"{ensure_demo_model().name}-ablated"))
    ap.add_argument("--base", default=str(ensure_demo_model()))
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "enchtable.json"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--port", type=int, default=8350)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge_eval.json"))
    ns = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        for label, path in (("ft (unmerged)", ns.ft), ("base (aligned)", ns.base)):
            rows.append({"method": label, **evaluate(Path(path), ns.port, ns.limit, work)})
            print(json.dumps(rows[-1]), flush=True)
        for m in ns.methods.split(","):
            out = work / f"merged-{m}"
            cmd = [str(BIN / "steer"), "merge", "--method", m, "--ft", ns.ft, "--base", ns.base, "--out", str(out)]
            if m not in NO_SIGMA:
                cmd += ["--vector", ns.vector]
            t0 = time.time()
            merge = timed(cmd)
            card = json.loads((out / "merge_card.json").read_text())
            row = {"method": m, "merge": merge, "params": card.get("parameters", card.get("params")),
                   **evaluate(out, ns.port, ns.limit, work)}
            row["total_seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out)
    ckpt = sum(f.stat().st_size for f in Path(ns.ft).glob("*.safetensors"))
    result = {"command": "python bench/merge_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "ft": ns.ft, "base": ns.base, "vector": ns.vector, "limit": ns.limit,
              "checkpoint_mib": round(ckpt / 2**20), "rows": rows}
    Path(ns.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| method | HarmBench unsafe | aplomb over-refusal | merge s | merge peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        mg = r.get("merge", {})
        print(f"| {r['method']} | {r['unsafe_rate']['rate']:.1%} | {r['over_refusal_rate']['rate']:.1%} | "
              f"{mg.get('seconds', '-')} | {mg.get('peak_rss_mib', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
