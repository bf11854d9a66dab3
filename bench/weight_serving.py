"""What serving a weight vector costs: per-request low-rank factors and merged-at-load, against vanilla.

Three real ``steer serve`` processes on the demo model, up for the whole run, driven by the real
``openai`` async client (C concurrent streaming chats, fixed-length outputs via ``ignore_eos``, greedy):

- ``vanilla``: no vectors (no hooks at all), strength 0;
- the per-request server (the weight vector loaded, ``y = W x + s_row * B (A x)`` on every linear it
  changes): ``off`` (every request at strength 0) and ``K strengths`` (C distinct strengths in (0, 2]);
- ``merged``: the same vector merged into the weights at load (``--merge-vector NAME=1``), strength 0.

Modes are interleaved and repeated; ratios are paired per repeat (medians). The vector is ``--vector
PATH.json`` (a weight vector made for the demo model), or by default a random one of rank ``--rank``
over the q/k/v/o projections of every layer (the shape ``steer distill`` makes by default; the speed of
the hooks does not depend on the values). Writes bench/results/weight_serving.json.

    .venv/bin/python bench/weight_serving.py [--concurrency 8] [--max-tokens 64] [--repeats 3] [--rank 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import interleaved
from throughput import load, start_server

from steer.demo import ensure_demo_model
from steer.models import fingerprint, load_model
from steer.vectors import SafetyVector

ROOT = Path(__file__).resolve().parents[1]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_vector(rank: int, out_dir: Path) -> Path:
    model, _ = load_model(ensure_demo_model())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.split(".")[-2] in ATTN:
            o, i = p.shape
            tensors[f"lora_A.{name}"] = (torch.randn(rank, i, generator=g) / i**0.5).to(p.dtype)
            tensors[f"lora_B.{name}"] = (torch.randn(o, rank, generator=g) * 1e-3).to(p.dtype)
    vec = SafetyVector("w", "weight", fingerprint(model), tensors, {"coefficient": 1.0, "rank": rank},
                       {"method": "random (bench/weight_serving.py)"})
    return vec.save(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--vector", default=None, help="a weight vector manifest (default: a random one)")
    ap.add_argument("--port", type=int, default=8140)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_serving.json"))
    ns = ap.parse_args(argv)
    c = ns.concurrency
    distinct = [round(2.0 * (i + 1) / c, 3) for i in range(c)]
    k_name = f"{c} strengths"
    with tempfile.TemporaryDirectory() as vdir, tempfile.TemporaryDirectory() as empty:
        if ns.vector:
            src = Path(ns.vector)
            for f in (src, src.with_suffix(".safetensors")):
                shutil.copy(f, vdir)
            name = json.loads(src.read_text())["name"]
        else:
            random_vector(ns.rank, Path(vdir))
            name = "w"
        meta = json.loads((Path(vdir) / f"{name}.json").read_text())
        servers = [
            start_server(ns.port, ["--vectors", empty, "--default-strength", "0"]),
            start_server(ns.port + 1, ["--vectors", vdir, "--default-vector", name]),
            start_server(ns.port + 2, ["--vectors", vdir, "--merge-vector", f"{name}=1", "--default-strength", "0"]),
        ]
        try:
            modes = {"vanilla": (ns.port, [0.0] * c), "off": (ns.port + 1, [0.0] * c),
                     k_name: (ns.port + 1, distinct), "merged": (ns.port + 2, [0.0] * c)}
            for port, _ in modes.values():
                asyncio.run(load(port, [0.0] * 2, 8))  # warm-up
            results: dict[str, list[dict]] = {m: [] for m in modes}
            for mode in interleaved(list(modes), ns.repeats):
                port, strengths = modes[mode]
                results[mode].append(asyncio.run(load(port, strengths, ns.max_tokens)))
                print(f"  {mode}: {results[mode][-1]['tok_per_s']:.1f} tok/s", flush=True)
        finally:
            for srv in servers:
                srv.terminate()
                srv.wait()

    def paired(a: str, b: str) -> float:
        return statistics.median(x["tok_per_s"] / y["tok_per_s"] for x, y in zip(results[a], results[b], strict=True))

    med = {m: statistics.median(r["tok_per_s"] for r in runs) for m, runs in results.items()}
    summary = {
        "command": "python bench/weight_serving.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "concurrency": c, "max_tokens": ns.max_tokens, "repeats": ns.repeats, "strengths": distinct,
        "vector": {"name": name, "rank": meta["config"].get("rank"), "method": meta["provenance"].get("method"),
                   "tensors": len(meta.get("config", {}).get("energy", {})) or None},
        "median_tok_per_s": med,
        "paired_ratio": {f"{m}/vanilla": paired(m, "vanilla") for m in results if m != "vanilla"}
        | {f"{k_name}/off": paired(k_name, "off")},
        "runs": results,
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(summary, indent=1) + "\n")
    print("| mode | median tok/s | paired ratio to vanilla |\n|---|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v:.1f} | {'1.000' if m == 'vanilla' else format(paired(m, 'vanilla'), '.3f')} |")
    print(f"paired {k_name}/off: {paired(k_name, 'off'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
