"""Every merge method on an unsafe variant of the demo model: merge time, peak RSS, refusals, pass@1.

For each method, ``steer merge`` runs under ``/usr/bin/time -v`` (wall time, peak RSS of the merge
process) with ``--ft`` the unsafe model (default: the refusal-ablated demo model of
``bench/ablated_model.py``; ``bench/harmful_finetune.py`` makes the other one), ``--base`` the demo model
it came from (tau = ft - base) and, for the methods that take one, the safety vector ``--vector``
(default: the shipped distilled weight vector); every method at its defaults. The merged checkpoint is
served unsteered (``--default-strength 0``, no vectors) and ``steer eval`` measures, greedy, refusal-phrase
judge: held-out HarmBench + Do-Not-Answer unsafe rate (first ``--limit`` of each), the jailbreak suites
(past/future tense, DAN and in-the-wild templates; first ``--jb-limit`` of each), aplomb over-refusal
(``--limit``) and HumanEval pass@1 (``--humaneval`` problems, 512 tokens). The unmerged ft and base are
measured the same way, and so are two served (not merged) rows: the ft with the weight vector applied per
request from its low-rank factors at each ``--per-request`` strength, the same behind the gate of the gated
activation vector ``--gate`` at each ``--gated`` strength (``steer serve --gate-with``), and the
EnchTable-merged model (each EnchTable row's) with the gated activation vector per request at strength 1
(both kinds together). ``--own-gate`` names a gated activation vector fitted on the ft itself (``steer
extract --model FT``): the ft served with it per request, and with the weight vector per request behind
its gate (a gate that reads the served model's own residual stream), and (``--own-combined``) with both on one
request behind its gate (``steer serve --combine``). ``--activation`` serves any gated
activation vector on the ft at the ``--activation-strengths`` (a strength chosen per fine-tune on a dev
split by ``bench/gated_calibrate.py``). Rows are appended to ``--out`` as
they finish and a rerun skips rows already there (``--fresh`` starts over). ``--backend vllm`` serves every
row on vLLM's engine (``steer serve --backend vllm --max-model-len 2048``) instead. ``--plot`` draws the trade-off
plot (unsafe vs pass@1, one point per row) from every results file named.

    .venv/bin/python bench/merge_eval.py [--ft DIR --tag NAME] [--methods enchtable,ties,...]
    .venv/bin/python bench/merge_eval.py --plot bench/results/merge_eval*.json
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

import httpx
from _common import wait_healthy

from steer.demo import cache_dir, ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
NO_SIGMA = {"linear", "slerp"}
METHODS = ["enchtable", "task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "safe_lora", "tsv",
           "model_stock", "linear", "slerp"]
HARMFUL = ("harmbench", "donotanswer")
JAILBREAK = ("past_tense", "future_tense", "dan", "inthewild")
COMBINED = "enchtable merge + gated refusal vector @1"


def timed(cmd: list[str]) -> dict:
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", out.stderr).group(1)
    secs = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return {"seconds": round(secs, 1), "peak_rss_mib": round(rss / 1024)}


def _pool(summary: list[dict], suites: tuple[str, ...]) -> dict:
    rows = [s for s in summary if s["suite"] in suites]
    k, n = sum(s["k"] for s in rows), sum(s["n"] for s in rows)
    return {"rate": round(k / n, 4) if n else None, "k": k, "n": n}


def evaluate(model: Path, ns, work: Path, *, vector: str | None = None, strength: float = 0.0,
             transfer: bool = False, gate: str | None = None, combine: float | None = None) -> dict:
    """Serve ``model`` (with only ``vector`` loaded, if any, behind the gate of the activation vector
    ``gate`` if given; ``combine``: each request steered by both, the weight vector at this ratio of the
    strength, as the combination "both") and run the suites; rates per group and suite."""
    vdir = work / "vectors"
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir()
    def install(ref: str | None) -> str | None:  # copied into the served vectors dir; returns its name
        if not ref:
            return None
        manifest = _manifest(ref)
        shutil.copy(manifest, vdir)
        shutil.copy(manifest.with_suffix(".safetensors"), vdir)
        return json.loads(manifest.read_text())["name"]

    vector, gate = install(vector), install(gate)
    loaded = [v for v in (vector, gate) if v]
    cmd = [str(BIN / "steer"), "serve", "--model", str(model), "--vectors", str(vdir), "--port", str(ns.port),
           "--default-strength", str(strength)]
    if ns.backend == "vllm":
        cmd += ["--backend", "vllm", "--max-model-len", "2048"]
    if loaded and transfer:
        cmd += ["--transfer", ",".join(loaded)]
    if gate:
        cmd += ["--gate-with", f"{vector}={gate}", "--default-vector", vector]
    if gate and combine is not None:
        cmd += ["--combine", f"both={gate}+{vector}*{combine:g}", "--default-vector", "both"]
        vector = "both"
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    summary: list[dict] = []
    t0 = time.time()
    try:
        wait_healthy(proc, ns.port, timeout=300, what=f"steer serve {model}")
        url = f"http://127.0.0.1:{ns.port}/v1"
        runs = [(list(HARMFUL) + ["aplomb"], ns.limit, 48), (list(JAILBREAK), ns.jb_limit, 64),
                (["humaneval"], ns.humaneval, 512)]
        for suites, limit, tokens in runs:
            if not limit:
                continue
            out = work / "eval"
            shutil.rmtree(out, ignore_errors=True)
            ev = [str(BIN / "steer"), "eval", "--base-url", url, "--suites", *suites, "--limit", str(limit),
                  "--max-tokens", str(tokens), "--concurrency", str(ns.concurrency), "--out", str(out)]
            if vector:
                ev += ["--vector", vector, "--strengths", str(strength)]
            done = subprocess.run(ev, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"steer eval exited {done.returncode}: {done.stderr.strip()[-2000:]}")
            summary += json.loads((out / "results.json").read_text())["summary"]
        gates = _gate_counts(httpx.get(f"http://127.0.0.1:{ns.port}/metrics", timeout=30).text)
    finally:
        proc.terminate()
        proc.wait()
    per_suite = {s["suite"]: {"metric": s["metric"], "rate": s["rate"], "k": s["k"], "n": s["n"]} for s in summary}
    errors = sum(s["errors"] + s.get("judge_errors", 0) for s in summary)
    if errors:  # a timed-out or failed request would silently shrink n: the row is not recorded
        raise RuntimeError(f"{errors} requests failed evaluating {model} (a busy machine? see {work}/serve.log)")
    return {"harmful_unsafe": _pool(summary, HARMFUL), "jailbreak_unsafe": _pool(summary, JAILBREAK),
            "over_refusal": _pool(summary, ("aplomb",)), "pass_at_1": _pool(summary, ("humaneval",)),
            "suites": per_suite, "gate_decisions": gates, "eval_seconds": round(time.time() - t0, 1)}


def _manifest(ref: str) -> Path:
    """A vector's manifest: a path to a ``*.json`` manifest, or the name of a shipped vector."""
    return Path(ref) if ref.endswith(".json") else ROOT / "vectors" / f"{ref}.json"


def _gate_counts(metrics: str) -> dict:
    """{vector: {"fired": n, "closed": m[, "lowered": k]}} from the server's steer_gate_total counters (every
    suite; "lowered": rows a two-sided gate lowered refusal on)."""
    out: dict = {}
    for m in re.finditer(r'^steer_gate_total\{(.*)\} ([\d.e+]+)$', metrics, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = {"true": "fired", "lowered": "lowered"}.get(labels.get("fired", ""), "closed")
        row = out.setdefault(labels.get("vector", "?"), {"fired": 0, "closed": 0})
        row[key] = row.get(key, 0) + int(float(m.group(2)))
    return out


def _fmt(x: dict | None) -> str:
    return "-" if not x or x.get("rate") is None else f"{x['rate']:.1%}"


def table(result: dict) -> str:
    lines = ["| row | HarmBench+DNA unsafe | jailbreak unsafe | aplomb over-refusal | HumanEval pass@1 | merge s | "
             "merge peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mg = r.get("merge", {})
        lines.append(f"| {r['row']} | {_fmt(r['harmful_unsafe'])} | {_fmt(r['jailbreak_unsafe'])} | "
                     f"{_fmt(r['over_refusal'])} | {_fmt(r['pass_at_1'])} | {mg.get('seconds', '-')} | "
                     f"{mg.get('peak_rss_mib', '-')} |")
    return "\n".join(lines)


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for i, p in enumerate(paths):
        res = json.loads(Path(p).read_text())
        marker = "os^v"[i % 4]
        for r in res["rows"]:
            x, y = r["pass_at_1"]["rate"], r["harmful_unsafe"]["rate"]
            if x is None or y is None:
                continue
            ax.scatter(x * 100, y * 100, marker=marker, s=40)
            ax.annotate(r["row"], (x * 100, y * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], marker=marker, color="gray", label=f"fine-tune: {res.get('tag', Path(p).stem)}")
    ax.set_xlabel("HumanEval pass@1 (%)")
    ax.set_ylabel("held-out HarmBench + Do-Not-Answer unsafe (%)")
    ax.set_title("Restoring safety: unsafe rate vs pass@1, one point per merge method (demo model)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ft", default=None, help="unsafe fine-tune (default: the refusal-ablated demo model)")
    ap.add_argument("--tag", default="ablated", help="name of the fine-tune in the results and the plot")
    ap.add_argument("--base", default=None, help="the aligned model ft came from (default: the demo model)")
    ap.add_argument("--vector", default=str(ROOT / "vectors" / "enchtable.json"))
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list; a method's parameters after colons: enchtable:beta=0.5")
    ap.add_argument("--per-request", default="0.5", help="strengths of the per-request low-rank rows ('' for none)")
    ap.add_argument("--gated", default="1", help="strengths of the rows with the weight vector per request behind "
                    "--gate's gate ('' for none)")
    ap.add_argument("--gate", default="refusal", help="the shipped gated activation vector whose gate --gated uses")
    ap.add_argument("--own-gate", default=None, metavar="MANIFEST",
                    help="a gated activation vector fitted on the ft itself (steer extract --model FT): adds "
                         "rows with it per request at --own-strengths, and with the weight vector per request "
                         "behind its gate at --gated")
    ap.add_argument("--own-strengths", default="1")
    ap.add_argument("--own-gated", default=None, help="strengths of the weight vector per request behind --own-gate's "
                    "gate (default: --gated's)")
    ap.add_argument("--own-combined", default="", metavar="S[,S]",
                    help="strengths of rows steered by both kinds behind --own-gate's gate: its activation vector "
                         "and the weight vector at --combine-ratio times the strength (steer serve --combine)")
    ap.add_argument("--combine-ratio", type=float, default=1.0)
    ap.add_argument("--activation", default=None, metavar="MANIFEST",
                    help="a gated activation vector (a shipped name or a manifest path, declared transfer) served "
                         "on the ft at each --activation-strengths (e.g. a strength chosen by "
                         "bench/gated_calibrate.py)")
    ap.add_argument("--activation-strengths", default="1")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--jb-limit", type=int, default=20)
    ap.add_argument("--humaneval", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--port", type=int, default=8350)
    ap.add_argument("--references", default="ft,base",
                    help="the unsteered reference rows to measure: ft, base, both (the default) or '' for none")
    ap.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                    help="the steer serve backend every row is served on")
    ap.add_argument("--out", default=None, help="default: bench/results/merge_eval_TAG.json")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    ap.add_argument("--plot", nargs="+", metavar="RESULTS", help="only draw the trade-off plot from these files")
    ap.add_argument("--plot-out", default=str(ROOT / "bench" / "results" / "merge_tradeoff.png"))
    ns = ap.parse_args(argv)
    if set(filter(None, ns.references.split(","))) - {"ft", "base"}:
        ap.error(f"--references takes ft, base or both, got {ns.references!r}")
    if ns.own_combined and (not ns.own_gate or not ns.combine_ratio > 0):
        ap.error("--own-combined needs --own-gate and a --combine-ratio > 0")
    if ns.plot:
        plot(ns.plot, ns.plot_out)
        print(f"wrote {ns.plot_out}")
        return 0
    base = ns.base or str(ensure_demo_model())
    ft = ns.ft or str(cache_dir() / "models" / f"{ensure_demo_model().name}-ablated")
    out_path = Path(ns.out or ROOT / "bench" / "results" / f"merge_eval_{ns.tag}.json")
    command = "python bench/merge_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "tag": ns.tag, "ft": ft, "base": base, "vector": ns.vector, "backend": ns.backend,
              "limits": {"harmful_and_aplomb": ns.limit, "jailbreak": ns.jb_limit, "humaneval": ns.humaneval},
              "checkpoint_mib": round(sum(f.stat().st_size for f in Path(ft).glob("*.safetensors")) / 2**20),
              "rows": []}
    if out_path.exists() and not ns.fresh:
        result["rows"] = json.loads(out_path.read_text())["rows"]
    done = {r["row"] for r in result["rows"]}

    def record(row: dict) -> None:
        result["rows"].append({**row, "command": command})  # the run that made the row (runs resume)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "suites"}), flush=True)

    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        for label, path in (("ft (unmerged)", ft), ("base (aligned)", base)):
            if label not in done and label.split()[0] in ns.references.split(","):
                record({"row": label, **evaluate(Path(path), ns, work)})
        for s in [float(x) for x in ns.per_request.split(",") if x.strip()]:
            label = f"ft + {Path(ns.vector).stem} per request @{s:g}"
            if label not in done:
                record({"row": label, **evaluate(Path(ft), ns, work, vector=ns.vector, strength=s,
                                                  transfer=True)})
        for s in [float(x) for x in ns.gated.split(",") if x.strip()]:
            label = f"ft + {Path(ns.vector).stem} per request behind {ns.gate}'s gate @{s:g}"
            if label not in done:
                record({"row": label, **evaluate(Path(ft), ns, work, vector=ns.vector, strength=s,
                                                  transfer=True, gate=ns.gate)})
        if ns.own_gate:
            for s in [float(x) for x in ns.own_strengths.split(",") if x.strip()]:
                label = f"ft + {json.loads(Path(ns.own_gate).read_text())['name']} (fitted on the ft) @{s:g}"
                if label not in done:
                    record({"row": label, "vector": ns.own_gate,
                            **evaluate(Path(ft), ns, work, vector=ns.own_gate, strength=s)})
            own_gated = ns.gated if ns.own_gated is None else ns.own_gated
            for s in [float(x) for x in own_gated.split(",") if x.strip()]:
                own = json.loads(Path(ns.own_gate).read_text())["name"]
                label = f"ft + {Path(ns.vector).stem} per request behind {own}'s gate (fitted on the ft) @{s:g}"
                if label not in done:
                    record({"row": label, "gate": ns.own_gate, **evaluate(Path(ft), ns, work, vector=ns.vector,
                                                                          strength=s, transfer=True,
                                                                          gate=ns.own_gate)})
            for s in [float(x) for x in ns.own_combined.split(",") if x.strip()]:
                own = json.loads(Path(ns.own_gate).read_text())["name"]
                label = f"ft + {own} (fitted on the ft) + {Path(ns.vector).stem} x{ns.combine_ratio:g} on its gate @{s:g}"
                if label not in done:
                    record({"row": label, "gate": ns.own_gate, **evaluate(Path(ft), ns, work, vector=ns.vector,
                                                                          strength=s, transfer=True, gate=ns.own_gate,
                                                                          combine=ns.combine_ratio)})
        if ns.activation:
            act = json.loads(_manifest(ns.activation).read_text())["name"]
            for s in [float(x) for x in ns.activation_strengths.split(",") if x.strip()]:
                label = f"ft + {act} @{s:g}"
                if label not in done:
                    record({"row": label, "vector": ns.activation,
                            **evaluate(Path(ft), ns, work, vector=ns.activation, strength=s, transfer=True)})
        for m in [m for m in ns.methods.split(",") if m.strip()]:
            if m in done and (m.split(":")[0] != "enchtable" or COMBINED.replace("enchtable", m, 1) in done):
                continue
            name, *given = m.split(":")  # enchtable:beta=0.5:gamma=0.3 -> --beta 0.5 --gamma 0.3
            out = work / "merged"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [str(BIN / "steer"), "merge", "--method", name, "--ft", ft, "--base", base, "--out", str(out)]
            for kv in given:
                k, v = kv.split("=", 1)
                cmd += [f"--{k.replace('_', '-')}", v]
            if name not in NO_SIGMA:
                cmd += ["--vector", ns.vector]
            merge = timed(cmd)
            card = json.loads((out / "merge_card.json").read_text())
            if m not in done:
                record({"row": m, "merge": merge, "params": card.get("parameters", card.get("params")),
                        **evaluate(out, ns, work)})
            combined = COMBINED.replace("enchtable", m, 1)
            if name == "enchtable" and combined not in done:
                record({"row": combined, **evaluate(out, ns, work, vector="refusal", strength=1.0, transfer=True)})
            shutil.rmtree(out)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
